"""The public paged-attention ops: validate, dispatch to the plan's backend, return.

    plan_decode / plan_prefill / plan_pod / plan_batch_pod   once per step, inside it
    host_plan_decode / host_plan_prefill / host_plan_batch_pod + adopt_plan
                                                             before the step, on the host
    batch_decode   one query per request over its pages        (FlashInfer batch decode)
    batch_prefill  ragged queries over their request's pages   (FlashInfer paged batch prefill)
    pod            one contiguous-K/V prefill + a decode batch (FlashInfer POD, one launch)
    batch_pod      a paged prefill batch + a decode batch      (FlashInfer batch POD, one launch)
    append_kv      write this step's K/V rows into the pool    (JAX scatter, or the backend's kernel)

Options are given once, as an `AttentionOptions` to `plan_*`; a run takes the query, the pool, the
packed batch, the plan and the layer, and returns `out` or `(out, lse)` as the options say. Make
the plan once per step and pass it to every layer (also inside a `lax.scan` over layers):
FlashInfer plans once per step. A run without `plan=` plans for itself from `options=` and
`backend=` (one host sync per call on FlashInfer: fine for one layer, slow for many).

`backend`: "auto" (FlashInfer on a CUDA GPU where it imports and can run the configuration, else
the reference with a warning), "reference", "flashinfer" (the process defaults of
`seqattn_jax.default_backend`; a configuration FlashInfer cannot run raises `ValueError` naming
the option), or a backend object (`seqattn_jax.bridge.FlashInferBackend(...)` with its own
transport and kernel provider, or `ReferenceBackend()`). The plan holds the backend object, so a
jitted step keys on it. What FlashInfer can run, and how, is `seqattn_jax/bridge/backend.py`'s.

Host plans: a scheduler that knows the step's lengths on the host plans before dispatching the
step (`host_plan_*`, numpy in) and passes the `HostPlan` in; inside, `adopt_plan(host_plan,
packed)` gives the step's plan with no host sync (the GPU keeps running the previous step while
the host plans). `plan.ok` says whether the adopted plan was made for the packed batch's lengths;
return it from the step. Plans are adopted in the order they were made, one per step and plan
shape; `backend.discard_host_plans()` drops the ones a failed step left.

Padding requests and padding token rows give 0 (LSE -inf) on every backend. LSE is base 2.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from seqattn_jax import host_layout
from seqattn_jax.backend import choose
from seqattn_jax.config import CacheConfig
from seqattn_jax.kv import scatter_kv
from seqattn_jax.options import AttentionOptions
from seqattn_jax.packing import PackedBatch
from seqattn_jax.plans import AttentionPlan, HostPlan, PlanMeta
from seqattn_jax.validation import check_num_qo_heads, check_same_pages

__all__ = [
    "APPEND_IMPLS", "adopt_plan", "append_kv", "batch_decode", "batch_pod", "batch_prefill",
    "host_plan_batch_pod", "host_plan_decode", "host_plan_prefill", "plan_batch_pod",
    "plan_decode", "plan_pod", "plan_prefill", "pod",
]

APPEND_IMPLS = ("scatter", "backend")


# ----------------------------------------------------------------------------------------------
# validation shared by the ops
# ----------------------------------------------------------------------------------------------

def _check_packed(where: str, packed, config: CacheConfig | None = None):
    if not isinstance(packed, PackedBatch):
        raise ValueError(f"{where} must be a seqattn_jax.PackedBatch, got {type(packed).__name__}")
    if config is not None:   # a batch packed from another config addresses other pages
        check_same_pages(where.split(":")[0], config, packed.config, where.split(": ")[-1])


def _options(where: str, options) -> AttentionOptions:
    if options is None:
        return AttentionOptions()
    if not isinstance(options, AttentionOptions):
        raise ValueError(f"{where}: options must be a seqattn_jax.AttentionOptions, got "
                         f"{type(options).__name__}")
    return options


def _q_dtype_name(config: CacheConfig, q_dtype) -> str:
    if q_dtype is not None:
        return jnp.dtype(q_dtype).name
    return config.dtype if config.dtype in ("float16", "bfloat16", "float32") else "float16"


def _check_plan_id(where: str, plan_id):
    if isinstance(plan_id, bool) or not isinstance(plan_id, (int, np.integer)) or plan_id < 0:
        raise ValueError(f"{where}: plan_id must be an int >= 0, got {plan_id!r}")


def _meta(where, config, kind, num_qo_heads, *, options, q_dtype, backend, plan_id, batch_size,
          num_rows, batch_size_p=0, host=False) -> PlanMeta:
    """Checks common to every plan kind and the choice of backend; the backend adds its key."""
    if not isinstance(config, CacheConfig):
        raise ValueError(f"{where}: config must be a seqattn_jax.CacheConfig, got "
                         f"{type(config).__name__}")
    check_num_qo_heads(where, num_qo_heads, config)
    _check_plan_id(where, plan_id)
    options = _options(where, options)
    if kind == "decode" and not options.causal:   # decode has no causal flag: one value, so
        options = options.replace(causal=True)       # equal plans compare equal
    qd = _q_dtype_name(config, q_dtype)
    be = choose(backend, config, qd, int(num_qo_heads), kind, options, where)
    return PlanMeta(kind=kind, backend=be, options=options, num_qo_heads=int(num_qo_heads),
                    q_dtype=qd, batch_size=int(batch_size), num_rows=int(num_rows),
                    batch_size_p=int(batch_size_p), plan_id=int(plan_id), host=host)


def _run_plan(where: str, kind: str, plan, options, make):
    """The plan a run uses: `plan` (then `options` must be None: they are the plan's) or a fresh
    one from `make(options)`."""
    if plan is None:
        return make(options)
    if options is not None:
        raise ValueError(f"{where}: options belong to the plan: pass them to plan_{kind}, not to "
                         f"{where} together with plan=")
    if not isinstance(plan, AttentionPlan):
        raise ValueError(f"{where}: plan must be an AttentionPlan, got {type(plan).__name__}")
    if plan.meta.kind != kind:
        raise ValueError(f"{where}: plan is a {plan.meta.kind!r} plan; make it with plan_{kind}")
    return plan


def _check_q(where: str, name: str, q, rows: int, plan: AttentionPlan, config: CacheConfig):
    want = (rows, plan.meta.num_qo_heads, config.head_dim)
    if tuple(q.shape) != want:
        raise ValueError(f"{where}: {name}.shape={tuple(q.shape)} differs from the plan's "
                         f"[rows, num_qo_heads, head_dim] = {want}")


def _check_batch(where: str, name: str, packed: PackedBatch, batch_size: int, rows: int | None):
    _check_packed(f"{where}: {name}", packed)
    if packed.batch_size != batch_size or (rows is not None and packed.num_token_rows != rows):
        raise ValueError(f"{where}: {name} has {packed.batch_size} requests and "
                         f"{packed.num_token_rows} rows; the plan was made for {batch_size} "
                         f"requests" + ("" if rows is None else f" and {rows} rows"))


# ----------------------------------------------------------------------------------------------
# plans made inside the step
# ----------------------------------------------------------------------------------------------

def plan_decode(config: CacheConfig, packed: PackedBatch, num_qo_heads: int, *,
                options: AttentionOptions | None = None, q_dtype=None, backend="auto",
                plan_id: int = 0) -> AttentionPlan:
    """Plan this step's decode batch once for every layer (call inside the jitted step).

    Args:
      packed: the step's `PackedBatch` (B requests, one row each).
      num_qo_heads: Hq of the queries; q_dtype: their dtype (default: the pool dtype, or float16
        for fp8 pools).
      options: the `AttentionOptions` of every run using the plan (`causal` does not apply).
      backend: a name or a backend object (see the module docstring).
      plan_id: tells apart two plans with identical shapes and options alive in one step.
    """
    _check_packed("plan_decode: packed", packed, config)
    b = packed.batch_size
    meta = _meta("plan_decode", config, "decode", num_qo_heads, options=options, q_dtype=q_dtype,
                 backend=backend, plan_id=plan_id, batch_size=b, num_rows=b)
    return meta.backend.plan(config, meta, packed)


def plan_prefill(config: CacheConfig, packed: PackedBatch, num_qo_heads: int, *,
                 options: AttentionOptions | None = None, q_dtype=None, backend="auto",
                 plan_id: int = 0) -> AttentionPlan:
    """Plan this step's paged prefill batch (T rows by `packed.qo_indptr`; `options.causal`)."""
    _check_packed("plan_prefill: packed", packed, config)
    meta = _meta("plan_prefill", config, "prefill", num_qo_heads, options=options,
                 q_dtype=q_dtype, backend=backend, plan_id=plan_id, batch_size=packed.batch_size,
                 num_rows=packed.num_token_rows)
    return meta.backend.plan(config, meta, packed)


def plan_pod(config: CacheConfig, packed_d: PackedBatch, num_qo_heads: int, *,
             options: AttentionOptions | None = None, q_dtype=None, backend="auto",
             plan_id: int = 0) -> AttentionPlan:
    """Plan `pod` (its decode part: the single contiguous prefill request needs no plan;
    `options.causal` applies to the prefill part)."""
    _check_packed("plan_pod: packed_d", packed_d, config)
    b = packed_d.batch_size
    meta = _meta("plan_pod", config, "pod", num_qo_heads, options=options, q_dtype=q_dtype,
                 backend=backend, plan_id=plan_id, batch_size=b, num_rows=b)
    return meta.backend.plan(config, meta, packed_d)


def plan_batch_pod(config: CacheConfig, packed_p: PackedBatch, packed_d: PackedBatch,
                   num_qo_heads: int, *, options: AttentionOptions | None = None, q_dtype=None,
                   backend="auto", plan_id: int = 0) -> AttentionPlan:
    """Plan both parts of `batch_pod` (`options.causal` applies to the prefill part)."""
    _check_packed("plan_batch_pod: packed_p", packed_p, config)
    _check_packed("plan_batch_pod: packed_d", packed_d, config)
    meta = _meta("plan_batch_pod", config, "batch_pod", num_qo_heads, options=options,
                 q_dtype=q_dtype, backend=backend, plan_id=plan_id,
                 batch_size=packed_d.batch_size, num_rows=packed_p.num_token_rows,
                 batch_size_p=packed_p.batch_size)
    return meta.backend.plan(config, meta, packed_p, packed_d)


# ----------------------------------------------------------------------------------------------
# host plans: planned on the host before the step, adopted inside it with no sync
# ----------------------------------------------------------------------------------------------

def host_plan_decode(config: CacheConfig, seq_lens, num_qo_heads: int, *,
                     options: AttentionOptions | None = None, q_dtype=None, backend="auto",
                     plan_id: int = 0) -> HostPlan:
    """Plan a decode step on the host, before dispatching it (call outside `jax.jit`).

    A plan made inside the step (`plan_decode`) must read the step's lengths back from the GPU,
    which waits for the previous step and leaves the GPU idle while FlashInfer plans. A scheduler
    that knows the lengths plans here instead, while the GPU still runs the previous step; the
    step then adopts the plan (`adopt_plan`) without any host sync.

    Args:
      seq_lens: int [B], host data: request b's length after this step's token (0: a padding
        row). Row b must be the step's `pack_for_flashinfer(state, seq_ids)` row b.
      num_qo_heads, options, q_dtype, backend, plan_id: as in `plan_decode`.
    Returns a `HostPlan`. Plans are adopted in the order they were made, one per step (per plan
    shape); at most the backend's `host_plan_depth` may wait (FlashInfer: 6).
    """
    layout = host_layout.decode_layout(config, seq_lens)
    b = layout["lpl"].shape[0]
    meta = _meta("host_plan_decode", config, "decode", num_qo_heads, options=options,
                 q_dtype=q_dtype, backend=backend, plan_id=plan_id, batch_size=b, num_rows=b,
                 host=True)
    return meta.backend.host_plan(config, meta, layout)


def host_plan_prefill(config: CacheConfig, seq_lens, new_lens, num_qo_heads: int, *,
                      max_tokens: int, options: AttentionOptions | None = None, q_dtype=None,
                      backend="auto", plan_id: int = 0) -> HostPlan:
    """Plan a paged prefill (append) step on the host: `seq_lens[b]` is request b's length after
    this step's append (0: padding), `new_lens[b]` its new query rows, `max_tokens` the step's
    static row count T, exactly as the step will call `pack_for_flashinfer(state, seq_ids,
    new_lens, max_tokens=T)`. The rest is `host_plan_decode`'s."""
    layout = host_layout.prefill_layout(config, seq_lens, new_lens, max_tokens)
    meta = _meta("host_plan_prefill", config, "prefill", num_qo_heads, options=options,
                 q_dtype=q_dtype, backend=backend, plan_id=plan_id,
                 batch_size=layout["lpl"].shape[0], num_rows=max_tokens, host=True)
    return meta.backend.host_plan(config, meta, layout)


def host_plan_batch_pod(config: CacheConfig, seq_lens_p, new_lens_p, seq_lens_d,
                        num_qo_heads: int, *, max_tokens_p: int,
                        options: AttentionOptions | None = None, q_dtype=None, backend="auto",
                        plan_id: int = 0) -> HostPlan:
    """Plan a batch-POD step on the host: its prefill batch as in `host_plan_prefill` (the `_p`
    arguments) and its decode batch as in `host_plan_decode` (`seq_lens_d`)."""
    layout = host_layout.batch_pod_layout(config, seq_lens_p, new_lens_p, max_tokens_p,
                                          seq_lens_d)
    meta = _meta("host_plan_batch_pod", config, "batch_pod", num_qo_heads, options=options,
                 q_dtype=q_dtype, backend=backend, plan_id=plan_id,
                 batch_size=layout["lpl"].shape[0], num_rows=max_tokens_p,
                 batch_size_p=layout["lpl_p"].shape[0], host=True)
    return meta.backend.host_plan(config, meta, layout)


def adopt_plan(host_plan: HostPlan, packed: PackedBatch,
               packed_d: PackedBatch | None = None) -> AttentionPlan:
    """Inside the jitted step: the plan for `packed` (batch POD: `packed` is the prefill batch and
    `packed_d` the decode batch), taken from the oldest host plan waiting for this plan shape,
    with no host sync. Use it like the `plan_*` result. `plan.ok` is False when the adopted plan
    was made for other lengths than the packed batch's (wrong lengths, or a plan left over from a
    step that never ran): return it from the step and check it (`checked.check_plan`)."""
    if not isinstance(host_plan, HostPlan):
        raise ValueError(f"adopt_plan: host_plan must be a HostPlan (from host_plan_*), got "
                         f"{type(host_plan).__name__}")
    meta = host_plan.meta
    if meta.kind == "batch_pod":
        _check_batch("adopt_plan", "packed", packed, meta.batch_size_p, meta.num_rows)
        _check_batch("adopt_plan", "packed_d", packed_d, meta.batch_size, meta.batch_size)
    else:
        if packed_d is not None:
            raise ValueError(f"adopt_plan: packed_d is for batch POD plans, not {meta.kind!r}")
        _check_batch("adopt_plan", "packed", packed, meta.batch_size, meta.num_rows)
    want = host_layout.packed_arrays(meta.kind, packed, packed_d)
    token, expected = meta.backend.adopt(host_plan, want.shape[0])
    return AttentionPlan(token, meta, jnp.all(want == expected))


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------

def batch_decode(config: CacheConfig, q, kv, packed: PackedBatch, *,
                 plan: AttentionPlan | None = None, layer=0,
                 options: AttentionOptions | None = None, backend="auto"):
    """Decode attention, one query per request: `reference.batch_decode`'s contract (q[B, Hq, D],
    row b is request b; out [B, Hq, D], with `options.return_lse` (out, lse [B, Hq] base 2))."""
    _check_packed("batch_decode: packed", packed, config)
    plan = _run_plan("batch_decode", "decode", plan, options, lambda o: plan_decode(
        config, packed, q.shape[1], options=o, q_dtype=q.dtype, backend=backend))
    _check_batch("batch_decode", "packed", packed, plan.meta.batch_size, plan.meta.batch_size)
    _check_q("batch_decode", "q", q, plan.meta.batch_size, plan, config)
    return plan.backend.decode(config, plan, q, kv, packed, layer)


def batch_prefill(config: CacheConfig, q, kv, packed: PackedBatch, *,
                  plan: AttentionPlan | None = None, layer=0,
                  options: AttentionOptions | None = None, backend="auto"):
    """Paged prefill / append attention: `reference.batch_prefill`'s contract (q[T, Hq, D], rows
    by `packed.qo_indptr`, padding rows give 0; causal per `options.causal`)."""
    _check_packed("batch_prefill: packed", packed, config)
    plan = _run_plan("batch_prefill", "prefill", plan, options, lambda o: plan_prefill(
        config, packed, q.shape[1], options=o, q_dtype=q.dtype, backend=backend))
    _check_batch("batch_prefill", "packed", packed, plan.meta.batch_size, plan.meta.num_rows)
    _check_q("batch_prefill", "q", q, plan.meta.num_rows, plan, config)
    return plan.backend.prefill(config, plan, q, kv, packed, layer)


def pod(config: CacheConfig, q_p, k_p, v_p, q_d, kv, packed_d: PackedBatch, *,
        plan: AttentionPlan | None = None, layer=0, options: AttentionOptions | None = None,
        backend="auto"):
    """Prefill-on-decode in one launch: `reference.pod`'s contract (`options.causal` is the
    prefill part's). Returns (out_p, out_d), or ((out_p, lse_p), (out_d, lse_d))."""
    _check_packed("pod: packed_d", packed_d, config)
    plan = _run_plan("pod", "pod", plan, options, lambda o: plan_pod(
        config, packed_d, q_d.shape[1], options=o, q_dtype=q_d.dtype, backend=backend))
    _check_batch("pod", "packed_d", packed_d, plan.meta.batch_size, None)
    _check_q("pod", "q_d", q_d, plan.meta.batch_size, plan, config)
    _check_q("pod", "q_p", q_p, q_p.shape[0], plan, config)
    return plan.backend.pod(config, plan, q_p, k_p, v_p, q_d, kv, packed_d, layer)


def batch_pod(config: CacheConfig, q_p, packed_p: PackedBatch, q_d, packed_d: PackedBatch, kv, *,
              plan: AttentionPlan | None = None, layer=0,
              options: AttentionOptions | None = None, backend="auto"):
    """A paged prefill batch and a decode batch in one launch: `reference.batch_pod`'s contract.
    Returns (out_p, out_d), or ((out_p, lse_p), (out_d, lse_d))."""
    _check_packed("batch_pod: packed_p", packed_p, config)
    _check_packed("batch_pod: packed_d", packed_d, config)
    plan = _run_plan("batch_pod", "batch_pod", plan, options, lambda o: plan_batch_pod(
        config, packed_p, packed_d, q_d.shape[1], options=o, q_dtype=q_d.dtype, backend=backend))
    _check_batch("batch_pod", "packed_p", packed_p, plan.meta.batch_size_p, plan.meta.num_rows)
    _check_batch("batch_pod", "packed_d", packed_d, plan.meta.batch_size, None)
    _check_q("batch_pod", "q_p", q_p, plan.meta.num_rows, plan, config)
    _check_q("batch_pod", "q_d", q_d, plan.meta.batch_size, plan, config)
    return plan.backend.batch_pod(config, plan, q_p, packed_p, q_d, packed_d, kv, layer)


def append_kv(config: CacheConfig, kv, keys, values, packed: PackedBatch, *, layer=0,
              plan: AttentionPlan | None = None, impl: str = "scatter"):
    """Write each token row's K/V into layer `layer` of the pool; in place when the caller donates
    `kv` to its `jax.jit`.

    Args:
      keys, values: [T, Hkv, D] (T = `packed.num_token_rows`; padding rows are not written), or
        `values=None` and `keys` the stacked rows [T, 2, Hkv, D] (K then V).
      impl: "scatter" (the JAX scatter `seqattn_jax.kv.scatter_kv`, any backend, no plan needed;
        measured as fast as FlashInfer's append kernel in a step: benchmarks/README.md) or
        "backend" (the plan's backend's own append: FlashInfer's append kernel, needing a
        FlashInfer decode / prefill / pod plan of this batch made inside the step).
    """
    if impl not in APPEND_IMPLS:
        raise ValueError(f"append_kv: impl must be one of {APPEND_IMPLS}, got {impl!r}")
    if impl == "scatter":
        return scatter_kv(config, kv, keys, values, packed, layer=layer)
    if not isinstance(plan, AttentionPlan):
        raise ValueError(f"append_kv: impl='backend' needs the step's plan (plan=), got "
                         f"{type(plan).__name__}")
    _check_packed("append_kv: packed", packed, config)
    rows = plan.meta.num_rows if plan.meta.kind == "prefill" else plan.meta.batch_size
    if plan.meta.kind == "batch_pod" or packed.num_token_rows != rows:
        raise ValueError(f"append_kv: impl='backend' needs a decode / prefill / pod plan of this "
                         f"batch, got a {plan.meta.kind!r} plan of {rows} rows for "
                         f"{packed.num_token_rows} rows")
    return plan.backend.append(config, plan, kv, keys, values, packed, layer)
