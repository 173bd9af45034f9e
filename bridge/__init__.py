"""seqattn_jax.bridge: the torch / FlashInfer side of seqattn_jax (the only code importing torch).

Installed as the subpackage `seqattn_jax.bridge` (setuptools package-dir mapping of `bridge/`).
`seqattn_jax` never imports it at import time; `seqattn_jax.attention` loads it the first time a
FlashInfer kernel is needed. FlashInfer itself is imported later still, when a plan slot for a GPU
kernel is created.

Modules:
  interop        zero-copy jax <-> torch views, XLA-stream handling, a generic torch
                 `buffer_callback` builder (`torch_callback`)
  ops            plan / run ops as buffer_callbacks; the planning design (one plan per step,
                 shared by all layers through a token) is documented there
  fi_provider    FlashInfer 0.7.2.post1 module calls (decode CUDA-core / tensor-core, paged
                 prefill, POD, batch POD, append)
  torch_provider a small torch kernel set used by the CPU tests in FlashInfer's place
  ffi            optional fast path: FlashInfer run functions as XLA FFI targets via jax-tvm-ffi
"""

try:
    import torch  # noqa: F401
except ModuleNotFoundError as e:  # name what to install, not only the missing module
    if e.name != "torch":
        raise
    raise ModuleNotFoundError(
        "seqattn_jax.bridge needs torch: on a GPU, pip install 'seqattn-jax[flashinfer]' after the "
        "torch build for your CUDA (README, 'On an NVIDIA GPU'); for the CPU mechanics tests, "
        "pip install torch --index-url https://download.pytorch.org/whl/cpu", name="torch") from e

from .interop import jax_to_torch, torch_callback, torch_to_jax, xla_stream  # noqa: F401, E402
