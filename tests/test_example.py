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


def _check_summary(s, argv):
    c = s.cache
    # Paged == dense: every greedy token identical in float32.
    assert s.check is not None and s.check.passed
    assert s.check.exact == s.check.tokens == s.generated_tokens
    assert s.check.max_logit_err < 1e-3
    # Every request finished with exactly its number of tokens; lengths match the config.
    assert all(r.done and len(r.out) == r.max_new and r.finished_at >= r.admitted_at >= 0
               for r in s.requests)
    assert s.generated_tokens == sum(r.max_new for r in s.requests)
    st = s.stats
    assert st.first_tokens == len(s.requests)  # each prompt's last prefill row gave one token
    assert st.decode_tokens + st.first_tokens == s.generated_tokens
    assert st.prefill_tokens + st.tokens_reused == s.prompt_tokens
    assert 0 < st.peak_active <= c.max_seqs
    assert st.peak_held <= st.peak_in_use <= c.num_pages
    assert st.peak_held < s.padded_dense_pages
    # Every page is free at the end (requests released, prefix cache emptied).
    assert s.free_pages_at_end == c.num_pages
    # Fixed shapes: each step traced once, nothing compiled while serving; the pool never moved.
    assert s.traces and all(n == 1 for n in s.traces.values()), s.traces
    assert s.compiles_serving == []
    assert s.kv_in_place


def test_example_small_with_prefix_cache(decode):
    s = decode.run(SMALL)
    _check_summary(s, SMALL)
    assert s.traces == {"prefill_step": 1, "decode_step": 1}
    pcs = s.prefix_cache
    assert pcs is not None and pcs.requests == len(s.requests)
    assert pcs.hits > 0 and pcs.cached_tokens == s.stats.tokens_reused > 0
    assert pcs.cached_tokens % s.cache.page_size == 0
    # Requests sharing the prefix got at least the prefix's full pages.
    reused = [r.reused for r in s.requests if r.reused]
    assert min(reused) >= 20 // 8 * 8
    # The table renders (rich) with the numbers in it.
    from rich.console import Console
    console = Console(record=True, width=120)
    decode.report(s, console=console)
    text = console.export_text()
    for word in ("paged = dense", "PASS", "prefix cache", "KV pages", "tok/s"):
        assert word in text


def test_example_small_without_prefix_cache_and_exit_codes(decode, monkeypatch):
    argv = SMALL + ["--no-prefix-cache", "--seed", "1"]
    s = decode.run(argv)
    _check_summary(s, argv)
    assert s.prefix_cache is None and s.stats.tokens_reused == 0
    assert s.traces == {"prefill_step": 1, "decode_step": 1, "allocate": 1, "release": 1}
    # main() exits 0 when the check passes, 1 when it fails.
    monkeypatch.setattr(decode, "run", lambda argv: s)
    assert decode.main(argv) == 0
    bad = decode.CheckResult(tokens=10, exact=9, near_ties=0, failures=1, tol=1e-3, max_logit_err=0.5,
                             worst_margin=0.5)
    monkeypatch.setattr(decode, "run", lambda argv: decode.dataclasses.replace(s, check=bad))
    assert decode.main(argv) == 1


def test_script_help_and_bad_options():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr
    for opt in ("--requests", "--batch", "--chunk", "--page-size", "--num-pages", "--backend", "--dtype",
                "--prefix-len", "--no-prefix-cache", "--no-check", "--tol", "--quiet"):
        assert opt in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT), "--heads", "3", "--kv-heads", "2"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert res.returncode == 2 and "--heads" in res.stderr


def test_example_flashinfer_path_through_the_bridge_torch_kernels(decode, monkeypatch):
    """The `--backend auto|flashinfer` code path (plans once per step shared by the layer scan,
    buffer_callback kernels, the aliased donated pool) on CPU: the bridge's torch kernels stand in
    for FlashInfer's CUDA ones, as in tests/test_bridge_cpu.py."""
    pytest.importorskip("torch", reason="the FlashInfer code path on CPU runs the bridge's torch kernels "
                        "(CPU torch; .ci/run installs it)")
    from seqattn_jax import attention
    if not hasattr(attention, "_PROVIDER"):
        pytest.skip("seqattn_jax.attention has no torch provider switch")
    monkeypatch.setattr(attention, "_PROVIDER", "torch")
    monkeypatch.setattr(attention, "flashinfer_available", lambda: True)
    argv = [a for a in SMALL if a not in ("--backend", "reference")]
    argv[argv.index("--head-dim") + 1] = "64"  # a FlashInfer head_dim
    s = decode.run(argv + ["--backend", "auto"])
    assert s.backend == "flashinfer" and s.dtype == "float16"
    _check_summary_fp16(s)


def _check_summary_fp16(s):
    assert s.check is not None and s.check.passed, s.check
    assert s.check.failures == 0 and s.check.max_logit_err < 0.05
    assert all(r.done for r in s.requests)
    assert s.free_pages_at_end == s.cache.num_pages
    assert s.traces == {"prefill_step": 1, "decode_step": 1}
    assert s.compiles_serving == []
    assert s.kv_in_place
