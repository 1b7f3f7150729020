"""The README's quickstart, line by line, on a tiny random LLaVA-NeXT folder.

The commands are read from README.md itself, so the guide cannot drift from what works.
Each runs at test size: a few appended `key=value` overrides shrink batches, lengths and
steps. The data steps use the `oracle` teacher, because a random model writes no right
chain and an SFT set without one is empty; the local teacher on a real checkpoint is
tested in test_pipeline_local.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import PINPOINTS, TILE, llava_image_processor

ROOT = Path(__file__).resolve().parents[1]
HF_PLACEHOLDER = "path/to/llama3-llava-next-8b-hf"
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = [
    "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<image>",
    "<pad>",
]  # fmt: skip
TRAIN = [
    "mesh.fsdp=-1", "train.global_batch=2", "train.micro_batches=1", "train.remat=none",
    "train.loss_chunk=128", "train.log_every=1", "train.checkpoint_every=0",
    "data.max_length=512", "data.buckets=[512]", "data.on_bad_record=skip",
]  # fmt: skip
# test-size overrides appended to each README command, by subcommand
EXTRA = {
    "synth": [],
    "convert": [],
    "generate": ["pipeline.generator=oracle", "pipeline.judge=oracle", "pipeline.scorer=oracle",
                 "pipeline.num_samples=2", "pipeline.oracle_style=terse"],
    "sft": [*TRAIN, "train.steps=2", "train.epochs=0"],
    "dpo": [*TRAIN, "train.steps=1", "train.epochs=0"],
    "iterate": [*TRAIN, "train.steps=0", "train.epochs=1", "dpo.reason_max_tokens=16",
                "dpo.summary_max_tokens=4", "dpo.samples_per_question=2", "dpo.sample_batch=4",
                "dpo.questions_per_round=4", "dpo.eval_limit=2",
                "dpo.logprob_batch=8"],
    "eval": ["eval.limit=1", "eval.sampling.reason_max_tokens=16",
             "eval.sampling.summary_max_tokens=4", "eval.sampling.direct_max_tokens=4"],
    "infer": ["--max-reason-tokens", "16", "--max-summary-tokens", "4"],
}  # fmt: skip
EXTRA["assess"] = EXTRA["build"] = EXTRA["generate"]


def quickstart_commands() -> list[list[str]]:
    """The `insightv` lines of the README's quickstart block, as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split(" # ")[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("insightv ")]


def llava_next_folder(out: Path) -> Path:
    """A tiny random LlavaNextForConditionalGeneration saved with a byte-level BPE
    tokenizer in Llama-3's chat format and the LLaVA-NeXT image processor: the layout of
    llama3-llava-next-8b-hf at toy size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    corpus = [
        "How many red squares are there? Answer with a number. Two red squares, one circle.",
        '{"title": "Count", "content": "red squares: 2", "next_action": "continue"} answer 7',
    ]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=alphabet, special_tokens=SPECIALS
    )
    tk.train_from_iterator(corpus * 20, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<pad>",
        chat_template=LLAMA3_TEMPLATE,
    ).save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=TILE, patch_size=10,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
    )
    LlavaNextForConditionalGeneration(config).eval().save_pretrained(str(out))
    llava_image_processor().save_pretrained(str(out))
    return out


# Every command in one fresh process with one CPU device, as a user's shell runs them (the
# tests' 8 fake devices would shard a 0.1M-parameter model 8 ways and compile for that).
DRIVER = """
import json, sys, time
from insightv_jax import cli
for args in json.loads(sys.argv[1]):
    start = time.time()
    if cli.main(args) != 0:
        sys.exit("insightv " + " ".join(args) + " failed")
    print(f"{args[0]}: {time.time() - start:.1f} s", flush=True)
"""


@pytest.mark.slow
def test_readme_quickstart_runs_on_a_tiny_llava_next(tmp_path, monkeypatch):
    hf = llava_next_folder(tmp_path / "llama3-llava-next-tiny")
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    commands = quickstart_commands()
    assert [c[0] for c in commands][:5] == ["synth", "convert", "generate", "assess", "build"]
    runs = []
    for args in commands:
        args = [str(hf) if a == HF_PLACEHOLDER else a for a in args]
        if args[0] == "synth":
            args[args.index("--n") + 1] = "12"
        if args[0] == "iterate":  # one round shows the loop runs; test_dpo_iterate resumes two
            args[args.index("--rounds") + 1] = "1"
        runs.append(args + EXTRA[args[0]])
    monkeypatch.setenv("XLA_FLAGS", "")
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=work, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "] chain:" in done.stdout and "] answer: " in done.stdout  # infer --show-chain

    # what each stage left behind: sets, agents, DPO round, evaluation, exports
    build = work / "runs/pipeline/build"
    assert json.loads((build / "reasoning.json").read_text())
    for run in ("reasoning-sft", "summary-sft", "dpo-round1"):
        assert any((work / "runs" / run / "checkpoints").iterdir()), run
    report = json.loads((work / "runs/eval/two-agent/report.json").read_text())
    assert {"base", "insight_v"} <= set(report["systems"])
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    for agent in ("reasoning-agent", "summary-agent"):
        folder = work / "export" / agent
        model = AutoModelForImageTextToText.from_pretrained(str(folder))
        assert type(model).__name__ == "LlavaNextForConditionalGeneration"
        assert AutoTokenizer.from_pretrained(str(folder)).chat_template
        assert (folder / "prompts.json").is_file()


def test_a_run_from_a_checkpoint_keeps_its_architecture_and_its_own_recipe(tmp_path):
    """The shipped 8B configs train in bf16 with blockwise attention and, for the
    reasoning agent, vision layer -1: a run from a (float32, layer -2) checkpoint takes
    those from its config and the shapes from the checkpoint."""
    import dataclasses

    from insightv_jax.checkpoint import save_model_dir
    from insightv_jax.config import RunConfig, load_config
    from insightv_jax.models.factory import construct
    from insightv_jax.train import model_config_for_run

    tiny = load_config(ROOT / "configs/models/tiny.yaml").model
    tiny = dataclasses.replace(tiny, llava=dataclasses.replace(tiny.llava, feature_layer=-2))
    ckpt = save_model_dir(construct(tiny, 0), tiny, tmp_path / "base")
    run = load_config(
        ROOT / "configs/train/reasoning-sft-llava-next-llama3-8b.yaml", [f"train.init={ckpt}"]
    )
    said = []
    model = model_config_for_run(run, said.append)
    assert model.decoder.hidden_size == tiny.decoder.hidden_size  # the checkpoint's shapes
    assert model.vision.image_size == tiny.vision.image_size
    assert (model.decoder.param_dtype, model.decoder.dtype) == ("bfloat16", "bfloat16")
    assert model.decoder.attention == "blockwise" and model.llava.feature_layer == -1
    assert "llava.feature_layer=-1 (checkpoint: -2)" in said[0]
    # a config without a model section keeps the checkpoint's model as it is
    bare = dataclasses.replace(run, model=RunConfig().model)
    assert model_config_for_run(bare, said.append) == tiny
