"""The KV-cache sampler: greedy parity with transformers' generate, sampling
rules, reproducibility, cache bounds."""

import numpy as np
import pytest
from hf_models import build_decoder, hf_greedy, save

from insightv_jax.config import DecoderConfig, ModelConfig
from insightv_jax.errors import InsightVError
from insightv_jax.hf.convert import import_hf
from insightv_jax.models.factory import construct
from insightv_jax.parallel import single_device_mesh
from insightv_jax.sample.sampler import RowParams, Sampler, SamplingParams, row_keys

NEW = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_decoder("llama_gqa2_tied")
    ours, _ = import_hf(save(hf, tmp_path_factory.mktemp("gen") / "m"), single_device_mesh())
    return hf, ours


def _hf_greedy(hf, prompt, **kw):
    return hf_greedy(hf, prompt, NEW, **kw)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_transformers_generate(pair, penalty):
    hf, ours = pair
    rs = np.random.RandomState(0)
    prompts = [rs.randint(5, 97, n).tolist() for n in (5, 11, 3, 8)]
    res = Sampler(ours, pad_id=0).generate(
        prompts, SamplingParams(max_new_tokens=NEW, repetition_penalty=penalty)
    )
    cuts = 0
    for p, r in zip(prompts, res):
        ref, cut = _hf_greedy(hf, p, repetition_penalty=penalty)
        cuts += cut < NEW
        assert r["tokens"][: cut - 1] == ref[: cut - 1]
        assert len(r["tokens"]) == NEW and r["finish_reason"] == "length"
    assert cuts <= 1  # the tie cut is rare with the larger init scale


def test_logprobs_are_model_logprobs(pair):
    import torch

    hf, ours = pair
    prompt = [3, 14, 15, 92, 65]
    r = Sampler(ours, pad_id=0).generate([prompt], SamplingParams(max_new_tokens=4))[0]
    seq = prompt + r["tokens"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0], -1).numpy()
    ref = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(r["tokens"])]
    np.testing.assert_allclose(r["logprobs"], ref, atol=1e-4)


def _toy(vocab=16, seed=0):
    cfg = DecoderConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    return construct(ModelConfig(decoder=cfg), seed=seed)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    s = Sampler(_toy(), pad_id=0)
    prompts = [[1, 2, 3], [4, 5]]
    a = s.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=7))
    b = s.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=7))
    c = s.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=8))
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["tokens"] for r in a] != [r["tokens"] for r in c]
    greedy = s.generate(prompts, SamplingParams(max_new_tokens=8))
    k1 = s.generate(prompts, SamplingParams(temperature=0.9, top_k=1, max_new_tokens=8, seed=3))
    assert [r["tokens"] for r in k1] == [r["tokens"] for r in greedy]


def test_row_keys_make_a_row_s_draws_its_own():
    """With a key per row, a row samples the same tokens in any batch, at any
    position, after a shared prefill (`repeat_rows`), and copies with their own
    ids draw differently."""
    s = Sampler(_toy(), pad_id=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=8)

    def draw(prompts, ids, n=1):
        state = s.start(len(prompts), 16, seed=0)
        state = s.extend(state, prompts).repeat_rows(n)
        state = state.replace(rng=row_keys(5, ids))
        return [r["tokens"] for r in s.unpack(s.decode(state, params)[1], params)]

    alone = draw([[1, 2, 3]], [10])
    mixed = draw([[4, 5], [6], [1, 2, 3]], [11, 12, 10])
    assert mixed[2] == alone[0]
    forked = draw([[1, 2, 3], [4, 5]], [10, 20, 30, 11], n=2)
    assert forked[0] == alone[0] and forked[3] == mixed[0]
    assert forked[0] != forked[1]  # two samples of one prompt, two keys


