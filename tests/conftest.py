"""Shared pytest set-up. GPU tests carry the `gpu` marker and skip themselves without a CUDA GPU and
flashinfer (see tests/test_flashinfer_gpu.py)."""

import os

# Tests compare against float64 numpy oracles on small shapes; keep XLA from grabbing all GPU memory
# when the suite runs on the GPU machine next to torch/FlashInfer.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
