"""Pure-JAX paged attention with FlashInfer's exact semantics: the CPU backend and the test oracle.

Four ops, one per FlashInfer wrapper the GPU backend runs:

    batch_decode   BatchDecodeWithPagedKVCacheWrapper   one query per request, paged K/V
    batch_prefill  BatchPrefillWithPagedKVCacheWrapper  ragged queries (CSR `qo_indptr`), paged K/V
    pod            PODWithPagedKVCacheWrapper           one contiguous-K/V prefill + a paged decode batch
    batch_pod      BatchPODWithPagedKVCacheWrapper      a paged batch prefill + a paged decode batch

They share one core (`_attend`): gather each query row's pages through the CSR page table, apply
FlashInfer's in-kernel position encoding, logits transform and masks, and a masked softmax that also
gives the base-2 log-sum-exp. Every shape is fixed by the config and the inputs, so each op jits once
however the lengths change, and runs under `lax.scan` with a traced `layer`.

Semantics, read from flashinfer 0.7.2.post1 (paths inside the `flashinfer` package;
`include/` = `data/include/flashinfer/`):

  * KV length of request b = `(pages_b - 1) * page_size + kv_last_page_len[b]`, 0 without pages
    (`include/page.cuh`, `paged_kv_t::get_length`). Only positions `j < kv_len` are read.
  * Logits (`include/attention/variants.cuh`, `DefaultAttention`): `s = q.k` in float32, then
      ALIBI:     s = s * sm_scale + slope[h] * (j - qo_idx)
      soft cap:  s = cap * tanh(s * sm_scale / cap)           (sm_scale goes INSIDE the tanh)
      otherwise: s = s * sm_scale
    where `qo_idx` is the query's row index inside its request (0 for decode: `include/attention/
    decode.cuh`, `compute_qk` passes `/*qo_idx=*/0`). With ALIBI and a soft cap both on, FlashInfer
    multiplies by sm_scale twice (`logits * params.sm_scale` in the ALiBi branch, then
    `soft_cap_pre_tanh_scale = sm_scale / cap`); this module does the same.
    The softmax runs in base 2 on `s * log2(e)` (`sm_scale_log2`).
  * ALiBi slopes per query head (`utils.py`, `get_alibi_slopes`; `include/pos_enc.cuh`,
    `get_alibi_slope`): with n = 2**floor(log2(H)), slope[h] = 2**(-8 (h+1) / n) for h < n, else
    2**(-4 (2 (h-n) + 1) / n). The bias origin is the query's row index, not its position, so it is a
    per-row constant away from textbook ALiBi: outputs equal textbook ALiBi, LSE differs.
  * Query position (RoPE, causal, window) = `kv_len - qo_len + qo_idx` (bottom-right aligned):
    decode uses `kv_len - 1` (`decode.cuh`, `q_rope_offset_val = kv_len - 1`), prefill
    `q_packed_idx + kv_len*group - qo_len*group` (`include/attention/prefill.cuh`,
    `q_smem_inplace_apply_rotary`).
  * Causal (`prefill.cuh`, `logits_mask`): masked where `kv_idx + qo_len > kv_len + q_idx`, i.e.
    attend `j <= query_pos`. Decode has no causal flag (its one query sits at the end).
  * Sliding window (`variants.cuh`, `LogitsMask`): keep `kv_idx + qo_len + window_left >= kv_len +
    qo_idx`, i.e. `j >= query_pos - window_left` (window_left + 1 keys, inclusive); -1 disables it.
  * ROPE_LLAMA applied in-kernel to q (at its query position) and to every k (at its kv position j),
    rotate-half (non-interleaved) over the whole head (`include/pos_enc.cuh`, `vec_apply_llama_rope`):
    freq[i] = rope_rcp_scale * rope_rcp_theta ** (2 (i mod D/2) / D) in float32 (`decode.cuh`;
    `prefill.cuh`, `compute_rope_freq`), with `rope_rcp_scale = 1/rope_scale`, `rope_rcp_theta =
    1/rope_theta` (`decode.py`, `prefill.py`, `pod.py`: `1.0 / rope_scale  # rope_rcp_scale`);
    x[i] * cos(pos * freq) -+ x[i +- D/2] * sin(pos * freq) for i < D/2 (resp. >= D/2).
  * LSE (`include/attention/state.cuh`, `get_lse`: `m + log2(d)` over the base-2 logits): the
    base-2 log-sum-exp of the transformed logits, float32; rows with nothing to attend give output 0
    (`variant_helper.cuh`, `OutputTransform`: `d_rcp = 0` when `m == -inf`) and LSE -inf here.
  * sm_scale defaults to `1/sqrt(head_dim)`; output dtype is q's (`out = torch.empty_like(q)`).
  * GQA: query head h reads kv head `h // (Hq // Hkv)` (`prefill.cuh`: `qo_head_idx =
    kv_head_idx * group_size + r`).

Robustness beyond FlashInfer (which leaves padding rows of `out` uninitialised): padding requests
and padding token rows give exactly 0 (LSE -inf), and no value outside the attended positions (a
free page filled with NaN, stale slots past `kv_len` in a last page) can reach the arithmetic: K and
V are zeroed by `jnp.where` before any product.

Options: `pos_encoding_mode`, `logits_soft_cap`, `window_left`, `causal` choose the computation (as
they choose FlashInfer's kernel variant) and must be static; `sm_scale`, `rope_scale`, `rope_theta`
may be Python floats or traced float scalars, and changing them never recompiles.

Cost: each op validates its inputs in Python, then runs one jitted core (inlined under an outer jit;
one compile per config, variant and shapes when called eagerly). The K/V of every query row is
gathered densely (`[rows, max_pages_per_seq * page_size, Hkv, D]` float32): fine for a CPU backend
and tests, not meant to be fast.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax import options
from seqattn_jax.config import KV_LAYOUTS, CacheConfig
from seqattn_jax.options import POS_ENCODING_MODES, is_number as _is_number
from seqattn_jax.packing import PackedBatch
from seqattn_jax.validation import check_config, check_layer, check_same_pages

__all__ = ["POS_ENCODING_MODES", "Q_DTYPES", "alibi_slopes", "batch_decode", "batch_prefill",
           "batch_pod", "pod"]

# dtypes of queries (and so of outputs). K/V may be any pool dtype of `config.KV_DTYPES`.
Q_DTYPES = ("float16", "bfloat16", "float32")
_LOG2E = math.log2(math.e)
_F32 = jnp.float32
_I32 = jnp.int32


# ----------------------------------------------------------------------------------------------
# Options and validation (all at trace time)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Variant:
    """The options that choose the computation; static (FlashInfer bakes them into the kernel)."""

    pos_encoding_mode: str
    logits_soft_cap: float  # 0: off
    window_left: int  # -1: off


class _Scalars(NamedTuple):
    """The options that are plain numbers: float32 scalars, traced inside the jitted cores so that
    changing them does not recompile. RoPE's are kept as FlashInfer's reciprocals."""

    sm_scale: jax.Array
    rope_rcp_scale: jax.Array
    rope_rcp_theta: jax.Array


def _positive_float(name: str, value):
    """A positive finite Python number, or a float scalar array (whose value cannot be checked)."""
    if _is_number(value):
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"{name} must be a positive finite float, got {value!r}")
        return float(value)
    if hasattr(value, "shape") and hasattr(value, "dtype") and value.shape == () \
            and jnp.issubdtype(value.dtype, jnp.floating):
        return value
    raise ValueError(f"{name} must be a positive float (or a float scalar array), got {value!r}")


def _reciprocal_f32(x):
    # Python numbers: 1/x in double, then float32, as FlashInfer passes `1.0 / rope_scale` (a double
    # argument) to a float kernel parameter.
    return jnp.asarray(1.0 / x if isinstance(x, float) else 1.0 / jnp.asarray(x, _F32), _F32)


def _make_options(config, *, sm_scale, logits_soft_cap, window_left, pos_encoding_mode, rope_scale,
                  rope_theta, return_lse) -> tuple[_Variant, _Scalars]:
    if not isinstance(config, CacheConfig):
        raise ValueError(f"config must be a seqattn_jax.CacheConfig, got {type(config).__name__}")
    head_dim = config.head_dim
    # the rules are `seqattn_jax.options`' (one copy); sm_scale / rope_* may also be traced here
    pos_encoding_mode = options.check_pos_encoding_mode(pos_encoding_mode)
    if pos_encoding_mode == "ROPE_LLAMA" and head_dim % 2:
        raise ValueError(f"pos_encoding_mode='ROPE_LLAMA' needs an even head_dim, got {head_dim}")
    window_left = options.check_window_left(window_left)
    logits_soft_cap = options.check_soft_cap(logits_soft_cap)
    options.check_bool("return_lse", return_lse)
    sm_scale = _positive_float("sm_scale", 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale)
    rope_scale = _positive_float("rope_scale", rope_scale)
    rope_theta = _positive_float("rope_theta", rope_theta)
    variant = _Variant(pos_encoding_mode, float(logits_soft_cap), int(window_left))
    scalars = _Scalars(jnp.asarray(sm_scale, _F32), _reciprocal_f32(rope_scale),
                       _reciprocal_f32(rope_theta))
    return variant, scalars


def _check_array(name: str, x):
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")


def _check_config_kv(config, kv):
    check_config(config, "reference")
    if config.kv_layout not in KV_LAYOUTS:
        raise ValueError(f"config.kv_layout must be one of {KV_LAYOUTS}, got {config.kv_layout!r}")
    _check_array("kv", kv)
    if tuple(kv.shape) != config.kv_shape:
        raise ValueError(f"kv must have shape config.kv_shape = {config.kv_shape} "
                         f"({config.kv_layout}: [num_layers*num_pages, 2, ...]), got {tuple(kv.shape)}")
    if jnp.dtype(kv.dtype) != config.jnp_dtype:
        raise ValueError(f"kv must have dtype config.dtype = {config.dtype}, got {jnp.dtype(kv.dtype).name}")


def _check_q(name: str, q, config: CacheConfig, rows: int | None, rows_what: str):
    _check_array(name, q)
    if q.ndim != 3:
        raise ValueError(f"{name} must be 3-D [{rows_what}, num_qo_heads, head_dim], got shape "
                         f"{tuple(q.shape)}")
    if jnp.dtype(q.dtype).name not in Q_DTYPES:
        raise ValueError(f"{name} must have a dtype in {Q_DTYPES}, got {jnp.dtype(q.dtype).name}")
    if q.shape[2] != config.head_dim:
        raise ValueError(f"{name}.shape[2] must be config.head_dim = {config.head_dim}, got {q.shape[2]}")
    hq, hkv = q.shape[1], config.num_kv_heads
    if hq < hkv or hq % hkv:
        raise ValueError(f"{name}.shape[1] (num_qo_heads = {hq}) must be a positive multiple of "
                         f"config.num_kv_heads = {hkv} (GQA)")
    if rows is not None and q.shape[0] != rows:
        raise ValueError(f"{name}.shape[0] must be {rows_what} = {rows}, got {q.shape[0]}")


def _check_packed(name: str, packed, config: CacheConfig) -> int:
    """Checks the CSR arrays the kernels read and that they address `config`'s pages; returns B."""
    if not isinstance(packed, PackedBatch):
        raise ValueError(f"{name} must be a seqattn_jax.PackedBatch, got {type(packed).__name__}")
    check_same_pages(name, config, packed.config, f"{name} (through its state)")
    b = packed.batch_size
    expected = {"kv_page_indptr": (b + 1,), "qo_indptr": (b + 1,), "kv_last_page_len": (b,)}
    for field, shape in expected.items():
        arr = getattr(packed, field)
        _check_array(f"{name}.{field}", arr)
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name}.{field} must have shape {shape} (B = {b}), got {tuple(arr.shape)}")
    for field in ("kv_page_indptr", "kv_page_indices", "kv_last_page_len", "qo_indptr"):
        arr = getattr(packed, field)
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name}.{field} must be int32, got {jnp.dtype(arr.dtype).name}")
    if packed.kv_page_indices.ndim != 1:
        raise ValueError(f"{name}.kv_page_indices must be 1-D, got shape {tuple(packed.kv_page_indices.shape)}")
    return b


