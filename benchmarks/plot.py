"""Plot benchmarks/results/bench_h200.json (from bench.py) into benchmarks/results/bench_h200.png.

    python benchmarks/plot.py [results.json] [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(src=HERE / "results" / "bench_h200.json", dst=None):
    src = Path(src)
    dst = Path(dst) if dst else src.with_suffix(".png")
    r = json.loads(src.read_text())
    gpu = r["meta"]["gpu"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [2.2, 1.4, 1]})

    # kernel: TB/s of KV read
    ax = axes[0]
    names = [("torch_tc", "FlashInfer TC (torch)"), ("jax_ffi_tc", "seqattn_jax TC, FFI (jit)"),
             ("jax_callback_tc", "seqattn_jax TC, callback (jit)"),
             ("torch_cuda_core", "FlashInfer CUDA-core (torch)"),
             ("jax_ffi_cuda_core", "seqattn_jax CUDA-core, FFI (jit)"),
             ("pallas", "Pallas paged_attention"), ("xla_gather", "XLA gather + einsum")]
    rows = r["kernel"]
    w = 0.8 / len(names)
    for i, (k, label) in enumerate(names):
        ys = [row["kv_bytes"] / row[k] / 1e12 if row.get(k) else 0 for row in rows]
        ax.bar([j + i * w for j in range(len(rows))], ys, w, label=label)
    if "copy" in r:
        ax.axhline(r["copy"]["copy_tb_s"], color="k", ls="--", lw=1,
                   label=f"D2D copy {r['copy']['copy_tb_s']:.2f} TB/s")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"bs={row['bs']}, ctx={row['ctx']}" for row in rows])
    ax.set_ylabel("KV read bandwidth (TB/s)")
    ax.set_title("decode kernel (Hq=32, Hkv=8, D=128, page 16, fp16)")
    ax.set_ylim(0, 6.2)
    ax.legend(fontsize=7, loc="upper left", ncol=3)

    # 32-layer step
    ax = axes[1]
    s = r["step"]
    items = [("torch_eager", "torch eager"), ("torch_cuda_graph", "torch CUDA graph"),
             ("jax_ffi_loop_scatter_append_stacked_host_plan", "jit FFI, loop, host plan, KV stacked"),
             ("jax_ffi_scan_scatter_append_stacked_host_plan", "jit FFI, scan, host plan, KV stacked"),
             ("jax_ffi_loop_scatter_append_host_plan", "jit FFI, loop, host plan"),
             ("jax_ffi_scan_scatter_append_host_plan", "jit FFI, scan, host plan"),
             ("jax_ffi_loop_scatter_append_device_plan", "jit FFI, loop, device plan"),
             ("jax_ffi_scan_scatter_append_device_plan", "jit FFI, scan, device plan"),
             ("jax_ffi_loop_flashinfer_append_device_plan", "jit FFI, loop, FI append"),
             ("jax_callback_loop_scatter_append_host_plan", "jit callback, loop, host plan"),
             ("jax_callback_loop_scatter_append_device_plan", "jit callback, loop, device plan")]
    items = [(k, lbl) for k, lbl in items if k in s]
    vals = [s[k] * 1e3 for k, _ in items]
    ax.barh(range(len(items)), vals, color=["C0", "C0"] + ["C1"] * (len(items) - 2))
    ax.axvline(s["torch_eager"] * 1e3 * 1.10, color="k", ls="--", lw=1, label="1.10 x torch eager")
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([lbl for _, lbl in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    ax.set_title(f"32-layer decode step (bs={s['bs']}, ctx={s['ctx']}); jit includes "
                 f"allocate+pack+plan", fontsize=9)
    ax.legend(fontsize=7)

    # POD
    ax = axes[2]
    p = r["pod"]
    items = [("torch_separate", "torch separate"), ("torch_pod", "torch POD"),
             ("jax_callback_separate", "jit separate"), ("jax_pod", "jit POD"),
             ("jax_batch_pod", "jit batch POD")]
    ax.bar(range(len(items)), [p[k] * 1e6 for k, _ in items],
           color=["C0", "C0", "C1", "C1", "C1"])
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels([lbl for _, lbl in items], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("us per call")
    ax.set_title(f"POD (bs={p['bs']}, ctx={p['ctx']}, prefill {p['prefill']})", fontsize=9)

    fig.suptitle(f"seqattn_jax FlashInfer bridge on {gpu} (jax {r['meta']['jax']}, "
                 f"flashinfer {r['meta']['flashinfer']})")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:])
