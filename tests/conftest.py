"""Shared pytest set-up: markers and the switch for the long runs.

Markers (declared in pyproject.toml):
  * `gpu`: FlashInfer on a CUDA GPU; those tests skip themselves elsewhere (tests/test_flashinfer_gpu.py).
  * `slow`: the long randomized runs (the 1000-sequence allocator state machine, prefix-cache soaks)
    and the sdist/wheel build. Skipped by default so `python -m pytest -q` stays short on a 2-core
    CPU; they run when `SEQATTN_SLOW=1` is set (`.ci/run` sets it) or when selected with `-m slow`.
"""

import importlib.metadata
import importlib.util
import os
import shutil

import pytest

# Tests compare against float64 numpy oracles on small shapes; keep XLA from grabbing all GPU memory
# when the suite runs on the GPU machine next to torch/FlashInfer.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The CPU suite compiles hundreds of tiny programs and runs each a few times, so compiling is most
# of its time: XLA's backend optimizations cost more than they save there (-21 % CPU time measured
# on the 2-core machine), and so do XLA CPU's newer fusion emitters and its XNNPACK dot rewrites
# (off: the example's step programs compile in 2.8 s instead of 6.8 s, the suite's CPU time -40 %).
# Those two flags are named for the jaxlib this was measured on (0.10): XLA aborts on a flag it does
# not know, so another jaxlib gets only the first two. Not on a GPU machine (the GPU tests and
# benchmarks keep XLA's defaults), nor over a user's XLA_FLAGS.
if "XLA_FLAGS" not in os.environ and shutil.which("nvidia-smi") is None:
    _flags = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    if importlib.util.find_spec("jaxlib") is not None and \
            importlib.metadata.version("jaxlib").startswith("0.10."):
        _flags += ["--xla_cpu_use_fusion_emitters=false", "--xla_cpu_use_xnnpack=false"]
    os.environ["XLA_FLAGS"] = " ".join(_flags)

SLOW_ENV = "SEQATTN_SLOW"


def slow_enabled(config=None) -> bool:
    """Whether `slow` tests run: `SEQATTN_SLOW=1`, or a `-m` expression that names `slow`."""
    if os.environ.get(SLOW_ENV, "0") not in ("", "0"):
        return True
    return config is not None and "slow" in (config.getoption("-m") or "")


def pytest_collection_modifyitems(config, items):
    if slow_enabled(config):
        return
    skip = pytest.mark.skip(reason=f"slow: set {SLOW_ENV}=1 (as .ci/run does) or pass -m slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