def _check_layer(config: CacheConfig, layer):
    return check_layer(config, layer, "reference")


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def alibi_slopes(num_heads: int) -> np.ndarray:
    """FlashInfer's ALiBi slopes, float32 [num_heads] (`utils.py` `get_alibi_slopes`, equal to
    `include/pos_enc.cuh` `get_alibi_slope`); covers head counts that are not powers of two."""
    n = 2 ** int(math.floor(math.log2(num_heads)))
    h = np.arange(num_heads, dtype=np.float64)
    slopes = np.where(h < n, 2.0 ** (-8.0 * (h + 1) / n), 2.0 ** (-4.0 * (2 * (h - n) + 1) / n))
    return slopes.astype(np.float32)


def _kv_lengths(config: CacheConfig, packed: PackedBatch) -> jax.Array:
    """int32 [B] KV length of each request, exactly as FlashInfer derives it from the CSR arrays."""
    indptr = packed.kv_page_indptr.astype(_I32)
    num_pages = indptr[1:] - indptr[:-1]
    return jnp.where(num_pages > 0,
                     (num_pages - 1) * config.page_size + packed.kv_last_page_len.astype(_I32), 0)


def _page_table(config: CacheConfig, packed: PackedBatch) -> jax.Array:
    """int32 [B, max_pages_per_seq] layer-0 page ids of each request; 0 in slots past its pages."""
    indptr = packed.kv_page_indptr.astype(_I32)
    slot = jnp.arange(config.max_pages_per_seq, dtype=_I32)
    ids = jnp.take(packed.kv_page_indices.astype(_I32), indptr[:-1, None] + slot, mode="clip")
    return jnp.where(slot < (indptr[1:] - indptr[:-1])[:, None], ids, 0)


