"""GPU smoke test of the FlashInfer bridge (run on the GPU machine; prints a short report).

    python benchmarks/gpu_smoke.py

Checks decode (tensor-core and CUDA-core), prefill and append through `jax.jit` against the pure-JAX
reference, with padding requests and NaN-poisoned free pages; what FlashInfer writes for requests
without pages; in-place append under donation; and times a 32-layer decode step (buffer_callback)
against the same FlashInfer calls from torch eager.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import seqattn_jax as sj
from seqattn_jax import attention, reference
from seqattn_jax.backend import flashinfer_available
from seqattn_jax.options import AttentionOptions as O


def report(name, ok, extra=""):
    print(f"[{'OK' if ok else 'FAIL'}] {name} {extra}", flush=True)
    return ok


def make_batch(cfg, lens, seq_ids, rng, new_lens=None, max_tokens=None):
    st = sj.init_state(cfg)
    ids = jnp.arange(len(lens), dtype=jnp.int32)
    # allocate in random page order: take pages out of order by allocating a dummy first
    st, status = sj.allocate(st, ids, jnp.asarray(lens, jnp.int32))
    ok = sj.ok(status)
    assert bool(ok.all())
    packed = sj.pack_for_flashinfer(st, jnp.asarray(seq_ids, jnp.int32),
                                    None if new_lens is None else jnp.asarray(new_lens, jnp.int32),
                                    max_tokens=max_tokens)
    return st, packed


def poisoned_pool(cfg, st, rng):
    pool = rng.standard_normal(cfg.kv_shape).astype(np.float32) * 0.5
    used = np.zeros(cfg.num_pages, bool)
    pt = np.asarray(st.page_table)
    used[pt[pt >= 0]] = True
    for layer in range(cfg.num_layers):
        pool[layer * cfg.num_pages + np.nonzero(~used)[0]] = np.nan
    return jnp.asarray(pool, cfg.jnp_dtype)


def maxerr(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    return float(np.nanmax(np.abs(a - b))), bool(np.isfinite(a).all())


def main():
    import flashinfer
    import torch

    print("jax", jax.__version__, jax.devices(), "torch", torch.__version__, "flashinfer",
          flashinfer.__version__, torch.cuda.get_device_name(), flush=True)
    print("flashinfer_available:", flashinfer_available(), flush=True)
    rng = np.random.default_rng(0)
    ok_all = True
    for layout in ("NHD", "HND"):
        cfg = sj.CacheConfig(num_pages=256, page_size=16, num_kv_heads=8, head_dim=128, max_seqs=8,
                             max_pages_per_seq=16, num_layers=2, dtype="float16", kv_layout=layout)
        lens = [37, 100, 1, 250, 16, 17]
        seq_ids = [0, 1, -1, 2, 3, 4, 5, -1]
        st, packed = make_batch(cfg, lens, seq_ids, rng)
        kv = poisoned_pool(cfg, st, rng)
        q = jnp.asarray(rng.standard_normal((8, 32, 128)), jnp.float16)
        for kernel in ("tensor_core", "cuda_core"):
            for layer in (0, 1):
                t0 = time.time()
                f = jax.jit(lambda q, kv, p, layer=layer: attention.batch_decode(
                    cfg, q, kv, p, layer=layer, backend="flashinfer",
                    options=O(return_lse=True, decode_kernel=kernel)))
                out, lse = f(q, kv, packed)
                out.block_until_ready()
                dt = time.time() - t0
                r, rl = reference.batch_decode(cfg, q, kv, packed, layer=layer, return_lse=True)
                e, fin = maxerr(out, r)
                le, _ = maxerr(jnp.where(jnp.isinf(rl), 0, lse), jnp.where(jnp.isinf(rl), 0, rl))
                pad = np.asarray(out[np.array([2, 7])], np.float32)
                ok_all &= report(f"decode {layout} {kernel} L{layer}",
                                 e < 2e-2 and le < 1e-2 and fin and (pad == 0).all() and
                                 np.isinf(np.asarray(lse[np.array([2, 7])])).all(),
                                 f"err={e:.2e} lse_err={le:.2e} finite={fin} ({dt:.1f}s)")

    # What FlashInfer writes for a request without pages (the bridge has no fix-up: it relies on
    # the kernels writing 0 / -inf there)
    cfg = sj.CacheConfig(num_pages=64, page_size=16, num_kv_heads=8, head_dim=128, max_seqs=4,
                         max_pages_per_seq=8, num_layers=1, dtype="float16")
    st, packed = make_batch(cfg, [20, 5], [0, -1, 1, -1], rng)
    kv = poisoned_pool(cfg, st, rng)
    q = jnp.asarray(rng.standard_normal((4, 32, 128)), jnp.float16)
    for kernel in ("tensor_core", "cuda_core"):
        out, lse = jax.jit(lambda q, kv, p: attention.batch_decode(
            cfg, q, kv, p, backend="flashinfer",
            options=O(return_lse=True, decode_kernel=kernel)))(q, kv, packed)
        top = float(jnp.abs(out[1].astype(jnp.float32)).max())
        ok_all &= report(f"FlashInfer writes 0 / -inf for a request without pages ({kernel})",
                         top == 0 and np.isinf(np.asarray(lse[1])).all(),
                         f"out max|.|={top} lse={np.asarray(lse[1, :4])}")

    # Prefill (causal and not), padding rows, HND
    for layout in ("NHD", "HND"):
        cfg = sj.CacheConfig(num_pages=256, page_size=16, num_kv_heads=8, head_dim=128, max_seqs=8,
                             max_pages_per_seq=16, num_layers=2, dtype="float16", kv_layout=layout)
        st, packed = make_batch(cfg, [37, 100, 64, 5], [0, -1, 1, 2, 3], rng,
                                new_lens=[10, 0, 37, 64, 5], max_tokens=128)
        kv = poisoned_pool(cfg, st, rng)
        q = jnp.asarray(rng.standard_normal((128, 32, 128)), jnp.float16)
        for causal in (True, False):
            out, lse = jax.jit(lambda q, kv, p: attention.batch_prefill(
                cfg, q, kv, p, layer=1, backend="flashinfer",
                options=O(causal=causal, return_lse=True)))(
                q, kv, packed)
            r, rl = reference.batch_prefill(cfg, q, kv, packed, layer=1, causal=causal,
                                            return_lse=True)
            e, fin = maxerr(out, r)
            ok_all &= report(f"prefill {layout} causal={causal}", e < 2e-2 and fin,
                             f"err={e:.2e} finite={fin} pad_zero={bool((out[116:] == 0).all())}")

    # append: FlashInfer kernel in place vs the JAX scatter
    cfg = sj.CacheConfig(num_pages=256, page_size=16, num_kv_heads=8, head_dim=128, max_seqs=8,
                         max_pages_per_seq=16, num_layers=2, dtype="float16")
    st, packed = make_batch(cfg, [37, 100, 64, 5], [0, -1, 1, 2], rng)
    kv = jnp.asarray(rng.standard_normal(cfg.kv_shape), jnp.float16)
    keys = jnp.asarray(rng.standard_normal((4, 8, 128)), jnp.float16)
    vals = jnp.asarray(rng.standard_normal((4, 8, 128)), jnp.float16)
    ref_kv = sj.append_kv(cfg, kv, keys, vals, packed, layer=1)

    def ap(kv, keys, vals, packed):
        plan = attention.plan_decode(cfg, packed, 32, backend="flashinfer")
        return attention.append_kv(cfg, kv, keys, vals, packed, layer=1, plan=plan,
                                   impl="backend")

    apj = jax.jit(ap, donate_argnums=0)
    kv2 = kv + 0
    kv2.block_until_ready()
    p0 = kv2.unsafe_buffer_pointer()
    out = apj(kv2, keys, vals, packed)
    ok_all &= report("append flashinfer in place", out.unsafe_buffer_pointer() == p0 and
                     bool(jnp.array_equal(out, ref_kv)))

    print("ALL OK" if ok_all else "SOME FAILED", flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
