"""The tiny vision-language preset end to end through tokenisation, the loader,
the sampler (progressive steps with images) and two-agent inference."""

import json

import numpy as np
import pytest

from insightv_jax import cli
from insightv_jax.checkpoint import save_model_dir
from insightv_jax.config import load_config
from insightv_jax.data import conversation as conv
from insightv_jax.data.loader import Loader
from insightv_jax.data.prompts import Prompts
from insightv_jax.data.sources import open_source
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.data.transforms import ChatTransform
from insightv_jax.models.factory import construct
from insightv_jax.sample.constrain import StepConstraint
from insightv_jax.sample.prompting import PromptEncoder
from insightv_jax.sample.reasoning import progressive_generate
from insightv_jax.sample.sampler import Sampler, SamplingParams

TERSE = Prompts(
    generator_system="solve step by step in json",
    generator_prefill="ok",
    next_step="next",
    final_answer="final answer",
    max_steps=3,
    reasoning_suffix=" reason",
    summary_instruction="answer",
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    write_llava(root, 24, seed=0)
    src = open_source(root / "train.json")
    corpus = [t["value"] for r in src.records for t in r["conversations"]]
    corpus += [
        json.dumps({"title": "count", "content": "red squares: 2", "next_action": "continue"})
    ]
    tok = conv.build_tokenizer(corpus * 4, root / "tok", template="minimal", vocab_size=508)
    cfg = load_config("configs/models/tiny.yaml").model
    return root, src, tok, cfg


def test_transform_loader_and_model_agree(suite):
    root, src, tok, cfg = suite
    assert len(tok) <= cfg.decoder.vocab_size
    assert tok.convert_tokens_to_ids("<image>") == cfg.llava.image_token_id
    transform = ChatTransform(root / "tok", "minimal", cfg, root)
    # the length that length-grouped batching sorts by is the transform's exact count
    assert all(transform.length(r) == len(transform(r)["input_ids"]) for r in src.records)
    loader = Loader(src, transform, batch_size=4, buckets=(64, 128), limits=transform.limits(128))
    batch = next(loader)
    assert batch["pixel_values"].shape == (4, 1, 1, 3, 40, 40)
    assert ((batch["input_ids"] == cfg.llava.image_token_id).sum(1) == 16).all()
    sup = batch["labels"] != -100
    assert sup.any(1).all() and not (sup & (batch["attention_mask"] == 0)).any()
    model = construct(cfg, seed=0)
    hidden = model.hidden_states(
        batch["input_ids"],
        batch["attention_mask"],
        None,
        batch["pixel_values"],
        batch["image_sizes"],
    )
    assert hidden.shape == (*batch["input_ids"].shape, cfg.decoder.hidden_size)
    assert np.isfinite(np.asarray(hidden)).all()


def test_progressive_with_images_reuse_equals_reencode(suite):
    root, src, tok, cfg = suite
    model = construct(cfg, seed=1)
    from insightv_jax.data.images import ImageProcessor

    enc = PromptEncoder(tok, processor=ImageProcessor.for_model(cfg), model_cfg=cfg)
    sampler = Sampler(model, tok, encoder=enc)
    c = StepConstraint(tok)
    recs = src.records[:2]
    questions = [r["question"] for r in recs]
    images = [[root / r["image"]] for r in recs]
    kw = dict(
        num_samples=2,
        params=SamplingParams(),
        constraint=c,
        prompts=TERSE,
        images=images,
        step_tokens=c.min_tokens() + 4,
        final_tokens=c.min_tokens(True) + 2,
    )
    a = progressive_generate(sampler, questions, reuse_cache=True, **kw)
    b = progressive_generate(sampler, questions, reuse_cache=False, **kw)
    assert [[s.raw_turns for s in q] for q in a] == [[s.raw_turns for s in q] for q in b]
    assert all(s.final_answer is not None for q in a for s in q)


def test_infer_cli_with_image(suite, tmp_path, capsys):
    root, src, tok, cfg = suite
    from insightv_jax.data.images import ImageProcessor

    ImageProcessor.for_model(cfg).save_pretrained(root / "proc")
    paths = [
        save_model_dir(
            construct(cfg, seed=s),
            cfg,
            tmp_path / f"agent{s}",
            tokenizer_dir=root / "tok",
            processor_dir=root / "proc",
        )
        for s in (0, 1)
    ]
    rec = src.records[0]
    code = cli.main(
        [
            "infer",
            "--reason",
            str(paths[0]),
            "--summary",
            str(paths[1]),
            "--image",
            str(root / rec["image"]),
            "--question",
            rec["question"],
            "--show-chain",
            "--max-reason-tokens",
            "12",
            "--max-summary-tokens",
            "6",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "chain:" in out and "answer:" in out
    code = cli.main(
        [
            "infer",
            "--reason",
            str(paths[0]),
            "--summary",
            str(paths[1]),
            "--question",
            "how many red squares?",
            "--max-reason-tokens",
            "8",
            "--max-summary-tokens",
            "4",
        ]
    )
    assert code == 0  # a question without an image works too
