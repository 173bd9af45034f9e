"""Public paged-attention ops with backend selection: FlashInfer's CUDA kernels or the pure-JAX reference.

    batch_decode   one query per request over its pages        (FlashInfer batch decode)
    batch_prefill  ragged queries over their request's pages   (FlashInfer paged batch prefill)
    pod            one contiguous-K/V prefill + a decode batch (FlashInfer POD, one launch)
    batch_pod      a paged prefill batch + a decode batch      (FlashInfer batch POD, one launch)
    append_kv      write this step's K/V rows into the pool    (JAX scatter or FlashInfer's kernel)

Signatures mirror `seqattn_jax.reference` exactly, plus three keyword arguments:
  backend: "auto" (FlashInfer on a CUDA device when `flashinfer` imports and can run the
    configuration, else the reference), "reference", or "flashinfer" (raises `ValueError` naming the
    option FlashInfer cannot run, `RuntimeError` without a CUDA device / flashinfer).
  plan: an `AttentionPlan` from `plan_decode` / `plan_prefill` / `plan_pod` / `plan_batch_pod`.
    FlashInfer plans once per step (a host read of the small CSR arrays); make the plan once per
    step and pass it to every layer, including inside a `lax.scan` over layers. Without `plan=`, a
    FlashInfer op plans for itself (one host sync per call: fine for one layer, slow for many).
    The reference backend ignores plans, so the same model code runs on both backends.
    Host plans: a scheduler that knows the step's lengths on the host calls
    `host_plan_decode(config, seq_lens, num_qo_heads)` before dispatching the step and passes the
    `HostPlan` in; inside, `adopt_plan(host_plan, packed)` gives the step's plan with no host sync
    (the GPU keeps running the previous step while the host plans). `plan.ok` says whether the
    adopted plan was made for the packed batch's lengths; return it from the step.
  decode_kernel (plan_decode / batch_decode): "auto", "tensor_core" or "cuda_core". "auto" takes
    the tensor-core kernel (FlashInfer's FA2 prefill kernel with one query per request) for GQA
    group sizes >= 4 and the CUDA-core decode kernel below that (measured on Hopper: see
    benchmarks/README.md); group sizes the CUDA-core kernel is not compiled for (not in
    {1, 2, 3, 4, 6, 8, 16}) always take tensor cores.

The FlashInfer backend runs inside `jax.jit` with no copy of any buffer, on XLA's stream (see
`seqattn_jax.bridge`). Each step's plan is one `jax.experimental.buffer_callback` (the only Python
and the only device->host read of the step). Decode and prefill runs are XLA FFI custom calls
(`BRIDGE="ffi"`, through the `jax-tvm-ffi` package and a small C++ shim: no Python per layer) or
buffer_callbacks (`BRIDGE="callback"`: torch views of XLA's buffers through DLPack, ~25 us of
Python per call); POD, batch POD and FlashInfer's append run as buffer_callbacks. `BRIDGE="auto"`
(default, or the SEQATTN_JAX_BRIDGE environment variable) takes FFI when `jax_tvm_ffi` imports and
the shim builds. Both bridges are checked against the reference in tests/test_flashinfer_gpu.py.
Unsupported configurations (auto falls back to the reference for these; backend="flashinfer"
raises ValueError): pool dtype float32; q dtype other than the pool's (fp16/bf16 pools) or other
than fp16/bf16 (fp8 pools); head_dim not in {64, 128, 256}; a traced sm_scale / rope_scale /
rope_theta (FlashInfer takes host floats); a soft cap on POD / batch POD (FlashInfer's POD kernels
have none); fp8 pools outside decode.

Padding requests and padding token rows give 0 (LSE -inf) on every backend. LSE is base 2.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax.config import CacheConfig
from seqattn_jax.packing import PackedBatch
from seqattn_jax.validation import check_num_qo_heads

__all__ = [
    "BACKENDS", "DECODE_KERNELS", "AttentionPlan", "HostPlan", "adopt_plan", "append_kv",
    "batch_decode", "batch_pod", "batch_prefill", "decode_layout_from_lens",
    "discard_host_plans", "flashinfer_available", "flashinfer_unsupported_reason", "host_plan_decode",
    "plan_batch_pod", "plan_decode", "plan_pod", "plan_prefill", "pod", "resolve_backend",
]

BACKENDS = ("auto", "reference", "flashinfer")
DECODE_KERNELS = ("auto", "tensor_core", "cuda_core")
APPEND_IMPLS = ("auto", "scatter", "flashinfer")
CUDA_CORE_GROUP_SIZES = (1, 2, 3, 4, 6, 8, 16)
FLASHINFER_HEAD_DIMS = (64, 128, 256)
# GQA group size from which "auto" picks the tensor-core decode kernel (benchmarks/README.md).
TENSOR_CORE_MIN_GROUP = 4
# append_kv's implementation under a FlashInfer plan when impl="auto" (benchmarks/README.md,
# H200, 64 rows x 8 heads x 128 fp16): the JAX scatter (in place under donation) and FlashInfer's
# append kernel as an XLA FFI call measured the same within noise in a 32-layer step (1.7 % apart);
# through a buffer_callback FlashInfer's kernel costs a Python call per layer (+1.4 ms per step).
# The scatter needs no plan and no condition on the rows, so it is the default.
DEFAULT_APPEND_IMPL = {"callback": "scatter", "ffi": "scatter"}
# How FlashInfer's decode / prefill runs enter XLA: "ffi" (an XLA FFI custom call through
# jax-tvm-ffi and a small C++ shim: no Python per layer; needs the `jax-tvm-ffi` package and a C++
# compiler for the shim's one-time build), "callback" (a buffer_callback per call: Python per
# layer), or "auto" (ffi when it is available). POD, batch POD and FlashInfer's append always use
# buffer_callback. Set here or with the environment variable SEQATTN_JAX_BRIDGE.
BRIDGE = os.environ.get("SEQATTN_JAX_BRIDGE", "auto")
BRIDGES = ("auto", "ffi", "callback")
# The bridge's kernel provider for backend "flashinfer". Tests set "torch" (the bridge's small torch
# kernels) to exercise the same plan / callback / aliasing mechanics on a CPU.
_PROVIDER = "flashinfer"


# ----------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------

def _load_bridge():
    """Import `seqattn_jax.bridge` (installed package mapping) or, in a source checkout without an
    install, `bridge/` next to the package directory under that name."""
    name = "seqattn_jax.bridge"
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in (name, "seqattn_jax.bridge"):
            raise
    path = Path(__file__).resolve().parent.parent / "bridge"
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    if spec is None or not (path / "__init__.py").exists():
        raise ModuleNotFoundError(f"seqattn_jax.bridge not installed and {path} not found")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def bridge_module(sub: str):
    """`seqattn_jax.bridge.<sub>` (imports torch)."""
    _load_bridge()
    return importlib.import_module(f"seqattn_jax.bridge.{sub}")


@functools.cache
def flashinfer_available() -> bool:
    """True when JAX's default backend is a CUDA GPU and torch (CUDA) and flashinfer import."""
    try:
        if jax.default_backend() != "gpu":
            return False
    except Exception:  # noqa: BLE001 - no backend at all
        return False
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("flashinfer") is None:
        return False
    try:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            return False
        import flashinfer  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - a broken install counts as unavailable
        return False
    return True


