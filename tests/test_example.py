"""examples/decode.py in a small configuration: the paged-vs-dense check passes and the summary adds up
(every request finished, every page free at the end, each step compiled once, nothing compiled while
serving, the pool updated in place, the prefix cache hit)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "decode.py"

SMALL = ["--requests", "10", "--batch", "4", "--chunk", "24", "--page-size", "8", "--num-pages", "40",
         "--prompt-len", "3", "30", "--gen-len", "1", "12", "--prefix-len", "20", "--shared-frac", "0.6",
         "--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
         "--ffn", "128", "--vocab", "256", "--backend", "reference", "--quiet"]


@pytest.fixture(scope="module")
def decode():
    spec = importlib.util.spec_from_file_location("decode_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _check_summary(s, exact=True):
    c = s.cache
    assert s.check is not None and s.check.passed, s.check
    if exact:   # float32: every greedy token identical
        assert s.check.exact == s.check.tokens == s.generated_tokens
    # Every request finished with exactly its number of tokens.
    assert all(r.done and len(r.out) == r.max_new for r in s.requests)
    st = s.stats
    assert st.generated_tokens == s.generated_tokens == sum(r.max_new for r in s.requests)
    assert st.prefill_tokens + st.reused_tokens == s.prompt_tokens
    assert 0 < st.peak_running <= c.max_seqs
    assert st.peak_pages_in_use <= c.num_pages
    # Every page is free at the end (requests released, prefix cache emptied).
    assert s.pages_in_use_at_end == 0
    # Fixed shapes: each step traced once, nothing compiled while serving; the pool never moved.
    assert s.traces and all(n == 1 for n in s.traces.values()), s.traces
    assert s.compiles_serving == []
    assert s.kv_in_place


def test_example_small_with_prefix_cache(decode):
    s = decode.run(SMALL)
    _check_summary(s)
    assert s.stats.steps["mixed"] > 0       # prefill chunks ran beside decode batches
    pcs = s.prefix_cache
    assert pcs is not None and pcs.requests == len(s.requests)
    assert pcs.hits > 0 and pcs.cached_tokens == s.stats.reused_tokens > 0
    assert pcs.cached_tokens % s.cache.page_size == 0
    # The table renders (rich) with the numbers in it.
    from rich.console import Console
    console = Console(record=True, width=120)
    decode.report(s, console=console)
    text = console.export_text()
    for word in ("paged = dense", "PASS", "prefix cache", "KV pages", "tok/s", "mixed"):
        assert word in text


@pytest.mark.slow
def test_example_modes_without_prefix_cache_and_exit_codes(decode, monkeypatch):
    argv = SMALL + ["--no-prefix-cache", "--seed", "1", "--no-mixed", "--sync"]
    s = decode.run(argv)
    _check_summary(s)
    assert s.prefix_cache is None and s.stats.reused_tokens == 0
    assert s.stats.steps["mixed"] == 0 and s.stats.mirror_reads == 0
    # main() exits 0 when the check passes, 1 when it fails.
    monkeypatch.setattr(decode, "run", lambda argv: s)
    assert decode.main(argv) == 0
    bad = decode.CheckResult(tokens=10, exact=9, near_ties=0, failures=1, tol=1e-3, worst_margin=0.5)
    monkeypatch.setattr(decode, "run", lambda argv: decode.dataclasses.replace(s, check=bad))
    assert decode.main(argv) == 1


def test_script_help_and_bad_options():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr
    for opt in ("--requests", "--batch", "--chunk", "--page-size", "--num-pages", "--backend", "--dtype",
                "--prefix-len", "--no-prefix-cache", "--no-mixed", "--sync", "--no-check", "--tol",
                "--quiet"):
        assert opt in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT), "--heads", "3", "--kv-heads", "2"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert res.returncode == 2 and "--heads" in res.stderr


@pytest.mark.slow
def test_example_flashinfer_path_through_the_bridge_torch_kernels(decode):
    """The FlashInfer backend's code path (host plans for prefill, decode and batch POD adopted in
    the step, buffer_callback kernels, the aliased donated pool) on CPU: the bridge's torch kernels
    stand in for FlashInfer's CUDA ones, as in tests/test_bridge_cpu.py."""
    pytest.importorskip("torch", reason="the bridge's CPU mechanics need torch (pip install torch)")
    from seqattn_jax import bridge
    be = bridge.FlashInferBackend(provider="torch")
    argv = [a for a in SMALL if a not in ("--backend", "reference")]
    argv[argv.index("--head-dim") + 1] = "64"  # a FlashInfer head_dim
    s = decode.run(argv + ["--dtype", "float16"], backend=be)
    assert s.backend == "flashinfer" and s.dtype == "float16"
    _check_summary(s, exact=False)
    assert s.stats.steps["mixed"] > 0
