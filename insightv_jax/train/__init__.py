"""Training: losses, the sharded SFT step, the loop, the planner and benchmarks.

`run_sft(cfg)` is what `insightv sft` calls. This __init__ runs before every
train.* module (before train.plan too, which the CLI imports without starting
jax): what its functions need is imported inside them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from insightv_jax.errors import InsightVError


def _model_config_of(path: str):
    """The model config stored with a checkpoint (model dir, run dir or HF folder)."""
    from insightv_jax.checkpoint import checkpoint_kind, read_model_config

    if checkpoint_kind(path) == "hf":
        from insightv_jax.hf.configs import model_from_hf, read_hf_config

        return model_from_hf(read_hf_config(path), where=f"{path}/config.json")
    return read_model_config(path)


# What a run's `model:` section decides about the checkpoint it starts from: how the
# model computes (precisions, attention kernel and block size) and which vision layer
# feeds the projector (the paper trains its reasoning agent on layer -1 and its summary
# agent on -2 from the same base). The checkpoint decides the architecture.
RUN_MODEL_FIELDS = {
    "decoder": ("param_dtype", "dtype", "attention", "attention_block_size"),
    "vision": ("param_dtype", "dtype", "attention"),
    "llava": ("feature_layer",),
}


def model_config_for_run(cfg, print_fn=print):
    """The model a run starting from `train.init` trains: the checkpoint's
    architecture with the run's own `RUN_MODEL_FIELDS` when its config has a
    `model:` section (a config without one keeps the checkpoint's as it is)."""
    from insightv_jax.config import ModelConfig

    model = _model_config_of(cfg.train.init)
    if cfg.model == ModelConfig():
        return model
    changed = []
    for section, fields in RUN_MODEL_FIELDS.items():
        ours, theirs = getattr(cfg.model, section), getattr(model, section)
        if ours is None or theirs is None:
            continue
        updates = {f: getattr(ours, f) for f in fields if getattr(ours, f) != getattr(theirs, f)}
        if updates:
            model = dataclasses.replace(model, **{section: dataclasses.replace(theirs, **updates)})
            changed += [f"{section}.{f}={v} (checkpoint: {getattr(theirs, f)})"
                        for f, v in updates.items()]  # fmt: skip
    if changed:
        print_fn(f"model of {cfg.train.init} with this config's " + ", ".join(changed))
    return model


def sft_batches(cfg, tokenizer_dir: Path | None, processor_dir: Path | None):
    """(batch iterator of this process's rows, steps per epoch) for `cfg`.

    `train.data` unset: the toy source (smoke runs). Real data goes through the
    data loader (data/loader.py); its tokenizer transform is wired in here.
    """
    from insightv_jax.train.toy_data import toy_batches

    t = cfg.train
    if t.data is None:
        n = max(t.global_batch * 4, 32)
        it = toy_batches(n, t.seq_len, cfg.model.decoder.vocab_size, t.global_batch, cfg.seed)
        return it, n // t.global_batch
    return data_batches(cfg, tokenizer_dir)


def data_batches(cfg, tokenizer_dir: Path | None):
    """The grain loader over `train.data`, tokenised with the model's chat
    template; each process reads its own shard (global_batch / processes rows)."""
    import jax

    from insightv_jax.data.conversation import detect_template, load_tokenizer
    from insightv_jax.data.loader import loader_from_config
    from insightv_jax.data.transforms import ChatTransform
    from insightv_jax.models.factory import batch_images

    t = cfg.train
    if tokenizer_dir is None:
        raise InsightVError(
            f"train.data={t.data}: no tokenizer (set train.tokenizer or init from a checkpoint with one)"
        )
    template = detect_template(load_tokenizer(tokenizer_dir))
    if template is None:
        raise InsightVError(
            f"{tokenizer_dir}: tokenizer uses none of the llama3/chatml/minimal templates"
        )
    root = cfg.data.image_root or str(Path(t.data).parent)
    transform = ChatTransform(tokenizer_dir, template, cfg.model, root, batch_images(cfg.model))
    if t.global_batch % jax.process_count():
        raise InsightVError(
            f"train.global_batch={t.global_batch} does not split over {jax.process_count()} processes"
        )
    local = t.global_batch // jax.process_count()
    tok = transform.tokenizer
    limits = transform.limits(1)  # counts tokens exactly as the transform does
    loader = loader_from_config(
        cfg.data,
        t.data,
        transform,
        batch_size=local,
        image_tokens=limits.image_tokens,
        count_tokens=limits.count_tokens,
        count_conversation=limits.count_conversation,
        video_tokens=limits.video_tokens,
        pad_id=tok.pad_token_id or 0,
    )
    counts = loader.counts
    if counts["skipped"]:
        print(
            f"data: {counts['used']} records used, {counts['skipped']} skipped {counts['reasons']}"
        )
    return loader, max(1, counts["used"] // t.global_batch)


def _processor_dir(cfg) -> Path:
    """A processor/ folder for a VLM trained from a preset (written next to the run)."""
    from insightv_jax.data.images import ImageProcessor
    from insightv_jax.data.qwen_images import QwenImageProcessor

    folder = Path(cfg.train.workdir + ".processor")
    if not (folder / "preprocessor_config.json").is_file():
        kind = QwenImageProcessor if cfg.model.is_qwen_vl else ImageProcessor
        kind.for_model(cfg.model).save_pretrained(folder)
    return folder


def run_sft(cfg) -> None:
    """Train the model of `cfg` (from `train.init` or random) and leave a run directory."""
    from insightv_jax.checkpoint import aux_dirs
    from insightv_jax.parallel import initialize_distributed
    from insightv_jax.train.trainer import Trainer

    initialize_distributed()
    tok = proc = None
    if cfg.train.init:
        cfg = dataclasses.replace(cfg, model=model_config_for_run(cfg))
        tok, proc = aux_dirs(cfg.train.init)
    if cfg.train.tokenizer:
        tok = Path(cfg.train.tokenizer)
    if cfg.model.takes_images and proc is None:
        proc = _processor_dir(cfg)
    batches, per_epoch = sft_batches(cfg, tok, proc)
    total = cfg.train.steps or cfg.train.epochs * per_epoch
    trainer = Trainer(cfg, batches, total_steps=total, tokenizer_dir=tok, processor_dir=proc)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    state = "preempted at" if result.preempted else "finished"
    print(
        f"{state} step {result.step}/{total}; skipped {result.skipped} non-finite steps; "
        f"run directory {trainer.run_dir}"
    )