def resolve_backend(backend: str) -> str:
    """"reference" or "flashinfer" for a requested backend (before configuration checks)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "flashinfer":
        if not flashinfer_available():
            raise RuntimeError("backend='flashinfer' needs JAX on a CUDA GPU with torch (CUDA) and "
                               "flashinfer importable; use backend='auto' or 'reference'")
        return "flashinfer"
    return "flashinfer" if flashinfer_available() else "reference"


def _is_static_float(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


def flashinfer_unsupported_reason(config: CacheConfig, q_dtype, num_qo_heads: int, *, kind: str,
                                  sm_scale=None, logits_soft_cap=0.0, window_left=-1,
                                  pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4,
                                  decode_kernel="auto") -> str | None:
    """Why FlashInfer cannot run this configuration (a message naming the option), or None."""
    kv_dt = config.dtype
    q_dt = jnp.dtype(q_dtype).name
    if kv_dt == "float32":
        return "CacheConfig.dtype='float32': FlashInfer's kernels take float16/bfloat16 (or fp8) pools"
    if kv_dt in ("float16", "bfloat16"):
        if q_dt != kv_dt:
            return f"q.dtype={q_dt}: FlashInfer needs q in the pool dtype {kv_dt}"
    else:
        if q_dt not in ("float16", "bfloat16"):
            return f"q.dtype={q_dt}: with an fp8 pool FlashInfer needs float16/bfloat16 queries"
        if kind != "decode":
            return f"CacheConfig.dtype={kv_dt}: fp8 pools run on FlashInfer's decode kernels only"
    if config.head_dim not in FLASHINFER_HEAD_DIMS:
        return f"head_dim={config.head_dim}: FlashInfer is compiled for head_dim in {FLASHINFER_HEAD_DIMS}"
    if num_qo_heads % config.num_kv_heads:
        return (f"num_qo_heads={num_qo_heads} is not a multiple of num_kv_heads="
                f"{config.num_kv_heads}")
    for name, v in (("sm_scale", sm_scale), ("rope_scale", rope_scale), ("rope_theta", rope_theta)):
        if v is not None and not _is_static_float(v):
            return f"{name} is a traced array: FlashInfer takes it as a host float"
    if kind in ("pod", "batch_pod") and float(logits_soft_cap) > 0:
        return (f"logits_soft_cap={logits_soft_cap}: FlashInfer's POD kernels have no soft cap "
                f"(call batch_prefill and batch_decode separately)")
    if decode_kernel not in DECODE_KERNELS:
        return f"decode_kernel={decode_kernel!r}: must be one of {DECODE_KERNELS}"
    group = num_qo_heads // config.num_kv_heads
    if kind == "decode" and decode_kernel == "cuda_core" and group not in CUDA_CORE_GROUP_SIZES:
        return (f"decode_kernel='cuda_core' with GQA group size {group}: FlashInfer's CUDA-core "
                f"decode kernel only has group sizes {CUDA_CORE_GROUP_SIZES}")
    return None


_warned: set[str] = set()


def _choose(backend: str, reason: str | None) -> str:
    resolved = resolve_backend(backend)
    if resolved == "flashinfer" and reason is not None:
        if backend == "flashinfer":
            raise ValueError(f"backend='flashinfer': {reason}")
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"seqattn_jax: falling back to the reference backend: {reason}",
                          stacklevel=3)
        return "reference"
    return resolved


def _use_ffi(kind: str) -> bool:
    """Whether this plan's runs go through the XLA FFI path (see `BRIDGE`)."""
    if BRIDGE not in BRIDGES:
        raise ValueError(f"seqattn_jax.attention.BRIDGE must be one of {BRIDGES}, got {BRIDGE!r}")
    if BRIDGE == "callback" or kind not in ("decode", "prefill") or _PROVIDER != "flashinfer":
        return False
    ok = bridge_module("ffi").available()
    if BRIDGE == "ffi" and not ok:
        raise RuntimeError("seqattn_jax.attention.BRIDGE='ffi' needs the jax-tvm-ffi package and a "
                           "C++ compiler for the shim (tvm_ffi.cpp.load_inline)")
    return ok


def _decode_kernel(decode_kernel: str, group: int) -> str:
    if decode_kernel != "auto":
        return decode_kernel
    if group >= TENSOR_CORE_MIN_GROUP or group not in CUDA_CORE_GROUP_SIZES:
        return "tensor_core"
    return "cuda_core"


