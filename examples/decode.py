#!/usr/bin/env python
"""Serve a stream of requests with a seeded Llama-style model through `seqattn_jax.serving.Engine`,
then check every token against a dense, cache-free run of the same model.

    python examples/decode.py              # CPU: reference backend; CUDA GPU + FlashInfer: FlashInfer
    python examples/decode.py --help

What happens:
  * A seeded Llama-style decoder (`seqattn_jax.models.llama`: RMSNorm, RoPE, GQA, SwiGLU; weights
    drawn from --seed in the compute dtype) and a queue of requests with prompts of different
    lengths; some start with one common "system prompt".
  * The library's serving engine does the rest: continuous batching over --batch slots, prompts
    prefilled in chunks of up to --chunk rows, a prefill chunk and the decode batch fused into one
    forward (batch POD) when both have work, the prefix cache sharing the common prompt's pages, the
    host one step behind the GPU (tokens fed back on the device), decode steps planned on the host.
    Every step program is compiled during a warm-up; serving compiles nothing.
  * Correctness: the greedy tokens are compared with a dense implementation of the same model (plain
    causal attention over whole sequences in float32, no cache). The script exits 1 if they differ
    (beyond near-ties of the dense logits when the model runs in float16/bfloat16).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import runpy
import sys
import time

# JAX must not take the whole GPU: FlashInfer's workspaces are allocated by torch next to it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# XLA's command buffers (CUDA graphs) around FlashInfer's calls too: XLA reads XLA_FLAGS as jaxlib
# loads, so set them before `import jax`, running seqattn_jax/xla_flags.py without the package
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "seqattn_jax",
                            "xla_flags.py"))["use_command_buffers"]()

if __package__ in (None, ""):  # `python examples/decode.py` from a checkout: make the repo importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import seqattn_jax as sj  # noqa: E402
from seqattn_jax.backend import resolve_backend  # noqa: E402
from seqattn_jax.models.llama import LlamaConfig, LlamaModel, init_params  # noqa: E402
from seqattn_jax.serving import Engine, EngineConfig, SamplingParams  # noqa: E402

# Largest dense-logit margin (top-1 minus the logit of the served token) at which a differing greedy
# token is accepted as a rounding near-tie, per compute dtype. float32 should match exactly.
DEFAULT_TOL = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.25}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="examples/decode.py",
        description="Continuous-batching greedy decoding of a seeded Llama-style model with "
                    "seqattn_jax's serving engine on a paged KV cache, checked against a dense, "
                    "cache-free run of the same model. Shows a progress bar while serving, then a "
                    "table: requests, tokens, tokens/s, steps by kind, KV pages used against a padded "
                    "dense cache, prefix-cache hits, compilations, and the paged-vs-dense verdict.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Exit status: 0 when the paged tokens equal the dense ones, 1 when they do not, "
               "2 for bad options.")
    g = p.add_argument_group("workload")
    g.add_argument("--requests", type=int, default=32, help="number of requests in the stream")
    g.add_argument("--prompt-len", type=int, nargs=2, default=(8, 80), metavar=("MIN", "MAX"),
                   help="length range of each request's own prompt tokens (after any shared prefix)")
    g.add_argument("--gen-len", type=int, nargs=2, default=(4, 40), metavar=("MIN", "MAX"),
                   help="range of tokens to generate per request (each stops at its own length)")
    g.add_argument("--prefix-len", type=int, default=40,
                   help="length of the common prompt prefix (a 'system prompt'); the prefix cache "
                        "shares its full pages between requests. 0: no common prefix")
    g.add_argument("--shared-frac", type=float, default=0.5,
                   help="fraction of requests whose prompt starts with the common prefix")
    g.add_argument("--seed", type=int, default=0, help="seed for the weights and the requests")
    g = p.add_argument_group("serving")
    g.add_argument("--batch", type=int, default=8,
                   help="sequence slots: the most requests in flight (decode step batch size)")
    g.add_argument("--chunk", type=int, default=64,
                   help="token rows of one prefill chunk; longer prompts are prefilled over several "
                        "steps and short ones share a chunk")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--num-pages", type=int, default=64,
                   help="pages in the KV pool (each page holds --page-size tokens of every layer); a "
                        "request is admitted once the pages for its whole length are free or evictable")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="turn off the automatic prefix cache (every prompt is prefilled in full)")
    g.add_argument("--no-mixed", action="store_true",
                   help="run prefill chunks and decode batches as separate forwards (no batch POD)")
    g.add_argument("--decode-steps", type=int, default=4, metavar="K",
                   help="decode steps per dispatch while only decode work runs (multi-step decode: "
                        "K forwards in one program, tokens fed back on the device)")
    g.add_argument("--sync", action="store_true",
                   help="read each step's tokens before dispatching the next (no one-step lag)")
    g.add_argument("--backend", choices=("auto", "reference", "flashinfer"), default="auto",
                   help="attention backend: 'auto' = FlashInfer on a CUDA GPU where it imports, "
                        "else the pure-JAX reference")
    g.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                   help="FlashInfer: static host plans, so XLA can capture each decode / prefill "
                        "step's attention calls in CUDA graphs (FlashInferBackend(cuda_graphs=...))")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="compute, weight and KV pool dtype; 'auto' = float32 with the reference "
                        "backend, float16 with FlashInfer")
    g = p.add_argument_group("model (weights come from --seed; nothing is downloaded)")
    g.add_argument("--layers", type=int, default=4, help="decoder layers")
    g.add_argument("--d-model", type=int, default=256, help="hidden size")
    g.add_argument("--heads", type=int, default=4, help="query heads")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA: divides --heads)")
    g.add_argument("--head-dim", type=int, default=64, help="size of one head (FlashInfer: 64, 128 or 256)")
    g.add_argument("--ffn", type=int, default=512, help="SwiGLU hidden size")
    g.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    g = p.add_argument_group("check and output")
    g.add_argument("--no-check", action="store_true", help="skip the paged-vs-dense comparison")
    g.add_argument("--tol", type=float, default=None,
                   help="the check accepts a token that differs from the dense model's only where the "
                        "dense top-1 logit beats the served token's logit by at most this much (a "
                        "rounding near-tie); any other difference fails the run. Default by dtype: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOL.items()))
    g.add_argument("--quiet", action="store_true",
                   help="no progress bar and no table, only the final OK / FAILED line")
    return p


def _check_args(p: argparse.ArgumentParser, a) -> None:
    for name in ("requests", "batch", "chunk", "page_size", "num_pages", "layers", "d_model", "heads",
                 "kv_heads", "head_dim", "ffn", "vocab", "decode_steps"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not (1 <= a.prompt_len[0] <= a.prompt_len[1]):
        p.error("--prompt-len needs 1 <= MIN <= MAX")
    if not (1 <= a.gen_len[0] <= a.gen_len[1]):
        p.error("--gen-len needs 1 <= MIN <= MAX")
    if a.prefix_len < 0 or not 0.0 <= a.shared_frac <= 1.0:
        p.error("--prefix-len must be >= 0 and --shared-frac in [0, 1]")
    if a.heads % a.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    if a.head_dim % 2:
        p.error("--head-dim must be even (RoPE)")


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Request:
    rid: int
    prompt: np.ndarray  # int32 [prompt_len]
    max_new: int
    has_prefix: bool  # the prompt starts with the common prefix
    out: list = dataclasses.field(default_factory=list)  # generated tokens

    @property
    def final_len(self) -> int:
        """KV length at the end (the last generated token is never fed back)."""
        return len(self.prompt) + self.max_new - 1

    @property
    def done(self) -> bool:
        return len(self.out) >= self.max_new


def make_requests(a, rng: np.random.Generator) -> list[Request]:
    prefix = rng.integers(0, a.vocab, size=a.prefix_len, dtype=np.int32)
    n_shared = int(round(a.shared_frac * a.requests)) if a.prefix_len else 0
    shared = np.zeros(a.requests, bool)
    shared[rng.choice(a.requests, size=n_shared, replace=False)] = True
    reqs = []
    for i in range(a.requests):
        own = rng.integers(0, a.vocab, size=int(rng.integers(a.prompt_len[0], a.prompt_len[1] + 1)),
                           dtype=np.int32)
        prompt = np.concatenate([prefix, own]) if shared[i] else own
        reqs.append(Request(i, prompt.astype(np.int32), int(rng.integers(a.gen_len[0], a.gen_len[1] + 1)),
                            bool(shared[i])))
    return reqs


# ---------------------------------------------------------------------------------------------
# XLA compilations, counted through jax.monitoring (one listener for the process)
# ---------------------------------------------------------------------------------------------

_COMPILES: list[str] = []


def _on_event(event: str, duration: float, **kw) -> None:
    if event.endswith("backend_compile_duration"):
        _COMPILES.append(str(kw.get("fun_name", "?")))


jax.monitoring.register_event_duration_secs_listener(_on_event)


# ---------------------------------------------------------------------------------------------
# The dense check
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CheckResult:
    tokens: int
    exact: int
    near_ties: int  # differing tokens accepted: dense margin <= tol
    failures: int  # differing tokens with a dense margin > tol
    tol: float
    worst_margin: float  # largest dense margin among differing tokens (0 if none)

    @property
    def passed(self) -> bool:
        return self.failures == 0


def dense_check(model: LlamaModel, params, requests: list[Request], tol: float,
                rows: int = 8) -> CheckResult:
    """Teacher-forced dense run: one causal forward pass over each whole sequence (prompt + generated
    tokens), in float32, gives the dense model's greedy choice at every generated position. Equal
    choices at every position <=> the dense model's own greedy decode yields the same tokens."""
    L = max(r.final_len for r in requests)
    n = -(-len(requests) // rows) * rows
    seqs = np.zeros((n, L), np.int32)
    target = np.zeros((n, L), np.int32)  # served token at each position
    for i, r in enumerate(requests):
        full = np.concatenate([r.prompt, np.asarray(r.out, np.int32)])
        seqs[i, : r.final_len] = full[: r.final_len]
        target[i, : r.final_len] = full[1: r.final_len + 1]

    @jax.jit
    def run(params, toks, tgt):
        with jax.default_matmul_precision("highest"):
            logits = model.dense_logits(params, toks)  # [rows, L, V] float32
        at = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jnp.argmax(logits, axis=-1), jnp.max(logits, axis=-1), at

    best, top, at = [], [], []
    for s in range(0, n, rows):
        a, m, t = run(params, seqs[s: s + rows], target[s: s + rows])
        best.append(np.asarray(a)), top.append(np.asarray(m)), at.append(np.asarray(t))
    best, top, at = np.concatenate(best), np.concatenate(top), np.concatenate(at)

    res = CheckResult(0, 0, 0, 0, tol, 0.0)
    for i, r in enumerate(requests):
        pos = np.arange(len(r.prompt) - 1, r.final_len)
        same = best[i, pos] == target[i, pos]
        margin = top[i, pos] - at[i, pos]
        res.tokens += len(pos)
        res.exact += int(same.sum())
        res.near_ties += int((~same & (margin <= tol)).sum())
        res.failures += int((~same & (margin > tol)).sum())
        if (~same).any():
            res.worst_margin = max(res.worst_margin, float(margin[~same].max()))
    return res


# ---------------------------------------------------------------------------------------------
# Run and report
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
    backend: str  # attention backend that ran: "reference" or "flashinfer"
    device: str
    dtype: str
    model: LlamaConfig
    num_params: int
    cache: sj.CacheConfig
    engine: EngineConfig
    requests: list[Request]
    stats: object  # seqattn_jax.serving.EngineStats
    compile_s: float
    run_s: float
    traces: dict  # traces of each step program (1 each)
    compiles_warmup: int  # XLA compilations while warming up
    compiles_serving: list  # names of XLA compilations while serving
    kv_in_place: bool
    pages_in_use_at_end: int
    prefix_cache: object  # PrefixCacheStats or None
    check: CheckResult | None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.out) for r in self.requests)

    @property
    def padded_dense_pages(self) -> int:
        """Pages of a dense cache for the same slots, each padded to the longest request."""
        return self.cache.max_seqs * self.cache.pages_for(max(r.final_len for r in self.requests))

    @property
    def ok(self) -> bool:
        return self.check is None or self.check.passed


