"""A plain-Python model of the page allocator: the oracle for tests/test_state_props.py.

It knows nothing of JAX page ids: its pages are its own objects, each with a refcount and the token
values written into it. After every operation the test binds the model's pages to the JAX state's page
ids (a bijection that must stay consistent) and checks refcounts, page tables, lengths and the KV
contents against the model. Predictions follow the rules in seqattn_jax/state.py's docstrings.
"""

from __future__ import annotations

import dataclasses
import itertools

from seqattn_jax.state import Status

OK = Status.OK


@dataclasses.dataclass
class Page:
    rc: int
    content: list  # page_size token values; None where nothing was written


@dataclasses.dataclass
class Seq:
    pages: list  # model page ids
    length: int


class AllocatorModel:
    def __init__(self, num_pages, page_size, max_seqs, max_pages_per_seq):
        self.P, self.ps, self.S, self.M = num_pages, page_size, max_seqs, max_pages_per_seq
        self.pages: dict[int, Page] = {}
        self.seqs: dict[int, Seq] = {}
        self.ext: dict[int, int] = {}  # model page id -> external refs (from `ref`)
        self._ids = itertools.count()
        self._tokens = itertools.count(1)

    # -- helpers
    def pages_for(self, n):
        return -(-n // self.ps)

    def num_free(self):
        return self.P - len(self.pages)

    def _new_page(self):
        mid = next(self._ids)
        self.pages[mid] = Page(rc=1, content=[None] * self.ps)
        return mid

    def _decref(self, mid):
        self.pages[mid].rc -= 1
        if self.pages[mid].rc == 0:
            del self.pages[mid]

    def _write(self, slot, n):
        """Append n fresh token values to seq `slot` (its pages already hold room)."""
        seq = self.seqs[slot]
        values = []
        for pos in range(seq.length, seq.length + n):
            page = self.pages[seq.pages[pos // self.ps]]
            assert page.rc == 1, "a shared page would be written"
            v = float(next(self._tokens))
            page.content[pos % self.ps] = v
            values.append(v)
        seq.length += n
        return values

    def tokens(self, slot):
        seq = self.seqs[slot]
        return [self.pages[seq.pages[p // self.ps]].content[p % self.ps] for p in range(seq.length)]

    @staticmethod
    def _dups(ids):
        valid = [i for i in ids if 0 <= i]
        return {i for i in valid if valid.count(i) > 1}

    def _slot_pre(self, ids, S=None):
        S = self.S if S is None else S
        dups = self._dups([i for i in ids if i < S])
        out = []
        for i in ids:
            if i < 0:
                out.append(None)  # padding
            elif i >= S:
                out.append(Status.BAD_SLOT)
            elif i in dups:
                out.append(Status.DUPLICATE)
            else:
                out.append(OK)
        return out

    @staticmethod
    def _grant_order(status, need, free):
        """OUT_OF_PAGES for requests whose cumulative need (in request order) exceeds `free`."""
        total = 0
        for k, n in enumerate(need):
            if status[k] == OK and n > 0:
                total += n
                if total > free:
                    status[k] = Status.OUT_OF_PAGES
        return status

    @staticmethod
    def _final(status):
        return [OK if s is None else s for s in status]

    # -- operations: each returns (statuses, extra) and applies itself only when all are OK
    def allocate(self, ids, lens, *, decoding=False):
        status = self._slot_pre(ids)
        need = [0] * len(ids)
        for k, (i, n) in enumerate(zip(ids, lens)):
            if status[k] != OK:
                continue
            if n < 0:
                status[k] = Status.BAD_LENGTH
                continue
            active = i in self.seqs
            if decoding and not active:
                status[k] = Status.INACTIVE
                continue
            old = self.seqs[i].length if active else 0
            if self.pages_for(old + n) > self.M:
                status[k] = Status.TOO_LONG
                continue
            need[k] = self.pages_for(old + n) - self.pages_for(old)
        status = self._final(self._grant_order(status, need, self.num_free()))
        written = {}
        if all(s == OK for s in status):
            for i, n in zip(ids, lens):
                if i < 0:
                    continue
                seq = self.seqs.setdefault(i, Seq(pages=[], length=0))
                while len(seq.pages) < self.pages_for(seq.length + n):
                    seq.pages.append(self._new_page())
                written[i] = self._write(i, n)
        return status, written

    def release(self, ids):
        status = self._slot_pre(ids)
        for k, i in enumerate(ids):
            if status[k] == OK and i not in self.seqs:
                status[k] = Status.INACTIVE
        status = self._final(status)
        if all(s == OK for s in status):
            for i in ids:
                if i >= 0:
                    for mid in self.seqs.pop(i).pages:
                        self._decref(mid)
        return status

    def truncate(self, ids, lens):
        status = self._slot_pre(ids)
        need = [0] * len(ids)
        for k, (i, n) in enumerate(zip(ids, lens)):
            if status[k] != OK:
                continue
            if i not in self.seqs:
                status[k] = Status.INACTIVE
                continue
            if n < 0 or n > self.seqs[i].length:
                status[k] = Status.BAD_LENGTH
                continue
            keep = self.pages_for(n)
            if n % self.ps and keep > 0 and self.pages[self.seqs[i].pages[keep - 1]].rc > 1:
                need[k] = 1
        status = self._final(self._grant_order(status, need, self.num_free()))
        copies = {}
        if all(s == OK for s in status):
            for k, (i, n) in enumerate(zip(ids, lens)):
                if i < 0:
                    continue
                seq = self.seqs[i]
                keep = self.pages_for(n)
                for mid in seq.pages[keep:]:
                    self._decref(mid)
                seq.pages = seq.pages[:keep]
                seq.length = n
                if need[k]:
                    shared = seq.pages[-1]
                    fresh = self._new_page()
                    self.pages[fresh].content = list(self.pages[shared].content)
                    seq.pages[-1] = fresh
                    self._decref(shared)
                    copies[i] = (shared, fresh)
        return status, copies

    def fork(self, src, dst):
        status = []
        dups = self._dups([d for d in dst if 0 <= d < self.S])
        need = []
        for s, d in zip(src, dst):
            if s < 0 and d < 0:
                status.append(None)
                need.append(0)
                continue
            if not (0 <= s < self.S and 0 <= d < self.S):
                status.append(Status.BAD_SLOT)
            elif d in dups:
                status.append(Status.DUPLICATE)
            elif s not in self.seqs:
                status.append(Status.INACTIVE)
            elif d in self.seqs:
                status.append(Status.ACTIVE)
            else:
                status.append(OK)
            need.append(1 if status[-1] == OK and self.seqs[s].length % self.ps else 0)
        status = self._final(self._grant_order(status, need, self.num_free()))
        copies = {}
        if all(x == OK for x in status):
            for (s, d), n in zip(zip(src, dst), need):
                if s < 0 and d < 0:
                    continue
                seq = self.seqs[s]
                full = seq.length // self.ps
                pages = list(seq.pages[:full])
                for mid in pages:
                    self.pages[mid].rc += 1
                if n:
                    fresh = self._new_page()
                    self.pages[fresh].content = list(self.pages[seq.pages[full]].content)
                    pages.append(fresh)
                    copies[d] = (seq.pages[full], fresh)
                self.seqs[d] = Seq(pages=pages, length=seq.length)
        return status, copies

    def share_prefix(self, ids, page_rows, ntoks, K):
        """page_rows: per request, a list of model page ids (or ('bad', jax_id) for invalid ones)."""
        status = self._slot_pre(ids)
        for k, (i, row, n) in enumerate(zip(ids, page_rows, ntoks)):
            if status[k] != OK:
                continue
            used = row[: max(n, 0) // self.ps]
            if i in self.seqs:
                status[k] = Status.ACTIVE
            elif n < 0 or n % self.ps or n // self.ps > min(K, self.M):
                status[k] = Status.BAD_LENGTH
            elif any(isinstance(m, tuple) and m[0] == "bad" for m in used):
                status[k] = Status.BAD_PAGE
            elif any(isinstance(m, tuple) and m[0] == "free" for m in used):
                status[k] = Status.FREE_PAGE
            elif any(m in self.partial_last_pages() for m in used):
                status[k] = Status.PARTIAL_PAGE
        status = self._final(status)
        if all(s == OK for s in status):
            for i, row, n in zip(ids, page_rows, ntoks):
                if i < 0:
                    continue
                used = list(row[: n // self.ps])
                for mid in used:
                    self.pages[mid].rc += 1
                self.seqs[i] = Seq(pages=used, length=n)
        return status

    def partial_last_pages(self):
        return {s.pages[-1] for s in self.seqs.values() if s.length % self.ps}

    def ref(self, mids):
        """mids: model page ids, or ('bad', id) / ('free', id) markers, or None for padding."""
        partial = self.partial_last_pages()
        status = []
        for m in mids:
            if m is None:
                status.append(OK)
            elif isinstance(m, tuple):
                status.append(Status.BAD_PAGE if m[0] == "bad" else Status.FREE_PAGE)
            elif m in partial:
                status.append(Status.PARTIAL_PAGE)
            else:
                status.append(OK)
        if all(s == OK for s in status):
            for m in mids:
                if m is not None:
                    self.pages[m].rc += 1
                    self.ext[m] = self.ext.get(m, 0) + 1
        return status

    def unref(self, mids):
        counts = {}
        for m in mids:
            if m is not None and not isinstance(m, tuple):
                counts[m] = counts.get(m, 0) + 1
        held = {}
        for s in self.seqs.values():
            for m in s.pages:
                held[m] = held.get(m, 0) + 1
        status = []
        for m in mids:
            if m is None:
                status.append(OK)
            elif isinstance(m, tuple):
                status.append(Status.BAD_PAGE if m[0] == "bad" else Status.FREE_PAGE)
            elif self.pages[m].rc - counts[m] < 0:
                status.append(Status.FREE_PAGE)
            elif self.pages[m].rc - counts[m] < held.get(m, 0):
                status.append(Status.PAGE_HELD)
            else:
                status.append(OK)
        if all(s == OK for s in status):
            for m in mids:
                if m is not None:
                    self.ext[m] -= 1
                    if self.ext[m] == 0:
                        del self.ext[m]
                    self._decref(m)
        return status