# ----------------------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _PlanMeta:
    kind: str
    backend: str                 # "reference" | "flashinfer"
    key: object                  # bridge PlanKey (flashinfer) or None
    logits_soft_cap: float
    window_left: int
    pos_encoding_mode: str
    causal: bool
    host: bool = False           # adopted from a HostPlan (planned on the host before the step)
    num_qo_heads: int | None = None  # the query heads planned for; runs check q against it


@jax.tree_util.register_pytree_node_class
class AttentionPlan:
    """One step's attention plan: a token array (FlashInfer; None for the reference backend),
    static metadata and, for a plan adopted from a `HostPlan`, `ok` (a bool scalar: the step's
    packed batch is the one planned on the host). A pytree: pass it into jitted functions, close
    over it in `lax.scan`."""

    def __init__(self, token, meta: _PlanMeta, ok=None):
        self.token = token
        self.meta = meta
        self._ok = ok

    def tree_flatten(self):
        return (self.token, self._ok), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(children[0], meta, children[1])

    @property
    def ok(self) -> jax.Array:
        """bool[]: False when a host plan did not match the step's batch (then the outputs of the
        runs that used it are unspecified; the KV pool is never affected). Always True for a plan
        made from the packed batch itself."""
        return jnp.asarray(True) if self._ok is None else self._ok

    @property
    def backend(self) -> str:
        return self.meta.backend

    def __repr__(self):
        return f"AttentionPlan(kind={self.meta.kind!r}, backend={self.meta.backend!r})"


def _options_check(name, logits_soft_cap, window_left, pos_encoding_mode):
    from seqattn_jax import reference  # noqa: PLC0415

    if not isinstance(pos_encoding_mode, str) or pos_encoding_mode not in reference.POS_ENCODING_MODES:
        raise ValueError(f"{name}: pos_encoding_mode must be one of {reference.POS_ENCODING_MODES}, "
                         f"got {pos_encoding_mode!r}")
    if isinstance(window_left, bool) or not isinstance(window_left, (int, np.integer)) or window_left < -1:
        raise ValueError(f"{name}: window_left must be a Python int >= -1, got {window_left!r}")
    if not _is_static_float(logits_soft_cap) or not math.isfinite(float(logits_soft_cap)) or \
            float(logits_soft_cap) < 0:
        raise ValueError(f"{name}: logits_soft_cap must be a static float >= 0, got {logits_soft_cap!r}")


def _q_dtype_name(config: CacheConfig, q_dtype) -> str:
    if q_dtype is not None:
        return jnp.dtype(q_dtype).name
    return config.dtype if config.dtype in ("float16", "bfloat16", "float32") else "float16"


def _valid_rows_first(batch_indices):
    """Row order putting the real token rows first (stable). A decode batch has row b = request b,
    so a padding request in the middle leaves a hole; FlashInfer's append takes the real rows as a
    prefix. The decode plan and `append_kv` apply the same order, so they agree on the rows."""
    return jnp.argsort(batch_indices < 0, stable=True)


def _meta_arrays_decode(packed: PackedBatch, b: int):
    bi = packed.batch_indices
    if bi.shape[0] != b:  # decode meta carries one row per request
        bi = jnp.full((b,), -1, jnp.int32)
    else:
        bi = bi[_valid_rows_first(bi)]
    return (packed.kv_page_indptr, packed.kv_last_page_len, bi)


def _check_packed(name: str, packed):
    if not isinstance(packed, PackedBatch):
        raise ValueError(f"{name} must be a seqattn_jax.PackedBatch, got {type(packed).__name__}")


def plan_decode(config: CacheConfig, packed: PackedBatch, num_qo_heads: int, *, q_dtype=None,
                sm_scale=None, logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE",
                rope_scale=1.0, rope_theta=1e4, backend="auto", decode_kernel="auto",
                slot: int = 0) -> AttentionPlan:
    """Plan this step's decode batch once for every layer (call inside the jitted step).

    Args:
      packed: the step's `PackedBatch` (B requests).
      num_qo_heads: Hq of the queries; q_dtype: their dtype (default: the pool dtype, or float16
        for fp8 pools). The remaining options must equal those later given to `batch_decode`
        (sm_scale / rope_scale / rope_theta may differ: they are run-time arguments).
      slot: distinguishes two live plans with identical shapes and options in one step.
    """
    _check_packed("plan_decode: packed", packed)
    meta = _decode_plan_meta("plan_decode", config, packed.batch_size, num_qo_heads,
                             q_dtype=q_dtype, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                             window_left=window_left, pos_encoding_mode=pos_encoding_mode,
                             rope_scale=rope_scale, rope_theta=rope_theta, backend=backend,
                             decode_kernel=decode_kernel, slot=slot)
    if meta.backend == "reference":
        return AttentionPlan(None, meta)
    token = bridge_module("ops").plan(meta.key, *_meta_arrays_decode(packed, packed.batch_size))
    return AttentionPlan(token, meta)


