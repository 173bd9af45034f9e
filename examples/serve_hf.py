#!/usr/bin/env python
"""Serve a local Hugging Face checkpoint through `seqattn_jax.serving.Engine`: text in, text out.

    python examples/serve_hf.py --model DIR --prompt "The capital of France is"
    python examples/serve_hf.py --model DIR --prompts-file prompts.txt --max-new-tokens 64 --temperature 0.7
    python examples/serve_hf.py --help

What happens:
  * `seqattn_jax.models.hf` reads DIR (config.json, model.safetensors or its shards, tokenizer.json,
    generation_config.json) into the serving Llama model in the compute dtype; the tokenizer encodes
    each prompt (with its BOS where the tokenizer adds one).
  * The engine serves every prompt at once: continuous batching over --batch slots, prompts prefilled
    in chunks of up to --chunk rows, the prefix cache sharing common prompt pages. The checkpoint's
    EOS ids (generation_config.json, then config.json) stop a request; the EOS token is not printed.
  * Text is streamed as tokens arrive: with one prompt, piece by piece on one line; with several, each
    request's prompt and continuation are printed when it finishes (in the order they finish).
  * Then a summary table (requests, tokens, tokens/s, steps, KV pages, load and compile time).

Exit status: 0 when every request was served, 2 for bad options (including a --model directory that
is not a checkpoint this loader can serve).
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

_HERE = pathlib.Path(__file__).resolve().parent
if __package__ in (None, ""):  # `python examples/serve_hf.py` from a checkout: make the repo importable
    sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))  # examples/decode.py: its XLA compilation counter

import jax  # noqa: E402

import seqattn_jax as sj  # noqa: E402
from decode import _COMPILES, _pointer  # noqa: E402
from seqattn_jax.backend import resolve_backend  # noqa: E402
from seqattn_jax.models.hf import load_hf_checkpoint, load_tokenizer, read_json  # noqa: E402
from seqattn_jax.models.llama import LlamaConfig, LlamaModel  # noqa: E402
from seqattn_jax.serving import Engine, EngineConfig, SamplingParams  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="examples/serve_hf.py",
        description="Serve a local Hugging Face Llama / Mistral / Qwen2 checkpoint with seqattn_jax's "
                    "serving engine on a paged KV cache: prompts in, streamed text out, then a "
                    "summary table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Exit status: 0 when every request was served, 2 for bad options or a --model "
               "directory that cannot be served.")
    g = p.add_argument_group("model and prompts")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint directory in the Hugging Face layout (config.json, *.safetensors, "
                        "tokenizer.json; generation_config.json for the stop tokens)")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeat for several)")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="a text file with one prompt per line (blank lines are skipped); "
                        "added after any --prompt")
    g = p.add_argument_group("sampling (the same for every request)")
    g.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens to generate at most per request (an EOS token stops it earlier)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: all)")
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed; request i samples with seed + i")
    g.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the checkpoint's EOS tokens (always --max-new-tokens)")
    g = p.add_argument_group("serving")
    g.add_argument("--backend", choices=("auto", "reference", "flashinfer"), default="auto",
                   help="attention backend: 'auto' = FlashInfer on a CUDA GPU where it imports, "
                        "else the pure-JAX reference")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="compute, weight and KV pool dtype; 'auto' = float32 with the reference "
                        "backend, else config.json's torch_dtype when it is float16/bfloat16 "
                        "(float16 otherwise)")
    g.add_argument("--batch", type=int, default=8,
                   help="sequence slots: the most requests in flight (decode step batch size)")
    g.add_argument("--chunk", type=int, default=256, help="token rows of one prefill chunk")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--num-pages", type=int, default=None,
                   help="pages in the KV pool; default: enough for the --batch longest requests "
                        "(prompt + --max-new-tokens) at once")
    g.add_argument("--no-prefix-cache", action="store_true", help="turn off the automatic prefix cache")
    g.add_argument("--no-mixed", action="store_true",
                   help="run prefill chunks and decode rows as separate steps, not one batch-POD "
                        "step (saves compiling FlashInfer's batch-POD kernel, ~2 min on first use)")
    g.add_argument("--quiet", action="store_true",
                   help="no streamed text and no table (the summary line only)")
    return p


def _check_args(p: argparse.ArgumentParser, a) -> None:
    for name in ("max_new_tokens", "batch", "chunk", "page_size"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.num_pages is not None and a.num_pages <= 0:
        p.error("--num-pages must be positive")
    if a.temperature < 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
        p.error("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")
    if not os.path.isdir(a.model):
        p.error(f"--model {a.model}: not a directory (a Hugging Face checkpoint directory with "
                f"config.json, *.safetensors and tokenizer.json)")
    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(a.model, name)):
            p.error(f"--model {a.model}: no {name} there (a Hugging Face checkpoint directory has "
                    f"config.json, *.safetensors and tokenizer.json)")


def _prompts(p: argparse.ArgumentParser, a) -> list[str]:
    prompts = list(a.prompt)
    if a.prompts_file is not None:
        try:
            with open(a.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            p.error(f"--prompts-file: {e}")
    if not prompts:
        p.error("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Served:
    """One request: its prompt, generated ids (the stop token included, as the engine returns it)
    and text (the stop token excluded)."""

    rid: int
    prompt: str
    prompt_ids: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclasses.dataclass
class Result:
    backend: str
    device: str
    dtype: str
    model_dir: str
    model: LlamaConfig
    num_params: int
    eos_ids: tuple[int, ...]
    cache: sj.CacheConfig
    engine: EngineConfig
    requests: list[Served]
    stats: object  # seqattn_jax.serving.EngineStats
    load_s: float
    compile_s: float
    run_s: float
    compiles_warmup: int
    compiles_serving: int
    kv_in_place: bool
    pages_in_use_at_end: int

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)


def _auto_num_pages(cache_pages: list[int], batch: int) -> int:
    """Pages for the `batch` largest requests at once: the engine admits a request only when the
    pages of its whole life fit, so this pool never leaves a slot idle for lack of pages."""
    return sum(sorted(cache_pages, reverse=True)[:batch])


def run(argv=None, *, out=None) -> Result:
    """Parse `argv`, load the checkpoint, serve the prompts (streaming text to `out`, default
    stdout, unless --quiet); returns the `Result`. Bad options exit with status 2."""
    out = sys.stdout if out is None else out
    parser = build_parser()
    a = parser.parse_args(argv)
    _check_args(parser, a)
    texts = _prompts(parser, a)
    try:
        resolved = resolve_backend(a.backend)
    except RuntimeError as e:
        parser.error(str(e))
    try:
        if a.dtype != "auto":
            dtype = a.dtype
        elif resolved == "reference":
            dtype = "float32"
        else:
            stored = (read_json(a.model, "config.json") or {}).get("torch_dtype")
            dtype = stored if stored in ("float16", "bfloat16") else "float16"
        t0 = time.perf_counter()
        mcfg, params = load_hf_checkpoint(a.model, dtype, backend=resolved)
        jax.block_until_ready(params)
        tok = load_tokenizer(a.model)
        load_s = time.perf_counter() - t0
    except (ValueError, OSError) as e:  # unsupported config field, missing / bad tensor files
        parser.error(f"--model {a.model}: {e}")

    reqs = []
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        if not ids:
            parser.error(f"prompt {i} ({text!r}) encodes to no tokens")
        bad = [t for t in ids if t >= mcfg.vocab_size]
        if bad:
            parser.error(f"prompt {i}: token id {bad[0]} is outside the model's vocabulary "
                         f"({mcfg.vocab_size}): tokenizer.json does not match config.json")
        reqs.append(Served(i, text, ids))

    ps = a.page_size
    final = [len(r.prompt_ids) + a.max_new_tokens - 1 for r in reqs]  # last token is never fed back
    pages = [-(-n // ps) for n in final]
    # The warm-up prefills a chunk-sized sequence beside a short one: slots hold at least a chunk
    # (as in examples/decode.py) and the automatic pool has room for both.
    chunk_pages = -(-(a.chunk + 3) // ps)
    num_pages = a.num_pages if a.num_pages is not None else \
        max(_auto_num_pages(pages, a.batch), chunk_pages + 1)
    if max(pages) > num_pages:
        parser.error(f"--num-pages {num_pages} cannot hold the longest request ({max(final)} tokens = "
                     f"{max(pages)} pages of {ps}): raise --num-pages")
    per_seq = max(max(pages), min(chunk_pages, num_pages - 1))
    cache = sj.CacheConfig(num_pages=num_pages, page_size=ps, num_kv_heads=mcfg.num_kv_heads,
                           head_dim=mcfg.head_dim, max_seqs=a.batch, max_pages_per_seq=per_seq,
                           num_layers=mcfg.num_layers, dtype=mcfg.dtype)
    model = LlamaModel(mcfg)
    ecfg = EngineConfig(chunk=a.chunk, prefix_cache=not a.no_prefix_cache, backend=a.backend,
                        mixed_steps=not a.no_mixed)
    engine = Engine(model, params, cache, ecfg)

    n0 = len(_COMPILES)
    compile_s = engine.warmup(sampled=a.temperature > 0)
    n1 = len(_COMPILES)
    kv_ptr = _pointer(engine.kv)

    stops = () if a.ignore_eos else tok.eos_ids
    live = len(reqs) == 1 and not a.quiet  # one prompt: stream its pieces on one line
    handles = []
    t0 = time.perf_counter()
    for r in reqs:
        # The stream starts from the prompt's ids so the first piece carries its context (a
        # word-level or SentencePiece decoder puts the space between prompt and continuation).
        # (Not flushed: flush would forget that context.)
        stream = tok.stream()
        for t in r.prompt_ids:
            stream.push(t)

        def on_token(t, r=r, stream=stream):
            r.tokens.append(t)
            if t in stops:  # the stop token ends the request; it is not text
                return
            piece = stream.push(t)
            r.text += piece
            if live and piece:
                print(piece, end="", file=out, flush=True)

        if live:
            print(r.prompt, end="", file=out, flush=True)
        sp = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                            top_k=a.top_k, top_p=a.top_p, seed=a.seed + r.rid, stop_token_ids=stops)
        handles.append((r, stream, engine.submit(r.prompt_ids, sp, on_token=on_token)))
    pending = list(handles)
    while pending:
        more = engine.step()
        for item in [h for h in pending if h[2].done]:
            r, stream, handle = item
            rest = stream.flush()
            r.text += rest
            r.finish_reason = handle.finish_reason
            pending.remove(item)
            if live:
                print(rest, file=out, flush=True)
            elif not a.quiet:
                print(f"[{r.rid}] {r.prompt}{r.text}  ({len(r.tokens)} tokens, {r.finish_reason})",
                      file=out, flush=True)
        if not more and pending:
            raise RuntimeError(f"the engine stopped with {len(pending)} request(s) unfinished")
    while engine.step():  # a dispatched step after the last stop token is read and dropped
        pass
    jax.block_until_ready(engine.kv)
    run_s = time.perf_counter() - t0
    kv_in_place = kv_ptr is None or _pointer(engine.kv) == kv_ptr
    idle = engine.check_idle()
    return Result(backend=engine.backend.name, device=str(jax.devices()[0].device_kind), dtype=mcfg.dtype,
                  model_dir=a.model, model=mcfg,
                  num_params=sum(x.size for x in jax.tree_util.tree_leaves(params)),
                  eos_ids=tuple(stops), cache=cache, engine=ecfg, requests=reqs, stats=engine.stats,
                  load_s=load_s, compile_s=compile_s, run_s=run_s, compiles_warmup=n1 - n0,
                  compiles_serving=len(_COMPILES) - n1, kv_in_place=kv_in_place,
                  pages_in_use_at_end=idle["pages_in_use"])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def report(s: Result, console=None) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = console or Console()
    st, m, c = s.stats, s.model, s.cache
    gen = s.generated_tokens
    t = Table(title=f"seqattn_jax: serving {s.model_dir}", show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    t.add_row("backend", f"{s.backend} attention on {s.device} ({jax.default_backend()}), {s.dtype}")
    window = f", window {m.sliding_window}" if m.sliding_window else ""
    t.add_row("model", f"{s.num_params / 1e6:.2f}M params, {m.num_layers} layers, d={m.d_model}, "
                       f"{m.num_heads} q / {m.num_kv_heads} kv heads x {m.head_dim}, vocab "
                       f"{m.vocab_size}{window}; EOS ids {list(s.eos_ids) or 'none'}")
    t.add_row("load", f"{s.load_s:.2f} s (weights in {s.dtype} + tokenizer)")
    reasons = {}
    for r in s.requests:
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    t.add_row("requests", f"{len(s.requests)} served ("
                          + ", ".join(f"{v} {k}" for k, v in sorted(reasons.items(), key=str))
                          + f"), up to {st.peak_running} at once in {c.max_seqs} slots")
    t.add_row("tokens", f"{s.prompt_tokens} prompt ({st.prefill_tokens} prefilled, {st.reused_tokens} "
                        f"from the prefix cache), {gen} generated")
    t.add_row("throughput", f"{gen / s.run_s:,.0f} generated tok/s, "
                            f"{(st.prefill_tokens + gen) / s.run_s:,.0f} tok/s with prefill, {s.run_s:.2f} s")
    steps = sum(st.steps.values())
    t.add_row("steps", f"{steps} ({', '.join(f'{v} {k}' for k, v in sorted(st.steps.items()))}), "
                       f"{1e3 * s.run_s / max(steps, 1):.2f} ms each on average; "
                       f"{st.discarded_tokens} tokens computed after a stop and dropped")
    t.add_row("KV pages", f"peak {st.peak_pages_in_use} in use of {c.num_pages} x {c.page_size} tokens; "
                          f"{s.pages_in_use_at_end} in use at the end")
    t.add_row("compiles", f"{s.compile_s:.1f} s warm-up, {s.compiles_warmup} XLA compilations; "
                          f"{s.compiles_serving} while serving")
    t.add_row("KV in place", "yes: the donated pool kept its buffer every step" if s.kv_in_place
              else "[red]NO: the pool buffer moved (a copy of the cache)[/]")
    console.print(t)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    s = run(argv)
    if "--quiet" not in argv:
        report(s)
    print(f"served {len(s.requests)} request(s): {s.generated_tokens} tokens in {s.run_s:.2f} s "
          f"({s.generated_tokens / s.run_s:,.0f} tok/s); load {s.load_s:.2f} s, warm-up {s.compile_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
