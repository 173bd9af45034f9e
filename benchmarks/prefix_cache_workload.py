"""Prefix-cache figures on the random serving workload of tests/test_prefix_cache.py (CPU, allocator
only): hit rate and prefill tokens saved over >= 10k requests drawn from a few shared system
prompts (plus a fraction of one-off prompts), under memory pressure (LRU eviction, preemption).

    python benchmarks/prefix_cache_workload.py [--requests 10000] [--seeds 0 1 2] [--check]

Prints one line per configuration and writes benchmarks/results/prefix_cache_workload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_prefix_cache import WCFG, run_workload  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--check", action="store_true", help="check every invariant at every step (slower)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prefix_cache_workload.json"))
    a = p.parse_args()
    print(f"pool: {WCFG.num_pages} pages x {WCFG.page_size} tokens, {WCFG.max_seqs} slots, "
          f"max {WCFG.max_seq_len} tokens/seq; admission batch 8; {a.requests} requests per run")
    rows = []
    for unique in (0.0, 0.1, 0.5):
        for nprompts in (2, 4, 8):
            for seed in a.seeds:
                r = run_workload(a.requests, seed=seed, unique_frac=unique, num_prompts=nprompts,
                                 check=a.check)
                s = r.stats
                row = dict(seed=seed, unique_frac=unique, num_system_prompts=nprompts,
                           requests=r.requests, admissions=s.requests, hit_rate=s.hit_rate,
                           prompt_tokens=s.prompt_tokens, prefill_tokens_saved=s.cached_tokens,
                           token_hit_rate=s.token_hit_rate,
                           unbounded_cache_tokens_saved=r.ideal_saved_tokens,
                           inserted_pages=s.inserted_pages,
                           evicted_pages=s.evicted_pages, duplicate_pages=s.duplicate_pages,
                           peak_cached_pages=r.peak_cached_pages, preempted=r.preempted,
                           failed_admission_batches=r.failed_batches, steps=r.steps,
                           seconds=round(r.seconds, 2))
                rows.append(row)
                print(f"unique {unique:.1f} prompts {nprompts} seed {seed}: hit rate {s.hit_rate:.3f}, "
                      f"prefill tokens saved {s.cached_tokens}/{s.prompt_tokens} "
                      f"({s.token_hit_rate:.3f}; unbounded cache {r.ideal_saved_tokens}), "
                      f"evicted {s.evicted_pages} pages, "
                      f"preempted {r.preempted}, {r.seconds:.1f}s", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(config=repr(WCFG), rows=rows), f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
