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


def test_profile_step_per_device_timeline_of_a_synthetic_trace(tmp_path):
    """benchmarks/profile_step.py's `per_device` on a hand-made trace of 2 steps on 2 GPUs: each
    GPU's busy / idle time and gaps, counted by hand, and the host's graph launches per GPU."""
    import gzip

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_step  # noqa: PLC0415

    meta = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}}
            for p, n in ((1, "/device:GPU:0"), (2, "/device:GPU:1"), (3, "/host:CPU"))]
    x = lambda pid, name, ts, dur: {"ph": "X", "pid": pid, "tid": 0, "name": name,  # noqa: E731
                                    "ts": ts, "dur": dur}
    ev = meta + [x(1, "gemm", 0, 10), x(1, "nccl", 15, 5), x(1, "gemm", 20, 10),     # gap 5
                 x(1, "gemm", 40, 10), x(1, "nccl", 45, 10),                          # gap 10, overlap
                 x(2, "gemm", 0, 30), x(2, "gemm", 50, 5),                            # gap 20
                 x(3, "cuGraphLaunch (CudaGraph:1)", 0, 3), x(3, "cuGraphLaunch (CudaGraph:2)", 5, 3),
                 x(3, "cuGraphLaunch (CudaGraph:3)", 9, 3), x(3, "cuGraphLaunch (CudaGraph:4)", 9, 3)]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    d = profile_step.per_device(str(path), steps=2)
    g0, g1 = d["/device:GPU:0"], d["/device:GPU:1"]
    assert (g0["span_us_per_step"], g0["busy_us_per_step"], g0["idle_us_per_step"]) == (27.5, 20.0, 7.5)
    assert g0["gaps"] == [("gemm -> gemm", 5.0, 0.5), ("gemm -> nccl", 2.5, 0.5)]
    assert (g1["busy_us_per_step"], g1["idle_us_per_step"], g1["kernels_per_step"]) == (17.5, 10.0, 1.0)
    assert d["graph_launches_per_step_per_gpu"] == 1.0      # 4 launches, 2 steps, 2 GPUs


def test_profile_step_host_summary_of_a_synthetic_trace(tmp_path):
    """`host_summary`: XLA's host events per execution (2 executions), summed by hand."""
    import gzip

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_step  # noqa: PLC0415

    x = lambda name, dur: {"ph": "X", "pid": 3, "tid": 0, "name": name, "ts": 0,  # noqa: E731
                           "dur": dur}
    ev = [x("command_buffer::initialize", 1900), x("command_buffer::initialize", 2100),
          x("cuGraphLaunch (CudaGraph:7)", 40), x("cuGraphLaunch (CudaGraph:8)", 60),
          x("cuGraphLaunch (CudaGraph:7)", 50), x("[1] GpuExecutable::ExecuteThunks", 3000),
          x("gemm_fusion_dot", 99)]
    path = tmp_path / "h.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    h = profile_step.host_summary(str(path), executions=2)
    assert h["command_buffer::initialize"] == {"us_per_exec": 2000.0, "per_exec": 1.0}
    assert h["cuGraphLaunch"] == {"us_per_exec": 75.0, "per_exec": 1.5}
    assert h["GpuExecutable::ExecuteThunks"] == {"us_per_exec": 1500.0, "per_exec": 0.5}
    assert "command_buffer::update" not in h and "Rendezvous" not in h


@pytest.mark.slow
def test_tp_layers_probe_runs_on_cpu_devices():
    """benchmarks/tp_layers_probe.py --smoke: 1 and 2 CPU devices in one process, both input
    modes; the 2-device program has the model's collectives (2 all-reduces a layer, the greedy
    argmax's all-gathers of the vocabulary-split lm_head) and reshards nothing."""
    layers = 3
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tp_layers_probe.py"),
                          "--smoke", "--layers", str(layers), "--iters", "2", "--reps", "1",
                          "--timeout", "300"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert [(r["gpus"], r["mode"]) for r in rows] == [(1, "fresh"), (1, "stable"),
                                                      (2, "fresh"), (2, "stable")]
    for r in rows:
        assert r["step_ms"] > 0 and r["processes"] == 1
        c = r["collectives"]
        assert c["all-to-all"] == 0 and c["collective-permute"] == 0
        if r["gpus"] == 1:
            assert c == {"all-reduce": 0, "all-gather": 0, "all-to-all": 0, "collective-permute": 0}
        else:
            assert c["all-reduce"] == 2 * layers and 1 <= c["all-gather"] <= 2


@pytest.mark.slow
def test_tp_bench_smoke_on_cpu_devices(tmp_path):
    """benchmarks/tp_bench.py --smoke over 1 and 2 CPU devices (the bridge's torch kernels), with
    the engine's dispatch on its worker thread: the rows it writes, their floors (the 2-device
    floor reads half the layers, the lm_head and the KV) and the all-reduce cost on 2 devices."""
    pytest.importorskip("torch", reason="--smoke runs the bridge's torch kernels")
    import os  # noqa: PLC0415

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=2").strip())
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tp_bench.py"), "--smoke",
                          "--gpus", "1", "2", "--batches", "4", "--ctx", "32", "--steps", "6",
                          "--overlap-dispatch", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("tp_bench_*.json")).read_text())["rows"]
    assert [(r["gpus"], r["batch"], r["overlap_dispatch"]) for r in rows] == [(1, 4, True),
                                                                           (2, 4, True)]
    one, two = rows
    assert one["served_ms"] > 0 and two["device_bound_ms"] > 0 and two["allreduce_us"] > 0
    assert two["hbm_floor_ms_per_gpu"] == pytest.approx(one["hbm_floor_ms_per_gpu"] / 2)
    assert two["speedup_vs_1gpu"] == pytest.approx(one["device_bound_ms"] / two["device_bound_ms"])


def test_serve_bench_host_section_times_the_engine_alone(tmp_path):
    """`serve_bench.py host`: the engine's host work per decode step, with a step program that does
    nothing on the device, for each batch and K."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "host",
                          "--batches", "4", "--decode-steps", "1", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("serve_host_*.json")).read_text())
    assert [(r["batch"], r["decode_steps"]) for r in rows] == [(4, 1), (4, 2)]
    assert all(0 < r["host_ms_per_decode_step"] < 1e3 for r in rows)
