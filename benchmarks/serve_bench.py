"""Serving benchmark: the library's engine against torch + FlashInfer (eager and CUDA graph) on the
same model with the same weights, with the HBM floor, in one run on one GPU.

    python3 benchmarks/serve_bench.py all --out benchmarks/results      # or: decode mixed e2e

  decode  per decode step at a full batch (every slot busy), for the example's GPU model ("small":
          8 layers, d 1024, 16 q / 4 kv x 128, ffn 2816, vocab 32000, ctx 320) and a 1.2B shape
          ("1b": 16 layers, d 2048, 32 q / 8 kv x 64, ffn 8192, vocab 32000, ctx 1024), batch 64 and
          256:
            served        Engine.step() in steady state (host plans, tokens fed back on the device,
                          the host one step behind): wall time per step over many steps
            device-bound  the same jitted decode step dispatched back to back (host plan per step,
                          nothing read back until the end): what the GPU needs for one step
            torch eager / torch graph   benchmarks/torch_llama.py (vLLM's recipe)
            HBM floor     weights + the KV read once per step at 4.3 TB/s
  mixed   one iteration with a 512-row prefill chunk and a 64-row decode batch: one mixed step
          (batch POD) vs a prefill step then a decode step (engine-level, same work per iteration)
  e2e     the README's GPU example command: generated tokens/s of examples/decode.py now, against
          the code before the serving engine (a checkout of it passed with --legacy DIR)
  host    the engine's own host work per decode step at a full batch (a step program that does
          nothing on the device; any machine): what a served step costs the host beside the GPU

Writes `serve_<section>_<gpu>.json` under --out and prints tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# XLA's command buffers (CUDA graphs) around FlashInfer's calls too: XLA reads XLA_FLAGS as jaxlib
# loads, so set them before `import jax`, running seqattn_jax/xla_flags.py without the package
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "seqattn_jax",
                            "xla_flags.py"))["use_command_buffers"]()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

import numpy as np  # noqa: E402

import seqattn_jax as sj  # noqa: E402
from seqattn_jax.models.llama import LlamaConfig, LlamaModel, init_params  # noqa: E402
from seqattn_jax.serving import Engine, EngineConfig, SamplingParams  # noqa: E402
from seqattn_jax.serving.step import (StepKind, fold_host_plan, pack_inputs,  # noqa: E402
                                      step_inputs_spec)

SHAPES = {
    # a CPU-sized shape: the script's own test (tests/test_benchmarks.py) runs it
    "tiny": (LlamaConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, ffn_dim=128, dtype="float32"), 24),
    "small": (LlamaConfig(vocab_size=32000, d_model=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                          head_dim=128, ffn_dim=2816, dtype="float16"), 320),
    "1b": (LlamaConfig(vocab_size=32000, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                       head_dim=64, ffn_dim=8192, dtype="float16"), 1024),
}
PS = 16
HBM_BW = 4.3e12


def log(*a):
    print(*a, flush=True)


def hbm_floor_ms(cfg: LlamaConfig, batch: int, ctx: int, bytes_per=2) -> float:
    """Weights + the batch's KV read once, at HBM_BW."""
    d, f, v, hd = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    per_layer = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d + 3 * d * f
    weights = cfg.num_layers * per_layer + 2 * v * d
    kv = batch * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * hd
    return (weights + kv) * bytes_per / HBM_BW * 1e3


@dataclasses.dataclass(frozen=True)
class KernelChoiceModel(LlamaModel):
    """LlamaModel whose attention options also name FlashInfer's decode kernel ("auto",
    "tensor_core" or "cuda_core"): the same step with the other kernel, for `--decode-kernel`."""

    decode_kernel: str = "auto"

    def attention_options(self) -> dict:
        return {**super().attention_options(), "decode_kernel": self.decode_kernel}


