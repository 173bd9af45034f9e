"""The KV page pool: one array for every layer, and the writes into it.

Layout (see `CacheConfig`): NHD `kv[L * P, 2, page_size, Hkv, D]`, HND `kv[L * P, 2, Hkv, page_size, D]`,
K at `[:, 0]` and V at `[:, 1]`; page p of layer l is row `l * P + p`. One pool lets a `lax.scan` over
layers carry the whole pool and address a layer by an index offset, with no slice materialised.

Writes are scatters. Under `jax.jit(..., donate_argnums=...)` of the pool XLA performs them in place
(no copy of the pool); without donation a functional update copies the whole pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqattn_jax.config import CacheConfig
from seqattn_jax.packing import PackedBatch
from seqattn_jax.validation import check_config, check_layer, check_pool, check_row_dtype, check_same_pages

__all__ = ["check_pool", "check_rows", "copy_pages", "init_kv", "scatter_kv", "scrub_pages", "stacked_rows"]


def init_kv(config: CacheConfig) -> jax.Array:
    """A zero-filled pool of shape `config.kv_shape` and dtype `config.dtype`."""
    check_config(config, "init_kv")
    return jnp.zeros(config.kv_shape, config.jnp_dtype)


def check_rows(config: CacheConfig, packed: PackedBatch, keys, values, where: str) -> None:
    """`keys, values` are [T, Hkv, D] each, or `values` is None and `keys` the stacked rows
    [T, 2, Hkv, D] (K at [:, 0], V at [:, 1]); T = `packed.num_token_rows`. Their dtype is the
    pool's (fp8 pools also take fp16/bf16/fp32 rows), and `packed` addresses this config's pages."""
    if not isinstance(packed, PackedBatch):
        raise ValueError(f"{where}: packed must be a seqattn_jax.PackedBatch, got {type(packed).__name__}")
    check_same_pages(where, config, packed.config, "packed (through its state)")
    for name, x in (("keys", keys), ("values", values)):
        if x is not None:
            if not (hasattr(x, "shape") and hasattr(x, "dtype")):
                raise ValueError(f"{where}: {name} must be an array, got {type(x).__name__}")
            check_row_dtype(config, name, x, where)
    t, h, d = packed.num_token_rows, config.num_kv_heads, config.head_dim
    if values is None:
        if tuple(keys.shape) != (t, 2, h, d):
            raise ValueError(f"{where}: with values=None, keys must be the stacked K/V rows "
                             f"[T, 2, num_kv_heads, head_dim] = {(t, 2, h, d)}, got "
                             f"{tuple(keys.shape)}")
        return
    for name, x in (("keys", keys), ("values", values)):
        if tuple(x.shape) != (t, h, d):
            raise ValueError(f"{where}: {name} must have shape [T, num_kv_heads, head_dim] = "
                             f"{(t, h, d)}, got {tuple(x.shape)}")


def stacked_rows(config: CacheConfig, packed: PackedBatch, keys, values, where: str) -> jax.Array:
    """[T, 2, Hkv, D] K/V rows (see `check_rows`)."""
    check_rows(config, packed, keys, values, where)
    return keys if values is None else jnp.stack([keys, values], axis=1)


def scatter_kv(config: CacheConfig, kv, keys, values, packed: PackedBatch, *, layer=0) -> jax.Array:
    """Write each token row's K/V at its page slot (`packed.token_pages/token_offsets`) in layer `layer`.

    Args:
      kv: the pool (`config.kv_shape`).
      keys, values: [T, Hkv, D] with T = `packed.num_token_rows`, in the pool's dtype (an fp8 pool
        also takes fp16/bf16/fp32 rows and quantizes them; any other dtype is an error). Padding
        rows (`packed.positions == -1`) are not written. Or `values=None` and `keys` the stacked
        rows [T, 2, Hkv, D] (K then V, e.g. a fused KV projection's output reshaped): this skips
        the stack copy per call (on an H200 the gain was within run-to-run noise in a step).
      layer: int or traced int32 scalar.
    Returns:
      The updated pool (in place when the caller donates it).
    """
    check_pool(config, kv, "append_kv")
    kvs = stacked_rows(config, packed, keys, values, "append_kv").astype(kv.dtype)  # [T,2,Hkv,D]
    layer = check_layer(config, layer, "append_kv")
    total = config.num_layers * config.num_pages
    page = jnp.where(packed.token_pages >= 0, packed.token_pages + layer * config.num_pages, total)
    off = jnp.maximum(packed.token_offsets, 0)
    which = jnp.arange(2, dtype=jnp.int32)[None, :]
    if config.kv_layout == "NHD":
        return kv.at[page[:, None], which, off[:, None]].set(kvs, mode="drop")
    # HND: the advanced indices (page, which, off) are split by the head slice, so numpy rules put
    # their broadcast dims [T, 2] first — matching kvs' [T, 2, Hkv, D].
    return kv.at[page[:, None], which, :, off[:, None]].set(kvs, mode="drop")


def copy_pages(config: CacheConfig, kv, copies) -> jax.Array:
    """Copy whole pages in every layer: `copies` int32 [N, 2] rows of (src page, dst page), layer-0 ids
    as `fork`/`truncate` return them; rows with a negative entry are skipped."""
    check_pool(config, kv, "copy_pages")
    copies = jnp.asarray(copies)
    if copies.ndim != 2 or copies.shape[1] != 2 or not jnp.issubdtype(copies.dtype, jnp.integer):
        raise ValueError(f"copy_pages: copies must be an int32 [N, 2] array, got {copies.dtype}{copies.shape}")
    copies = copies.astype(jnp.int32)
    total = config.num_layers * config.num_pages
    use = jnp.all(copies >= 0, axis=1)
    offs = (jnp.arange(config.num_layers, dtype=jnp.int32) * config.num_pages)[:, None]  # [L, 1]
    src = jnp.where(use, copies[:, 0], 0)[None, :] + offs
    dst = jnp.where(use[None, :], copies[:, 1][None, :] + offs, total)
    # Gather every source before any write, so a page that is both a source and a destination in
    # one call is read before it is overwritten.
    return kv.at[dst.reshape(-1)].set(kv[src.reshape(-1)], mode="drop")


def scrub_pages(config: CacheConfig, kv, pages_or_mask) -> jax.Array:
    """Zero whole pages (K and V) in every layer.

    Args:
      kv: the pool (`config.kv_shape`).
      pages_or_mask: either int32 [N] layer-0 page ids (entries < 0 or >= num_pages are skipped,
        duplicates are harmless) or bool [num_pages], True for each page to zero.
    Returns:
      The pool with those pages zeroed in all `num_layers` layers; every other element unchanged.
      A scatter of page rows (no pass over the whole pool), in place when the caller donates `kv`.
    """
    check_pool(config, kv, "scrub_pages")
    x = jnp.asarray(pages_or_mask)
    P = config.num_pages
    if x.dtype == jnp.bool_:
        if x.shape != (P,):
            raise ValueError(f"scrub_pages: a page mask must be bool [num_pages] = ({P},), got {x.shape}")
        x = jnp.nonzero(x, size=P, fill_value=P)[0]
    elif x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"scrub_pages: pages_or_mask must be int32 [N] page ids or bool [num_pages], "
                         f"got {x.dtype}{x.shape}")
    x = x.astype(jnp.int32)
    total = config.num_layers * P
    use = (x >= 0) & (x < P)
    offs = (jnp.arange(config.num_layers, dtype=jnp.int32) * P)[:, None]  # [L, 1]
    rows = jnp.where(use[None, :], x[None, :] + offs, total).reshape(-1)
    return kv.at[rows].set(jnp.zeros((), kv.dtype), mode="drop")
