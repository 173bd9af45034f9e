"""`CacheConfig`: the static, hashable description of a paged KV cache.

Everything that fixes an array shape lives here, so a jitted step that closes over (or takes as a
static argument) one config compiles once however the sequence lengths change.

The KV pool is ONE array for all layers (see `seqattn_jax.kv`):

    NHD: kv[num_layers * num_pages, 2, page_size, num_kv_heads, head_dim]
    HND: kv[num_layers * num_pages, 2, num_kv_heads, page_size, head_dim]

Page `p` of layer `l` is row `l * num_pages + p`; axis 1 holds K (0) and V (1). Page tables in
`CacheState` and `PackedBatch` hold layer-0 ids in `[0, num_pages)`; a layer adds its offset.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KV_LAYOUTS = ("NHD", "HND")
# dtypes the pool may hold. fp8 pools are storage only for the reference backend (it upcasts).
KV_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
# What FlashInfer's kernels (0.7.2.post1, as this package builds them) run; the reference backend
# runs any head_dim, page_size and dtype above. `CacheConfig.flashinfer_unsupported_reason` says
# which of a config's fields rules FlashInfer out.
FLASHINFER_HEAD_DIMS = (64, 128, 256)
FLASHINFER_KV_DTYPES = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
# Page ids of every layer must fit an int32 index.
_INT32_MAX = np.iinfo(np.int32).max


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"CacheConfig.{name} must be a positive int, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Static shape of a paged KV cache.

    Attributes:
      num_pages: pages per layer (the allocator's pool; page ids are `0 .. num_pages-1`).
      page_size: tokens per page.
      num_kv_heads: K/V heads (queries may have any multiple of this: GQA).
      head_dim: size of one head.
      max_seqs: sequence slots; a sequence id is a slot index in `[0, max_seqs)`.
      max_pages_per_seq: the longest sequence is `max_pages_per_seq * page_size` tokens.
      num_layers: layers sharing the pool (one allocation serves every layer).
      dtype: the pool's dtype, a name such as "float16" or anything `np.dtype` accepts
        (stored as its name so the config stays hashable).
      kv_layout: "NHD" (page, token, head, dim) or "HND" (page, head, token, dim).

    Any positive sizes are accepted: the pure-JAX reference backend runs them all. FlashInfer's
    kernels need head_dim in {64, 128, 256} and a float16 / bfloat16 (or fp8, decode only) pool;
    any page_size, head count and layout (`flashinfer_unsupported_reason()` says what rules a
    config out). With `backend="auto"` such a config runs on the reference backend with a warning;
    `backend="flashinfer"` raises at plan time.
    """

    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    max_seqs: int
    max_pages_per_seq: int
    num_layers: int = 1
    dtype: str = "float16"
    kv_layout: str = "NHD"

    def __post_init__(self):
        for name in ("num_pages", "page_size", "num_kv_heads", "head_dim", "max_seqs",
                     "max_pages_per_seq", "num_layers"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        try:
            dtype_name = np.dtype(self.dtype).name if not isinstance(self.dtype, str) else self.dtype
            import jax.numpy as jnp  # noqa: PLC0415 - jnp knows bfloat16/fp8 names numpy lacks

            dtype_name = jnp.dtype(dtype_name).name
        except TypeError as e:
            raise ValueError(f"CacheConfig.dtype must be one of {KV_DTYPES}, got {self.dtype!r}") from e
        if dtype_name not in KV_DTYPES:
            raise ValueError(f"CacheConfig.dtype must be one of {KV_DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype_name)
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"CacheConfig.kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.max_pages_per_seq > self.num_pages:
            raise ValueError(
                f"CacheConfig.max_pages_per_seq ({self.max_pages_per_seq}) must be <= num_pages "
                f"({self.num_pages})")
        if self.num_layers * self.num_pages > _INT32_MAX:
            raise ValueError(
                f"CacheConfig: num_layers * num_pages = {self.num_layers * self.num_pages} page ids do "
                f"not fit int32")
        if self.max_seqs * self.max_pages_per_seq > _INT32_MAX:
            raise ValueError("CacheConfig: max_seqs * max_pages_per_seq does not fit int32")

    def flashinfer_unsupported_reason(self) -> str | None:
        """Why FlashInfer's kernels cannot run this cache whatever the queries and options (a
        message naming the field and what is allowed), or None. Per-call limits (query dtype, GQA
        group, options) are checked when a plan is made."""
        if self.dtype not in FLASHINFER_KV_DTYPES:
            return (f"CacheConfig.dtype={self.dtype!r}: FlashInfer's kernels take {FLASHINFER_KV_DTYPES} "
                    f"pools (fp8: decode only)")
        if self.head_dim not in FLASHINFER_HEAD_DIMS:
            return f"CacheConfig.head_dim={self.head_dim}: FlashInfer is compiled for head_dim in {FLASHINFER_HEAD_DIMS}"
        return None

    @property
    def max_seq_len(self) -> int:
        """Longest sequence a slot can hold, in tokens."""
        return self.max_pages_per_seq * self.page_size

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp  # noqa: PLC0415

        return jnp.dtype(self.dtype)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """Shape of the pool that `seqattn_jax.kv.init_kv` makes (all layers)."""
        total = self.num_layers * self.num_pages
        if self.kv_layout == "NHD":
            return (total, 2, self.page_size, self.num_kv_heads, self.head_dim)
        return (total, 2, self.num_kv_heads, self.page_size, self.head_dim)

    def pages_for(self, num_tokens):
        """Pages needed to hold `num_tokens` tokens (ceil division; works on ints and arrays)."""
        return (num_tokens + self.page_size - 1) // self.page_size
