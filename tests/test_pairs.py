"""Preference-pair records: validation and the pair loader."""

import json

import numpy as np
import pytest
from word_transform import ASSISTANT, EOS, SimpleTransform, WordTokenizer

from insightv_jax.data.pairs import check_pair, make_pair, pair_loader
from insightv_jax.data.sources import open_source
from insightv_jax.data.synthetic.render import png_bytes, render
from insightv_jax.data.synthetic.scenes import GridScene
from insightv_jax.data.validate import Limits
from insightv_jax.errors import DataError

PROMPT = [{"from": "human", "value": "<image>\nhow many red shapes?"}]
LIMITS = Limits(max_length=64, image_tokens=16)


def _pair(rid, chosen="red shapes: 2 . answer 2", rejected="red shapes: 3 . answer 3", **kw):
    args = dict(rid=rid, image="ok.png", prompt=PROMPT, chosen=chosen, rejected=rejected,
                answer="2", chosen_score=95, rejected_score=1, round=0)  # fmt: skip
    args.update(kw)
    return make_pair(**args)


@pytest.fixture
def root(tmp_path):
    png = png_bytes(render(GridScene(4, {(1, 1): ("red", "square")})))
    (tmp_path / "ok.png").write_bytes(png)
    return tmp_path


def test_check_pair_reasons(root):
    assert check_pair(_pair("a", ref_logps=(-3.5, -7.0)), root, LIMITS) is None
    bad = {
        "same": _pair("same", rejected="red shapes: 2 . answer 2"),
        "order": _pair("order", chosen_score=1, rejected_score=95),
        "round": _pair("round", round=-1),
        "ref": _pair("ref", ref_logps=(float("nan"), 0.0)),
        "prompt": _pair("prompt", prompt=[]),
        "image": _pair("image", image="../ok.png"),
        "long": _pair("long", chosen="x " * 100),
    }
    reasons = {k: check_pair(v, root, LIMITS) for k, v in bad.items()}
    assert "identical" in reasons["same"] and "chosen_score" in reasons["order"]
    assert "negative" in reasons["round"] and "ref_logps" in reasons["ref"]
    assert "expected from=human" in reasons["prompt"]
    assert "leaves the data root" in reasons["image"]
    assert reasons["long"].startswith("chosen: too long")
    missing = _pair("m")
    del missing["answer"]
    assert check_pair(missing, root, LIMITS) == "missing key 'answer'"


def test_pair_loader_batches(root):
    pairs = [_pair(f"p{i}", ref_logps=(-1.0 - i, -2.0 - i)) for i in range(6)]
    pairs.append(_pair("bad", chosen_score=0, rejected_score=50))
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    src = open_source(root / "pairs.jsonl")
    tok = WordTokenizer.from_texts(["how many red shapes ? : 2 3 . answer"])
    transform = SimpleTransform(tok, root, image_tokens=16)
    loader = pair_loader(src, transform, batch_size=3, buckets=(32, 64), on_bad_record="skip",
                         limits=Limits(64, 16, tok.count), seed=1)  # fmt: skip
    assert loader.counts["skipped"] == 1
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        c, r = b["chosen"], b["rejected"]
        assert c["input_ids"].shape == r["input_ids"].shape == (3, 32)
        assert c["pixel_values"].shape == (3, 1, 1, 3, 40, 40)
        assert b["scores"].tolist() == [[95.0, 1.0]] * 3 and b["ref_logps"].shape == (3, 2)
        for side, answer in ((c, "2"), (r, "3")):  # labels: exactly the response + </s>
            sup = side["labels"][0][side["labels"][0] != -100]
            want = [tok.vocab[w] for w in f"red shapes : {answer} . answer {answer}".split()]
            assert sup.tolist() == want + [EOS]
            assert side["input_ids"][0][np.argmax(side["input_ids"][0] == ASSISTANT) + 1] == want[0]
    with pytest.raises(DataError, match="bad record bad: chosen_score"):
        pair_loader(src, transform, batch_size=3, buckets=(32, 64), limits=Limits(64, 16))
