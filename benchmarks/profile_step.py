"""Where a served decode step's time goes, on the GPU: a `jax.profiler` trace of the device-bound
step (kernels by name, launches per step, GPU idle gaps) and a cProfile of the served loop's host
side (what `Engine.step` spends its time on).

    python3 benchmarks/profile_step.py --shape small --batch 64 --steps 30 [--trace-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import glob
import gzip
import io
import json
import os
import pstats
import runpy
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# XLA's command buffers (CUDA graphs) around FlashInfer's calls too: XLA reads XLA_FLAGS as jaxlib
# loads, so set them before `import jax`, running seqattn_jax/xla_flags.py without the package
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "seqattn_jax",
                            "xla_flags.py"))["use_command_buffers"]()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

import serve_bench as sb  # noqa: E402


def _load_trace(trace: str):
    """(events, names) of a `jax.profiler` trace: `trace` is a `*.trace.json.gz` file or a folder
    holding one (the newest is read); names maps (pid, None) to process names and (pid, tid) to
    thread names."""
    files = [trace] if trace.endswith(".json.gz") else \
        glob.glob(os.path.join(trace, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return None, None
    with gzip.open(sorted(files)[-1], "rt") as f:
        tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None)] = \
                e.get("args", {}).get("name", "")
    return events, names


def per_device(trace: str, steps: int, top: int = 8) -> dict:
    """Each GPU's own timeline from a trace (several GPUs run at once, so their union hides each
    one's idle time): per step its span, busy and idle time, kernels, and the `top` idle gaps
    grouped by (kernel before, kernel after); and the host's CUDA-graph launches per step and
    device (`cuGraphLaunch`: XLA launches a command buffer per run of capturable work, so each
    piece a collective cuts off costs one)."""
    events, names = _load_trace(trace)
    if events is None:
        return {"error": f"no trace under {trace}"}
    gpus = sorted(pid for (pid, tid), n in names.items() if tid is None and "/device:GPU" in n)
    out = {}
    for pid in gpus:
        k = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") == pid
                    and e.get("dur", 0) > 0), key=lambda e: e["ts"])
        if not k:
            continue
        busy, end, prev = 0.0, k[0]["ts"], None
        gaps, count = collections.Counter(), collections.Counter()
        for e in k:
            s, t = e["ts"], e["ts"] + e["dur"]
            if prev is not None and s > end:
                key = f"{prev['name'][:40]} -> {e['name'][:40]}"
                gaps[key] += s - end
                count[key] += 1
            if t > end:
                busy += t - max(s, end)
                end = t
            prev = e
        span = end - k[0]["ts"]
        out[names[(pid, None)]] = {
            "span_us_per_step": round(span / steps, 1), "busy_us_per_step": round(busy / steps, 1),
            "idle_us_per_step": round((span - busy) / steps, 1),
            "kernels_per_step": round(len(k) / steps, 1),
            "gaps": [(g, round(v / steps, 1), round(count[g] / steps, 1))
                     for g, v in gaps.most_common(top)]}
    launches = sum(1 for e in events if e.get("ph") == "X"
                   and str(e.get("name", "")).startswith("cuGraphLaunch"))
    busy_gpus = sum(1 for v in out.values() if v["kernels_per_step"] > 0)
    out["graph_launches_per_step_per_gpu"] = round(launches / steps / max(1, busy_gpus), 1)
    return out


HOST_EVENTS = ("GpuExecutable::ExecuteThunks", "Thunks::Initialize", "command_buffer::initialize",
               "command_buffer::update", "cuGraphLaunch", "Rendezvous")


def host_summary(trace: str, executions: int) -> dict:
    """XLA's host side per program execution (summed over device threads, so / devices for one):
    each of `HOST_EVENTS`, its total us per execution and how many a execution. A command buffer
    whose recorded buffers moved is re-recorded in `command_buffer::initialize` / `::update`
    (collectives re-traced by stream capture) before its `cuGraphLaunch`."""
    events, _ = _load_trace(trace)
    if events is None:
        return {"error": f"no trace under {trace}"}
    tot, cnt = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        n = str(e.get("name", ""))
        for h in HOST_EVENTS:
            if h in n:
                tot[h] += e.get("dur", 0)
                cnt[h] += 1
    return {h: {"us_per_exec": round(tot[h] / executions, 1),
                "per_exec": round(cnt[h] / executions, 2)} for h in HOST_EVENTS if cnt[h]}


def summarize_trace(trace_dir: str, steps: int, top: int = 25) -> dict:
    """Kernel time by name, kernels per step and GPU idle time from a perfetto trace (all GPUs
    together: `per_device` gives each GPU's own)."""
    events, names = _load_trace(trace_dir)
    if events is None:
        return {"error": f"no trace under {trace_dir}"}
    def is_gpu(e):
        p = names.get((e.get("pid"), None), "")
        return "GPU" in p or "gpu" in p or "/device:" in p and "CPU" not in p
    kern = [e for e in events if e.get("ph") == "X" and is_gpu(e) and e.get("dur", 0) > 0]
    # only the stream(s) with kernels; group by name
    by = collections.Counter()
    cnt = collections.Counter()
    for e in kern:
        by[e["name"][:90]] += e["dur"]
        cnt[e["name"][:90]] += 1
    if not kern:
        return {"error": "no GPU events", "processes": sorted(set(names.values()))[:20]}
    kern.sort(key=lambda e: e["ts"])
    busy = 0.0
    end = kern[0]["ts"]
    for e in kern:   # union of intervals
        s, t = e["ts"], e["ts"] + e["dur"]
        if t > end:
            busy += t - max(s, end)
            end = t
    span = end - kern[0]["ts"]
    return {"span_us_per_step": span / steps, "busy_us_per_step": busy / steps,
            "idle_us_per_step": (span - busy) / steps, "kernels_per_step": len(kern) / steps,
            "top": [(n, round(by[n] / steps, 1), cnt[n] / steps) for n, _ in by.most_common(top)]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize", default=None, metavar="TRACE",
                    help="only analyse a saved trace (a *.trace.json.gz or its folder) of --steps "
                         "steps: kernels by name and each GPU's timeline; no GPU needed")
    ap.add_argument("--shape", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--top", type=int, default=25, help="kernel names listed, by time")
    ap.add_argument("--decode-steps", type=int, default=1,
                    help="K decode steps per dispatch in the device-bound loop (figures per step)")
    ap.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                    help="FlashInferBackend(cuda_graphs=...): static host plans, XLA command buffers")
    a = ap.parse_args(argv)
    if a.summarize:
        print(json.dumps({"kernels": summarize_trace(a.summarize, a.steps, a.top),
                          "per_device": per_device(a.summarize, a.steps)}, indent=1))
        return
    cfg, ctx = sb.SHAPES[a.shape]
    params = sb.init_params(cfg, 0)
    eng = sb._engine(cfg, params, a.batch, ctx, extra_tokens=8 * a.steps + 64,
                     backend=sb._backend(a.cuda_graphs == "on"))
    sb._fill(eng, a.batch, ctx, max_new=8 * a.steps + 32)
    # host side of the served loop
    jax.block_until_ready(eng.last_tok)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(a.steps):
        eng.step()
    pr.disable()
    jax.block_until_ready(eng.last_tok)
    served = (time.perf_counter() - t0) / a.steps
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(20)
    print(f"served step {served * 1e3:.3f} ms; host profile of Engine.step (tottime):")
    print(s.getvalue()[:6000])
    # device-bound steps under the profiler
    k = a.decode_steps
    run = sb.device_bound_loop(eng, k)
    n = max(1, a.steps // k)   # dispatches of K steps each
    run(3)
    t0 = time.perf_counter()
    run(n)
    bound = (time.perf_counter() - t0) / (n * k)
    print(f"device-bound step {bound * 1e3:.3f} ms (K={k})")
    tdir = a.trace_dir or tempfile.mkdtemp()
    jax.profiler.start_trace(tdir, create_perfetto_trace=True)
    run(n)
    jax.profiler.stop_trace()
    summ = summarize_trace(tdir, n * k, a.top)
    summ["per_device"] = per_device(tdir, n * k)
    print(json.dumps(summ, indent=1))


if __name__ == "__main__":
    main()
