"""Tensor-parallel decode benchmark: the serving engine's decode step on 1 and 2 GPUs at an 8B
shape (32 layers, d 4096, 32 q / 8 kv heads x 128, ffn 14336, vocab 128256, float16), batch 64
and 256, with the HBM floor per GPU and the cost of the per-layer all-reduces.

    python3 benchmarks/tp_bench.py --out benchmarks/results             # needs 2 GPUs for "2"
    python3 benchmarks/tp_bench.py --gpus 1 2 --batches 64 256 --ctx 1024 --steps 60
    python3 benchmarks/tp_bench.py --gpus 2 --batches 64 --trace-dir /tmp/tp_trace   # + kernel times

For each (GPUs, batch), `batch` requests of `ctx - 1` prompt tokens are prefilled, then:
  served        Engine.step() in steady state (host plans, tokens fed back on the device, the
                host one step behind): wall time per decode step
  device-bound  the same jitted decode step dispatched back to back (host plan per step, nothing
                read back until the end)
  tok/s         batch / device-bound step time (and / served)
  HBM floor     per GPU: its share of the layer weights (1/N), of the lm_head (1/N: split by
                vocabulary, `sharding.llama_param_shardings`) and of the batch's KV (1/N), read
                once per step at 4.3 TB/s
and, on 2 GPUs, the all-reduce of one layer's activations ([batch, d] float16, two per layer:
after wo and after w_down) timed alone, 64 in a row in one program (`allreduce_us` each, `per_layer_us` for
the two, `per_step_ms` for 32 layers).

The weights are random (drawn on the devices in their final sharding: an 8B model is not
materialised on one GPU first); the step's speed does not depend on their values. FlashInfer's
runs are FFI calls on 1 and 2 GPUs (--transport auto, the default: static host plans, XLA command
buffers) or buffer_callbacks on both (--transport callback), like with like. The target of issue
13 is >= 1.6x the one-GPU decode throughput on 2 GPUs at batch 64.

Writes `tp_bench_<gpu>.json` under --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import seqattn_jax as sj  # noqa: E402
from seqattn_jax import sharding  # noqa: E402
from seqattn_jax.models.llama import LlamaConfig, LlamaModel, param_shapes  # noqa: E402
from seqattn_jax.serving import Engine, EngineConfig  # noqa: E402

import serve_bench  # noqa: E402  (benchmarks/serve_bench.py: the step timing)

CFG_8B = LlamaConfig(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                     head_dim=128, ffn_dim=14336, rope_theta=500000.0, dtype="float16")
# --smoke: the plumbing on CPU devices (FlashInfer's head_dim 64, float16)
SMOKE = LlamaConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=64, ffn_dim=256, dtype="float16")
PS = 16
HBM_BW = 4.3e12


def log(*a):
    print(*a, flush=True)


def hbm_floor_ms(cfg: LlamaConfig, batch: int, ctx: int, n: int, bytes_per=2) -> float:
    """Per GPU: 1/n of the layer weights + the lm_head (1/n when n divides the vocabulary, as
    `sharding.llama_param_shardings` splits it; else all of it) + 1/n of the KV, at HBM_BW."""
    d, f, hd = cfg.d_model, cfg.ffn_dim, cfg.head_dim
    per_layer = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d + 3 * d * f
    head = cfg.vocab_size * d / (n if cfg.vocab_size % n == 0 else 1)
    weights = cfg.num_layers * per_layer / n + head
    kv = batch * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * hd / n
    return (weights + kv) * bytes_per / HBM_BW * 1e3


def random_params(cfg: LlamaConfig, mesh) -> dict:
    """Random weights made on the devices, each in its final sharding (`llama_param_shardings`
    over `mesh`): std 1/sqrt(fan_in) kernels, unit norms."""
    shardings = sharding.llama_param_shardings(cfg, mesh)
    shapes = param_shapes(cfg)
    key = [jax.random.key(0)]
    progs: dict = {}   # one program per (shape, sharding, std): 32 layers compile once

    def make(shape, shard, std):
        key[0], k = jax.random.split(key[0])
        f = progs.get((shape, shard, std))
        if f is None:
            f = progs[(shape, shard, std)] = jax.jit(
                lambda k: (jax.random.normal(k, shape, jnp.float32) * std).astype(cfg.dtype),
                out_shardings=shard)
        return f(k)

    def ones(shape, shard):
        return jax.jit(lambda: jnp.ones(shape, cfg.dtype), out_shardings=shard)()

    layers = []
    for shp, shd in zip(shapes["layers"], shardings["layers"]):
        layers.append({k: ones(s, shd[k]) if k.endswith("norm") else
                       make(s, shd[k], 1.0 / np.sqrt(s[0])) for k, s in shp.items()})
    out = {"embed": make(shapes["embed"], shardings["embed"], 1.0), "layers": layers,
           "final_norm": ones(shapes["final_norm"], shardings["final_norm"])}
    if "lm_head" in shapes:
        out["lm_head"] = make(shapes["lm_head"], shardings["lm_head"], 1.0 / np.sqrt(cfg.d_model))
    jax.block_until_ready(out)
    return out


def _backend(n: int, mesh, transport: str, provider: str):
    from seqattn_jax.bridge import FlashInferBackend  # noqa: PLC0415

    return FlashInferBackend(provider, transport=transport,
                             devices=None if n == 1 else mesh.devices.flat)


def bench_decode(cfg: LlamaConfig, n: int, batch: int, ctx: int, n_steps: int,
                 transport: str, devices, provider: str = "flashinfer",
                 decode_steps: int = 1, trace_dir: str | None = None,
                 overlap: bool = False) -> dict:
    mesh = sharding.tp_mesh(n, devices=devices)
    params = random_params(cfg, mesh)
    K = decode_steps
    chunk = min(2048, batch * ctx)
    start, G, extra = serve_bench.timed_fill(ctx, batch, n_steps, K, chunk)
    pages_per_seq = -(-(start + extra) // PS) + 1
    cache = sj.CacheConfig(num_pages=batch * pages_per_seq + 64, page_size=PS,
                           num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_seqs=batch,
                           max_pages_per_seq=pages_per_seq, num_layers=cfg.num_layers,
                           dtype=cfg.dtype)
    model = LlamaModel(cfg, tp=n)
    eng = Engine(model, params, cache, EngineConfig(
        chunk=chunk, prefix_cache=False,
        mixed_steps=False,   # decode is measured: no batch-POD programs to compile
        backend=_backend(n, mesh, transport, provider),
        mesh=mesh if n > 1 else None, decode_steps=K, overlap_dispatch=overlap))
    t0 = time.perf_counter()
    eng.warmup()
    log(f"  {n} GPU(s), batch {batch}: warm-up {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    serve_bench._fill(eng, batch, start, max_new=extra - 32)
    lens = serve_bench.kv_len_timed(eng, G)
    log(f"  prefill of {batch} x {start - 1} tokens: {time.perf_counter() - t0:.1f} s")
    # served and device-bound per decode step: the same measurement as serve_bench.py's
    tdir = None if not trace_dir else str(Path(trace_dir) / f"tp{n}_b{batch}")
    served_ms, bound_ms, kv = serve_bench.time_steps(eng, n_steps, K, trace_dir=tdir)
    if n > 1:
        sharding.check_pool_sharding(kv, cache, mesh)
    res = dict(gpus=n, batch=batch, ctx=ctx, kv_len_timed=lens, transport=transport,
               decode_steps=K, overlap_dispatch=overlap,
               served_ms=served_ms,
               device_bound_ms=bound_ms,
               tok_s_device_bound=batch / bound_ms * 1e3, tok_s_served=batch / served_ms * 1e3,
               hbm_floor_ms_per_gpu=hbm_floor_ms(cfg, batch, ctx, n),
               kv_gb_per_gpu=kv.addressable_shards[0].data.nbytes / 1e9)
    if n > 1:
        res.update(allreduce_cost(mesh, batch, cfg))
    if tdir:   # where the device-bound step's time goes, kernels by name (all GPUs summed)
        import profile_step  # noqa: PLC0415  (benchmarks/profile_step.py)

        summ = profile_step.summarize_trace(tdir, 10 * K)
        res["trace"] = summ
        log("  trace (per decode step, all GPUs summed):", json.dumps(summ)[:3000])
        res["trace_per_device"] = dev = profile_step.per_device(tdir, 10 * K)
        log("  trace (per decode step, each GPU; host CUDA-graph launches):", json.dumps(dev)[:3000])
    del eng, kv, params
    return res


def allreduce_cost(mesh, rows: int, cfg: LlamaConfig, reps: int = 64) -> dict:
    """One layer's all-reduces timed alone: `reps` dependent all-reduces of float16 [rows, d] per
    device (`lax.psum` under shard_map: NCCL on GPUs) written out one after another in one program
    (as a step has them: 2 per layer; no loop around them, whose own per-iteration overhead would
    count), the program run back to back."""
    n = int(mesh.shape["tp"])

    def body(x):
        for _ in range(reps):
            x = jax.lax.psum(x, "tp") * jnp.asarray(1.0 / n, x.dtype)
        return x

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tp"), out_specs=P("tp"),
                              check_vma=False), donate_argnums=0)
    x = jax.device_put(jnp.ones((n * rows, cfg.d_model), cfg.dtype),
                       NamedSharding(mesh, P("tp")))
    x = jax.block_until_ready(f(x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            x = f(x)
        jax.block_until_ready(x)
        times.append((time.perf_counter() - t0) / (10 * reps))
    each = statistics.median(times)
    return dict(allreduce_us=each * 1e6, per_layer_us=2 * each * 1e6,
                allreduce_per_step_ms=2 * cfg.num_layers * each * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--ctx", type=int, default=1024, help="tokens per request at the decode steps")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--trace-dir", default=None,
                    help="also trace 10 device-bound dispatches per configuration with "
                         "jax.profiler under this folder and print the kernel time by name "
                         "(NCCL's all-reduce kernels included)")
    ap.add_argument("--decode-steps", type=int, default=1,
                    help="EngineConfig.decode_steps (K decode steps per dispatch)")
    ap.add_argument("--transport", default="auto", choices=("callback", "auto"),
                    help="FlashInfer's transport on 1 and N GPUs: auto (FFI calls of static "
                         "host plans) or callback")
    ap.add_argument("--allreduce-only", action="store_true",
                    help="only time one layer's all-reduces ([batch, d] float16 psum) on all "
                         "devices for each --batches value (NCCL_PROTO / NCCL_ALGO / XLA_FLAGS "
                         "variants are compared with this, one process each)")
    ap.add_argument("--overlap-dispatch", action="store_true",
                    help="EngineConfig.overlap_dispatch: the step programs' calls on a worker "
                         "thread, the next step's host work meanwhile (affects 'served')")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny float16 model on CPU devices with the bridge's torch kernels: "
                         "checks the script's plumbing, not a measurement (set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=2)")
    args = ap.parse_args(argv)
    cfg, provider = CFG_8B, "flashinfer"
    if args.smoke:
        cfg, provider = SMOKE, "torch"
        devices = jax.devices("cpu")
    else:
        devices = jax.devices("gpu")
    if args.allreduce_only:
        mesh = sharding.tp_mesh(len(devices), devices=devices)
        for batch in args.batches:
            log(json.dumps(dict(devices=len(devices), batch=batch, **allreduce_cost(mesh, batch, cfg),
                                NCCL_PROTO=os.environ.get("NCCL_PROTO"),
                                NCCL_ALGO=os.environ.get("NCCL_ALGO"),
                                XLA_FLAGS=os.environ.get("XLA_FLAGS"))))
        return
    want = [n for n in args.gpus if n <= len(devices)]
    if want != args.gpus:
        log(f"only {len(devices)} device(s) here: running {want}")
    rows = []
    for batch in args.batches:
        for n in want:
            log(f"decode, {'smoke' if args.smoke else '8B'} shape, {n} device(s), batch {batch}, "
                f"ctx {args.ctx}")
            rows.append(bench_decode(cfg, n, batch, args.ctx, args.steps, args.transport,
                                     devices, provider, args.decode_steps, args.trace_dir,
                                     args.overlap_dispatch))
            log("  ", json.dumps(rows[-1]))
    log(f"\n{'GPUs':>4} {'batch':>5} {'served ms':>9} {'bound ms':>8} {'tok/s':>8} "
        f"{'floor/GPU ms':>12} {'bound/floor':>11} {'AR/layer us':>11} {'speedup':>7}")
    one = {r["batch"]: r for r in rows if r["gpus"] == 1}
    for r in rows:
        base = one.get(r["batch"])
        r["speedup_vs_1gpu"] = base["device_bound_ms"] / r["device_bound_ms"] if base else None
        log(f"{r['gpus']:4d} {r['batch']:5d} {r['served_ms']:9.3f} {r['device_bound_ms']:8.3f} "
            f"{r['tok_s_device_bound']:8.0f} {r['hbm_floor_ms_per_gpu']:12.3f} "
            f"{r['device_bound_ms'] / r['hbm_floor_ms_per_gpu']:11.2f} "
            f"{r.get('per_layer_us', float('nan')):11.1f} "
            f"{'' if r['speedup_vs_1gpu'] is None else format(r['speedup_vs_1gpu'], '7.2f')}")
    if args.out:
        name = devices[0].device_kind.replace(" ", "_")
        path = Path(args.out) / f"tp_bench_{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(shape="8b", rows=rows), indent=1))
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
