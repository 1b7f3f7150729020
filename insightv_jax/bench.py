"""`insightv bench NAME`: small throughput benchmarks, one function per name.

Add a benchmark by writing `def bench_x(args) -> dict` and registering it in
`BENCHES`; the CLI prints each result line.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def bench_data(n: int = 512, batch_size: int = 32, workers: tuple[int, ...] = (0, 2)) -> dict:
    """Records/s through the loader (validate excluded) on a synthetic LLaVA dataset."""
    from absl import flags

    from insightv_jax.data.loader import Loader
    from insightv_jax.data.simple_transform import SimpleTransform, WordTokenizer
    from insightv_jax.data.sources import open_source
    from insightv_jax.data.synthetic.writer import write_llava
    from insightv_jax.data.validate import Limits

    if not flags.FLAGS.is_parsed():  # grain workers read absl flags
        flags.FLAGS.mark_as_parsed()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_llava(tmp, n, seed=0)
        src = open_source(Path(tmp) / "train.json")
        tok = WordTokenizer.from_texts(t["value"] for r in src.records for t in r["conversations"])
        transform = SimpleTransform(tok, src.root, image_tokens=16)
        limits = Limits(max_length=128, image_tokens=16, count_tokens=tok.count, turn_overhead=1)
        for w in workers:
            loader = Loader(
                src, transform, batch_size=batch_size, buckets=(64, 128), seed=0,
                num_epochs=None, workers=w, limits=limits,
            )  # fmt: skip
            next(loader)  # start-up (worker spawn) is not throughput
            steps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 2.0:
                next(loader)
                steps += 1
            dt = time.perf_counter() - t0
            results[f"workers={w}"] = round(steps * batch_size / dt, 1)
    return {"records_per_s": results, "batch_size": batch_size, "records": n}


def bench_sample() -> dict:
    """Sampler figures (see `insightv_jax.sample.benchmark`)."""
    from insightv_jax.sample.benchmark import bench_sample as run

    return run()


def bench_train() -> dict:
    """SFT step tokens/s and MFU vs transformers (torch CPU); see train/benchmark.py."""
    from insightv_jax.train.benchmark import bench_train as run

    return run()


BENCHES: dict[str, Callable[..., dict]] = {
    "data": bench_data,
    "sample": bench_sample,
    "train": bench_train,
}
