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


def summarize_trace(trace_dir: str, steps: int, top: int = 25) -> dict:
    """Kernel time by name, kernels per step and GPU idle time from a perfetto trace."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return {"error": f"no trace under {trace_dir}"}
    with gzip.open(sorted(files)[-1], "rt") as f:
        tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None)] = \
                e.get("args", {}).get("name", "")
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
    ap.add_argument("--shape", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                    help="FlashInferBackend(cuda_graphs=...): static host plans, XLA command buffers")
    a = ap.parse_args(argv)
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
    run = sb.device_bound_loop(eng)
    run(3)
    t0 = time.perf_counter()
    run(a.steps)
    bound = (time.perf_counter() - t0) / a.steps
    print(f"device-bound step {bound * 1e3:.3f} ms")
    tdir = a.trace_dir or tempfile.mkdtemp()
    jax.profiler.start_trace(tdir, create_perfetto_trace=True)
    run(a.steps)
    jax.profiler.stop_trace()
    summ = summarize_trace(tdir, a.steps)
    print(json.dumps(summ, indent=1))


if __name__ == "__main__":
    main()
