"""Allocator unit tests: one regression test per seqattn bug (../shared/seeds/README.md), the
jitted/unjitted variants, compile-once, the checked mode and bad input."""

from __future__ import annotations

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental import checkify

import seqattn_jax as sj
from seqattn_jax import checked
from seqattn_jax.state import Status

CFG = sj.CacheConfig(num_pages=8, page_size=4, num_kv_heads=2, head_dim=4, max_seqs=4,
                     max_pages_per_seq=4, num_layers=2, dtype="float32")


def ids(*x):
    return jnp.array(x, jnp.int32)


def assert_same_state(a, b):
    chex.assert_trees_all_equal(a, b)


class AllocatorVariantsTest(chex.TestCase):
    """The same behaviour jitted and not."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_allocate_then_decode_crosses_pages(self):
        alloc = self.variant(sj.allocate)
        decode = self.variant(sj.allocate_decoding)
        state, status = alloc(sj.init_state(CFG), ids(0, 1, -1), ids(4, 3, 7))
        np.testing.assert_array_equal(status, [Status.OK] * 3)
        self.assertTrue(bool(sj.ok(status)))
        np.testing.assert_array_equal(state.seq_lens, [4, 3, 0, 0])
        np.testing.assert_array_equal(state.pages_held, [1, 1, 0, 0])
        state, status = decode(state, ids(0, 1))  # 0 crosses into a second page, 1 fills its first
        self.assertTrue(bool(sj.ok(status)))
        np.testing.assert_array_equal(state.seq_lens, [5, 4, 0, 0])
        np.testing.assert_array_equal(state.pages_held, [2, 1, 0, 0])
        self.assertEqual(int(state.num_free_pages), 5)
        held = np.asarray(state.page_table)[[0, 0, 1], [0, 1, 0]]
        self.assertEqual(len(set(held.tolist())), 3)
        np.testing.assert_array_equal(np.asarray(state.refcount)[held], 1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_release_returns_pages(self):
        state, _ = sj.allocate(sj.init_state(CFG), ids(0, 1), ids(9, 4))
        state, status = self.variant(sj.release)(state, ids(0))
        self.assertTrue(bool(sj.ok(status)))
        self.assertEqual(int(state.num_free_pages), 7)
        self.assertFalse(bool(state.active[0]))
        np.testing.assert_array_equal(state.page_table[0], -1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fork_shares_full_pages_and_copies_partial(self):
        state, _ = sj.allocate(sj.init_state(CFG), ids(0), ids(6))
        state, status, copies = self.variant(sj.fork)(state, ids(0), ids(2))
        self.assertTrue(bool(sj.ok(status)))
        t = np.asarray(state.page_table)
        self.assertEqual(t[2, 0], t[0, 0])  # full page shared
        self.assertNotEqual(t[2, 1], t[0, 1])  # partial page copied
        np.testing.assert_array_equal(copies, [[t[0, 1], t[2, 1]]])
        self.assertEqual(int(state.refcount[t[0, 0]]), 2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_truncate_frees_tail(self):
        state, _ = sj.allocate(sj.init_state(CFG), ids(0), ids(13))
        state, status, copies = self.variant(sj.truncate)(state, ids(0), ids(5))
        self.assertTrue(bool(sj.ok(status)))
        np.testing.assert_array_equal(copies, [[-1, -1]])
        self.assertEqual(int(state.seq_lens[0]), 5)
        self.assertEqual(int(state.num_free_pages), 6)


# ----------------------------------------------------------------------------- seqattn's bugs


def _write_tokens(state, kv, seq_ids, new_lens, values, max_tokens):
    """Pack this step's tokens and write `values` (one scalar per token row) as their K and V."""
    packed = sj.pack_for_flashinfer(state, seq_ids, new_lens, max_tokens=max_tokens)
    x = jnp.broadcast_to(values[:, None, None], (max_tokens, CFG.num_kv_heads, CFG.head_dim))
    return sj.append_kv(CFG, kv, x, x, packed), packed