def _plan_meta(fn, config, kind, num_qo_heads, *, q_dtype, sm_scale, logits_soft_cap,
               window_left, pos_encoding_mode, rope_scale, rope_theta, backend, causal=False,
               host=False, decode_kernel=None, ffi=False, **key_fields) -> _PlanMeta:
    """The shared flow of every plan: option checks, backend choice and (FlashInfer) the bridge's
    PlanKey. `decode_kernel`: decode plans only; `ffi`: whether the runs may take the XLA FFI
    bridge; `key_fields`: the PlanKey fields that differ between plan kinds (batch sizes, rows,
    slot). Nothing here imports the bridge unless FlashInfer is chosen."""
    _options_check(fn, logits_soft_cap, window_left, pos_encoding_mode)
    num_qo_heads = check_num_qo_heads(fn, num_qo_heads, config)
    qd = _q_dtype_name(config, q_dtype)
    extra = {} if decode_kernel is None else {"decode_kernel": decode_kernel}
    reason = flashinfer_unsupported_reason(
        config, qd, num_qo_heads, kind=kind, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
        window_left=window_left, pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
        rope_theta=rope_theta, **extra)
    be = _choose(backend, reason)
    meta = dict(kind=kind, logits_soft_cap=float(logits_soft_cap), window_left=int(window_left),
                pos_encoding_mode=pos_encoding_mode, causal=bool(causal), host=host,
                num_qo_heads=num_qo_heads)
    if be == "reference":
        return _PlanMeta(backend="reference", key=None, **meta)
    if decode_kernel is not None:
        key_fields["decode_kernel"] = _decode_kernel(decode_kernel,
                                                     num_qo_heads // config.num_kv_heads)
    key = bridge_module("ops").PlanKey(
        kind=kind, provider=_PROVIDER, num_qo_heads=num_qo_heads,
        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, page_size=config.page_size,
        kv_layout=config.kv_layout, q_dtype=qd, kv_dtype=config.dtype, causal=bool(causal),
        pos_encoding_mode=pos_encoding_mode, window_left=int(window_left),
        logits_soft_cap=float(logits_soft_cap), ffi=ffi and _use_ffi(kind), **key_fields)
    return _PlanMeta(backend="flashinfer", key=key, **meta)


def _decode_plan_meta(fn, config, b, num_qo_heads, *, slot, host=False, **opts) -> _PlanMeta:
    """`_plan_meta` of a decode batch of `b` requests (device or host plan)."""
    return _plan_meta(fn, config, "decode", num_qo_heads, host=host, ffi=True, batch_size=b,
                      num_rows=b, slot=slot, **opts)


# ----------------------------------------------------------------------------------------------
# host plans: a decode step planned on the host, adopted inside the jitted step with no sync
# ----------------------------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
class HostPlan:
    """A decode plan made on the host by `host_plan_decode`, waiting for the step that adopts it
    (`adopt_plan`). A pytree: pass it to the jitted step as an argument.

    With FlashInfer it holds no array: the plan itself (schedule and the lengths it was made for)
    waits in the bridge and reaches the step through `adopt_plan`, with no host->device transfer
    of the step's arguments (which would wait for the previous step). With the reference backend
    `expected` (numpy int32 [2B + 1]: the planned `kv_page_indptr` and `kv_last_page_len`) is the
    only content, for the same check.
    """

    def __init__(self, expected, meta: _PlanMeta, batch_size: int):
        self.expected = expected
        self.meta = meta
        self.batch_size = batch_size

    def tree_flatten(self):
        return (self.expected,), (self.meta, self.batch_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self):
        return f"HostPlan(batch_size={self.batch_size}, backend={self.meta.backend!r})"


def decode_layout_from_lens(config: CacheConfig, seq_lens) -> tuple[np.ndarray, np.ndarray]:
    """numpy (kv_page_indptr int32[B + 1], kv_last_page_len int32[B]) of a decode batch whose
    request b holds `seq_lens[b]` tokens (0: a padding row): what `pack_for_flashinfer` gives."""
    lens = np.asarray(seq_lens, np.int64)
    pages = -(-lens // config.page_size)
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    lpl = np.where(pages > 0, lens - (pages - 1) * config.page_size, 0).astype(np.int32)
    return indptr, lpl


def host_plan_decode(config: CacheConfig, seq_lens, num_qo_heads: int, *, q_dtype=None,
                     sm_scale=None, logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE",
                     rope_scale=1.0, rope_theta=1e4, backend="auto", decode_kernel="auto",
                     slot: int = 0) -> HostPlan:
    """Plan a decode step on the host, before dispatching it (call outside `jax.jit`).

    A plan made inside the step (`plan_decode`) must read the step's lengths back from the GPU,
    which waits for the previous step to finish and leaves the GPU idle while FlashInfer plans.
    A scheduler that knows the lengths on the host plans here instead, while the GPU still runs
    the previous step; the step then adopts the plan (`adopt_plan`) without any host sync.

    Args:
      seq_lens: int [B], host data (numpy / list): request b's length in this step, after the
        step's `allocate_decoding` (its new token included); 0 for a padding row. Row b must be
        the step's `pack_for_flashinfer(state, seq_ids)` row b.
      num_qo_heads, q_dtype, ..., slot: as in `plan_decode`; later `batch_decode` calls must pass
        the same logits_soft_cap / window_left / pos_encoding_mode.
    Returns a `HostPlan`. Plans are adopted in the order they were made, one per step (per plan
    shape); at most `HOST_PLAN_DEPTH` (6) may wait. With the reference backend nothing is planned
    and the plan only carries the lengths for the check.
    """
    if isinstance(seq_lens, jax.core.Tracer):
        raise ValueError("host_plan_decode: seq_lens must be host data (numpy); it runs outside "
                         "jax.jit, before the step (inside a step use plan_decode)")
    lens = np.asarray(seq_lens)
    if lens.ndim != 1 or lens.shape[0] < 1 or not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"host_plan_decode: seq_lens must be a 1-D integer array with one entry "
                         f"per request, got shape {lens.shape} dtype {lens.dtype}")
    cap = config.max_pages_per_seq * config.page_size
    if lens.min() < 0 or lens.max() > cap:
        raise ValueError(f"host_plan_decode: seq_lens must be in [0, max_pages_per_seq * page_size "
                         f"= {cap}], got min {lens.min()} max {lens.max()}")
    b = int(lens.shape[0])
    opts = (q_dtype if q_dtype is None else jnp.dtype(q_dtype).name, sm_scale, logits_soft_cap,
            window_left, pos_encoding_mode, rope_scale, rope_theta, backend, decode_kernel, slot)
    try:   # this runs every step on the host: the checks and the PlanKey are cached
        meta = _host_decode_meta(config, b, num_qo_heads, opts, BRIDGE, _PROVIDER)
    except TypeError:   # an unhashable option: let the checks name it
        meta = _host_decode_meta.__wrapped__(config, b, num_qo_heads, opts, BRIDGE, _PROVIDER)
    indptr, lpl = decode_layout_from_lens(config, lens)
    expected = np.concatenate([indptr, lpl])
    if meta.backend == "reference":
        return HostPlan(expected, meta, b)
    ops = bridge_module("ops")
    if expected.size > ops.MAX_HOST_PLAN_ROWS:
        raise ValueError(f"host_plan_decode: at most {(ops.MAX_HOST_PLAN_ROWS - 1) // 2} requests "
                         f"per host plan, got {b}")
    ops.host_plan(meta.key, {"indptr": indptr, "lpl": lpl}, append_rows=None, expected=expected)
    return HostPlan(None, meta, b)


@functools.lru_cache(maxsize=256)
def _host_decode_meta(config, b, num_qo_heads, opts, bridge, provider):
    del bridge, provider   # cache key only: they change the PlanKey
    (q_dtype, sm_scale, logits_soft_cap, window_left, pos_encoding_mode, rope_scale, rope_theta,
     backend, decode_kernel, slot) = opts
    return _decode_plan_meta("host_plan_decode", config, b, num_qo_heads, q_dtype=q_dtype,
                             sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                             window_left=window_left, pos_encoding_mode=pos_encoding_mode,
                             rope_scale=rope_scale, rope_theta=rope_theta, backend=backend,
                             decode_kernel=decode_kernel, slot=slot, host=True)


def discard_host_plans() -> int:
    """Drop the host plans that still wait for a step (e.g. after a step raised before running):
    the next step then adopts the next plan made. Returns how many were dropped."""
    if "seqattn_jax.bridge.ops" not in sys.modules:
        return 0
    return bridge_module("ops").discard_host_plans()


def adopt_plan(host_plan: HostPlan, packed: PackedBatch) -> AttentionPlan:
    """Inside the jitted step: the decode plan for `packed`, taken from the oldest host plan
    waiting for this plan shape (made by `host_plan_decode` before the step) with no host sync.
    Use it like `plan_decode`'s result. `plan.ok` is False when the plan the step adopted was made
    for other lengths than `packed`'s (wrong `seq_lens`, or a plan left over from a step that never
    ran: `discard_host_plans`): return it from the step and check it (`checked.check_plan`)."""
    if not isinstance(host_plan, HostPlan):
        raise ValueError(f"adopt_plan: host_plan must be a HostPlan (from host_plan_decode), got "
                         f"{type(host_plan).__name__}")
    _check_packed("adopt_plan: packed", packed)
    b = host_plan.batch_size
    if packed.batch_size != b or packed.num_token_rows != b:
        raise ValueError(f"adopt_plan: the host plan is for a decode batch of {b} requests; packed "
                         f"has {packed.batch_size} requests and {packed.num_token_rows} rows")
    meta = host_plan.meta
    if meta.backend == "reference":
        token, exp = None, host_plan.expected
    else:
        token, exp = bridge_module("ops").adopt(meta.key, 2 * b + 1)
    ok = jnp.all(packed.kv_page_indptr == exp[:b + 1]) & \
        jnp.all(packed.kv_last_page_len == exp[b + 1:2 * b + 1])
    return AttentionPlan(token, meta, ok)


def plan_prefill(config: CacheConfig, packed: PackedBatch, num_qo_heads: int, *, causal=True,
                 q_dtype=None, sm_scale=None, logits_soft_cap=0.0, window_left=-1,
                 pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, backend="auto",
                 slot: int = 0) -> AttentionPlan:
    """Plan this step's paged prefill batch once for every layer (see `plan_decode`)."""
    _check_packed("plan_prefill: packed", packed)
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"plan_prefill: causal must be a bool, got {causal!r}")
    b, t = packed.batch_size, packed.num_token_rows
    meta = _plan_meta("plan_prefill", config, "prefill", num_qo_heads, q_dtype=q_dtype,
                      sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
                      pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                      rope_theta=rope_theta, backend=backend, causal=causal, batch_size=b,
                      num_rows=t, ffi=True, slot=slot)
    if meta.backend == "reference":
        return AttentionPlan(None, meta)
    token = bridge_module("ops").plan(meta.key, packed.kv_page_indptr, packed.kv_last_page_len,
                                      packed.qo_indptr, packed.batch_indices)
    return AttentionPlan(token, meta)


