"""Shared pytest set-up: markers and the switch for the long runs.

Markers (declared in pyproject.toml):
  * `gpu`: FlashInfer on a CUDA GPU; those tests skip themselves elsewhere (tests/test_flashinfer_gpu.py).
  * `slow`: the long randomized runs (the 1000-sequence allocator state machine, prefix-cache soaks)
    and the sdist/wheel build. Skipped by default so `python -m pytest -q` stays short on a 2-core
    CPU; they run when `SEQATTN_SLOW=1` is set (`.ci/run` sets it) or when selected with `-m slow`.
"""

import os

import pytest

# Tests compare against float64 numpy oracles on small shapes; keep XLA from grabbing all GPU memory
# when the suite runs on the GPU machine next to torch/FlashInfer.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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
