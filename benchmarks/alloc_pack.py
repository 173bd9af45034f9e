"""Per-step allocator cost: `allocate_decoding` + `pack_for_flashinfer` for a decode batch.

seqattn_jax runs both as one jitted program on the default JAX device (the CPU here, a GPU on the
GPU machine); seqattn 0.0.2 runs them as Python loops over sequences and pages on the host. Both are
timed in the same run on the same shapes (default: 256 sequences of ~75 pages of 16 tokens) and
printed side by side; results go to benchmarks/results/alloc_pack_<device>.json.

    python benchmarks/alloc_pack.py                  # seqattn_jax, plus seqattn if importable
    pip install --no-deps seqattn==0.0.2 attrs       # the baseline (it imports flashinfer and torch)

Timing: `latency` blocks on every step's result (a step's cost when something waits for it);
`pipelined` issues `--steps` steps back to back and blocks once (how a decode loop runs them);
`in-program` chains steps inside one jitted `lax.scan` and takes the marginal cost per step (what the
step adds to a jitted decode program, without Python's per-dispatch cost).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import seqattn_jax as sj


def bench_seqattn_jax(num_seqs, pages_per_seq, page_size, steps, warmup):
    max_pages = pages_per_seq + (2 * steps + warmup + 16 * (8 + max(steps // 4, 8))) // page_size + 4
    cfg = sj.CacheConfig(num_pages=num_seqs * max_pages, page_size=page_size, num_kv_heads=1,
                         head_dim=8, max_seqs=num_seqs, max_pages_per_seq=max_pages)
    ids = jnp.arange(num_seqs, dtype=jnp.int32)
    rng = np.random.default_rng(0)
    lens = rng.integers((pages_per_seq - 1) * page_size + 1, pages_per_seq * page_size + 1, num_seqs)
    state, status = sj.allocate(sj.init_state(cfg), ids, jnp.asarray(lens, jnp.int32))
    ok = sj.ok(status)
    assert bool(ok.all())

    @jax.jit
    def step(state, seq_ids):
        state, status = sj.allocate_decoding(state, seq_ids)
        ok = sj.ok(status)
        return state, ok, sj.pack_for_flashinfer(state, seq_ids)

    step = jax.jit(step, donate_argnums=0)
    for _ in range(warmup):
        state, ok, packed = step(state, ids)
    jax.block_until_ready(packed)
    lat = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, ok, packed = step(state, ids)
        jax.block_until_ready((state, packed))
        lat.append(time.perf_counter() - t0)
    assert bool(ok.all())
    total_pages = int(packed.kv_page_indptr[-1])  # after warmup + steps, as for seqattn below
    t0 = time.perf_counter()
    for _ in range(steps):
        state, ok, packed = step(state, ids)
    jax.block_until_ready((state, packed))
    pipelined = (time.perf_counter() - t0) / steps

    # In-program: n steps chained in one jitted lax.scan; (T(n2) - T(n1)) / (n2 - n1) is the
    # step's own device cost, without the fixed cost of dispatching a program from Python.
    def inner(st, _):
        st, status = sj.allocate_decoding(st, ids)
        ok = sj.ok(status)
        packed = sj.pack_for_flashinfer(st, ids)
        return st, (ok.all(), packed.kv_page_indptr[-1], packed.kv_page_indices[-1],
                    packed.token_pages[-1])

    def timed(n):
        f = jax.jit(lambda st: jax.lax.scan(inner, st, None, length=n), donate_argnums=0)
        st = state
        st, _ = f(st)  # compile + warm
        jax.block_until_ready(st)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            st, out = f(st)
            jax.block_until_ready((st, out))
            best = min(best, time.perf_counter() - t0)
        assert bool(out[0].all())
        return best, st

    n1, n2 = 8, 8 + max(steps // 4, 8)
    t1, state = timed(n1)
    t2, state = timed(n2)
    marginal = (t2 - t1) / (n2 - n1)
    return {"latency_us": statistics.median(lat) * 1e6, "pipelined_us": pipelined * 1e6,
            "in_program_us": marginal * 1e6, "total_pages": total_pages}


def bench_primitives(num_seqs, pages_per_seq, page_size, steps, warmup):
    """Time the candidate implementations of the allocator's building blocks on this device, at
    this benchmark's sizes (the choices in seqattn_jax/state.py rest on these numbers)."""
    from seqattn_jax import state as st  # noqa: PLC0415

    P = num_seqs * (pages_per_seq + 20)
    rc = jnp.zeros(P, jnp.int32).at[: num_seqs * pages_per_seq].set(1)
    x = jnp.ones(num_seqs, jnp.int32)
    score = P - jnp.arange(P, dtype=jnp.int32)
    cands = {
        # finding free pages by scanning the pool (what the allocator did before its free stack)
        "first_free_nonzero": (lambda r: jnp.nonzero(r == 0, size=num_seqs, fill_value=P)[0], rc),
        "first_free_top_k": (lambda r: jax.lax.top_k(jnp.where(r == 0, score, 0), num_seqs)[1], rc),
        # the per-request running totals
        "cumsum_jnp": (lambda v: jnp.cumsum(v), x),
        "cumsum_masked_sum": (lambda v: jnp.sum(jnp.where(
            jnp.arange(v.shape[0])[None, :] <= jnp.arange(v.shape[0])[:, None], v[None, :], 0),
            axis=1), x),
    }
    out = {}
    for name, (f, arg) in cands.items():
        # Each iteration rolls its input, so XLA cannot hoist the call out of the loop; the roll
        # costs every candidate the same.
        g = jax.jit(lambda a, f=f: jax.lax.scan(lambda c, _: (jnp.roll(c, 1), f(c)), a, None,
                                                length=64)[1])
        jax.block_until_ready(g(arg))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(g(arg))
            best = min(best, time.perf_counter() - t0)
        out[name] = best / 64 * 1e6
    return out


