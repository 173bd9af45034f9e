#!/usr/bin/env python
"""Serve a stream of requests with a small Llama-style model on a paged KV cache, then check it.

    python examples/decode.py              # CPU: reference backend; CUDA GPU + FlashInfer: FlashInfer
    python examples/decode.py --help

What happens:
  * A seeded Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU; examples/model.py) and a queue of
    requests with prompts of different lengths; some start with one common "system prompt".
  * Continuous batching over a fixed number of slots: prompts are prefilled in fixed-size chunks
    (several requests share a chunk), the prefilled requests decode together, each stops at its own
    length and frees its pages, and waiting requests take the free slots (admitted when a slot and
    the pages for their whole lifetime are free).
  * Shared prefix, through the automatic prefix cache (`seqattn_jax.PrefixCache`): the full pages
    a prefill writes are indexed by their tokens (the cache takes a reference, `ref`); a later
    request whose prompt starts with cached pages gets them in its page table (`share_prefix`) and
    prefills only the rest, so a common prefix is neither recomputed nor stored twice. Cached pages
    nobody holds are evicted, least recently used first, when pages run short.
  * Two jitted model steps with fixed shapes (prefill: `--chunk` token rows; decode: `--batch` rows;
    padding ids -1), each traced and compiled once however lengths change; everything else the loop
    runs is compiled during a warm-up, so serving compiles nothing. The KV pool (and the allocator
    state) are donated, so the cache is updated in place: no copy per step.
  * Correctness: the greedy tokens are compared with a dense implementation of the same model (plain
    causal attention over whole sequences in float32, no cache). The script exits 1 if they differ
    (beyond near-ties of the dense logits when the pool is float16/bfloat16).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import sys
import time

# JAX must not take the whole GPU: FlashInfer's workspaces are allocated by torch next to it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

if __package__ in (None, ""):  # `python examples/decode.py`: make examples/model.py and the repo importable
    _here = pathlib.Path(__file__).resolve().parent
    sys.path.insert(0, str(_here))
    sys.path.insert(1, str(_here.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import seqattn_jax as sa  # noqa: E402
from seqattn_jax import attention  # noqa: E402
from seqattn_jax.nnx import resolve_backend  # noqa: E402

try:
    from examples.model import Llama, ModelConfig  # noqa: E402
except ImportError:  # run as a script: examples/ is on sys.path
    from model import Llama, ModelConfig  # noqa: E402

# Largest dense-logit margin (top-1 minus the logit of the paged path's token) at which a differing
# greedy token is accepted as a rounding near-tie, per KV/compute dtype. float32 should match exactly.
DEFAULT_TOL = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.25}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="examples/decode.py",
        description="Continuous-batching greedy decoding of a seeded Llama-style model on a paged KV "
                    "cache (seqattn_jax), checked against a dense, cache-free run of the same model. "
                    "Shows a progress bar while serving, then a table: requests, tokens, tokens/s, "
                    "the prefill/decode split, KV pages used against a padded dense cache, prefix-cache "
                    "hits, compilations, and the paged-vs-dense verdict.",
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
                   help="token rows of one prefill step; longer prompts are prefilled over several "
                        "steps and short ones share a step")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--num-pages", type=int, default=64,
                   help="pages in the KV pool (each page holds --page-size tokens of every layer); a "
                        "request is admitted once the pages for its whole length are free or evictable")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="turn off the automatic prefix cache (every prompt is prefilled in full)")
    g.add_argument("--backend", choices=("auto", "reference", "flashinfer"), default="auto",
                   help="attention backend: 'auto' = FlashInfer on a CUDA GPU where it imports, "
                        "else the pure-JAX reference")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="compute and KV pool dtype; 'auto' = float32 with the reference backend, "
                        "float16 with FlashInfer")
    g = p.add_argument_group("model (weights come from --seed; nothing is downloaded)")
    g.add_argument("--layers", type=int, default=4, help="decoder layers")
    g.add_argument("--d-model", type=int, default=256, help="hidden size")
    g.add_argument("--heads", type=int, default=4, help="query heads")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA: divides --heads)")
    g.add_argument("--head-dim", type=int, default=64, help="size of one head (FlashInfer: 64, 128 or 256)")
    g.add_argument("--ffn", type=int, default=512, help="SwiGLU hidden size")
    g.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    g = p.add_argument_group("check and output")
    g.add_argument("--no-check", action="store_true",
                   help="skip the paged-vs-dense comparison")
    g.add_argument("--tol", type=float, default=None,
                   help="the check accepts a token that differs from the dense model's only where the "
                        "dense top-1 logit beats the paged token's logit by at most this much (a rounding "
                        "near-tie); any other difference fails the run. Default by dtype: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOL.items()))
    g.add_argument("--quiet", action="store_true",
                   help="no progress bar and no table, only the final OK / FAILED line")
    return p


def _check_args(p: argparse.ArgumentParser, a) -> None:
    for name in ("requests", "batch", "chunk", "page_size", "num_pages", "layers", "d_model", "heads",
                 "kv_heads", "head_dim", "ffn", "vocab"):
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
    slot: int = -1
    cached: int = 0  # tokens whose K/V are in the cache (prefilled or shared)
    reused: int = 0  # of those, tokens taken from the shared prefix (not computed)
    out: list = dataclasses.field(default_factory=list)  # generated tokens
    top: list = dataclasses.field(default_factory=list)  # paged path's logit of each generated token
    admitted_at: int = -1
    finished_at: int = -1

    @property
    def final_len(self) -> int:
        """KV length at the end (the last generated token is never fed back)."""
        return len(self.prompt) + self.max_new - 1

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)

    @property
    def done(self) -> bool:
        return len(self.out) >= self.max_new


def make_requests(a, rng: np.random.Generator) -> tuple[list[Request], np.ndarray]:
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
    return reqs, prefix


# ---------------------------------------------------------------------------------------------
# XLA compilations, counted through jax.monitoring (one listener for the process)
# ---------------------------------------------------------------------------------------------

_COMPILES: list[str] = []


def _on_event(event: str, duration: float, **kw) -> None:
    if event.endswith("backend_compile_duration"):
        _COMPILES.append(str(kw.get("fun_name", "?")))


jax.monitoring.register_event_duration_secs_listener(_on_event)


# ---------------------------------------------------------------------------------------------
# The engine: jitted steps with fixed shapes, donated KV pool and allocator state
# ---------------------------------------------------------------------------------------------

class Engine:
    """Model parameters, the KV pool, the allocator state and the prefix cache; runs the steps.

    The model steps have fixed shapes (batch `B` slots, chunk `C` rows, the config), so each traces
    and compiles once; `self.traces` counts traces and a second one raises. The pool (and, in the
    decode step, the allocator state) is donated: XLA updates it in place.
    """

    def __init__(self, model: Llama, cache: sa.CacheConfig, *, chunk: int, prefix_cache: bool = True):
        self.cache, self.B, self.C = cache, cache.max_seqs, chunk
        self.graphdef, self.params = nnx.split(model)
        self.kv = sa.init_kv(cache)
        self.state = sa.init_state(cache)
        self.pc = sa.PrefixCache(cache) if prefix_cache else None
        self.rc = np.zeros((cache.num_pages,), np.int32)  # host copy of state.refcount
        self.traces: collections.Counter = collections.Counter()
        self.kv_moves = 0
        self._kv_ptr = self._pointer(self.kv)
        self._build()

    # -- page accounting (host) ---------------------------------------------------------------

    def _sync(self):
        self.rc = np.asarray(self.state.refcount)

    @property
    def num_free(self) -> int:
        return int(np.sum(self.rc == 0))

    def _cache_only(self) -> np.ndarray:
        """bool [num_pages]: pages only the prefix cache holds (evictable)."""
        if self.pc is None:
            return np.zeros_like(self.rc, bool)
        return self.pc.cached_mask & (self.rc == 1)

    @property
    def pages_held(self) -> int:
        """Pages that requests hold (in use minus those only the prefix cache keeps)."""
        return int(np.sum(self.rc > 0) - np.sum(self._cache_only()))

    @property
    def pages_cached_only(self) -> int:
        return int(np.sum(self._cache_only()))

    # -- jitted functions ---------------------------------------------------------------------

    @staticmethod
    def _pointer(x):
        try:
            return x.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - some runtimes do not expose it
            return None

    def _traced(self, name):
        self.traces[name] += 1
        if self.traces[name] > 1:
            raise AssertionError(f"{name} was traced {self.traces[name]} times: a shape or dtype changed")

    def _build(self):
        graphdef, C = self.graphdef, self.C

        def sample(model, hidden):
            logits = model.logits(hidden)  # [B, V] float32
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.max(logits, axis=-1)

        def prefill_step(params, kv, state, tokens, seq_ids, new_lens, end_lens):
            # Admission allocated each prompt's pages; a chunk writes positions end - new .. end - 1
            # and attends to the first `end` tokens: kv_lens gives that length explicitly.
            self._traced("prefill_step")
            packed = sa.pack_for_flashinfer(state, seq_ids, new_lens, max_tokens=C, kv_lens=end_lens)
            model = nnx.merge(graphdef, params)
            hidden, kv = model.paged(tokens, packed, kv, mode="prefill")
            last = jnp.clip(packed.qo_indptr[1:] - 1, 0, C - 1)  # each request's last row
            tok, top = sample(model, hidden[last])
            return tok, top, kv

        def decode_step(params, kv, state, tokens, seq_ids):
            self._traced("decode_step")
            state, status = sa.allocate_decoding(state, seq_ids)
            ok = sa.ok(status)  # all-or-nothing: False means the state is unchanged
            seq_ids = jnp.where(ok, seq_ids, -1)  # never write where the allocation was refused
            packed = sa.pack_for_flashinfer(state, seq_ids)
            model = nnx.merge(graphdef, params)
            hidden, kv = model.paged(tokens, packed, kv, mode="decode")
            # A decode batch has row b = request b (padding rows output 0 and are not written).
            tok, top = sample(model, hidden)
            return tok, top, kv, state, ok

        def allocate_step(state, seq_ids, lens):  # admission without the prefix cache
            self._traced("allocate")
            state, status = sa.allocate(state, seq_ids, lens)
            return state, sa.ok(status)

        def release_step(state, seq_ids):  # release without the prefix cache
            self._traced("release")
            state, status = sa.release(state, seq_ids)
            return state, sa.ok(status)

        self._prefill = jax.jit(prefill_step, donate_argnums=(1,))
        self._decode = jax.jit(decode_step, donate_argnums=(1, 2))
        self._allocate = jax.jit(allocate_step, donate_argnums=(0,))
        self._release = jax.jit(release_step, donate_argnums=(0,))

    # -- host-side wrappers: numpy in, numpy out, padded to the fixed shapes --------------------

    def _pad(self, values, size, fill=-1):
        out = np.full((size,), fill, np.int32)
        out[: len(values)] = values
        return out

    def _track_kv(self):
        ptr = self._pointer(self.kv)
        if ptr is not None and self._kv_ptr is not None and ptr != self._kv_ptr:
            self.kv_moves += 1
            self._kv_ptr = ptr

    def available_for(self, prompt) -> tuple[int, int]:
        """(pages a new request with this prompt can count on: free + evictable cached pages it would
        not share itself, pages of the prompt it would share)."""
        if self.pc is None:
            return self.num_free, 0
        pages, _ = self.pc.match(prompt, max_tokens=len(prompt) - 1)
        evictable = self._cache_only()
        return self.num_free + int(evictable.sum()) - int(evictable[np.asarray(pages, np.int64)].sum()), len(pages)

    def admit(self, slot: int, prompt) -> int:
        """Start `slot` on `prompt` with all its prompt pages allocated; returns the prompt tokens
        taken from the prefix cache (not to be prefilled)."""
        if self.pc is None:
            self.state, ok = self._allocate(self.state, self._pad([slot], self.B),
                                            self._pad([len(prompt)], self.B, 0))
            n_cached = 0
        else:
            adm = self.pc.admit(self.state, slot, prompt)
            self.state, ok, n_cached = adm.state, adm.ok, adm.num_cached
        if not bool(ok):
            raise RuntimeError(f"admission of slot {slot} was refused (a scheduler bug: pages are "
                               f"checked before admission)")
        self._sync()
        return int(n_cached)

    def prefill(self, tokens, seq_ids, new_lens, end_lens):
        tok, top, self.kv = self._prefill(
            self.params, self.kv, self.state, self._pad(tokens, self.C, 0), self._pad(seq_ids, self.B),
            self._pad(new_lens, self.B, 0), self._pad(end_lens, self.B, 0))
        self._track_kv()
        return np.asarray(tok), np.asarray(top)

    def cache_prompts(self, slots, written):
        """Index the full pages the prefill has written so far (`written[i]` = those tokens)."""
        if self.pc is None or not len(slots):
            return
        padded = list(written) + [np.zeros((0,), np.int32)] * (self.B - len(slots))
        self.state = self.pc.insert_slots(self.state, self._pad(slots, self.B), padded)
        self._sync()

    def make_room(self, pages: int):
        """Evict cache-only pages (LRU) until `pages` are free."""
        if self.num_free >= pages:
            return
        if self.pc is None:
            raise RuntimeError("out of pages (a scheduler bug: pages are reserved at admission)")
        self.state = self.pc.make_room(self.state, pages).state
        self._sync()

    def decode(self, tokens, seq_ids):
        tok, top, self.kv, self.state, ok = self._decode(
            self.params, self.kv, self.state, self._pad(tokens, self.B, 0), self._pad(seq_ids, self.B))
        if not bool(ok):
            raise RuntimeError("decode allocation refused (a scheduler bug: pages are reserved at admission)")
        self._track_kv()
        self._sync()
        return np.asarray(tok), np.asarray(top)

    def release(self, seq_ids):
        padded = self._pad(seq_ids, self.B)
        if self.pc is None:
            self.state, ok = self._release(self.state, padded)
            ok = bool(ok)
        else:
            self.state, status, _ = self.pc.release(self.state, padded)
            ok = bool(sa.ok(status))
        if not ok:
            raise RuntimeError(f"release of slots {list(seq_ids)} refused")
        self._sync()

    def shutdown(self) -> int:
        """Evict every cached page (the cache's references); returns how many it held."""
        if self.pc is None:
            return 0
        res = self.pc.evict(self.state)
        self.state = res.state
        self._sync()
        return len(res.freed)

    def warmup(self) -> float:
        """Compile everything the serving loop runs, so that serving compiles nothing. One dummy
        request goes through every step in a scratch state (and scratch prefix cache): same shapes,
        so the same executables. Its K/V land in pages that are free in the real state, which is
        harmless: attention reads only positions a sequence has written. Returns seconds."""
        t0 = time.perf_counter()
        cfg, B = self.cache, self.B
        slots = self._pad([0], B)
        prompt = np.zeros((min(cfg.page_size + 1, self.C),), np.int32)
        real_state = self.state
        pc = sa.PrefixCache(cfg) if self.pc is not None else None
        if pc is None:
            st, _ = self._allocate(sa.init_state(cfg), slots, self._pad([len(prompt)], B, 0))
        else:
            st = pc.admit(sa.init_state(cfg), 0, prompt).state
        self.state = st
        self.prefill(prompt, [0], [len(prompt)], [len(prompt)])
        self.decode([0], [0])
        st = self.state
        if pc is None:
            self._release(st, slots)
        else:
            st = pc.insert_slots(st, slots, [prompt] + [np.zeros((0,), np.int32)] * (B - 1))
            st, _, _ = pc.release(st, slots)
            pc.make_room(st, cfg.num_pages)
        self.state = real_state
        jax.block_until_ready(self.kv)
        self._sync()
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The scheduler: continuous batching with chunked prefill
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stats:
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed
    decode_tokens: int = 0  # tokens generated by decode steps
    first_tokens: int = 0  # tokens generated by the last prefill chunk of a prompt
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_rows: int = 0  # sum of decode batch occupancy
    peak_held: int = 0  # pages held by requests
    peak_in_use: int = 0  # pages not free (requests + cache-only)
    peak_active: int = 0
    tokens_reused: int = 0  # prompt tokens taken from the prefix cache
    cached_at_end: int = 0  # cache-only pages evicted at shutdown


def serve(engine: Engine, requests: list[Request], *, progress=None) -> Stats:
    cache, C = engine.cache, engine.C
    st = Stats()
    waiting = collections.deque(requests)
    active: dict[int, Request] = {}
    free_slots = list(range(engine.B))
    step = 0

    def peaks():
        st.peak_held = max(st.peak_held, engine.pages_held)
        st.peak_in_use = max(st.peak_in_use, cache.num_pages - engine.num_free)

    while waiting or active:
        # 1. Admit waiting requests (first come, first served) while a slot is free and the pages
        #    of their whole life fit: free + evictable-cached pages, less what admitted requests
        #    will still claim as they grow. Admission allocates the prompt's pages (sharing the
        #    longest cached prefix), so no request is ever stopped for lack of pages.
        while waiting and free_slots:
            req = waiting[0]
            owed = sum(cache.pages_for(r.final_len) - cache.pages_for(max(len(r.prompt), r.cached))
                       for r in active.values())
            avail, shared = engine.available_for(req.prompt)
            if avail - owed < cache.pages_for(req.final_len) - shared:
                if not active:
                    raise RuntimeError(f"request {req.rid} does not fit in an empty pool: raise --num-pages")
                break
            waiting.popleft()
            req.slot, req.admitted_at = free_slots.pop(0), step
            req.cached = req.reused = engine.admit(req.slot, req.prompt)
            st.tokens_reused += req.reused
            active[req.slot] = req
        peaks()

        # 2. One prefill chunk: up to C prompt tokens of the prefilling requests, oldest first.
        chunk_reqs, toks, lens = [], [], []
        room = C
        for req in sorted((r for r in active.values() if r.prefilling), key=lambda r: r.admitted_at):
            if room == 0:
                break
            n = min(room, len(req.prompt) - req.cached)
            chunk_reqs.append(req)
            toks.append(req.prompt[req.cached: req.cached + n])
            lens.append(n)
            room -= n
        if chunk_reqs:
            t0 = time.perf_counter()
            tok, top = engine.prefill(np.concatenate(toks), [r.slot for r in chunk_reqs], lens,
                                      [r.cached + n for r, n in zip(chunk_reqs, lens)])
            st.prefill_s += time.perf_counter() - t0
            st.prefill_steps += 1
            st.prefill_tokens += sum(lens)
            newly_full = []
            for i, (req, n) in enumerate(zip(chunk_reqs, lens)):
                if (req.cached + n) // cache.page_size > req.cached // cache.page_size:
                    newly_full.append(req)
                req.cached += n
                if not req.prefilling:  # prompt complete: its last row gives the first token
                    req.out.append(int(tok[i]))
                    req.top.append(float(top[i]))
                    st.first_tokens += 1
            # Full pages just written become shareable by later requests with the same prefix.
            engine.cache_prompts([r.slot for r in newly_full], [r.prompt[: r.cached] for r in newly_full])
            if progress is not None:
                progress.update(sum(1 for r in chunk_reqs if not r.prefilling))

        # 3. One decode step for every request that has a token to feed back.
        dec = [r for r in active.values() if not r.prefilling and not r.done]
        if dec:
            engine.make_room(sum(r.cached % cache.page_size == 0 for r in dec))
            t0 = time.perf_counter()
            tok, top = engine.decode([r.out[-1] for r in dec], [r.slot for r in dec])
            st.decode_s += time.perf_counter() - t0
            st.decode_steps += 1
            st.decode_rows += len(dec)
            st.decode_tokens += len(dec)
            for i, req in enumerate(dec):
                req.cached += 1
                req.out.append(int(tok[i]))
                req.top.append(float(top[i]))
            if progress is not None:
                progress.update(len(dec))
        peaks()
        st.peak_active = max(st.peak_active, len(active))

        # 4. Finished requests give back their slot; their pages are freed (full prompt pages stay
        #    in the prefix cache until evicted).
        done = [r for r in active.values() if r.done]
        if done:
            engine.release([r.slot for r in done])
            for r in done:
                r.finished_at = step
                del active[r.slot]
                free_slots.append(r.slot)
        if progress is not None:
            progress.set_postfix(collections.OrderedDict(
                running=len(active), waiting=len(waiting), pages_held=engine.pages_held,
                cached=engine.pages_cached_only, free=engine.num_free), refresh=False)
        step += 1
    return st


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
    max_logit_err: float  # max |paged logit - dense logit| of the chosen tokens
    worst_margin: float  # largest dense margin among differing tokens (0 if none)

    @property
    def passed(self) -> bool:
        return self.failures == 0


def dense_check(dense_model: Llama, requests: list[Request], tol: float, rows: int = 8) -> CheckResult:
    """Teacher-forced dense run: one causal forward pass over each whole sequence (prompt + generated
    tokens) gives the dense model's greedy choice at every generated position. Equal choices at every
    position <=> the dense model's own greedy decode yields the same tokens (by induction)."""
    L = max(r.final_len for r in requests)
    n = -(-len(requests) // rows) * rows
    seqs = np.zeros((n, L), np.int32)
    target = np.zeros((n, L), np.int32)  # paged path's token predicted at each position
    for i, r in enumerate(requests):
        full = np.concatenate([r.prompt, np.asarray(r.out, np.int32)])
        seqs[i, : r.final_len] = full[: r.final_len]
        target[i, : r.final_len] = full[1: r.final_len + 1]
    graphdef, params = nnx.split(dense_model)

    @jax.jit
    def run(params, toks, tgt):
        with jax.default_matmul_precision("highest"):
            logits = nnx.merge(graphdef, params).dense(toks)  # [rows, L, V] float32
        at = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jnp.argmax(logits, axis=-1), jnp.max(logits, axis=-1), at

    best, top, at = [], [], []
    for s in range(0, n, rows):
        a, m, t = run(params, seqs[s: s + rows], target[s: s + rows])
        best.append(np.asarray(a)), top.append(np.asarray(m)), at.append(np.asarray(t))
    best, top, at = np.concatenate(best), np.concatenate(top), np.concatenate(at)

    res = CheckResult(0, 0, 0, 0, tol, 0.0, 0.0)
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
        res.max_logit_err = max(res.max_logit_err, float(np.max(np.abs(np.asarray(r.top) - at[i, pos]))))
    return res


# ---------------------------------------------------------------------------------------------
# Run and report
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
    backend: str  # attention backend that ran: "reference" or "flashinfer"
    device: str
    dtype: str
    model: ModelConfig
    cache: sa.CacheConfig
    chunk: int
    requests: list[Request]
    stats: Stats
    compile_s: float
    run_s: float
    traces: dict  # traces of each model / allocator step (1 each)
    compiles_warmup: int  # XLA compilations while warming up
    compiles_serving: list  # names of XLA compilations while serving (first-time bookkeeping shapes)
    kv_in_place: bool
    free_pages_at_end: int
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


def _attention_backend(requested: str, cache: sa.CacheConfig, dtype: str, num_heads: int) -> str:
    """The backend the attention ops will run on: FlashInfer only where it is available and takes
    this configuration (both the prefill and the decode kernel), else the reference."""
    if resolve_backend(requested) == "reference":
        return "reference"
    for kind in ("prefill", "decode"):
        reason = attention.flashinfer_unsupported_reason(cache, dtype, num_heads, kind=kind)
        if reason is not None:
            if requested == "flashinfer":
                raise SystemExit(f"--backend flashinfer: {reason}")
            return "reference"
    return "flashinfer"


def run(argv=None, *, progress: bool | None = None) -> Summary:
    """Parse `argv`, serve the requests, check against the dense model; returns the `Summary`."""
    parser = build_parser()
    a = parser.parse_args(argv)
    _check_args(parser, a)
    try:
        resolved = resolve_backend(a.backend)
    except RuntimeError as e:
        parser.error(str(e))
    dtype = a.dtype if a.dtype != "auto" else ("float32" if resolved == "reference" else "float16")
    tol = a.tol if a.tol is not None else DEFAULT_TOL[dtype]

    rng = np.random.default_rng(a.seed)
    requests, _ = make_requests(a, rng)
    mcfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                       num_kv_heads=a.kv_heads, head_dim=a.head_dim, ffn_dim=a.ffn, dtype=dtype)
    longest = max(r.final_len for r in requests)
    if -(-longest // a.page_size) > a.num_pages:
        parser.error(f"--num-pages {a.num_pages} cannot hold the longest request ({longest} tokens = "
                     f"{-(-longest // a.page_size)} pages of {a.page_size}): raise --num-pages")
    cache = sa.CacheConfig(num_pages=a.num_pages, page_size=a.page_size, num_kv_heads=a.kv_heads,
                           head_dim=a.head_dim, max_seqs=a.batch,
                           max_pages_per_seq=-(-longest // a.page_size), num_layers=a.layers, dtype=dtype)
    backend = _attention_backend(a.backend, cache, dtype, a.heads)

    model = Llama.from_seed(mcfg, a.seed, cache=cache, backend=a.backend)
    engine = Engine(model, cache, chunk=a.chunk, prefix_cache=not a.no_prefix_cache)
    n0 = len(_COMPILES)
    compile_s = engine.warmup()
    n1 = len(_COMPILES)

    show = (not a.quiet) if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=sum(r.max_new for r in requests), unit="tok", desc="serving", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        stats = serve(engine, requests, progress=bar)
        jax.block_until_ready(engine.kv)
    finally:
        if bar is not None:
            bar.close()
    run_s = time.perf_counter() - t0
    serving_compiles = _COMPILES[n1:]
    stats.cached_at_end = engine.shutdown()  # drop the prefix cache: every page is free again

    check = None
    if not a.no_check:
        dense = Llama.from_seed(dataclasses.replace(mcfg, dtype="float32"), a.seed)
        nnx.update(dense, nnx.state(model, nnx.Param))  # the very same weights, float32 compute
        check = dense_check(dense, requests, tol)

    return Summary(backend=backend, device=str(jax.devices()[0].device_kind), dtype=dtype, model=mcfg,
                   cache=cache, chunk=a.chunk, requests=requests, stats=stats, compile_s=compile_s,
                   run_s=run_s, traces=dict(engine.traces), compiles_warmup=n1 - n0,
                   compiles_serving=serving_compiles, kv_in_place=engine.kv_moves == 0,
                   free_pages_at_end=engine.num_free,
                   prefix_cache=None if engine.pc is None else engine.pc.stats, check=check)


def report(s: Summary, console=None) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = console or Console()
    st, m, c = s.stats, s.model, s.cache
    gen = s.generated_tokens
    t = Table(title="seqattn_jax: continuous batching on a paged KV cache", show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    t.add_row("backend", f"{s.backend} attention on {s.device} ({jax.default_backend()}), {s.dtype}")
    t.add_row("model", f"{m.num_params() / 1e6:.2f}M params, {m.num_layers} layers, d={m.d_model}, "
                       f"{m.num_heads} q / {m.num_kv_heads} kv heads x {m.head_dim}, vocab {m.vocab_size}")
    t.add_row("requests", f"{len(s.requests)} served, {sum(r.done for r in s.requests)} finished, "
                          f"up to {st.peak_active} at once in {c.max_seqs} slots")
    t.add_row("tokens", f"{s.prompt_tokens} prompt ({st.prefill_tokens} prefilled, {st.tokens_reused} "
                        f"from the prefix cache), {gen} generated")
    t.add_row("throughput", f"{gen / s.run_s:,.0f} generated tok/s, {(st.prefill_tokens + gen) / s.run_s:,.0f} "
                            f"tok/s with prefill, {s.run_s:.2f} s")
    busy = max(st.prefill_s + st.decode_s, 1e-9)
    t.add_row("prefill", f"{st.prefill_steps} chunks of {s.chunk} rows, {st.prefill_tokens} tokens, "
                         f"{st.prefill_s:.2f} s ({100 * st.prefill_s / busy:.0f}%), "
                         f"{st.prefill_tokens / max(st.prefill_s, 1e-9):,.0f} tok/s")
    t.add_row("decode", f"{st.decode_steps} steps, {st.decode_rows / max(st.decode_steps, 1):.1f} of "
                        f"{c.max_seqs} rows busy, {st.decode_tokens} tokens, {st.decode_s:.2f} s "
                        f"({100 * st.decode_s / busy:.0f}%), {st.decode_tokens / max(st.decode_s, 1e-9):,.0f} tok/s")
    t.add_row("KV pages", f"peak {st.peak_held} held by requests vs {s.padded_dense_pages} for a dense cache "
                          f"padded to the longest request ({100 * st.peak_held / s.padded_dense_pages:.0f}%); "
                          f"pool {c.num_pages} x {c.page_size} tokens, up to {st.peak_in_use} in use with the "
                          f"prefix cache; {s.free_pages_at_end} free at the end")
    pcs = s.prefix_cache
    if pcs is None:
        t.add_row("prefix cache", "off (--no-prefix-cache)")
    else:
        t.add_row("prefix cache", f"{pcs.hits} hits in {pcs.requests} requests: {pcs.cached_tokens} prompt "
                                  f"tokens ({pcs.cached_tokens // c.page_size} pages) shared, not "
                                  f"recomputed or stored again; {pcs.evicted_pages - st.cached_at_end} pages evicted "
                                  f"(LRU) to make room")
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
        t.add_row("paged = dense", f"{verdict}: {detail}; max |logit diff| {ch.max_logit_err:.1e}")
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
