"""Which FlashInfer decode kernel and plan serve the engine's decode shapes best (torch + FlashInfer
alone, no JAX): one decode attention call of one layer, timed with CUDA events over many calls.

    python3 benchmarks/decode_kernel_probe.py [--json out.json]

Shapes (batch, ctx, q heads, kv heads, head_dim; fp16, page 16, NHD pages like the engine's pool):
the README GPU example's model at batch 64 / 256 (ctx 320), the 1.2B shape at batch 64 / 256
(ctx 1024), the 8B shape on one GPU and one GPU's half on two (batch 64, ctx 1024).

Variants per shape: the tensor-core kernel (FlashInfer's FA2 prefill kernel, one query row per
request) and the CUDA-core decode kernel, each planned normally and in CUDA-graph mode (what the
engine's static host plans use: the plan depends only on the batch's shape), and the tensor-core
kernel in CUDA-graph mode with `disable_split_kv=True` (no partial outputs, no merge kernel).
TB/s counts the KV bytes read once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import time_torch  # noqa: E402  (benchmarks/bench.py: CUDA events over n calls, median)

from seqattn_jax.bridge.backend import CUDA_CORE_GROUP_SIZES  # noqa: E402  (the kernel's DISPATCH_GQA)

SHAPES = {
    "small_b64": (64, 320, 16, 4, 128),
    "small_b256": (256, 320, 16, 4, 128),
    "1b_b64": (64, 1024, 32, 8, 64),
    "1b_b256": (256, 1024, 32, 8, 64),
    "8b_tp1_b64": (64, 1024, 32, 8, 128),
    "8b_tp2_b64": (64, 1024, 16, 4, 128),
}
PS = 16


def probe(name, shape, n=100, reps=5):
    import flashinfer
    import torch

    B, ctx, hq, hkv, d = shape
    dev = torch.device("cuda")
    pages_per = -(-ctx // PS)
    num_pages = B * pages_per
    torch.manual_seed(0)
    kv = torch.randn(num_pages, 2, PS, hkv, d, dtype=torch.float16, device=dev)
    # pages of a request scattered over the pool, like an allocator's after churn
    perm = torch.randperm(num_pages, device=dev).int()
    indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * pages_per
    lpl = torch.full((B,), ctx - (pages_per - 1) * PS, dtype=torch.int32, device=dev)
    q = torch.randn(B, hq, d, dtype=torch.float16, device=dev)
    out = torch.empty_like(q)
    kv_bytes = B * ctx * hkv * d * 2 * 2
    res = {"shape": name, "batch": B, "ctx": ctx, "hq": hq, "hkv": hkv, "head_dim": d,
           "kv_bytes": kv_bytes}
    variants = [("tc", True, False, False), ("tc_graph", True, True, False),
                ("tc_graph_nosplit", True, True, True), ("tc_nosplit", True, False, True),
                ("cuda_core", False, False, False), ("cuda_core_graph", False, True, False)]
    for vname, tc, graph, nosplit in variants:
        if not tc and hq // hkv not in CUDA_CORE_GROUP_SIZES:
            continue
        try:
            ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
            kw = {}
            if graph:
                kw = dict(use_cuda_graph=True, paged_kv_indptr_buffer=indptr.clone(),
                          paged_kv_indices_buffer=perm.clone(),
                          paged_kv_last_page_len_buffer=lpl.clone())
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc, **kw)
            pkw = dict(disable_split_kv=True) if nosplit else {}
            w.plan(indptr, perm, lpl, hq, hkv, d, PS, q_data_type=torch.float16,
                   kv_data_type=torch.float16, **pkw)
            us = time_torch(lambda: w.run(q, kv, out=out), n, reps) * 1e6
            res[vname] = round(us, 2)
            res[vname + "_tb_s"] = round(kv_bytes / us / 1e6, 2)
            del w, ws
        except Exception as exc:  # noqa: BLE001 - a variant FlashInfer refuses is reported, not fatal
            res[vname] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for s in a.shapes:
        r = probe(s, SHAPES[s])
        rows.append(r)
        print(json.dumps(r), flush=True)
    keys = ["tc", "tc_graph", "tc_graph_nosplit", "tc_nosplit", "cuda_core", "cuda_core_graph"]
    print(f"\n{'shape':12} " + " ".join(f"{k:>16}" for k in keys) + "   (us per call; TB/s of KV)")
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:7.1f} ({r[k + '_tb_s']:4.2f})" if isinstance(v, float) else
                         f"{'-' if v is None else 'error':>16}")
        print(f"{r['shape']:12} " + " ".join(f"{c:>16}" for c in cells))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