def _read_seq(state, kv, slot):
    n = int(state.seq_lens[slot])
    pos = np.arange(n)
    pages = np.asarray(state.page_table)[slot, pos // CFG.page_size]
    return np.asarray(kv)[pages, 0, pos % CFG.page_size, 0, 0]


def test_seqattn_bug_append_positions_follow_cached_tokens():
    """seqattn passed append lengths where FlashInfer wants lengths after the append, so every decode
    step and every chunk after the first overwrote the start of the sequence."""
    state, kv = sj.init_state(CFG), sj.init_kv(CFG)
    state, _ = sj.allocate(state, ids(0), ids(3))  # prefill chunk 1: tokens 1, 2, 3
    kv, _ = _write_tokens(state, kv, ids(0), ids(3), jnp.array([1.0, 2, 3, 0]), 4)
    state, _ = sj.allocate(state, ids(0), ids(3))  # chunk 2: tokens 4, 5, 6
    kv, packed = _write_tokens(state, kv, ids(0), ids(3), jnp.array([4.0, 5, 6, 0]), 4)
    np.testing.assert_array_equal(packed.positions, [3, 4, 5, -1])
    state, _ = sj.allocate_decoding(state, ids(0))  # decode: token 7
    kv, packed = _write_tokens(state, kv, ids(0), None, jnp.array([7.0]), 1)
    np.testing.assert_array_equal(packed.positions, [6])
    np.testing.assert_array_equal(_read_seq(state, kv, 0), [1, 2, 3, 4, 5, 6, 7])


def test_seqattn_bug_failed_allocate_decoding_leaves_lengths():
    """seqattn changed last_page_len before failing for lack of pages, and changed earlier sequences
    before a KeyError on a later unknown id."""
    state, _ = sj.allocate(sj.init_state(CFG), ids(0, 1, 2), ids(7, 8, 16))  # all 8 pages held
    before = state
    state, status = sj.allocate_decoding(state, ids(0, 1))  # 0 fits its page (7 -> 8); 1 needs a page
    assert not bool(sj.ok(status))
    np.testing.assert_array_equal(status, [Status.OK, Status.OUT_OF_PAGES])
    assert_same_state(state, before)  # 0's length and last_page_len did not move either
    state, _ = sj.allocate(sj.init_state(CFG), ids(0), ids(5))
    before = state
    state, status = sj.allocate_decoding(state, ids(0, 3))  # slot 3 holds no sequence
    np.testing.assert_array_equal(status, [Status.OK, Status.INACTIVE])
    assert_same_state(state, before)


def test_seqattn_bug_double_release_never_goes_negative():
    """seqattn's release_pages twice drove a refcount to -1."""
    state, _ = sj.allocate(sj.init_state(CFG), ids(0), ids(5))
    state, status = sj.release(state, ids(0))
    assert bool(sj.ok(status))
    again, status = sj.release(state, ids(0))
    np.testing.assert_array_equal(status, [Status.INACTIVE])
    assert_same_state(again, state)
    both, status = sj.release(sj.allocate(sj.init_state(CFG), ids(0), ids(5))[0], ids(0, 0))
    np.testing.assert_array_equal(status, [Status.DUPLICATE] * 2)  # the same slot twice in one call
    assert int(jnp.min(both.refcount)) >= 0
    _, status = sj.unref(state, ids(0))  # unref of a free page
    np.testing.assert_array_equal(status, [Status.FREE_PAGE])


def test_seqattn_bug_ref_of_free_page_refused():
    """seqattn's ref() of a free page left it in the free list, later handed out with refcount 2."""
    state = sj.init_state(CFG)
    after, status = sj.ref(state, ids(3))
    np.testing.assert_array_equal(status, [Status.FREE_PAGE])
    assert_same_state(after, state)
    state, _ = sj.allocate(state, ids(0, 1, 2), ids(4, 4, 4))
    assert sorted(np.asarray(state.refcount).tolist()) == [0] * 5 + [1] * 3


def test_seqattn_bug_duplicate_ids_rejected():
    """seqattn computed duplicate ids in one allocate call from the old state."""
    state = sj.init_state(CFG)
    after, status = sj.allocate(state, ids(1, 1), ids(3, 3))
    np.testing.assert_array_equal(status, [Status.DUPLICATE] * 2)
    assert_same_state(after, state)


def test_seqattn_bug_head_ids_unique_for_any_head_count():
    """seqattn's HeadIDGenerator(6) mapped different (seq, head) pairs to one id."""
    for heads in (1, 3, 6, 7, 12):
        gen = sj.HeadIDGenerator(heads)
        got = {gen.get_head_id(s, h) for s in range(50) for h in range(heads)}
        assert len(got) == 50 * heads
        for s, h in [(0, 0), (7, heads - 1), (49, heads // 2)]:
            assert gen.get_seq_and_head(gen.get_head_id(s, h)) == (s, h)
        arr = gen.head_ids_for(jnp.arange(50))
        seq, head = sj.split_head_ids(arr, heads)
        np.testing.assert_array_equal(seq, np.repeat(np.arange(50)[:, None], heads, 1))
        np.testing.assert_array_equal(head, np.tile(np.arange(heads), (50, 1)))
    with pytest.raises(ValueError, match="head_idx"):
        sj.HeadIDGenerator(6).get_head_id(0, 6)
    with pytest.raises(ValueError, match="fit int32"):
        sj.HeadIDGenerator(1 << 16, max_seqs=1 << 16)


def test_seqattn_bug_shared_partial_page_is_never_written():
    """seqattn let two sequences share a partly filled page, then wrote one's tokens into the other's."""
    state, kv = sj.init_state(CFG), sj.init_kv(CFG)
    state, _ = sj.allocate(state, ids(0), ids(6))  # a full page + 2 tokens
    kv, _ = _write_tokens(state, kv, ids(0), ids(6), jnp.arange(1.0, 7.0), 6)
    state, _, copies = sj.fork(state, ids(0), ids(1))
    kv = sj.copy_pages(CFG, kv, copies)
    state, _ = sj.allocate_decoding(state, ids(0, 1))
    kv, _ = _write_tokens(state, kv, ids(0, 1), None, jnp.array([100.0, 200.0]), 2)
    np.testing.assert_array_equal(_read_seq(state, kv, 0), [1, 2, 3, 4, 5, 6, 100])
    np.testing.assert_array_equal(_read_seq(state, kv, 1), [1, 2, 3, 4, 5, 6, 200])
    # A page a request shares through `ref` is never a partly filled one.
    t = np.asarray(state.page_table)
    _, status = sj.ref(state, ids(t[0, 1]))
    np.testing.assert_array_equal(status, [Status.PARTIAL_PAGE])
    _, status = sj.share_prefix(state, ids(2), jnp.array([[t[0, 1]]]), ids(4))
    np.testing.assert_array_equal(status, [Status.PARTIAL_PAGE])
    # Truncating into a shared full page copies it before the next write.
    state, _ = sj.release(state, ids(1))
    state, status = sj.share_prefix(state, ids(2), jnp.array([[t[0, 0]]]), ids(4))
    assert bool(sj.ok(status))
    state, _, copies = sj.truncate(state, ids(2), ids(2))
    assert int(copies[0, 0]) == t[0, 0] and int(copies[0, 1]) != t[0, 0]
    kv = sj.copy_pages(CFG, kv, copies)
    state, _ = sj.allocate_decoding(state, ids(2))
    kv, _ = _write_tokens(state, kv, ids(2), None, jnp.array([300.0]), 1)
    np.testing.assert_array_equal(_read_seq(state, kv, 2), [1, 2, 300])
    np.testing.assert_array_equal(_read_seq(state, kv, 0), [1, 2, 3, 4, 5, 6, 100])


def test_seqattn_bug_import_needs_no_torch_or_flashinfer():
    """`import seqattn` failed without FlashInfer, even for the allocator."""
    code = ("import sys, seqattn_jax, seqattn_jax.checked, seqattn_jax.reference, seqattn_jax.attention;"
            "bad = [m for m in ('torch', 'flashinfer', 'flax', 'seqattn_jax.bridge') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_seqattn_bug_decode_step_compiles_once():
    """seqattn looped over pages in Python every step; ours is one jitted program whose shapes do
    not depend on lengths, so it traces once as sequences grow and cross pages."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, seq_ids):
        state, status = sj.allocate_decoding(state, seq_ids)
        return state, sj.ok(status), sj.pack_for_flashinfer(state, seq_ids)

    state, _ = sj.allocate(sj.init_state(CFG), ids(0, 1), ids(1, 5))
    for _ in range(6):
        state, ok, packed = step(state, ids(0, 1, -1))
        assert bool(ok)
    np.testing.assert_array_equal(packed.seq_lens, [7, 11, 0])


# ----------------------------------------------------------------------------- checked mode


def test_checked_mode_names_the_slot():
    state = checked.allocate(sj.init_state(CFG), ids(0), ids(5))
    with pytest.raises(sj.AllocatorError, match=r"request 1 \(id 2\): the slot holds no sequence \(INACTIVE\)"):
        checked.allocate_decoding(state, ids(0, 2))
    with pytest.raises(ValueError, match=r"OUT_OF_PAGES"):  # AllocatorError is a ValueError
        checked.allocate(state, ids(1, 2), ids(16, 16))
    with pytest.raises(sj.AllocatorError, match=r"request 0 \(id 0\): invalid length \(BAD_LENGTH\)"):
        checked.pack_for_flashinfer(state, ids(0), ids(9), max_tokens=16)
    with pytest.raises(sj.AllocatorError) as e:  # every failing request is named, not only the first
        checked.allocate(state, ids(1, 0, 2, 1), ids(1, 1, 1, 1))
    assert [(i, sid, code) for i, sid, code in e.value.failures] == [
        (0, 1, Status.DUPLICATE), (3, 1, Status.DUPLICATE)]
    state2, copies = checked.fork(state, ids(0), ids(3))
    assert int(state2.seq_lens[3]) == 5 and copies.shape == (1, 2)


def test_checked_status_inside_user_jit():
    @jax.jit
    @checkify.checkify
    def f(state, seq_ids):
        state, status = sj.allocate_decoding(state, seq_ids)
        checked.check_status("my_step", status, seq_ids)
        return state

    err, _ = f(sj.init_state(CFG), ids(1))
    with pytest.raises(checkify.JaxRuntimeError, match="my_step: the slot holds no sequence"):
        err.throw()


# ----------------------------------------------------------------------------- bad input


class BadInputTest(parameterized.TestCase):
    @parameterized.parameters(
        dict(kw=dict(num_pages=0), match="num_pages must be a positive int"),
        dict(kw=dict(page_size=2.5), match="page_size must be a positive int"),
        dict(kw=dict(kv_layout="NDH"), match="kv_layout must be one of"),
        dict(kw=dict(dtype="int8"), match="dtype must be one of"),
        dict(kw=dict(max_pages_per_seq=99), match="max_pages_per_seq"),
    )
    def test_config(self, kw, match):
        base = dict(num_pages=8, page_size=4, num_kv_heads=2, head_dim=4, max_seqs=4, max_pages_per_seq=4)
        with pytest.raises(ValueError, match=match):
            sj.CacheConfig(**{**base, **kw})

    def test_config_is_static_and_hashable(self):
        a = sj.CacheConfig(8, 4, 2, 4, 4, 4, dtype=jnp.bfloat16)
        b = sj.CacheConfig(8, 4, 2, 4, 4, 4, dtype="bfloat16")
        assert a == b and hash(a) == hash(b) and a.dtype == "bfloat16"
        assert jax.tree_util.tree_leaves(sj.init_state(a))  # config is metadata, arrays are leaves
        assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(sj.init_state(a)))

    def test_op_arguments(self):
        state = sj.init_state(CFG)
        with pytest.raises(ValueError, match="seq_ids must be a rank-1 integer array"):
            sj.allocate(state, jnp.zeros((2, 2), jnp.int32), ids(1, 1))
        with pytest.raises(ValueError, match="must have an integer dtype"):
            sj.allocate(state, jnp.array([0.0]), ids(1))
        with pytest.raises(ValueError, match="new_lens must have the shape of seq_ids"):
            sj.allocate(state, ids(0, 1), ids(1))
        with pytest.raises(ValueError, match="state must be a CacheState"):
            sj.release({"refcount": 1}, ids(0))
        with pytest.raises(ValueError, match="page_ids must be"):
            sj.share_prefix(state, ids(0), ids(0), ids(0))
        with pytest.raises(ValueError, match="max_tokens .* is required"):
            sj.pack_for_flashinfer(state, ids(0), ids(1))

    def test_ids_out_of_range_are_reported(self):
        state = sj.init_state(CFG)
        _, status = sj.allocate(state, ids(0, 4, 1000), ids(1, 1, 1))
        np.testing.assert_array_equal(status, [0, Status.BAD_SLOT, Status.BAD_SLOT])
        _, status = sj.ref(state, ids(8))
        np.testing.assert_array_equal(status, [Status.BAD_PAGE])
        _, status = sj.allocate(state, ids(0), ids(17))
        np.testing.assert_array_equal(status, [Status.TOO_LONG])
