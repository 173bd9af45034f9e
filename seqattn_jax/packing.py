"""`PackedBatch`: the CSR page-table metadata of one batch, in FlashInfer's format.

`pack_for_flashinfer(state, seq_ids, new_lens)` turns the allocator's per-slot page table into the
arrays FlashInfer's plan/run (and the reference backend) read. Every array has a shape fixed by the
batch size B, the config and the token capacity T, so a jitted step compiles once while lengths change.

Conventions (FlashInfer's, see ../shared/notes/flashinfer.md):
  * request b holds pages `kv_page_indices[kv_page_indptr[b] : kv_page_indptr[b+1]]` (layer-0 ids);
    its KV length is `(num_pages_b - 1) * page_size + kv_last_page_len[b]` = `seq_lens[b]`.
  * `seq_lens` are lengths AFTER this step's tokens (allocate first, then pack): the tokens appended
    this step sit at positions `seq_lens[b] - new_lens[b] + j`.
  * query/new-token rows of request b are `qo_indptr[b] : qo_indptr[b+1]` of a `[T, ...]` array;
    rows past `qo_indptr[B]` are padding. A decode batch (`new_lens=None`) has one row per request,
    row b = request b (`qo_indptr = arange(B + 1)`), padding requests included (their row is unused).
  * padding requests (seq_id < 0) hold no pages, `kv_last_page_len == 0`, `seq_lens == 0`, and no
    rows (a prefill batch) or an unused row (a decode batch). A request that cannot be packed (an id
    that is not an active slot, a repeated id, a bad length) is packed as padding and reported in
    `status` (`seqattn_jax.Status` codes): `sj.ok(packed.status)`, or `checked.pack_for_flashinfer`
    raises.
  * chunked prefill: `kv_lens` gives each request's KV length after this chunk when the state holds
    more (the whole prompt was allocated up front); by default it is the state's length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from seqattn_jax.config import CacheConfig
from seqattn_jax.state import check_state
from seqattn_jax.validation import Status, as_ids, first_error


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Page-table metadata for a batch of B requests with T token rows (all int32).

    Attributes:
      seq_ids: [B] slot of each request; -1 marks a padding request.
      kv_page_indptr: [B+1] CSR offsets into `kv_page_indices`.
      kv_page_indices: [B * max_pages_per_seq] layer-0 page ids; entries past `kv_page_indptr[B]` are 0.
      kv_last_page_len: [B] tokens in each request's last page, `1..page_size` (0 for padding).
      seq_lens: [B] KV length of each request including this step's tokens (0 for padding).
      qo_indptr: [B+1] CSR offsets of each request's new tokens / queries in a `[T, ...]` array.
      batch_indices: [T] request index of each token row; -1 for padding rows.
      positions: [T] position of each token row in its sequence; -1 for padding rows.
      token_pages: [T] layer-0 page id that holds each token row; -1 for padding rows.
      token_offsets: [T] slot of the token inside that page, `0..page_size-1`; -1 for padding rows.
      status: [B] `Status` per request (OK, or why it was packed as padding); None when the batch
        was built by hand.
      config: the `CacheConfig` of the state it was packed from (static; None when built by hand).
        Ops that write or read the pool check that it addresses the same pages as the pool's config.
    """

    seq_ids: jax.Array
    kv_page_indptr: jax.Array
    kv_page_indices: jax.Array
    kv_last_page_len: jax.Array
    seq_lens: jax.Array
    qo_indptr: jax.Array
    batch_indices: jax.Array
    positions: jax.Array
    token_pages: jax.Array
    token_offsets: jax.Array
    status: jax.Array | None = None
    config: CacheConfig | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def batch_size(self) -> int:
        return self.seq_ids.shape[0]

    @property
    def num_token_rows(self) -> int:
        """T, the static number of token rows (real tokens + padding)."""
        return self.positions.shape[0]

    @property
    def valid(self) -> jax.Array:
        """bool [B]: the requests that are not padding."""
        return self.seq_ids >= 0

    def layer_page_indices(self, layer, num_pages: int) -> jax.Array:
        """`kv_page_indices` of layer `layer` (int or traced int32) in the all-layer pool."""
        return self.kv_page_indices + jnp.asarray(layer, jnp.int32) * jnp.int32(num_pages)


