"""The host's view of a packed batch: the CSR arrays `pack_for_flashinfer` will give, computed
with numpy from lengths a scheduler knows, so a step can be planned before it is dispatched.

A layout is a dict of numpy int32 arrays named as the bridge's plan sections: decode
{"indptr", "lpl"}; prefill {"indptr", "lpl", "qo_indptr"}; batch POD {"indptr_p", "lpl_p",
"qo_indptr_p", "indptr", "lpl"} (`_p`: the prefill batch). `expected` / `packed_arrays` lay the
same arrays end to end in one order, for the step's device-side check (`AttentionPlan.ok`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax.config import CacheConfig

__all__ = ["batch_pod_layout", "decode_layout", "decode_layout_from_lens", "expected",
           "packed_arrays", "prefill_layout"]

ORDER = {"decode": ("indptr", "lpl"), "prefill": ("indptr", "lpl", "qo_indptr"),
         "batch_pod": ("indptr_p", "lpl_p", "qo_indptr_p", "indptr", "lpl")}


def _lens(where: str, name: str, config: CacheConfig, x) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{where}: {name} must be host data (numpy); host plans are made outside "
                         f"jax.jit, before the step (inside a step use the plan_* functions)")
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] < 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{where}: {name} must be a 1-D integer array with one entry per request, "
                         f"got shape {a.shape} dtype {a.dtype}")
    cap = config.max_pages_per_seq * config.page_size
    if a.min() < 0 or a.max() > cap:
        raise ValueError(f"{where}: {name} must be in [0, max_pages_per_seq * page_size = {cap}], "
                         f"got min {a.min()} max {a.max()}")
    return a.astype(np.int64)


def decode_layout_from_lens(config: CacheConfig, seq_lens) -> tuple[np.ndarray, np.ndarray]:
    """numpy (kv_page_indptr int32[B + 1], kv_last_page_len int32[B]) of a batch whose request b
    holds `seq_lens[b]` tokens (0: a padding request): what `pack_for_flashinfer` gives."""
    lens = np.asarray(seq_lens, np.int64)
    pages = -(-lens // config.page_size)
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    lpl = np.where(pages > 0, lens - (pages - 1) * config.page_size, 0).astype(np.int32)
    return indptr, lpl


def decode_layout(config: CacheConfig, seq_lens, where: str = "host_plan_decode") -> dict:
    """A decode batch: `seq_lens[b]` is request b's length after this step's token (0: padding)."""
    indptr, lpl = decode_layout_from_lens(config, _lens(where, "seq_lens", config, seq_lens))
    return {"indptr": indptr, "lpl": lpl}


def prefill_layout(config: CacheConfig, seq_lens, new_lens, max_tokens: int,
                   where: str = "host_plan_prefill") -> dict:
    """A prefill (append) batch as `pack_for_flashinfer(state, seq_ids, new_lens, max_tokens=T)`
    lays it out: request b has `seq_lens[b]` tokens after this step's append (0: padding) and
    `new_lens[b]` new query rows (clipped to [0, seq_lens[b]]), back to back in request order."""
    lens = _lens(where, "seq_lens", config, seq_lens)
    new = np.asarray(new_lens)
    if new.shape != lens.shape or not np.issubdtype(new.dtype, np.integer):
        raise ValueError(f"{where}: new_lens must be integers of seq_lens' shape {lens.shape}, got "
                         f"shape {new.shape} dtype {new.dtype}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"{where}: max_tokens must be a positive Python int, got {max_tokens!r}")
    new = np.where(lens > 0, np.clip(new.astype(np.int64), 0, lens), 0)
    qo = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    if qo[-1] > max_tokens:
        raise ValueError(f"{where}: sum(new_lens) = {qo[-1]} exceeds max_tokens = {max_tokens}")
    indptr, lpl = decode_layout_from_lens(config, lens)
    return {"indptr": indptr, "lpl": lpl, "qo_indptr": qo}


def batch_pod_layout(config: CacheConfig, seq_lens_p, new_lens_p, max_tokens_p: int, seq_lens_d,
                     where: str = "host_plan_batch_pod") -> dict:
    """Batch POD: a prefill batch (`prefill_layout` of the `_p` arguments) and a decode batch
    (`decode_layout` of `seq_lens_d`)."""
    p = prefill_layout(config, seq_lens_p, new_lens_p, max_tokens_p, where)
    d = decode_layout(config, seq_lens_d, where)
    return {"indptr_p": p["indptr"], "lpl_p": p["lpl"], "qo_indptr_p": p["qo_indptr"], **d}


def expected(kind: str, layout: dict) -> np.ndarray:
    """The layout's arrays end to end (int32), in `ORDER[kind]`."""
    return np.concatenate([layout[n] for n in ORDER[kind]]).astype(np.int32)


def packed_arrays(kind: str, packed, packed_d=None) -> jax.Array:
    """The packed batch's arrays that `expected(kind, ...)` predicts, end to end (int32)."""
    if kind == "batch_pod":
        parts = [packed.kv_page_indptr, packed.kv_last_page_len, packed.qo_indptr,
                 packed_d.kv_page_indptr, packed_d.kv_last_page_len]
    else:
        parts = [packed.kv_page_indptr, packed.kv_last_page_len]
        if kind == "prefill":
            parts.append(packed.qo_indptr)
    return jnp.concatenate([jnp.asarray(a, jnp.int32) for a in parts])
