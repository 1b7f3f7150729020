"""The grain loader: exact resume, per-host shards, bad-record policy, padding, masks."""

import json

import numpy as np
import pytest
from test_sources import make_corpus
from word_transform import (
    ASSISTANT,
    BOS,
    EOS,
    IMAGE,
    USER,
    SimpleTransform,
    WordTokenizer,
)

from insightv_jax.data.loader import Loader, shard_options
from insightv_jax.data.sources import open_source
from insightv_jax.data.synthetic.writer import write_llava
from insightv_jax.data.validate import Limits
from insightv_jax.errors import DataError

BUCKETS = (48, 64, 96)


class WithIndex:
    """Adds the record's number (from its id) to the example, to track coverage."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, rec):
        return {**self.inner(rec), "record": np.int64(int(rec["id"].split("-")[-1]))}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_llava(root, 40, seed=0)
    src = open_source(root / "train.json")
    tok = WordTokenizer.from_texts(t["value"] for r in src.records for t in r["conversations"])
    limits = Limits(max(BUCKETS), 16, tok.count, turn_overhead=1)
    return src, SimpleTransform(tok, src.root, image_tokens=16), limits


def _loader(synth, **kw):
    src, transform, limits = synth
    kw = {"batch_size": 4, "buckets": BUCKETS, "seed": 3, "limits": limits, **kw}
    return Loader(src, WithIndex(transform), **kw)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_saved_state_is_exact(synth, workers):
    # one run saves its state after 4 batches and goes on uninterrupted; a fresh
    # loader restored from that state must yield exactly the same later batches
    first = _loader(synth, num_epochs=2, workers=workers)
    head = [next(first) for _ in range(4)]
    state = json.loads(json.dumps(first.get_state()))  # the state survives serialisation
    expected = head + [next(first) for _ in range(10)]  # crosses the epoch boundary (10/epoch)
    second = _loader(synth, num_epochs=2, workers=workers)
    second.set_state(state)
    tail = [next(second) for _ in range(10)]
    assert _same(head + tail, expected)
    epoch1 = np.concatenate([b["record"] for b in expected[:10]])
    epoch2 = np.concatenate([b["record"] for b in expected[10:14]])
    assert sorted(epoch1) == list(range(40)) and not np.array_equal(epoch1[:16], epoch2)


def test_two_hosts_see_disjoint_shards_covering_the_epoch(synth):
    seen = []
    for host in range(2):
        loader = _loader(synth, shard=shard_options(host, 2), batch_size=5)
        seen.append(np.concatenate([b["record"] for b in loader]))
    assert len(seen[0]) == len(seen[1]) == 20
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(40))


def test_batches_are_bucketed_and_masked(synth):
    for batch in _loader(synth):
        t = batch["input_ids"].shape[1]
        lengths = batch["attention_mask"].sum(1)
        assert t in BUCKETS and (t == BUCKETS[0] or lengths.max() > BUCKETS[BUCKETS.index(t) - 1])
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
        assert (batch["input_ids"] == IMAGE).sum(1).tolist() == [16] * 4
        assert batch["pixel_values"].shape == (4, 1, 1, 3, 40, 40)
        assert batch["image_sizes"].tolist() == [[[40, 40]]] * 4


def test_labels_cover_exactly_the_assistant_tokens(tmp_path):
    tok = WordTokenizer(["how", "many", "?", "two", "and", "one"])
    rec = {"id": "x", "conversations": [
        {"from": "human", "value": "<image>\nhow many?"}, {"from": "gpt", "value": "two"},
        {"from": "human", "value": "and?"}, {"from": "gpt", "value": "one"}]}  # fmt: skip
    out = SimpleTransform(tok, tmp_path, image_tokens=3)({**rec, "image_arrays": []})
    v = tok.vocab
    assert out["input_ids"].tolist() == [
        BOS, USER, IMAGE, IMAGE, IMAGE, v["how"], v["many"], v["?"], ASSISTANT, v["two"], EOS,
        USER, v["and"], v["?"], ASSISTANT, v["one"], EOS]  # fmt: skip
    sup = [i for i, lab in enumerate(out["labels"]) if lab != -100]
    assert sup == [9, 10, 15, 16]
    assert (out["labels"][sup] == out["input_ids"][sup]).all()


def test_bad_records_skip_reports_counts_and_fail_names_the_first(tmp_path):
    path = make_corpus(tmp_path / "d")
    src = open_source(path)
    tok = WordTokenizer.from_texts(["how many red shapes ? 2"])
    transform = SimpleTransform(tok, src.root, image_tokens=16)
    limits = Limits(max_length=80, image_tokens=16, count_tokens=tok.count)
    loader = Loader(src, transform, batch_size=2, buckets=(32, 96), limits=limits,
                    on_bad_record="skip")  # fmt: skip
    assert loader.counts["used"] == 8 and loader.counts["skipped"] == 7
    assert sum(loader.counts["reasons"].values()) == 7
    batches = list(loader)
    assert len(batches) == 4 and all(b["input_ids"].shape == (2, 32) for b in batches)
    with pytest.raises(DataError, match=r"bad record truncated: image images/cut.png"):
        Loader(src, transform, batch_size=2, buckets=(32, 96), limits=limits)


FINE = (26, 28, 30, 32, 36, 40, 44, 96)  # the corpus's records are 25-44 tokens


def _grouped(synth, **kw):
    return _loader(synth, group_by_length=4, buckets=FINE, **kw)


def test_length_grouping_covers_each_epoch_with_less_padding(synth):
    src, _, limits = synth
    plain = list(_loader(synth, buckets=FINE, batch_size=5))
    grouped = list(_grouped(synth, batch_size=5, num_epochs=2))
    assert len(grouped) == 16
    for epoch in (grouped[:8], grouped[8:]):
        assert sorted(np.concatenate([b["record"] for b in epoch])) == list(range(40))
    # the grouping is fixed, the batch order is reshuffled each epoch
    first = [tuple(sorted(b["record"])) for b in grouped[:8]]
    second = [tuple(sorted(b["record"])) for b in grouped[8:]]
    assert sorted(first) == sorted(second) and first != second

    def padding(batches):
        return sum(b["input_ids"].size - b["attention_mask"].sum() for b in batches)

    assert padding(grouped[:8]) < padding(plain)
    for b in grouped:  # the estimate is exact here: the padded length is the longest row's bucket
        assert b["input_ids"].shape[1] == min(
            x for x in FINE if x >= b["attention_mask"].sum(1).max()
        )


def test_length_grouping_resumes_exactly_and_hosts_pad_alike(synth):
    first = _grouped(synth, batch_size=4, num_epochs=None)
    head = [next(first) for _ in range(3)]
    state = json.loads(json.dumps(first.get_state()))
    expected = head + [next(first) for _ in range(12)]
    second = _grouped(synth, batch_size=4, num_epochs=None)
    second.set_state(state)
    assert _same(head + [next(second) for _ in range(12)], expected)
    # hosts pad alike when the lengths grouped by are exact: ChatTransform.length is;
    # a transform without .length falls back to the limits' count, exact here with
    # BOS + a role token per turn + EOS = 2 tokens per turn
    exact = Limits(max(BUCKETS), 16, synth[2].count_tokens, turn_overhead=2)
    hosts = [list(_grouped(synth, batch_size=2, shard=shard_options(h, 2), limits=exact))
             for h in range(2)]  # fmt: skip
    assert len(hosts[0]) == len(hosts[1]) == 10
    for a, b in zip(*hosts):  # one global batch per step: same padded length on both hosts
        assert a["input_ids"].shape == b["input_ids"].shape
        assert not set(a["record"]) & set(b["record"])


def test_hosts_pad_each_step_alike_and_keep_the_single_host_order(synth):
    # without grouping, grain's per-record sharding let each host pad to the bucket of
    # its own longest row; now every host pads to the global batch's, and the rows a
    # step gives the two hosts together are the rows one host with the global batch gets
    exact = Limits(max(BUCKETS), 16, synth[2].count_tokens, turn_overhead=2)
    hosts = [list(_loader(synth, buckets=FINE, shard=shard_options(h, 2), batch_size=2, limits=exact))
             for h in range(2)]  # fmt: skip
    single = list(_loader(synth, buckets=FINE, batch_size=4, limits=exact))
    assert len(hosts[0]) == len(hosts[1]) == len(single) == 10
    shapes = {b["input_ids"].shape[1] for b in single}
    assert len(shapes) > 1  # the data has steps of different buckets
    for a, b, one in zip(*hosts, single):
        assert a["input_ids"].shape[1] == b["input_ids"].shape[1] == one["input_ids"].shape[1]
        assert sorted([*a["record"], *b["record"]]) == sorted(one["record"])
