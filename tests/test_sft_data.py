"""`insightv sft` on a real (synthetic-suite) dataset with the tiny VLM preset."""

import json

from insightv_jax.data import conversation as conv


def test_sft_on_synthetic_data_learns_and_writes_a_run_dir(micro_llava_agent):
    """`insightv sft` of the tiny preset (conftest's session agent)."""
    _, run = micro_llava_agent
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "processor" / "preprocessor_config.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["30"]
    from insightv_jax.hf import load_pretrained

    model, tok, proc, cfg = load_pretrained(run)
    assert cfg.kind == "llava" and tok is not None and proc is not None
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_too_long_counts_the_whole_rendering_and_names_the_record(tmp_path):
    """Llama-3's default system prompt and turn markers count against data.max_length:
    a record they push over it is a bad record named by id, not a batching crash."""
    import pytest

    from insightv_jax.config import DataConfig, DecoderConfig, ModelConfig
    from insightv_jax.data.loader import loader_from_config
    from insightv_jax.data.transforms import ChatTransform
    from insightv_jax.errors import DataError

    def record(rid, answer):
        turns = [{"from": "human", "value": "how many?"}, {"from": "gpt", "value": answer}]
        return {"id": rid, "conversations": turns}

    data = tmp_path / "d.jsonl"
    rows = [record("short", "two"), record("long", "two red squares and three blue circles")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conv.build_tokenizer([r["conversations"][1]["value"] for r in rows], tmp_path / "tok",
                         template="llama3", vocab_size=300)  # fmt: skip
    model = ModelConfig(decoder=DecoderConfig(vocab_size=300))
    transform = ChatTransform(tmp_path / "tok", "llama3", model, tmp_path)
    short, long = (transform.length(r) for r in rows)
    assert short < long
    limits = transform.limits(1)

    def load(rule):
        cfg = DataConfig(max_length=long - 1, buckets=(long - 1,), on_bad_record=rule)
        return loader_from_config(
            cfg, str(data), transform, batch_size=1, count_tokens=limits.count_tokens,
            count_conversation=limits.count_conversation,
        )  # fmt: skip

    loader = load("skip")
    assert loader.counts["used"] == 1 and loader.counts["skipped"] == 1
    assert next(iter(loader))["input_ids"].shape == (1, long - 1)
    with pytest.raises(DataError, match=f"bad record long: too long: {long} tokens"):
        load("fail")
