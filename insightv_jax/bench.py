"""`insightv bench NAME`: small throughput benchmarks, one function per name.

Add a benchmark by writing `def bench_x(args) -> dict` and registering it in
`BENCHES`; the CLI prints each result line. Those in `SIZED` take `size=`
(`insightv bench NAME --size S`). Each benchmark imports what it
runs inside its function: the CLI reads `BENCHES` without starting jax.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def bench_data(n: int = 512, batch_size: int = 32, workers: tuple[int, ...] = (0, 2)) -> dict:
    """Records/s through the loader (validation excluded) on a synthetic LLaVA
    dataset, tokenised for the tiny preset exactly as training does; and the
    share of real (non-padding) tokens with and without `data.packing`, on
    those records' lengths and on a long-tailed distribution capped at 12,288
    tokens like the paper's SFT data (`data.packing.packing_figures`)."""
    from absl import flags

    from insightv_jax.config import load_config
    from insightv_jax.data import conversation as conv
    from insightv_jax.data.loader import Loader
    from insightv_jax.data.sources import open_source
    from insightv_jax.data.synthetic.writer import write_llava
    from insightv_jax.data.transforms import ChatTransform

    if not flags.FLAGS.is_parsed():  # grain workers read absl flags
        flags.FLAGS.mark_as_parsed()
    model_cfg = load_config(Path(__file__).resolve().parents[1] / "configs/models/tiny.yaml").model
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_llava(tmp, n, seed=0)
        src = open_source(Path(tmp) / "train.json")
        corpus = [t["value"] for r in src.records for t in r["conversations"]]
        conv.build_tokenizer(corpus, Path(tmp) / "tok", template="minimal", vocab_size=508)
        transform = ChatTransform(Path(tmp) / "tok", "minimal", model_cfg, tmp)
        from insightv_jax.data.packing import packing_figures

        packing = packing_figures([transform.length(r) for r in src.records], (64, 128), batch_size)
        for w in workers:
            loader = Loader(
                src, transform, batch_size=batch_size, buckets=(64, 128), seed=0,
                num_epochs=None, workers=w, limits=transform.limits(128),
            )  # fmt: skip
            next(loader)  # start-up (worker spawn) is not throughput
            steps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 2.0:
                next(loader)
                steps += 1
            dt = time.perf_counter() - t0
            results[f"workers={w}"] = round(steps * batch_size / dt, 1)
    return {"records_per_s": results, "batch_size": batch_size, "records": n, "packing": packing}


def bench_sample(size: str | None = None, progress=None) -> dict:
    """Sampler figures (see `insightv_jax.sample.benchmark`); with a `size`
    (1b, toy: train/benchmark.py's), decode of that decoder at batch 1 and 8
    against `transformers` generate on the accelerator JAX runs on
    (`progress(out)` after each batch size)."""
    if size is None:
        from insightv_jax.sample.benchmark import bench_sample as run

        return run()
    from insightv_jax.sample.benchmark import bench_decode
    from insightv_jax.train.benchmark import size_configs

    dcfg = size_configs(size)["decoder"].model.decoder
    if size == "toy":
        # a rehearsal of the code path: one timed round, no minimum time
        return bench_decode(
            dcfg, (8, 1), prompt=8, new=8, read_mib=64, progress=progress, repeat=1, min_seconds=0
        )
    # batch 8 first: the figure the device check must bring back if its time runs out
    return bench_decode(dcfg, (8, 1), prompt=64, new=64, progress=progress)


def bench_train(size: str | None = None) -> dict:
    """SFT step tokens/s and MFU vs transformers; see train/benchmark.py (size
    20m by default: torch CPU; 1b: bf16, the peer on the GPU when there is one)."""
    from insightv_jax.train.benchmark import bench_train as run

    return run(size=size or "20m")


def bench_dpo(pairs: int = 4, min_seconds: float = 3.0) -> dict:
    """DPO step vs SFT step on the same tokens per sequence (configs/bench-20m.yaml's
    decoder, one device): a step on `pairs` pairs (2·pairs sequences, precomputed
    reference log-probs) against an SFT step on `pairs` sequences of the same
    length (target ratio <= 2.2), and the log-prob pass's sequences/s."""
    import functools

    import jax
    import numpy as np
    from flax import nnx

    from insightv_jax.config import MeshConfig, load_config
    from insightv_jax.models.factory import init_model
    from insightv_jax.parallel import make_mesh
    from insightv_jax.timing import timed
    from insightv_jax.train.dpo import DPOProgram
    from insightv_jax.train.toy_data import ToySource
    from insightv_jax.train.trainer import build_program, global_batch

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "bench-20m.yaml", [f"train.global_batch={pairs}"])
    T, V = cfg.train.seq_len, cfg.model.decoder.vocab_size
    src = ToySource(2 * pairs, T, V, seed=0)
    rows = [src[i] for i in range(2 * pairs)]
    sft = {k: np.stack([r[k] for r in rows[:pairs]]) for k in rows[0]}
    dpo = {k: np.stack([np.stack([rows[i][k], rows[pairs + i][k]]) for i in range(pairs)])
           for k in rows[0]}  # fmt: skip
    dpo["ref_logps"] = np.full((pairs, 2), -100.0, np.float32)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    params = nnx.to_pure_dict(nnx.state(init_model(cfg.model, mesh, 0), nnx.Param))
    times = {}
    for name, cls, batch in (
        ("sft", None, sft),
        ("dpo", functools.partial(DPOProgram, dpo=cfg.dpo), dpo),
    ):
        program = build_program(cfg.model, cfg, mesh, 1000, **({"program_cls": cls} if cls else {}))
        box = {"state": program.init_state(jax.tree.map(lambda x: x.copy(), params))}
        gb = global_batch(batch, program)

        def step(program=program, box=box, gb=gb):
            box["state"], m = program(box["state"], gb)
            jax.block_until_ready(m["loss"])

        times[name] = timed(step, min_seconds)
    lp = {k: v for k, v in dpo.items() if k != "ref_logps"}
    times["logprob"] = timed(lambda: program.logprobs(params, lp), min_seconds)
    return {
        "sft_step_s": round(times["sft"], 4),
        "dpo_step_s": round(times["dpo"], 4),
        "dpo_over_sft": round(times["dpo"] / times["sft"], 3),
        "target_ratio": 2.2,
        "logprob_pass_seqs_per_s": round(2 * pairs / times["logprob"], 1),
        "logprob_pass_tokens_per_s": round(2 * pairs * T / times["logprob"], 1),
        "sequences": f"{pairs} (sft) vs {pairs} pairs = {2 * pairs} (dpo) x {T} tokens",
    }


def bench_rl() -> dict:
    """A GRPO round of ours by part, against Tunix's (see train/rl/benchmark.py)."""
    from insightv_jax.train.rl.benchmark import bench_rl as run

    return run()


def bench_serve() -> dict:
    """`insightv serve` throughput: concurrency 8 over sequential (see serve/bench.py)."""
    from insightv_jax.serve.bench import bench_serve as run

    return run()


SIZED = ("sample", "train")
BENCHES: dict[str, Callable[..., dict]] = {
    "dpo": bench_dpo,
    "rl": bench_rl,
    "data": bench_data,
    "sample": bench_sample,
    "serve": bench_serve,
    "train": bench_train,
}
