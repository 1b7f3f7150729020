"""`insightv bench sample`: sampler throughput as ratios measured in one run.

Peers: `transformers` `generate` (greedy, KV cache on; torch CPU, or the GPU
in `bench_decode`) on the same weights (exported by our exporter), the same
batch and lengths. Figures:
decode and prefill tokens/s; constrained vs unconstrained cost per token;
progressive generation with cache reuse vs re-encoding every turn; N samples
with a shared prefill vs decoding alone; decode time per token at contexts 128
vs 1024; and, for decode, the bytes a step reads per second as a fraction of
the memory read bandwidth measured in the same run (MBU, model bandwidth
utilisation: decode at small batch is bound by reading weights and cache),
beside the rates at which XLA's matmul and our panel kernel stream weights
through 1 and 8 rows.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insightv_jax.config import DecoderConfig, ModelConfig, VisionConfig, load_config
from insightv_jax.data.conversation import build_tokenizer
from insightv_jax.data.images import ImageProcessor
from insightv_jax.data.prompts import Prompts
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.models.factory import construct
from insightv_jax.sample.constrain import StepConstraint
from insightv_jax.sample.prompting import PromptEncoder
from insightv_jax.sample.reasoning import progressive_generate
from insightv_jax.sample.sampler import (
    CPU_DECODE_OPTIONS,
    Sampler,
    SamplingParams,
    cache_bucket,
    next_pow2,
)
from insightv_jax.timing import timed_in_turn

TINY_LM = DecoderConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
)


def _bench_decoder() -> DecoderConfig:
    path = Path(__file__).resolve().parents[2] / "configs" / "bench-20m.yaml"
    if path.is_file():
        return load_config(path).model.decoder
    return DecoderConfig(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_layers=6,
        num_heads=6,
        num_kv_heads=6,
    )


def _timed_in_turn(*fns, repeat: int = 3, min_seconds: float = 0.5) -> list[float]:
    """Best wall time of each `fn()`, calling them in turn for at least `repeat`
    rounds and `min_seconds` a function (`timing.timed_in_turn`). A
    decode step follows the machine's memory speed from second to second while
    a prefill, bound by arithmetic, does not: timed one after the other, a
    ratio of the two would carry that drift."""
    calls = [lambda f=f: jax.block_until_ready(f()) for f in fns]
    return timed_in_turn(*calls, min_seconds=min_seconds, min_steps=repeat, stat=min)


def _timed(fn, repeat: int = 3, min_seconds: float = 0.5) -> float:
    """Best wall time of `fn()` over at least `repeat` calls and `min_seconds`."""
    return _timed_in_turn(fn, repeat=repeat, min_seconds=min_seconds)[0]


def read_bandwidth_peak(mib: int = 256, min_seconds: float = 2.0) -> float:
    """Best bytes/s of a jitted sum over a `mib` MiB fp32 array (far beyond any
    CPU cache): how fast this machine streams memory into XLA, the denominator
    of the decode MBU. Timed over 2 s of calls: on a shared machine the rate
    moves by ~1.5x from second to second, and the peak is the best of them."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / _timed(lambda: total(x), min_seconds=min_seconds)


def matmul_read_rates(rows=(1, 8), d: int = 512, f: int = 2816, count: int = 16) -> dict:
    """GB/s at which a matmul streams weights it must read from memory: `rows`
    x d activations through a chain of `count` distinct d x f fp32 weights
    (16 x 5.8 MB, beyond any CPU cache), as a decode step does with one row per
    sequence. XLA's matmul (with the decode loop's CPU options) and, where it
    runs, the panel kernel that decode steps use instead (`panel_matmul`)."""
    from insightv_jax.sample import panel_matmul

    rng = np.random.RandomState(0)
    weights = [jnp.asarray(rng.randn(d, f).astype(np.float32) * 0.02) for _ in range(count)]
    nbytes = sum(w.nbytes for w in weights)
    products = {"xla": (lambda x, w: x @ w, weights)}
    if panel_matmul.available():
        packed = [panel_matmul.pack(w) for w in weights]
        products["panel"] = (lambda x, p: panel_matmul.matmul(x, p, f), packed)

    def chain(product):
        def run(x, weights):
            for w in weights:  # each product feeds the next: no matmul can be skipped
                x = x * 0.5 + product(x, w).sum(-1, keepdims=True) * 1e-3
            return x

        cpu = jax.default_backend() == "cpu"
        return jax.jit(run, compiler_options=CPU_DECODE_OPTIONS if cpu else None)

    out = {}
    for name, (product, ws) in products.items():
        run = chain(product)
        for m in rows:
            x = jnp.asarray(rng.randn(m, d).astype(np.float32))
            seconds = _timed(lambda x=x, run=run, ws=ws: run(x, ws))
            out[f"{name}_rows_{m}_gb_per_s"] = round(nbytes / seconds / 1e9, 1)
    return out


