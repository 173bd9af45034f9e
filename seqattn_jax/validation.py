"""Input checks and the one error surface of the allocator.

Two kinds of misuse, two kinds of report:
  * Static misuse (a wrong shape, dtype, type, or a state / pool / batch made from different
    `CacheConfig`s) raises `ValueError` at trace time, naming the argument and what is allowed.
  * Data-dependent misuse (an inactive slot, a double release, out of pages, ...) cannot raise
    inside `jax.jit`: every allocator op returns int32 `Status` codes, one per request:

        state, status = sj.allocate(state, seq_ids, new_lens)
        sj.ok(status)              # bool scalar: True iff the call was applied (all-or-nothing)
        status[i] != Status.OK     # request i is one reason the call was refused
        sj.raise_for_status("allocate", status, seq_ids)   # host side: AllocatorError naming each

    `seqattn_jax.checked` runs the same ops and raises (checked mode), and `checked.check_status`
    is the in-jit form for `jax.experimental.checkify`.

Everything here is pure JAX / numpy and imports no other seqattn_jax module except `config`.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax.config import CacheConfig

_I32 = jnp.int32


class Status(enum.IntEnum):
    """Why a request of an allocator call (or of `pack_for_flashinfer`) failed; int32, `OK` = 0."""

    OK = 0
    BAD_SLOT = 1  # sequence id >= config.max_seqs (or a half-padding fork pair)
    DUPLICATE = 2  # the same slot twice in one call
    INACTIVE = 3  # the op needs an existing sequence, the slot holds none
    ACTIVE = 4  # the op needs a free slot, the slot already holds a sequence
    TOO_LONG = 5  # would exceed config.max_pages_per_seq pages (or the batch's token rows)
    OUT_OF_PAGES = 6  # not enough free pages for this request (and those before it)
    BAD_LENGTH = 7  # negative length, truncation past the end, or a prefix not page-aligned
    BAD_PAGE = 8  # page id outside [0, num_pages)
    FREE_PAGE = 9  # ref/unref/share of a page that is not allocated
    PAGE_HELD = 10  # unref would free a page a sequence still holds
    PARTIAL_PAGE = 11  # ref of a sequence's partly filled last page (it will still be written)


STATUS_MESSAGES = {
    Status.BAD_SLOT: "sequence id is not a slot in [0, max_seqs)",
    Status.DUPLICATE: "the same sequence id appears twice in one call",
    Status.INACTIVE: "the slot holds no sequence",
    Status.ACTIVE: "the slot already holds a sequence",
    Status.TOO_LONG: "the sequence would need more than max_pages_per_seq pages",
    Status.OUT_OF_PAGES: "not enough free pages",
    Status.BAD_LENGTH: "invalid length",
    Status.BAD_PAGE: "page id is not in [0, num_pages)",
    Status.FREE_PAGE: "page is not allocated (refcount 0)",
    Status.PAGE_HELD: "unref would free a page that a sequence still holds",
    Status.PARTIAL_PAGE: "page is a sequence's partly filled last page, which is still written",
}


# ----------------------------------------------------------------------------- the error surface


def ok(status) -> jax.Array:
    """bool scalar: True iff every request's status is `Status.OK`, i.e. the all-or-nothing call was
    applied. False means the returned state IS the input state; `status != Status.OK` marks the
    requests that caused the refusal (the others read OK but were not applied either).
    A jax array (or tracer) gives a jax bool; a host array (numpy, list) a numpy bool, computed on the
    host with no device dispatch or compilation."""
    if isinstance(status, jax.Array):
        return jnp.all(status == Status.OK)
    return np.all(np.asarray(status) == Status.OK)


class AllocatorError(ValueError):
    """An allocator call (or a checked `pack_for_flashinfer`) was refused.

    Attributes: op (str), status (numpy int32 [B]), ids (numpy int32 [B] or None), and failures:
    a list of (request index, id or None, Status) for every failing request.
    """

    def __init__(self, op: str, status: np.ndarray, ids: np.ndarray | None):
        self.op, self.status, self.ids = op, status, ids
        bad = np.flatnonzero(status != Status.OK)
        self.failures = [(int(i), None if ids is None else int(ids[i]), Status(int(status[i])))
                         for i in bad]
        lines = [f"  request {i}{'' if sid is None else f' (id {sid})'}: {STATUS_MESSAGES[code]} "
                 f"({code.name})" for i, sid, code in self.failures[:16]]
        if len(self.failures) > 16:
            lines.append(f"  ... and {len(self.failures) - 16} more")
        super().__init__(f"{op}: {len(self.failures)} of {len(status)} requests failed, nothing was "
                         f"applied (the state is unchanged):\n" + "\n".join(lines))


def raise_for_status(op: str, status, ids=None) -> None:
    """Host side: raise `AllocatorError` naming every failing request when `status` (concrete int32
    [B] `Status` codes, as an op returned them) is not all OK; return None otherwise.
    Not for use inside `jax.jit` (use `seqattn_jax.checked.check_status` with checkify there)."""
    try:
        status = np.asarray(status)
    except jax.errors.TracerArrayConversionError as e:
        raise ValueError(f"raise_for_status({op!r}): status is traced; call it outside jax.jit, or "
                         f"use seqattn_jax.checked.check_status under checkify") from e
    if np.all(status == Status.OK):
        return
    raise AllocatorError(op, status, None if ids is None else np.asarray(ids))


def first_error(*conds) -> jax.Array:
    """int32 status per request: the code of the first (bool condition [B], code) pair that holds."""
    status = jnp.zeros(conds[0][0].shape, _I32)
    for cond, code in reversed(conds):
        status = jnp.where(cond, _I32(code), status)
    return status


# ----------------------------------------------------------------------------- trace-time checks


def check_config(config, where: str) -> CacheConfig:
    """`config` must be a `CacheConfig` (a clear ValueError, not an AttributeError, for None)."""
    if not isinstance(config, CacheConfig):
        raise ValueError(f"{where}: config must be a seqattn_jax.CacheConfig, got {type(config).__name__}")
    return config


def as_ids(name: str, x, ndim: int = 1) -> jax.Array:
    """`x` as int32 after checking it is an integer array of rank `ndim` (ids, lengths)."""
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a rank-{ndim} integer array, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype (int32), got {x.dtype}")
    return x.astype(_I32)


def check_layer(config: CacheConfig, layer, where: str) -> jax.Array:
    """`layer` as an int32 scalar; Python ints are range-checked (traced ones cannot be)."""
    if isinstance(layer, (bool, np.bool_)):
        raise ValueError(f"{where}: layer must be an int or an int32 scalar array, got {layer!r}")
    if isinstance(layer, (int, np.integer)):
        if not 0 <= layer < config.num_layers:
            raise ValueError(f"{where}: layer must be in [0, config.num_layers = {config.num_layers}), "
                             f"got {layer}")
        return jnp.int32(layer)
    if hasattr(layer, "shape") and hasattr(layer, "dtype") and layer.shape == () \
            and jnp.issubdtype(layer.dtype, jnp.integer):
        return jnp.asarray(layer, _I32)
    raise ValueError(f"{where}: layer must be an int or an integer scalar array, got {layer!r}")


def same_shape(name_a: str, a, name_b: str, b) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {a.shape}, got {b.shape}")


# The fields that give a page id and a page-table entry their meaning. Two configs that agree on
# these address the same pages (they may differ in heads, layers or dtype: e.g. a draft and a
# target model sharing one allocator); two that differ do not, and mixing them loses writes.
PAGE_GEOMETRY = ("num_pages", "page_size", "max_pages_per_seq")


def check_same_pages(where: str, config: CacheConfig, other: CacheConfig | None, other_name: str) -> None:
    """Raise if `other` (the config a state or packed batch was made with; None = unknown) does not
    address the same pages as `config` (the pool's). Without this a state of 64 pages and a pool of
    16 write nothing (`append_kv` drops out-of-range rows) and attention reads NaN."""
    if other is None or other is config:
        return
    diff = [f"{f}: {getattr(other, f)} vs {getattr(config, f)}" for f in PAGE_GEOMETRY
            if getattr(other, f) != getattr(config, f)]
    if diff:
        raise ValueError(f"{where}: {other_name} was made with a different CacheConfig than the pool's "
                         f"({'; '.join(diff)}); use one config for the state, the packed batch and the pool")


def check_pool(config: CacheConfig, kv, where: str = "kv") -> None:
    """Trace-time check that `kv` is this config's pool (shape and dtype)."""
    check_config(config, where)
    if not (hasattr(kv, "shape") and hasattr(kv, "dtype")):
        raise ValueError(f"{where}: kv must be an array, got {type(kv).__name__}")
    if tuple(kv.shape) != config.kv_shape:
        raise ValueError(f"{where}: kv must have shape {config.kv_shape} ({config.kv_layout}, "
                         f"num_layers * num_pages rows), got {tuple(kv.shape)}")
    if kv.dtype != config.jnp_dtype:
        raise ValueError(f"{where}: kv must have dtype {config.dtype}, got {kv.dtype}")


FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
# Row dtypes an fp8 pool quantizes from (a storage cast, like FlashInfer's fp8 KV caches).
FP8_SOURCE_DTYPES = ("float16", "bfloat16", "float32")


def check_row_dtype(config: CacheConfig, name: str, x, where: str) -> None:
    """New K/V rows must be in the pool's dtype, except fp16/bf16/fp32 rows into an fp8 pool (a
    quantizing store). Anything else (int32 keys, float64 into float16, ...) would be cast silently."""
    got = jnp.dtype(x.dtype).name
    if got == config.dtype or (config.dtype in FP8_DTYPES and got in FP8_SOURCE_DTYPES):
        return
    allowed = config.dtype if config.dtype not in FP8_DTYPES else f"{config.dtype} or one of {FP8_SOURCE_DTYPES}"
    raise ValueError(f"{where}: {name} must have the pool dtype {allowed}, got {got}; cast it first "
                     f"({name}.astype(config.jnp_dtype)) if the precision loss is intended")


def check_num_qo_heads(where: str, num_qo_heads, config: CacheConfig) -> int:
    """num_qo_heads must be a positive multiple of config.num_kv_heads (GQA); returns it as int."""
    hkv = config.num_kv_heads
    if isinstance(num_qo_heads, (bool, np.bool_)) or not isinstance(num_qo_heads, (int, np.integer)) \
            or num_qo_heads < hkv or num_qo_heads % hkv:
        raise ValueError(f"{where}: num_qo_heads must be a positive multiple of config.num_kv_heads = "
                         f"{hkv} (GQA), got {num_qo_heads!r}")
    return int(num_qo_heads)


def check_plan_heads(where: str, planned: int | None, q, q_name: str = "q") -> None:
    """A query must have the head count its plan was made for (a plan for 4 heads run with 8 would
    otherwise run on the reference backend and fail, or worse, on another)."""
    if planned is not None and q.shape[1] != planned:
        raise ValueError(f"{where}: {q_name} has {q.shape[1]} heads but the plan was made for "
                         f"num_qo_heads={planned}; plan with {q_name}.shape[1]")
