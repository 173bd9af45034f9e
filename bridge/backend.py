"""`FlashInferBackend`: the `seqattn_jax.backend.Backend` contract over FlashInfer's kernels.

Everything FlashInfer-specific that the public ops used to know lives here: what FlashInfer can
run (`unsupported`), which decode kernel runs, the bridge's `PlanKey`, how runs enter XLA (the
transport), the row order FlashInfer's append needs, padding, and the page ranges of the FFI path.

    backend = FlashInferBackend()                               # flashinfer kernels, transport auto
    backend = FlashInferBackend(provider="torch")               # the bridge's torch CPU kernels
    backend = FlashInferBackend(transport="callback")           # no XLA FFI path

The object owns its plan slots (kernel modules, int workspaces, the host-plan rings and queues)
and, through its provider, the float workspaces. It is hashable by identity and sits in every
plan's static metadata, so a jitted step keys on it: a step traced with one backend never runs
another's transport or provider.

CUDA graphs (`cuda_graphs=True`, the FFI transport on one device): host plans of decode and prefill
steps are made in FlashInfer's CUDA-graph mode ("static plans", `ops.host_plan_static`): their
`plan_info` depends only on the batch's shape and is fixed in the step's program, their schedule
travels in the `HostPlan` as a step argument, and their runs go to an FFI target XLA may capture:
with XLA's command buffers on (jax's default on GPU) a whole decode step becomes CUDA graphs
instead of ~15 kernel launches a layer from the host.

Batch POD runs as an FFI call only with a static plan (else as a buffer_callback). On several
devices (tensor parallel) static plans are FFI calls too: the plan is made once (its plan_info and
schedule depend on the shard's shapes, the same on every device) and every device runs the same
capturable call with its own workspaces.

Transports: "ffi" (decode and prefill runs as XLA FFI custom calls through `jax-tvm-ffi` and the
C++ shim: no Python per layer; needs the `jax-tvm-ffi` package and a C++ compiler for the shim's
one-time build), "callback" (every run a `buffer_callback`: ~25 us of Python per call), "auto"
(ffi when it is available). Plans, POD, batch POD and the append kernel always run as
buffer_callbacks. The torch provider has no FFI path ("auto" means "callback" there).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from seqattn_jax import host_layout
from seqattn_jax.config import FLASHINFER_HEAD_DIMS as _HEAD_DIMS
from seqattn_jax.kv import check_pool, check_rows
from seqattn_jax.plans import AttentionPlan, HostPlan

from . import ffi, ops
from .ops import PlanKey, RunParams

__all__ = ["CUDA_CORE_GROUP_SIZES", "FLASHINFER_HEAD_DIMS", "TENSOR_CORE_MIN_GROUP",
           "TRANSPORTS", "FlashInferBackend", "decode_kernel_for"]

TRANSPORTS = ("auto", "ffi", "callback")
# Group sizes FlashInfer's CUDA-core decode kernel is compiled for (its DISPATCH_GQA).
CUDA_CORE_GROUP_SIZES = (1, 2, 3, 4, 6, 8, 16)
FLASHINFER_HEAD_DIMS = _HEAD_DIMS   # one copy: seqattn_jax.config
# GQA group size from which decode_kernel="auto" takes the tensor-core kernel (FlashInfer's FA2
# prefill kernel with one query per request): measured on Hopper, benchmarks/README.md.
TENSOR_CORE_MIN_GROUP = 4


def decode_kernel_for(decode_kernel: str, group: int) -> str:
    """The decode kernel that runs: "tensor_core" or "cuda_core"."""
    if decode_kernel != "auto":
        return decode_kernel
    if group >= TENSOR_CORE_MIN_GROUP or group not in CUDA_CORE_GROUP_SIZES:
        return "tensor_core"
    return "cuda_core"


def _valid_rows_first(batch_indices):
    """Row order putting the real token rows first (stable). A decode batch has row b = request b,
    so a padding request in the middle leaves a hole; FlashInfer's append takes the real rows as a
    prefix. The decode plan's rows and `append` use this one order, so they agree."""
    return jnp.argsort(batch_indices < 0, stable=True)


def _zero_rows_past(out, lse, qo_indptr):
    """FlashInfer leaves rows past `qo_indptr[B]` unwritten: 0 there (LSE -inf), in XLA."""
    row_ok = jnp.arange(out.shape[0], dtype=jnp.int32) < qo_indptr[-1]
    out = jnp.where(row_ok[:, None, None], out, jnp.zeros((), out.dtype))
    return out, None if lse is None else jnp.where(row_ok[:, None], lse, -jnp.inf)


