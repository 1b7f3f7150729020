"""Schema-constrained steps parse, whatever the tokenizer; progressive
generation with cache reuse equals re-encoding each turn."""

import json

import numpy as np
import pytest
from tokenizers_for_tests import byte_bpe, sentencepiece

from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.data.prompts import Prompts
from insightv_jax.models.factory import construct
from insightv_jax.sample.constrain import StepConstraint
from insightv_jax.sample.reasoning import progressive_generate
from insightv_jax.sample.sampler import Sampler, SamplingParams


def _model(vocab, seed=0, scale_layers=1):
    cfg = DecoderConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=scale_layers,
        num_heads=4,
        num_kv_heads=2,
    )
    return construct(ModelConfig(decoder=cfg), seed=seed)


@pytest.fixture(scope="module", params=["byte_bpe", "sentencepiece"])
def tok(request, tmp_path_factory):
    build = byte_bpe if request.param == "byte_bpe" else sentencepiece
    return build(tmp_path_factory.mktemp(request.param))


def _check_step(obj, final=False):
    assert set(obj) == ({"title", "content"} if final else {"title", "content", "next_action"})
    assert isinstance(obj["title"], str) and isinstance(obj["content"], str)
    if final:
        assert obj["title"] == "FINAL ANSWER"
    else:
        assert obj["next_action"] in ("continue", "final_answer")


def test_1000_sampled_steps_all_parse(tok):
    """An untrained model, sampled at T=1 with tight budgets: every step parses."""
    c = StepConstraint(tok)
    sampler = Sampler(_model(len(tok)), tok)
    prompt = tok.encode("the red square", add_special_tokens=False)
    budgets = [c.min_tokens(), 40]  # forced closing, and free text
    n = 0
    for i in range(4):
        params = SamplingParams(temperature=1.0, max_new_tokens=budgets[i % 2], seed=i)
        for r in sampler.generate([prompt] * 250, params, constraint=c):
            _check_step(json.loads(r["text"]))
            assert r["finish_reason"] == "stop"
            n += 1
    assert n == 1000


def test_final_answer_schema(tok):
    c = StepConstraint(tok)
    sampler = Sampler(_model(len(tok), seed=1), tok)
    state = sampler.start(16, 64, seed=0)
    state = sampler.extend(state, [tok.encode("answer", add_special_tokens=False)] * 16)
    starts = np.full(16, c.start_final)
    starts[::2] = c.start_step
    _, out = sampler.decode(
        state, SamplingParams(temperature=1.0, max_new_tokens=30), constraint=c, start_states=starts
    )
    for i, r in enumerate(sampler.unpack(out, SamplingParams())):
        _check_step(json.loads(r["text"]), final=bool(i % 2))


def test_progressive_cache_reuse_equals_reencoding(tok):
    c = StepConstraint(tok)
    sampler = Sampler(_model(len(tok), seed=3, scale_layers=2), tok)
    params = SamplingParams(max_new_tokens=24)
    questions = ["how many circles?", "is the red square left of the blue circle?"]
    kw = dict(
        num_samples=2,
        params=params,
        constraint=c,
        prompts=Prompts(max_steps=3),
        step_tokens=c.min_tokens() + 6,
        final_tokens=c.min_tokens(True) + 4,
    )
    reuse = progressive_generate(sampler, questions, reuse_cache=True, **kw)
    again = progressive_generate(sampler, questions, reuse_cache=False, **kw)
    for qa, qb in zip(reuse, again):
        for a, b in zip(qa, qb):
            assert a.raw_turns == b.raw_turns
            assert len(a.steps) >= 1 and a.final_answer is not None
            for s in a.steps:
                _check_step(s)