def decode_bytes(model, batch: int, cache_slots: int) -> int:
    """Bytes one decode step of a text decoder reads: every weight except the
    embedding table (a step gathers `batch` rows of it; tied embeddings are
    read whole as the LM head), and all of the K and V cache (attention reads
    every slot of the bucket, filled or not)."""
    cfg = model.decoder_config
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not cfg.tie_embeddings:
        weights -= model.embed[...].nbytes
    itemsize = jnp.dtype(cfg.dtype).itemsize
    kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cache_slots * cfg.resolved_head_dim
    return int(weights + kv * itemsize)


def _bandwidth(model, batch: int, cache_slots: int, seconds_per_step: float, peak: float):
    """Read GB/s of a decode step and its MBU against `peak` bytes/s."""
    rate = decode_bytes(model, batch, cache_slots) / seconds_per_step
    return {"read_gb_per_s": round(rate / 1e9, 1), "mbu": round(rate / peak, 3)}


def decode_vs_transformers(
    dcfg: DecoderConfig,
    peak: float,
    batch: int = 8,
    prompt: int = 32,
    new: int = 64,
    device: str = "cpu",
    pair=None,
    repeat: int = 3,
    min_seconds: float = 0.5,
) -> dict:
    """Decode and prefill tokens/s against `transformers` generate (the same
    weights, in the decoder's parameter dtype, on torch `device`), and the
    decode step's read bandwidth against `peak` bytes/s. `pair` is a
    `decode_pair` to reuse (built here when None); each side is timed in turn
    for `repeat` rounds and `min_seconds` at least."""
    import torch

    from insightv_jax.hf.peer import synchronize

    model, sampler, hf = pair or decode_pair(dcfg, device)
    prompts = np.random.RandomState(0).randint(1, dcfg.vocab_size, (batch, prompt))
    params = SamplingParams(max_new_tokens=new)

    def ours_generate():
        return sampler.generate(prompts.tolist(), params)

    def ours_prefill():
        state = sampler.start(batch, prompt + new)
        return sampler.extend(state, prompts.tolist()).logits

    ids = torch.tensor(prompts).to(device)

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(
                ids,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                use_cache=True,
            )
        synchronize(device)
        return out

    def hf_prefill():
        with torch.no_grad():
            out = hf(ids, use_cache=True).logits
        synchronize(device)
        return out

    t_gen, t_pre, t_hf_gen, t_hf_pre = _timed_in_turn(
        ours_generate, ours_prefill, hf_generate, hf_prefill, repeat=repeat, min_seconds=min_seconds
    )
    ours_decode = batch * new / max(t_gen - t_pre, 1e-9)
    hf_decode = batch * new / max(t_hf_gen - t_hf_pre, 1e-9)
    step = (t_gen - t_pre) / new
    slots = cache_bucket(next_pow2(prompt, 8) + new)  # as `generate` sizes the cache
    return {
        "decode_tokens_per_s": round(ours_decode, 1),
        "hf_decode_tokens_per_s": round(hf_decode, 1),
        "decode_ratio_vs_hf": round(ours_decode / hf_decode, 2),
        "prefill_tokens_per_s": round(batch * prompt / t_pre, 1),
        "hf_prefill_tokens_per_s": round(batch * prompt / t_hf_pre, 1),
        "ms_per_step": round(step * 1e3, 3),
        **_bandwidth(model, batch, slots, step, peak),
    }


def decode_pair(dcfg: DecoderConfig, device: str = "cpu"):
    """(model, its sampler, the transformers peer with its weights on torch `device`)."""
    from insightv_jax.hf.peer import hf_model

    cfg = ModelConfig(decoder=dcfg)
    model = construct(cfg, seed=0)
    return model, Sampler(model, pad_id=0), hf_model(cfg, device, model=model)