def bench_seqattn(num_seqs, pages_per_seq, page_size, steps, warmup):
    import torch  # noqa: PLC0415
    from seqattn import CacheDescriptor, PagedKVCacheManager  # noqa: PLC0415

    max_pages = pages_per_seq + (steps + warmup) // page_size + 4
    mgr = PagedKVCacheManager(num_pages=num_seqs * max_pages, page_size=page_size, num_heads=1,
                              head_dim=8, dtype=torch.float16, device=torch.device("cpu"))
    desc = CacheDescriptor(mgr)
    ids = list(range(num_seqs))
    rng = np.random.default_rng(0)
    lens = rng.integers((pages_per_seq - 1) * page_size + 1, pages_per_seq * page_size + 1, num_seqs)
    desc.allocate(ids, [int(x) for x in lens])
    for _ in range(warmup):
        desc.allocate_decoding(ids)
        desc.pack_for_flashinfer(ids)
    lat = []
    for _ in range(steps):
        t0 = time.perf_counter()
        desc.allocate_decoding(ids)
        packed = desc.pack_for_flashinfer(ids)
        lat.append(time.perf_counter() - t0)
    return {"latency_us": statistics.median(lat) * 1e6, "total_pages": int(packed.kv_page_indptr[-1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--pages-per-seq", type=int, default=75)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/alloc_pack_<device>.json)")
    args = ap.parse_args()
    dev = jax.devices()[0]
    device = getattr(dev, "device_kind", dev.platform)
    shape = (args.num_seqs, args.pages_per_seq, args.page_size, args.steps, args.warmup)
    prims = bench_primitives(*shape)
    rows = {"seqattn_jax": bench_seqattn_jax(*shape)}
    try:
        rows["seqattn 0.0.2 (host loops)"] = bench_seqattn(*shape)
    except ImportError as e:
        print(f"seqattn baseline not run ({e}); install it with: pip install --no-deps seqattn==0.0.2 attrs")
    print(f"\nallocate_decoding + pack_for_flashinfer, {args.num_seqs} sequences x ~{args.pages_per_seq} "
          f"pages of {args.page_size}; JAX device: {device}; host CPUs: {os.cpu_count()}")
    print(f"{'implementation':<30}{'latency/step':>16}{'pipelined/step':>16}{'in-program/step':>17}"
          f"{'pages packed':>14}")
    for name, r in rows.items():
        pipe = f"{r['pipelined_us']:.1f} us" if "pipelined_us" in r else "-"
        inprog = f"{r['in_program_us']:.1f} us" if "in_program_us" in r else "-"
        print(f"{name:<30}{r['latency_us']:>13.1f} us{pipe:>16}{inprog:>17}{r['total_pages']:>14}")
    print("building blocks, per call inside one program: "
          + ", ".join(f"{k} {v:.1f} us" for k, v in prims.items()))
    if len(rows) == 2:
        a, b = rows["seqattn_jax"], rows["seqattn 0.0.2 (host loops)"]
        print(f"speed-up (latency): {b['latency_us'] / a['latency_us']:.1f}x")
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" /
                       f"alloc_pack_{device.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "jax": jax.__version__, "args": vars(args),
                               "results": rows, "primitives_us": prims}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