def pack_for_flashinfer(state, seq_ids, new_lens=None, *, max_tokens: int | None = None,
                        kv_lens=None) -> PackedBatch:
    """Pack the page tables of `seq_ids` into FlashInfer's CSR format.

    Args:
      state: a `CacheState` whose `seq_lens` already count this step's tokens (allocate first).
      seq_ids: int32 [B] slots; ids < 0 are padding requests (no pages, no token rows: attention
        outputs 0 for them). An id >= max_seqs, an inactive slot or a repeated id is packed as
        padding too, and `status` says so (BAD_SLOT, INACTIVE, DUPLICATE): its rows are never
        written, so a repeated id cannot write one position twice.
      new_lens: int32 [B] tokens appended this step per request (the queries of a prefill chunk),
        laid out back to back in request order. None means a decode step: one token per valid
        request, in row b for request b.
      max_tokens: static T, the number of token rows (the leading dim of the step's q/k/v). Defaults
        to B when `new_lens` is None; required otherwise.
      kv_lens: int32 [B] or None: each request's KV length after this step's tokens, for a chunked
        prefill whose state already holds the whole prompt (the chunk's tokens sit at positions
        `kv_lens[b] - new_lens[b] ..`, attention reads `kv_lens[b]` tokens). Must be in
        `[new_lens[b], seq_len]`. None: the state's `seq_lens`.
    Returns:
      A `PackedBatch` with shapes fixed by B, T and the config. A request fails (packed as padding,
      `status[b] != OK`) if its id is not an active slot or repeats (see above), if `new_lens[b]` or
      `kv_lens[b]` is out of range (BAD_LENGTH), or if its tokens do not fit the T rows (TOO_LONG).
      `sj.ok(packed.status)` is True iff every request was packed; the others are packed either way.
    """
    from seqattn_jax.state import _slot_checks, cumsum  # noqa: PLC0415 - avoids an import cycle

    state = check_state(state, "pack_for_flashinfer")
    cfg = state.config
    seq_ids = as_ids("pack_for_flashinfer: seq_ids", seq_ids)
    B, M, ps = seq_ids.shape[0], cfg.max_pages_per_seq, cfg.page_size
    if new_lens is None:
        T = B if max_tokens is None else max_tokens
    else:
        new_lens = as_ids("pack_for_flashinfer: new_lens", new_lens)
        if new_lens.shape != seq_ids.shape:
            raise ValueError(f"pack_for_flashinfer: new_lens must have shape {seq_ids.shape}, "
                             f"got {new_lens.shape}")
        if max_tokens is None:
            raise ValueError("pack_for_flashinfer: max_tokens (static number of token rows) is "
                             "required when new_lens is given")
        T = max_tokens
    if isinstance(T, bool) or not isinstance(T, int) or T <= 0:
        raise ValueError(f"pack_for_flashinfer: max_tokens must be a positive Python int, got {T!r}")
    if kv_lens is not None:
        kv_lens = as_ids("pack_for_flashinfer: kv_lens", kv_lens)
        if kv_lens.shape != seq_ids.shape:
            raise ValueError(f"pack_for_flashinfer: kv_lens must have shape {seq_ids.shape}, "
                             f"got {kv_lens.shape}")

    is_req, in_range, dup, slot = _slot_checks(state, seq_ids)
    # Every occurrence of a repeated id fails (none is silently preferred), so no token row of
    # either can write a position the other also writes.
    active = state.active.at[slot].get(mode="fill", fill_value=False)
    held = jnp.where(active, state.seq_lens.at[slot].get(mode="fill", fill_value=0), 0)
    lens = held if kv_lens is None else kv_lens
    new_req = jnp.ones_like(seq_ids) if new_lens is None else new_lens
    bad_len = (new_req < 0) | (new_req > lens) | (lens > held) | (lens < 0)
    pre = first_error(
        (is_req & ~in_range, Status.BAD_SLOT),
        (dup, Status.DUPLICATE),
        (is_req & ~active, Status.INACTIVE),
        (is_req & bad_len, Status.BAD_LENGTH),
    )
    valid = is_req & (pre == Status.OK)
    new = jnp.where(valid, new_req, 0)
    if new_lens is None:
        overflow = valid & (jnp.arange(B, dtype=jnp.int32) >= T)  # decode: row b = request b
    else:
        overflow = valid & (cumsum(new) > T)
    status = jnp.where(overflow, jnp.int32(Status.TOO_LONG), pre)
    valid = valid & ~overflow
    out_ids = jnp.where(valid, seq_ids, -1)
    lens = jnp.where(valid, lens, 0)
    npages = cfg.pages_for(lens)
    zero = jnp.zeros((1,), jnp.int32)
    kv_indptr = jnp.concatenate([zero, cumsum(npages)])
    last_len = jnp.where(npages > 0, lens - (npages - 1) * ps, 0)

    # kv_page_indices: row b's first npages[b] page-table entries, laid end to end (one scatter).
    rows = state.page_table.at[slot].get(mode="fill", fill_value=0)  # [B, M]
    j = jnp.arange(M, dtype=jnp.int32)[None, :]
    dest = jnp.where(j < npages[:, None], kv_indptr[:-1, None] + j, B * M)
    kv_indices = jnp.zeros((B * M,), jnp.int32).at[dest].set(rows, mode="drop")

    t = jnp.arange(T, dtype=jnp.int32)
    if new_lens is None:
        # Decode: row b is request b's query (padding requests keep their row, unused), so a model
        # that computes q/k/v per slot lines up with the kernel's q[B] without any gather.
        new = valid.astype(jnp.int32)
        qo_indptr = jnp.minimum(jnp.arange(B + 1, dtype=jnp.int32), T)
        b = jnp.minimum(t, B - 1)
        row_ok = (t < B) & valid[b]
    else:
        new = jnp.where(valid, new, 0)
        qo_indptr = jnp.concatenate([zero, cumsum(new)])
        # Token row t belongs to request b = #{requests whose rows end at or before t}.
        b = jnp.minimum(jnp.sum(qo_indptr[None, 1:] <= t[:, None], axis=1, dtype=jnp.int32), B - 1)
        row_ok = t < qo_indptr[B]
    pos = lens[b] - new[b] + (t - qo_indptr[b])
    page = rows[b, jnp.clip(pos // ps, 0, M - 1)]
    neg = jnp.int32(-1)
    return PackedBatch(
        seq_ids=out_ids,
        kv_page_indptr=kv_indptr,
        kv_page_indices=kv_indices,
        kv_last_page_len=last_len,
        seq_lens=lens,
        qo_indptr=qo_indptr,
        batch_indices=jnp.where(row_ok, b, neg),
        positions=jnp.where(row_ok, pos, neg),
        token_pages=jnp.where(row_ok, page, neg),
        token_offsets=jnp.where(row_ok, pos % ps, neg),
        status=status,
        config=cfg,
    )