def plan_pod(config: CacheConfig, packed_d: PackedBatch, num_qo_heads: int, *, q_dtype=None,
             sm_scale=None, logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE",
             rope_scale=1.0, rope_theta=1e4, backend="auto", slot: int = 0) -> AttentionPlan:
    """Plan the decode part of `pod` (the single prefill request needs no plan)."""
    _check_packed("plan_pod: packed_d", packed_d)
    b = packed_d.batch_size
    meta = _plan_meta("plan_pod", config, "pod", num_qo_heads, q_dtype=q_dtype, sm_scale=sm_scale,
                      logits_soft_cap=logits_soft_cap, window_left=window_left,
                      pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                      rope_theta=rope_theta, backend=backend, batch_size=b, num_rows=b, slot=slot)
    if meta.backend == "reference":
        return AttentionPlan(None, meta)
    token = bridge_module("ops").plan(meta.key, *_meta_arrays_decode(packed_d, b))
    return AttentionPlan(token, meta)


def plan_batch_pod(config: CacheConfig, packed_p: PackedBatch, packed_d: PackedBatch,
                   num_qo_heads: int, *, causal_p=True, q_dtype=None, sm_scale=None,
                   logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE", rope_scale=1.0,
                   rope_theta=1e4, backend="auto", slot: int = 0) -> AttentionPlan:
    """Plan both parts of `batch_pod` once for every layer."""
    _check_packed("plan_batch_pod: packed_p", packed_p)
    _check_packed("plan_batch_pod: packed_d", packed_d)
    if not isinstance(causal_p, (bool, np.bool_)):
        raise ValueError(f"plan_batch_pod: causal_p must be a bool, got {causal_p!r}")
    meta = _plan_meta("plan_batch_pod", config, "batch_pod", num_qo_heads, q_dtype=q_dtype,
                      sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
                      pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale,
                      rope_theta=rope_theta, backend=backend, causal=causal_p,
                      batch_size=packed_d.batch_size, num_rows=packed_p.num_token_rows,
                      batch_size_p=packed_p.batch_size, slot=slot)
    if meta.backend == "reference":
        return AttentionPlan(None, meta)
    token = bridge_module("ops").plan(meta.key, packed_p.kv_page_indptr,
                                      packed_p.kv_last_page_len, packed_p.qo_indptr,
                                      packed_d.kv_page_indptr, packed_d.kv_last_page_len)
    return AttentionPlan(token, meta)