def _gather_kv(config: CacheConfig, kv, page_table, kv_len, layer):
    """K and V of N rows, float32 [N, max_pages_per_seq * page_size, Hkv, D] in token order.

    page_table: int32 [N, max_pages_per_seq] layer-0 ids; kv_len: int32 [N]. Positions `>= kv_len`
    are set to 0 with `jnp.where` (not a product), so a NaN in a page or slot nobody attends never
    reaches the arithmetic.
    """
    rows = page_table + layer * jnp.int32(config.num_pages)
    # mode="fill": an out-of-range page id reads NaN (visible), never another layer's page.
    pages = jnp.take(kv, rows, axis=0, mode="fill")  # [N, P, 2, page, Hkv, D] or [N, P, 2, Hkv, page, D]
    if config.kv_layout == "HND":
        pages = jnp.swapaxes(pages, 3, 4)
    n, p = page_table.shape
    shape = (n, p * config.page_size, config.num_kv_heads, config.head_dim)
    valid = (jnp.arange(shape[1], dtype=_I32)[None, :] < kv_len[:, None])[:, :, None, None]
    k = jnp.where(valid, pages[:, :, 0].reshape(shape).astype(_F32), 0.0)
    v = jnp.where(valid, pages[:, :, 1].reshape(shape).astype(_F32), 0.0)
    return k, v


