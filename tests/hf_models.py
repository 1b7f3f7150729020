"""Tiny random Hugging Face models (built by transformers itself) for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Shapes exercised by the parity tests: GQA ratios 1/2/4, tied and untied
# embeddings, qkv bias on/off, odd hidden sizes, Llama-3.1 rope scaling.
DECODER_CASES = {
    "llama_mha_untied": dict(family="llama", hidden_size=64, heads=4, kv_heads=4, tie=False),
    "llama_gqa2_tied": dict(family="llama", hidden_size=48, heads=4, kv_heads=2, tie=True),
    "llama_gqa4_odd_rope": dict(
        family="llama",
        hidden_size=72,
        heads=8,
        kv_heads=2,
        tie=False,
        head_dim=10,
        rope3=True,
        intermediate=101,
    ),
    "llama_attn_bias": dict(
        family="llama", hidden_size=40, heads=4, kv_heads=1, tie=False, bias=True
    ),
    "qwen2_gqa2_untied": dict(family="qwen2", hidden_size=64, heads=4, kv_heads=2, tie=False),
    "qwen2_gqa4_tied_odd": dict(
        family="qwen2", hidden_size=56, heads=4, kv_heads=1, tie=True, head_dim=14
    ),
}


def build_decoder(case: str, seed: int = 0, vocab: int = 97, layers: int = 2):
    """A tiny random LlamaForCausalLM / Qwen2ForCausalLM (eval mode, fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    c = DECODER_CASES[case]
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab,
        hidden_size=c["hidden_size"],
        intermediate_size=c.get("intermediate", 2 * c["hidden_size"] + 3),
        num_hidden_layers=layers,
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        tie_word_embeddings=c["tie"],
        max_position_embeddings=256,
        initializer_range=0.2,  # larger than default so logits are not all ~0
    )
    if c.get("head_dim"):
        kw["head_dim"] = c["head_dim"]
    if c["family"] == "llama":
        if c.get("rope3"):
            kw["rope_parameters"] = {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        kw["attention_bias"] = bool(c.get("bias"))
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    if c.get("bias") or c["family"] == "qwen2":  # biases init to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
    return model.eval()


def save(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(mask)
        return model(torch.tensor(ids), **kw).logits.float().numpy()


# ------------------------------------------------------------------ LLaVA

TILE = 20  # tower input side: 20-px tiles of 10-px patches (2x2 patches per tile)
PINPOINTS = [[20, 40], [40, 20], [40, 40], [20, 60], [60, 20]]
IMAGE_TOKEN = 96


def build_llava(kind: str = "llava_next", tower: str = "clip", seed: int = 0, layer: int = -2):
    """A tiny random LlavaNextForConditionalGeneration / LlavaForConditionalGeneration
    (CLIP or SigLIP tower, Llama decoder), every weight perturbed so biases and
    norms matter."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    vkw = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=10,
    )
    vision = CLIPVisionConfig(**vkw) if tower == "clip" else SiglipVisionConfig(**vkw)
    text = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    common = dict(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=layer,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
    )
    if kind == "llava_next":
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common)
        )
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return model.eval()


def llava_image_processor():
    """The transformers LLaVA-NeXT image processor (PIL backend) for the tiny towers."""
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS,
    )


def llava_processor(kind: str = "llava_next", strategy: str = "default"):
    """The transformers LlavaNextProcessor / LlavaProcessor of the tiny models: a
    word-level tokenizer (`w1`..`w95` are ids 1..95, `<pad>` 0, `<image>`
    `IMAGE_TOKEN`) and the tiny image processor. With `strategy` "default"
    (CLIP) the CLS token counts and is dropped, as in the llava-hf folders."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, IMAGE_TOKEN)}, "<image>": IMAGE_TOKEN}
    words = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="<pad>",
        unk_token="w1",
        extra_special_tokens=["<image>"],
    )
    if kind == "llava_next":
        cls, images = LlavaNextProcessor, llava_image_processor()
    else:
        cls = LlavaProcessor
        images = CLIPImageProcessorPil(
            size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}
        )
    return cls(
        image_processor=images,
        tokenizer=tok,
        patch_size=10,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if strategy == "default" else 0,
    )


