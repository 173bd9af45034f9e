"""seqattn_jax.nnx: the NNX paged-attention layer against dense attention, and the no-copy property
of a donated, jitted step (the pool keeps its buffer)."""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import seqattn_jax as sa
from seqattn_jax import nnx as sa_nnx

HQ, HKV, D, PS = 4, 2, 16, 4


def _config(num_layers=2, dtype="float32", max_seqs=4):
    return sa.CacheConfig(num_pages=32, page_size=PS, num_kv_heads=HKV, head_dim=D, max_seqs=max_seqs,
                          max_pages_per_seq=8, num_layers=num_layers, dtype=dtype)


def dense_causal(q, k, v, q_pos):
    """float64 numpy: q [n, Hq, D] at positions q_pos [n] against k, v [L, Hkv, D] (positions 0..L-1)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    s = np.where(np.arange(k.shape[0])[None, None, :] <= np.asarray(q_pos)[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v)


def _rows(t, per_request):
    """Lay out per-request row arrays [n_b, ...] (None: padding request) in `pack_for_flashinfer`'s
    token-row order: request b's rows start after all rows of requests before it ([t, ...])."""
    qo = np.concatenate([[0], np.cumsum([0 if x is None else len(x) for x in per_request])])
    first = next(x for x in per_request if x is not None)
    out = np.zeros((t,) + first.shape[1:], np.float32)
    for b, x in enumerate(per_request):
        if x is not None and len(x):
            out[qo[b]: qo[b] + len(x)] = x
    return jnp.asarray(out)


CFG = _config()
ATTN = sa_nnx.PagedAttention(CFG, num_q_heads=HQ, backend="reference")
SEQ_IDS = jnp.asarray([0, 1, 2, -1], jnp.int32)
DEC_IDS = jnp.asarray([0, -1, 2, 1], jnp.int32)  # a padding request in the middle
T = 16


@jax.jit
def _prefill_chunk(state, kv, q, k, v, new_lens, layer):
    state, status = sa.allocate(state, SEQ_IDS, new_lens)
    ok = sa.ok(status)
    packed = sa.pack_for_flashinfer(state, SEQ_IDS, new_lens, max_tokens=T)
    out, kv = ATTN(q, k, v, kv, packed, layer=layer, plan=ATTN.plan(packed))
    return out, kv, state, jnp.all(ok), packed


@functools.partial(jax.jit, static_argnames="mode")
def _decode(state, kv, q, k, v, layer, mode):
    state, status = sa.allocate_decoding(state, DEC_IDS)
    ok = sa.ok(status)
    packed = sa.pack_for_flashinfer(state, DEC_IDS)
    out, kv = ATTN(q, k, v, kv, packed, layer=layer, mode=mode)
    return out, kv, jnp.all(ok)


@pytest.mark.parametrize("layer", [0, 1])
def test_layer_matches_dense_attention_prefill_chunks_then_decode(layer):
    """Chunked prefill (several requests per step, ragged rows) then one decode step, in layer
    `layer` of a two-layer pool (a traced index: both cases share one compilation)."""
    cfg = CFG
    rng = np.random.default_rng(layer)
    lens = [9, 14, 3]
    Q = [rng.standard_normal((n + 1, HQ, D)).astype(np.float32) for n in lens]
    K = [rng.standard_normal((n + 1, HKV, D)).astype(np.float32) for n in lens]
    V = [rng.standard_normal((n + 1, HKV, D)).astype(np.float32) for n in lens]
    state, kv = sa.init_state(cfg), sa.init_kv(cfg)
    layer_ix = jnp.int32(layer)

    done = [0, 0, 0]
    for chunk in ([4, 7, 3, 0], [5, 7, 0, 0]):  # chunked prefill: rows of several requests per step
        spans = [(done[b], done[b] + chunk[b]) for b in range(3)]
        q, k, v = (_rows(T, [X[b][s:e] for b, (s, e) in enumerate(spans)] + [None]) for X in (Q, K, V))
        out, kv, state, ok, packed = _prefill_chunk(state, kv, q, k, v, jnp.asarray(chunk, jnp.int32),
                                                    layer_ix)
        assert bool(jnp.all(ok))
        qo = np.asarray(packed.qo_indptr)
        for b, (s, e) in enumerate(spans):
            want = dense_causal(Q[b][s:e], K[b][:e], V[b][:e], np.arange(s, e))
            np.testing.assert_allclose(np.asarray(out[qo[b]: qo[b + 1]]), want, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(out[qo[3]:]) == 0)  # padding rows give 0
        done = [e for _, e in spans]
    assert done == lens

    # Decode with a padding request in the middle: a decode batch has row b = request b, the
    # padding request's row unused. "decode" (decode kernel) and "prefill" (q_len 1) must both be right.
    order = [0, None, 2, 1]
    q, k, v = (jnp.concatenate([X[b][lens[b]:] if b is not None else np.zeros_like(X[0][:1])
                                for b in order]) for X in (Q, K, V))
    outs = {}
    for mode in ("decode", "prefill"):
        out, kv_new, ok = _decode(state, kv, q, k, v, layer_ix, mode=mode)
        assert bool(ok)
        outs[mode] = np.asarray(out)
    kv = kv_new
    for r, b in enumerate(order):
        if b is None:
            assert np.all(outs["decode"][r] == 0) and np.all(outs["prefill"][r] == 0)
            continue
        want = dense_causal(Q[b][lens[b]:], K[b], V[b], [lens[b]])
        for mode in outs:
            np.testing.assert_allclose(outs[mode][r: r + 1], want, rtol=1e-5, atol=1e-5, err_msg=mode)
    # The other layer's pages were never written.
    other = 1 - layer
    assert float(jnp.abs(kv[other * cfg.num_pages: (other + 1) * cfg.num_pages]).max()) == 0.0


