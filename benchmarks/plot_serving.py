"""Plot serve_bench.py's decode rows (JSON files of `serve_decode_<gpu>.json`) into one PNG: per
(shape, batch), the engine's served and device-bound step (each `decode_steps` K measured), torch +
FlashInfer eager and CUDA graph, and the HBM floor.

    python benchmarks/plot_serving.py OUT.png FILE.json [FILE.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(files) -> list[dict]:
    rows = []
    for f in files:
        data = json.loads(Path(f).read_text())
        rows += data if isinstance(data, list) else data.get("decode", [])
    return rows


def bars(rows: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """Group labels and, per series, one value (ms, NaN where absent) per group."""
    groups = sorted({(r["shape"], r["batch"]) for r in rows}, key=lambda g: (g[0], g[1]))
    series: dict[str, list[float]] = {}
    for i, g in enumerate(groups):
        for r in (r for r in rows if (r["shape"], r["batch"]) == g):
            k = r.get("decode_steps", 1)
            vals = {f"served, K={k}": r["served_ms"], f"device-bound, K={k}": r["device_bound_ms"],
                    "HBM floor": r["hbm_floor_ms"]}
            if "torch_graph_ms" in r:
                vals.update({"torch + FlashInfer eager": r["torch_eager_ms"],
                             "torch + FlashInfer CUDA graph": r["torch_graph_ms"]})
            for name, v in vals.items():
                series.setdefault(name, [float("nan")] * len(groups))[i] = v
    return [f"{s}, batch {b}" for s, b in groups], series


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    out, files = Path(argv[0]), argv[1:]
    labels, series = bars(load(files))
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(labels), 4.8))
    width = 0.8 / max(len(series), 1)
    for j, (name, vals) in enumerate(sorted(series.items())):
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
    ax.set_ylabel("ms per decode step (lower is better)")
    ax.set_title("decode step: seqattn_jax engine vs torch + FlashInfer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
