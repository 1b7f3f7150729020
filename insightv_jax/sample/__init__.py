"""Generation: the KV-cache sampler, constrained steps, progressive reasoning."""