def _engine(cfg: LlamaConfig, params, batch: int, ctx: int, extra_tokens: int,
            decode_kernel: str = "auto", **ecfg):
    pages = batch * (-(-(ctx + extra_tokens) // PS)) + 64
    cache = sj.CacheConfig(num_pages=pages, page_size=PS, num_kv_heads=cfg.num_kv_heads,
                           head_dim=cfg.head_dim, max_seqs=batch,
                           max_pages_per_seq=-(-(ctx + extra_tokens) // PS) + 1,
                           num_layers=cfg.num_layers, dtype=cfg.dtype)
    ecfg.setdefault("chunk", 512)
    ecfg.setdefault("prefix_cache", False)
    model = LlamaModel(cfg) if decode_kernel == "auto" else KernelChoiceModel(cfg, 1, decode_kernel)
    return Engine(model, params, cache, EngineConfig(**ecfg))


def _fill(eng: Engine, batch: int, ctx: int, max_new: int, seed=0):
    """Submit `batch` requests of `ctx - 1` prompt tokens and step until every one decodes."""
    rng = np.random.default_rng(seed)
    hs = [eng.submit(rng.integers(0, eng.model.vocab_size, size=ctx - 1),
                     SamplingParams(max_new_tokens=max_new)) for _ in range(batch)]
    while any(not r.prompt_done for r in eng._running.values()) or eng._waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    return hs


def device_bound_loop(eng: Engine, steps: int = 1):
    """`run(n)`: the engine's decode step program (K = `steps` decode steps per program; the
    engine's own program, tensor parallel included) dispatched n times back to back for every
    running request (host plans per dispatch, tokens fed back on the device, nothing read until the
    end); returns the pool after the n-th finished and checks its allocation and plan flags."""
    kind = StepKind("decode", greedy_only=True, host_plan=True, steps=steps)
    fn = eng._step_fn(kind, eng.config.chunk)
    while eng._pending:
        eng._receive(eng._pending.popleft())
    slots = sorted(eng._running)
    d_ids = np.full((eng.B,), -1, np.int32)
    d_ids[:len(slots)] = slots
    lens = np.zeros((eng.B,), np.int32)
    lens[:len(slots)] = [eng._running[s].kv_len for s in slots]
    inp = dict(d_ids=d_ids, **eng._sampling_arrays([None] * eng.B, [0] * eng.B))
    if steps > 1:
        inp["d_n"] = np.where(d_ids >= 0, steps, 0).astype(np.int32)
    flat_inp = pack_inputs(step_inputs_spec(kind, eng.B, eng.Bp, eng.config.chunk), inp)
    bufs = [eng.kv, eng.state, eng.last_tok]
    eng.kv = eng.state = eng.last_tok = None    # donated from here on

    def plan():
        lens[:len(slots)] += 1
        return eng._host_plan("decode", inp, lens, eng.config.chunk)

    def run(n):
        out = None
        for _ in range(n):
            hp = tuple(plan() for _ in range(steps))
            flat, hp = fold_host_plan(flat_inp, hp[0] if steps == 1 else hp)
            *bufs[:], out = fn(eng.params, *bufs, flat, hp)
        jax.block_until_ready(bufs[2])
        assert np.all(np.asarray(out)[-2:] == 1), "device-bound loop: a plan or allocation check failed"
        return bufs[0]

    return run


MIN_DISPATCHES = 6


def dispatches_per_repeat(n_steps: int, decode_steps: int) -> int:
    """Step programs per timed repeat of `time_steps`: about `n_steps / 3` steps, and at least
    `MIN_DISPATCHES` programs. A repeat starts from an idle GPU (the previous one ended with a
    block), so its first program's host work (host plans, XLA's command-buffer update and launch:
    ~5 ms for a K=4 program of the 1.2B shape on an H200) is not hidden behind a running one;
    with two programs a repeat, as `--steps 24` at K=4 gave before, that start cost was spread
    over 8 steps and added ~0.4 ms to each (run S2: device-bound 2.40 ms over 2 programs, 1.99 ms
    over 5)."""
    return max(MIN_DISPATCHES, n_steps // 3 // decode_steps)


def measured_steps(n_steps: int, decode_steps: int) -> int:
    """Decode steps `time_steps` runs in all (served, device-bound warm-up, device-bound)."""
    n = dispatches_per_repeat(n_steps, decode_steps)
    return decode_steps * (3 * n + 1 + 3 * n)


def timed_fill(ctx: int, batch: int, n_steps: int, decode_steps: int, chunk: int = 512):
    """(start, G, extra) for an engine timed by `time_steps`: the timed steps (and the fill's last
    3) grow every request by G tokens, so prompts of `start - 1` tokens, G/2 short of `ctx`, make
    them read `ctx` tokens on average, as torch's graph and the floor do. `extra` is the tokens a
    request may add after its prompt (its `max_new_tokens` is `extra - 32`): G, plus the slack for
    a request whose prompt ends early in the fill and decodes (K tokens a step) while the others
    prefill, up to one step per `chunk`-token prefill chunk."""
    K = decode_steps
    G = measured_steps(n_steps, K) + 3 * K
    start = max(2, ctx - G // 2)
    return start, G, G + K * -(-batch * start // chunk) + 64


def kv_len_timed(eng: Engine, G: int) -> dict:
    """The running requests' KV lengths over the G timed steps (min at the start, mean over the
    steps, max at the end), called before them."""
    lens = np.asarray([r.kv_len for r in eng._running.values()])
    return dict(min=int(lens.min()), mean=float(lens.mean()) + G / 2, max=int(lens.max()) + G)


def time_steps(eng: Engine, n_steps: int, decode_steps: int = 1,
               trace_dir: str | None = None) -> tuple[float, float, object]:
    """(served ms, device-bound ms, the pool afterwards) per decode step of an engine whose
    running requests all decode: served = `Engine.step()` in steady state, sub-steps counted (a
    multi-step dispatch holds K); device-bound = `device_bound_loop`. Medians of 3 repeats of
    about `n_steps / 3` steps. `trace_dir`: then also 10 device-bound dispatches under
    `jax.profiler` there. The engine cannot serve afterwards (its buffers were donated)."""
    K, batch = decode_steps, len(eng._running)
    n = dispatches_per_repeat(n_steps, K)
    served = []
    for _ in range(3):
        jax.block_until_ready(eng.last_tok)
        rows0 = eng.stats.decode_rows
        t0 = time.perf_counter()
        for _ in range(n):
            eng.step()
        jax.block_until_ready(eng.last_tok)
        served.append((time.perf_counter() - t0) / ((eng.stats.decode_rows - rows0) / batch))
    run = device_bound_loop(eng, K)
    run(1)
    bound = []
    for _ in range(3):
        t0 = time.perf_counter()
        kv = run(n)
        bound.append((time.perf_counter() - t0) / (n * K))
    if trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        kv = run(10)
        jax.profiler.stop_trace()
    return 1e3 * statistics.median(served), 1e3 * statistics.median(bound), kv


def _backend(graphs: bool):
    """The engine's backend: FlashInfer with static host plans (CUDA graphs: its default) or with
    queued host plans; the reference backend where FlashInfer does not run."""
    from seqattn_jax.backend import flashinfer_available  # noqa: PLC0415

    if not flashinfer_available():
        return "auto"
    from seqattn_jax.bridge import FlashInferBackend  # noqa: PLC0415

    return FlashInferBackend(cuda_graphs=graphs)


def bench_decode(shape: str, batch: int, n_steps: int, torch_too: bool, graphs: bool = False,
                 params=None, decode_steps: int = 1, decode_kernel: str = "auto",
                 overlap: bool = False) -> dict:
    """Per decode step (ms): served (Engine.step in steady state, sub-steps counted), device-bound
    (the same program back to back), the HBM floor; torch + FlashInfer when `torch_too`."""
    cfg, ctx = SHAPES[shape]
    params = init_params(cfg, 0) if params is None else params
    K = decode_steps
    start, G, extra = timed_fill(ctx, batch, n_steps, K, chunk=512)
    eng = _engine(cfg, params, batch, start, extra_tokens=extra, chunk=512,
                  backend=_backend(graphs), decode_steps=K, decode_kernel=decode_kernel,
                  mixed_steps=False, overlap_dispatch=overlap)   # the fill needs no batch-POD kernel: decode is measured
    _fill(eng, batch, start, max_new=extra - 32)
    lens = kv_len_timed(eng, G)
    served_ms, bound_ms, _ = time_steps(eng, n_steps, K)
    res = dict(shape=shape, batch=batch, ctx=ctx, cuda_graphs=graphs, decode_steps=K,
               decode_kernel=decode_kernel, overlap_dispatch=overlap, kv_len_timed=lens,
               served_ms=served_ms, device_bound_ms=bound_ms,
               hbm_floor_ms=hbm_floor_ms(cfg, batch, ctx))
    del eng
    if torch_too:
        # The baseline runs in this (JAX) process, on the same GPU. A device-side fault in it (an
        # illegal memory access, say) is not silent: it is raised, asynchronously, at the
        # baseline's next synchronising call as torch.AcceleratorError and propagates out of this
        # function, so this call's JAX figures above are lost with it (earlier rows were logged).
        # It cannot be caught and survived: CUDA errors of that kind are sticky, they poison the
        # device's primary context, which torch and XLA share in one process, so every later CUDA
        # call of either fails too. To keep the JAX run alive through a broken baseline, run the
        # baseline in its own process (`python benchmarks/torch_llama.py --json out.json`).
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torch_llama  # noqa: PLC0415 - benchmarks/torch_llama.py (torch + FlashInfer)
        # the same weights (the JAX params moved to the host), run by torch + FlashInfer
        host = jax.tree_util.tree_map(np.asarray, params)
        del params
        # prefill through FA2, the kernel the engine runs (and no FA3 compile in the run)
        t = torch_llama.run_benchmark(cfg, batch, ctx, params=host, steps=min(n_steps, 30),
                                      prefill_backend="fa2")
        res.update(torch_eager_ms=t["decode"]["eager_ms"], torch_graph_ms=t["decode"]["graph_ms"],
                   torch_graph_replay_only_ms=t["decode"]["graph_replay_only_ms"],
                   torch_check=t["check"], torch_prefill_ms=t["prefill_ms"], torch_mixed=t["mixed"])
    return res


def bench_host(batch: int, decode_steps: int, n_steps: int = 200) -> dict:
    """The engine's own host work per decode step at a full batch: the tiny model's engine with a
    step program that does nothing on the device (it hands back the pool, state and tokens it
    got), so what is timed is `Engine.step`'s Python and numpy alone: scheduling, bookkeeping,
    host plans (the reference backend's) and reading the step's output."""
    from seqattn_jax.serving.step import num_out_rows  # noqa: PLC0415

    cfg, ctx = SHAPES["tiny"]
    eng = _engine(cfg, init_params(cfg, 0), batch, ctx, extra_tokens=8 * n_steps + 64,
                  decode_steps=decode_steps, mixed_steps=False, backend="reference")
    _fill(eng, batch, ctx, max_new=8 * n_steps + 32)
    jax.block_until_ready(eng.last_tok)
    outs = {}

    def idle_step_fn(kind, c):
        r = num_out_rows(kind, eng.B, eng.Bp) * kind.steps
        if r not in outs:   # sampled tokens 0, allocation and plan checks passed
            outs[r] = jax.numpy.asarray(np.r_[np.zeros(r, np.int32), [1, 1]].astype(np.int32))
        return lambda params, kv, state, last_tok, flat, hp: (kv, state, last_tok, outs[r])

    eng._step_fn = idle_step_fn
    for _ in range(5):
        eng.step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n_steps // decode_steps):
            eng.step()
        times.append((time.perf_counter() - t0) / (n_steps // decode_steps * decode_steps))
    return dict(batch=batch, decode_steps=decode_steps,
                host_ms_per_decode_step=1e3 * statistics.median(times))


def bench_mixed(shape: str, batch: int, chunk: int, n_prompts: int) -> dict:
    """Per-iteration time with a prefill chunk and a full decode batch, mixed vs separate."""
    cfg, ctx = SHAPES[shape]
    params = init_params(cfg, 0)
    out = {}
    for mixed in (True, False):
        eng = _engine(cfg, params, batch + 1, ctx, extra_tokens=max(4 * n_prompts, chunk) + 64,
                      chunk=chunk, chunk_buckets=(chunk,), mixed_steps=mixed, max_prefill_requests=1)
        _fill(eng, batch, ctx, max_new=4 * n_prompts + 32)
        rng = np.random.default_rng(1)
        # prompts of exactly one chunk generating one token: every iteration prefills one chunk
        # beside the decode batch, then the request ends and the next is admitted
        for _ in range(2):   # warm-up (compiles the prefill / mixed programs)
            eng.submit(rng.integers(0, cfg.vocab_size, size=chunk), SamplingParams(max_new_tokens=1))
        while eng._waiting or any(not r.prompt_done for r in eng._running.values()):
            eng.step()
        jax.block_until_ready(eng.last_tok)
        steps0 = dict(eng.stats.steps)
        t0 = time.perf_counter()
        for _ in range(n_prompts):
            eng.submit(rng.integers(0, cfg.vocab_size, size=chunk), SamplingParams(max_new_tokens=1))
        iters = 0
        while eng._waiting or any(not r.prompt_done for r in eng._running.values()):
            eng.step()
            iters += 1
        jax.block_until_ready(eng.last_tok)
        dt = time.perf_counter() - t0
        steps = {k: v - steps0.get(k, 0) for k, v in eng.stats.steps.items()}
        out["mixed" if mixed else "separate"] = dict(ms_per_iteration=1e3 * dt / iters,
                                                     iterations=iters, steps=steps)
        del eng
    out["speedup"] = out["separate"]["ms_per_iteration"] / out["mixed"]["ms_per_iteration"]
    out.update(shape=shape, batch=batch, chunk=chunk)
    return out


GPU_EXAMPLE = ["--requests", "128", "--batch", "64", "--chunk", "512", "--num-pages", "4096",
               "--layers", "8", "--d-model", "1024", "--heads", "16", "--kv-heads", "4",
               "--head-dim", "128", "--ffn", "2816", "--vocab", "32000", "--prompt-len", "64", "512",
               "--gen-len", "32", "256", "--prefix-len", "256"]


def _tok_s(text: str) -> float:
    m = re.search(r"([\d,]+) generated tok/s", text)
    return float(m.group(1).replace(",", "")) if m else float("nan")


def bench_e2e(legacy: str | None) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, COLUMNS="200")
    res = {}
    runs = [("engine", root, [])]
    if legacy:   # only its speed is compared: skip its dense check
        runs.append(("before", Path(legacy).resolve(), ["--no-check"]))
    for name, where, extra in runs:
        cmd = [sys.executable, str(where / "examples" / "decode.py"), *GPU_EXAMPLE, *extra]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=where, env=dict(env, PYTHONPATH=f"{where}:{env.get('PYTHONPATH', '')}"),
                           capture_output=True, text=True, timeout=900)
        log(f"--- {name} ({time.perf_counter() - t0:.0f} s, exit {p.returncode})")
        log(p.stdout[-3500:])
        if p.returncode:
            log(p.stderr[-3000:])
        res[name] = dict(tok_s=_tok_s(p.stdout), exit=p.returncode)
    if "before" in res:
        res["speedup"] = res["engine"]["tok_s"] / res["before"]["tok_s"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("sections", nargs="+", choices=("all", "decode", "mixed", "e2e", "host"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--shapes", nargs="+", default=["small", "1b"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="on",
                    help="FlashInferBackend(cuda_graphs=...) for the engine's decode rows")
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[1, 4],
                    help="EngineConfig.decode_steps values to measure (multi-step decode)")
    ap.add_argument("--decode-kernel", nargs="+", default=["auto"],
                    choices=("auto", "tensor_core", "cuda_core"),
                    help="FlashInfer decode kernels to measure the engine's step with (auto: the "
                         "backend's choice for the model's GQA group)")
    ap.add_argument("--overlap-dispatch", choices=("off", "on", "both"), default="off",
                    help="EngineConfig.overlap_dispatch for the decode rows (affects 'served')")
    ap.add_argument("--legacy", default=None, help="a checkout of the code before the engine (e2e)")
    a = ap.parse_args(argv)
    secs = {"decode", "mixed", "e2e"} if "all" in a.sections else set(a.sections)
    gpu = jax.devices()[0].device_kind.replace(" ", "_")
    results = {}
    if "decode" in secs:
        rows = []
        modes = {"on": (True,), "off": (False,), "both": (False, True)}[a.cuda_graphs]
        for shape in a.shapes:
            for b in a.batches:
                overlaps = {"off": (False,), "on": (True,), "both": (False, True)}[
                    a.overlap_dispatch]
                variants = [(g, k, dk, o) for g in modes for k in a.decode_steps
                            for dk in a.decode_kernel for o in overlaps]
                for i, (g, k, dk, o) in enumerate(variants):
                    last = i == len(variants) - 1    # torch once per shape and batch
                    r = bench_decode(shape, b, a.steps, torch_too=last and not a.no_torch,
                                     graphs=g, decode_steps=k, decode_kernel=dk, overlap=o)
                    rows.append(r)
                    log(json.dumps(r))
        results["decode"] = rows
        log(f"\nXLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
        log(f"\ndecode step, ms ({jax.devices()[0].device_kind})")
        log(f"{'shape':6} {'batch':>5} {'graphs':>6} {'K':>2} {'kernel':>11} {'overlap':>7} "
            f"{'served':>8} {'dev-bound':>9} "
            f"{'torch eager':>11} {'torch graph':>11} {'HBM floor':>9} {'served/graph':>12} "
            f"{'served/floor':>12} {'served/bound':>12}")
        torch_at = {(r["shape"], r["batch"]): r for r in rows if "torch_graph_ms" in r}
        for r in rows:
            t = torch_at.get((r["shape"], r["batch"]), {})
            te, tg = t.get("torch_eager_ms", float("nan")), t.get("torch_graph_ms", float("nan"))
            log(f"{r['shape']:6} {r['batch']:5d} {'on' if r['cuda_graphs'] else 'off':>6} "
                f"{r['decode_steps']:2d} {r['decode_kernel']:>11} "
                f"{'on' if r['overlap_dispatch'] else 'off':>7} "
                f"{r['served_ms']:8.3f} {r['device_bound_ms']:9.3f} "
                f"{te:11.3f} {tg:11.3f} {r['hbm_floor_ms']:9.3f} {r['served_ms'] / tg:12.2f} "
                f"{r['served_ms'] / r['hbm_floor_ms']:12.2f} "
                f"{r['served_ms'] / r['device_bound_ms']:12.2f}")
    if "host" in secs:
        rows = [bench_host(b, k) for b in a.batches for k in a.decode_steps]
        results["host"] = rows
        log(f"\nthe engine's own host work per decode step (no device work; {platform.processor() or 'cpu'})")
        for r in rows:
            log(f"  batch {r['batch']:4d}, K={r['decode_steps']}: {r['host_ms_per_decode_step']:.3f} ms")
    if "mixed" in secs:
        r = bench_mixed(a.shapes[0], 64, 512, 24)
        results["mixed"] = r
        log(json.dumps(r))
    if "e2e" in secs:
        r = bench_e2e(a.legacy)
        results["e2e"] = r
        log(json.dumps(r))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for k, v in results.items():
            (out / f"serve_{k}_{gpu}.json").write_text(json.dumps(v, indent=1))


if __name__ == "__main__":
    main()