def test_rows_join_a_running_batch_and_decode_as_they_do_alone():
    """`DecodeState.put_rows` + `RowParams`, a server's continuous batch: requests
    prefilled alone join a running state at different times, in scattered rows,
    each with its own rules (greedy, sampled, top-p, penalised) and budget, and
    decode in chunks the tokens they decode alone with scalar rules."""
    s = Sampler(_toy(vocab=32), pad_id=0)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [3, 3], [9]]
    rules = [(0.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.8, 0.7, 1.0), (0.0, 1.0, 1.3), (1.0, 0.9, 1.2)]
    budgets = [12, 12, 7, 12, 10]

    def alone(i):
        t, p, pen = rules[i]
        state = s.start(1, 8).replace(rng=row_keys(9, [i]))
        state = s.extend(state, [prompts[i]])
        params = SamplingParams(temperature=t, top_p=p, repetition_penalty=pen)
        return s.decode(state, params, steps=budgets[i])[1].tokens[0].tolist()

    B, got, where = 6, {}, {}
    state = s.start(B, 32).replace(rng=row_keys(0, range(B)))
    for turn in range(12):
        if turn < len(prompts):  # one joins per chunk, into a free row
            i = turn
            one = s.extend(s.start(1, 8), [prompts[i]]).replace(rng=row_keys(9, [i]))
            where[i] = [r for r in (5, 2, 0, 4, 1, 3) if r not in where.values()][0]
            state = state.put_rows([where[i]], one)
            got[i] = []
        live = {where[i]: i for i in where if len(got[i]) < budgets[i]}
        if not live:
            break
        per_row = [(*rules[live[r]], budgets[live[r]] - len(got[live[r]])) if r in live
                   else (0.0, 1.0, 1.0, 0) for r in range(B)]  # fmt: skip
        rows = RowParams.make(*zip(*per_row), [False] * B)
        active = np.array([r in live for r in range(B)])
        state, out = s.decode(state, SamplingParams(), steps=4, active=active, rows=rows)
        for r, i in live.items():
            got[i] += out.tokens[r, : int(out.num_tokens[r])].tolist()
    assert [got[i] for i in range(len(prompts))] == [alone(i) for i in range(len(prompts))]
    with pytest.raises(InsightVError, match="do not fit"):
        state.put_rows([0], s.start(1, 64))


def test_temperature_one_frequencies_match_softmax():
    """4096 first tokens sampled at T=1 follow the model's distribution (chi-square)."""
    from scipy import stats

    model = _toy(vocab=8, seed=1)
    prompt = [1, 2, 3]
    probs = np.exp(np.asarray(model(np.array([prompt]))[0, -1], np.float64))
    probs /= probs.sum()
    n = 4096
    res = Sampler(model, pad_id=0).generate(
        [prompt] * n, SamplingParams(temperature=1.0, max_new_tokens=1, seed=0)
    )
    counts = np.bincount([r["tokens"][0] for r in res], minlength=8)
    _, pvalue = stats.chisquare(counts, probs * n)
    assert pvalue > 1e-3, (counts, probs * n)


def test_first_argmax_is_argmax_and_sampling_draws_as_categorical():
    """The sampler's argmax (max + min over an iota) picks what jnp.argmax picks,
    ties and fully masked rows included, and its Gumbel-max draw is the one
    jax.random.categorical makes with the same key."""
    import jax
    import jax.numpy as jnp

    from insightv_jax.sample.processors import first_argmax, process_logits

    rng = np.random.RandomState(0)
    x = rng.randint(0, 5, (64, 300)).astype(np.float32)  # many ties
    x[3] = -1e30  # a row the constraint masked entirely
    x[4, :] = -np.inf
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, -1))
    nan_row = jnp.full((1, 300), jnp.nan).at[0, 7].set(1.0)
    assert int(first_argmax(nan_row)[0]) == 299  # matches nothing: the last index, in range
    logits = jnp.asarray(rng.randn(64, 300).astype(np.float32))
    key = jax.random.key(7)
    got = process_logits(logits, jnp.zeros(logits.shape, bool), key, None,
                         temperature=1.0, top_k=0, top_p=1.0, penalty=1.0)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.categorical(key, logits)))


def test_top_p_keeps_only_the_nucleus():
    model = _toy(vocab=8, seed=2)
    prompt = [1, 2, 3]
    probs = np.asarray(model(np.array([prompt]))[0, -1])
    order = np.argsort(-probs)
    res = Sampler(model, pad_id=0).generate(
        [prompt] * 512, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=1)
    )
    assert {r["tokens"][0] for r in res} == {int(order[0])}


def test_stop_tokens_and_stop_sequences_end_rows(pair):
    _, ours = pair
    s = Sampler(ours, pad_id=0)
    prompts = [[5, 6, 7], [8, 9]]
    free = s.generate(prompts, SamplingParams(max_new_tokens=NEW))
    stop_tok = free[0]["tokens"][3]
    res = s.generate(prompts, SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop_tok,)))
    first = free[0]["tokens"].index(stop_tok)
    assert res[0]["tokens"] == free[0]["tokens"][: first + 1] and res[0]["finish_reason"] == "stop"


def test_prompt_longer_than_cache_is_one_line_error():
    s = Sampler(_toy(), pad_id=0)
    state = s.start(1, 16)
    with pytest.raises(InsightVError, match="does not fit the cache of 16"):
        s.extend(state, [list(range(1, 15)) * 2])
    with pytest.raises(InsightVError, match="at least one token"):
        s.generate([[]], SamplingParams())