def _check_plan(fn: str, plan: AttentionPlan, kind: str, **opts):
    if not isinstance(plan, AttentionPlan):
        raise ValueError(f"{fn}: plan must be an AttentionPlan, got {type(plan).__name__}")
    if plan.meta.kind != kind:
        raise ValueError(f"{fn}: plan is a {plan.meta.kind!r} plan; make it with plan_{kind}")
    for name, value in opts.items():
        planned = getattr(plan.meta, name)
        if value != planned:
            raise ValueError(f"{fn}: {name}={value!r} differs from the plan's {name}={planned!r}; "
                             f"pass the same options to plan_{kind} and {fn}")


def _check_key_shapes(fn: str, key, **shapes):
    for name, (got, want) in shapes.items():
        if got != want:
            raise ValueError(f"{fn}: {name}={got!r} differs from the plan's {want!r}")


def _run_params(config, sm_scale, rope_scale, rope_theta, return_lse):
    ops = bridge_module("ops")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(config.head_dim)
    for name, v in (("sm_scale", sm_scale), ("rope_scale", rope_scale), ("rope_theta", rope_theta)):
        if not _is_static_float(v) or not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{name} must be a positive static float for the FlashInfer backend, "
                             f"got {v!r}")
    if not isinstance(return_lse, (bool, np.bool_)):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    return ops.RunParams(sm_scale=float(sm_scale), rope_scale=float(rope_scale),
                         rope_theta=float(rope_theta), return_lse=bool(return_lse))


def _layer_indices(config, packed, layer):
    if isinstance(layer, (bool, np.bool_)):
        raise ValueError(f"layer must be an int or an int32 scalar array, got {layer!r}")
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < config.num_layers:
        raise ValueError(f"layer must be in [0, config.num_layers = {config.num_layers}), got {layer}")
    return packed.layer_page_indices(layer, config.num_pages)


def _ffi_layer(config, packed, layer):
    """(indices, pages) for an FFI call: a Python-int layer becomes a static page range of the pool
    with layer-local indices (no per-layer index add); a traced layer offsets the indices."""
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, (bool, np.bool_)):
        _layer_indices(config, packed, layer)   # range check
        return packed.kv_page_indices, (int(layer) * config.num_pages, config.num_pages)
    return _layer_indices(config, packed, layer), None


def _check_pool(config, kv):
    from seqattn_jax.kv import check_pool  # noqa: PLC0415

    check_pool(config, kv)


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------

def batch_decode(config: CacheConfig, q, kv, packed: PackedBatch, *, layer=0, sm_scale=None,
                 logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE", rope_scale=1.0,
                 rope_theta=1e4, return_lse=False, backend="auto", plan: AttentionPlan | None = None,
                 decode_kernel="auto"):
    """Decode attention, one query per request: `reference.batch_decode`'s contract (q[B, Hq, D],
    row b is request b; out [B, Hq, D] or (out, lse [B, Hq] base 2)); see the module docstring for
    `backend`, `plan` and `decode_kernel`."""
    opts = dict(sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
                pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta)
    if plan is None:
        reason = flashinfer_unsupported_reason(config, q.dtype, q.shape[1], kind="decode",
                                               decode_kernel=decode_kernel, **opts)
        be = _choose(backend, reason)
    else:
        _check_plan("batch_decode", plan, "decode", num_qo_heads=q.shape[1],
                    logits_soft_cap=float(logits_soft_cap),
                    window_left=window_left, pos_encoding_mode=pos_encoding_mode)
        be = plan.backend
    if be == "reference":
        from seqattn_jax import reference  # noqa: PLC0415

        return reference.batch_decode(config, q, kv, packed, layer=layer, return_lse=return_lse,
                                      **opts)
    _check_pool(config, kv)
    if plan is None:
        plan = plan_decode(config, packed, q.shape[1], q_dtype=q.dtype, backend="flashinfer",
                           decode_kernel=decode_kernel, **opts)
    key = plan.meta.key
    _check_key_shapes("batch_decode", key, q_shape=(tuple(q.shape), (key.batch_size,
                      key.num_qo_heads, key.head_dim)), q_dtype=(jnp.dtype(q.dtype).name, key.q_dtype))
    rp = _run_params(config, sm_scale, rope_scale, rope_theta, return_lse)
    if key.ffi:
        indices, pages = _ffi_layer(config, packed, layer)
        res = bridge_module("ffi").decode(key, rp, plan.token, q, kv, packed.kv_page_indptr,
                                          indices, packed.kv_last_page_len, pages=pages)
    else:
        res = bridge_module("ops").decode(key, rp, plan.token, q, kv, packed.kv_page_indptr,
                                          _layer_indices(config, packed, layer),
                                          packed.kv_last_page_len)
    return (res[0], res[1]) if rp.return_lse else res[0]