def _rope_llama(x, pos, rcp_scale, rcp_theta):
    """FlashInfer's in-kernel LLaMA RoPE (rotate-half) of float32 `x[..., D]` at int `pos`
    (broadcastable to `x.shape[:-1]`); `rcp_scale`, `rcp_theta` are 1/rope_scale, 1/rope_theta."""
    half = x.shape[-1] // 2
    exponent = (2.0 * jnp.arange(half, dtype=_F32)) / jnp.float32(x.shape[-1])
    freq = rcp_scale * jnp.power(rcp_theta, exponent)  # [D/2], float32 like the kernel
    angle = jnp.asarray(pos, _F32)[..., None] * freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _transform_logits(s, q_idx, kv_pos, variant: _Variant, sm_scale):
    """FlashInfer's `DefaultAttention::LogitsTransform` and scaling, in natural-log units.

    s: float32 [R, Qn, Hq, L] raw q.k; q_idx: int32 [R, Qn] row index inside the request.
    """
    if variant.pos_encoding_mode == "ALIBI":
        slopes = jnp.asarray(alibi_slopes(s.shape[2]))[None, None, :, None]
        dist = (kv_pos[None, None, :] - q_idx[:, :, None]).astype(_F32)[:, :, None, :]
        s = s * sm_scale + slopes * dist
    if variant.logits_soft_cap > 0:
        cap = variant.logits_soft_cap
        s = cap * jnp.tanh(s * (sm_scale / cap))
    elif variant.pos_encoding_mode != "ALIBI":
        s = s * sm_scale
    return s


