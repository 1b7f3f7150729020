"""`insightv plan`: compile the real-size SFT step for a mesh on fake CPU devices
with abstract parameters, and report per-device memory and model FLOPs.

Nothing is allocated: parameters, optimizer state and the batch are
`jax.ShapeDtypeStruct`s carrying their shardings; XLA's memory analysis of the
compiled step gives per-device argument, output and temporary bytes. The CPU
backend's figures are an estimate, so a hand calculation is printed beside them.
Images are planned at their largest, one per sample: LLaVA's at the largest
anyres grid, Qwen-VL's at `qwen_vl.max_pixels` (`qwen_patch_budget`).

Run as `python -m insightv_jax.train.plan --devices N --config C [k=v ...]`; the
CLI starts it in a subprocess whose XLA_FLAGS create N fake CPU devices.
jax, and every module of ours that imports it, is imported inside the functions
that need it: the parent process must not start jax before it sets XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

GiB = 1024**3


def plan_in_subprocess(config: str, overrides: list[str], devices: int, as_json: bool = False):
    """Run the planner in a fresh process with `devices` fake CPU devices."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "insightv_jax.train.plan", "--devices", str(devices)]
    cmd += ["--config", config] + (["--json"] if as_json else []) + list(overrides)
    return subprocess.run(cmd, env=env, capture_output=as_json, text=True)


