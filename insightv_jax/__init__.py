"""insightv-jax: Insight-V long-chain visual reasoning in JAX / Flax NNX."""

__version__ = "0.1.0"