def _masked_softmax(s, mask):
    """Softmax of `s` over its last axis where `mask`; returns (probabilities, base-2 LSE).

    Fully masked rows give probabilities 0 and LSE -inf (never NaN).
    """
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    d = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(d > 0, d, 1.0)
    d, m = d[..., 0], m[..., 0]
    lse = jnp.where(d > 0, (m + jnp.log(jnp.where(d > 0, d, 1.0))) * _LOG2E, -jnp.inf)
    return p, lse


def _attend(q, k, v, kv_len, q_len, q_idx, row_valid, variant: _Variant, scalars: _Scalars,
            causal: bool):
    """Attention of R requests-or-rows, each with Qn queries against its own L keys.

    q: [R, Qn, Hq, D] (any float dtype); k, v: float32 [R, L, Hkv, D], zero past kv_len;
    kv_len, q_len: int32 [R]; q_idx: int32 [R, Qn] each query's row index inside its request
    (query position = kv_len - q_len + q_idx); row_valid: bool [R, Qn].
    Returns (out float32 [R, Qn, Hq, D], lse float32 [R, Qn, Hq]); invalid rows give 0 / -inf.
    """
    r, qn, hq, d = q.shape
    length, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    q = q.astype(_F32)
    kv_pos = jnp.arange(length, dtype=_I32)
    q_pos = kv_len[:, None] - q_len[:, None] + q_idx  # [R, Qn]
    if variant.pos_encoding_mode == "ROPE_LLAMA":
        q = _rope_llama(q, q_pos[:, :, None], scalars.rope_rcp_scale, scalars.rope_rcp_theta)
        k = _rope_llama(k, kv_pos[None, :, None], scalars.rope_rcp_scale, scalars.rope_rcp_theta)
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("rqhgd,rlhd->rqhgl", q.reshape(r, qn, hkv, group, d), k, precision=hi)
    s = _transform_logits(s.reshape(r, qn, hq, length), q_idx, kv_pos, variant, scalars.sm_scale)

    mask = (kv_pos[None, None, :] < kv_len[:, None, None]) & row_valid[:, :, None]  # [R, Qn, L]
    if causal:
        mask &= kv_pos[None, None, :] <= q_pos[:, :, None]
    if variant.window_left >= 0:
        mask &= kv_pos[None, None, :] >= q_pos[:, :, None] - variant.window_left
    p, lse = _masked_softmax(s, mask[:, :, None, :])

    out = jnp.einsum("rqhgl,rlhd->rqhgd", p.reshape(r, qn, hkv, group, length), v, precision=hi)
    out = jnp.where(row_valid[:, :, None, None], out.reshape(r, qn, hq, d), 0.0)
    return out, jnp.where(row_valid[:, :, None], lse, -jnp.inf)


# The jitted cores: validation happens before them, in Python. Inside another jit they inline; called
# eagerly they compile once per (config, variant, shapes) instead of once per primitive.

