"""`pack_for_flashinfer` against a numpy re-derivation of FlashInfer's CSR format, and the KV pool
writes (`append_kv`, `copy_pages`) against numpy indexing, in both layouts, per layer, in place."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqattn_jax as sj
from seqattn_jax import checked
from seqattn_jax.validation import Status


def make_state(cfg, lens, seed=0):
    """A state holding sequences of `lens` tokens in slots 0..n-1, with pages handed out in a
    shuffled order (allocate a lot, release every other sequence, allocate again)."""
    rng = np.random.default_rng(seed)
    state = sj.init_state(cfg)
    filler = jnp.arange(cfg.max_seqs, dtype=jnp.int32)
    state, _ = sj.allocate(state, filler, jnp.asarray(rng.integers(0, cfg.page_size + 1, cfg.max_seqs),
                                                        jnp.int32))
    state, _ = sj.release(state, filler[::2])
    state, _ = sj.release(state, filler[1::2])
    n = len(lens)
    for chunk in range(3):  # grow in interleaved chunks so pages of one sequence are not contiguous
        add = [(l * (chunk + 1)) // 3 - (l * chunk) // 3 for l in lens]
        state, status = sj.allocate(state, jnp.arange(n, dtype=jnp.int32), jnp.asarray(add, jnp.int32))
        ok = sj.ok(status)
        assert bool(ok.all())
    return state


def numpy_pack(state, seq_ids, new_lens, T, kv_lens=None):
    """FlashInfer's CSR format derived request by request in plain Python, with the status of each
    request: an id that is not an active slot, a repeated id, a length out of range or rows past T
    make the request padding (no pages, no rows) and name the reason."""
    cfg = state.config
    table, lens_all, active = map(np.asarray, (state.page_table, state.seq_lens, state.active))
    indptr, indices, lpl, lens, qo, status = [0], [], [], [], [0], []
    rows, total = [], 0
    for b, s in enumerate(seq_ids):
        held = int(lens_all[s]) if 0 <= s < cfg.max_seqs and active[s] else 0
        n = held if kv_lens is None else kv_lens[b]
        new = 1 if new_lens is None else new_lens[b]
        if s < 0:
            code = Status.OK
        elif s >= cfg.max_seqs:
            code = Status.BAD_SLOT
        elif list(seq_ids).count(s) > 1:
            code = Status.DUPLICATE
        elif not active[s]:
            code = Status.INACTIVE
        elif not 0 <= new <= n <= held:
            code = Status.BAD_LENGTH
        elif (b >= T) if new_lens is None else (total + new > T):
            code = Status.TOO_LONG
        else:
            code = Status.OK
        ok = s >= 0 and code == Status.OK
        status.append(code)
        n = n if ok else 0
        total += new if ok and new_lens is not None else 0
        npg = -(-n // cfg.page_size)
        indices += list(table[s, :npg]) if ok else []
        indptr.append(len(indices))
        lpl.append(n - (npg - 1) * cfg.page_size if npg else 0)
        lens.append(n)
        if new_lens is None:  # decode: row b is request b's, a padding request's row unused
            qo.append(b + 1)
            pos = n - 1
            rows.append((b, pos, table[s, pos // cfg.page_size], pos % cfg.page_size) if ok
                        else (-1, -1, -1, -1))
            continue
        new = new if ok else 0
        qo.append(qo[-1] + new)
        for j in range(new):
            pos = n - new + j
            rows.append((b, pos, table[s, pos // cfg.page_size], pos % cfg.page_size))
    rows += [(-1, -1, -1, -1)] * (T - len(rows))
    return indptr, indices, lpl, lens, qo, np.array(rows[:T]).T, status


class PackTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        cfg = sj.CacheConfig(num_pages=64, page_size=4, num_kv_heads=1, head_dim=1, max_seqs=6,
                             max_pages_per_seq=8)
        state = make_state(cfg, [5, 17, 1, 32, 8])
        cases = [([3, 0, -1, 1, 9, 5, 2], None, 7, None),          # bad slot 9, inactive 5
                 ([1, 3, 4, 0], [7, 32, 8, 1], 50, None),
                 ([4, -1, 2, 1], [3, 2, 1, 17], 16, None),         # 1's 17 rows do not fit: TOO_LONG
                 ([1, 3, 1, 0], [1, 2, 1, 6], 16, None),           # 1 twice; 0 has only 5 tokens
                 ([1, 0, 3, 4], [4, 5, 2, 3], 16, [10, 5, 40, 3]),  # 3 holds 32 < 40 tokens
                 ([3, 0, 1], None, 3, [9, 1, 17])]                 # decode with explicit lengths
        pack = self.variant(sj.pack_for_flashinfer, static_argnames="max_tokens")
        for seq_ids, new_lens, T, kv_lens in cases:
            p = pack(state, jnp.asarray(seq_ids, jnp.int32),
                     None if new_lens is None else jnp.asarray(new_lens, jnp.int32), max_tokens=T,
                     kv_lens=None if kv_lens is None else jnp.asarray(kv_lens, jnp.int32))
            indptr, indices, lpl, lens, qo, rows, status = numpy_pack(state, seq_ids, new_lens, T,
                                                                      kv_lens)
            np.testing.assert_array_equal(p.status, status)
            assert bool(sj.ok(p.status)) == all(c == Status.OK for c in status)
            np.testing.assert_array_equal(p.kv_page_indptr, indptr)
            np.testing.assert_array_equal(p.kv_page_indices[: indptr[-1]], indices)
            assert p.kv_page_indices.shape == (len(seq_ids) * cfg.max_pages_per_seq,)
            np.testing.assert_array_equal(p.kv_last_page_len, lpl)
            np.testing.assert_array_equal(p.seq_lens, lens)
            np.testing.assert_array_equal(p.qo_indptr, qo)
            np.testing.assert_array_equal(p.batch_indices, rows[0])
            np.testing.assert_array_equal(p.positions, rows[1])
            np.testing.assert_array_equal(p.token_pages, rows[2])
            np.testing.assert_array_equal(p.token_offsets, rows[3])
            assert all(x.dtype == jnp.int32 for x in jax.tree_util.tree_leaves(p))
            assert p.config == cfg


def test_duplicate_ids_never_write_one_position_twice():
    """Issue 11: `pack_for_flashinfer([0, 0], ...)` gave both rows the same page slot, so the second
    write silently replaced the first; now both requests are refused (DUPLICATE), no row is written,
    and the checked form raises."""
    cfg = sj.CacheConfig(num_pages=8, page_size=4, num_kv_heads=1, head_dim=2, max_seqs=4,
                         max_pages_per_seq=4, dtype="float32")
    state, _ = sj.allocate(sj.init_state(cfg), jnp.array([0], jnp.int32), jnp.array([3], jnp.int32))
    packed = sj.pack_for_flashinfer(state, jnp.array([0, 0], jnp.int32))
    np.testing.assert_array_equal(packed.status, [Status.DUPLICATE] * 2)
    assert not bool(sj.ok(packed.status))
    np.testing.assert_array_equal(packed.token_pages, [-1, -1])
    kv = sj.append_kv(cfg, sj.init_kv(cfg), jnp.ones((2, 1, 2)), jnp.ones((2, 1, 2)), packed)
    assert not np.any(np.asarray(kv))
    with pytest.raises(sj.AllocatorError, match=r"request 1 \(id 0\).*DUPLICATE"):
        checked.pack_for_flashinfer(state, jnp.array([0, 0], jnp.int32))


def test_chunked_prefill_with_explicit_kv_lens_matches_whole_prompt():
    """A prompt allocated whole and written in chunks with `kv_lens` (no fake state) lands where one
    pack of the whole prompt puts it, and each chunk attends to exactly its prefix."""
    cfg = sj.CacheConfig(num_pages=16, page_size=4, num_kv_heads=1, head_dim=2, max_seqs=2,
                         max_pages_per_seq=8, dtype="float32")
    state, _ = sj.allocate(sj.init_state(cfg), jnp.array([0, 1], jnp.int32), jnp.array([11, 6], jnp.int32))
    ids = jnp.array([0, 1], jnp.int32)
    whole = sj.pack_for_flashinfer(state, ids, jnp.array([11, 6], jnp.int32), max_tokens=17)
    pages, offs = [], []
    for start, stop in [(0, 5), (5, 8), (8, 11)]:  # slot 1: 6 tokens in chunks of 5, 1, 0
        n1 = [min(stop, 6) - min(start, 6)]
        chunk = sj.pack_for_flashinfer(state, ids, jnp.array([stop - start, n1[0]], jnp.int32),
                                       max_tokens=10, kv_lens=jnp.array([stop, min(stop, 6)], jnp.int32))
        assert bool(sj.ok(chunk.status))
        np.testing.assert_array_equal(chunk.seq_lens, [stop, min(stop, 6)])
        rows = int(chunk.qo_indptr[-1])
        np.testing.assert_array_equal(chunk.positions[: stop - start], np.arange(start, stop))
        pages.append(np.asarray(chunk.token_pages[:rows]))
        offs.append(np.asarray(chunk.token_offsets[:rows]))
    # Reorder the whole-prompt rows (0's 11 then 1's 6) into the chunks' order and compare.
    wp, wo = np.asarray(whole.token_pages), np.asarray(whole.token_offsets)
    order = [*range(0, 5), *range(11, 16), *range(5, 8), 16, *range(8, 11)]
    np.testing.assert_array_equal(np.concatenate(pages), wp[order])
    np.testing.assert_array_equal(np.concatenate(offs), wo[order])


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_kv_writes_true_positions_per_layer(layout):
    cfg = sj.CacheConfig(num_pages=32, page_size=4, num_kv_heads=3, head_dim=5, max_seqs=4,
                         max_pages_per_seq=8, num_layers=3, dtype="float32", kv_layout=layout)
    state = make_state(cfg, [6, 11, 3])
    seq_ids, new_lens, T = jnp.array([2, 0, -1, 1], jnp.int32), jnp.array([3, 2, 5, 4], jnp.int32), 12
    packed = sj.pack_for_flashinfer(state, seq_ids, new_lens, max_tokens=T)
    rng = np.random.default_rng(1)
    k = rng.standard_normal((T, 3, 5)).astype(np.float32)
    v = rng.standard_normal((T, 3, 5)).astype(np.float32)
    kv0 = np.asarray(jnp.full(cfg.kv_shape, jnp.nan, jnp.float32))
    kv = sj.append_kv(cfg, jnp.asarray(kv0), jnp.asarray(k), jnp.asarray(v), packed, layer=2)
    want = kv0.copy()
    table = np.asarray(state.page_table)
    for slot, n_new, row0 in [(2, 3, 0), (0, 2, 3), (1, 4, 5)]:
        n = int(state.seq_lens[slot])
        for j in range(n_new):
            pos = n - n_new + j
            page = 2 * cfg.num_pages + table[slot, pos // 4]
            if layout == "NHD":
                want[page, 0, pos % 4], want[page, 1, pos % 4] = k[row0 + j], v[row0 + j]
            else:
                want[page, 0, :, pos % 4], want[page, 1, :, pos % 4] = k[row0 + j], v[row0 + j]
    np.testing.assert_array_equal(np.asarray(kv), want)  # NaN where nothing was written, too
    # the stacked form (values=None, keys = [T, 2, Hkv, D]) writes exactly the same
    kvs = sj.append_kv(cfg, jnp.asarray(kv0), jnp.stack([jnp.asarray(k), jnp.asarray(v)], 1), None,
                       packed, layer=2)
    np.testing.assert_array_equal(np.asarray(kvs), want)
    with pytest.raises(ValueError, match=r"with values=None, keys must be the stacked K/V rows"):
        sj.append_kv(cfg, jnp.asarray(kv0), jnp.asarray(k), None, packed, layer=2)
    with pytest.raises(ValueError, match=r"values must have shape \[T, num_kv_heads, head_dim\]"):
        sj.append_kv(cfg, jnp.asarray(kv0), jnp.asarray(k), jnp.asarray(v[:, :2]), packed)


def _ptr(x):
    return x.unsafe_buffer_pointer()


def test_append_in_place_when_donated_and_scan_over_layers():
    """A lax.scan over layers carries the whole pool, reaches layer l by a page-id offset, and (with
    the pool donated) XLA writes into the caller's buffer: the pointer does not change."""
    cfg = sj.CacheConfig(num_pages=16, page_size=4, num_kv_heads=2, head_dim=4, max_seqs=2,
                         max_pages_per_seq=4, num_layers=4, dtype="float32")
    state = make_state(cfg, [5, 2])
    packed = sj.pack_for_flashinfer(state, jnp.array([0, 1], jnp.int32))
    keys = jnp.arange(4 * 2 * 2 * 4, dtype=jnp.float32).reshape(4, 2, 2, 4)  # [L, T, Hkv, D]

    def step(kv, keys, packed):
        def layer(kv, xs):
            l, k = xs
            return sj.append_kv(cfg, kv, k, -k, packed, layer=l), None
        return jax.lax.scan(layer, kv, (jnp.arange(cfg.num_layers), keys))[0]

    donated = jax.jit(step, donate_argnums=0)
    kv = sj.init_kv(cfg)
    before = _ptr(kv)
    kv = donated(kv, keys, packed)
    assert _ptr(kv) == before, "the pool was copied"
    table = np.asarray(state.page_table)
    for l in range(cfg.num_layers):
        for b, (slot, pos) in enumerate([(0, 4), (1, 1)]):
            page = l * cfg.num_pages + table[slot, pos // 4]
            np.testing.assert_array_equal(kv[page, 0, pos % 4], keys[l, b])
            np.testing.assert_array_equal(kv[page, 1, pos % 4], -keys[l, b])
    append = jax.jit(sj.append_kv, static_argnums=0, donate_argnums=1)
    before = _ptr(kv)
    kv = append(cfg, kv, keys[0], keys[0], packed, layer=1)
    assert _ptr(kv) == before


def test_copy_pages_all_layers_and_skips_padding():
    cfg = sj.CacheConfig(num_pages=8, page_size=2, num_kv_heads=1, head_dim=2, max_seqs=2,
                         max_pages_per_seq=4, num_layers=2, dtype="float32")
    kv = jnp.arange(np.prod(cfg.kv_shape), dtype=jnp.float32).reshape(cfg.kv_shape)
    out = sj.copy_pages(cfg, kv, jnp.array([[1, 5], [-1, -1], [5, 2]], jnp.int32))
    want = np.asarray(kv).copy()
    for l in range(2):
        o = l * 8
        want[o + 5], want[o + 2] = np.asarray(kv)[o + 1], np.asarray(kv)[o + 5]  # sources read first
    np.testing.assert_array_equal(out, want)


def test_bad_kv_inputs():
    cfg = sj.CacheConfig(num_pages=8, page_size=2, num_kv_heads=2, head_dim=4, max_seqs=2,
                         max_pages_per_seq=4, dtype="float32")
    state, _ = sj.allocate(sj.init_state(cfg), jnp.array([0], jnp.int32), jnp.array([3], jnp.int32))
    packed = sj.pack_for_flashinfer(state, jnp.array([0], jnp.int32))
    kv = sj.init_kv(cfg)
    good = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match=r"keys must have shape \[T, num_kv_heads, head_dim\]"):
        sj.append_kv(cfg, kv, jnp.zeros((1, 4, 2)), good, packed)
    with pytest.raises(ValueError, match="kv must have shape"):
        sj.append_kv(cfg, kv[:4], good, good, packed)
    with pytest.raises(ValueError, match="kv must have dtype float32"):
        sj.append_kv(cfg, kv.astype(jnp.float16), good, good, packed)
    with pytest.raises(ValueError, match=r"layer must be in \[0, config\.num_layers = 1\)"):
        sj.append_kv(cfg, kv, good, good, packed, layer=1)
    with pytest.raises(ValueError, match="copies must be an int32 \\[N, 2\\]"):
        sj.copy_pages(cfg, kv, jnp.zeros((3,), jnp.int32))
