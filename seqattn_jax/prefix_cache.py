"""Automatic prefix caching: requests whose prompts share a prefix share its KV pages.

A `PrefixCache` is a host-side index from token-id prefixes to full KV pages, plus one reference
(`state.ref`) on every page it indexes, so a page outlives the request that filled it. A new request
gets the longest cached prefix of its prompt shared into its page table (`state.share_prefix`) and
prefills only the rest; cached pages that no request holds are evicted in LRU order when an
allocation needs pages. The device state stays functional: every device change is a jitted pure
function of `CacheState` (all-or-nothing, like the core ops); only the index lives on the host.

    cache = PrefixCache(config)
    adm = cache.admit(state, slot, prompt, namespace="tenant-a")   # share + evict + allocate
    state = adm.state            # prefill prompt[adm.num_cached:] (positions num_cached ..)
    ...                          # write its K/V (append_kv), then:
    state = cache.insert_slots(state, [slot], [prompt], ["tenant-a"])
    ...
    state, status, kv = cache.release(state, [slot])  # the cache keeps the prompt's full pages

Design: an exact-key hash chain over full pages
-----------------------------------------------
Each cached page is a node keyed by `(parent, block)`: `block` is the tuple of the `page_size` token
ids the page holds and `parent` is the page id of the previous block's node, or, for a prompt's first
block, a root `("ns", type(namespace), namespace)`. Python dicts compare keys by equality, so unlike a
vLLM hash (`hash(parent_hash, tokens)`) a lookup can never return a page for different tokens: the
hash only picks the bucket. A lookup is one dict probe per page of the prompt (O(prompt length)), the
same cost as walking a radix tree, with a flat structure that needs no node splitting because pages
are the unit of sharing anyway (a radix tree's sub-page edges could not be shared: only full pages
can, `share_prefix` takes nothing else). The chain is a tree: a node's children are the blocks that
followed it in some prompt.

  * Only FULL pages are cached. A partly filled page is still written by its request, so it cannot
    be shared; the next token of a sequence that starts on shared pages goes to a fresh page.
  * A fully cached prompt still needs its last token computed (its logits start decoding), so
    `admit` shares at most `(len(prompt) - 1) // page_size` pages and prefills at least one token.
  * Parents are page ids, so a page may be evicted only when no cached child names it: eviction
    takes leaves only, and in a pass ordered by (last use, deeper first) a parent always comes after
    its children (every use touches the whole root-to-node path with one clock value, so
    `last_use[parent] >= last_use[child]`), so a single pass frees whole unused branches.
  * "Use" = a successful `admit` sharing the page, `match`, `insert`, and the `release` of a
    request holding it: a page is in use until its last request ends (vLLM's rule), so the prefix
    of a long-running request is not the first thing evicted when it finishes.
  * One page is cached under at most one key. When a prompt's block is already cached in another
    page (two requests prefilled the same prompt at once) the existing page stays the cached one, the
    request's copy is not cached (it is freed when its request ends) and the chain continues from the
    existing page: K/V of a block depend on the tokens before it, not on which pages held them. A
    page that is already cached under a different key stops the insertion there (that is misuse: the
    tokens given are not the ones the page holds).

Reference counting and eviction
-------------------------------
`refcount[p]` = page-table references + 1 if `p` is cached (the cache's own reference). A cached page
with `refcount == 1` is held by the cache alone: only those are evicted (`unref` drops the cache's
reference and the page is free). A page that any request holds (`refcount > 1`) is never evicted,
nor is a page `admit` is about to share. Eviction is lazy: `admit` and `make_room` evict only as many
pages as the allocation lacks; `evict` / `make_room` serve decode steps (`allocate_decoding` needs a
page whenever a sequence crosses a page boundary).

The cache owns its references: do not `unref` a cached page yourself (`check` reports a cache out
of sync with the state). Every call reads `state.refcount` (`num_pages` int32) and a few small status
arrays back to the host; none loops over the pool in Python (numpy does the selection).

Isolation guarantee
-------------------
  * Namespaces: a request's namespace (any hashable: tenant id, adapter id, None for the default) is
    part of the root key, hence of every key below it. A lookup in namespace A only ever returns
    pages inserted under A, so requests of different namespaces never share a page through the
    cache. Namespaces compare by type and value (`1`, `1.0` and `True` are three namespaces).
  * `scrub_on_free=True`: every page whose last reference is dropped by a method of this class
    (`evict`, `make_room`, the evictions of `admit`/`admit_batch`, `release`) has its K and V zeroed
    in every layer of the pool that the method returns, so no request is ever given a page that
    still holds another request's K/V (in `admit`, pages evicted to make room are zeroed even when
    the same call grants them to a new request). Those methods then require `kv=` and donate it
    (use the returned pool; a failed admission returns it unchanged). Pages freed by calling the core ops directly (`seqattn_jax.release`,
    `truncate`, `unref`) are not covered: scrub them with
    `kv.scrub_pages(config, kv, freed_pages(old_state, new_state))`.
  * With or without scrubbing, attention reads only positions `< seq_len`, which a request writes
    before it reads them; scrubbing is defence in depth (stale K/V never sits in a free page).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax.config import CacheConfig
from seqattn_jax.kv import scrub_pages
from seqattn_jax.state import CacheState, Status, allocate, check_state, ref, release, share_prefix, unref
from seqattn_jax.validation import check_config

__all__ = ["Admission", "EvictResult", "PrefixCache", "PrefixCacheStats", "freed_pages"]


def freed_pages(old: CacheState, new: CacheState) -> jax.Array:
    """bool [num_pages]: the pages that the call taking `old` to `new` freed (refcount went to 0)."""
    return (old.refcount > 0) & (new.refcount == 0)


# ----------------------------------------------------------------------------- device functions
# Each is jitted once per (config, input shapes): `admit_batch` / `insert_slots` pad their page ids to
# B * max_pages_per_seq (one program per batch size B), `evict` / `make_room` / `insert` to
# power-of-two buckets.


def _slot_rows(state, slots):
    slot = jnp.clip(slots, 0, state.config.max_seqs - 1)
    ok = (slots >= 0) & (slots < state.config.max_seqs)
    return (state.page_table[slot], jnp.where(ok, state.seq_lens[slot], 0),
            ok & state.active[slot])


def _select(apply, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(apply, a, b), new, old)


def _admit_body(state, evict_ids, slots, prefix_pages, prefix_tokens, new_tokens):
    """unref(evict_ids); share_prefix(slots, prefix); allocate(slots, rest) — all or nothing."""
    st1, ev_status = unref(state, evict_ids)
    st2, share_status = share_prefix(st1, slots, prefix_pages, prefix_tokens)
    st3, alloc_status = allocate(st2, slots, new_tokens)
    status = jnp.where(share_status != Status.OK, share_status, alloc_status)
    apply = jnp.all(ev_status == Status.OK) & jnp.all(status == Status.OK)
    # Freed by the evictions, before the allocation may hand the same pages out again.
    freed = freed_pages(state, st1) & apply
    return _select(apply, st3, state), status, ev_status, freed


def _admit_scrub_body(state, kv, *args):
    state, status, ev_status, freed = _admit_body(state, *args)
    return state, status, ev_status, scrub_pages(state.config, kv, freed)


def _evict_body(state, page_ids):
    new, status = unref(state, page_ids)
    return new, status, freed_pages(state, new)


def _evict_scrub_body(state, kv, page_ids):
    new, status, freed = _evict_body(state, page_ids)
    return new, status, scrub_pages(state.config, kv, freed)


def _release_body(state, slots):
    rows = _slot_rows(state, slots)[0]  # the released pages, for the LRU clock
    new, status = release(state, slots)
    return new, status, freed_pages(state, new), rows


def _release_scrub_body(state, kv, slots):
    new, status, freed, rows = _release_body(state, slots)
    return new, status, scrub_pages(state.config, kv, freed), rows


_admit_jit = jax.jit(_admit_body)
_admit_scrub_jit = jax.jit(_admit_scrub_body, donate_argnums=1)
_evict_jit = jax.jit(_evict_body)
_evict_scrub_jit = jax.jit(_evict_scrub_body, donate_argnums=1)
_release_jit = jax.jit(_release_body)
_release_scrub_jit = jax.jit(_release_scrub_body, donate_argnums=1)
_ref_jit = jax.jit(ref)
_slot_rows_jit = jax.jit(_slot_rows)


def _bucket(n: int) -> int:
    """Padded length for n ids: a power of two >= 8, so a handful of shapes cover every call."""
    return max(8, 1 << max(0, n - 1).bit_length())


def _padded(ids, n: int | None = None) -> np.ndarray:
    ids = np.asarray(ids, np.int32).reshape(-1)
    out = np.full((_bucket(len(ids)) if n is None else n,), -1, np.int32)
    out[:len(ids)] = ids
    return out


# ----------------------------------------------------------------------------- results


class Admission(NamedTuple):
    """Result of `PrefixCache.admit` / `admit_batch`.

    Attributes:
      state: the new `CacheState` (the input state when the call failed).
      ok: bool: whether the call was applied. All-or-nothing like the core ops: if any request
        fails, nothing is applied (no sharing, no eviction, no allocation, no cache change) and
        `status` names each failing request (`status[i] != Status.OK`).
      num_cached: int (or int32 [B]) prompt tokens taken from the cache, a multiple of page_size;
        prefill positions `num_cached .. len(prompt) - 1`. 0 where nothing was applied.
      status: int32 [B] `Status` codes (OK = 0) of each request (one entry for `admit`).
      evicted: int32 [n] pages evicted from the cache to make room (empty on failure).
      kv: the (scrubbed) pool when `kv=` was given, else None.
    """

    state: CacheState
    ok: Any
    num_cached: Any
    status: np.ndarray
    evicted: np.ndarray
    kv: Any = None


class EvictResult(NamedTuple):
    """Result of `PrefixCache.evict` / `make_room`: the new state, the layer-0 page ids freed
    (int32 [n], in eviction order), and the (scrubbed) pool when `kv=` was given, else None."""

    state: CacheState
    freed: np.ndarray
    kv: Any = None


@dataclasses.dataclass
class PrefixCacheStats:
    """Counters over successful admissions and cache changes.

    Attributes:
      requests: admitted requests. hits: admitted requests that got >= 1 cached page.
      prompt_tokens / cached_tokens: prompt tokens admitted / of those, taken from the cache
        (the prefill tokens saved).
      inserted_pages, evicted_pages: pages that entered / left the cache.
      duplicate_pages: inserted blocks already cached in another page (kept uncached).
    """

    requests: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    inserted_pages: int = 0
    evicted_pages: int = 0
    duplicate_pages: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of admitted requests with a cache hit."""
        return self.hits / self.requests if self.requests else 0.0

    @property
    def token_hit_rate(self) -> float:
        """Fraction of admitted prompt tokens not prefilled (served from cached pages)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


# ----------------------------------------------------------------------------- the cache


def _root(namespace) -> tuple:
    try:
        hash(namespace)
    except TypeError as e:
        raise ValueError(f"namespace must be hashable, got {type(namespace).__name__}") from e
    return ("ns", type(namespace), namespace)


def _token_list(name: str, tokens) -> list:
    a = np.asarray(tokens)
    if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D sequence of int token ids, got {a.dtype}{a.shape}")
    return a.astype(np.int64).tolist()


class PrefixCache:
    """Host-side index of full KV pages by token prefix, with LRU eviction (see the module docstring).

    Args:
      config: the `CacheConfig` of the states this cache is used with.
      scrub_on_free: zero every page this cache's methods free (`kv=` is then required by `admit`,
        `admit_batch`, `evict`, `make_room` and `release`, and donated).

    Host structures (all O(num_pages)): a dict key -> page and, per page id, numpy arrays of
    cached?, parent page, depth, number of cached children and last use.
    """

    def __init__(self, config: CacheConfig, *, scrub_on_free: bool = False):
        self.config = check_config(config, "PrefixCache")
        self.scrub_on_free = bool(scrub_on_free)
        P = config.num_pages
        self._index: dict[tuple, int] = {}
        self._key: list = [None] * P
        self._cached = np.zeros(P, bool)
        self._parent = np.full(P, -1, np.int64)
        self._depth = np.zeros(P, np.int64)
        self._nchild = np.zeros(P, np.int64)
        self._last_use = np.zeros(P, np.int64)
        self._clock = 0
        self.stats = PrefixCacheStats()

    def _op(self, fn, state: CacheState, *args):
        """Every change this class makes to a state without scrubbing: `fn(state, *args)` (a
        jitted pure function whose first output is the new state; `args` are numpy arrays).
        The one seam through which a subclass may also apply the change elsewhere, e.g. the
        serving engine's host mirror (`seqattn_jax.serving.mirror`)."""
        return fn(state, *args)

    # -------------------------------------------------------------- inspection

    def __len__(self) -> int:
        """Number of cached pages."""
        return len(self._index)

    @property
    def cached_pages(self) -> np.ndarray:
        """int32 [n]: the cached page ids (each holds one reference of the cache)."""
        return np.flatnonzero(self._cached).astype(np.int32)

    @property
    def cached_mask(self) -> np.ndarray:
        """bool [num_pages]: True for cached pages (a copy)."""
        return self._cached.copy()

    def check(self, state: CacheState) -> None:
        """Raise ValueError if the index is inconsistent or out of sync with `state` (every cached
        page must hold a reference; the tree must be well formed). For tests and debugging."""
        self._check_state(state)
        rc = np.asarray(state.refcount)
        cached = self._cached
        problems = []
        if np.any(rc[cached] < 1):
            problems.append(f"cached pages with refcount 0: {np.flatnonzero(cached & (rc < 1))}")
        if len(self._index) != int(cached.sum()):
            problems.append("index size != number of cached pages")
        nchild = np.zeros_like(self._nchild)
        for key, page in self._index.items():
            if self._key[page] != key or not cached[page]:
                problems.append(f"page {page}: key mismatch")
                continue
            parent = key[0]
            if isinstance(parent, tuple):
                if self._parent[page] != -1 or self._depth[page] != 0:
                    problems.append(f"page {page}: root block with parent/depth")
            else:
                if self._parent[page] != parent or not cached[parent]:
                    problems.append(f"page {page}: parent {parent} not cached")
                    continue
                nchild[parent] += 1
                if self._depth[page] != self._depth[parent] + 1:
                    problems.append(f"page {page}: depth")
                if self._last_use[page] > self._last_use[parent]:
                    problems.append(f"page {page}: used after its parent")
        if not np.array_equal(nchild, self._nchild):
            problems.append("child counts out of date")
        if problems:
            raise ValueError("PrefixCache.check: " + "; ".join(problems))

    # -------------------------------------------------------------- lookup

    def _lookup(self, tokens: list, namespace, max_blocks: int) -> list:
        ps = self.config.page_size
        parent = _root(namespace)
        pages = []
        for i in range(min(len(tokens) // ps, max_blocks)):
            page = self._index.get((parent, tuple(tokens[i * ps:(i + 1) * ps])))
            if page is None:
                break
            pages.append(page)
            parent = page
        return pages

    def _touch(self, pages) -> None:
        if len(pages):
            self._clock += 1
            self._last_use[np.asarray(pages, np.int64)] = self._clock

    def _touch_chains(self, pages) -> None:
        """Mark cached `pages` and all their ancestors used now (keeps last_use[parent] >=
        last_use[child] when a page's chain is not the row it sat in, e.g. after a duplicate)."""
        seen = set()
        for p in np.asarray(pages).tolist():
            while p >= 0 and p not in seen:
                seen.add(p)
                p = int(self._parent[p])
        self._touch(list(seen))

    def match(self, tokens, namespace: Hashable = None, *, max_tokens: int | None = None):
        """Longest cached full-page prefix of `tokens` in `namespace` (and mark it recently used).

        Args:
          tokens: 1-D int token ids. max_tokens: optional cap on the matched length.
        Returns:
          (page_ids: list[int], num_tokens: int), num_tokens = len(page_ids) * page_size. The pages
          are only guaranteed to stay cached while a request holds them (`share_prefix` them, or use
          `admit`, which also caps the match so that one token is left to compute).
        """
        tokens = _token_list("match: tokens", tokens)
        limit = self.config.max_pages_per_seq
        if max_tokens is not None:
            limit = min(limit, max(0, int(max_tokens)) // self.config.page_size)
        pages = self._lookup(tokens, namespace, limit)
        self._touch(pages)
        return pages, len(pages) * self.config.page_size

    # -------------------------------------------------------------- eviction

    def _plan_evict(self, rc: np.ndarray, num_pages: int, pinned=()) -> list:
        """Up to num_pages evictable pages in LRU order (leaves first), without changing anything."""
        if num_pages <= 0:
            return []
        cand = np.flatnonzero(self._cached & (rc == 1))
        if len(pinned):
            cand = cand[~np.isin(cand, np.asarray(pinned))]
        if cand.size == 0:
            return []
        # Oldest first; on equal last use the deeper page first (children before their parents).
        order = cand[np.lexsort((-self._depth[cand], self._last_use[cand]))]
        nchild = {}
        out = []
        for p in order.tolist():
            if nchild.get(p, self._nchild[p]) == 0:
                out.append(p)
                parent = int(self._parent[p])
                if parent >= 0:
                    nchild[parent] = nchild.get(parent, self._nchild[parent]) - 1
                if len(out) >= num_pages:
                    break
        return out

    def _commit_evict(self, pages: list) -> None:
        for p in pages:
            del self._index[self._key[p]]
            self._key[p] = None
            self._cached[p] = False
            parent = self._parent[p]
            if parent >= 0:
                self._nchild[parent] -= 1
            self._parent[p] = -1
            self._depth[p] = 0
            self._last_use[p] = 0
        self.stats.evicted_pages += len(pages)

    def _need_kv(self, kv, where: str):
        if self.scrub_on_free and kv is None:
            raise ValueError(f"PrefixCache.{where}: scrub_on_free=True needs kv= (the pool to scrub)")

    def _check_state(self, state):
        check_state(state, "PrefixCache")
        if state.config != self.config:
            raise ValueError("state.config is not this PrefixCache's config")

    def _run_evict(self, state, plan: list, kv, where: str) -> EvictResult:
        if not plan:
            return EvictResult(state, np.zeros((0,), np.int32), kv)
        ids = _padded(plan)
        if self.scrub_on_free:
            new, status, kv = _evict_scrub_jit(state, kv, ids)
        else:
            new, status, _ = self._op(_evict_jit, state, ids)
        status = np.asarray(status)
        if np.any(status != Status.OK):
            raise RuntimeError(f"PrefixCache.{where}: the cache is out of sync with the state (unref of "
                               f"cached pages failed: {status[:len(plan)].tolist()}); was a cached page "
                               f"unref'd outside the cache?")
        self._commit_evict(plan)
        return EvictResult(new, np.asarray(plan, np.int32), kv)

    def evict(self, state: CacheState, num_pages: int | None = None, *, kv=None) -> EvictResult:
        """Evict up to `num_pages` (None: all) cached pages that no request holds, LRU first.

        Pages with `refcount > 1` (held by a request) are never touched. Returns
        `EvictResult(state, freed page ids, kv)`; with `scrub_on_free` the freed pages are zeroed in
        the returned `kv` (required, donated).
        """
        self._check_state(state)
        self._need_kv(kv, "evict")
        n = self.config.num_pages if num_pages is None else int(num_pages)
        plan = self._plan_evict(np.asarray(state.refcount), n)
        return self._run_evict(state, plan, kv, "evict")

    def make_room(self, state: CacheState, num_free: int, *, kv=None) -> EvictResult:
        """Evict LRU cache-only pages until at least `num_free` pages are free (or nothing more can
        be evicted). Use before `allocate` / `allocate_decoding` under memory pressure."""
        self._check_state(state)
        self._need_kv(kv, "make_room")
        rc = np.asarray(state.refcount)
        plan = self._plan_evict(rc, int(num_free) - int(np.sum(rc == 0)))
        return self._run_evict(state, plan, kv, "make_room")

    # -------------------------------------------------------------- admission

    def admit(self, state: CacheState, slot: int, prompt, namespace: Hashable = None, *,
              kv=None) -> Admission:
        """Start request `slot` (inactive) on `prompt`: share its longest cached prefix (at most
        `(len(prompt) - 1) // page_size` pages), evict LRU cache-only pages if the rest does not fit,
        allocate the rest. `state.seq_lens[slot]` becomes `len(prompt)`; prefill positions
        `num_cached ..`. All-or-nothing: on failure state and cache are unchanged. Returns an
        `Admission` with scalar `ok` / `num_cached`."""
        res = self.admit_batch(state, [slot], [prompt], [namespace], kv=kv)
        return res._replace(num_cached=int(res.num_cached[0]))

    def admit_batch(self, state: CacheState, slots, prompts: Sequence, namespaces=None, *,
                    kv=None) -> Admission:
        """`admit` for B requests at once (one device call, jitted once per B).

        Args:
          slots: int [B] distinct inactive slots; < 0 = padding (its prompt is ignored).
          prompts: B 1-D int token sequences. namespaces: None or B hashables.
        Returns:
          `Admission` with ok bool, num_cached int32 [B], status int32 [B]. All-or-nothing:
          if any request fails (slot active, too long, out of pages even after evicting every
          evictable page, ...) nothing changes — neither the state, nor the cache (no eviction, no
          LRU update).
        """
        self._check_state(state)
        self._need_kv(kv, "admit")
        cfg = self.config
        ps, M = cfg.page_size, cfg.max_pages_per_seq
        slots = np.asarray(slots).reshape(-1)
        if slots.size and not np.issubdtype(slots.dtype, np.integer):
            raise ValueError(f"admit_batch: slots must be ints, got {slots.dtype}")
        slots = slots.astype(np.int32)
        B = slots.shape[0]
        if len(prompts) != B:
            raise ValueError(f"admit_batch: {B} slots but {len(prompts)} prompts")
        if namespaces is None:
            namespaces = [None] * B
        elif len(namespaces) != B:
            raise ValueError(f"admit_batch: {B} slots but {len(namespaces)} namespaces")

        prefix_pages = np.full((B, M), -1, np.int32)
        prefix_tokens = np.zeros((B,), np.int32)
        new_tokens = np.zeros((B,), np.int32)
        paths = []
        need = 0
        for i in range(B):
            if slots[i] < 0:
                continue
            toks = _token_list(f"admit_batch: prompts[{i}]", prompts[i])
            n = len(toks)
            pages = self._lookup(toks, namespaces[i], min(M, max(0, (n - 1) // ps)))
            k = len(pages)
            prefix_pages[i, :k] = pages
            prefix_tokens[i] = k * ps
            new_tokens[i] = n - k * ps
            need += max(0, cfg.pages_for(n) - k)
            paths.append(pages)
        rc = np.asarray(state.refcount)
        pinned = np.concatenate([np.asarray(p, np.int64) for p in paths]) if paths else ()
        # A successful admission needs at most B * M new pages: a fixed-size eviction list keeps
        # one compiled program per batch size.
        plan = self._plan_evict(rc, min(need, B * M) - int(np.sum(rc == 0)), pinned)
        ev_ids = _padded(plan, max(1, B * M))
        args = (ev_ids, slots, prefix_pages, prefix_tokens, new_tokens)
        if self.scrub_on_free:
            new, status, ev_status, kv = _admit_scrub_jit(state, kv, *args)
        else:
            new, status, ev_status, _ = self._op(_admit_jit, state, *args)
        status = np.asarray(status)
        if np.any(np.asarray(ev_status) != Status.OK):
            raise RuntimeError("PrefixCache.admit_batch: the cache is out of sync with the state "
                               "(unref of cached pages failed); was a cached page unref'd outside "
                               "the cache?")
        if np.any(status != Status.OK):
            return Admission(state, False, np.zeros((B,), np.int32), status, np.zeros((0,), np.int32), kv)
        self._commit_evict(plan)
        for pages in paths:
            self._touch(pages)
        valid = slots >= 0
        st = self.stats
        st.requests += int(valid.sum())
        st.hits += int(np.sum(valid & (prefix_tokens > 0)))
        st.prompt_tokens += int(np.sum(prefix_tokens + new_tokens))
        st.cached_tokens += int(np.sum(prefix_tokens))
        return Admission(new, True, prefix_tokens, status, np.asarray(plan, np.int32), kv)

    # -------------------------------------------------------------- insertion

    def _plan_insert(self, tokens: list, page_ids, namespace, pending: dict, pending_pages: set,
                     new_nodes: list) -> tuple[list, int]:
        """Walk the full blocks of tokens/page_ids; append nodes to create to `new_nodes`. Returns
        (the path of cached page ids to touch, blocks already cached in another page)."""
        ps = self.config.page_size
        parent = _root(namespace)
        parent_page = -1
        path = []
        dups = 0
        for i in range(min(len(tokens) // ps, len(page_ids))):
            page = int(page_ids[i])
            if page < 0:
                break
            if page >= self.config.num_pages:
                raise ValueError(f"insert: page id {page} is not in [0, {self.config.num_pages})")
            key = (parent, tuple(tokens[i * ps:(i + 1) * ps]))
            existing = self._index.get(key, pending.get(key))
            if existing is None:
                if self._cached[page] or page in pending_pages:
                    break  # the page is cached under other tokens: never index it twice
                pending[key] = page
                pending_pages.add(page)
                new_nodes.append((key, page, parent_page, i))
                existing = page
            elif existing != page:
                dups += 1
            path.append(existing)
            parent = parent_page = existing
        return path, dups

    def _apply_insert(self, state, new_nodes: list, paths: list, dups: int, where: str,
                      size: int | None = None) -> CacheState:
        if new_nodes:
            ids = _padded([page for _, page, _, _ in new_nodes], size)
            new, status = self._op(_ref_jit, state, ids)
            status = np.asarray(status)
            if np.any(status != Status.OK):
                idx = np.flatnonzero(status[:len(new_nodes)] != Status.OK)
                why = ", ".join(f"page {new_nodes[i][1]}: {Status(int(status[i])).name}" for i in idx)
                raise ValueError(f"PrefixCache.{where}: cannot take the cache's reference ({why}; "
                                 f"FREE_PAGE = not allocated); nothing was inserted")
            state = new
        for key, page, parent_page, depth in new_nodes:
            self._index[key] = page
            self._key[page] = key
            self._cached[page] = True
            self._parent[page] = parent_page
            self._depth[page] = depth
            self._nchild[page] = 0
            if parent_page >= 0:
                self._nchild[parent_page] += 1
        for path in paths:
            self._touch(path)
        self.stats.inserted_pages += len(new_nodes)
        self.stats.duplicate_pages += dups
        return state

    def insert(self, state: CacheState, tokens, page_ids, namespace: Hashable = None) -> CacheState:
        """Cache the full pages of a prefilled sequence.

        Args:
          tokens: 1-D int token ids whose K/V is written in `page_ids` (block i = tokens
            `[i*page_size, (i+1)*page_size)` in page `page_ids[i]`); only whole blocks are cached.
          page_ids: the sequence's layer-0 page ids in order (a page-table row; -1 ends it). The
            pages must be allocated (held by a request).
        Returns:
          The state with one reference taken on each newly cached page. Blocks already cached (in
          this page or another) gain nothing. All-or-nothing (ValueError for a free page).
        """
        self._check_state(state)
        tokens = _token_list("insert: tokens", tokens)
        page_ids = np.asarray(page_ids).reshape(-1).tolist()
        nodes: list = []
        path, dups = self._plan_insert(tokens, page_ids, namespace, {}, set(), nodes)
        return self._apply_insert(state, nodes, [path], dups, "insert")

    def insert_slots(self, state: CacheState, slots, prompts: Sequence, namespaces=None) -> CacheState:
        """`insert` for the sequences in `slots` (active), reading their page-table rows from the
        device in one small transfer. `prompts[i]` are the tokens whose K/V slot `slots[i]` holds
        (at most its length); slots < 0 are skipped."""
        self._check_state(state)
        slots = np.asarray(slots, np.int32).reshape(-1)
        B = slots.shape[0]
        if len(prompts) != B:
            raise ValueError(f"insert_slots: {B} slots but {len(prompts)} prompts")
        if namespaces is None:
            namespaces = [None] * B
        elif len(namespaces) != B:
            raise ValueError(f"insert_slots: {B} slots but {len(namespaces)} namespaces")
        rows, lens, active = (np.asarray(x) for x in _slot_rows_jit(state, slots))
        pending: dict = {}
        pending_pages: set = set()
        nodes: list = []
        paths = []
        dups = 0
        for i in range(B):
            if slots[i] < 0:
                continue
            if not active[i]:
                raise ValueError(f"insert_slots: slot {int(slots[i])} holds no sequence")
            toks = _token_list(f"insert_slots: prompts[{i}]", prompts[i])
            if len(toks) > lens[i]:
                raise ValueError(f"insert_slots: prompts[{i}] has {len(toks)} tokens but slot "
                                 f"{int(slots[i])} holds {int(lens[i])}")
            path, d = self._plan_insert(toks, rows[i], namespaces[i], pending, pending_pages, nodes)
            paths.append(path)
            dups += d
        return self._apply_insert(state, nodes, paths, dups, "insert_slots",
                                  max(1, B * self.config.max_pages_per_seq))

    # -------------------------------------------------------------- release

    def release(self, state: CacheState, slots, *, kv=None):
        """`seqattn_jax.release` of `slots` (int [B], < 0 = padding); with `scrub_on_free` the pages
        it frees are zeroed in the returned pool. Cached pages keep the cache's reference and
        stay, and count as used now for LRU (a page is in use until its last request ends, as in
        vLLM; releasing through `seqattn_jax.release` directly leaves them at their last admission).
        Returns (state, status int32 [B], kv), all-or-nothing like `seqattn_jax.release`."""
        self._check_state(state)
        self._need_kv(kv, "release")
        slots = np.asarray(slots, np.int32).reshape(-1)
        if self.scrub_on_free:
            new, status, kv, rows = _release_scrub_jit(state, kv, slots)
        else:
            new, status, _, rows = self._op(_release_jit, state, slots)
        status = np.asarray(status)
        if np.all(status == Status.OK):
            pages = np.asarray(rows)[slots >= 0].reshape(-1)
            pages = pages[pages >= 0]
            self._touch_chains(pages[self._cached[pages]])
        return new, status, kv