def bench_decode(
    dcfg: DecoderConfig,
    batches=(1, 8),
    prompt: int = 64,
    new: int = 128,
    device: str | None = None,
    read_mib: int = 2048,
    progress=None,
    repeat: int = 3,
    min_seconds: float = 0.5,
) -> dict:
    """Decode against `transformers` generate at each batch size, on the
    accelerator JAX runs on (the peer on torch's, `hf.peer.torch_device`),
    in the decoder's own dtype: the device check's sampling figures. The read
    peak streams `read_mib` MiB (a GPU needs GiBs for its launch to be noise);
    `progress(out)` is called with the figures so far after each batch size;
    `repeat` and `min_seconds` as in `decode_vs_transformers`."""
    from insightv_jax.hf.peer import torch_device

    device = device or torch_device()
    peak = read_bandwidth_peak(mib=read_mib, min_seconds=4 * min_seconds)
    out = {
        "read_peak_gb_per_s": round(peak / 1e9, 1),
        "dtype": dcfg.dtype,
        "prompt": prompt,
        "new_tokens": new,
        "peer_device": device,
    }
    pair = decode_pair(dcfg, device)
    for b in batches:
        out[f"batch_{b}"] = decode_vs_transformers(
            dcfg, peak, b, prompt, new, device, pair, repeat, min_seconds
        )
        if progress is not None:
            progress(dict(out))
    return out