def batch_prefill(config: CacheConfig, q, kv, packed: PackedBatch, *, layer=0, causal=True,
                  sm_scale=None, logits_soft_cap=0.0, window_left=-1, pos_encoding_mode="NONE",
                  rope_scale=1.0, rope_theta=1e4, return_lse=False, backend="auto",
                  plan: AttentionPlan | None = None):
    """Paged prefill / append attention: `reference.batch_prefill`'s contract (q[T, Hq, D], rows
    by `packed.qo_indptr`, padding rows give 0)."""
    opts = dict(sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
                pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta)
    if plan is None:
        reason = flashinfer_unsupported_reason(config, q.dtype, q.shape[1], kind="prefill", **opts)
        be = _choose(backend, reason)
    else:
        _check_plan("batch_prefill", plan, "prefill", num_qo_heads=q.shape[1],
                    logits_soft_cap=float(logits_soft_cap),
                    window_left=window_left, pos_encoding_mode=pos_encoding_mode, causal=causal)
        be = plan.backend
    if be == "reference":
        from seqattn_jax import reference  # noqa: PLC0415

        return reference.batch_prefill(config, q, kv, packed, layer=layer, causal=causal,
                                       return_lse=return_lse, **opts)
    _check_pool(config, kv)
    if plan is None:
        plan = plan_prefill(config, packed, q.shape[1], causal=causal, q_dtype=q.dtype,
                            backend="flashinfer", **opts)
    key = plan.meta.key
    _check_key_shapes("batch_prefill", key, q_shape=(tuple(q.shape), (key.num_rows,
                      key.num_qo_heads, key.head_dim)), q_dtype=(jnp.dtype(q.dtype).name, key.q_dtype))
    rp = _run_params(config, sm_scale, rope_scale, rope_theta, return_lse)
    if key.ffi:
        indices, pages = _ffi_layer(config, packed, layer)
        res = bridge_module("ffi").prefill(key, rp, plan.token, q, kv, packed.qo_indptr,
                                           packed.kv_page_indptr, indices,
                                           packed.kv_last_page_len, pages=pages)
    else:
        res = bridge_module("ops").prefill(key, rp, plan.token, q, kv, packed.qo_indptr,
                                           packed.kv_page_indptr,
                                           _layer_indices(config, packed, layer),
                                           packed.kv_last_page_len)
    return (res[0], res[1]) if rp.return_lse else res[0]


def pod(config: CacheConfig, q_p, k_p, v_p, q_d, kv, packed_d: PackedBatch, *, layer=0,
        causal_p=True, sm_scale=None, logits_soft_cap=0.0, window_left=-1,
        pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, return_lse=False,
        backend="auto", plan: AttentionPlan | None = None):
    """Prefill-on-decode in one launch: `reference.pod`'s contract. FlashInfer's POD has no soft
    cap (auto falls back to the reference for logits_soft_cap > 0)."""
    opts = dict(sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
                pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta)
    if plan is None:
        reason = flashinfer_unsupported_reason(config, q_d.dtype, q_d.shape[1], kind="pod", **opts)
        if reason is None and (k_p.dtype != q_p.dtype or q_p.dtype != q_d.dtype):
            reason = "k_p / v_p / q_p / q_d must share one dtype for FlashInfer's POD kernel"
        be = _choose(backend, reason)
    else:
        _check_plan("pod", plan, "pod", num_qo_heads=q_d.shape[1], logits_soft_cap=float(logits_soft_cap),
                    window_left=window_left, pos_encoding_mode=pos_encoding_mode)
        be = plan.backend
    if be == "reference":
        from seqattn_jax import reference  # noqa: PLC0415

        return reference.pod(config, q_p, k_p, v_p, q_d, kv, packed_d, layer=layer,
                             causal_p=causal_p, return_lse=return_lse, **opts)
    _check_pool(config, kv)
    if not isinstance(causal_p, (bool, np.bool_)):
        raise ValueError(f"causal_p must be a bool, got {causal_p!r}")
    if causal_p and k_p.shape[0] < q_p.shape[0]:
        raise ValueError(f"with causal_p, k_p must have at least as many rows as q_p, got "
                         f"Tk = {k_p.shape[0]} < Tp = {q_p.shape[0]}")
    if plan is None:
        plan = plan_pod(config, packed_d, q_d.shape[1], q_dtype=q_d.dtype, backend="flashinfer",
                        **opts)
    key = plan.meta.key
    for name, x in (("q_p", q_p), ("k_p", k_p), ("v_p", v_p)):
        if jnp.dtype(x.dtype).name != key.q_dtype:
            raise ValueError(f"pod: {name}.dtype={jnp.dtype(x.dtype).name} must be the plan's "
                             f"q_dtype {key.q_dtype} for FlashInfer's POD kernel")
    _check_key_shapes("pod", key, q_d_shape=(tuple(q_d.shape), (key.batch_size, key.num_qo_heads,
                      key.head_dim)), q_p_heads=(q_p.shape[1], key.num_qo_heads))
    rp = _run_params(config, sm_scale, rope_scale, rope_theta, return_lse)
    ops = bridge_module("ops")
    res = ops.pod(key, rp, bool(causal_p), plan.token, q_p, k_p, v_p, q_d, kv,
                  packed_d.kv_page_indptr, _layer_indices(config, packed_d, layer),
                  packed_d.kv_last_page_len)
    return ((res[0], res[1]), (res[2], res[3])) if rp.return_lse else (res[0], res[1])