def _shard_bytes(tree) -> int:
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.ndim else ()
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def hand_estimate(cfg, program, seq_len: int, vision_patches: int | None = None) -> dict:
    """Per-device bytes by hand: params, optimizer state, fp32 master weights (if
    any), gradient accumulator, remat-saved layer inputs, one layer's
    recomputation, one loss chunk, and (Qwen-VL, `vision_patches` per sample)
    one vision block."""
    import jax.numpy as jnp

    model_cfg = program_model_cfg(cfg)
    d = model_cfg.decoder
    mesh = program.mesh
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = max(1, cfg.train.global_batch // cfg.train.micro_batches // batch_ways)
    act = jnp.dtype(d.dtype).itemsize
    tensor = mesh.shape["tensor"]
    T, D, F, L, V = seq_len, d.hidden_size, d.intermediate_size, d.num_layers, d.vocab_size
    params = _shard_bytes(program.abstract_state["params"]) + _shard_bytes(
        program.abstract_state["frozen"]
    )
    opt = _shard_bytes(program.abstract_state["opt"])
    grads = 4 * sum(
        math.prod(x.sharding.shard_shape(x.shape))
        for x in _leaves(program.abstract_state["params"])
    )
    saved = L * rows * T * D * act if d.remat != "none" else 0
    qkv = (d.num_heads + 2 * d.num_kv_heads) * d.resolved_head_dim / tensor
    # `auto` is `xla` on the planner's CPU devices: whole (T, T) score matrices
    block = T if d.attention in ("xla", "auto") else d.attention_block_size
    layer = rows * T * (4 * D + 2 * qkv + 3 * F / tensor) * act
    layer += rows * d.num_heads / tensor * block * T * 4  # attention scores (one q block)
    if d.remat == "none":
        layer *= L
    # one chunk's fp32 logits, probabilities and their gradient (train/losses.py)
    loss = 3 * min(cfg.train.loss_chunk, rows * T) * V / tensor * 4
    out = {
        "params": params,
        "optimizer": opt,
        "grad_accumulator": grads,
        "saved_activations": saved,
        "layer_recompute": int(layer),
        "loss_chunk": int(loss),
    }
    if "master" in program.abstract_state:  # train.master_weights: fp32 copies of bf16 params
        out["master_weights"] = _shard_bytes(program.abstract_state["master"])
    if vision_patches:
        # The tower's segment attention forms whole (L, L) score matrices per
        # head, windowed blocks included: at thousands of patches they dominate
        # a block. Frozen, the tower runs forward only, one block at a time.
        v, P = model_cfg.qwen_vision, vision_patches
        vact = jnp.dtype(v.dtype).itemsize
        tower = rows * P * (6 * v.hidden_size + 3 * v.intermediate_size / tensor) * vact
        tower += rows * v.num_heads / tensor * P * P * (4 + vact)  # fp32 scores, probabilities
        if "vision" in cfg.train.trainable:  # remat keeps each block's input
            tower += v.depth * rows * P * v.hidden_size * vact
        out["vision_block"] = int(tower)
    out["total"] = sum(out.values())
    return out


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def program_model_cfg(cfg):
    from insightv_jax.train.trainer import effective_model_config

    return effective_model_config(cfg)


def qwen_patch_budget(model_cfg, seq_len: int) -> int:
    """Patches per sample (L) of the plan's Qwen-VL batch: one image at
    `qwen_vl.max_pixels` -- the most patches the image processor makes of
    one image -- cut to the `seq_len` image tokens a sample can hold, and
    padded to its `patch_bucket`, as the loader pads a batch's images."""
    from insightv_jax.models.qwen_vl import patch_bucket

    v = model_cfg.qwen_vision
    side = v.patch_size * v.spatial_merge_size  # pixels per merged token's side
    tokens = min(model_cfg.qwen_vl.max_pixels // side**2, seq_len)
    return patch_bucket(max(tokens, 1) * v.merge_unit)


def abstract_batch(model_cfg, mesh, B: int, T: int) -> dict:
    """The SFT step's batch as `jax.ShapeDtypeStruct`s split over the batch
    axes: token rows, plus one image per sample at its largest size -- LLaVA's
    largest anyres grid, or Qwen-VL's `qwen_patch_budget` patches laid out
    as `models.qwen_vl.batch_arrays` lays them out."""
    import jax
    import jax.numpy as jnp

    from insightv_jax.train.steps import batch_sharding

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape))

    batch = {k: struct((B, T), jnp.int32) for k in ("input_ids", "attention_mask", "labels")}
    if model_cfg.is_vlm:
        from insightv_jax.vision_grid import max_tiles

        n_img, S, t = (
            model_cfg.llava.images_per_sample,
            max_tiles(model_cfg),
            model_cfg.vision.image_size,
        )
        batch["pixel_values"] = struct((B, n_img, S, 3, t, t), jnp.float32)
        batch["image_sizes"] = struct((B, n_img, 2), jnp.int32)
    elif model_cfg.is_qwen_vl:
        v = model_cfg.qwen_vision
        L = qwen_patch_budget(model_cfg, T)
        batch.update(
            pixel_values=struct((B, L, v.patch_dim), jnp.float32),
            vision_order=struct((B, L), jnp.int32),
            vision_positions=struct((B, L, 2), jnp.int32),
            vision_full_segments=struct((B, L), jnp.int32),
            vision_window_segments=struct((B, L), jnp.int32),
            vision_restore=struct((B, L // v.merge_unit), jnp.int32),
            vision_rows=struct((B, T), jnp.int32),
            positions=struct((B, 3, T), jnp.int32),
        )
    return batch


def compile_step(cfg, devices: int | None = None):
    """Lower + compile the whole SFT step of `cfg` on the first `devices` of
    the current (fake) devices against abstract state and the
    `abstract_batch`: (program, abstract batch, compiled step, seconds). The
    compiled step also runs: on a state from `program.init_state` and a real
    batch of the same shapes, sharded alike."""
    import jax

    from insightv_jax.parallel import make_mesh
    from insightv_jax.train.trainer import build_program

    n = devices or len(jax.devices())
    mesh = make_mesh(cfg.mesh, jax.devices()[:n])
    model_cfg = program_model_cfg(cfg)
    t0 = time.time()
    program = build_program(model_cfg, cfg, mesh, max(cfg.train.steps, 1000))
    batch = abstract_batch(model_cfg, mesh, cfg.train.global_batch, cfg.train.seq_len)
    compiled = program.lower(batch).compile()
    return program, batch, compiled, time.time() - t0


def step_report(cfg, program, batch: dict, compiled, seconds: float) -> dict:
    """The report dict of a `compile_step`: XLA's per-device memory analysis,
    the hand estimate, parameter counts and model FLOPs."""
    from insightv_jax.train.metrics import step_flops, train_flops_per_token

    model_cfg = program_model_cfg(cfg)
    B, T = cfg.train.global_batch, cfg.train.seq_len
    patches = batch["pixel_values"].shape[1] if model_cfg.is_qwen_vl else None
    ma = compiled.memory_analysis()
    xla = {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
        "code": int(ma.generated_code_size_in_bytes),
    }
    xla["total"] = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
    n_params = sum(math.prod(x.shape) for x in _leaves(program.abstract_state["params"]))
    n_frozen = sum(math.prod(x.shape) for x in _leaves(program.abstract_state["frozen"]))
    if model_cfg.is_qwen_vl:  # its tower's attention spans depend on the images themselves
        flops, counted = train_flops_per_token(model_cfg, T, cfg.train.trainable) * B * T, "decoder"
    else:
        flops, counted = step_flops(model_cfg, batch, cfg.train.trainable), "decoder and images"
    return {
        "mesh": dict(program.mesh.shape),
        "devices": program.mesh.size,
        "global_batch": B,
        "seq_len": T,
        "micro_batches": cfg.train.micro_batches,
        # Qwen-VL: patches per sample of the planned batch (None: another kind)
        "vision_patches": patches,
        "trainable_params": n_params,
        "frozen_params": n_frozen,
        "compile_seconds": round(seconds, 1),
        "xla_per_device": xla,
        "hand_per_device": hand_estimate(cfg, program, T, patches),
        "model_flops_per_step": flops,
        "model_flops_of": counted,
    }


def plan(cfg, devices: int | None = None) -> dict:
    """Lower + compile the step of `cfg` on the current (fake) devices; a report dict."""
    return step_report(cfg, *compile_step(cfg, devices))


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"mesh {r['mesh']} ({r['devices']} devices), batch {r['global_batch']}×{r['seq_len']} "
        f"tokens in {r['micro_batches']} micro-batches; compiled in {r['compile_seconds']}s",
        *([f"images: {r['vision_patches']} patches per sample"] if r["vision_patches"] else []),
        f"parameters: {r['trainable_params'] / 1e9:.3f}B trainable, "
        f"{r['frozen_params'] / 1e9:.3f}B frozen",
        "per device, XLA memory analysis (CPU backend estimate):",
    ]
    lines += [f"  {k:<18}{g(v)}" for k, v in r["xla_per_device"].items()]
    lines.append("per device, hand calculation:")
    lines += [f"  {k:<18}{g(v)}" for k, v in r["hand_per_device"].items()]
    lines.append(
        f"model FLOPs per step: {r['model_flops_per_step']:.3e} "
        f"({r['model_flops_per_step'] / r['devices']:.3e} per device; {r['model_flops_of']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="insightv_jax.train.plan")
    parser.add_argument("--config", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from insightv_jax.config import load_config
    from insightv_jax.errors import InsightVError

    try:
        cfg = load_config(args.config, args.overrides)
        report = plan(cfg, args.devices)
    except InsightVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