@functools.partial(jax.jit, static_argnames=("config", "variant"))
def _decode_core(config, variant, q, kv, packed, layer, scalars):
    """One query per request against its pages. Returns (out [B, Hq, D] in q.dtype, lse [B, Hq])."""
    b = q.shape[0]
    kv_len = _kv_lengths(config, packed)
    k, v = _gather_kv(config, kv, _page_table(config, packed), kv_len, layer)
    out, lse = _attend(q[:, None], k, v, kv_len, jnp.ones((b,), _I32), jnp.zeros((b, 1), _I32),
                       jnp.ones((b, 1), bool), variant, scalars, causal=False)
    return out[:, 0].astype(q.dtype), lse[:, 0]


@functools.partial(jax.jit, static_argnames=("config", "variant", "causal"))
def _prefill_core(config, variant, causal, q, kv, packed, layer, scalars):
    """Ragged rows (`qo_indptr`) against their request's pages. Returns ([T, Hq, D] q.dtype, [T, Hq])."""
    t_rows, b = q.shape[0], packed.batch_size
    qo_indptr = packed.qo_indptr.astype(_I32)
    row = jnp.arange(t_rows, dtype=_I32)
    # FlashInfer maps rows to requests through qo_indptr alone; rows past qo_indptr[B] are padding.
    # Request of row t = number of requests ending at or before t (a searchsorted without a loop).
    req = jnp.sum(qo_indptr[None, 1:] <= row[:, None], axis=1, dtype=_I32)
    row_valid = (row >= qo_indptr[0]) & (row < qo_indptr[b])
    req = jnp.minimum(req, b - 1)
    kv_len = _kv_lengths(config, packed)[req]
    q_len = (qo_indptr[1:] - qo_indptr[:-1])[req]
    q_idx = row - qo_indptr[req]
    k, v = _gather_kv(config, kv, _page_table(config, packed)[req], kv_len, layer)
    out, lse = _attend(q[:, None], k, v, kv_len, q_len, q_idx[:, None], row_valid[:, None], variant,
                       scalars, causal)
    return out[:, 0].astype(q.dtype), lse[:, 0]


@functools.partial(jax.jit, static_argnames=("variant", "causal"))
def _contiguous_core(variant, causal, q, k, v, scalars):
    """One request, q [Tq, Hq, D] against contiguous k, v [Tk, Hkv, D]. Returns ([Tq, Hq, D], [Tq, Hq])."""
    tq, tk = q.shape[0], k.shape[0]
    out, lse = _attend(q[None], k[None].astype(_F32), v[None].astype(_F32), jnp.full((1,), tk, _I32),
                       jnp.full((1,), tq, _I32), jnp.arange(tq, dtype=_I32)[None],
                       jnp.ones((1, tq), bool), variant, scalars, causal)
    return out[0].astype(q.dtype), lse[0]


def _result(outs, lses, return_lse):
    if len(outs) == 1:
        return (outs[0], lses[0]) if return_lse else outs[0]
    return (tuple(outs), tuple(lses)) if return_lse else tuple(outs)


_check_bool = options.check_bool


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def batch_decode(config: CacheConfig, q, kv, packed: PackedBatch, *, layer=0, sm_scale=None,
                 logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE", rope_scale=1.0,
                 rope_theta=1e4, return_lse=False):
    """Decode attention: one query per request over its paged K/V (FlashInfer's
    `BatchDecodeWithPagedKVCacheWrapper.run`).

    Args:
      config: the cache's `CacheConfig`.
      q: [B, Hq, D] float16/bfloat16/float32; row b is request b's query (at position kv_len_b - 1).
        Hq is any multiple of `config.num_kv_heads`.
      kv: the all-layer pool, `config.kv_shape`, `config.dtype` (fp8 pools are upcast).
      packed: `PackedBatch` with B requests; reads `kv_page_indptr`, `kv_page_indices`,
        `kv_last_page_len` (the arrays FlashInfer gets). Requests without pages (padding) give 0.
      layer: Python int or traced int32 scalar; pages are read at `layer * num_pages + page`.
      sm_scale: softmax scale, default `1/sqrt(D)` (a float or a float32 scalar array).
      logits_soft_cap: > 0 gives `cap * tanh(q.k * sm_scale / cap)`; 0 disables (static).
      window_left: >= 0 attends only kv positions `j >= kv_len - 1 - window_left`; -1 disables (static).
      pos_encoding_mode: "NONE", "ROPE_LLAMA" (RoPE applied in-kernel to q and k) or "ALIBI".
      rope_scale, rope_theta: RoPE parameters (positions are divided by rope_scale).
      return_lse: also return the base-2 log-sum-exp.

    Returns:
      out [B, Hq, D] in q.dtype, or (out, lse float32 [B, Hq]) with return_lse.
    """
    variant, scalars = _make_options(
        config, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
        pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
        return_lse=return_lse)
    _check_config_kv(config, kv)
    b = _check_packed("packed", packed, config)
    _check_q("q", q, config, b, "packed.batch_size (one query per request)")
    layer = _check_layer(config, layer)
    out, lse = _decode_core(config, variant, q, kv, packed, layer, scalars)
    return _result((out,), (lse,), return_lse)