class TinyModel(nnx.Module):
    """Two layers of q/k/v projections over one shared paged pool (a lax.scan over layers)."""

    def __init__(self, cfg: sa.CacheConfig, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(64, 32, rngs=rngs)
        self.q = nnx.Linear(32, HQ * D, rngs=rngs)
        self.kv_proj = nnx.Linear(32, 2 * HKV * D, rngs=rngs)
        self.attn = sa_nnx.PagedAttention(cfg, num_q_heads=HQ, mode="decode")
        self.num_layers = cfg.num_layers

    def __call__(self, tokens, packed, kv):
        x = self.embed(tokens)
        plan = self.attn.plan(packed)

        def body(carry, layer):
            x, kv = carry
            q = self.q(x).reshape(-1, HQ, D)
            k, v = jnp.split(self.kv_proj(x).reshape(-1, 2 * HKV, D), 2, axis=1)
            out, kv = self.attn(q, k, v, kv, packed, layer=layer, plan=plan)
            return (x + out.reshape(x.shape[0], -1)[:, :32], kv), None

        (x, kv), _ = jax.lax.scan(body, (x, kv), jnp.arange(self.num_layers))
        return x, kv


def _decode_step_fn(graphdef):
    def step(params, kv, state, tokens, seq_ids):
        state, status = sa.allocate_decoding(state, seq_ids)
        ok = sa.ok(status)
        packed = sa.pack_for_flashinfer(state, seq_ids)
        x, kv = nnx.merge(graphdef, params)(tokens, packed, kv)
        return x, kv, state, jnp.all(ok)
    return step


def _prefilled(cfg):
    state, status = jax.jit(sa.allocate)(sa.init_state(cfg), jnp.asarray([0, 1, 2, 3], jnp.int32),
                                     jnp.asarray([3, 5, 4, 1], jnp.int32))
    ok = sa.ok(status)
    assert bool(jnp.all(ok))
    return state


def test_donated_step_updates_pool_in_place_and_traces_once():
    cfg = _config(num_layers=3)
    graphdef, params = nnx.split(TinyModel(cfg, rngs=nnx.Rngs(0)))
    step = jax.jit(chex.assert_max_traces(_decode_step_fn(graphdef), n=1), donate_argnums=(1, 2))
    kv, state = sa.init_kv(cfg), _prefilled(cfg)
    ptr = kv.unsafe_buffer_pointer()
    seq_ids = np.asarray([0, 1, 2, 3], np.int32)
    for i in range(6):  # lengths change (pages are granted at boundaries); shapes never do
        ids = seq_ids.copy()
        ids[i % 4] = -1  # a padding request, moving around
        old = kv
        x, kv, state, ok = step(params, kv, state, jnp.asarray(i % 64 * np.ones(4, np.int32)), ids)
        assert bool(ok)
        assert old.is_deleted()  # donated
        assert kv.unsafe_buffer_pointer() == ptr, "the KV pool was copied"
    assert np.isfinite(np.asarray(x)).all()
    # Something was written in every layer's pages.
    per_layer = jnp.abs(kv).reshape(cfg.num_layers, -1).max(axis=1)
    assert bool(jnp.all(per_layer > 0))


def test_without_donation_the_pool_is_copied():
    """The control for the test above: the pointer check does detect a copy."""
    cfg = _config(num_layers=2)
    graphdef, params = nnx.split(TinyModel(cfg, rngs=nnx.Rngs(0)))
    step = jax.jit(_decode_step_fn(graphdef))
    kv, state = sa.init_kv(cfg), _prefilled(cfg)
    _, kv2, _, _ = step(params, kv, state, jnp.zeros(4, jnp.int32), jnp.asarray([0, 1, 2, 3], jnp.int32))
    assert not kv.is_deleted()
    assert kv2.unsafe_buffer_pointer() != kv.unsafe_buffer_pointer()


def test_bad_inputs_raise_value_errors():
    cfg = _config()
    with pytest.raises(ValueError, match="num_q_heads"):
        sa_nnx.PagedAttention(cfg, num_q_heads=3)
    with pytest.raises(ValueError, match="mode"):
        sa_nnx.PagedAttention(cfg, num_q_heads=HQ, mode="chunked")
    with pytest.raises(ValueError, match="backend"):
        sa_nnx.PagedAttention(cfg, num_q_heads=HQ, backend="cuda")
    attn = sa_nnx.PagedAttention(cfg, num_q_heads=HQ)
    state = _prefilled(cfg)
    packed = sa.pack_for_flashinfer(state, jnp.asarray([0, 1, 2, 3], jnp.int32))
    kv = sa.init_kv(cfg)
    q = jnp.zeros((4, HQ, D))
    k = jnp.zeros((4, HKV, D))
    with pytest.raises(ValueError, match="q must have"):
        attn(jnp.zeros((5, HQ, D)), k, k, kv, packed)
    with pytest.raises(ValueError, match="k must have shape"):
        attn(q, jnp.zeros((4, HQ, D)), k, kv, packed)
    with pytest.raises(ValueError, match="num_q_heads"):
        attn(jnp.zeros((4, 2, D)), k, k, kv, packed)


@pytest.mark.slow  # a subset of test_state.py's import test (no torch, flashinfer, flax), run by default
def test_import_seqattn_jax_does_not_import_flax():
    code = "import sys, seqattn_jax; assert 'flax' not in sys.modules, 'flax imported'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
