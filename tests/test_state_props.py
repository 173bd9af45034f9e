"""Random operation sequences against the plain-Python allocator model (tests/allocator_model.py).

Every step runs one op on both, compares the per-request statuses, then checks every invariant of
DESIGN.md on the JAX state: refcounts equal page-table + external references, free pages are in no
table, lengths and last_page_len agree with the pages held, and the K/V actually written through
`pack_for_flashinfer` + `append_kv` (and copied by `copy_pages`) read back, for every sequence, as
exactly the tokens the model says it holds — so no write ever reached another sequence's page.
"""

from __future__ import annotations

import functools
import os

import hypothesis.strategies as hst
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import seqattn_jax as sj
from seqattn_jax import state as st
from tests.allocator_model import AllocatorModel

P, PS, S, M, L, B, K = 12, 3, 6, 5, 2, 3, 3
CFG = sj.CacheConfig(num_pages=P, page_size=PS, num_kv_heads=1, head_dim=1, max_seqs=S,
                     max_pages_per_seq=M, num_layers=L, dtype="float32")
MAX_NEW = 4
T = B * MAX_NEW

_allocate = jax.jit(st.allocate)
_decode = jax.jit(st.allocate_decoding)
_release = jax.jit(st.release)
_truncate = jax.jit(st.truncate)
_fork = jax.jit(st.fork)
_share = jax.jit(st.share_prefix)
_ref = jax.jit(st.ref)
_unref = jax.jit(st.unref)
_copy = jax.jit(functools.partial(sj.copy_pages, CFG), donate_argnums=0)
# The invariant packs every slot after every step: compiled once here (eager, it dispatched each op).
_pack_all = jax.jit(lambda state: sj.pack_for_flashinfer(state, jnp.arange(S, dtype=jnp.int32)))


@functools.partial(jax.jit, donate_argnums=1)
def _write(state, kv, ids, new_lens, values):
    """Pack the step's new tokens and write value v as K = v, V = 10 v in layer 0, and -v, -10 v in layer 1."""
    packed = sj.pack_for_flashinfer(state, ids, new_lens, max_tokens=T)
    k = values[:, None, None]
    kv = sj.append_kv(CFG, kv, k, 10 * k, packed, layer=0)
    return sj.append_kv(CFG, kv, -k, -10 * k, packed, layer=1), packed


class AllocatorMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.model = AllocatorModel(P, PS, S, M)
        self.state = sj.init_state(CFG)
        self.kv = jnp.full(CFG.kv_shape, jnp.nan, jnp.float32)  # unwritten = NaN
        self.bind: dict[int, int] = {}  # model page id -> JAX page id

    # -- binding model pages to JAX page ids
    def _sync(self):
        table = np.asarray(self.state.page_table)
        self.bind = {m: j for m, j in self.bind.items() if m in self.model.pages}
        taken = {j: m for m, j in self.bind.items()}
        for slot, seq in self.model.seqs.items():
            for col, mid in enumerate(seq.pages):
                jid = int(table[slot, col])
                assert 0 <= jid < P, (slot, col, jid)
                if mid in self.bind:
                    assert self.bind[mid] == jid, f"page of slot {slot} moved: {self.bind[mid]} -> {jid}"
                else:
                    assert jid not in taken, f"JAX page {jid} given to two model pages"
                    self.bind[mid] = jid
                    taken[jid] = mid

    def _check_status(self, got, want):
        assert [int(x) for x in np.asarray(got)] == [int(x) for x in want], (got, want)

    def _check_copies(self, ids, copies, model_copies):
        copies = np.asarray(copies)
        for k, i in enumerate(ids):
            if i in model_copies:
                src, dst = model_copies[i]
                assert tuple(copies[k]) == (self.bind.get(src, copies[k][0]), self.bind[dst])
            else:
                assert tuple(copies[k]) == (-1, -1)

    # -- drawing mostly-valid requests (random ids would almost always fail the whole call)
    def _draw_ids(self, data, want_active):
        """B ids: mostly distinct slots that are active (want_active=True), inactive (False) or
        either (None); sometimes padding (-1), an out-of-range id, or a duplicate."""
        ids = []
        for _ in range(B):
            kind = data.draw(hst.sampled_from(["good"] * 24 + ["pad", "bad", "dup", "any"]))
            pool = [s for s in range(S) if s not in ids and (
                want_active is None or (s in self.model.seqs) == want_active)]
            if kind == "good" and pool:
                ids.append(data.draw(hst.sampled_from(pool)))
            elif kind == "dup" and any(i >= 0 for i in ids):
                ids.append(data.draw(hst.sampled_from([i for i in ids if i >= 0])))
            elif kind == "bad":
                ids.append(S)
            elif kind == "any":
                ids.append(data.draw(hst.integers(0, S - 1)))
            else:
                ids.append(-1)
        return ids

    # -- rules
    @rule(data=hst.data())
    def allocate(self, data):
        ids = self._draw_ids(data, None)
        lens = [data.draw(hst.integers(-1, MAX_NEW).filter(lambda n: n >= 0 or data.draw(hst.booleans())))
                for _ in ids]
        want, written = self.model.allocate(ids, lens)
        self._apply_extend(_allocate(self.state, jnp.array(ids), jnp.array(lens)), ids, lens, want,
                           written)

    @rule(data=hst.data())
    def allocate_decoding(self, data):
        ids = self._draw_ids(data, True)
        want, written = self.model.allocate(ids, [1] * B, decoding=True)
        self._apply_extend(_decode(self.state, jnp.array(ids)), ids, [1] * B, want, written)

    def _apply_extend(self, result, ids, lens, want, written):
        new_state, status = result
        self._check_status(status, want)
        self.state = new_state
        if all(w == 0 for w in want):
            vals = [v for i in ids if i >= 0 for v in written[i]]
            vals += [0.0] * (T - len(vals))
            self.kv, packed = _write(self.state, self.kv, jnp.array(ids), jnp.array(lens),
                                     jnp.array(vals, jnp.float32))
            assert int(packed.qo_indptr[-1]) == sum(len(written[i]) for i in ids if i >= 0)
        self._sync()

    @rule(data=hst.data())
    def release(self, data):
        ids = self._draw_ids(data, True)
        want = self.model.release(ids)
        self.state, status = _release(self.state, jnp.array(ids))
        self._check_status(status, want)
        self._sync()

    @rule(data=hst.data())
    def truncate(self, data):
        ids = self._draw_ids(data, True)
        lens = []
        for i in ids:
            n = self.model.seqs[i].length if i in self.model.seqs else 2
            lens.append(data.draw(hst.sampled_from([-1, n + 1] + list(range(n + 1)) * 3)))
        bound_before = dict(self.bind)
        want, model_copies = self.model.truncate(ids, lens)
        self.state, status, copies = _truncate(self.state, jnp.array(ids), jnp.array(lens))
        self._apply_copies(status, want, ids, copies, model_copies, bound_before)

    @rule(data=hst.data())
    def fork(self, data):
        active = sorted(self.model.seqs)
        src = [data.draw(hst.sampled_from(active)) if active and data.draw(hst.integers(0, 9)) else
               data.draw(hst.integers(-1, S)) for _ in range(B)]
        dst = self._draw_ids(data, False)
        # A pair with one negative id is an error (BAD_SLOT); make most padding pairs whole.
        src = [-1 if d < 0 and data.draw(hst.integers(0, 9)) else s for s, d in zip(src, dst)]
        bound_before = dict(self.bind)
        want, model_copies = self.model.fork(src, dst)
        self.state, status, copies = _fork(self.state, jnp.array(src), jnp.array(dst))
        self._apply_copies(status, want, dst, copies, model_copies, bound_before)

    def _apply_copies(self, status, want, ids, copies, model_copies, bound_before):
        """Check statuses and the copy-on-write list, then copy the pages in the pool. A shared page
        freed by this very call keeps its binding until the copies are checked."""
        self._check_status(status, want)
        self._sync()
        self.bind.update({m: j for m, j in bound_before.items() if m not in self.bind})
        self._check_copies(ids, copies, model_copies)
        self.kv = _copy(self.kv, copies)
        self._sync()

    def _draw_page(self, data, full_only=False):
        """A model page id (bound to a JAX page; a sequence's partly filled last page only now and
        then when full_only), or a marker for an invalid / free JAX page, or padding."""
        partial = self.model.partial_last_pages()
        full = sorted((m, j) for m, j in self.bind.items() if m not in partial)
        part = sorted((m, j) for m, j in self.bind.items() if m in partial)
        free = sorted(set(range(P)) - set(self.bind.values()))
        kinds = ["full"] * 12 + ["partial"] * (1 if full_only else 4) + ["bad", "free", "pad"]
        kind = data.draw(hst.sampled_from(kinds))
        if kind == "full" and full:
            return data.draw(hst.sampled_from(full))[0], None
        if kind == "partial" and part:
            return data.draw(hst.sampled_from(part))[0], None
        if kind == "free" and free:
            j = data.draw(hst.sampled_from(free))
            return ("free", j), j
        if kind == "bad":
            j = data.draw(hst.sampled_from([P, P + 3]))
            return ("bad", j), j
        return None, -1

    def _jax_ids(self, picks):
        return jnp.array([self.bind[m] if j is None else j for m, j in picks], jnp.int32)

    @rule(data=hst.data())
    def ref(self, data):
        picks = [self._draw_page(data) for _ in range(K)]
        want = self.model.ref([m for m, _ in picks])
        self.state, status = _ref(self.state, self._jax_ids(picks))
        self._check_status(status, want)

    @rule(data=hst.data())
    def unref(self, data):
        picks = [self._draw_page(data) for _ in range(K)]
        jids = self._jax_ids(picks)
        want = self.model.unref([m for m, _ in picks])
        self.state, status = _unref(self.state, jids)
        self._check_status(status, want)
        self._sync()

    @rule(data=hst.data())
    def share_prefix(self, data):
        ids = self._draw_ids(data, False)
        rows, jrows = [], []
        for _ in range(B):
            # Mostly full pages (a valid prefix), sometimes a sequence's partly filled last page.
            picks = [self._draw_page(data, full_only=data.draw(hst.integers(0, 3)) > 0)
                     for _ in range(K)]
            picks = [(m, j) if m is not None else (("bad", -1), -1) for m, j in picks]
            rows.append([m for m, _ in picks])
            jrows.append(self._jax_ids(picks))
        ntoks = [data.draw(hst.sampled_from([0, PS, PS, 2 * PS, 2 * PS, 3 * PS, 4 * PS, 2, -PS]))
                 for _ in ids]
        want = self.model.share_prefix(ids, rows, ntoks, K)
        self.state, status = _share(self.state, jnp.array(ids), jnp.stack(jrows), jnp.array(ntoks))
        self._check_status(status, want)
        self._sync()

    # -- invariants, after every step
    @invariant()
    def refcounts_tables_and_contents(self):
        if not hasattr(self, "model"):
            return
        rc = np.asarray(self.state.refcount)
        table = np.asarray(self.state.page_table)
        lens = np.asarray(self.state.seq_lens)
        active = np.asarray(self.state.active)
        want_rc = np.zeros(P, int)
        for mid, page in self.model.pages.items():
            want_rc[self.bind[mid]] = page.rc
        np.testing.assert_array_equal(rc, want_rc)
        in_tables = np.zeros(P, int)
        for slot in range(S):
            seq = self.model.seqs.get(slot)
            assert bool(active[slot]) == (seq is not None)
            n = self.model.pages_for(seq.length) if seq else 0
            assert lens[slot] == (seq.length if seq else 0)
            assert list(table[slot, :n]) == [self.bind[m] for m in seq.pages] if seq else True
            assert (table[slot, n:] == -1).all()
            np.add.at(in_tables, table[slot, :n], 1)  # a page may appear twice in one row
        ext = np.zeros(P, int)
        for mid, c in self.model.ext.items():
            ext[self.bind[mid]] = c
        np.testing.assert_array_equal(rc, in_tables + ext)  # refcount = table refs + external refs
        assert int(self.state.num_free_pages) == self.model.num_free()
        # The free stack holds exactly the free pages, each once.
        stack = np.asarray(self.state.free_pages)[: int(self.state.num_free)]
        assert sorted(stack.tolist()) == np.flatnonzero(rc == 0).tolist()
        # last_page_len agrees with the pages held, for every active slot.
        packed = _pack_all(self.state)
        lpl = np.asarray(packed.kv_last_page_len)
        indptr = np.asarray(packed.kv_page_indptr)
        for slot in range(S):
            n = indptr[slot + 1] - indptr[slot]
            if lens[slot] > 0:
                assert 0 < lpl[slot] <= PS and (n - 1) * PS + lpl[slot] == lens[slot]
            else:
                assert lpl[slot] == 0 and n == 0
        # Every sequence reads back exactly its own tokens, in both layers, K and V.
        kv = np.asarray(self.kv)
        for slot, seq in self.model.seqs.items():
            want = np.array(self.model.tokens(slot), np.float32)
            pos = np.arange(seq.length)
            pages = table[slot, pos // PS]
            got = kv[pages, 0, pos % PS, 0, 0]
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(kv[pages, 1, pos % PS, 0, 0], 10 * want)
            np.testing.assert_array_equal(kv[pages + P, 0, pos % PS, 0, 0], -want)


def _machine_test(max_examples: int):
    """A unittest TestCase running `max_examples` random sequences of up to 12 ops (derandomized:
    the same sequences every run)."""

    class Case(AllocatorMachine.TestCase):
        settings = settings(max_examples=max_examples, stateful_step_count=12, deadline=None,
                            derandomize=True, suppress_health_check=list(HealthCheck))

    return Case


# The default run: 30 sequences (~5 s on a 2-core CPU). The full 1000 (~40 s there) are `slow`:
# SEQATTN_SLOW=1 (as .ci/run sets) or `-m slow`; SEQATTN_PROP_EXAMPLES=N changes their count.
TestAllocatorAgainstModel = _machine_test(30)
TestAllocatorAgainstModelLong = pytest.mark.slow(
    _machine_test(int(os.environ.get("SEQATTN_PROP_EXAMPLES", 1000))))
