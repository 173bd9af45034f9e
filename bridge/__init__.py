"""seqattn_jax.bridge: the torch / FlashInfer side of seqattn_jax (the only code importing torch).

Installed as the subpackage `seqattn_jax.bridge` (setuptools package-dir mapping of `bridge/`; in
a source checkout `seqattn_jax/bridge` is a link to `bridge/`). `seqattn_jax` never imports it at
import time: `seqattn_jax.default_backend("flashinfer")` imports it the first time FlashInfer is
chosen, or you create a backend yourself:

    from seqattn_jax import bridge
    backend = bridge.FlashInferBackend(transport="callback")     # pass as backend= to plan_*

FlashInfer itself is imported later still, when a plan slot for a GPU kernel is created.

Modules (arrows: backend -> ops -> providers; backend -> ffi):
  backend        FlashInferBackend: the `seqattn_jax.backend.Backend` contract over FlashInfer:
                 capabilities, kernel choice, PlanKey, transport, row order, padding, page ranges
  ops            plans and runs as buffer_callbacks, plan slots and host-plan rings (the planning
                 design is documented there); `KernelProvider`, the providers' interface
  fi_provider    FlashInfer 0.7.2.post1 module calls and their raw argument lists (one copy)
  torch_provider a small torch kernel set used by the CPU tests in FlashInfer's place
  ffi            the XLA FFI transport via jax-tvm-ffi and the C++ shim `fi_shim.cpp`
  interop        zero-copy jax <-> torch views, XLA-stream handling, `torch_callback`
"""

try:
    import torch  # noqa: F401
except ModuleNotFoundError as e:  # name what to install, not only the missing module
    if e.name != "torch":
        raise
    raise ModuleNotFoundError(
        "seqattn_jax.bridge (the FlashInfer backend) needs torch: on a GPU, pip install "
        "'seqattn-jax[flashinfer]' after the torch build for your CUDA (README, 'On an NVIDIA GPU'); "
        "for the CPU mechanics tests, pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu", name="torch") from e

from .backend import FlashInferBackend  # noqa: E402
from .interop import jax_to_torch, torch_callback, torch_to_jax, xla_stream  # noqa: E402

__all__ = ["FlashInferBackend", "jax_to_torch", "torch_callback", "torch_to_jax", "xla_stream"]