def test_decode_transform_unstacks_blocks_and_computes_the_same():
    import jax.numpy as jnp
    from flax import nnx

    from insightv_jax.models.cache import KVCache
    from insightv_jax.sample.decode_transform import for_decoding

    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                        num_heads=4, num_kv_heads=2)  # fmt: skip
    model = construct(ModelConfig(decoder=cfg), seed=0)
    view = for_decoding(model, fuse=False)
    assert isinstance(view.layers, nnx.List) and len(view.layers) == 3
    assert not isinstance(model.layers, nnx.List)  # the model itself is untouched
    q = view.layers[2].attn.q_proj
    np.testing.assert_array_equal(np.asarray(q[...]), np.asarray(model.layers.attn.q_proj[...][2]))
    assert q.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
    assert view.embed is model.embed  # non-layer arrays are shared, not copied

    fused = for_decoding(model, fuse=True)  # q/k/v and gate/up as one weight each
    attn, mlp = fused.layers[1].attn, fused.layers[1].mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    assert attn.qkv_proj[...].shape == (32, 4 + 2 + 2, 8)  # (D, N + 2K, H)
    assert mlp.gate_up_proj[...].shape == (32, 2 * 64)  # (D, 2F)
    np.testing.assert_array_equal(
        np.asarray(attn.qkv_proj[...][:, 4:6]), np.asarray(model.layers.attn.k_proj[...][1])
    )
    assert hasattr(model.layers.attn, "q_proj")  # the model itself is untouched

    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)))
    embeds = model.embed_tokens(ids)
    for m in (view, fused):
        np.testing.assert_allclose(np.asarray(m(ids)), np.asarray(model(ids)), atol=1e-6, rtol=0)
        got, want = (
            x.forward_cached(embeds, KVCache.empty(cfg, 2, 16))[0] for x in (m, model)
        )  # unstacked (and fused) blocks vs slices of the stack
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


def test_cache_rope_table_is_the_rotation_of_each_slot_position():
    """Decoding gathers cos/sin from the cache's per-slot table; it must equal
    the rotation computed from the positions (Llama-3.1 scaling included), and
    a padded position past the last slot takes the last slot's."""
    import jax.numpy as jnp

    from insightv_jax.config import RopeScaling
    from insightv_jax.models.cache import KVCache
    from insightv_jax.models.rope import decoder_inv_freq, rope_cos_sin

    cfg = DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=1, rope_theta=500000.0,
                        rope_scaling=RopeScaling(rope_type="llama3", factor=8.0))  # fmt: skip
    cache = KVCache.empty(cfg, 2, 32)
    assert cache.rope_cos.shape == (32, 16)
    positions = jnp.asarray([[0, 5, 31], [7, 30, 31]])
    got = cache.rope_at(positions)
    want = rope_cos_sin(positions, decoder_inv_freq(cfg))
    for g, w in zip(got, want):
        assert g.shape == (2, 3, 1, 16)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=0)
    past = cache.rope_at(jnp.asarray([[40]]))
    np.testing.assert_array_equal(np.asarray(past[0])[0, 0, 0], np.asarray(cache.rope_cos[31]))
    assert cache.repeat_rows(3).rope_cos is cache.rope_cos  # shared by every row


def test_cpu_decode_loop_compiles_without_ynnpack_fusions():
    """The decode loop's batch-row matmuls skip XLA:CPU's YNNPACK fusions
    (faster there); a renamed or ignored option would show up here."""
    import jax

    from insightv_jax.sample import sampler as S

    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=2)  # fmt: skip
    s = Sampler(construct(ModelConfig(decoder=cfg), seed=0), pad_id=0)
    state = s.extend(s.start(2, 16), [[1, 2, 3], [4, 5]])
    args = (s.graphdef, s.params, state, np.array([-3], np.int32), S._stop_table([], 1),
            np.ones(2, bool), (None, None, None), np.zeros(2, np.int32))  # fmt: skip
    static = dict(steps=4, temperature=0.0, top_k=0, top_p=1.0, penalty=1.0, pad_id=0)
    default = jax.jit(S._decode_loop, static_argnames=tuple(static) + ("graphdef",))
    tuned = S._decode_program("cpu")
    if "ynn_fusion" not in default.lower(*args, **static).compile().as_text():
        pytest.skip("this jaxlib does not fuse matmuls into YNNPACK by default")
    assert "ynn_fusion" not in tuned.lower(*args, **static).compile().as_text()