def batch_prefill(config: CacheConfig, q, kv, packed: PackedBatch, *, layer=0, causal=True,
                  sm_scale=None, logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE",
                  rope_scale=1.0, rope_theta=1e4, return_lse=False):
    """Prefill / append attention: ragged queries over paged K/V (FlashInfer's
    `BatchPrefillWithPagedKVCacheWrapper.run`).

    Args:
      q: [T, Hq, D] float16/bfloat16/float32; rows `qo_indptr[b]:qo_indptr[b+1]` are request b's
        queries, query i of a request with q_len rows sitting at position `kv_len - q_len + i`
        (its K/V must already be in the pages). Rows past `qo_indptr[B]` are padding and give 0.
      packed: `PackedBatch` with B requests and T token rows; reads the KV CSR arrays and `qo_indptr`.
      causal: bottom-right aligned causal mask, query i attends `j <= kv_len - q_len + i`.
      Other arguments as in `batch_decode` (window_left keeps `j >= query_position - window_left`).

    Returns:
      out [T, Hq, D] in q.dtype, or (out, lse float32 [T, Hq]) with return_lse.
    """
    variant, scalars = _make_options(
        config, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
        pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
        return_lse=return_lse)
    _check_config_kv(config, kv)
    _check_packed("packed", packed, config)
    _check_q("q", q, config, packed.num_token_rows, "packed.num_token_rows (T)")
    layer = _check_layer(config, layer)
    causal = _check_bool("causal", causal)
    out, lse = _prefill_core(config, variant, causal, q, kv, packed, layer, scalars)
    return _result((out,), (lse,), return_lse)


