"""Head-level ids: one unique int32 id per (sequence, kv head), and the way back.

seqattn's `HeadIDGenerator` packed the head into the low bits (`seq << log2(heads) | head`), which
collides for head counts that are not powers of two (6 heads: (0, 4) and (1, 0)...). Here the id is
`seq_id * num_heads + head`, a bijection for any `num_heads`, checked to fit int32. Head-level paging
treats each (sequence, head) as its own sequence: use these ids as slots of a config with
`num_kv_heads=1` and `max_seqs >= max_sequences * num_heads`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

_INT32_MAX = int(np.iinfo(np.int32).max)


def _check_heads(num_heads) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    return int(num_heads)


def head_ids(seq_ids, heads, num_heads: int):
    """int32 id of each (seq_ids[i], heads[i]) pair (broadcasting): `seq_id * num_heads + head`.

    Negative seq ids stay negative (-1: padding). Works on Python ints, numpy and JAX arrays (jit ok).
    """
    num_heads = _check_heads(num_heads)
    seq_ids, heads = jnp.asarray(seq_ids, jnp.int32), jnp.asarray(heads, jnp.int32)
    return jnp.where(seq_ids < 0, -1, seq_ids * num_heads + heads)


def split_head_ids(ids, num_heads: int):
    """Inverse of `head_ids`: (seq_ids, heads) int32 arrays; negative ids give (-1, -1)."""
    num_heads = _check_heads(num_heads)
    ids = jnp.asarray(ids, jnp.int32)
    seq, head = jnp.divmod(ids, num_heads)
    return jnp.where(ids < 0, -1, seq), jnp.where(ids < 0, -1, head)


@dataclasses.dataclass(frozen=True)
class HeadIDGenerator:
    """seqattn-compatible host-side helper over `head_ids` for `num_kv_heads` heads.

    `max_seqs` (optional) bounds the sequence ids so every id is known to fit int32 up front.
    """

    num_kv_heads: int
    max_seqs: int | None = None

    def __post_init__(self):
        _check_heads(self.num_kv_heads)
        if self.max_seqs is not None and self.max_seqs * self.num_kv_heads - 1 > _INT32_MAX:
            raise ValueError(f"HeadIDGenerator: max_seqs * num_kv_heads = "
                             f"{self.max_seqs * self.num_kv_heads} ids do not fit int32")

    def _check_ids(self, seq_id: int, head_idx: int):
        if not 0 <= head_idx < self.num_kv_heads:
            raise ValueError(f"head_idx must be in [0, {self.num_kv_heads}), got {head_idx}")
        limit = self.max_seqs if self.max_seqs is not None else (_INT32_MAX + 1) // self.num_kv_heads
        if not 0 <= seq_id < limit:
            raise ValueError(f"seq_id must be in [0, {limit}), got {seq_id}")

    def get_head_id(self, seq_id: int, head_idx: int) -> int:
        """The id of head `head_idx` of sequence `seq_id` (Python ints)."""
        self._check_ids(int(seq_id), int(head_idx))
        return int(seq_id) * self.num_kv_heads + int(head_idx)

    def get_seq_and_head(self, head_id: int) -> tuple[int, int]:
        """Inverse of `get_head_id`."""
        if head_id < 0:
            raise ValueError(f"head_id must be >= 0, got {head_id}")
        return divmod(int(head_id), self.num_kv_heads)

    def head_ids_for(self, seq_ids):
        """int32 [len(seq_ids), num_kv_heads]: every head id of each sequence (array version)."""
        seq_ids = jnp.asarray(seq_ids, jnp.int32)
        return head_ids(seq_ids[:, None], jnp.arange(self.num_kv_heads, dtype=jnp.int32)[None, :],
                        self.num_kv_heads)
