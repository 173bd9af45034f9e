"""The decode step's matmuls alone: XLA (through `jax.jit`, as the engine's step compiles them)
beside torch's cuBLAS, per call, at the engine's shapes, with the HBM floor of each.

A decode step's matmuls are [B, d] x [d, n] with B = the batch: they read the weight once and are
memory-bound, so each has a floor of (weight bytes / HBM bandwidth). The probe runs `--reps`
different weights of each shape in one jitted program (their total is far past the 50 MB L2, as a
model's layers are) and reports microseconds per matmul: wall time of back-to-back calls for XLA (best
of 3), CUDA events for torch (median of 3). Run it twice to compare XLA's choices, e.g. with
`XLA_FLAGS=--xla_gpu_enable_triton_gemm=false` (cuBLAS only).

    python3 benchmarks/gemm_probe.py [--shapes 1b 8b] [--batches 64 256] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "seqattn_jax",
                            "xla_flags.py"))["use_command_buffers"]()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from bench import time_torch as _cuda_events  # noqa: E402  (benchmarks/bench.py: median of CUDA-event timings)

HBM_BW = 4.3e12
# (d_model, q heads x head_dim, kv heads x head_dim, ffn, vocab): the serving benchmarks' shapes
SHAPES = {"small": (1024, 2048, 512, 2816, 32000), "1b": (2048, 2048, 512, 8192, 32000),
          "8b": (4096, 4096, 1024, 14336, 32000)}


def gemms(shape: str):
    """(name, k, n, out dtype) of one layer's four matmuls and the lm_head (float32 logits, as
    `seqattn_jax.models.llama` computes them, and float16 then cast)."""
    d, q, kv, f, v = SHAPES[shape]
    return [("qkv", d, q + 2 * kv, "float16"), ("o", q, d, "float16"),
            ("gate_up", d, 2 * f, "float16"), ("down", f, d, "float16"),
            ("lm_head f32", d, v, "float32"), ("lm_head f16", d, v, "float16")]


def time_xla(b, k, n, out, reps, iters):
    key = jax.random.PRNGKey(0)
    h = jax.random.normal(key, (b, k), jnp.float16)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float16) * 0.02
          for i in range(reps)]

    @jax.jit
    def f(h, ws):
        if out == "float32":
            return [jnp.dot(h, w, preferred_element_type=jnp.float32) for w in ws]
        return [jnp.dot(h, w) for w in ws]

    jax.block_until_ready(f(h, ws))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            r = f(h, ws)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - t) / iters / reps * 1e6)
    return best


def time_torch(b, k, n, out, reps, iters):
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(b, k, device="cuda", dtype=torch.float16, generator=g)
    ws = [torch.randn(k, n, device="cuda", dtype=torch.float16, generator=g) * 0.02
          for _ in range(reps)]

    def f():
        return [(h @ w).float() if out == "float32" else h @ w for w in ws]

    return _cuda_events(f, iters, repeats=3) * 1e6 / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--reps", type=int, default=24, help="different weights per shape")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""), "| device:", jax.devices()[0].device_kind)
    rows = []
    print(f"{'shape':6} {'batch':>5} {'matmul':12} {'k x n':>13} {'xla us':>8} {'torch us':>9} "
          f"{'floor us':>9} {'xla/floor':>9}")
    for shape in a.shapes:
        for b in a.batches:
            for name, k, n, out in gemms(shape):
                floor = k * n * 2 / HBM_BW * 1e6
                x = time_xla(b, k, n, out, a.reps, a.iters)
                t = None if a.no_torch else time_torch(b, k, n, out, a.reps, a.iters)
                rows.append(dict(shape=shape, batch=b, matmul=name, k=k, n=n, xla_us=x,
                                 torch_us=t, floor_us=floor))
                ts = "" if t is None else f"{t:9.1f}"
                print(f"{shape:6} {b:5d} {name:12} {f'{k}x{n}':>13} {x:8.1f} {ts:>9} "
                      f"{floor:9.1f} {x / floor:9.2f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
