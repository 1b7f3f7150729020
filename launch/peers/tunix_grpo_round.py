"""One GRPO round run by Google's Tunix GRPO learner: the peer that
`insightv bench rl` compares our round against.

Runs inside its own virtualenv (`make tunix-peer` builds `.venv-tunix`), because
Tunix pins other transformers/tokenizers/safetensors versions than ours; the bench
drives it as a subprocess and reads the ONE JSON line it prints on stdout (all
other output goes to stderr).

What it measures: `warmup + rounds` rounds of Tunix's own `GRPOLearner.train`
loop on JAX CPU, one device. The warm-up rounds (2 by default) are not timed: the
first compiles prefill, decode loop and train step, and the second still compiles
one small program (Tunix's sampler keeps the prompt length as a jax array in a
static field of its jitted state, so its second call compiles an `equal` to compare
it with the cached one; `compiles_in_timed_rounds` in the JSON checks that no
timed round compiles). Each timed round is timed as a whole (`round_s`), and split
into its rollout, `RLCluster.generate` (`rollout_s`), and its update,
`RLCluster.update_actor`: the policy's log-probs by the training forward plus one
Adam step (`update_s`). What remains of a round (rewards, group advantages,
host-side padding, Tunix's metric buffering) is `round_s - rollout_s - update_s`.
All three are medians over the timed rounds; the per-round lists come along.

How the round matches ours:
  model     Tunix's Llama3 (`tunix.models.llama3.model`), fp32, random init
            (nnx.Rngs(0); MLP kernels redrawn, see `build_model`): vocab 16, hidden 64, MLP 128, 2 layers, 4 heads, 2 KV
            heads, head_dim 16, norm eps 1e-5, untied embeddings
  task      16 prompts of 7 token ids in [3, 16) (numpy seed 0) a round, G = 8
            responses each (128), up to 8 new tokens, temperature 1, top-p 1, no
            top-k; reward 1 when a response's first token is its prompt's last
            token, else 0
  update    GRPO, beta 0 (no reference model), epsilon 0.2, num_iterations 1, one
            minibatch of all 128 responses, Adam lr 1e-3
  tokens    pad 0, bos 1, eos 2, through a minimal tokenizer whose text is
            space-separated integer ids (`IntTokenizer`)
Deviations that Tunix 0.1.7 imposes are listed in launch/peers/README.md and,
where they bear on a number, in the JSON's "notes".

Usage (from the repo root, after `make tunix-peer`):
  .venv-tunix/bin/python launch/peers/tunix_grpo_round.py [--rounds 3]
      [--prompts 16] [--group 8] [--max-new 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

# JAX on CPU (one device unless XLA_FLAGS asks for more; the mesh takes the
# first), set before anything imports jax.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB = 16
PROMPT_LEN = 7
FIRST_CONTENT_ID = 3  # prompt ids are drawn from [3, VOCAB): never pad/bos/eos


def log(*parts) -> None:
    """Everything but the final JSON line goes to stderr."""
    print(*parts, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    """The one JSON line the bench reads."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def fail(reason: str, code: int = 2) -> None:
    """No fake numbers: a one-line reason on stdout, a nonzero exit."""
    emit({"peer": "tunix", "error": " ".join(str(reason).split())})
    sys.exit(code)


class IntTokenizer:
    """The smallest tokenizer Tunix's `TokenizerAdapter` accepts (it needs only
    encode/decode/bos_id/eos_id/pad_id): text is space-separated integer ids, so a
    prompt string is exactly its token ids and a completion decodes to its ids."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return BOS_ID

    def eos_id(self) -> int:
        return EOS_ID

    def pad_id(self) -> int:
        return PAD_ID


def make_batches(n_prompts: int, rounds: int) -> list[dict]:
    """`rounds` batches of `n_prompts` prompts, each PROMPT_LEN ids in [3, VOCAB),
    from numpy seed 0 — fresh prompts every round, the same every run. A batch's
    prompts are a numpy array of strings, as a grain batch would give: Tunix
    repeats them G times with `jax.tree.map(np.repeat)`, which would treat a
    Python list as a pytree of separate strings."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(FIRST_CONTENT_ID, VOCAB, size=(rounds, n_prompts, PROMPT_LEN))
    return [{"prompts": np.array([" ".join(map(str, p)) for p in batch])} for batch in ids]


def first_token_reward(prompts, completions, **_) -> list[float]:
    """1.0 when the response's first token is the prompt's last token, else 0.0.
    Tunix calls it with the prompt strings repeated G times and the decoded
    completions (text of the ids before EOS)."""
    out = []
    for p, c in zip(prompts, completions):
        c_ids = c.split()
        out.append(1.0 if c_ids and c_ids[0] == p.split()[-1] else 0.0)
    return out


