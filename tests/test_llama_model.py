"""seqattn_jax.models.llama: the paged serving forward against the dense oracle, and the dense oracle
against an independent float64 numpy forward (tests/llama_numpy.py, written from transformers' code).

The paged path runs through a test-local `attend` built from the public API (`append_kv` +
`reference.batch_prefill` / `reference.batch_decode` on a pool whose pages are shuffled by
allocation order): prompts are prefilled in chunks shared between requests, then decoded
teacher-forced, and every step's logits are compared with `dense_logits` at the same positions.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqattn_jax as sj
from seqattn_jax import reference
from seqattn_jax.models import llama
from seqattn_jax.models.llama import LlamaConfig, LlamaModel
from tests.llama_numpy import hf_config_of, hf_forward, hf_inv_freq, to_hf_tensors

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def small(**kw) -> LlamaConfig:
    base = dict(vocab_size=97, d_model=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                ffn_dim=80, norm_eps=1e-5, dtype="float32")
    base.update(kw)
    return LlamaConfig(**base)


def perturbed_params(cfg: LlamaConfig, seed: int):
    """init_params with norm weights away from 1 (so a missing norm weight would show)."""
    params = llama.init_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)

    def norm(w):
        return jnp.asarray(1.0 + 0.2 * rng.standard_normal(w.shape), w.dtype)

    for layer in params["layers"]:
        layer["attn_norm"] = norm(layer["attn_norm"])
        layer["mlp_norm"] = norm(layer["mlp_norm"])
    params["final_norm"] = norm(params["final_norm"])
    return params


CONFIGS = {
    "plain": small(),
    "bias_tied_llama3_window": small(qkv_bias=True, tie_embeddings=True, rope_scaling=LLAMA3,
                                     sliding_window=5, rope_theta=500000.0),
    "mha_window1": small(num_kv_heads=4, sliding_window=1),
}


# ----------------------------------------------------------------------------------------------
# dense_logits against the independent numpy forward
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_logits_matches_numpy_forward(name):
    cfg = CONFIGS[name]
    params = perturbed_params(cfg, 3)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13)).astype(np.int32)
    got = np.asarray(llama.dense_logits(params, cfg, tokens))
    chex.assert_shape(got, (2, 13, cfg.vocab_size))
    hf = to_hf_tensors(params, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim)
    for r in range(2):
        want = hf_forward(hf, hf_config_of(cfg), tokens[r])
        np.testing.assert_allclose(got[r], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_llama3_inv_freq_matches_numpy():
    for rs in (None, LLAMA3, dict(LLAMA3, original_max_position_embeddings=64, factor=32.0)):
        cfg = small(rope_scaling=rs, rope_theta=500000.0)
        want = hf_inv_freq(hf_config_of(cfg))
        np.testing.assert_allclose(llama.rope_inv_freq(cfg), want, rtol=2e-6)
    # The three llama3 bands are all exercised by the config the model tests use.
    cfg = small(rope_scaling=LLAMA3)
    plain = llama.rope_inv_freq(small())
    ratio = llama.rope_inv_freq(cfg) / plain
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(1 / 8) and 1 / 8 < ratio[1] < 1


def test_sliding_window_changes_logits_and_is_exact_window():
    """window 5: position i sees i-4..i. Changing token i-5 leaves position i's logits unchanged in a
    1-layer model, changing token i-4 does not."""
    cfg = small(num_layers=1, sliding_window=5)
    params = perturbed_params(cfg, 4)
    base = np.arange(12, dtype=np.int32)[None] + 3
    i = 10
    out = lambda t: np.asarray(llama.dense_logits(params, cfg, t))[0, i]  # noqa: E731
    far, near = base.copy(), base.copy()
    far[0, i - 5] = 60
    near[0, i - 4] = 60
    np.testing.assert_array_equal(out(far), out(base))
    assert np.abs(out(near) - out(base)).max() > 1e-3
    assert llama.attention_options(cfg)["window_left"] == 4
    assert llama.attention_options(small())["window_left"] == -1


# ----------------------------------------------------------------------------------------------
# the paged forward through seqattn_jax's cache, against dense_logits
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "cache", "decode"), donate_argnums=(1,))
def _step(params, kv, packed, tokens, logits_rows, *, cfg, cache, decode):
    opts = llama.attention_options(cfg)

    def attend(q, k, v, kv, layer):
        kv = sj.append_kv(cache, kv, k, v, packed, layer=layer)
        if decode:
            return reference.batch_decode(cache, q, kv, packed, layer=layer, **opts), kv
        return reference.batch_prefill(cache, q, kv, packed, layer=layer, causal=True, **opts), kv

    return llama.forward(params, cfg, tokens, packed.positions, kv, attend, logits_rows)


def run_paged(cfg: LlamaConfig, params, seqs: list[np.ndarray], prompt_lens: list[int], *,
              chunk: int = 8, page_size: int = 4):
    """Chunked prefill of every prompt, then teacher-forced decode of the rest of each sequence
    (one padding slot in every decode batch). Returns {(request, position): logits [V]}."""
    n = len(seqs)
    longest = max(len(s) for s in seqs)
    max_pages = -(-longest // page_size)
    cache = sj.CacheConfig(num_pages=n * max_pages + 3, page_size=page_size,
                           num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_seqs=n + 1,
                           max_pages_per_seq=max_pages, num_layers=cfg.num_layers, dtype=cfg.dtype)
    state, kv = sj.init_state(cache), sj.init_kv(cache)
    # Take a few pages first and free them later, so request pages are not in id order.
    state, ok = sj.allocate(state, jnp.array([n], jnp.int32), jnp.array([3 * page_size - 1], jnp.int32))
    assert bool(sj.ok(ok))
    slots = jnp.arange(n, dtype=jnp.int32)
    done = [0] * n
    got = {}
    while any(done[r] < prompt_lens[r] for r in range(n)):  # prefill: requests share each chunk
        budget, new = chunk, []
        for r in range(n):
            take = min(prompt_lens[r] - done[r], budget, 5)  # at most 5 per request per chunk
            new.append(take)
            budget -= take
        state, ok = sj.allocate(state, slots, jnp.asarray(new, jnp.int32))
        assert bool(sj.ok(ok))
        packed = sj.pack_for_flashinfer(state, slots, jnp.asarray(new, jnp.int32), max_tokens=chunk)
        rows = np.concatenate([seqs[r][done[r]:done[r] + new[r]] for r in range(n)])
        tokens = np.zeros(chunk, np.int32)
        tokens[:len(rows)] = rows
        logits, kv = _step(params, kv, packed, jnp.asarray(tokens), jnp.arange(chunk, dtype=jnp.int32),
                           cfg=cfg, cache=cache, decode=False)
        row = 0
        for r in range(n):
            for j in range(new[r]):
                got[(r, done[r] + j)] = np.asarray(logits[row])
                row += 1
            done[r] += new[r]
    state, _ = sj.release(state, jnp.array([n], jnp.int32))  # free the pages taken first
    dec_slots = jnp.concatenate([slots, jnp.array([-1], jnp.int32)])  # one padding request
    while any(done[r] < len(seqs[r]) for r in range(n)):
        active = [r for r in range(n) if done[r] < len(seqs[r])]
        ids = jnp.asarray([r if r in active else -1 for r in range(n)] + [-1], jnp.int32)
        state, ok = sj.allocate_decoding(state, ids)
        assert bool(sj.ok(ok))
        packed = sj.pack_for_flashinfer(state, ids)
        tokens = np.zeros(n + 1, np.int32)
        for r in active:
            tokens[r] = seqs[r][done[r]]
        logits, kv = _step(params, kv, packed, jnp.asarray(tokens), jnp.arange(n + 1, dtype=jnp.int32),
                           cfg=cfg, cache=cache, decode=True)
        chex.assert_shape(logits, (n + 1, cfg.vocab_size))
        chex.assert_type(logits, jnp.float32)
        for r in active:
            got[(r, done[r])] = np.asarray(logits[r])
            done[r] += 1
    del dec_slots
    return got


def _compare_paged(cfg, params, *, atol_rel):
    rng = np.random.default_rng(1)
    lens = [14, 9, 20]
    prompt_lens = [6, 9, 11]
    seqs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lens]
    got = run_paged(cfg, params, seqs, prompt_lens)
    padded = np.zeros((len(seqs), max(lens)), np.int32)
    for r, s in enumerate(seqs):
        padded[r, :len(s)] = s
    dense = np.asarray(llama.dense_logits(params, cfg, padded))
    assert len(got) == sum(lens)
    worst = 0.0
    for (r, p), logits in got.items():
        scale = np.abs(dense[r, p]).max()
        worst = max(worst, np.abs(logits - dense[r, p]).max() / scale)
    assert worst <= atol_rel, f"max |paged - dense| / max|dense| = {worst:.2e} > {atol_rel:.0e}"
    return worst


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paged_forward_equals_dense_float32(name):
    cfg = CONFIGS[name]
    _compare_paged(cfg, perturbed_params(cfg, 5), atol_rel=2e-6)


@pytest.mark.parametrize("dtype,tol", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_paged_forward_low_precision(dtype, tol):
    cfg = dataclasses.replace(CONFIGS["bias_tied_llama3_window"], dtype=dtype)
    params = perturbed_params(cfg, 6)
    for leaf in jax.tree_util.tree_leaves(params):
        chex.assert_type(leaf, jnp.dtype(dtype))
    _compare_paged(cfg, params, atol_rel=tol)


def test_forward_only_logits_rows_and_padding_rows():
    """logits_rows picks rows; a padding row (position -1, any token) does not change real rows."""
    cfg = small()
    params = perturbed_params(cfg, 7)
    tokens = jnp.array([5, 9, 11, -3], jnp.int32)
    calls = []

    def attend(q, k, v, kv, layer):  # no cache: causal attention over the 3 real rows only
        calls.append(layer)
        chex.assert_shape(q, (4, cfg.num_heads, cfg.head_dim))
        chex.assert_shape([k, v], (4, cfg.num_kv_heads, cfg.head_dim))
        real = llama._dense_attention(cfg, q[None, :3], k[None, :3], v[None, :3])[0]
        return jnp.concatenate([real, jnp.zeros_like(q[3:])]).astype(q.dtype), kv

    positions = jnp.array([0, 1, 2, -1], jnp.int32)
    logits, kv = llama.forward(params, cfg, tokens, positions, "pool", attend, jnp.array([2, 0], jnp.int32))
    assert kv == "pool" and calls == list(range(cfg.num_layers))
    chex.assert_shape(logits, (2, cfg.vocab_size))
    dense = np.asarray(llama.dense_logits(params, cfg, tokens[None, :3]))[0]
    np.testing.assert_allclose(np.asarray(logits), dense[[2, 0]], rtol=1e-5, atol=1e-5)


def test_model_wrapper_and_params():
    cfg = small(qkv_bias=True, tie_embeddings=True)
    model = LlamaModel(cfg)
    assert hash(model) == hash(LlamaModel(small(qkv_bias=True, tie_embeddings=True)))
    params = model.init_params(0)
    model.check_params(params)
    assert "lm_head" not in params and isinstance(params["layers"], list)
    chex.assert_shape(params["layers"][0]["wqkv"], (48, (4 + 2 * 2) * 16))
    chex.assert_shape(params["layers"][0]["bqkv"], ((4 + 2 * 2) * 16,))
    chex.assert_shape(params["layers"][0]["w_gate_up"], (48, 160))
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n == cfg.num_params()
    assert (model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim, model.vocab_size,
            model.dtype) == (2, 4, 2, 16, 97, "float32")
    tokens = jnp.array([[1, 2, 3]], jnp.int32)
    np.testing.assert_array_equal(model.dense_logits(params, tokens),
                                  llama.dense_logits(params, cfg, tokens))
    # Same seed, same weights; greedy decoding of random weights is not degenerate.
    chex.assert_trees_all_equal(params, model.init_params(0))
    logits = np.asarray(model.dense_logits(model.init_params(1), jnp.arange(40, dtype=jnp.int32)[None] % 97))
    assert len(set(logits[0].argmax(-1).tolist())) > 5
    bad = dict(params, final_norm=params["final_norm"][:3])
    with pytest.raises(ValueError, match=r"params\['final_norm'\]"):
        model.check_params(bad)


@pytest.mark.parametrize("kw,field", [
    (dict(d_model=0), "d_model"), (dict(num_heads=3), "num_heads"), (dict(head_dim=15), "head_dim"),
    (dict(rope_theta=-1.0), "rope_theta"), (dict(norm_eps=0.0), "norm_eps"),
    (dict(sliding_window=0), "sliding_window"), (dict(dtype="int8"), "dtype"),
    (dict(qkv_bias=1), "qkv_bias"), (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        small(**kw)


def test_config_hashable_and_rope_scaling_normalised():
    a = small(rope_scaling=dict(LLAMA3, rope_theta=1.0))  # extra keys are ignored
    b = small(rope_scaling=tuple(LLAMA3.items()))
    legacy = dict(LLAMA3)
    legacy["type"] = legacy.pop("rope_type")
    assert a == b == small(rope_scaling=legacy) and hash(a) == hash(b)
    assert small(rope_scaling={"rope_type": "default"}).rope_scaling is None
    assert small(dtype=np.float16).dtype == "float16" and math.isclose(small().norm_eps, 1e-5)


def test_forward_bad_input():
    cfg = small()
    params = llama.init_params(cfg, 0)
    attend = lambda q, k, v, kv, layer: (q, kv)  # noqa: E731
    toks = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="positions must be int32"):
        llama.forward(params, cfg, toks, jnp.zeros((3,), jnp.int32), None, attend, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="tokens must be int32"):
        llama.forward(params, cfg, toks[None], toks[None], None, attend, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="logits_rows"):
        llama.forward(params, cfg, toks, toks, None, attend, jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\]\['wqkv'\] must be float32"):
        bad = jax.tree_util.tree_map(lambda a: a, params)
        bad["layers"][1]["wqkv"] = bad["layers"][1]["wqkv"].astype(jnp.float16)
        llama.forward(bad, cfg, toks, toks, None, attend, jnp.zeros((1,), jnp.int32))


def test_attention_options_drive_the_public_plans():
    """attention_options(cfg) makes the AttentionOptions of seqattn_jax's plans, and the reference
    functions take it as keywords."""
    cfg = small(sliding_window=3)
    opts = llama.attention_options(cfg)
    options = sj.AttentionOptions(**opts)
    cache = sj.CacheConfig(num_pages=8, page_size=4, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                           max_seqs=2, max_pages_per_seq=4, num_layers=cfg.num_layers, dtype="float32")
    state, kv = sj.init_state(cache), sj.init_kv(cache)
    slots = jnp.arange(2, dtype=jnp.int32)
    state, ok = sj.allocate(state, slots, jnp.array([5, 3], jnp.int32))
    packed = sj.pack_for_flashinfer(state, slots, jnp.array([5, 3], jnp.int32), max_tokens=8)
    q = jax.random.normal(jax.random.key(0), (8, cfg.num_heads, cfg.head_dim))
    kv = jax.random.normal(jax.random.key(1), kv.shape)
    plan = sj.plan_prefill(cache, packed, cfg.num_heads, backend="reference", options=options)
    out = sj.batch_prefill(cache, q, kv, packed, plan=plan)
    np.testing.assert_array_equal(out, reference.batch_prefill(cache, q, kv, packed, **opts))
    dec = sj.pack_for_flashinfer(state, slots)
    plan = sj.plan_decode(cache, dec, cfg.num_heads, backend="reference", options=options)
    out = sj.batch_decode(cache, q[:2], kv, dec, plan=plan)
    np.testing.assert_array_equal(out, reference.batch_decode(cache, q[:2], kv, dec, **opts))
    assert bool(sj.ok(ok))