def random_images(sizes, seed: int = 0, mode: str = "RGB"):
    """PIL images of the given (height, width) sizes with smooth random content."""
    from PIL import Image

    rs = np.random.RandomState(seed)
    out = []
    for h, w in sizes:
        base = rs.randint(0, 256, (max(h // 4, 1) + 1, max(w // 4, 1) + 1, 4), dtype=np.uint8)
        img = Image.fromarray(base, "RGBA").resize((w, h), Image.BILINEAR)
        out.append(img.convert(mode) if mode != "RGBA" else img)
    return out


def token_row(image_counts, length: int, start: int = 5, image_token: int = IMAGE_TOKEN):
    """A row of ids: a text token, then per image its image tokens and a text
    token, right-padded with 0 to `length`; returns (ids, attention mask)."""
    ids = [start]
    for n in image_counts:
        ids += [image_token] * n + [start + 1]
    ids += [start + 2, start + 3]
    mask = [1] * len(ids) + [0] * (length - len(ids))
    ids = ids + [0] * (length - len(ids))
    return ids, mask


def torch_llava_logits(model, ids, pixel_values=None, image_sizes=None, mask=None):
    import torch

    kw = {}
    if pixel_values is not None:
        kw["pixel_values"] = torch.tensor(np.asarray(pixel_values))
    if image_sizes is not None:
        kw["image_sizes"] = torch.tensor(np.asarray(image_sizes))
    if mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(mask))
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


def hf_greedy(model, input_ids, new_tokens: int, stop_cut_at=None, **inputs):
    """transformers' greedy continuation of one prompt, and the step up to which
    it is comparable: the first step whose top-2 logit gap is below 1e-4 (fp32
    differences may legitimately flip a near-tie) or that emits `stop_cut_at`."""
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([input_ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
            **inputs,
        )
    tokens = out.sequences[0, len(input_ids) :].tolist()
    for i, s in enumerate(out.scores):
        top2 = torch.topk(s[0], 2).values
        if float(top2[0] - top2[1]) < 1e-4 or tokens[i] == stop_cut_at:
            return tokens, i + 1  # the cut step itself may differ
    return tokens, new_tokens


def hf_rope_index(family: str, token_types, tokens_per_second=None, **kw):
    """transformers' `get_rope_index` of Qwen2-VL (`family` "qwen2_vl") or
    Qwen2.5-VL on a stand-in model (it reads only the config): M-RoPE ids
    (3, B, T) and rope deltas as NumPy; `kw` the grids, `attention_mask` and
    (Qwen2.5-VL) `second_per_grid_ts`, None ones left out."""
    import functools
    import types

    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    cls = Qwen2_5_VLModel if family == "qwen2_5_vl" else Qwen2VLModel
    vision = types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=tokens_per_second)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision))
    fake.get_vision_position_ids = functools.partial(cls.get_vision_position_ids, fake)
    kw = {k: torch.tensor(np.asarray(v)) for k, v in kw.items() if v is not None}
    token_types = np.asarray(token_types)
    ids = torch.zeros(token_types.shape, dtype=torch.long)
    pos, deltas = cls.get_rope_index(fake, ids, torch.tensor(token_types), **kw)
    return pos.numpy(), deltas.numpy()


# The tiny random Qwen2-VL / Qwen2.5-VL of the Qwen-VL parity tests (conftest's
# `qwen_vl_models` builds each once a session).
QWEN_VL_TOKENS = dict(
    image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293
)
_QWEN_VL_TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    # head_dim 16: 8 frequencies, split time 2, rows 3, columns 3
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
)


def build_qwen_vl(family: str):
    """A tiny random `Qwen2VLForConditionalGeneration` (`family` "qwen2_vl") or
    `Qwen2_5_VLForConditionalGeneration` (fp32, eval mode), biases and norms
    perturbed so that they matter."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(0)
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **common)
        config = Qwen2VLConfig(text_config=_QWEN_VL_TEXT, vision_config=vision, **QWEN_VL_TOKENS)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        # 56-pixel windows are 2x2 merge units; block 1 attends to whole frames.
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            **common,
        )
        config = Qwen2_5_VLConfig(
            text_config=_QWEN_VL_TEXT,
            vision_config=vision,
            tie_word_embeddings=True,
            **QWEN_VL_TOKENS,
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.float().eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model