class FlashInferBackend:
    """FlashInfer's kernels (or a stand-in provider) behind the backend contract.

    Args:
      provider: "flashinfer" (FlashInfer 0.7.2.post1 CUDA kernels), "torch" (the bridge's small
        torch kernels: the same plan / callback / aliasing mechanics on a CPU, for tests), or a
        provider object (`ops.KernelProvider`).
      transport: "auto", "ffi" or "callback" (see the module docstring).
      cuda_graphs: make decode and prefill host plans static (see the module docstring) where the
        runs are FFI calls on one device; elsewhere host plans are queued. For XLA to capture the
        FFI calls too, set its command-buffer flags (`seqattn_jax.xla_flags`).
      devices: None (one device: the current one), or the devices a tensor-parallel step runs the
        backend on (`jax.Device`s or their local ordinals, e.g. `mesh.devices.flat`): every plan
        key gets a slot (modules, workspaces, host-plan queue) on each, every host plan is made
        once per device, and each device's callbacks use their own slot (see ops.py, "Several
        devices"). With more than one device, runs of static host plans (`cuda_graphs`) are FFI
        calls as on one device (one schedule for all devices: a static plan depends on shapes
        only, which are the same on every shard; the shim gives each device its own float
        workspace, `ffi.alias_peers`); runs of plans made in the step are buffer_callbacks (the
        shim keeps one published plan per slot id, not per device), so transport "ffi" is
        refused there: use "auto".
    """

    name = "flashinfer"

    def __init__(self, provider="flashinfer", transport: str = "auto", devices=None,
                 cuda_graphs: bool = True):
        if transport not in TRANSPORTS:
            raise ValueError(f"FlashInferBackend: transport must be one of {TRANSPORTS}, "
                             f"got {transport!r}")
        if devices is not None:
            devices = tuple(int(getattr(d, "local_hardware_id", None) if
                                getattr(d, "local_hardware_id", None) is not None else
                                getattr(d, "id", d)) for d in devices)
            if not devices or len(set(devices)) != len(devices) or min(devices) < 0:
                raise ValueError(f"FlashInferBackend: devices must be distinct devices or "
                                 f"ordinals, at least one, got {devices!r}")
            if len(devices) > 1 and transport == "ffi":
                raise ValueError("FlashInferBackend: transport='ffi' runs on one device; with "
                                 "several devices use transport 'callback' or 'auto'")
        if isinstance(provider, str):
            if provider == "flashinfer":
                from .fi_provider import FlashInferProvider  # noqa: PLC0415

                provider = FlashInferProvider()
            elif provider == "torch":
                from .torch_provider import TorchProvider  # noqa: PLC0415

                provider = TorchProvider()
            else:
                raise ValueError(f"FlashInferBackend: provider must be 'flashinfer', 'torch' or a "
                                 f"kernel provider object, got {provider!r}")
        if transport == "ffi" and not provider.has_ffi:
            raise ValueError(f"FlashInferBackend: transport='ffi' needs FlashInfer's kernels, not "
                             f"the {provider.name!r} provider")
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"FlashInferBackend: cuda_graphs must be a bool, got {cuda_graphs!r}")
        self.provider = provider
        self.transport = transport
        self.devices = devices
        self.cuda_graphs = cuda_graphs
        self._static_metas: dict = {}
        self.slots = ops.PlanSlots(provider, devices)
        self._keyed: dict = {}
        self.host_plan_depth = ops.HOST_PLAN_DEPTH

    def __repr__(self):
        devs = "" if self.devices is None else f", devices={self.devices}"
        graphs = ", cuda_graphs=True" if self.cuda_graphs else ""
        return (f"FlashInferBackend(provider={self.provider.name!r}, "
                f"transport={self.transport!r}{devs}{graphs})")

    # ------------------------------------------------------------------ capabilities

    def unsupported(self, config, q_dtype, num_qo_heads, kind, options) -> str | None:
        """Why FlashInfer cannot run this configuration (a message naming the option), or None."""
        kv_dt, q_dt = config.dtype, jnp.dtype(q_dtype).name
        if kv_dt == "float32":
            return ("CacheConfig.dtype='float32': FlashInfer's kernels take float16/bfloat16 (or "
                    "fp8) pools")
        if kv_dt in ("float16", "bfloat16"):
            if q_dt != kv_dt:
                return f"q.dtype={q_dt}: FlashInfer needs q in the pool dtype {kv_dt}"
        else:
            if q_dt not in ("float16", "bfloat16"):
                return f"q.dtype={q_dt}: with an fp8 pool FlashInfer needs float16/bfloat16 queries"
            if kind != "decode":
                return f"CacheConfig.dtype={kv_dt}: fp8 pools run on FlashInfer's decode kernels only"
        if config.head_dim not in FLASHINFER_HEAD_DIMS:
            return (f"head_dim={config.head_dim}: FlashInfer is compiled for head_dim in "
                    f"{FLASHINFER_HEAD_DIMS}")
        if num_qo_heads % config.num_kv_heads:
            return (f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads="
                    f"{config.num_kv_heads}")
        if kind in ("pod", "batch_pod") and options.logits_soft_cap > 0:
            return (f"logits_soft_cap={options.logits_soft_cap}: FlashInfer's POD kernels have no "
                    f"soft cap (call batch_prefill and batch_decode separately)")
        group = num_qo_heads // config.num_kv_heads
        if kind == "decode" and options.decode_kernel == "cuda_core" and \
                group not in CUDA_CORE_GROUP_SIZES:
            return (f"decode_kernel='cuda_core' with GQA group size {group}: FlashInfer's CUDA-core "
                    f"decode kernel only has group sizes {CUDA_CORE_GROUP_SIZES}")
        return self.provider.unsupported(kind, options)

    def _several(self) -> bool:
        return self.devices is not None and len(self.devices) > 1

    def _ffi(self, kind: str, host: bool = False) -> bool:
        """Whether this kind's runs are XLA FFI calls. On several devices only static host plans'
        runs are (their calls read nothing published at run time; the shim swaps in each
        device's own workspaces, `ffi.alias_peers`); plans made in the step run as callbacks."""
        if self.transport == "callback" or kind not in ("decode", "prefill") or \
                not self.provider.has_ffi or (self._several() and not (self.cuda_graphs and host)):
            return False
        if ffi.available():
            return True
        if self.transport == "ffi":
            raise RuntimeError(f"FlashInferBackend(transport='ffi') needs the jax-tvm-ffi package "
                               f"and a C++ compiler for the shim: {ffi.unavailable_reason()}")
        return False

    def _key(self, config, meta) -> PlanKey:
        o = meta.options
        return PlanKey(
            kind=meta.kind, batch_size=meta.batch_size, num_rows=meta.num_rows,
            num_qo_heads=meta.num_qo_heads, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, page_size=config.page_size, kv_layout=config.kv_layout,
            q_dtype=meta.q_dtype, kv_dtype=config.dtype, causal=o.causal and meta.kind != "decode",
            pos_encoding_mode=o.pos_encoding_mode, window_left=o.window_left,
            logits_soft_cap=o.logits_soft_cap,
            decode_kernel=decode_kernel_for(o.decode_kernel,
                                            meta.num_qo_heads // config.num_kv_heads)
            if meta.kind == "decode" else "tensor_core",
            batch_size_p=meta.batch_size_p, ffi=self._ffi(meta.kind, meta.host),
            plan_id=meta.plan_id)

    def _with_key(self, config, meta):
        """`meta` with this backend's PlanKey (cached: host plans ask for it every step)."""
        keyed = self._keyed.get((config, meta))
        if keyed is None:
            keyed = self._keyed[(config, meta)] = dataclasses.replace(meta,
                                                                      key=self._key(config, meta))
        return keyed

    # ------------------------------------------------------------------ plans

    def plan(self, config, meta, packed, packed_d=None):
        meta = self._with_key(config, meta)
        slot = self.slots.get(meta.key)
        if meta.kind in ("decode", "pod"):
            bi = packed.batch_indices
            if bi.shape[0] != meta.batch_size:   # POD: no token rows of the decode part
                bi = jnp.full((meta.batch_size,), -1, jnp.int32)
            else:
                bi = bi[_valid_rows_first(bi)]
            arrays = (packed.kv_page_indptr, packed.kv_last_page_len, bi)
        elif meta.kind == "prefill":
            arrays = (packed.kv_page_indptr, packed.kv_last_page_len, packed.qo_indptr,
                      packed.batch_indices)
        else:
            arrays = (packed.kv_page_indptr, packed.kv_last_page_len, packed.qo_indptr,
                      packed_d.kv_page_indptr, packed_d.kv_last_page_len)
        return AttentionPlan(ops.plan(slot, *arrays), meta)

    def host_plan(self, config, meta, layout):
        if meta.kind == "pod":
            raise ValueError("host plans are made for decode, prefill and batch POD steps, not POD")
        meta = self._with_key(config, meta)
        expected = host_layout.expected(meta.kind, layout)
        if expected.size > ops.MAX_HOST_PLAN_ENTRIES:
            raise ValueError(f"{meta.kind}: a host plan holds at most {ops.MAX_HOST_PLAN_ENTRIES} "
                             f"planned CSR entries, got {expected.size} (fewer requests per step)")
        if self._static(meta):
            info, schedule = ops.host_plan_static(self.slots.get(meta.key), layout)
            smeta = self._static_metas.get((meta, info))
            if smeta is None:   # one object per (shape, plan_info): cheap jit cache lookups
                smeta = self._static_metas[(meta, info)] = dataclasses.replace(meta, static=info)
            return HostPlan(expected, smeta, schedule)
        # the real token rows: decode and batch POD plans never run FlashInfer's append
        # (append_kv's impl='backend' needs a plan made in the step); prefill rows are a prefix
        append_rows = int(layout["qo_indptr"][-1]) if meta.kind == "prefill" else None
        ops.host_plan(self.slots.get(meta.key), layout, append_rows, expected, self.devices)
        return HostPlan(None, meta)

    def _static(self, meta) -> bool:
        """Host plans of this kind are static plans (see `cuda_graphs`): decode and prefill plans
        whose runs are FFI calls, and batch POD plans where the FFI path is available (batch POD
        runs as an FFI call only with a static plan)."""
        if not self.cuda_graphs:
            return False
        if meta.kind == "batch_pod":
            return self._ffi("decode", host=True) and self.provider.has_ffi
        return meta.kind in ("decode", "prefill") and meta.key.ffi

    def adopt(self, host_plan, n_expected):
        if host_plan.meta.static is not None:   # everything came in with the step's arguments
            if host_plan.schedule is None or host_plan.expected is None:
                raise ValueError("adopt_plan: this static host plan lost its arrays (pass the "
                                 "HostPlan itself into the step)")
            return host_plan.schedule, host_plan.expected
        return ops.adopt(self.slots.get(host_plan.meta.key), n_expected)

    def discard_host_plans(self) -> int:
        """Drop every host plan still waiting for a step (after a step failed to run, say)."""
        return self.slots.discard_host_plans()

    # ------------------------------------------------------------------ runs

    def _run_params(self, config, plan) -> RunParams:
        o = plan.options
        return RunParams(sm_scale=o.scale(config.head_dim), rope_scale=o.rope_scale,
                         rope_theta=o.rope_theta, return_lse=o.return_lse)

    def _check(self, where, config, plan, kv, **qs):
        check_pool(config, kv, where)
        for name, x in qs.items():
            if jnp.dtype(x.dtype).name != plan.meta.q_dtype:
                raise ValueError(f"{where}: {name}.dtype={jnp.dtype(x.dtype).name} differs from "
                                 f"the plan's q_dtype {plan.meta.q_dtype}")

    @staticmethod
    def _layer(config, layer):
        """(int or int32 scalar layer, static page range or None) for the page indices: a Python
        int addresses the layer as a static page range of the pool (FFI: no per-layer index add);
        a traced one offsets the indices."""
        if isinstance(layer, (bool, np.bool_)):
            raise ValueError(f"layer must be an int or an int32 scalar array, got {layer!r}")
        if isinstance(layer, (int, np.integer)):
            if not 0 <= layer < config.num_layers:
                raise ValueError(f"layer must be in [0, config.num_layers = {config.num_layers}), "
                                 f"got {layer}")
            return int(layer), (int(layer) * config.num_pages, config.num_pages)
        return layer, None

    def _indices(self, config, packed, layer, key):
        """The page indices a run passes, and the FFI page range (None: indices are global)."""
        layer, pages = self._layer(config, layer)
        if key.ffi and pages is not None:
            return packed.kv_page_indices, pages
        return packed.layer_page_indices(layer, config.num_pages), None

    def _paged(self, where, config, plan, q, kv, packed, layer, prefill: bool):
        """A decode or paged prefill run on the plan's transport."""
        self._check(where, config, plan, kv, q=q)
        key, rp = plan.meta.key, self._run_params(config, plan)
        indices, pages = self._indices(config, packed, layer, key)
        if prefill:
            run, csr = (ffi.prefill if key.ffi else ops.prefill), (packed.qo_indptr,)
        else:
            run, csr = (ffi.decode if key.ffi else ops.decode), ()
        extra = {} if plan.meta.static is None else {"static_plan": plan.meta.static}
        res = run(self.slots.get(key), rp, plan.token, q, kv, *csr, packed.kv_page_indptr,
                  indices, packed.kv_last_page_len, pages=pages, **extra)
        out, lse = res[0], res[1] if rp.return_lse else None
        if prefill:
            out, lse = _zero_rows_past(out, lse, packed.qo_indptr)
        return (out, lse) if rp.return_lse else out

    def decode(self, config, plan, q, kv, packed, layer):
        return self._paged("batch_decode", config, plan, q, kv, packed, layer, prefill=False)

    def prefill(self, config, plan, q, kv, packed, layer):
        return self._paged("batch_prefill", config, plan, q, kv, packed, layer, prefill=True)

    def pod(self, config, plan, q_p, k_p, v_p, q_d, kv, packed_d, layer):
        self._check("pod", config, plan, kv, q_p=q_p, k_p=k_p, v_p=v_p, q_d=q_d)
        causal = plan.options.causal
        if causal and k_p.shape[0] < q_p.shape[0]:
            raise ValueError(f"pod: with causal prefill, k_p must have at least as many rows as "
                             f"q_p, got Tk = {k_p.shape[0]} < Tp = {q_p.shape[0]}")
        rp = self._run_params(config, plan)
        slot = self.slots.get(plan.meta.key)
        indices, _ = self._indices(config, packed_d, layer, plan.meta.key)
        res = ops.pod(slot, rp, causal, plan.token, q_p, k_p, v_p, q_d, kv,
                      packed_d.kv_page_indptr, indices, packed_d.kv_last_page_len)
        return ((res[0], res[1]), (res[2], res[3])) if rp.return_lse else (res[0], res[1])

    def batch_pod(self, config, plan, q_p, packed_p, q_d, packed_d, kv, layer):
        self._check("batch_pod", config, plan, kv, q_p=q_p, q_d=q_d)
        rp = self._run_params(config, plan)
        slot = self.slots.get(plan.meta.key)
        if plan.meta.static is not None:   # an FFI call XLA may capture (static plans only)
            layer, pages = self._layer(config, layer)
            if pages is None:              # a traced layer: global page indices
                ind_p = packed_p.layer_page_indices(layer, config.num_pages)
                ind_d = packed_d.layer_page_indices(layer, config.num_pages)
            else:
                ind_p, ind_d = packed_p.kv_page_indices, packed_d.kv_page_indices
            res = ffi.batch_pod(slot, rp, plan.token, q_p, packed_p.qo_indptr,
                                packed_p.kv_page_indptr, ind_p, packed_p.kv_last_page_len, q_d,
                                packed_d.kv_page_indptr, ind_d, packed_d.kv_last_page_len, kv,
                                pages, plan.meta.static)
        else:
            ind_p, _ = self._indices(config, packed_p, layer, plan.meta.key)
            ind_d, _ = self._indices(config, packed_d, layer, plan.meta.key)
            res = ops.batch_pod(slot, rp, plan.token, q_p, packed_p.qo_indptr,
                                packed_p.kv_page_indptr, ind_p, packed_p.kv_last_page_len, q_d,
                                packed_d.kv_page_indptr, ind_d, packed_d.kv_last_page_len, kv)
        out_p, lse_p = _zero_rows_past(res[0], res[2] if rp.return_lse else None,
                                       packed_p.qo_indptr)
        return ((out_p, res[1]), (lse_p, res[3])) if rp.return_lse else (out_p, res[1])

    def append(self, config, plan, kv, keys, values, packed, layer):
        """FlashInfer's append kernel writing the pool in place (its output aliases the pool:
        donate it). Needs a decode / prefill / pod plan made in the step: a decode batch's rows go
        real-rows-first, as that plan saw them; a host plan does not know the rows' order."""
        if plan.meta.host:
            raise ValueError("append_kv: impl='backend' needs a plan made in the step from the "
                             "packed batch (plan_*), not a host plan (adopt_plan): use "
                             "impl='scatter'")
        check_pool(config, kv, "append_kv")
        check_rows(config, packed, keys, values, "append_kv")
        if values is None:   # stacked rows: FlashInfer's kernel takes K and V apart
            keys, values = keys[:, 0], keys[:, 1]
        keys, values = keys.astype(kv.dtype), values.astype(kv.dtype)
        key = plan.meta.key
        batch_indices, positions = packed.batch_indices, packed.positions
        if key.kind in ("decode", "pod"):
            order = _valid_rows_first(batch_indices)
            keys, values, batch_indices, positions = (x[order] for x in (keys, values,
                                                                          batch_indices, positions))
        slot = self.slots.get(key)
        indices, pages = self._indices(config, packed, layer, key)
        run = ffi.append if key.ffi else ops.append
        return run(slot, plan.token, kv, keys, values, batch_indices, positions,
                   packed.kv_page_indptr, indices, packed.kv_last_page_len, pages=pages)