def _pointer(x):
    try:
        return x.unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001 - some runtimes do not expose it
        return None


def run(argv=None, *, progress: bool | None = None, backend=None) -> Summary:
    """Parse `argv`, serve the requests, check against the dense model; returns the `Summary`.
    `backend`: a backend object overriding --backend (tests pass FlashInfer's bridge with its
    torch CPU kernels)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    _check_args(parser, a)
    try:
        resolved = resolve_backend(a.backend) if backend is None else backend.name
    except RuntimeError as e:
        parser.error(str(e))
    dtype = a.dtype if a.dtype != "auto" else ("float32" if resolved == "reference" else "float16")
    tol = a.tol if a.tol is not None else DEFAULT_TOL[dtype]

    rng = np.random.default_rng(a.seed)
    requests = make_requests(a, rng)
    mcfg = LlamaConfig(vocab_size=a.vocab, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                       num_kv_heads=a.kv_heads, head_dim=a.head_dim, ffn_dim=a.ffn, dtype=dtype)
    longest = max(r.final_len for r in requests)
    if -(-longest // a.page_size) > a.num_pages:
        parser.error(f"--num-pages {a.num_pages} cannot hold the longest request ({longest} tokens = "
                     f"{-(-longest // a.page_size)} pages of {a.page_size}): raise --num-pages")
    cache = sj.CacheConfig(num_pages=a.num_pages, page_size=a.page_size, num_kv_heads=a.kv_heads,
                           head_dim=a.head_dim, max_seqs=a.batch,
                           max_pages_per_seq=max(-(-longest // a.page_size),
                                                 -(-(a.chunk + 3) // a.page_size)),
                           num_layers=a.layers, dtype=dtype)
    cache = dataclasses.replace(cache, max_pages_per_seq=min(cache.max_pages_per_seq, a.num_pages))
    model = LlamaModel(mcfg)
    params = init_params(mcfg, a.seed)
    if backend is None and resolved == "flashinfer":
        from seqattn_jax.bridge import FlashInferBackend  # noqa: PLC0415

        backend = FlashInferBackend(cuda_graphs=a.cuda_graphs == "on")
    ecfg = EngineConfig(chunk=a.chunk, prefix_cache=not a.no_prefix_cache, mixed_steps=not a.no_mixed,
                        async_steps=not a.sync, decode_steps=a.decode_steps,
                        backend=a.backend if backend is None else backend)
    engine = Engine(model, params, cache, ecfg)
    backend = engine.backend.name

    n0 = len(_COMPILES)
    compile_s = engine.warmup()
    n1 = len(_COMPILES)
    kv_ptr = _pointer(engine.kv)

    show = (not a.quiet) if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=sum(r.max_new for r in requests), unit="tok", desc="serving", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for r in requests:
            def on_token(t, r=r):
                r.out.append(t)
                if bar is not None:
                    bar.update(1)
            engine.submit(r.prompt, SamplingParams(max_new_tokens=r.max_new), on_token=on_token)
        while engine.step():
            if bar is not None:
                bar.set_postfix(running=len(engine._running), waiting=len(engine._waiting),
                                free_pages=engine.num_free_pages, refresh=False)
        jax.block_until_ready(engine.kv)
    finally:
        if bar is not None:
            bar.close()
    run_s = time.perf_counter() - t0
    serving_compiles = _COMPILES[n1:]
    kv_in_place = kv_ptr is None or _pointer(engine.kv) == kv_ptr
    idle = engine.check_idle()   # drops the prefix cache: every page is free again

    check = None
    if not a.no_check:
        check = dense_check(model, params, requests, tol)
    from seqattn_jax.serving import engine as engine_mod  # noqa: PLC0415
    traces = {f"{k[2].kind}{'' if k[2].steps == 1 else f' x{k[2].steps}'}"
              f"{'' if k[2].greedy_only else '/sampled'}"
              f"{'/host-plan' if k[2].host_plan else ''} C={k[5]}": v
              for k, v in engine_mod.STEP_TRACES.items() if k[0] == model and k[1] == cache}
    return Summary(backend=backend, device=str(jax.devices()[0].device_kind), dtype=dtype, model=mcfg,
                   num_params=sum(x.size for x in jax.tree_util.tree_leaves(params)), cache=cache,
                   engine=ecfg, requests=requests, stats=engine.stats, compile_s=compile_s,
                   run_s=run_s, traces=traces, compiles_warmup=n1 - n0,
                   compiles_serving=serving_compiles, kv_in_place=kv_in_place,
                   pages_in_use_at_end=idle["pages_in_use"],
                   prefix_cache=None if engine.pc is None else engine.pc.stats, check=check)


def report(s: Summary, console=None) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = console or Console()
    st, m, c, e = s.stats, s.model, s.cache, s.engine
    gen = s.generated_tokens
    t = Table(title="seqattn_jax: continuous batching on a paged KV cache", show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    t.add_row("backend", f"{s.backend} attention on {s.device} ({jax.default_backend()}), {s.dtype}")
    t.add_row("model", f"{s.num_params / 1e6:.2f}M params, {m.num_layers} layers, d={m.d_model}, "
                       f"{m.num_heads} q / {m.num_kv_heads} kv heads x {m.head_dim}, vocab {m.vocab_size}")
    t.add_row("requests", f"{len(s.requests)} served, {sum(r.done for r in s.requests)} finished, "
                          f"up to {st.peak_running} at once in {c.max_seqs} slots")
    t.add_row("tokens", f"{s.prompt_tokens} prompt ({st.prefill_tokens} prefilled, {st.reused_tokens} "
                        f"from the prefix cache), {gen} generated")
    t.add_row("throughput", f"{gen / s.run_s:,.0f} generated tok/s, "
                            f"{(st.prefill_tokens + gen) / s.run_s:,.0f} tok/s with prefill, {s.run_s:.2f} s")
    steps = sum(st.steps.values())
    multi = (f" ({st.multi_steps} of them {e.decode_steps} steps in one program)"
             if st.multi_steps else "")
    # decode sub-steps: a multi-step dispatch runs decode_steps of them
    sub = st.steps["decode"] + st.steps["mixed"] + st.multi_steps * (e.decode_steps - 1)
    t.add_row("steps", f"{steps} ({', '.join(f'{v} {k}' for k, v in sorted(st.steps.items()))})"
                       f"{multi}, {1e3 * s.run_s / max(steps, 1):.2f} ms each on average; "
                       f"decode rows {st.decode_rows / max(sub, 1):.1f} of "
                       f"{c.max_seqs} busy; mixed steps {'on' if e.mixed_steps else 'off'}, host "
                       f"{'one step behind' if e.async_steps else 'in lockstep'}; "
                       f"{st.mirror_reads} prefix-cache reads of the allocator's CPU mirror (0 of "
                       f"the device), {st.discarded_tokens} tokens discarded")
    t.add_row("host time", f"{st.events_s:.2f} s scheduling (admission, releases, the prefix "
                           f"cache on the allocator's CPU mirror), {st.dispatch_s:.2f} s dispatching, "
                           f"{st.receive_s:.2f} s waiting for and handing out tokens")
    t.add_row("KV pages", f"peak {st.peak_pages_in_use} in use (requests + prefix cache) vs "
                          f"{s.padded_dense_pages} for a dense cache padded to the longest request; "
                          f"pool {c.num_pages} x {c.page_size} tokens; {s.pages_in_use_at_end} in use "
                          f"at the end")
    pcs = s.prefix_cache
    if pcs is None:
        t.add_row("prefix cache", "off (--no-prefix-cache)")
    else:
        t.add_row("prefix cache", f"{pcs.hits} hits in {pcs.requests} requests: {pcs.cached_tokens} prompt "
                                  f"tokens ({pcs.cached_tokens // c.page_size} pages) shared, not "
                                  f"recomputed or stored again; {pcs.evicted_pages} pages evicted (LRU)")
    t.add_row("compiles", f"{s.compile_s:.1f} s warm-up, {s.compiles_warmup} XLA compilations; "
                          f"{len(s.compiles_serving)} while serving; traces: "
                          + ", ".join(f"{k} {v}" for k, v in s.traces.items()))
    t.add_row("KV in place", "yes: the donated pool kept its buffer every step" if s.kv_in_place
              else "[red]NO: the pool buffer moved (a copy of the cache)[/]")
    if s.check is None:
        t.add_row("paged = dense", "[yellow]not checked (--no-check)[/]")
    else:
        ch = s.check
        detail = f"{ch.exact}/{ch.tokens} greedy tokens identical"
        if ch.near_ties:
            detail += f", {ch.near_ties} differ at near-ties (dense logit margin <= tol {ch.tol:g})"
        if ch.failures:
            detail += f", {ch.failures} differ beyond tol {ch.tol:g}"
        if ch.near_ties or ch.failures:
            detail += f", worst margin {ch.worst_margin:.3g}"
        verdict = "[green]PASS[/]" if ch.passed else "[red]FAIL[/]"
        t.add_row("paged = dense", f"{verdict}: {detail}")
    console.print(t)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    s = run(argv)
    if "--quiet" not in argv:
        report(s)
    if s.check is None:
        print("paged-vs-dense check skipped (--no-check)")
    elif s.check.passed:
        print(f"OK: the paged greedy tokens equal the dense model's ({s.check.exact}/{s.check.tokens} "
              f"identical" + (f", {s.check.near_ties} near-ties" if s.check.near_ties else "") + ")")
    else:
        print(f"FAILED: {s.check.failures} of {s.check.tokens} paged tokens differ from the dense model "
              f"beyond the near-tie tolerance {s.check.tol:g}", file=sys.stderr)
    return 0 if s.ok else 1


if __name__ == "__main__":
    sys.exit(main())
