"""The contract between the public attention ops and the code that runs them.

A backend is an object (optax's spirit: a small protocol, composition rather than inheritance):

    unsupported(config, q_dtype, num_qo_heads, kind, options) -> str | None   why it cannot run this
    plan(config, meta, packed, packed_d)       -> AttentionPlan   inside the step, from device data
    host_plan(config, meta, layout)            -> HostPlan        outside jit, from host lengths
    adopt(host_plan, n_expected)               -> (token, expected)  inside the step, no sync
    discard_host_plans()                       -> int             drop plans no step adopted
    decode / prefill / pod / batch_pod(config, plan, ...)  -> out or (out, lse) (per options)
    append(config, plan, kv, keys, values, packed, layer)  -> kv  the backend's own K/V write

Two implement it: `seqattn_jax.reference_backend.ReferenceBackend` (pure JAX, any device) and
`seqattn_jax.bridge.FlashInferBackend` (FlashInfer's CUDA kernels through the torch bridge; its
capability tables, kernel choice, transport, row order and padding live there). The backend object
that made a plan sits in the plan's static metadata, so a jitted step keys on it: two backends
(say, two transports) never share a trace, and nothing process-wide changes a trace.

Defaults: `default_backend("auto" | "reference" | "flashinfer")` gives the documented process
defaults (one `ReferenceBackend`, one `FlashInferBackend()` created on first use); the public ops
take either such a name or a backend object. "auto" is FlashInfer on a CUDA GPU where it imports
and can run the configuration (else the reference, with a warning naming the reason).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Any, Protocol, runtime_checkable

import jax

from seqattn_jax.options import AttentionOptions
from seqattn_jax.plans import AttentionPlan, HostPlan, PlanMeta

__all__ = ["BACKENDS", "PLAN_KINDS", "Backend", "default_backend", "flashinfer_available",
           "resolve_backend"]

BACKENDS = ("auto", "reference", "flashinfer")
PLAN_KINDS = ("decode", "prefill", "pod", "batch_pod")


@runtime_checkable
class Backend(Protocol):
    """What the public ops need from a backend (see the module docstring). Implementations must be
    hashable (identity is fine): the plan's static metadata holds them."""

    name: str

    def unsupported(self, config, q_dtype: str, num_qo_heads: int, kind: str,
                    options: AttentionOptions) -> str | None: ...

    def plan(self, config, meta: PlanMeta, packed, packed_d=None) -> AttentionPlan: ...

    def host_plan(self, config, meta: PlanMeta, layout) -> HostPlan: ...

    def adopt(self, host_plan: HostPlan, n_expected: int) -> tuple[Any, jax.Array]: ...

    def discard_host_plans(self) -> int: ...

    def decode(self, config, plan: AttentionPlan, q, kv, packed, layer): ...

    def prefill(self, config, plan: AttentionPlan, q, kv, packed, layer): ...

    def pod(self, config, plan: AttentionPlan, q_p, k_p, v_p, q_d, kv, packed_d, layer): ...

    def batch_pod(self, config, plan: AttentionPlan, q_p, packed_p, q_d, packed_d, kv, layer): ...

    def append(self, config, plan: AttentionPlan, kv, keys, values, packed, layer): ...


# ----------------------------------------------------------------------------------------------
# defaults and selection
# ----------------------------------------------------------------------------------------------

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


# The documented defaults, created on first use (a FlashInferBackend allocates GPU workspaces).
_DEFAULTS: dict[str, Any] = {}


def default_backend(name: str = "auto"):
    """The process's default backend object for `name` ("auto", "reference" or "flashinfer").

    "flashinfer" is one `seqattn_jax.bridge.FlashInferBackend()` (kernels from flashinfer,
    transport "auto") and raises `RuntimeError` without a CUDA GPU, torch and flashinfer; "auto"
    is that where available, else the reference. Create your own `FlashInferBackend(...)` for
    another transport or kernel provider and pass it as `backend=`."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a backend object, got {name!r}")
    if name == "auto":
        name = "flashinfer" if flashinfer_available() else "reference"
    be = _DEFAULTS.get(name)
    if be is None:
        if name == "reference":
            from seqattn_jax.reference_backend import ReferenceBackend  # noqa: PLC0415

            be = ReferenceBackend()
        else:
            if not flashinfer_available():
                raise RuntimeError("backend='flashinfer' needs JAX on a CUDA GPU with torch (CUDA) "
                                   "and flashinfer importable; use backend='auto' or 'reference'")
            from seqattn_jax import bridge  # noqa: PLC0415 - torch only when FlashInfer runs

            be = bridge.FlashInferBackend()
        be = _DEFAULTS.setdefault(name, be)
    return be


def resolve_backend(backend="auto") -> str:
    """The name ("reference" or "flashinfer") of the backend `backend` selects on this machine,
    before any per-configuration check."""
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or a backend object, "
                             f"got {backend!r}")
        if backend == "auto":
            return "flashinfer" if flashinfer_available() else "reference"
        if backend == "flashinfer" and not flashinfer_available():
            default_backend("flashinfer")   # raises the RuntimeError naming what is missing
        return backend
    return backend.name


_warned: set[str] = set()
_BACKEND_TYPES: set[type] = set()


def choose(backend, config, q_dtype: str, num_qo_heads: int, kind: str,
           options: AttentionOptions, where: str):
    """The backend object that runs this plan. A name or object that cannot run the configuration
    raises `ValueError` with the reason, except "auto", which falls back to the reference (one
    warning per reason)."""
    if isinstance(backend, str):
        be = default_backend(backend)
    elif type(backend) in _BACKEND_TYPES or isinstance(backend, Backend):
        _BACKEND_TYPES.add(type(backend))   # the protocol check is slow: once per type
        be = backend
    else:
        raise ValueError(f"{where}: backend must be one of {BACKENDS} or a backend object "
                         f"(seqattn_jax.backend.Backend), got {backend!r}")
    reason = be.unsupported(config, q_dtype, num_qo_heads, kind, options)
    if reason is None:
        return be
    if backend == "auto":
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"seqattn_jax: falling back to the reference backend: {reason}",
                          stacklevel=4)
        return default_backend("reference")
    raise ValueError(f"{where}: backend {be.name!r} cannot run this: {reason}")