def batch_pod(config: CacheConfig, q_p, packed_p: PackedBatch, q_d, packed_d: PackedBatch, kv, *,
              layer=0, causal_p=True, sm_scale=None, logits_soft_cap=0.0, window_left=-1,
              pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, return_lse=False,
              backend="auto", plan: AttentionPlan | None = None):
    """A paged prefill batch and a decode batch in one launch: `reference.batch_pod`'s contract."""
    opts = dict(sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left,
                pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta)
    if plan is None:
        reason = flashinfer_unsupported_reason(config, q_d.dtype, q_d.shape[1], kind="batch_pod",
                                               **opts)
        if reason is None and q_p.dtype != q_d.dtype:
            reason = "q_p and q_d must share one dtype for FlashInfer's batch POD kernel"
        be = _choose(backend, reason)
    else:
        _check_plan("batch_pod", plan, "batch_pod", num_qo_heads=q_d.shape[1],
                    logits_soft_cap=float(logits_soft_cap),
                    window_left=window_left, pos_encoding_mode=pos_encoding_mode, causal=causal_p)
        be = plan.backend
    if be == "reference":
        from seqattn_jax import reference  # noqa: PLC0415

        return reference.batch_pod(config, q_p, packed_p, q_d, packed_d, kv, layer=layer,
                                   causal_p=causal_p, return_lse=return_lse, **opts)
    _check_pool(config, kv)
    if plan is None:
        plan = plan_batch_pod(config, packed_p, packed_d, q_d.shape[1], causal_p=causal_p,
                              q_dtype=q_d.dtype, backend="flashinfer", **opts)
    key = plan.meta.key
    _check_key_shapes("batch_pod", key,
                      q_d_shape=(tuple(q_d.shape), (key.batch_size, key.num_qo_heads, key.head_dim)),
                      q_p_shape=(tuple(q_p.shape), (key.num_rows, key.num_qo_heads, key.head_dim)),
                      q_p_dtype=(jnp.dtype(q_p.dtype).name, key.q_dtype))
    rp = _run_params(config, sm_scale, rope_scale, rope_theta, return_lse)
    ops = bridge_module("ops")
    res = ops.batch_pod(key, rp, plan.token, q_p, packed_p.qo_indptr, packed_p.kv_page_indptr,
                        _layer_indices(config, packed_p, layer), packed_p.kv_last_page_len, q_d,
                        packed_d.kv_page_indptr, _layer_indices(config, packed_d, layer),
                        packed_d.kv_last_page_len, kv)
    return ((res[0], res[1]), (res[2], res[3])) if rp.return_lse else (res[0], res[1])


def append_kv(config: CacheConfig, kv, keys, values, packed: PackedBatch, *, layer=0,
              backend="auto", plan: AttentionPlan | None = None, impl="auto"):
    """Write each token row's K/V into the pool (`seqattn_jax.kv.append_kv`'s contract, including
    `values=None` with stacked [T, 2, Hkv, D] rows in `keys`); in place when the caller donates
    `kv` to its `jax.jit`.

    impl: "scatter" (the JAX scatter of `seqattn_jax.kv`, any backend), "flashinfer"
    (FlashInfer's append kernel, as an XLA FFI call or a buffer_callback like the plan's runs,
    its output aliasing the pool; needs a FlashInfer `plan` of this batch: decode, prefill or
    pod; a decode batch's rows are reordered real-rows-first, as its plan saw them), or
    "auto" (`DEFAULT_APPEND_IMPL` when a FlashInfer plan is given, else the scatter).
    """
    from seqattn_jax import kv as kv_mod  # noqa: PLC0415

    if impl not in APPEND_IMPLS:
        raise ValueError(f"append_kv: impl must be one of {APPEND_IMPLS}, got {impl!r}")
    if backend not in BACKENDS:
        raise ValueError(f"append_kv: backend must be one of {BACKENDS}, got {backend!r}")
    use_fi = False
    if impl == "flashinfer":
        if plan is None or plan.backend != "flashinfer":
            raise ValueError("append_kv: impl='flashinfer' needs a FlashInfer plan of this batch "
                             "(plan_decode / plan_prefill / plan_pod with backend != 'reference')")
        if plan.meta.host:
            raise ValueError("append_kv: impl='flashinfer' needs a plan made from the packed batch "
                             "(plan_decode), not a host plan (adopt_plan): use impl='scatter'")
        use_fi = True
    elif impl == "auto" and plan is not None and plan.backend == "flashinfer" and \
            backend != "reference" and plan.meta.kind in ("decode", "prefill", "pod") and \
            not plan.meta.host:
        use_fi = DEFAULT_APPEND_IMPL["ffi" if plan.meta.key.ffi else "callback"] == "flashinfer"
    if not use_fi:
        return kv_mod.append_kv(config, kv, keys, values, packed, layer=layer)
    if plan.meta.kind not in ("decode", "prefill", "pod"):
        raise ValueError(f"append_kv: impl='flashinfer' needs a decode / prefill / pod plan, got "
                         f"{plan.meta.kind!r}")
    kv_mod.check_pool(config, kv, "append_kv")
    kv_mod.check_rows(config, packed, keys, values, "append_kv")
    if values is None:   # stacked rows: FlashInfer's kernel takes K and V apart
        keys, values = keys[:, 0], keys[:, 1]
    key = plan.meta.key
    if packed.num_token_rows != (key.num_rows if key.kind == "prefill" else key.batch_size):
        raise ValueError("append_kv: packed does not match the plan's batch")
    keys, values = keys.astype(kv.dtype), values.astype(kv.dtype)
    batch_indices, positions = packed.batch_indices, packed.positions
    if key.kind in ("decode", "pod"):  # the plan saw the rows in this order (_meta_arrays_decode)
        order = _valid_rows_first(batch_indices)
        keys, values, batch_indices, positions = (x[order] for x in (keys, values, batch_indices,
                                                                      positions))
    if key.ffi:
        indices, pages = _ffi_layer(config, packed, layer)
        return bridge_module("ffi").append(key, plan.token, kv, keys, values, batch_indices,
                                           positions, packed.kv_page_indptr, indices,
                                           packed.kv_last_page_len, pages=pages)
    return bridge_module("ops").append(key, plan.token, kv, keys, values, batch_indices, positions,
                                       packed.kv_page_indptr, _layer_indices(config, packed, layer),
                                       packed.kv_last_page_len)
