"""The files around an export's weights that `transformers` users load:
`AutoProcessor.from_pretrained`, `pipeline("image-text-to-text")` and
`generate` read them, not `config.json`.

- `preprocessor_config.json`: the image processor (the one that travelled with
  the checkpoint, else the model config's own, `ImageProcessor.for_model` /
  `QwenImageProcessor.for_model`);
- `processor_config.json`, laid out as transformers 5's
  `ProcessorMixin.save_pretrained` writes it: the processor class, the image
  processor nested under `image_processor`, and LLaVA's token-count fields
  (`patch_size`, `vision_feature_select_strategy`,
  `num_additional_image_tokens`, `image_token`). Older transformers read the
  separate `preprocessor_config.json`, kept for them;
- `chat_template.jinja` (read by the tokenizer and the processor alike), for a
  tokenizer of one of our templates: `data.conversation.chat_template_jinja`,
  which renders the typed content parts pipelines send;
- `generation_config.json`: bos / eos / pad, eos being the template's
  end-of-turn token, so `generate` stops where our sampler does.
"""

from __future__ import annotations

import json
from pathlib import Path

from insightv_jax.config import ModelConfig
from insightv_jax.data import conversation as conv
from insightv_jax.data.images import PREPROCESSOR_FILE, ImageProcessor
from insightv_jax.data.qwen_images import QwenImageProcessor

PROCESSOR_CONFIG_FILE = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_PROCESSOR_CLASSES = {
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def special_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's bos / eos / pad ids (those it has)."""
    if tokenizer is None:
        return {}
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


def generation_config(tokenizer) -> dict:
    """`generation_config.json`: the tokenizer's special ids, with eos the end
    of an assistant turn in our templates (where our sampler stops) followed
    by the tokenizer's own eos where that differs."""
    gen = special_ids(tokenizer)
    template = conv.detect_template(tokenizer) if tokenizer is not None else None
    if template is not None:
        end = tokenizer.convert_tokens_to_ids(conv.get_template(template).eos)
        eos = [end] + [x for x in [gen.get("eos_token_id")] if x is not None and x != end]
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return gen


def write_chat_template(out: Path, cfg: ModelConfig, tokenizer) -> str | None:
    """Write our template (typed parts, the model's image placeholder) as the
    export's `chat_template.jinja`, where the tokenizer is one of ours; returns
    the template's name. A tokenizer with another template keeps its own."""
    template = conv.detect_template(tokenizer)
    if template is None:
        return None
    text = conv.chat_template_jinja(template, conv.image_span_for(cfg))
    (out / CHAT_TEMPLATE_FILE).write_text(text)
    # transformers 4 saved the template inside tokenizer_config.json; keep one version
    tok_config = out / "tokenizer_config.json"
    if tok_config.is_file():
        d = json.loads(tok_config.read_text())
        if "chat_template" in d:
            d["chat_template"] = text
            _write_json(tok_config, d)
    return template


def image_processor_config(out: Path, cfg: ModelConfig) -> dict:
    """The export's `preprocessor_config.json` (written from the model config if
    none travelled with the checkpoint), as a dict."""
    path = out / PREPROCESSOR_FILE
    if not path.is_file():
        kind = QwenImageProcessor if cfg.is_qwen_vl else ImageProcessor
        kind.for_model(cfg).save_pretrained(out)
    d = json.loads(path.read_text())
    if cfg.kind == "llava_next" and not d.get("image_grid_pinpoints"):
        # a single-view config from elsewhere: LlavaNextProcessor counts image
        # tokens over the model's anyres grids, so they must be these
        d.update(
            image_processor_type="LlavaNextImageProcessor",
            image_grid_pinpoints=[list(p) for p in cfg.llava.image_grid_pinpoints],
            do_pad=True,
        )
        _write_json(path, d)
    return d


def processor_config(cfg: ModelConfig, image_processor: dict, tokenizer=None) -> dict:
    """`processor_config.json` for a LLaVA / LLaVA-NeXT / Qwen-VL model.

    LLaVA's processor expands each `<image>` to (side / patch)^2 +
    `num_additional_image_tokens` tokens, less one for the "default" feature
    strategy, which drops the CLS token: CLIP towers have one, SigLIP's none.
    Qwen-VL's processor reads its image token off the tokenizer and its video
    processor from `preprocessor_config.json` (as Qwen's hub folders have it)."""
    out = {"processor_class": _PROCESSOR_CLASSES[cfg.kind], "image_processor": image_processor}
    if cfg.is_vlm:
        image_token = conv.IMAGE_TOKEN
        if tokenizer is not None:
            image_token = tokenizer.convert_ids_to_tokens(cfg.llava.image_token_id) or image_token
        out.update(
            image_token=image_token,
            num_additional_image_tokens=int(cfg.vision.family == "clip"),
            patch_size=cfg.vision.patch_size,
            vision_feature_select_strategy=cfg.llava.feature_strategy,
        )
    return out


def write_processor_files(out: Path, cfg: ModelConfig, tokenizer=None) -> None:
    """Write the files of the module docstring into the export folder `out`
    (after the tokenizer and processor files were copied there). A
    `processor_config.json` that travelled with the checkpoint is replaced:
    its fields are facts of the model config, which is what the weights are.
    Text-only models get the chat template and generation config only."""
    out = Path(out)
    if tokenizer is not None:
        write_chat_template(out, cfg, tokenizer)
    _write_json(out / "generation_config.json", generation_config(tokenizer))
    if cfg.kind in _PROCESSOR_CLASSES:
        image_processor = image_processor_config(out, cfg)
        config = processor_config(cfg, image_processor, tokenizer)
        _write_json(out / PROCESSOR_CONFIG_FILE, config)