def build_model():
    """Tunix's Llama3 at our sizes. Tunix initialises the MLP kernels to zeros
    (llama3/model.py), which leaves gate/up without gradient on the first step; we
    redraw them from the same normal(0.01) its attention and embedding weights use,
    so the round's update touches every weight as ours does (same shapes, same work
    either way)."""
    import jax
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    config = llama3.ModelConfig(
        num_layers=2,
        vocab_size=VOCAB,
        embed_dim=64,
        hidden_dim=128,
        num_heads=4,
        head_dim=16,
        num_kv_heads=2,
        rope_theta=10_000,
        norm_eps=1e-5,
        weight_tying=False,
    )
    model = llama3.Llama3(config, rngs=nnx.Rngs(0))
    key = jax.random.PRNGKey(0)
    init = nnx.initializers.normal(0.01)
    for layer in model.layers:
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            key, sub = jax.random.split(key)
            kernel = lin.kernel[...]
            lin.kernel[...] = init(sub, kernel.shape, kernel.dtype)
    return model


def build_learner(args, model):
    """An RLCluster (actor = rollout model, same one-device mesh, vanilla Tunix
    sampler, no reference since beta = 0) and a GRPOLearner over it."""
    import jax
    import optax
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    # Auto axes, as Tunix's examples use: jax.make_mesh now defaults to Explicit
    # axes, under which the Llama3 embedding gather refuses to trace.
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1], axis_types=(auto, auto))
    roles = rl_cluster_lib.Role
    prompt_fed = PROMPT_LEN + 1  # Tunix's sampler prepends BOS
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adam(1e-3),
            eval_every_n_steps=10**9,  # no eval rounds
            max_steps=args.warmup + args.rounds,
            # one minibatch, one micro-batch, one rollout batch: all 16 prompts
            mini_batch_size=args.prompts,
            train_micro_batch_size=args.prompts,
            rollout_micro_batch_size=args.prompts,
            compute_logps_micro_batch_size=args.prompts,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=args.max_new,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            max_prompt_length=prompt_fed,  # no left padding beyond the prompt
            kv_cache_size=prompt_fed + args.max_new,
            data_type=None,
        ),
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=model,
        reference=None,
        tokenizer=IntTokenizer(),
        cluster_config=cluster_config,
    )
    algo = grpo_learner.GRPOConfig(
        num_generations=args.group,
        num_iterations=1,
        beta=0.0,
        epsilon=0.2,
    )
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, algo_config=algo, reward_fns=first_token_reward
    )
    return cluster, learner


class RoundClock:
    """Wall-clock spans of each round and of its rollout and update, taken by
    wrapping the learner's own methods on the instances (Tunix's code runs as is).
    A round runs its rollout on Tunix's data thread and its update on the main
    thread, one after the other (actor and rollout share a mesh, so Tunix does not
    overlap them)."""

    def __init__(self, cluster, learner):
        import jax
        from flax import nnx
        from tunix.rl import rl_cluster as rl_cluster_lib

        self.rounds: list[float] = []
        self.rollouts: list[float] = []
        self.updates: list[float] = []
        self.generated: list[int] = []
        self.rewards: list[float] = []
        # XLA compiles per round: a timed round that compiles would time the
        # compiler, so the count after the warm-up goes into the JSON.
        self.compiles: list[int] = []
        self._compiling = 0

        def count_compile(event: str, *_a, **_kw):
            if event == "/jax/core/compile/backend_compile_duration":
                self._compiling += 1

        jax.monitoring.register_event_duration_secs_listener(count_compile)

        generate = cluster.generate
        update_actor = cluster.update_actor
        run_global_step = learner._run_global_step
        compute_rewards = learner._compute_rewards

        rollout_config = cluster.get_rollout_config(rl_cluster_lib.Mode.TRAIN)

        def timed_generate(*a, **kw):
            # A fresh sampling key each round, as our rounds draw: Tunix's sampler
            # falls back to PRNGKey(0) on every call when RolloutConfig.seed is
            # None. The key is traced, so this costs no recompile.
            rollout_config.seed = jax.random.PRNGKey(len(self.rollouts))
            t0 = time.perf_counter()
            out = generate(*a, **kw)  # tokens come back as numpy: already synced
            self.rollouts.append(time.perf_counter() - t0)
            self.generated.append(int(sum(len(t) for t in out.tokens)))
            return out

        def timed_update(*a, **kw):
            t0 = time.perf_counter()
            out = update_actor(*a, **kw)
            # the step is dispatched asynchronously: wait for the new weights
            jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
            self.updates.append(time.perf_counter() - t0)
            return out

        def timed_round(*a, **kw):
            self._compiling = 0
            t0 = time.perf_counter()
            out = run_global_step(*a, **kw)
            jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
            self.rounds.append(time.perf_counter() - t0)
            self.compiles.append(self._compiling)
            return out

        def kept_rewards(*a, **kw):
            r = compute_rewards(*a, **kw)
            self.rewards.append(float(r.mean()))
            return r

        cluster.generate = timed_generate
        cluster.update_actor = timed_update
        learner._run_global_step = timed_round
        learner._compute_rewards = kept_rewards


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (>= 1)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per round")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (G, > 1)")
    p.add_argument("--max-new", type=int, default=8, help="max new tokens per response")
    args = p.parse_args(argv)
    if min(args.rounds, args.warmup, args.prompts, args.max_new) < 1 or args.group < 2:
        p.error("need --rounds, --warmup, --prompts, --max-new >= 1 and --group >= 2")
    return args


