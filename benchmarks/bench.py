"""Benchmarks of the FlashInfer bridge (run on a Hopper GPU; writes JSON, prints tables).

    python3 benchmarks/bench.py all --out benchmarks/results     # or: copy kernel step pod

Shapes (issue 3): Hq=32, Hkv=8, D=128, page 16, fp16; (batch, context) in {64/1024, 64/4096,
256/2048}.

  copy    device-to-device copy bandwidth (bytes read + written), the practical roofline
  kernel  one decode call: seqattn_jax through jax.jit (tensor-core and CUDA-core kernels, the
          buffer_callback and the XLA FFI bridges) vs the same FlashInfer wrapper called from torch
          vs jax's Pallas `paged_attention` vs a pure-XLA gather + einsum; TB/s of KV read
  step    a 32-layer decode step (allocate_decoding -> pack -> plan -> per layer append_kv +
          batch_decode) in one jax.jit, Python loop and lax.scan, both bridges, vs the same
          FlashInfer kernels from torch eager and from a torch CUDA graph
  pod     POD and batch POD vs separate prefill + decode calls (jit and torch), bs=128, ctx=2048,
          prefill 2048

Timing: JAX figures are the wall time of one jitted program that runs N chained calls (each call's
output is the next call's query, so nothing is dropped and the calls serialise), after warm-up,
divided by N; median of several repeats. torch figures use CUDA events around N calls (eager) or
graph replays. All on one GPU in one process.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import seqattn_jax as sj
from seqattn_jax import attention
from seqattn_jax.options import AttentionOptions

HQ, HKV, D, PS = 32, 8, 128, 16
SHAPES = [(64, 1024), (64, 4096), (256, 2048)]
DT = "float16"


def log(*a):
    print(*a, flush=True)


_BACKENDS = {}


def fi(transport="auto"):
    """The FlashInfer backend of `transport` ("auto", "ffi", "callback"): one object per transport
    for the whole run (each owns its plan slots and workspaces)."""
    if transport not in _BACKENDS:
        from seqattn_jax import bridge  # noqa: PLC0415

        _BACKENDS[transport] = bridge.FlashInferBackend(transport=transport)
    return _BACKENDS[transport]


def ffi_available() -> bool:
    from seqattn_jax.bridge import ffi  # noqa: PLC0415

    return ffi.available()


# ---------------------------------------------------------------------------------------------
# timing helpers


def time_jax(fn, args, n_inner, repeats=5):
    """Median seconds per inner call of a jitted `fn(*args)` that runs n_inner chained calls."""
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / n_inner)
    return statistics.median(ts)


def time_jax_marginal(build, args, n1=20, n2=220, repeats=9):
    """Seconds per call from two jitted programs of n1 and n2 chained calls: the difference
    cancels each program's fixed cost (dispatch, the plan callback's stream sync and host plan)."""
    t1 = time_jax(build(n1), args, 1, repeats)
    t2 = time_jax(build(n2), args, 1, repeats)
    return (t2 - t1) / (n2 - n1), t2 / n2


def time_layers_marginal(build, kv, packed, n1=8, n2=104, repeats=11):
    """Seconds per layer: programs `build(n)` of n layers, `(kv, packed) -> (kv, x)` with the pool
    donated, timed at n1 and n2 layers (median of `repeats`); returns (per layer, the pool)."""
    t = []
    for n in (n1, n2):
        f = build(n)
        kv, x = f(kv, packed)
        jax.block_until_ready(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            kv, x = f(kv, packed)
            jax.block_until_ready(x)
            ts.append(time.perf_counter() - t0)
        t.append(statistics.median(ts))
    return (t[1] - t[0]) / (n2 - n1), kv


def time_torch(fn, n_inner, repeats=5):
    import torch

    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n_inner):
            fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3 / n_inner)
    return statistics.median(ts)


def time_graph(graph, n_inner, repeats=5):
    import torch

    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n_inner):
            graph.replay()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3 / n_inner)
    return statistics.median(ts)


# ---------------------------------------------------------------------------------------------
# problem construction


def make_decode_problem(bs, ctx, num_layers=1, extra_tokens=0, seed=0, prefill=0):
    """A cache with `bs` sequences of `ctx` tokens (plus, with `prefill`, one more sequence of
    `prefill` tokens in slot `bs`), pages in random order, random K/V in every layer."""
    lens = [ctx] * bs + ([prefill] if prefill else [])
    nseq = len(lens)
    pages_per_seq = max(-(-(n + extra_tokens) // PS) for n in lens)
    num_pages = sum(-(-(n + extra_tokens) // PS) for n in lens) + 8
    cfg = sj.CacheConfig(num_pages=num_pages, page_size=PS, num_kv_heads=HKV, head_dim=D,
                         max_seqs=nseq, max_pages_per_seq=pages_per_seq, num_layers=num_layers,
                         dtype=DT)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_pages).astype(np.int32)
    table = np.full((nseq, pages_per_seq), -1, np.int32)
    cur = 0
    for i, n in enumerate(lens):
        k = -(-n // PS)
        table[i, :k] = perm[cur:cur + k]
        cur += k
    state = sj.state_from_page_table(cfg, table, np.asarray(lens, np.int32),
                                     active=np.ones((nseq,), bool))
    key = jax.random.PRNGKey(seed)
    kv = (jax.random.normal(key, cfg.kv_shape, jnp.float32) * 0.5).astype(cfg.jnp_dtype)
    return cfg, state, kv


def decode_bytes(bs, ctx):
    return bs * ctx * HKV * D * 2 * 2  # K and V, fp16


# ---------------------------------------------------------------------------------------------
# copy bandwidth


def bench_copy():
    import torch

    n = 4 * 1024**3 // 2
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = time_torch(lambda: b.copy_(a), 20)
    bw = 2 * a.numel() * 2 / t / 1e12
    log(f"copy: {bw:.2f} TB/s (read+write of {a.numel() * 2 / 1e9:.1f} GB in {t * 1e3:.2f} ms)")
    del a, b
    torch.cuda.empty_cache()
    return {"copy_tb_s": bw}


# ---------------------------------------------------------------------------------------------
# kernel


def _torch_decode_wrapper(cfg, packed, use_tc):
    import flashinfer
    import torch

    ws = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=use_tc)
    indptr = torch.from_dlpack(packed.kv_page_indptr)
    indices = torch.from_dlpack(packed.kv_page_indices)
    lpl = torch.from_dlpack(packed.kv_last_page_len)
    w.plan(indptr.cpu(), indices, lpl.cpu(), HQ, HKV, D, PS, q_data_type=torch.float16,
           kv_data_type=torch.float16)
    return w


def bench_kernel(n_inner=50):
    import torch

    rows = []
    for bs, ctx in SHAPES:
        cfg, state, kv = make_decode_problem(bs, ctx)
        packed = sj.pack_for_flashinfer(state, jnp.arange(bs, dtype=jnp.int32))
        q = jax.random.normal(jax.random.PRNGKey(1), (bs, HQ, D), jnp.float32).astype(DT)
        nbytes = decode_bytes(bs, ctx)
        res = {"bs": bs, "ctx": ctx, "kv_bytes": nbytes}

        # torch: the FlashInfer wrappers
        kv_t = torch.from_dlpack(kv)
        q_t = torch.from_dlpack(q).clone()
        for name, tc in (("torch_tc", True), ("torch_cuda_core", False)):
            w = _torch_decode_wrapper(cfg, packed, tc)
            out_t = torch.empty_like(q_t)
            res[name] = time_torch(lambda: w.run(q_t, kv_t, out=out_t), n_inner)
            del w

        # seqattn_jax through jit
        for bridge in ("callback", "ffi"):
            if bridge == "ffi" and not ffi_available():
                continue
            for kernel in ("tensor_core", "cuda_core"):
                def build(n, kernel=kernel, be=fi(bridge)):
                    def many(q, kv, packed):
                        plan = attention.plan_decode(
                            cfg, packed, HQ, backend=be,
                            options=AttentionOptions(decode_kernel=kernel))
                        for _ in range(n):
                            q = attention.batch_decode(cfg, q, kv, packed, plan=plan)
                        return q
                    return jax.jit(many)
                name = f"jax_{bridge}_{'tc' if kernel == 'tensor_core' else 'cuda_core'}"
                res[name], res[name + "_whole_program"] = time_jax_marginal(
                    build, (q, kv, packed))

        # Pallas paged_attention (head-major K/V pages, no softmax scale: pre-scale q)
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention as pa

            k_pages = jnp.transpose(kv[:, 0], (2, 0, 1, 3))   # [Hkv, P, page, D]
            v_pages = jnp.transpose(kv[:, 1], (2, 0, 1, 3))
            table = state.page_table
            lengths = state.seq_lens
            scale = 1.0 / math.sqrt(D)

            def pallas_many(q, k_pages, v_pages, table, lengths):
                for _ in range(n_inner):
                    q = pa.paged_attention(q * jnp.asarray(scale, q.dtype), k_pages, v_pages,
                                           table, lengths, k_splits=16).astype(q.dtype)
                return q

            res["pallas"] = time_jax(jax.jit(pallas_many), (q, k_pages, v_pages, table, lengths),
                                     n_inner)
            del k_pages, v_pages
        except Exception as e:  # noqa: BLE001
            log(f"  pallas failed: {type(e).__name__}: {str(e)[:200]}")
            res["pallas"] = None

        # pure XLA: gather the pages, einsum, softmax
        def xla_decode(q, kv, table, lengths):
            pages = jnp.take(kv, table, axis=0)               # [B, n, 2, page, Hkv, D]
            b, n = table.shape
            k = pages[:, :, 0].reshape(b, n * PS, HKV, D)
            v = pages[:, :, 1].reshape(b, n * PS, HKV, D)
            qg = q.reshape(b, HKV, HQ // HKV, D)
            s = jnp.einsum("bhgd,bthd->bhgt", qg, k, preferred_element_type=jnp.float32)
            s = s / math.sqrt(D)
            mask = jnp.arange(n * PS)[None, :] < lengths[:, None]
            s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
            p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
            o = jnp.einsum("bhgt,bthd->bhgd", p, v, preferred_element_type=jnp.float32)
            return o.reshape(b, HQ, D).astype(q.dtype)

        table = jnp.where(state.page_table >= 0, state.page_table, 0)[:, : -(-ctx // PS)]

        def xla_many(q, kv, table, lengths):
            for _ in range(10):
                q = xla_decode(q, kv, table, lengths)
            return q

        res["xla_gather"] = time_jax(jax.jit(xla_many), (q, kv, table, state.seq_lens), 10)
        del kv_t, q_t, kv
        rows.append(res)
        log(_kernel_row(res))
    return rows


def _kernel_row(r):
    nb = r["kv_bytes"]
    parts = [f"bs={r['bs']:>3} ctx={r['ctx']:>4}:"]
    for k, v in r.items():
        if k in ("bs", "ctx", "kv_bytes") or v is None or k.endswith("_whole_program"):
            continue
        parts.append(f"{k}={v * 1e6:.0f}us({nb / v / 1e12:.2f}TB/s)")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# 32-layer decode step


def bench_step(bs=64, ctx=1024, num_layers=32, steps=30):
    import flashinfer
    import torch

    res = {"bs": bs, "ctx": ctx, "num_layers": num_layers}
    cfg, state0, kv0 = make_decode_problem(bs, ctx, num_layers=num_layers,
                                           extra_tokens=4 * steps + 32)
    seq_ids = jnp.arange(bs, dtype=jnp.int32)
    key = jax.random.PRNGKey(3)
    q = jax.random.normal(key, (num_layers, bs, HQ, D), jnp.float32).astype(DT)
    kk = jax.random.normal(key, (num_layers, bs, HKV, D), jnp.float32).astype(DT)
    kk2 = jnp.stack([kk, kk], axis=2)           # the same K/V rows, stacked [L, B, 2, Hkv, D]
    be = fi("auto")                             # the transport of the steps made next

    def make_step(use_scan, append_impl, planning, layers=num_layers, stacked=False):
        """One decode step: allocate_decoding -> pack -> plan -> `layers` x (append + decode).
        planning "device": plan_decode inside the step (reads the lengths back: a stream sync);
        "host": adopt the HostPlan made on the host before the step (no sync). stacked: K/V rows
        reach append_kv stacked ([T, 2, Hkv, D], as a fused KV projection gives them) rather than
        as two arrays (which costs a copy per layer)."""
        def step(state, kv, hp):
            state, status = sj.allocate_decoding(state, seq_ids)
            ok = sj.ok(status)
            packed = sj.pack_for_flashinfer(state, seq_ids)
            if planning == "host":
                plan = attention.adopt_plan(hp, packed)
            else:
                plan = attention.plan_decode(cfg, packed, HQ, backend=be)
            impl = "backend" if append_impl == "flashinfer" else append_impl

            def layer(carry, l):
                kv, x = carry
                if stacked:
                    kv = attention.append_kv(cfg, kv, kk2[l], None, packed, layer=l, plan=plan,
                                             impl=impl)
                else:
                    kv = attention.append_kv(cfg, kv, kk[l], kk[l], packed, layer=l, plan=plan,
                                             impl=impl)
                o = attention.batch_decode(cfg, q[l] + x, kv, packed, layer=l, plan=plan)
                return (kv, o), None

            x = jnp.zeros((bs, HQ, D), DT)
            if use_scan:
                (kv, x), _ = jax.lax.scan(layer, (kv, x), jnp.arange(layers, dtype=jnp.int32))
            else:
                for l in range(layers):
                    (kv, x), _ = layer((kv, x), l)
            if layers == 0:
                x = plan.token if plan.token is not None else x
            return state, kv, x, ok & plan.ok

        return jax.jit(step, donate_argnums=(1,))

    def run_steps(step, planning, n_warm=3, repeats=3):
        """Median seconds per step over `repeats` x `steps` back-to-back steps (the host plans
        included), after n_warm; also whether the pool stayed in place and every step was ok."""
        state, kv = state0, kv0 + 0
        ptr = kv.unsafe_buffer_pointer()
        lens = np.full((bs,), ctx, np.int32)

        def one(state, kv):
            nonlocal lens
            lens = lens + 1                # this step's allocate_decoding adds one token each
            hp = (attention.host_plan_decode(cfg, lens, HQ, backend=be)
                  if planning == "host" else None)
            return step(state, kv, hp)

        oks = []
        for _ in range(n_warm):
            state, kv, x, ok = one(state, kv)
            oks.append(ok)
        jax.block_until_ready(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, kv, x, ok = one(state, kv)
                oks.append(ok)
            jax.block_until_ready(x)
            ts.append((time.perf_counter() - t0) / steps)
        all_ok = bool(all(np.all(np.asarray(o)) for o in oks))
        same = kv.unsafe_buffer_pointer() == ptr
        del kv
        return statistics.median(ts), same, all_ok

    variants = [("ffi", False, "scatter", "device", False), ("ffi", False, "scatter", "host", False),
                ("ffi", True, "scatter", "device", False), ("ffi", True, "scatter", "host", False),
                ("ffi", False, "scatter", "host", True), ("ffi", True, "scatter", "host", True),
                ("ffi", False, "flashinfer", "device", False),
                ("callback", False, "scatter", "device", False),
                ("callback", False, "scatter", "host", False)]
    for bridge, use_scan, append_impl, planning, stacked in variants:
        if bridge == "ffi" and not ffi_available():
            continue
        be = fi(bridge)
        name = (f"jax_{bridge}_{'scan' if use_scan else 'loop'}_{append_impl}_append"
                f"{'_stacked' if stacked else ''}_{planning}_plan")
        t, same, ok = run_steps(make_step(use_scan, append_impl, planning, stacked=stacked),
                                planning)
        res[name], res[name + "_no_copy"], res[name + "_plans_ok"] = t, same, ok
        log(f"  {name}: {t * 1e3:.3f} ms/step (pool not copied: {same}; plans matched: {ok})")
    be = fi("auto")
    # the step's head alone (allocate_decoding + pack + plan, no layer), back to back like the
    # steps above: its cost per step when pipelined
    for planning in ("device", "host"):
        t, _, ok = run_steps(make_step(False, "scatter", planning, layers=0), planning)
        res[f"jax_step_head_{planning}_plan"] = t
        log(f"  head only ({planning} plan): {t * 1e6:.1f} us/step (plans matched: {ok})")
    # the host's share of a host-planned step: host_plan_decode alone
    lens = np.full((bs,), ctx + 1, np.int32)
    for _ in range(5):
        attention.host_plan_decode(cfg, lens, HQ, backend=be)
        be.discard_host_plans()
    t0 = time.perf_counter()
    for _ in range(200):
        attention.host_plan_decode(cfg, lens, HQ, backend=be)
        be.discard_host_plans()
    res["host_plan_decode_host_s"] = (time.perf_counter() - t0) / 200
    log(f"  host_plan_decode on the host: {res['host_plan_decode_host_s'] * 1e6:.1f} us/call")
    # one layer (append + q add + decode) inside a jitted program, marginal over 8 -> 104 layers:
    # compare with torch's layers / num_layers below
    packed0 = sj.pack_for_flashinfer(state0, seq_ids)

    def build_layers(n):
        def many(kv, packed):
            plan = attention.plan_decode(cfg, packed, HQ, backend=be)
            x = jnp.zeros((bs, HQ, D), DT)
            for i in range(n):
                l = i % num_layers
                kv = attention.append_kv(cfg, kv, kk[l], kk[l], packed, layer=l, plan=plan,
                                         impl="scatter")
                x = attention.batch_decode(cfg, q[l] + x, kv, packed, layer=l, plan=plan)
            return kv, x
        return jax.jit(many, donate_argnums=0)

    res["jax_ffi_layer_marginal"], kvx = time_layers_marginal(build_layers, kv0 + 0, packed0)
    del kvx
    log(f"  one layer in jit (marginal): {res['jax_ffi_layer_marginal'] * 1e6:.1f} us")

    # torch: the same kernels (tensor-core decode, FlashInfer append), eager and CUDA graph
    packed = sj.pack_for_flashinfer(state0, seq_ids)
    kv_t = torch.from_dlpack(kv0).clone()
    P = cfg.num_pages
    indptr = torch.from_dlpack(packed.kv_page_indptr).clone()
    indices = torch.from_dlpack(packed.kv_page_indices).clone()
    lpl = torch.from_dlpack(packed.kv_last_page_len).clone()
    q_t = torch.from_dlpack(q).clone()
    k_t = torch.from_dlpack(kk).clone()
    kv_layers = kv_t.view(num_layers, P, *kv_t.shape[1:])      # per-layer views, no copy
    seq_lens = flashinfer.get_seq_lens(indptr, lpl, PS)
    bi, pos = flashinfer.get_batch_indices_positions(
        torch.arange(bs + 1, dtype=torch.int32, device="cuda"), seq_lens, bs)
    ws = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    indptr_h, lpl_h = indptr.cpu(), lpl.cpu()
    outs = [torch.empty(bs, HQ, D, dtype=torch.float16, device="cuda") for _ in range(2)]

    def layers(wr):
        x = torch.zeros_like(outs[0])
        for l in range(num_layers):
            flashinfer.append_paged_kv_cache(k_t[l], k_t[l], bi, pos, kv_layers[l], indices,
                                             indptr, lpl, "NHD")
            wr.run(q_t[l] + x, kv_layers[l], out=outs[l % 2])
            x = outs[l % 2]
        return x

    def torch_step():
        w.plan(indptr_h, indices, lpl_h, HQ, HKV, D, PS, q_data_type=torch.float16)
        layers(w)

    res["torch_eager"] = time_torch(torch_step, steps)
    log(f"  torch_eager: {res['torch_eager'] * 1e3:.3f} ms/step")
    res["torch_eager_layer"] = time_torch(lambda: layers(w), steps) / num_layers
    log(f"  torch eager, one layer: {res['torch_eager_layer'] * 1e6:.1f} us")

    # CUDA graph: plan outside, capture the 32 layers
    wg = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, use_tensor_cores=True,
        paged_kv_indptr_buffer=indptr.clone(), paged_kv_indices_buffer=indices.clone(),
        paged_kv_last_page_len_buffer=lpl.clone())
    wg.plan(indptr_h, indices, lpl_h, HQ, HKV, D, PS, q_data_type=torch.float16)

    def graph_layers():
        return layers(wg)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graph_layers()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graph_layers()

    def graph_step():
        wg.plan(indptr_h, indices, lpl_h, HQ, HKV, D, PS, q_data_type=torch.float16)
        g.replay()

    res["torch_cuda_graph"] = time_torch(graph_step, steps)
    res["torch_cuda_graph_replay_only"] = time_graph(g, steps)
    log(f"  torch_cuda_graph: {res['torch_cuda_graph'] * 1e3:.3f} ms/step "
        f"(replay only {res['torch_cuda_graph_replay_only'] * 1e3:.3f})")
    # torch eager again: the machines are shared, so bracket the JAX figures with two torch runs
    res["torch_eager_again"] = time_torch(torch_step, steps)
    log(f"  torch_eager (again): {res['torch_eager_again'] * 1e3:.3f} ms/step")
    eager = max(res["torch_eager"], res["torch_eager_again"])
    for k in list(res):
        if k.startswith("jax_") and not k.endswith(("_no_copy", "_plans_ok", "_marginal")):
            res[k + "_vs_torch_eager"] = res[k] / eager
    return res


# ---------------------------------------------------------------------------------------------
# one layer of the step, piece by piece (marginal per layer, jit vs torch eager)


def bench_layers(bs=64, ctx=1024, num_layers=32):
    """Where a layer's time goes: decode alone, + the q add, + the K/V append (each way), as the
    marginal cost per layer inside one jitted program (8 -> 104 layers), beside torch eager."""
    import flashinfer
    import torch

    from seqattn_jax import kv as kv_mod

    res = {"bs": bs, "ctx": ctx}
    cfg, state0, kv0 = make_decode_problem(bs, ctx, num_layers=num_layers, extra_tokens=16)
    seq_ids = jnp.arange(bs, dtype=jnp.int32)
    state, _ = sj.allocate_decoding(state0, seq_ids)
    packed = sj.pack_for_flashinfer(state, seq_ids)
    key = jax.random.PRNGKey(3)
    q = jax.random.normal(key, (num_layers, bs, HQ, D), jnp.float32).astype(DT)
    kk = jax.random.normal(key, (num_layers, bs, HKV, D), jnp.float32).astype(DT)
    kk2 = jnp.stack([kk, kk], axis=2)                     # [L, B, 2, Hkv, D] pre-stacked

    def scatter_separate(kv, l):   # K and V as two scatters (no stack of K and V per layer)
        page = jnp.where(packed.token_pages >= 0, packed.token_pages + l * cfg.num_pages,
                         cfg.num_layers * cfg.num_pages)
        off = jnp.maximum(packed.token_offsets, 0)
        kv = kv.at[page, 0, off].set(kk[l], mode="drop")
        return kv.at[page, 1, off].set(kk[l], mode="drop")

    def scatter_prestacked(kv, l):
        page = jnp.where(packed.token_pages >= 0, packed.token_pages + l * cfg.num_pages,
                         cfg.num_layers * cfg.num_pages)
        off = jnp.maximum(packed.token_offsets, 0)
        which = jnp.arange(2, dtype=jnp.int32)[None, :]
        return kv.at[page[:, None], which, off[:, None]].set(kk2[l], mode="drop")

    pieces = {
        "decode": lambda kv, x, l, plan: (kv, attention.batch_decode(
            cfg, x, kv, packed, layer=l, plan=plan)),
        "add_decode": lambda kv, x, l, plan: (kv, attention.batch_decode(
            cfg, q[l] + x, kv, packed, layer=l, plan=plan)),
        "scatter_append": lambda kv, x, l, plan: (kv_mod.scatter_kv(
            cfg, kv, kk[l], kk[l], packed, layer=l), x),
        "scatter_separate": lambda kv, x, l, plan: (scatter_separate(kv, l), x),
        "scatter_prestacked": lambda kv, x, l, plan: (scatter_prestacked(kv, l), x),
        "fi_append": lambda kv, x, l, plan: (attention.append_kv(
            cfg, kv, kk[l], kk[l], packed, layer=l, plan=plan, impl="backend"), x),
    }
    combos = {
        "decode": ["decode"],
        "add_decode": ["add_decode"],
        "scatter_append": ["scatter_append"],
        "scatter_separate": ["scatter_separate"],
        "scatter_prestacked": ["scatter_prestacked"],
        "fi_append": ["fi_append"],
        "layer_scatter": ["scatter_append", "add_decode"],
        "layer_fi_append": ["fi_append", "add_decode"],
    }

    def build(names, n):
        def many(kv, packed_):
            plan = attention.plan_decode(cfg, packed_, HQ, backend="flashinfer")
            x = q[0]
            for i in range(n):
                for name in names:
                    kv, x = pieces[name](kv, x, i % num_layers, plan)
            return kv, x
        return jax.jit(many, donate_argnums=0)

    kvx = kv0 + 0
    for label, names in combos.items():   # marginal over 96 layers: wall-clock noise / 96
        res["jax_" + label], kvx = time_layers_marginal(
            functools.partial(build, names), kvx, packed)
        log(f"  jit {label}: {res['jax_' + label] * 1e6:.1f} us/layer")
    del kvx

    kv_t = torch.from_dlpack(kv0).clone()
    P = cfg.num_pages
    kv_layers = kv_t.view(num_layers, P, *kv_t.shape[1:])
    indptr = torch.from_dlpack(packed.kv_page_indptr).clone()
    indices = torch.from_dlpack(packed.kv_page_indices).clone()
    lpl = torch.from_dlpack(packed.kv_last_page_len).clone()
    q_t, k_t = torch.from_dlpack(q).clone(), torch.from_dlpack(kk).clone()
    seq_lens = flashinfer.get_seq_lens(indptr, lpl, PS)
    bi, pos = flashinfer.get_batch_indices_positions(
        torch.arange(bs + 1, dtype=torch.int32, device="cuda"), seq_lens, bs)
    ws = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    w.plan(indptr.cpu(), indices, lpl.cpu(), HQ, HKV, D, PS, q_data_type=torch.float16)
    outs = [torch.empty(bs, HQ, D, dtype=torch.float16, device="cuda") for _ in range(2)]

    def t_decode():
        x = q_t[0]
        for l in range(num_layers):
            w.run(x, kv_layers[l], out=outs[l % 2])
            x = outs[l % 2]

    def t_add_decode():
        x = q_t[0]
        for l in range(num_layers):
            w.run(q_t[l] + x, kv_layers[l], out=outs[l % 2])
            x = outs[l % 2]

    def t_append():
        for l in range(num_layers):
            flashinfer.append_paged_kv_cache(k_t[l], k_t[l], bi, pos, kv_layers[l], indices,
                                             indptr, lpl, "NHD")

    def t_layer():
        x = q_t[0]
        for l in range(num_layers):
            flashinfer.append_paged_kv_cache(k_t[l], k_t[l], bi, pos, kv_layers[l], indices,
                                             indptr, lpl, "NHD")
            w.run(q_t[l] + x, kv_layers[l], out=outs[l % 2])
            x = outs[l % 2]

    for label, fn in (("decode", t_decode), ("add_decode", t_add_decode),
                      ("append", t_append), ("layer", t_layer)):
        res["torch_" + label] = time_torch(fn, 10) / num_layers
        log(f"  torch eager {label}: {res['torch_' + label] * 1e6:.1f} us/layer")
    return res


# ---------------------------------------------------------------------------------------------
# host cost: the same layer on a problem too small to keep the GPU busy


def bench_host(num_layers=32):
    """Host time per layer (append + q add + decode, FFI bridge) and per step head: the layer
    benchmark of `bench_layers` on bs 1 / ctx 16, where the GPU work is negligible, so a layer's
    marginal wall time is what the host spends launching it. A step whose GPU time per layer is
    close to this is bound by the host."""
    res = {}
    cfg, state0, kv0 = make_decode_problem(1, 16, num_layers=num_layers, extra_tokens=16)
    seq_ids = jnp.zeros((1,), jnp.int32)
    state, _ = sj.allocate_decoding(state0, seq_ids)
    packed = sj.pack_for_flashinfer(state, seq_ids)
    q = jnp.zeros((num_layers, 1, HQ, D), DT)
    kk = jnp.zeros((num_layers, 1, 2, HKV, D), DT)

    def build(n):
        def many(kv, packed_):
            plan = attention.plan_decode(cfg, packed_, HQ, backend="flashinfer")
            x = q[0]
            for i in range(n):
                l = i % num_layers
                kv = attention.append_kv(cfg, kv, kk[l], None, packed_, layer=l, plan=plan)
                x = attention.batch_decode(cfg, q[l] + x, kv, packed_, layer=l, plan=plan)
            return kv, x
        return jax.jit(many, donate_argnums=0)

    res["host_per_layer"], _ = time_layers_marginal(build, kv0 + 0, packed)
    log(f"  host time per layer (bs 1, ctx 16): {res['host_per_layer'] * 1e6:.1f} us")
    return res


# ---------------------------------------------------------------------------------------------
# POD


def bench_pod(bs=128, ctx=2048, prefill=2048, n_inner=20):
    import flashinfer
    import torch

    res = {"bs": bs, "ctx": ctx, "prefill": prefill}
    cfg, state, kv = make_decode_problem(bs, ctx, prefill=prefill)
    # slot bs holds the prefill request: all its `prefill` tokens are this step's queries
    packed_d = sj.pack_for_flashinfer(state, jnp.arange(bs, dtype=jnp.int32))
    packed_p = sj.pack_for_flashinfer(state, jnp.asarray([bs], jnp.int32),
                                      jnp.asarray([prefill], jnp.int32), max_tokens=prefill)
    key = jax.random.PRNGKey(5)
    q_d = jax.random.normal(key, (bs, HQ, D), jnp.float32).astype(DT)
    q_p = jax.random.normal(key, (prefill, HQ, D), jnp.float32).astype(DT)
    k_p = jax.random.normal(key, (prefill, HKV, D), jnp.float32).astype(DT)
    v_p = k_p * 0.5
    be = fi("callback")     # POD and batch POD always run as buffer_callbacks

    def pod_build(n):
        def pod_many(q_p, k_p, v_p, q_d, kv, packed_d):
            plan = attention.plan_pod(cfg, packed_d, HQ, backend=be)   # causal prefill part
            for _ in range(n):
                q_p, q_d = attention.pod(cfg, q_p, k_p, v_p, q_d, kv, packed_d, plan=plan)
            return q_p, q_d
        return jax.jit(pod_many)

    def sep_build(n):
        def sep_many(q_p, q_d, kv, packed_p, packed_d):
            plan_p = attention.plan_prefill(cfg, packed_p, HQ, backend=be)   # causal
            plan_d = attention.plan_decode(cfg, packed_d, HQ, backend=be)
            for _ in range(n):
                q_p = attention.batch_prefill(cfg, q_p, kv, packed_p, plan=plan_p)
                q_d = attention.batch_decode(cfg, q_d, kv, packed_d, plan=plan_d)
            return q_p, q_d
        return jax.jit(sep_many)

    def bpod_build(n):
        def bpod_many(q_p, q_d, kv, packed_p, packed_d):
            plan = attention.plan_batch_pod(cfg, packed_p, packed_d, HQ, backend=be)   # causal
            for _ in range(n):
                q_p, q_d = attention.batch_pod(cfg, q_p, packed_p, q_d, packed_d, kv, plan=plan)
            return q_p, q_d
        return jax.jit(bpod_many)

    for bridge in ("callback", "ffi"):
        if bridge == "ffi" and not ffi_available():
            continue
        be = fi(bridge)
        res[f"jax_{bridge}_separate"], _ = time_jax_marginal(
            sep_build, (q_p, q_d, kv, packed_p, packed_d), 5, 25)
        log(f"  jax_{bridge}_separate: {res[f'jax_{bridge}_separate'] * 1e6:.0f} us")
    be = fi("callback")
    res["jax_pod"], _ = time_jax_marginal(pod_build, (q_p, k_p, v_p, q_d, kv, packed_d), 5, 25)
    log(f"  jax_pod: {res['jax_pod'] * 1e6:.0f} us")
    res["jax_batch_pod"], _ = time_jax_marginal(bpod_build, (q_p, q_d, kv, packed_p, packed_d),
                                                5, 25)
    log(f"  jax_batch_pod: {res['jax_batch_pod'] * 1e6:.0f} us")

    # torch: POD wrapper vs single prefill (contiguous K/V) + decode
    kv_t = torch.from_dlpack(kv)
    ws = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    ind = torch.from_dlpack(packed_d.kv_page_indices)
    ipt = torch.from_dlpack(packed_d.kv_page_indptr).cpu()
    lp = torch.from_dlpack(packed_d.kv_last_page_len).cpu()
    pw = flashinfer.PODWithPagedKVCacheWrapper(ws, "NHD")
    pw.plan(ipt, ind, lp, HQ, HKV, D, PS, q_data_type=torch.float16)
    qp_t, kp_t, vp_t = (torch.from_dlpack(x).clone() for x in (q_p, k_p, v_p))
    qd_t = torch.from_dlpack(q_d).clone()
    res["torch_pod"] = time_torch(lambda: pw.run(qp_t, kp_t, vp_t, qd_t, kv_t, causal_p=True),
                                  n_inner)
    dw = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    dw.plan(ipt, ind, lp, HQ, HKV, D, PS, q_data_type=torch.float16)

    def torch_sep():
        flashinfer.single_prefill_with_kv_cache(qp_t, kp_t, vp_t, causal=True, backend="fa2")
        dw.run(qd_t, kv_t)

    res["torch_separate"] = time_torch(torch_sep, n_inner)
    log(f"  torch_pod: {res['torch_pod'] * 1e6:.0f} us, torch_separate: "
        f"{res['torch_separate'] * 1e6:.0f} us")
    # sanity: one POD call against the separate decode (jit) and torch's POD prefill output
    op, od = jax.jit(lambda *a: attention.pod(cfg, *a, backend=be))(
        q_p, k_p, v_p, q_d, kv, packed_d)
    od_ref = jax.jit(lambda q, kv, p: attention.batch_decode(cfg, q, kv, p, backend=be))(
        q_d, kv, packed_d)
    op_t, od_t = pw.run(qp_t, kp_t, vp_t, qd_t, kv_t, causal_p=True)
    res["check_pod_decode_vs_decode"] = float(jnp.max(jnp.abs(od.astype(jnp.float32) -
                                                            od_ref.astype(jnp.float32))))
    res["check_pod_prefill_vs_torch_pod"] = float(
        (torch.from_dlpack(op).float() - op_t.float()).abs().max())
    res["check_pod_decode_vs_torch_pod"] = float(
        (torch.from_dlpack(od).float() - od_t.float()).abs().max())
    # chained POD calls (the pattern the timing uses) against chained decode calls
    _, od5 = pod_build(5)(q_p, k_p, v_p, q_d, kv, packed_d)

    def dec5(q, kv, p):
        plan = attention.plan_decode(cfg, p, HQ, backend=be)
        for _ in range(5):
            q = attention.batch_decode(cfg, q, kv, p, plan=plan)
        return q

    od5_ref = jax.jit(dec5)(q_d, kv, packed_d)
    res["check_pod_chain5_decode_vs_decode_chain5"] = float(
        jnp.max(jnp.abs(od5.astype(jnp.float32) - od5_ref.astype(jnp.float32))))
    log(f"  chained POD x5 vs chained decode x5: max |diff| = "
        f"{res['check_pod_chain5_decode_vs_decode_chain5']:.2e}")
    # POD timing cross-check: one jitted call at a time, then a full device synchronize
    one_pod = jax.jit(lambda *a: attention.pod(cfg, *a, backend=be))
    one_dec = jax.jit(lambda q, kv, p: attention.batch_decode(cfg, q, kv, p, backend=be))
    for name, f, a in (("pod", one_pod, (q_p, k_p, v_p, q_d, kv, packed_d)),
                       ("decode", one_dec, (q_d, kv, packed_d))):
        jax.block_until_ready(f(*a))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            r = f(*a)
        jax.block_until_ready(r)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        res[f"single_call_wall_{name}"] = (t1 - t0) / 10
        res[f"single_call_extra_sync_{name}"] = t2 - t1
        log(f"  one {name} per program: {(t1 - t0) / 10 * 1e6:.0f} us, then device sync "
            f"{(t2 - t1) * 1e6:.0f} us more")
    log(f"  checks: {res['check_pod_decode_vs_decode']:.2e} "
        f"{res['check_pod_prefill_vs_torch_pod']:.2e} {res['check_pod_decode_vs_torch_pod']:.2e}")
    sep = min(v for k, v in res.items() if k.endswith("_separate") and k.startswith("jax_"))
    res["pod_speedup_vs_separate"] = sep / res["jax_pod"]
    res["batch_pod_speedup_vs_separate"] = sep / res["jax_batch_pod"]
    res["torch_pod_speedup_vs_separate"] = res["torch_separate"] / res["torch_pod"]
    return res


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="+", choices=["all", "copy", "kernel", "step", "pod", "layers",
                                                    "host"])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    what = {"copy", "kernel", "step", "pod"} if "all" in args.what else set(args.what)
    import flashinfer
    import torch

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "jax": jax.__version__,
            "torch": torch.__version__, "flashinfer": flashinfer.__version__,
            "python": platform.python_version(),
            "ffi_available": ffi_available(),
            "shapes": {"Hq": HQ, "Hkv": HKV, "D": D, "page_size": PS, "dtype": DT}}
    log(json.dumps(meta))
    results = {"meta": meta}
    if "copy" in what:
        results["copy"] = bench_copy()
    if "kernel" in what:
        log("== kernel")
        results["kernel"] = bench_kernel()
    if "step" in what:
        log("== step")
        results["step"] = bench_step()
    if "pod" in what:
        log("== pod")
        results["pod"] = bench_pod()
    if "layers" in what:
        log("== layers")
        results["layers"] = bench_layers()
    if "host" in what:
        log("== host")
        results["host"] = bench_host()
    name = "_".join(sorted(what))
    path = out_dir / f"bench_{name}.json"
    path.write_text(json.dumps(results, indent=1))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
