"""XLA flags for serving on a GPU: command buffers (CUDA graphs) around every capturable command.

FlashInfer's static plans (`FlashInferBackend(cuda_graphs=True)`) make a step's FlashInfer calls
capturable FFI calls; XLA then records each run of fusions, cuBLAS / cuDNN calls and those FFI
calls as one CUDA graph, if its command-buffer flags include custom calls and allow graphs of any
size. Measured on one H200 (the example's GPU model, batch 64, `benchmarks/serve_bench.py`):
device-bound decode step 0.96 ms with XLA's default flags, 0.70 ms with these
(`benchmarks/results/serve_runF_*`). Passing the same options as `jax.jit(...,
compiler_options=...)` did not change the step (run H: 1.00 ms), so they go through `XLA_FLAGS`,
which XLA reads once per process. Set in the benchmark's `main()`, after `import jax` but before
the first computation, they left the step at 1.03 ms (run I), where set in the shell they gave 0.70
ms (run F): XLA appears to read them as jaxlib loads. So call `use_command_buffers()` before
`import jax`. This module imports nothing but `os` and `sys`, so a script can load it by path before
importing jax (the example and benchmark scripts run this file with `runpy.run_path`).
"""

from __future__ import annotations

import os
import sys

__all__ = ["COMMAND_BUFFER_FLAGS", "use_command_buffers"]

COMMAND_BUFFER_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
                        "--xla_gpu_graph_min_graph_size=1")


def use_command_buffers() -> bool:
    """Add `COMMAND_BUFFER_FLAGS` to `XLA_FLAGS` (each flag the user has not set already). Returns
    False, changing nothing, when jax is already imported (too late: XLA has read its flags)."""
    if "jax" in sys.modules or "jaxlib" in sys.modules:
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    add = [f for f in COMMAND_BUFFER_FLAGS if f.split("=")[0] not in flags]
    if add:
        os.environ["XLA_FLAGS"] = " ".join([flags, *add]).strip()
    return True