def run_rounds(args):
    """Build Tunix's model, cluster and learner, and run `args.warmup` warm-up
    rounds plus `args.rounds` timed rounds through `GRPOLearner.train`."""
    model = build_model()
    cluster, learner = build_learner(args, model)
    clock = RoundClock(cluster, learner)
    learner.train(make_batches(args.prompts, args.warmup + args.rounds))
    return clock


def report(args, clock, tunix_version: str, jax) -> dict:
    """The JSON record: medians of the timed rounds (those after the warm-up)."""
    w, n = args.warmup, args.warmup + args.rounds
    if not (len(clock.rounds) == len(clock.rollouts) == len(clock.updates) == n):
        fail(
            f"expected {n} rounds, saw {len(clock.rounds)} rounds, "
            f"{len(clock.rollouts)} rollouts, {len(clock.updates)} updates"
        )
    log(
        f"first (compiling) round {clock.rounds[0]:.2f}s (rollout "
        f"{clock.rollouts[0]:.2f}s, update {clock.updates[0]:.2f}s); "
        f"compiles per round {clock.compiles}"
    )
    rounds, rollouts, updates = clock.rounds[w:], clock.rollouts[w:], clock.updates[w:]
    generated = clock.generated[w:]
    return {
        "peer": "tunix",
        "tunix_version": tunix_version,
        "jax_version": jax.__version__,
        "device": jax.devices()[0].platform,
        "round_s": statistics.median(rounds),
        "rollout_s": statistics.median(rollouts),
        "update_s": statistics.median(updates),
        "warmup_rounds": w,
        "warmup_rounds_s": clock.rounds[:w],
        "rounds_s": rounds,
        "rollouts_s": rollouts,
        "updates_s": updates,
        "responses": args.prompts * args.group,
        "generated_tokens": statistics.median(generated),
        "generated_tokens_per_round": generated,
        # all timed rounds' tokens over all their rollout time
        "tokens_per_s": sum(generated) / sum(rollouts),
        "prompt_len_fed": PROMPT_LEN + 1,
        "max_new": args.max_new,
        "mean_reward_per_round": clock.rewards[w:],
        "compiles_in_timed_rounds": sum(clock.compiles[w:]),
        "rounds_timed": args.rounds,
        "notes": (
            "round_s/rollout_s/update_s/generated_tokens are medians over the timed "
            "rounds; generated_tokens counts response tokens before EOS (EOS not "
            "counted); tokens_per_s = all timed generated tokens / all timed rollout "
            "time; Tunix's sampler prepends BOS, so each prompt is fed as 1+7 tokens; "
            "Tunix 0.1.7's Llama3 applies RoPE with theta 1e6 whatever rope_theta says; "
            "all deviations: launch/peers/README.md"
        ),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        from importlib.metadata import version

        import jax
        import tunix  # noqa: F401
        from tunix.models.llama3 import model  # noqa: F401
        from tunix.rl.grpo import grpo_learner  # noqa: F401

        tunix_version = version("google-tunix")
    except Exception as e:  # noqa: BLE001 - any import failure is the reason
        fail(f"import failed: {type(e).__name__}: {e}")
    log(f"tunix {tunix_version}, jax {jax.__version__}, devices {jax.devices()}")

    try:
        # stdout carries only the JSON line: anything Tunix prints goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            clock = run_rounds(args)
    except Exception as e:  # noqa: BLE001 - report Tunix's failure, don't fake numbers
        traceback.print_exc(file=sys.stderr)
        fail(f"tunix GRPO round failed: {type(e).__name__}: {e}")
    emit(report(args, clock, tunix_version, jax))


if __name__ == "__main__":
    main()