def pod(config: CacheConfig, q_p, k_p, v_p, q_d, kv, packed_d: PackedBatch, *, layer=0, causal_p=True,
        sm_scale=None, logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE", rope_scale=1.0,
        rope_theta=1e4, return_lse=False):
    """Prefill-on-decode: ONE prefill request with contiguous K/V plus a paged decode batch
    (FlashInfer's `PODWithPagedKVCacheWrapper.run`), with the same options for both parts.

    Args:
      q_p: [Tp, Hq, D] prefill queries; query i sits at position `Tk - Tp + i`.
      k_p, v_p: [Tk, Hkv, D] the prefill request's whole K/V (NHD, any float dtype); with causal_p
        Tk must be >= Tp (FlashInfer raises otherwise).
      q_d: [B, Hq, D] decode queries, one per request of `packed_d`.
      kv, packed_d, layer and the options: as in `batch_decode` (the decode part reads the pool).
      causal_p: bottom-right aligned causal mask on the prefill part.

    Returns:
      (out_p [Tp, Hq, D] in q_p.dtype, out_d [B, Hq, D] in q_d.dtype), or with return_lse
      ((out_p, out_d), (lse_p [Tp, Hq], lse_d [B, Hq])), the structure of FlashInfer's batch POD
      (its single-request POD wrapper returns no LSE at all).

    Note: FlashInfer's POD wrappers have no soft cap (pod.py hard-codes `logits_soft_cap = 0.0` in
    plan and run); here `logits_soft_cap` applies to both parts, equal to a separate prefill and
    decode. A GPU backend has to reject it or split the call.
    """
    variant, scalars = _make_options(
        config, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
        pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
        return_lse=return_lse)
    _check_config_kv(config, kv)
    b = _check_packed("packed_d", packed_d, config)
    _check_q("q_p", q_p, config, None, "Tp")
    _check_q("q_d", q_d, config, b, "packed_d.batch_size (one query per request)")
    if q_p.shape[1] != q_d.shape[1]:
        raise ValueError(f"q_p and q_d must have the same num_qo_heads, got {q_p.shape[1]} and {q_d.shape[1]}")
    for name, x in (("k_p", k_p), ("v_p", v_p)):
        _check_array(name, x)
        if x.ndim != 3 or tuple(x.shape[1:]) != (config.num_kv_heads, config.head_dim):
            raise ValueError(f"{name} must have shape [Tk, num_kv_heads = {config.num_kv_heads}, "
                             f"head_dim = {config.head_dim}] (NHD), got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {jnp.dtype(x.dtype).name}")
    if tuple(k_p.shape) != tuple(v_p.shape) or k_p.dtype != v_p.dtype:
        raise ValueError(f"k_p and v_p must have the same shape and dtype, got {tuple(k_p.shape)} "
                         f"{jnp.dtype(k_p.dtype).name} and {tuple(v_p.shape)} {jnp.dtype(v_p.dtype).name}")
    causal_p = _check_bool("causal_p", causal_p)
    if causal_p and k_p.shape[0] < q_p.shape[0]:
        raise ValueError(f"with causal_p, k_p must have at least as many rows as q_p "
                         f"(kv_len >= qo_len), got Tk = {k_p.shape[0]} < Tp = {q_p.shape[0]}")
    layer = _check_layer(config, layer)
    out_p, lse_p = _contiguous_core(variant, causal_p, q_p, k_p, v_p, scalars)
    out_d, lse_d = _decode_core(config, variant, q_d, kv, packed_d, layer, scalars)
    return _result((out_p, out_d), (lse_p, lse_d), return_lse)


def batch_pod(config: CacheConfig, q_p, packed_p: PackedBatch, q_d, packed_d: PackedBatch, kv, *,
              layer=0, causal_p=True, sm_scale=None, logits_soft_cap=0.0, window_left=-1,
              pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, return_lse=False):
    """A paged batch prefill and a paged decode batch in one call (FlashInfer's
    `BatchPODWithPagedKVCacheWrapper.run`), both reading the same pool with the same options.

    Args:
      q_p: [Tp, Hq, D] prefill rows of `packed_p` (as `batch_prefill`'s q).
      q_d: [B_d, Hq, D] decode queries of `packed_d` (as `batch_decode`'s q).
      Other arguments as in `batch_prefill` / `batch_decode`; `causal_p` masks the prefill part.

    Returns:
      (out_p, out_d), or ((out_p, out_d), (lse_p, lse_d)) with return_lse, as FlashInfer's code
      returns (its docstring says otherwise). Same soft-cap note as `pod`.
    """
    variant, scalars = _make_options(
        config, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
        pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta,
        return_lse=return_lse)
    _check_config_kv(config, kv)
    _check_packed("packed_p", packed_p, config)
    b_d = _check_packed("packed_d", packed_d, config)
    _check_q("q_p", q_p, config, packed_p.num_token_rows, "packed_p.num_token_rows (T)")
    _check_q("q_d", q_d, config, b_d, "packed_d.batch_size (one query per request)")
    if q_p.shape[1] != q_d.shape[1]:
        raise ValueError(f"q_p and q_d must have the same num_qo_heads, got {q_p.shape[1]} and {q_d.shape[1]}")
    causal_p = _check_bool("causal_p", causal_p)
    layer = _check_layer(config, layer)
    out_p, lse_p = _prefill_core(config, variant, causal_p, q_p, kv, packed_p, layer, scalars)
    out_d, lse_d = _decode_core(config, variant, q_d, kv, packed_d, layer, scalars)
    return _result((out_p, out_d), (lse_p, lse_d), return_lse)