def constrained_cost(dcfg: DecoderConfig, batch: int = 8) -> dict:
    """Per-loop-iteration time with and without the step-schema mask."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = _bench_tokenizer(Path(tmp), dcfg.vocab_size)
    cfg = dataclasses.replace(dcfg, vocab_size=len(tok))
    sampler = Sampler(construct(ModelConfig(decoder=cfg), seed=0), tok)
    constraint = StepConstraint(tok)
    prompts = [tok.encode("count the red squares", add_special_tokens=False)] * batch
    steps = 48
    params = SamplingParams(temperature=1.0, max_new_tokens=steps, seed=0)

    def run(c, n):
        def fn():
            state = sampler.start(batch, 16 + steps)
            state = sampler.extend(state, prompts)
            _, out = sampler.decode(
                state, dataclasses.replace(params, max_new_tokens=n), constraint=c
            )
            return out.num_tokens

        return fn

    # A constrained row stops when its object closes; the unconstrained run is
    # given exactly as many loop iterations, so both do the same work per row.
    iters = int(np.max(jax.device_get(run(constraint, steps)())))
    t_con, t_free = _timed_in_turn(run(constraint, steps), run(None, iters))
    return {"constrained_over_unconstrained": round(t_con / t_free, 3), "vocab": len(tok)}


def _bench_tokenizer(folder: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        '{"title": "Count", "content": "red squares: 2, blue circles: 1", "next_action": "continue"}',
        "how many red squares are left of the blue circle? 0 1 2 3 4 5 6 7 8 9",
    ] * 50
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=min(vocab, 1024),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<pad>"],
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok.save_pretrained(str(folder))
    return tok


BENCH_VISION = dict(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024,
                    num_layers=2, num_heads=4)  # fmt: skip  # 64 image tokens per image


def _bench_vlm(dcfg: DecoderConfig, folder: Path):
    """(sampler with prompt encoder, an image path): bench-20m's decoder behind a
    small CLIP tower (64 image tokens), with a synthetic-suite tokenizer and image."""
    import json

    write_llava(folder / "suite", 8, seed=0, n_eval=1)
    records = json.loads((folder / "suite" / "train.json").read_text())
    corpus = [r["question"] for r in records] + [
        '{"title": "Count", "content": "red squares: 2, blue circles: 1", "next_action": "continue"}'
    ]
    tok = build_tokenizer(corpus * 20, folder / "tok", template="minimal", vocab_size=508)
    tiny = load_config(Path(__file__).resolve().parents[2] / "configs/models/tiny.yaml").model
    cfg = dataclasses.replace(
        tiny,
        decoder=dataclasses.replace(dcfg, vocab_size=512),
        vision=dataclasses.replace(VisionConfig(), **BENCH_VISION),
    )
    enc = PromptEncoder(tok, processor=ImageProcessor.for_model(cfg), model_cfg=cfg)
    sampler = Sampler(construct(cfg, seed=0), tok, encoder=enc)
    return sampler, folder / "suite" / records[0]["image"]


def progressive_reuse(
    dcfg: DecoderConfig, questions: int = 2, samples: int = 4, turns: int = 8
) -> dict:
    """8 steps of <= 64 tokens with an image prompt (vision tower included):
    cache reuse vs re-encoding image + prompt + dialogue each turn."""
    with tempfile.TemporaryDirectory() as tmp:
        sampler, image = _bench_vlm(dcfg, Path(tmp))
        constraint = StepConstraint(sampler.tokenizer)
        qs = ["how many red squares are left of the blue circle?"] * questions
        kw = dict(
            num_samples=samples,
            params=SamplingParams(temperature=1.0, seed=0),
            constraint=constraint,
            prompts=Prompts(max_steps=turns - 1),
            images=[[image]] * questions,
            step_tokens=64,
            final_tokens=32,
        )

        def run(reuse: bool):
            return lambda: len(progressive_generate(sampler, qs, reuse_cache=reuse, **kw))

        t_reuse, t_again = _timed_in_turn(run(True), run(False), repeat=2)
    return {
        "reencode_over_reuse": round(t_again / t_reuse, 2),
        "turns": turns,
        "image_tokens": (BENCH_VISION["image_size"] // BENCH_VISION["patch_size"]) ** 2,
    }


def shared_prefill(dcfg: DecoderConfig, n: int = 8, prompt: int = 256, new: int = 32) -> dict:
    """N samples of one prompt: one prefill + copies vs decoding alone."""
    sampler = Sampler(construct(ModelConfig(decoder=dcfg), seed=0), pad_id=0)
    ids = np.random.RandomState(0).randint(1, dcfg.vocab_size, (1, prompt)).tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=new)
    warm = sampler.extend(sampler.start(1, prompt + new), ids)

    def shared():
        state = sampler.extend(sampler.start(1, prompt + new), ids)
        return sampler.decode(state.repeat_rows(n), params)[1].tokens

    def decode_only():
        state = jax.tree.map(lambda x: x.copy(), warm).repeat_rows(n)
        return sampler.decode(state, params)[1].tokens

    t_shared, t_decode = _timed_in_turn(shared, decode_only)
    return {
        "shared_prefill_over_decode_only": round(t_shared / t_decode, 3),
        "n": n,
        "prompt": prompt,
    }


def context_scaling(dcfg: DecoderConfig, peak: float, batch: int = 8, new: int = 32) -> dict:
    """Decode time per token with 128 vs 1024 tokens already in the cache, at
    `batch` rows, and each one's read bandwidth against `peak` bytes/s. At
    batch 8 an fp32 cache of 1,024 tokens holds twice the bytes of bench-20m's
    weights, so a step bound by memory reads takes about twice as long there;
    at batch 1 the weights dominate both."""
    model = construct(ModelConfig(decoder=dcfg), seed=0)
    sampler = Sampler(model, pad_id=0)
    params = SamplingParams(max_new_tokens=new)
    contexts, fns, slots = (128, 1024), [], []
    for ctx in contexts:
        ids = np.random.RandomState(0).randint(1, dcfg.vocab_size, (batch, ctx - 8)).tolist()
        state0 = sampler.extend(sampler.start(batch, ctx + new), ids)

        def fn(state0=state0):
            return sampler.decode(jax.tree.map(lambda x: x.copy(), state0), params)[1].tokens

        fns.append(fn)
        slots.append(state0.cache.max_length)
    seconds = _timed_in_turn(*fns)
    per_token = {ctx: t / new for ctx, t in zip(contexts, seconds)}
    bandwidth = {
        ctx: _bandwidth(model, batch, n, per_token[ctx], peak) for ctx, n in zip(contexts, slots)
    }
    return {
        "per_token_1024_over_128": round(per_token[1024] / per_token[128], 3),
        "ms_per_token": {k: round(v * 1e3, 3) for k, v in per_token.items()},
        "batch": batch,
        "bandwidth": bandwidth,
    }


def bench_sample() -> dict:
    """All sampler figures for the tiny decoder and bench-20m (each section is
    printed as soon as it is measured)."""
    import json
    import sys

    bench20 = _bench_decoder()
    peak = read_bandwidth_peak()
    out = {
        "read_peak_gb_per_s": round(peak / 1e9, 1),
        "convention": "MBU = bytes a decode step reads (weights but the embedding table, "
        "and the whole K/V cache bucket) per second / the XLA sum rate over 256 MiB",
    }
    print(json.dumps(out), file=sys.stderr, flush=True)
    sections = [
        (
            "tiny: decode vs transformers (batch 8)",
            lambda: decode_vs_transformers(TINY_LM, peak),
        ),
        (
            "bench-20m: decode vs transformers (batch 8)",
            lambda: decode_vs_transformers(bench20, peak),
        ),
        ("bench-20m: constrained vs unconstrained", lambda: constrained_cost(bench20)),
        ("bench-20m: shared prefill N=8", lambda: shared_prefill(bench20)),
        ("bench-20m: context 128 vs 1024", lambda: context_scaling(bench20, peak)),
        (
            "bench-20m: context 128 vs 1024, batch 1",
            lambda: context_scaling(bench20, peak, batch=1),
        ),
        ("bench-20m + vision: progressive cache reuse", lambda: progressive_reuse(bench20)),
        ("matmul weight read rate, 1 vs 8 rows", matmul_read_rates),
    ]
    for name, fn in sections:
        out[name] = fn()
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    return out
