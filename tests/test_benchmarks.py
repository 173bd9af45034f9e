"""The serving benchmark's code paths on a CPU (tiny shape, reference backend): the figures it
prints on a GPU come from the same functions."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if not (ROOT / "benchmarks" / "serve_bench.py").exists():
    pytest.skip("benchmarks/ is not in this tree (the sdist leaves it out)", allow_module_level=True)


@pytest.mark.slow
def test_serve_bench_decode_runs_on_a_tiny_shape(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "decode",
                          "--shapes", "tiny", "--batches", "4", "--steps", "6", "--no-torch",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    src = next(tmp_path.glob("serve_decode_*.json"))
    rows = json.loads(src.read_text())
    assert [r["decode_steps"] for r in rows] == [1, 4]      # --decode-steps' default: K = 1 and 4
    for row in rows:
        assert row["shape"] == "tiny" and row["batch"] == 4
        assert row["served_ms"] > 0 and row["device_bound_ms"] > 0 and row["hbm_floor_ms"] > 0
    _plot(src, tmp_path / "decode.png")


def _plot(src, png):
    """benchmarks/plot_serving.py on serve_bench's JSON (needs the `bench` extra: matplotlib)."""
    pytest.importorskip("matplotlib", reason="the plot needs the bench extra (matplotlib)")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_serving.py"), str(png),
                          str(src)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_serving_draws_the_h200_runs(tmp_path):
    """The plot of the committed H200 decode rows (engine, torch eager / graph, HBM floor)."""
    rows = sorted((ROOT / "benchmarks" / "results").glob("serve_runI_decode*_h200.json"))
    if not rows:
        pytest.skip("no committed serving results in this tree")
    for src in rows:
        _plot(src, tmp_path / (src.stem + ".png"))
