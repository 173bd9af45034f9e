"""`CacheState` and the functional, jit-compatible page allocator.

The state is a pytree of small int32/bool arrays; every operation is a pure function
`op(state, ...) -> (state, status, ...)` (optax's shape: explicit state, no hidden mutation), vectorised
over the batch with fixed shapes, so it runs inside `jax.jit` and compiles once per batch size.

Semantics every operation keeps (checked by tests/test_state_props.py against a plain-Python model):
  * `refcount[p]` = (page-table entries that name p) + (external references taken with `ref`).
    Free pages have refcount 0, appear in no page table, and are exactly `free_pages[:num_free]`
    (a stack: grants pop from it, frees push to it, so no op scans the pool for free pages).
  * A slot's pages are `page_table[s, :pages_for(seq_lens[s])]`; the rest of the row is -1.
    Inactive slots hold nothing (`seq_lens == 0`, row all -1).
  * A partly filled last page is never shared (refcount 1): `fork` copies it and `truncate` copies a
    shared page it cuts into (copy-on-write), so a write never reaches another sequence's tokens.
  * All-or-nothing: every op returns int32 `Status` codes [B], one per request. If any request
    fails, the returned state IS the input state: `ok(status)` (a bool scalar) says whether the call
    was applied, and `status[i] != Status.OK` marks each request that caused the refusal. Padding
    requests (id < 0) are ignored and read `Status.OK`.

`seqattn_jax.validation` holds `Status`, `ok`, `raise_for_status` and the argument checks;
`seqattn_jax.checked` runs these ops and raises instead (checked mode).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from seqattn_jax.config import CacheConfig
from seqattn_jax.validation import (STATUS_MESSAGES, Status, as_ids, check_config, first_error,
                                   ok, same_shape)

__all__ = ["STATUS_MESSAGES", "CacheState", "Status", "allocate", "allocate_decoding", "fork", "init_state",
           "ok", "ref", "release", "share_prefix", "state_from_page_table", "truncate", "unref"]


_I32 = jnp.int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheState:
    """Allocator state for one `CacheConfig` (every array int32 unless noted).

    Attributes:
      refcount: [num_pages] references to each page (0 = free).
      page_table: [max_seqs, max_pages_per_seq] page ids of each slot, -1 where unused.
      seq_lens: [max_seqs] tokens held by each slot.
      active: bool [max_seqs] whether the slot holds a sequence.
      free_pages: [num_pages] a stack: `free_pages[:num_free]` are the free pages (refcount 0),
        each once; the rest is stale. Ops pop fresh pages from its top and push freed ones, so
        no op scans the whole pool to find free pages.
      num_free: int32 scalar, the stack's height.
      config: the static `CacheConfig` (pytree metadata, not a leaf).
    """

    refcount: jax.Array
    page_table: jax.Array
    seq_lens: jax.Array
    active: jax.Array
    free_pages: jax.Array
    num_free: jax.Array
    config: CacheConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def num_free_pages(self) -> jax.Array:
        """int32 scalar: pages with refcount 0."""
        return self.num_free

    @property
    def pages_held(self) -> jax.Array:
        """int32 [max_seqs]: pages each slot holds."""
        return self.config.pages_for(self.seq_lens)

    def _replace(self, **kw) -> CacheState:
        return dataclasses.replace(self, **kw)


def check_state(state, where: str) -> CacheState:
    """`state` must be a `CacheState`; returns it."""
    if not isinstance(state, CacheState):
        raise ValueError(f"{where}: state must be a CacheState (from seqattn_jax.init_state), got "
                         f"{type(state).__name__}")
    return state


def init_state(config: CacheConfig) -> CacheState:
    """An empty cache: every page free, every slot inactive."""
    check_config(config, "init_state")
    return state_from_page_table(config, jnp.full((config.max_seqs, config.max_pages_per_seq), -1, _I32),
                                 jnp.zeros((config.max_seqs,), _I32))


def state_from_page_table(config: CacheConfig, page_table, seq_lens, active=None) -> CacheState:
    """A consistent state from page tables and lengths (a restored checkpoint, a benchmark set-up).

    Args:
      page_table: int32 [max_seqs, max_pages_per_seq]; slot s holds `page_table[s, :pages_for(len)]`
        (the rest is ignored and stored as -1). A page listed k times gets refcount k.
      seq_lens: int32 [max_seqs]. active: bool [max_seqs], default `seq_lens > 0`.
    No external references (`ref`) are recorded. Jittable; the caller keeps the tables valid.
    """
    check_config(config, "state_from_page_table")
    P, (S, M) = config.num_pages, (config.max_seqs, config.max_pages_per_seq)
    page_table = jnp.asarray(page_table, _I32)
    seq_lens = jnp.asarray(seq_lens, _I32)
    if page_table.shape != (S, M) or seq_lens.shape != (S,):
        raise ValueError(f"page_table must be [{S}, {M}] and seq_lens [{S}], got {page_table.shape} "
                         f"and {seq_lens.shape}")
    active = seq_lens > 0 if active is None else jnp.asarray(active, bool)
    held = jnp.arange(M, dtype=_I32)[None, :] < config.pages_for(jnp.where(active, seq_lens, 0))[:, None]
    page_table = jnp.where(held, page_table, -1)
    refcount = jnp.zeros((P,), _I32).at[jnp.where(held, page_table, P)].add(1, mode="drop")
    # Lowest page ids on top of the stack, so a new cache hands out pages 0, 1, 2, ...
    free = jnp.nonzero(refcount == 0, size=P, fill_value=P)[0].astype(_I32)
    num_free = jnp.sum(refcount == 0, dtype=_I32)
    stack = jnp.where(jnp.arange(P) < num_free, free[jnp.clip(num_free - 1 - jnp.arange(P), 0, P - 1)], 0)
    return CacheState(refcount=refcount, page_table=page_table, seq_lens=jnp.where(active, seq_lens, 0),
                      active=active, free_pages=stack.astype(_I32), num_free=num_free, config=config)


# ----------------------------------------------------------------------------- input checks


def _slot_checks(state: CacheState, ids: jax.Array):
    """(is_request, in_range, duplicate, slot) for a batch of sequence ids; padding is id < 0."""
    S = state.config.max_seqs
    is_request = ids >= 0
    in_range = is_request & (ids < S)
    slot = jnp.where(in_range, ids, S)  # S = out of bounds: gathers clamp, scatters drop
    counts = jnp.zeros((S,), _I32).at[slot].add(1, mode="drop")
    duplicate = in_range & (counts.at[slot].get(mode="fill", fill_value=0) > 1)
    return is_request, in_range, duplicate, slot


def _push_freed(state: CacheState, old_refcount: jax.Array, cand: jax.Array) -> CacheState:
    """Push onto the free stack every page of `cand` (int32 [N], num_pages = none) that this op
    brought from refcount > 0 to 0. A page listed several times is pushed once (its first entry)."""
    P = state.config.num_pages
    n = cand.shape[0]
    i = jnp.arange(n, dtype=_I32)
    first = jnp.full((P,), n, _I32).at[cand].min(i, mode="drop").at[cand].get(mode="fill", fill_value=-1)
    freed = (first == i) & (state.refcount.at[cand].get(mode="fill", fill_value=1) == 0) & (
        old_refcount.at[cand].get(mode="fill", fill_value=0) > 0)
    pos = state.num_free + cumsum(freed) - 1
    return state._replace(free_pages=state.free_pages.at[jnp.where(freed, pos, P)].set(cand, mode="drop"),
                          num_free=state.num_free + jnp.sum(freed, dtype=_I32))


def cumsum(x: jax.Array) -> jax.Array:
    """Inclusive int32 cumulative sum (of a batch's per-request counts)."""
    return jnp.cumsum(x, dtype=_I32)


# ----------------------------------------------------------------------------- allocation


def _page_budget(state: CacheState, pre: jax.Array, num_new: jax.Array):
    """Final statuses given the checks so far (`pre`) and the fresh pages each request needs:
    requests that passed get pages in request order, and those whose running total exceeds the
    free pages fail with OUT_OF_PAGES. Returns (status [B], num_new [B], apply: all OK)."""
    num_new = jnp.where(pre == Status.OK, num_new, 0).astype(_I32)
    oop = (num_new > 0) & (cumsum(num_new) > state.num_free_pages)
    status = jnp.where(pre != Status.OK, pre, jnp.where(oop, _I32(Status.OUT_OF_PAGES), 0))
    return status, num_new, jnp.all(status == Status.OK)


def _grant_pages(state: CacheState, slot, first_page, num_new, apply, max_new: int):
    """Give request i `num_new[i]` fresh pages at page-table columns `first_page[i] + j`.

    Pages are popped from the free stack in request order (a cumulative sum), so the grant is one
    gather and two scatters over a [B, max_new] grid, with no loop and no scan of the pool. The
    caller has checked that enough pages are free (`_page_budget`); the state changes only where
    `apply` (a scalar) is True. Returns (state, pages [B, max_new], -1 where none was granted).
    """
    cfg = state.config
    starts = cumsum(num_new) - num_new
    j = jnp.arange(max_new, dtype=_I32)[None, :]
    take = (j < num_new[:, None]) & apply
    at = jnp.where(take, state.num_free - 1 - (starts[:, None] + j), cfg.num_pages)
    pages = jnp.where(take, state.free_pages.at[at].get(mode="fill", fill_value=cfg.num_pages), -1)
    rows = jnp.where(take, slot[:, None], cfg.max_seqs)
    cols = first_page[:, None] + j
    return state._replace(
        page_table=state.page_table.at[rows, cols].set(pages, mode="drop"),
        refcount=state.refcount.at[jnp.where(take, pages, cfg.num_pages)].set(1, mode="drop"),
        num_free=state.num_free - jnp.where(apply, jnp.sum(num_new, dtype=_I32), 0),
    ), pages


def _extend(state: CacheState, seq_ids, new_lens, *, need_active: bool, max_new: int):
    """Shared body of `allocate` / `allocate_decoding`: add new_lens[i] tokens to slot seq_ids[i]."""
    cfg = state.config
    is_req, in_range, dup, slot = _slot_checks(state, seq_ids)
    active = state.active.at[slot].get(mode="fill", fill_value=False)
    old_len = jnp.where(active, state.seq_lens.at[slot].get(mode="fill", fill_value=0), 0)
    new_len = old_len + jnp.maximum(new_lens, 0)
    held = cfg.pages_for(old_len)
    num_new = jnp.where(in_range, cfg.pages_for(new_len) - held, 0)
    too_long = cfg.pages_for(new_len) > cfg.max_pages_per_seq
    pre = first_error(
        (is_req & ~in_range, Status.BAD_SLOT),
        (dup, Status.DUPLICATE),
        (is_req & (new_lens < 0), Status.BAD_LENGTH),
        (is_req & ~active if need_active else jnp.zeros_like(is_req), Status.INACTIVE),
        (is_req & too_long, Status.TOO_LONG),
    )
    status, num_new, apply = _page_budget(state, pre, num_new)
    st, _ = _grant_pages(state, slot, held, num_new, apply, max_new)
    upd = jnp.where(apply & in_range, slot, cfg.max_seqs)
    new_state = st._replace(
        seq_lens=state.seq_lens.at[upd].set(new_len, mode="drop"),
        active=state.active.at[upd].set(True, mode="drop"),
    )
    return new_state, status


def allocate(state: CacheState, seq_ids, new_lens):
    """Make room for `new_lens[i]` more tokens in slot `seq_ids[i]`, new or existing.

    Args:
      state: the cache state.
      seq_ids: int32 [B] slots; ids < 0 are padding and ignored. An inactive slot starts a new
        sequence (length 0 before this call).
      new_lens: int32 [B] tokens to add (>= 0). The new tokens sit at positions
        `old_len .. old_len + new_lens[i] - 1`, as `pack_for_flashinfer` reports them.
    Returns:
      (state, status): status is int32 [B] `Status` codes. The state changed iff `ok(status)`;
      otherwise it is the input state and `status[i]` says why request i failed (BAD_SLOT,
      DUPLICATE, BAD_LENGTH, TOO_LONG, OUT_OF_PAGES); the other requests read OK.
    """
    state = check_state(state, "allocate")
    seq_ids = as_ids("allocate: seq_ids", seq_ids)
    new_lens = as_ids("allocate: new_lens", new_lens)
    same_shape("seq_ids", seq_ids, "allocate: new_lens", new_lens)
    return _extend(state, seq_ids, new_lens, need_active=False,
                   max_new=state.config.max_pages_per_seq)


def allocate_decoding(state: CacheState, seq_ids):
    """One more token for each existing sequence `seq_ids[i]` (int32 [B], < 0 = padding).

    A page is granted only where a sequence crosses a page boundary. Inactive slots fail with
    `Status.INACTIVE`. All-or-nothing, like `allocate`. Returns (state, status int32 [B]).
    """
    state = check_state(state, "allocate_decoding")
    seq_ids = as_ids("allocate_decoding: seq_ids", seq_ids)
    return _extend(state, seq_ids, jnp.ones_like(seq_ids), need_active=True, max_new=1)


# ----------------------------------------------------------------------------- release / truncate


def _drop_pages(state: CacheState, slot, keep_pages, apply):
    """Unreference columns `keep_pages[i]..` of row `slot[i]` (scatter-add, so shared pages and
    duplicates across requests are counted exactly once per reference); pages that reach refcount
    0 go back on the free stack. Returns the state."""
    cfg = state.config
    rows = state.page_table.at[slot].get(mode="fill", fill_value=-1)  # [B, M]
    j = jnp.arange(cfg.max_pages_per_seq, dtype=_I32)[None, :]
    drop = (j >= keep_pages[:, None]) & (rows >= 0) & apply
    cand = jnp.where(drop, rows, cfg.num_pages).reshape(-1)
    st = state._replace(
        refcount=state.refcount.at[cand].add(-1, mode="drop"),
        page_table=state.page_table.at[jnp.where(drop, slot[:, None], cfg.max_seqs), j].set(
            -1, mode="drop"))
    return _push_freed(st, state.refcount, cand)


def release(state: CacheState, seq_ids):
    """End the sequences `seq_ids` (int32 [B], < 0 = padding): each page loses one reference and is
    free once its refcount reaches 0. Releasing an inactive slot (or one slot twice) fails with
    `Status.INACTIVE` / `DUPLICATE` and changes nothing — no page is ever decremented twice.
    Returns (state, status int32 [B]); all-or-nothing."""
    state = check_state(state, "release")
    seq_ids = as_ids("release: seq_ids", seq_ids)
    cfg = state.config
    is_req, in_range, dup, slot = _slot_checks(state, seq_ids)
    active = state.active.at[slot].get(mode="fill", fill_value=False)
    status = first_error(
        (is_req & ~in_range, Status.BAD_SLOT),
        (dup, Status.DUPLICATE),
        (is_req & ~active, Status.INACTIVE),
    )
    apply = jnp.all(status == Status.OK)
    st = _drop_pages(state, slot, jnp.zeros_like(slot), apply)
    upd = jnp.where(apply & in_range, slot, cfg.max_seqs)
    new_state = st._replace(
        seq_lens=state.seq_lens.at[upd].set(0, mode="drop"),
        active=state.active.at[upd].set(False, mode="drop"),
    )
    return new_state, status


def truncate(state: CacheState, seq_ids, new_lens):
    """Roll sequences back to `new_lens` tokens (e.g. rejected speculative tokens).

    Args:
      seq_ids: int32 [B] active slots (< 0 = padding). new_lens: int32 [B], `0 <= new_lens <= len`.
    Returns:
      (state, status [B], copies int32 [B, 2]): pages past the new end lose a reference (freed at 0). If
      the new last page is partly filled and shared, the sequence gets a fresh page and
      `copies[i] = (shared page, fresh page)` must be copied with `kv.copy_pages` before the next
      write (rows of -1 need no copy). All-or-nothing.
    """
    state = check_state(state, "truncate")
    seq_ids = as_ids("truncate: seq_ids", seq_ids)
    new_lens = as_ids("truncate: new_lens", new_lens)
    same_shape("seq_ids", seq_ids, "truncate: new_lens", new_lens)
    cfg = state.config
    is_req, in_range, dup, slot = _slot_checks(state, seq_ids)
    active = state.active.at[slot].get(mode="fill", fill_value=False)
    old_len = state.seq_lens.at[slot].get(mode="fill", fill_value=0)
    keep = cfg.pages_for(new_lens)
    last = state.page_table.at[slot, jnp.maximum(keep - 1, 0)].get(mode="fill", fill_value=-1)
    # Cutting into a page that someone else also references (a fork, the prefix cache): the next
    # write would land in their tokens, so this sequence gets its own copy of that page.
    cow = (is_req & (new_lens % cfg.page_size != 0) & (keep > 0)
           & (state.refcount.at[last].get(mode="fill", fill_value=0) > 1))
    pre = first_error(
        (is_req & ~in_range, Status.BAD_SLOT),
        (dup, Status.DUPLICATE),
        (is_req & ~active, Status.INACTIVE),
        (is_req & ((new_lens < 0) | (new_lens > old_len)), Status.BAD_LENGTH),
    )
    status, num_new, apply = _page_budget(state, pre, cow.astype(_I32))
    # Drop the pages past the new end; a copied last page is dropped too and re-granted below.
    drop_from = jnp.where(num_new > 0, keep - 1, keep)
    st = _drop_pages(state, slot, drop_from, apply)
    st, pages = _grant_pages(st, slot, keep - 1, num_new, apply, 1)
    copies = jnp.stack([jnp.where(pages[:, 0] >= 0, last, -1), pages[:, 0]], axis=1)
    upd = jnp.where(apply & in_range, slot, cfg.max_seqs)
    new_state = st._replace(seq_lens=state.seq_lens.at[upd].set(new_lens, mode="drop"))
    return new_state, status, copies


# ----------------------------------------------------------------------------- sharing


def fork(state: CacheState, src_ids, dst_ids):
    """Start sequence `dst_ids[i]` as a copy of `src_ids[i]` (beam search, parallel sampling).

    Args:
      src_ids: int32 [B] active slots; the same source may appear several times.
      dst_ids: int32 [B] inactive, distinct slots. A pair with both ids < 0 is padding; a pair
        with one negative id fails with BAD_SLOT.
    Returns:
      (state, status [B], copies int32 [B, 2]): dst shares every full page of src (refcount + 1); a partly
      filled last page is not shared — dst gets a fresh page and `copies[i] = (src page, dst page)`
      must be copied with `kv.copy_pages` before dst is read or written. Rows of -1: nothing to copy.
    """
    state = check_state(state, "fork")
    src_ids = as_ids("fork: src_ids", src_ids)
    dst_ids = as_ids("fork: dst_ids", dst_ids)
    same_shape("src_ids", src_ids, "fork: dst_ids", dst_ids)
    cfg = state.config
    M = cfg.max_pages_per_seq
    s_req, s_in, _, s_slot = _slot_checks(state, src_ids)
    d_req, d_in, d_dup, d_slot = _slot_checks(state, dst_ids)
    is_req = s_req | d_req
    s_active = state.active.at[s_slot].get(mode="fill", fill_value=False)
    d_active = state.active.at[d_slot].get(mode="fill", fill_value=False)
    length = jnp.where(s_active, state.seq_lens.at[s_slot].get(mode="fill", fill_value=0), 0)
    full = length // cfg.page_size
    partial = (length % cfg.page_size) != 0
    pre = first_error(
        (is_req & ~(s_in & d_in), Status.BAD_SLOT),
        (d_dup, Status.DUPLICATE),
        (is_req & ~s_active, Status.INACTIVE),
        (is_req & d_active, Status.ACTIVE),
    )
    status, num_new, apply = _page_budget(state, pre, partial.astype(_I32))
    ok_req = apply & is_req
    # Full pages are shared: dst's row points at them and each gains a reference.
    src_rows = state.page_table.at[s_slot].get(mode="fill", fill_value=-1)
    j = jnp.arange(M, dtype=_I32)[None, :]
    share = (j < full[:, None]) & ok_req[:, None]
    refcount = state.refcount.at[jnp.where(share, src_rows, cfg.num_pages)].add(1, mode="drop")
    page_table = state.page_table.at[jnp.where(share, d_slot[:, None], cfg.max_seqs), j].set(
        src_rows, mode="drop")
    # The partly filled last page is copied (copy-on-write done eagerly).
    st = state._replace(page_table=page_table, refcount=refcount)
    st, pages = _grant_pages(st, d_slot, full, num_new, apply, 1)
    src_last = src_rows[jnp.arange(src_rows.shape[0]), jnp.minimum(full, M - 1)]
    copies = jnp.stack([jnp.where(pages[:, 0] >= 0, src_last, -1), pages[:, 0]], axis=1)
    upd = jnp.where(ok_req, d_slot, cfg.max_seqs)
    new_state = st._replace(
        seq_lens=state.seq_lens.at[upd].set(length, mode="drop"),
        active=state.active.at[upd].set(True, mode="drop"))
    return new_state, status, copies


def share_prefix(state: CacheState, seq_ids, page_ids, num_tokens):
    """Start new sequences on already-filled full pages (a cached prompt prefix).

    Args:
      seq_ids: int32 [B] inactive slots (< 0 = padding).
      page_ids: int32 [B, K] page ids; row i's first `num_tokens[i] // page_size` entries are used.
      num_tokens: int32 [B] prefix lengths, multiples of page_size (only full pages are shared,
        so no write can reach them: the next token goes to a fresh page).
    Returns:
      (state, status [B]): each used page gains a reference; the slot becomes active with length
      num_tokens[i]. Pages must be allocated (refcount > 0) and none may be a sequence's partly
      filled last page (PARTIAL_PAGE: it is still being written). All-or-nothing.
    """
    state = check_state(state, "share_prefix")
    seq_ids = as_ids("share_prefix: seq_ids", seq_ids)
    page_ids = as_ids("share_prefix: page_ids", page_ids, ndim=2)
    num_tokens = as_ids("share_prefix: num_tokens", num_tokens)
    same_shape("seq_ids", seq_ids, "share_prefix: num_tokens", num_tokens)
    if page_ids.shape[0] != seq_ids.shape[0]:
        raise ValueError(f"share_prefix: page_ids must be [B, K] with B = {seq_ids.shape[0]}, "
                         f"got {page_ids.shape}")
    cfg = state.config
    B, K = page_ids.shape
    is_req, in_range, dup, slot = _slot_checks(state, seq_ids)
    active = state.active.at[slot].get(mode="fill", fill_value=False)
    n = num_tokens // cfg.page_size
    j = jnp.arange(K, dtype=_I32)[None, :]
    used = (j < n[:, None]) & is_req[:, None]
    bad_page = jnp.any(used & ((page_ids < 0) | (page_ids >= cfg.num_pages)), axis=1)
    safe = jnp.where(used, page_ids, cfg.num_pages)
    free_page = jnp.any(used & (state.refcount.at[safe].get(mode="fill", fill_value=1) == 0), axis=1)
    partial = jnp.any(used & _partial_last_pages(state).at[safe].get(mode="fill", fill_value=False),
                      axis=1)
    status = first_error(
        (is_req & ~in_range, Status.BAD_SLOT),
        (dup, Status.DUPLICATE),
        (is_req & active, Status.ACTIVE),
        (is_req & ((num_tokens < 0) | (num_tokens % cfg.page_size != 0)
                   | (n > jnp.minimum(K, cfg.max_pages_per_seq))), Status.BAD_LENGTH),
        (is_req & bad_page, Status.BAD_PAGE),
        (is_req & free_page, Status.FREE_PAGE),
        (is_req & partial, Status.PARTIAL_PAGE),
    )
    apply = jnp.all(status == Status.OK)
    take = used & apply
    refcount = state.refcount.at[jnp.where(take, page_ids, cfg.num_pages)].add(1, mode="drop")
    cols = jnp.broadcast_to(j, (B, K))
    page_table = state.page_table.at[jnp.where(take, slot[:, None], cfg.max_seqs), cols].set(
        page_ids, mode="drop")
    upd = jnp.where(apply & in_range, slot, cfg.max_seqs)
    new_state = state._replace(
        refcount=refcount, page_table=page_table,
        seq_lens=state.seq_lens.at[upd].set(num_tokens, mode="drop"),
        active=state.active.at[upd].set(True, mode="drop"))
    return new_state, status


# ----------------------------------------------------------------------------- page references


def _page_checks(state: CacheState, name: str, page_ids):
    cfg = state.config
    page_ids = as_ids(name, page_ids)
    is_req = page_ids >= 0
    in_range = is_req & (page_ids < cfg.num_pages)
    idx = jnp.where(in_range, page_ids, cfg.num_pages)
    rc = state.refcount.at[idx].get(mode="fill", fill_value=0)
    return page_ids, is_req, in_range, idx, rc


def _partial_last_pages(state: CacheState) -> jax.Array:
    """bool [num_pages]: pages that are some active sequence's partly filled last page."""
    cfg = state.config
    partial = state.active & (state.seq_lens % cfg.page_size != 0)
    col = jnp.maximum(cfg.pages_for(state.seq_lens) - 1, 0)
    last = jnp.take_along_axis(state.page_table, col[:, None], axis=1)[:, 0]
    return jnp.zeros((cfg.num_pages,), bool).at[jnp.where(partial, last, cfg.num_pages)].set(
        True, mode="drop")


def ref(state: CacheState, page_ids):
    """Take an external reference on each page of `page_ids` (int32 [K], < 0 = padding; a page
    listed twice gains two). Refused for free pages (a free page cannot be kept alive: it might
    already be handed out) and for a sequence's partly filled last page (its owner still writes
    into it; a shared page is never written). Returns (state, status [K]); all-or-nothing."""
    state = check_state(state, "ref")
    page_ids, is_req, in_range, idx, rc = _page_checks(state, "ref: page_ids", page_ids)
    partial = _partial_last_pages(state).at[idx].get(mode="fill", fill_value=False)
    status = first_error((is_req & ~in_range, Status.BAD_PAGE), (is_req & (rc == 0), Status.FREE_PAGE),
                          (is_req & partial, Status.PARTIAL_PAGE))
    apply = jnp.all(status == Status.OK)
    refcount = state.refcount.at[jnp.where(apply, idx, state.config.num_pages)].add(1, mode="drop")
    return state._replace(refcount=refcount), status


def unref(state: CacheState, page_ids):
    """Drop external references taken with `ref` (int32 [K], < 0 = padding). A page whose count
    reaches 0 is free. Refused where it would go below 0 or below the references that sequences'
    page tables hold (use `release`/`truncate` for those). Returns (state, status [K]); all-or-nothing."""
    state = check_state(state, "unref")
    cfg = state.config
    page_ids, is_req, in_range, idx, rc = _page_checks(state, "unref: page_ids", page_ids)
    count = jnp.zeros((cfg.num_pages,), _I32).at[idx].add(1, mode="drop")
    held = jnp.zeros((cfg.num_pages,), _I32).at[
        jnp.where(state.page_table >= 0, state.page_table, cfg.num_pages)].add(1, mode="drop")
    after = rc - count.at[idx].get(mode="fill", fill_value=0)
    status = first_error(
        (is_req & ~in_range, Status.BAD_PAGE),
        (is_req & (after < 0), Status.FREE_PAGE),
        (is_req & (after < held.at[idx].get(mode="fill", fill_value=0)), Status.PAGE_HELD),
    )
    apply = jnp.all(status == Status.OK)
    cand = jnp.where(apply, idx, cfg.num_pages)
    st = state._replace(refcount=state.refcount.at[cand].add(-1, mode="drop"))
    return _push_freed(st, state.refcount, cand), status
