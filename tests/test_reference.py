"""Tests of `seqattn_jax.reference` against the dense float64 numpy oracle (`dense_oracle.py`).

Every batch is built here in numpy, each request's pages taken in shuffled order from pages 1.. of
the pool. Pages no request holds (page 0 included, where CSR padding points) and the slots past each
request's length in its last page hold NaN, in every layer: outputs must stay finite and equal the
oracle, which reads only the tokens of each request.
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
from absl.testing import parameterized

from seqattn_jax import reference
from seqattn_jax.config import CacheConfig
from seqattn_jax.packing import PackedBatch

try:  # tests/ is a package
    from tests import dense_oracle as oracle
except ImportError:  # pragma: no cover - tests/ on sys.path as a plain directory
    import dense_oracle as oracle

TOL = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (1e-2, 1e-2)}  # (rtol, atol)
LSE_TOL = (1e-5, 1e-5)  # LSE is float32 whatever the dtypes (q is compared after its own rounding)


def make_config(*, layout="NHD", hkv=2, head_dim=16, page_size=4, num_pages=32, max_pages=8,
                num_layers=2, dtype="float32"):
    return CacheConfig(num_pages=num_pages, page_size=page_size, num_kv_heads=hkv, head_dim=head_dim,
                       max_seqs=8, max_pages_per_seq=max_pages, num_layers=num_layers, dtype=dtype,
                       kv_layout=layout)


@dataclasses.dataclass
class Batch:
    """A test batch: the jnp pool and PackedBatch, plus what the oracle needs."""

    kv: jax.Array
    packed: PackedBatch
    page_lists: list
    kv_lens: list
    qo_indptr: list

    @property
    def pool64(self):
        return np.asarray(self.kv.astype(jnp.float32), np.float64)


def make_pool(rng, config, page_lists, kv_lens, *, poison=True):
    """Random pool; with poison, NaN in every page no request holds and past each length."""
    pool = rng.standard_normal(config.kv_shape).astype(np.float32)
    if poison:
        used = np.zeros(config.num_pages, bool)
        for pages in page_lists:
            used[pages] = True
        for layer in range(config.num_layers):
            base = layer * config.num_pages
            pool[base + np.flatnonzero(~used)] = np.nan
            for pages, n in zip(page_lists, kv_lens):
                if n:
                    tail = slice((n - 1) % config.page_size + 1, None)
                    if config.kv_layout == "NHD":
                        pool[base + pages[-1], :, tail] = np.nan
                    else:
                        pool[base + pages[-1], :, :, tail] = np.nan
    return jnp.asarray(pool).astype(config.jnp_dtype)


def make_packed(rng, config, kv_lens, q_lens=None, *, num_rows=None, pages=None):
    """PackedBatch for requests of `kv_lens` tokens (0: padding request) with `q_lens` query rows
    each (default: one row per real request), padded to `num_rows` token rows. Pages are drawn in
    order from `pages` (default: a shuffle of 1..num_pages-1; page 0 stays free, so poisoned)."""
    b = len(kv_lens)
    ps = config.page_size
    perm = 1 + rng.permutation(config.num_pages - 1) if pages is None else pages
    page_lists, cursor = [], 0
    for n in kv_lens:
        k = -(-n // ps)
        assert k <= config.max_pages_per_seq
        page_lists.append(perm[cursor:cursor + k])
        cursor += k
    counts = [len(p) for p in page_lists]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = np.zeros(b * config.max_pages_per_seq, np.int32)
    indices[: indptr[-1]] = np.concatenate([np.zeros(0, np.int64)] + page_lists)
    last = np.array([n - (c - 1) * ps if c else 0 for n, c in zip(kv_lens, counts)], np.int32)
    if q_lens is None:  # decode: one row per real request, T = B rows
        q_lens = [1 if n else 0 for n in kv_lens]
        num_rows = b if num_rows is None else num_rows
    qo_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(qo_indptr[-1]) if num_rows is None else num_rows
    batch_indices = np.full(t, -1, np.int32)
    positions, token_pages, token_offsets = (np.full(t, -1, np.int32) for _ in range(3))
    for r in range(b):
        for i, row in enumerate(range(qo_indptr[r], qo_indptr[r + 1])):
            pos = kv_lens[r] - q_lens[r] + i
            batch_indices[row], positions[row] = r, pos
            token_pages[row], token_offsets[row] = page_lists[r][pos // ps], pos % ps
    packed = PackedBatch(
        seq_ids=jnp.asarray([r if n else -1 for r, n in enumerate(kv_lens)], jnp.int32),
        kv_page_indptr=jnp.asarray(indptr), kv_page_indices=jnp.asarray(indices),
        kv_last_page_len=jnp.asarray(last), seq_lens=jnp.asarray(kv_lens, jnp.int32),
        qo_indptr=jnp.asarray(qo_indptr), batch_indices=jnp.asarray(batch_indices),
        positions=jnp.asarray(positions), token_pages=jnp.asarray(token_pages),
        token_offsets=jnp.asarray(token_offsets))
    return packed, page_lists, list(qo_indptr)


def make_batch(rng, config, kv_lens, q_lens=None, *, num_rows=None, poison=True):
    packed, page_lists, qo_indptr = make_packed(rng, config, kv_lens, q_lens, num_rows=num_rows)
    kv = make_pool(rng, config, page_lists, kv_lens, poison=poison)
    return Batch(kv, packed, page_lists, list(kv_lens), qo_indptr)


def make_q(rng, rows, hq, head_dim, dtype="float32"):
    return jnp.asarray(rng.standard_normal((rows, hq, head_dim)).astype(np.float32)).astype(dtype)


def np64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def oracle_decode(config, batch, q, *, layer=0, **opts):
    return oracle.batch_decode(np64(q), batch.pool64, config.kv_layout, batch.page_lists,
                               batch.kv_lens, layer=layer, num_pages=config.num_pages, **opts)


def oracle_prefill(config, batch, q, *, layer=0, causal=True, **opts):
    return oracle.batch_prefill(np64(q), batch.pool64, config.kv_layout, batch.page_lists,
                                batch.kv_lens, batch.qo_indptr, layer=layer,
                                num_pages=config.num_pages, causal=causal, **opts)


def assert_matches(out, lse, expected_out, expected_lse, dtype="float32"):
    rtol, atol = TOL[dtype]
    assert np.isfinite(np.asarray(out, np.float32)).all()
    chex.assert_trees_all_close(np64(out), expected_out, rtol=rtol, atol=atol)
    if lse is not None:
        chex.assert_type(lse, jnp.float32)
        chex.assert_trees_all_close(np.asarray(lse, np.float64), expected_lse,
                                    rtol=LSE_TOL[0], atol=LSE_TOL[1])


def jitted(op, config, **opts):
    """`op` with the config and options bound, jitted (the way a serving step calls it)."""
    return jax.jit(functools.partial(op, config, **opts))


# Options every op is checked with. Hq=6 over Hkv=2 makes ALiBi use the non-power-of-two slopes.
OPTION_CASES = (
    ("defaults", {}),
    ("sm_scale", dict(sm_scale=0.37)),
    ("soft_cap", dict(sm_scale=0.6, logits_soft_cap=1.5)),
    ("window", dict(window_left=3)),
    ("window_zero", dict(window_left=0)),
    ("rope", dict(pos_encoding_mode="ROPE_LLAMA", rope_scale=2.5, rope_theta=500.0)),
    ("alibi", dict(pos_encoding_mode="ALIBI")),
    ("alibi_soft_cap", dict(pos_encoding_mode="ALIBI", logits_soft_cap=2.0)),
    ("rope_window_cap", dict(pos_encoding_mode="ROPE_LLAMA", window_left=5, logits_soft_cap=3.0,
                             sm_scale=0.4)),
)

DECODE_LENS = [13, 0, 32, 1, 6]  # a padding request, a full-length one, a one-token one
PREFILL_LENS, PREFILL_QLENS = [13, 0, 7, 20, 9], [5, 0, 7, 1, 9]  # append, pad, fresh, decode-like
PREFILL_ROWS = 25  # 22 real rows + 3 padding rows
# (layout, Hq, Hkv, pool dtype, q dtype): GQA ratios 1, 2, 3, 4 and MQA; every pool dtype.
DTYPE_LAYOUT_CASES = (
    ("nhd_mha", "NHD", 2, 2, "float32", "float32"),
    ("hnd_gqa4", "HND", 8, 2, "float32", "float32"),
    ("hnd_mqa_fp16", "HND", 4, 1, "float16", "float16"),
    ("nhd_gqa2_bf16", "NHD", 4, 2, "bfloat16", "bfloat16"),
    ("hnd_gqa3_fp8_pool", "HND", 6, 2, "float8_e4m3fn", "float32"),
    ("nhd_gqa3_fp8e5m2_pool_fp16", "NHD", 6, 2, "float8_e5m2", "float16"),
)


class DecodeTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("nhd_gqa3", "NHD", 6, 2, "float32"),
                                    ("hnd_gqa2_fp16", "HND", 4, 2, "float16"))
    def test_matches_oracle(self, layout, hq, hkv, dtype):
        rng = np.random.default_rng(0)
        config = make_config(layout=layout, hkv=hkv, dtype=dtype)
        batch = make_batch(rng, config, DECODE_LENS)
        q = make_q(rng, len(DECODE_LENS), hq, config.head_dim, dtype)
        fn = self.variant(functools.partial(reference.batch_decode, config, layer=1, return_lse=True))
        out, lse = fn(q, batch.kv, batch.packed)
        chex.assert_shape([out, lse], [q.shape, q.shape[:2]])
        chex.assert_type([out, lse], [q.dtype, jnp.float32])
        assert_matches(out, lse, *oracle_decode(config, batch, q, layer=1), dtype=dtype)

    @parameterized.named_parameters(*DTYPE_LAYOUT_CASES)
    def test_layouts_and_dtypes(self, layout, hq, hkv, pool_dtype, q_dtype):
        rng = np.random.default_rng(1)
        config = make_config(layout=layout, hkv=hkv, dtype=pool_dtype)
        batch = make_batch(rng, config, DECODE_LENS)
        q = make_q(rng, len(DECODE_LENS), hq, config.head_dim, q_dtype)
        out, lse = jitted(reference.batch_decode, config, return_lse=True)(q, batch.kv, batch.packed)
        chex.assert_type(out, q.dtype)
        assert_matches(out, lse, *oracle_decode(config, batch, q), dtype=q_dtype)

    def test_padding_requests_give_zero_and_minus_inf(self):
        rng = np.random.default_rng(2)
        config = make_config()
        batch = make_batch(rng, config, [0, 5, 0])
        q = make_q(rng, 3, 4, config.head_dim).at[0].set(jnp.nan)  # even a NaN query of a pad request
        assert np.isnan(batch.pool64).any()  # the pool is poisoned (page 0, where padding points)
        out, lse = jitted(reference.batch_decode, config, return_lse=True)(q, batch.kv, batch.packed)
        np.testing.assert_array_equal(np.asarray(out[jnp.array([0, 2])]), 0.0)
        np.testing.assert_array_equal(np.asarray(lse[jnp.array([0, 2])]), -np.inf)
        assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse[1])).all()

    def test_window_zero_reads_only_the_last_token(self):
        rng = np.random.default_rng(3)
        config = make_config(hkv=2)
        batch = make_batch(rng, config, [9, 17])
        q = make_q(rng, 2, 4, config.head_dim)
        out, lse = jitted(reference.batch_decode, config, window_left=0, return_lse=True)(
            q, batch.kv, batch.packed)
        for b, n in enumerate(batch.kv_lens):
            k, v = oracle.contiguous_kv(batch.pool64, "NHD", batch.page_lists[b], n)
            for h in range(4):
                np.testing.assert_allclose(np.asarray(out[b, h]), v[n - 1, h // 2], rtol=1e-6)
                logit = np64(q)[b, h] @ k[n - 1, h // 2] / math.sqrt(config.head_dim)
                np.testing.assert_allclose(float(lse[b, h]), logit * math.log2(math.e), rtol=1e-5)

    def test_lse_is_base_two(self):
        """A zero query sees uniform logits 0: LSE = log2(kv_len), output = mean of V."""
        rng = np.random.default_rng(4)
        config = make_config(hkv=1)
        batch = make_batch(rng, config, [5, 19])
        q = jnp.zeros((2, 2, config.head_dim), jnp.float32)
        out, lse = jitted(reference.batch_decode, config, return_lse=True)(q, batch.kv, batch.packed)
        np.testing.assert_allclose(np.asarray(lse), np.log2([[5, 5], [19, 19]]), rtol=1e-6)
        _, v = oracle.contiguous_kv(batch.pool64, "NHD", batch.page_lists[1], 19)
        np.testing.assert_allclose(np.asarray(out[1, 0]), v[:, 0].mean(0), rtol=1e-5, atol=1e-6)

    def test_soft_cap_bounds_the_logits(self):
        rng = np.random.default_rng(5)
        config = make_config()
        batch = make_batch(rng, config, [24])
        q = 100.0 * make_q(rng, 1, 2, config.head_dim)
        _, lse = jitted(reference.batch_decode, config, logits_soft_cap=2.0, return_lse=True)(
            q, batch.kv, batch.packed)
        assert (np.asarray(lse) <= (2.0 * math.log2(math.e) + math.log2(24)) + 1e-5).all()

    def test_alibi_output_equals_textbook_alibi_lse_shifted(self):
        """FlashInfer's decode bias is slope*j (origin at query row 0, not at the query's position):
        the output equals textbook ALiBi slope*(j - pos), the LSE is higher by slope*pos*log2(e)."""
        rng = np.random.default_rng(6)
        config = make_config()
        batch = make_batch(rng, config, [11, 30])
        q = make_q(rng, 2, 6, config.head_dim)
        out, lse = jitted(reference.batch_decode, config, pos_encoding_mode="ALIBI", return_lse=True)(
            q, batch.kv, batch.packed)
        tb_out, tb_lse = oracle_decode(config, batch, q, pos_encoding_mode="ALIBI",
                                       alibi_origin="position")
        chex.assert_trees_all_close(np64(out), tb_out, rtol=1e-5, atol=1e-5)
        pos = np.array([10, 29])[:, None]
        shift = oracle.alibi_slopes(6)[None, :] * pos * math.log2(math.e)
        np.testing.assert_allclose(np.asarray(lse, np.float64), tb_lse + shift, rtol=1e-5)

    def test_compiles_once_across_lengths(self):
        rng = np.random.default_rng(7)
        config = make_config()
        chex.clear_trace_counter()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(q, kv, packed):
            return reference.batch_decode(config, q, kv, packed, pos_encoding_mode="ROPE_LLAMA")

        for lens in ([3, 9, 0, 17], [4, 10, 1, 0], [32, 1, 2, 25]):
            batch = make_batch(rng, config, lens)
            q = make_q(rng, 4, 4, config.head_dim)
            out = step(q, batch.kv, batch.packed)
            assert_matches(out, None, oracle_decode(config, batch, q, pos_encoding_mode="ROPE_LLAMA")[0],
                           None)


    def test_traced_scalar_options_do_not_recompile(self):
        rng = np.random.default_rng(8)
        config = make_config(layout="HND")
        batch = make_batch(rng, config, DECODE_LENS)
        q = make_q(rng, len(DECODE_LENS), 4, config.head_dim)
        chex.clear_trace_counter()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(q, kv, packed, sm_scale, rope_scale, rope_theta):
            return reference.batch_decode(config, q, kv, packed, sm_scale=sm_scale,
                                          pos_encoding_mode="ROPE_LLAMA", rope_scale=rope_scale,
                                          rope_theta=rope_theta)

        for sm_scale, rope_scale, rope_theta in ((0.3, 1.0, 1e4), (0.9, 3.0, 50.0)):
            out = step(q, batch.kv, batch.packed, jnp.float32(sm_scale), jnp.float32(rope_scale),
                       jnp.float32(rope_theta))
            expected = oracle_decode(config, batch, q, sm_scale=sm_scale, pos_encoding_mode="ROPE_LLAMA",
                                     rope_scale=rope_scale, rope_theta=rope_theta)[0]
            assert_matches(out, None, expected, None)


class PrefillTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("hnd_gqa4_causal", "HND", 8, 2, True, "float32"),
                                    ("nhd_gqa3_noncausal_fp16", "NHD", 6, 2, False, "float16"))
    def test_matches_oracle(self, layout, hq, hkv, causal, dtype):
        rng = np.random.default_rng(10)
        config = make_config(layout=layout, hkv=hkv, dtype=dtype)
        batch = make_batch(rng, config, PREFILL_LENS, PREFILL_QLENS, num_rows=PREFILL_ROWS)
        q = make_q(rng, PREFILL_ROWS, hq, config.head_dim, dtype)
        fn = self.variant(functools.partial(reference.batch_prefill, config, layer=1, causal=causal,
                                            return_lse=True))
        out, lse = fn(q, batch.kv, batch.packed)
        chex.assert_shape([out, lse], [q.shape, q.shape[:2]])
        chex.assert_type([out, lse], [q.dtype, jnp.float32])
        assert_matches(out, lse, *oracle_prefill(config, batch, q, layer=1, causal=causal), dtype=dtype)

    @parameterized.named_parameters(*DTYPE_LAYOUT_CASES)
    def test_layouts_and_dtypes(self, layout, hq, hkv, pool_dtype, q_dtype):
        rng = np.random.default_rng(11)
        config = make_config(layout=layout, hkv=hkv, dtype=pool_dtype)
        batch = make_batch(rng, config, PREFILL_LENS, PREFILL_QLENS, num_rows=PREFILL_ROWS)
        q = make_q(rng, PREFILL_ROWS, hq, config.head_dim, q_dtype)
        out, lse = jitted(reference.batch_prefill, config, return_lse=True)(q, batch.kv, batch.packed)
        chex.assert_type(out, q.dtype)
        assert_matches(out, lse, *oracle_prefill(config, batch, q), dtype=q_dtype)

    def test_padding_rows_give_zero_and_minus_inf(self):
        rng = np.random.default_rng(12)
        config = make_config()
        batch = make_batch(rng, config, [0, 6, 0, 3], [0, 2, 0, 3], num_rows=9)
        q = make_q(rng, 9, 2, config.head_dim).at[5:].set(jnp.nan)  # garbage in padding rows
        out, lse = jitted(reference.batch_prefill, config, return_lse=True)(q, batch.kv, batch.packed)
        np.testing.assert_array_equal(np.asarray(out[5:]), 0.0)
        np.testing.assert_array_equal(np.asarray(lse[5:]), -np.inf)
        assert_matches(out[:5], lse[:5], *(x[:5] for x in oracle_prefill(config, batch, q)))

    def test_decode_equals_prefill_with_one_row_per_request(self):
        rng = np.random.default_rng(13)
        config = make_config(layout="HND")
        batch = make_batch(rng, config, DECODE_LENS)
        q = make_q(rng, len(DECODE_LENS), 4, config.head_dim)
        # Padding requests have no rows: the prefill view packs the real requests' queries first.
        real = np.array(DECODE_LENS) > 0
        q_rows = jnp.zeros_like(q).at[: real.sum()].set(q[real])

        @jax.jit
        def both(q, q_rows, kv, packed):
            opts = dict(pos_encoding_mode="ROPE_LLAMA", window_left=4, return_lse=True)
            return (reference.batch_decode(config, q, kv, packed, **opts),
                    reference.batch_prefill(config, q_rows, kv, packed, **opts))

        (d_out, d_lse), (p_out, p_lse) = both(q, q_rows, batch.kv, batch.packed)
        chex.assert_trees_all_close((np.asarray(d_out)[real], np.asarray(d_lse)[real]),
                                    (np.asarray(p_out)[: real.sum()], np.asarray(p_lse)[: real.sum()]),
                                    rtol=1e-6, atol=1e-6)

    def test_compiles_once_across_lengths(self):
        rng = np.random.default_rng(14)
        config = make_config()
        chex.clear_trace_counter()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(q, kv, packed):
            return reference.batch_prefill(config, q, kv, packed, window_left=6)

        for lens, qlens in (([9, 0, 4], [3, 0, 4]), ([1, 30, 8], [1, 2, 8]), ([0, 0, 12], [0, 0, 11])):
            batch = make_batch(rng, config, lens, qlens, num_rows=12)
            q = make_q(rng, 12, 4, config.head_dim)
            assert_matches(step(q, batch.kv, batch.packed), None,
                           oracle_prefill(config, batch, q, window_left=6)[0], None)


class OptionsTest(chex.TestCase):
    """Every option, decode and prefill in one jitted call, LSE included."""

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(*OPTION_CASES)
    def test_decode_and_prefill(self, opts):
        rng = np.random.default_rng(15)
        config = make_config(layout="HND")
        dec = make_batch(rng, config, DECODE_LENS)
        pre = make_batch(rng, config, PREFILL_LENS, PREFILL_QLENS, num_rows=PREFILL_ROWS)
        q_d = make_q(rng, len(DECODE_LENS), 6, config.head_dim)
        q_p = make_q(rng, PREFILL_ROWS, 6, config.head_dim)

        @self.variant
        def both(q_d, kv_d, packed_d, q_p, kv_p, packed_p):
            return (reference.batch_decode(config, q_d, kv_d, packed_d, return_lse=True, **opts),
                    reference.batch_prefill(config, q_p, kv_p, packed_p, return_lse=True, **opts))

        (out_d, lse_d), (out_p, lse_p) = both(q_d, dec.kv, dec.packed, q_p, pre.kv, pre.packed)
        assert_matches(out_d, lse_d, *oracle_decode(config, dec, q_d, **opts))
        assert_matches(out_p, lse_p, *oracle_prefill(config, pre, q_p, **opts))


class LayerTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_traced_layer_under_scan(self):
        """A lax.scan over layers passes the whole pool and a traced layer id."""
        rng = np.random.default_rng(20)
        config = make_config(layout="HND", num_layers=3)
        batch = make_batch(rng, config, PREFILL_LENS, PREFILL_QLENS, num_rows=PREFILL_ROWS)
        q = make_q(rng, PREFILL_ROWS, 4, config.head_dim)

        @self.variant
        def all_layers(q, kv, packed):
            def body(carry, layer):
                out = reference.batch_prefill(config, q, kv, packed, layer=layer,
                                              pos_encoding_mode="ROPE_LLAMA")
                return carry, out
            return jax.lax.scan(body, None, jnp.arange(config.num_layers, dtype=jnp.int32))[1]

        outs = all_layers(q, batch.kv, batch.packed)
        for layer in range(config.num_layers):
            expected, _ = oracle_prefill(config, batch, q, layer=layer, pos_encoding_mode="ROPE_LLAMA")
            assert_matches(outs[layer], None, expected, None)
        # The layers hold different data, so the outputs differ.
        assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[2]))

    def test_python_int_layer_reads_its_own_pages(self):
        rng = np.random.default_rng(21)
        config = make_config(num_layers=4)
        batch = make_batch(rng, config, [7, 0, 21])
        q = make_q(rng, 3, 2, config.head_dim)
        for layer in (0, 3):
            out = jitted(reference.batch_decode, config, layer=layer)(q, batch.kv, batch.packed)
            assert_matches(out, None, oracle_decode(config, batch, q, layer=layer)[0], None)


class PodTest(chex.TestCase):

    def _pod_case(self, causal, opts, variant):
        rng = np.random.default_rng(30)
        config = make_config(layout="HND")
        batch = make_batch(rng, config, DECODE_LENS)
        q_d = make_q(rng, len(DECODE_LENS), 6, config.head_dim, "float16")
        q_p = make_q(rng, 5, 6, config.head_dim)
        k_p = make_q(rng, 9, 2, config.head_dim, "float16")
        v_p = make_q(rng, 9, 2, config.head_dim, "float16")
        fn = variant(functools.partial(reference.pod, config, layer=1, causal_p=causal,
                                       return_lse=True, **opts))
        (out_p, out_d), (lse_p, lse_d) = fn(q_p, k_p, v_p, q_d, batch.kv, batch.packed)
        chex.assert_type([out_p, out_d, lse_p, lse_d], [jnp.float32, jnp.float16, jnp.float32, jnp.float32])
        exp_p = oracle.attention(np64(q_p), np64(k_p), np64(v_p), causal=causal, **opts)
        assert_matches(out_p, lse_p, *exp_p)
        assert_matches(out_d, lse_d, *oracle_decode(config, batch, q_d, layer=1, **opts), dtype="float16")

    @chex.variants(with_jit=True, without_jit=True)
    def test_pod_matches_oracle(self):
        self._pod_case(True, dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=2e3, rope_scale=0.5),
                       self.variant)

    @parameterized.named_parameters(
        ("noncausal", False, {}),
        ("causal_alibi_window", True, dict(pos_encoding_mode="ALIBI", window_left=4)),
    )
    def test_pod_options(self, causal, opts):
        self._pod_case(causal, opts, jax.jit)

    def test_pod_without_lse_returns_two_outputs(self):
        rng = np.random.default_rng(31)
        config = make_config()
        batch = make_batch(rng, config, [4, 8])
        args = [make_q(rng, n, 2, 16) for n in (3, 3, 3, 2)]
        res = jax.eval_shape(functools.partial(reference.pod, config), *args[:3], args[3], batch.kv,
                             batch.packed)
        chex.assert_shape(res, [(3, 2, 16), (2, 2, 16)])

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_pod_matches_oracle(self):
        opts = dict(pos_encoding_mode="ROPE_LLAMA", window_left=5, logits_soft_cap=3.0)
        rng = np.random.default_rng(32)
        config = make_config(layout="NHD", num_pages=64)
        perm = 1 + rng.permutation(config.num_pages - 1)  # the two batches hold disjoint pages
        prefill = make_packed(rng, config, PREFILL_LENS, PREFILL_QLENS, num_rows=PREFILL_ROWS,
                              pages=perm[:32])
        decode = make_packed(rng, config, DECODE_LENS, pages=perm[32:])
        # Both batches read one pool: pages of both are live; poison the rest.
        kv = make_pool(rng, config, prefill[1] + decode[1], PREFILL_LENS + DECODE_LENS)
        b_p = Batch(kv, prefill[0], prefill[1], PREFILL_LENS, prefill[2])
        b_d = Batch(kv, decode[0], decode[1], DECODE_LENS, decode[2])
        q_p = make_q(rng, PREFILL_ROWS, 4, config.head_dim)
        q_d = make_q(rng, len(DECODE_LENS), 4, config.head_dim)
        fn = self.variant(functools.partial(reference.batch_pod, config, causal_p=True,
                                            return_lse=True, **opts))
        (out_p, out_d), (lse_p, lse_d) = fn(q_p, b_p.packed, q_d, b_d.packed, kv)
        assert_matches(out_p, lse_p, *oracle_prefill(config, b_p, q_p, **opts))
        assert_matches(out_d, lse_d, *oracle_decode(config, b_d, q_d, **opts))
        res = jax.eval_shape(functools.partial(reference.batch_pod, config), q_p, b_p.packed, q_d,
                             b_d.packed, kv)
        chex.assert_shape(res, [q_p.shape, q_d.shape])


@pytest.mark.parametrize("seed", range(4))
def test_random_batches(seed):
    """Random configs, lengths and options, jitted, against the oracle (page_size 1 included)."""
    rng = np.random.default_rng(100 + seed)
    hq, hkv = [(1, 1), (4, 1), (6, 3), (8, 4)][seed]
    page_size = [1, 3, 5, 8][seed]
    max_pages = max(2, 24 // page_size)
    config = make_config(layout=["NHD", "HND"][seed % 2], hkv=hkv, head_dim=8, page_size=page_size,
                         num_pages=4 * max_pages + 3, max_pages=max_pages, num_layers=2)
    b = 4
    kv_lens = [int(x) for x in rng.integers(0, config.max_seq_len + 1, b)]
    q_lens = [int(rng.integers(1, n + 1)) if n else 0 for n in kv_lens]
    rows = sum(q_lens) + int(rng.integers(0, 3))
    opts = dict(pos_encoding_mode=["NONE", "ROPE_LLAMA", "ALIBI", "ROPE_LLAMA"][seed],
                window_left=int(rng.choice([-1, 0, 2, 7])),
                logits_soft_cap=float(rng.choice([0.0, 2.5])),
                sm_scale=float(rng.uniform(0.1, 1.0)),
                rope_scale=float(rng.uniform(0.5, 4.0)), rope_theta=float(rng.choice([1e2, 1e4])))
    causal = seed != 1
    batch = make_batch(rng, config, kv_lens, q_lens, num_rows=rows)
    layer = int(rng.integers(0, 2))
    q_p, q_d = make_q(rng, rows, hq, config.head_dim), make_q(rng, b, hq, config.head_dim)
    (out_p, lse_p), (out_d, lse_d) = jax.jit(
        lambda q_p, q_d, kv, packed: (
            reference.batch_prefill(config, q_p, kv, packed, layer=layer, causal=causal,
                                    return_lse=True, **opts),
            reference.batch_decode(config, q_d, kv, packed, layer=layer, return_lse=True, **opts)),
    )(q_p, q_d, batch.kv, batch.packed)
    assert_matches(out_p, lse_p, *oracle_prefill(config, batch, q_p, layer=layer, causal=causal, **opts))
    assert_matches(out_d, lse_d, *oracle_decode(config, batch, q_d, layer=layer, **opts))


def test_alibi_slopes():
    for h in range(1, 17):
        np.testing.assert_allclose(reference.alibi_slopes(h), oracle.alibi_slopes(h), rtol=1e-7)
    np.testing.assert_allclose(reference.alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=0)
    np.testing.assert_allclose(reference.alibi_slopes(6),
                               [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3], rtol=0)


def test_alibi_slopes_match_flashinfer():
    utils = pytest.importorskip("flashinfer.utils")
    for h in (1, 2, 3, 6, 8, 12, 32, 40):
        np.testing.assert_allclose(reference.alibi_slopes(h), utils.get_alibi_slopes(h).numpy(),
                                   rtol=1e-6)


class ValidationTest(parameterized.TestCase):
    """Bad input raises a ValueError at trace time naming the argument."""

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(40)
        self.config = make_config(hkv=2)
        self.batch = make_batch(rng, self.config, [5, 9])
        self.q = make_q(rng, 2, 4, 16)
        self.k_p = make_q(rng, 3, 2, 16)

    def decode(self, **kw):
        args = dict(config=self.config, q=self.q, kv=self.batch.kv, packed=self.batch.packed)
        args.update({k: kw.pop(k) for k in list(kw) if k in args})
        return reference.batch_decode(args.pop("config"), args.pop("q"), args.pop("kv"),
                                      args.pop("packed"), **kw)

    @parameterized.named_parameters(
        ("kv_shape", dict(kv=jnp.zeros((64, 2, 4, 2, 8), jnp.float32)), r"kv must have shape"),
        ("kv_dtype", dict(kv=jnp.zeros(make_config(hkv=2).kv_shape, jnp.float16)), r"kv must have dtype"),
        ("q_head_dim", dict(q=jnp.zeros((2, 4, 8))), r"q\.shape\[2\] must be config\.head_dim"),
        ("q_gqa", dict(q=jnp.zeros((2, 3, 16))), r"num_qo_heads = 3.*multiple of config\.num_kv_heads"),
        ("q_rows", dict(q=jnp.zeros((3, 4, 16))), r"q\.shape\[0\] must be packed\.batch_size"),
        ("q_ndim", dict(q=jnp.zeros((2, 64))), r"q must be 3-D"),
        ("q_dtype", dict(q=jnp.zeros((2, 4, 16), jnp.int32)), r"q must have a dtype in"),
        ("pos_mode", dict(pos_encoding_mode="ROPE"), r"pos_encoding_mode must be one of"),
        ("window", dict(window_left=-2), r"window_left must be"),
        ("soft_cap", dict(logits_soft_cap=-1.0), r"logits_soft_cap must be"),
        ("soft_cap_traced", dict(logits_soft_cap=jnp.float32(1.0)), r"logits_soft_cap must be a static"),
        ("sm_scale", dict(sm_scale=0.0), r"sm_scale must be a positive"),
        ("rope_theta", dict(rope_theta=-1.0), r"rope_theta must be a positive"),
        ("layer_range", dict(layer=2), r"layer must be in \[0, config\.num_layers = 2\)"),
        ("layer_type", dict(layer=1.0), r"layer must be an int"),
        ("config", dict(config="cfg"), r"config must be a seqattn_jax\.CacheConfig"),
        ("packed", dict(packed={"seq_ids": 1}), r"packed must be a seqattn_jax\.PackedBatch"),
        ("return_lse", dict(return_lse="yes"), r"return_lse must be a bool"),
    )
    def test_decode_errors(self, kw, match):
        with pytest.raises(ValueError, match=match):
            self.decode(**kw)

    def test_rope_needs_even_head_dim(self):
        config = make_config(head_dim=15)
        batch = make_batch(np.random.default_rng(0), config, [3])
        with pytest.raises(ValueError, match=r"ROPE_LLAMA.*even head_dim"):
            reference.batch_decode(config, jnp.zeros((1, 2, 15)), batch.kv, batch.packed,
                                   pos_encoding_mode="ROPE_LLAMA")

    def test_packed_shapes(self):
        bad = dataclasses.replace(self.batch.packed, qo_indptr=jnp.zeros((5,), jnp.int32))
        with pytest.raises(ValueError, match=r"packed\.qo_indptr must have shape \(3,\)"):
            reference.batch_decode(self.config, self.q, self.batch.kv, bad)
        bad = dataclasses.replace(self.batch.packed, kv_page_indices=jnp.zeros((16,), jnp.float32))
        with pytest.raises(ValueError, match=r"packed\.kv_page_indices must be int32"):
            reference.batch_decode(self.config, self.q, self.batch.kv, bad)

    def test_prefill_errors(self):
        with pytest.raises(ValueError, match=r"q\.shape\[0\] must be packed\.num_token_rows"):
            reference.batch_prefill(self.config, jnp.zeros((7, 4, 16)), self.batch.kv, self.batch.packed)
        with pytest.raises(ValueError, match=r"causal must be a bool"):
            reference.batch_prefill(self.config, self.q, self.batch.kv, self.batch.packed, causal=None)

    def test_pod_errors(self):
        c, kv, packed, q, k_p = self.config, self.batch.kv, self.batch.packed, self.q, self.k_p
        with pytest.raises(ValueError, match=r"k_p and v_p must have the same shape"):
            reference.pod(c, q, k_p, k_p[:2], q, kv, packed)
        with pytest.raises(ValueError, match=r"v_p must have shape \[Tk, num_kv_heads = 2"):
            reference.pod(c, q, k_p, jnp.zeros((3, 4, 16)), q, kv, packed)
        with pytest.raises(ValueError, match=r"k_p and v_p must have the same shape and dtype"):
            reference.pod(c, q, k_p, k_p.astype(jnp.float16), q, kv, packed)
        with pytest.raises(ValueError, match=r"Tk = 1 < Tp = 2"):
            reference.pod(c, q, k_p[:1], k_p[:1], q, kv, packed, causal_p=True)
        jax.eval_shape(functools.partial(reference.pod, c, causal_p=False),  # fine without causal
                       q, k_p[:1], k_p[:1], q, kv, packed)
        with pytest.raises(ValueError, match=r"q_p and q_d must have the same num_qo_heads"):
            reference.pod(c, jnp.zeros((2, 2, 16)), k_p, k_p, q, kv, packed)
        with pytest.raises(ValueError, match=r"q_d\.shape\[0\] must be packed_d\.batch_size"):
            reference.pod(c, q, k_p, k_p, q[:1], kv, packed)

    def test_batch_pod_errors(self):
        c, kv, packed, q = self.config, self.batch.kv, self.batch.packed, self.q
        with pytest.raises(ValueError, match=r"q_p\.shape\[0\] must be packed_p\.num_token_rows"):
            reference.batch_pod(c, jnp.zeros((5, 4, 16)), packed, q, packed, kv)
        with pytest.raises(ValueError, match=r"packed_d must be a seqattn_jax\.PackedBatch"):
            reference.batch_pod(c, q, packed, q, None, kv)

    def test_bad_layout_is_refused_by_the_config(self):
        with pytest.raises(ValueError, match=r"kv_layout must be one of"):
            make_config(layout="NDH")
