"""`Engine`: continuous batching over a paged KV cache, for any model of the `ServingModel` protocol.

    engine = Engine(model, params, cache_config, EngineConfig(chunk=256))
    handle = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.7, seed=1))
    for token in handle:             # streams; drives the engine while it waits
        ...
    outputs = engine.generate([p1, p2, ...], SamplingParams(max_new_tokens=32))   # all at once

What one iteration (`Engine.step`) does, on the host:
  1. events: cancelled and finished requests give back their slot and pages; waiting requests are
     admitted (first come, first served) while a slot is free and the pages of their whole life
     (prompt + max_new_tokens) fit beside what running requests are still owed, so no running
     request is ever stopped for lack of pages. With the prefix cache, a prompt's cached prefix is
     shared at admission and its full pages are indexed once its prefill is done.
  2. work: a prefill chunk (up to `chunk` rows of the oldest prefilling requests) and a decode row
     for every request whose prompt is done; run as ONE "mixed" step (batch POD attention) when
     both exist (`mixed_steps`), else as a prefill step and/or a decode step.
  3. dispatch, then read back the PREVIOUS step's sampled tokens (`async_steps`): the GPU has the
     next step queued while the host reads, so it never waits for the host in the steady state.
     Decode inputs never come from the host: each slot's last sampled token stays on the device
     (`last_tok`) and the next step reads it there. A request that generates a stop token has at
     most one more token computed (already dispatched), which is discarded.

Host mirrors instead of device reads: the host knows every sequence's length (it schedules every
token), so it plans FlashInfer's decode on the host (`host_plan_decode`) and counts free pages
itself (admission takes the prompt's pages, a decode step takes a page when a sequence crosses a
page boundary, a release gives them back). The prefix cache's index needs page ids and reference
counts: it reads them from a copy of the allocator state on the CPU, kept equal to the device's
by applying every change to both (serving/mirror.py: the same jitted functions on the CPU; the
prefix cache's changes are recorded and replayed on the device). So no iteration reads the device
except the lagged tokens, with or without the prefix cache.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax import attention
from seqattn_jax.backend import BACKENDS, default_backend
from seqattn_jax.config import CacheConfig
from seqattn_jax.kv import init_kv
from seqattn_jax.serving.mirror import (RecordingPrefixCache, mirror_decode, mirror_differences,
                                        to_host)
from seqattn_jax.serving.model import ServingModel
from seqattn_jax.serving.sampling import SamplingParams
from seqattn_jax.serving.step import (StepKind, build_step, fold_host_plan, num_out_rows,
                                      pack_inputs, step_inputs_spec, step_options)
from seqattn_jax.sharding import TensorParallel
from seqattn_jax.state import allocate, init_state, release
from seqattn_jax.validation import Status

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestHandle"]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine schedules (all static).

    Attributes:
      chunk: prefill token rows per step (the largest bucket).
      chunk_buckets: smaller prefill row counts compiled too; a step takes the smallest bucket that
        holds its chunk (a mixed step with a 20-token prompt tail does not pay for `chunk` rows).
        Default: `chunk // 8` (at least 16) and `chunk`.
      max_prefill_requests: most requests sharing one prefill chunk.
      prefix_cache: share cached prompt prefixes (`seqattn_jax.PrefixCache`).
      mixed_steps: run a prefill chunk and the decode batch as one forward (batch POD).
      async_steps: dispatch step t+1 before reading step t's tokens (the host lags one step).
      host_plans: plan every step's attention on the host from the lengths the host knows
        (FlashInfer: no device sync inside a step); False plans inside the step.
      decode_steps: K >= 1 decode steps per dispatch when only decode work is running (no prompt
        to prefill, and no slot frees up for a waiting request within the K steps): multi-step
        decode, one program running K forwards with allocation, sampling and token feedback on
        the device. A request stopped by a stop token
        computes at most K - 1 tokens past it (discarded); none runs past its max_new_tokens.
      backend: attention backend: "auto" | "reference" | "flashinfer" or a backend object
        (e.g. `seqattn_jax.bridge.FlashInferBackend(...)`).
      mesh: None (one device) or a `jax.sharding.Mesh` with axis `mesh_axis` to run tensor
        parallel over (`seqattn_jax.sharding`): the pool is sharded over its KV heads, the state,
        tokens and step inputs replicated; the params must be laid out for it
        (`sharding.shard_llama`).
      mesh_axis: the mesh axis the heads are split over.
      overlap_dispatch: run each step program's dispatch (`jax.jit`'s call: XLA launching the
        step's kernels and CUDA graphs, which holds the calling thread until they are enqueued)
        on a worker thread, so the host's Python for the next step (scheduling, host plans,
        inputs) runs meanwhile. Tokens, order and results are the same. Off by default: on a CPU
        the thread hand-off costs more than it hides, on one H200 it changed nothing (8B, batch
        64: served 7.48 vs 7.51 ms), on two the served tensor-parallel step was 5.78 ms against
        5.67 and 6.63 ms inline in two runs, i.e. as fast as the best inline run, held there by
        XLA's own launch of the step's 67 graphs and 64 all-reduces (benchmarks/README.md,
        "Session 8", run T5).
    """

    chunk: int = 256
    chunk_buckets: tuple[int, ...] | None = None
    max_prefill_requests: int = 8
    prefix_cache: bool = True
    mixed_steps: bool = True
    async_steps: bool = True
    host_plans: bool = True
    decode_steps: int = 1
    backend: object = "auto"
    mesh: object = None
    mesh_axis: str = "tp"
    overlap_dispatch: bool = False

    def __post_init__(self):
        for name in ("chunk", "max_prefill_requests", "decode_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {v!r}")
        buckets = self.chunk_buckets
        if buckets is None:
            buckets = tuple(sorted({max(16, self.chunk // 8), self.chunk})) if self.chunk > 16 \
                else (self.chunk,)
        buckets = tuple(sorted(set(int(b) for b in buckets) | {self.chunk}))
        if buckets[0] <= 0 or buckets[-1] != self.chunk:
            raise ValueError(f"EngineConfig.chunk_buckets must be positive ints <= chunk "
                             f"({self.chunk}), got {self.chunk_buckets!r}")
        object.__setattr__(self, "chunk_buckets", buckets)
        if self.mesh is not None:
            try:
                TensorParallel(self.mesh, self.mesh_axis)
            except ValueError as e:
                raise ValueError(f"EngineConfig.mesh / mesh_axis: {e}") from None
        if isinstance(self.backend, str) and self.backend not in BACKENDS:
            raise ValueError(f"EngineConfig.backend must be one of {BACKENDS} or a backend "
                             f"object, got {self.backend!r}")


@dataclasses.dataclass
class EngineStats:
    """Counters and host-side timings of an engine's life."""

    steps: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prefill_tokens: int = 0        # prompt tokens computed
    reused_tokens: int = 0         # prompt tokens taken from the prefix cache
    generated_tokens: int = 0      # tokens handed to callers
    discarded_tokens: int = 0      # computed after a stop token, dropped
    decode_rows: int = 0           # sum of decode batch occupancy (over every decode sub-step)
    multi_steps: int = 0           # multi-step decode dispatches (EngineConfig.decode_steps > 1)
    mirror_reads: int = 0          # prefix cache: reads of the allocator's CPU mirror (never the
                                   # device: serving/mirror.py)
    peak_running: int = 0
    peak_pages_in_use: int = 0
    # host wall time in each phase of `step` (seconds): scheduling (admission, releases, the
    # prefix cache on the CPU mirror), dispatch (inputs, host plans, the jitted call; it waits
    # when the device queue is full), and receiving (waiting for and handing out the lagged
    # tokens)
    events_s: float = 0.0
    dispatch_s: float = 0.0
    receive_s: float = 0.0


def _sampling_row(sp: SamplingParams | None) -> tuple:
    """(temperature, top_k, top_p, seed mod 2**32) of one step row; None: a greedy padding row.
    Float64 holds each exactly (seeds < 2**32)."""
    if sp is None:
        return _PAD_ROW
    return (sp.temperature, sp.top_k, sp.top_p, sp.seed % (1 << 32))


_PAD_ROW = (0.0, 0, 1.0, 0)   # SamplingParams()'s: greedy


class _Request:
    __slots__ = ("id", "prompt", "sampling", "handle", "on_token", "slot", "prefilled", "kv_len",
                 "n_sched", "tokens", "finish_reason", "error", "cancelled", "released", "cached",
                 "indexed", "t_submit", "srow", "plen", "max_new")

    def __init__(self, rid, prompt, sampling, on_token):
        self.id, self.prompt, self.sampling, self.on_token = rid, prompt, sampling, on_token
        self.srow = _sampling_row(sampling)   # the step's per-row sampling inputs, made once
        # read by the scheduler for every running request every step: plain attributes
        self.plen, self.max_new = len(prompt), sampling.max_new_tokens
        self.slot = -1
        self.prefilled = 0        # prompt tokens in the KV cache or scheduled into a dispatched chunk
        self.kv_len = 0           # KV length after every dispatched step
        self.n_sched = 0          # generated tokens scheduled (dispatched)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.released = True      # holds no slot
        self.cached = 0           # prompt tokens shared from the prefix cache
        self.indexed = False      # full prompt pages handed to the prefix cache
        self.t_submit = time.perf_counter()
        self.handle = None

    @property
    def final_len(self) -> int:
        """KV length at the end: the last generated token is never fed back."""
        return len(self.prompt) + self.sampling.max_new_tokens - 1

    @property
    def prompt_done(self) -> bool:
        return self.prefilled >= self.plen

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """A submitted request: its tokens so far, its state, and an iterator over its tokens.

    Iterating yields each generated token as soon as the engine has it, running engine steps
    while none is buffered; it ends when the request finishes ("stop", "length" or "cancelled").
    """

    def __init__(self, engine: "Engine", req: _Request):
        self._engine, self._req = engine, req

    @property
    def id(self) -> int:
        return self._req.id

    @property
    def tokens(self) -> list[int]:
        """Generated tokens received so far (a copy)."""
        return list(self._req.tokens)

    @property
    def done(self) -> bool:
        return self._req.finished

    @property
    def finish_reason(self) -> str | None:
        """None while running; "stop" (a stop token), "length" (max_new_tokens) or "cancelled"."""
        return self._req.finish_reason

    def cancel(self) -> None:
        self._engine.cancel(self)

    def result(self) -> np.ndarray:
        """Run the engine until this request finishes; its generated tokens (int32)."""
        while not self._req.finished:
            self._engine.step()
        return np.asarray(self._req.tokens, np.int32)

    def __iter__(self) -> Iterator[int]:
        """Every generated token from the first, waiting (running engine steps) for new ones."""
        read = 0
        while True:
            if read < len(self._req.tokens):
                read += 1
                yield self._req.tokens[read - 1]
            elif self._req.finished:
                return
            else:
                self._engine.step()

    def __repr__(self):
        return (f"RequestHandle(id={self.id}, tokens={len(self._req.tokens)}, "
                f"finish_reason={self.finish_reason!r})")


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose tokens the host has not read yet."""

    out: jax.Array | None                 # int32 [R + 2]: tokens, then allocation ok, plan ok
    #                                       (None while its dispatch runs on the worker thread)
    rows: list                            # (row index, request) whose token counts
    kind: str


class _Settled:
    """An `Engine` attribute that every step program replaces (the pool, the allocator state, the
    last tokens). Reading or replacing it first waits for the step program call still running on
    the worker thread, if any (`EngineConfig.overlap_dispatch`; `Engine._settle`)."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, eng, owner=None):
        if eng is None:
            return self
        eng._settle()
        return getattr(eng, self.slot)

    def __set__(self, eng, value):
        eng._settle()
        setattr(eng, self.slot, value)


# Trace counts of the step programs, by (model, cache, kind, B, Bp, C, backend): each compiles once
# per process however many engines use it (tests and `chex.assert_max_traces`-style checks read it).
STEP_TRACES: collections.Counter = collections.Counter()


@functools.lru_cache(maxsize=64)
def _jitted_step(model, cache, kind, B, Bp, C, backend, tp=None):
    """One jitted step program per static configuration, shared by every engine (a second engine
    with the same model and cache compiles nothing). The pool, state and last_tok are donated."""
    step = build_step(model, cache, kind, B=B, Bp=Bp, C=C, backend=backend, tp=tp)
    key = (model, cache, kind, B, Bp, C, backend) + (() if tp is None else (tp,))

    def traced(*args):
        STEP_TRACES[key] += 1
        return step(*args)

    return jax.jit(traced, donate_argnums=(1, 2, 3))


class Engine:
    """Continuous batching over a paged KV cache (see the module docstring).

    Args:
      model: a `ServingModel` (e.g. `seqattn_jax.models.llama.LlamaModel`).
      params: its parameters, in the compute dtype (the engine never casts them).
      cache: the `CacheConfig`: `max_seqs` is the decode batch (slots), `num_pages` the pool,
        `max_pages_per_seq * page_size` the longest request (prompt + generated tokens).
      config: `EngineConfig`.
    """

    def __init__(self, model: ServingModel, params, cache: CacheConfig,
                 config: EngineConfig = EngineConfig()):
        if not isinstance(cache, CacheConfig):
            raise ValueError(f"Engine: cache must be a CacheConfig, got {type(cache).__name__}")
        if not isinstance(config, EngineConfig):
            raise ValueError(f"Engine: config must be an EngineConfig, got {type(config).__name__}")
        for name, want in (("num_layers", cache.num_layers), ("num_kv_heads", cache.num_kv_heads),
                           ("head_dim", cache.head_dim)):
            got = getattr(model, name, None)
            if got != want:
                raise ValueError(f"Engine: model.{name} = {got!r} does not match the cache config's "
                                 f"{name} = {want}")
        self.model, self.params, self.cache, self.config = model, params, cache, config
        # overlap_dispatch: the step program call running on the worker (future, its _Pending,
        # whether it adopted host plans); kv / state / last_tok wait for it (_Settled); set first,
        # before the first of those is assigned
        self._inflight = None
        self._worker = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="seqattn-dispatch") if config.overlap_dispatch else None
        self.B = cache.max_seqs
        self.Bp = min(config.max_prefill_requests, cache.max_seqs)
        self.backend = default_backend(config.backend) if isinstance(config.backend, str) \
            else config.backend
        self.options = step_options(model)
        self.tp = None if config.mesh is None else TensorParallel(config.mesh, config.mesh_axis)
        self.kv = init_kv(cache)
        self.state = init_state(cache)
        self.last_tok = jnp.zeros((cache.max_seqs,), jnp.int32)
        if self.tp is not None:   # the pool in head shards; the small int arrays replicated
            self.tp.check(cache, model.num_heads, self.backend, "Engine")
            if getattr(model, "tp", self.tp.size) != self.tp.size:
                raise ValueError(f"Engine: model.tp = {model.tp} but the mesh axis "
                                 f"{self.tp.axis!r} has {self.tp.size} devices (lay the params "
                                 f"out with seqattn_jax.sharding.shard_llama)")
            self.kv = self.tp.init_kv(cache)
            self.state, self.last_tok = self.tp.replicate((self.state, self.last_tok))
        # the prefix cache runs on a CPU copy of the allocator state (no GPU reads, see mirror.py)
        self.pc = RecordingPrefixCache(cache) if config.prefix_cache else None
        self._host = to_host(init_state(cache)) if self.pc is not None else None
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[int, _Request] = {}          # slot -> request
        # slot -> the running requests whose prompt is not all scheduled yet, in admission order:
        # the prefill planner looks at these only (not at every decoding row each step)
        self._prefilling: dict[int, _Request] = {}
        self._free_slots = list(range(self.B))
        self._pending: collections.deque[_Pending] = collections.deque()
        self._checks: list = []                          # device ok flags of async ops, checked lazily
        self._free = cache.num_pages                      # host mirror: free pages
        self._rc: np.ndarray | None = None               # prefix cache: the mirror's refcounts
        self._alloc = jax.jit(lambda s, ids, lens: allocate(s, ids, lens), donate_argnums=(0,))
        self._release = jax.jit(lambda s, ids: release(s, ids), donate_argnums=(0,))

    # ------------------------------------------------------------------------ device arrays
    # The pool, allocator state and last tokens are replaced by every step program. With
    # `overlap_dispatch` the latest call may still be running on the worker thread: reading or
    # replacing them first waits for it (`_settle`), so every other method sees a settled engine.

    kv = _Settled()          # jax.Array: the pool (`CacheConfig.kv_shape`)
    state = _Settled()       # the allocator's `State`
    last_tok = _Settled()    # int32 [max_seqs]: each slot's last sampled token

    def _land(self, pend: _Pending, host_plan: bool, call) -> None:
        """Run a step program's `call` (or take its result) and store what it returned."""
        try:
            self._kv, self._state, self._last_tok, out = call()
        except Exception:
            if host_plan:
                self.backend.discard_host_plans()
            raise
        # start the read-back now: enqueued behind this step only, so reading it after the next
        # step is dispatched does not wait for that step too (the GPU would idle meanwhile)
        out.copy_to_host_async()
        pend.out = out

    def _settle(self) -> None:
        """Wait for the step program call on the worker thread, if any, and store its results
        (its exception, if it raised, is raised here)."""
        if self._inflight is None:
            return
        fut, pend, host_plan = self._inflight
        self._inflight = None
        self._land(pend, host_plan, fut.result)

    # ------------------------------------------------------------------------ public API

    def submit(self, prompt, sampling: SamplingParams | None = None, *,
               on_token: Callable[[int], None] | None = None) -> RequestHandle:
        """Queue a request. Returns its `RequestHandle`.

        Args:
          prompt: 1-D int token ids, at least one, each in [0, model.vocab_size).
          sampling: `SamplingParams` (default: greedy, 16 tokens).
          on_token: called with each generated token, in order, as the engine receives it.
        Raises:
          ValueError naming the problem (empty prompt, out-of-vocabulary id, a request that can
          never fit in the cache): nothing is queued and other requests are unaffected.
        """
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"submit: sampling must be a SamplingParams, got {type(sampling).__name__}")
        p = np.asarray(prompt)
        if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
            raise ValueError(f"submit: prompt must be a 1-D sequence of int token ids, got "
                             f"{p.dtype}{p.shape}")
        if p.size == 0:
            raise ValueError("submit: prompt is empty (at least one token is needed to start "
                             "generating)")
        vocab = self.model.vocab_size
        bad = np.nonzero((p < 0) | (p >= vocab))[0]
        if bad.size:
            raise ValueError(f"submit: prompt token id {int(p[bad[0]])} at position {int(bad[0])} "
                             f"is outside the vocabulary [0, {vocab})")
        req = _Request(next(self._ids), p.astype(np.int32), sampling, on_token)
        need = self.cache.pages_for(req.final_len)
        limit = min(self.cache.max_pages_per_seq, self.cache.num_pages)
        if need > limit:
            raise ValueError(
                f"submit: prompt ({p.size} tokens) + max_new_tokens ({sampling.max_new_tokens}) "
                f"needs {need} pages of {self.cache.page_size} tokens; a request can hold at most "
                f"{limit} (CacheConfig.max_pages_per_seq / num_pages)")
        req.handle = RequestHandle(self, req)
        self._waiting.append(req)
        return req.handle

    def cancel(self, handle: RequestHandle | int) -> None:
        """Stop a request now: it generates nothing more, and its slot and pages are freed at the
        next step (with the prefix cache, once a waiting request needs them or the engine runs
        out of work: see `_events`). Cancelling a finished request does nothing."""
        rid = handle.id if isinstance(handle, RequestHandle) else int(handle)
        for r in self._waiting:
            if r.id == rid:
                self._waiting.remove(r)
                self._finish(r, "cancelled")
                return
        for r in self._running.values():
            if r.id == rid and not r.finished:
                r.cancelled = True
                self._finish(r, "cancelled")
                return

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._pending)

    def step(self) -> bool:
        """One iteration (events, dispatch, lagged read-back). Returns `has_work`."""
        t0 = time.perf_counter()
        self._events()
        t1 = time.perf_counter()
        dispatched = self._dispatch()
        t2 = time.perf_counter()
        lag = 1 if (self.config.async_steps and dispatched) else 0
        while len(self._pending) > lag:
            self._receive(self._pending.popleft())
        st = self.stats
        st.events_s += t1 - t0
        st.dispatch_s += t2 - t1
        st.receive_s += time.perf_counter() - t2
        if not dispatched and not self._pending and (self._waiting and not self._running):
            r = self._waiting[0]
            raise RuntimeError(f"request {r.id} cannot be admitted into an empty engine "
                               f"(a scheduler bug: submit checks that every request fits)")
        return self.has_work

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.step():
            pass

    def generate(self, prompts: Sequence, sampling: SamplingParams | Sequence[SamplingParams] | None
                 = None) -> list[np.ndarray]:
        """Submit every prompt, run to completion, return each request's generated tokens."""
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(sampling)} SamplingParams")
        handles = [self.submit(p, s) for p, s in zip(prompts, sampling)]
        self.run()
        return [h.result() for h in handles]

    def warmup(self, *, sampled: bool = False) -> float:
        """Compile every step program serving can run (each prefill bucket as a prefill step and,
        with `mixed_steps`, as a mixed step, the decode step; `sampled` adds the non-greedy
        variants), so that serving compiles nothing. Runs each once on a scratch allocator state
        with two throwaway sequences; call it before submitting requests (their K/V land in
        pages that are free then, which attention never reads). With the prefix cache it also
        compiles the allocator programs of admission, indexing and release on the CPU mirror and
        on the device. Returns seconds."""
        if self.has_work:
            raise RuntimeError("warmup: call it before submitting requests")
        t0 = time.perf_counter()
        cfg, C = self.cache, self.config.chunk_buckets
        n_p = max(1, min(C[-1], cfg.max_seq_len - 2))
        K = self.config.decode_steps
        kinds = ("prefill", "mixed") if self.config.mixed_steps else ("prefill",)
        # (kind, chunk, sub-steps, full: 0 = one live row, i > 0 = see below)
        programs = [(k, c, 1, 0) for k in kinds for c in C] + [("decode", C[-1], 1, 0)]
        if K > 1:
            programs.append(("decode", C[-1], K, 0))
        if self.config.host_plans and self.B > 1 and cfg.num_pages >= 2 * self.B:
            # A decode plan with every row live can differ from one with few (FlashInfer's
            # CUDA-graph plans drop the KV split when the live rows fill the GPU:
            # bridge/fi_provider.py), and the plans are part of the program: compile those too.
            # In a K-step dispatch rows that reach max_new_tokens sit out the later sub-steps,
            # so the live rows can drop within it: full = i runs every row through the first i
            # sub-steps and one row through the rest (i = K: all of them).
            programs += [(n, c, k, i) for n, c, k, _ in programs if n == "decode"
                         for i in range(1, k + 1)]
        for greedy in ((True, False) if sampled else (True,)):
            for kind_name, c, steps, full in programs:
                state = init_state(cfg)
                lens = [min(n_p, c), 2] if self.B > 1 else [min(n_p, c)]
                if full:
                    lens = [2] * self.B
                lens = [min(n, cfg.max_seq_len - steps) for n in lens]
                state, _ = allocate(state, self._pad(list(range(len(lens)))), self._pad(lens, 0))
                kind = StepKind(kind_name, greedy_only=greedy, host_plan=self.config.host_plans,
                                steps=steps)
                inp = {}
                if kind.has_prefill:
                    inp.update(p_tokens=np.zeros((c,), np.int32), p_ids=self._padp([0]),
                               p_new=self._padp([lens[0]], 0), p_end=self._padp([lens[0]], 0),
                               p_emit=self._padp([0]))
                d_lens = np.zeros((steps, self.B), np.int32)
                if kind.has_decode and full:
                    inp["d_ids"] = self._pad(list(range(self.B)))
                    d_n = np.full((self.B,), full, np.int32)
                    d_n[0] = steps
                    j = np.arange(steps)[:, None]
                    d_lens[:] = np.where(j < d_n[None, :], np.asarray(lens)[None, :] + 1 + j, 0)
                    if steps > 1:
                        inp["d_n"] = d_n
                elif kind.has_decode:
                    d = 1 if len(lens) > 1 and kind.has_prefill else 0
                    inp["d_ids"] = self._pad([d])
                    d_lens[:, 0] = lens[d] + 1 + np.arange(steps)
                    if steps > 1:
                        inp["d_n"] = self._pad([steps], 0)
                r = num_out_rows(kind, self.B, self.Bp)
                inp.update(self._sampling_arrays([None] * r, [0] * r))
                hp = None
                if kind.host_plan:
                    hp = tuple(self._host_plan(kind_name, inp, d_lens[j], c)
                               for j in range(steps))
                    hp = hp[0] if steps == 1 else hp
                fn = self._step_fn(kind, c)
                flat, hp = fold_host_plan(
                    pack_inputs(step_inputs_spec(kind, self.B, self.Bp, c), inp), hp)
                self.kv, _, last, out = fn(self.params, self.kv, state,
                                           jnp.zeros_like(self.last_tok), flat, hp)
                if not np.all(np.asarray(out)[-2:] == 1):
                    raise RuntimeError(f"warmup: the {kind_name} step's checks failed")
        # the allocator / prefix-cache programs of admission, indexing and release (fixed shapes)
        prompt = np.zeros((min(cfg.page_size + 1, cfg.max_seq_len),), np.int32)
        slots, empty = self._pad([0]), [np.zeros((0,), np.int32)] * (self.B - 1)
        if self.pc is not None:   # on the CPU mirror, replayed on the device (mirror.py)
            pc, dev = RecordingPrefixCache(cfg), self.state
            st = pc.admit_batch(to_host(init_state(cfg)), slots,
                                [prompt] + [prompt[:1]] * (self.B - 1)).state
            st = pc.insert_slots(st, slots, [prompt] + empty)
            st = mirror_decode(st, slots, None, 1)
            if K > 1:
                st = mirror_decode(st, slots, self._pad([K], 0), K)
            st, _, _ = pc.release(st, slots)
            pc.make_room(st, cfg.num_pages)
            pc.replay(jax.tree_util.tree_map(jnp.copy, dev))
        else:
            st, _ = self._alloc(init_state(cfg), slots, self._pad([len(prompt)], 0))
            self._release(st, slots)
        jax.block_until_ready(self.kv)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------ pages

    @property
    def num_free_pages(self) -> int:
        """Free pages by the host mirror (no device read)."""
        return self._free

    def _owed(self) -> int:
        """Pages running requests will still take (decode growth up to their final length)."""
        cfg = self.cache
        return sum(cfg.pages_for(r.final_len) - cfg.pages_for(self._held(r))
                   for r in self._running.values() if not r.released and not r.finished)

    def _sync_rc(self) -> None:
        """Prefix cache: re-read the reference counts from the CPU mirror (waits for nothing on
        the device)."""
        self._rc = np.asarray(self._host.refcount)
        self._free = int(np.sum(self._rc == 0))
        self.stats.mirror_reads += 1

    def _replay(self) -> None:
        """Apply the prefix cache's recorded changes of the CPU mirror to the device state."""
        self.state = self.pc.replay(self.state)

    def _evictable(self) -> np.ndarray:
        return self.pc.cached_mask & (self._rc == 1)

    def check_idle(self) -> dict:
        """With no request left: evict the prefix cache and read the allocator back. Returns
        {"pages_in_use", "active_slots"}; both are 0 unless pages leaked."""
        if self.has_work:
            raise RuntimeError("check_idle: requests are still running")
        self._flush_checks()
        if self.pc is not None:
            self._host = self.pc.evict(self._host).state
            self._replay()
            diff = mirror_differences(self.state, self._host)
            if diff:
                raise RuntimeError(f"check_idle: the allocator state's CPU mirror differs from the "
                                   f"device state in {diff} (a bug: please report it)")
        rc = np.asarray(self.state.refcount)
        return {"pages_in_use": int(np.sum(rc != 0)),
                "active_slots": int(np.sum(np.asarray(self.state.active)))}

    # ------------------------------------------------------------------------ events

    def _finish(self, r: _Request, reason: str) -> None:
        if r.finish_reason is None:
            r.finish_reason = reason

    def _events(self) -> None:
        cfg = self.cache
        # 1. give back the slots of finished / cancelled requests
        # (a request whose every token is dispatched gives its slot back now: the release runs on
        # the device after those steps, as the state threads through them, and its last tokens
        # still arrive through the pending steps)
        # (only here are slots released, and released requests leave `_running` right away, so
        # every running request holds its slot; one pass over them per step)
        done = [r for r in self._running.values() if r.finish_reason is not None or (
            r.prefilled >= r.plen and r.n_sched >= r.max_new)]
        # With the prefix cache a release is a host call (on the CPU mirror, replayed on the
        # device). While no request waits for a slot or pages, nothing needs them: release in
        # one batch when one does, or when no running request has work left.
        if done and (self.pc is None or self._waiting or len(done) == len(self._running)):
            self._release_slots(done)
            for r in done:
                del self._running[r.slot]
                self._prefilling.pop(r.slot, None)
                self._free_slots.append(r.slot)
        # 2. index the full pages of prompts whose prefill has been dispatched
        if self.pc is not None:
            fresh = [r for r in self._running.values()
                     if r.prompt_done and not r.indexed and not r.released]
            if fresh:
                self._host = self.pc.insert_slots(
                    self._host, self._pad([r.slot for r in fresh]),
                    [r.prompt for r in fresh] + [np.zeros((0,), np.int32)] * (self.B - len(fresh)))
                self._replay()
                for r in fresh:
                    r.indexed = True
                self._rc = None
        # 3. admit waiting requests, first come first served
        admit: list[_Request] = []
        if self._waiting and self._free_slots:
            owed = self._owed()
            if self.pc is not None and self._rc is None:
                self._sync_rc()
            free = self._free
            evictable = self._evictable() if self.pc is not None else None
            claimed = 0
            while self._waiting and len(admit) < len(self._free_slots):
                r = self._waiting[0]
                need = cfg.pages_for(r.final_len)
                avail = free - owed - claimed
                if self.pc is not None:
                    pages, _ = self.pc.match(r.prompt, max_tokens=len(r.prompt) - 1)
                    shared = np.asarray(pages, np.int64)
                    avail += int(evictable.sum()) - int(evictable[shared].sum())
                    need -= len(pages)
                if avail < need:
                    break
                self._waiting.popleft()
                admit.append(r)
                claimed += need
        if admit:
            self._admit(admit)
        if self.pc is not None and self._running:
            # decode steps must never wait for an eviction: keep every owed page free
            owed = self._owed()
            if self._free < owed:
                self._host = self.pc.make_room(self._host, owed).state
                self._replay()
                self._sync_rc()

    def _pad(self, values, fill=-1) -> np.ndarray:
        out = np.full((self.B,), fill, np.int32)
        out[:len(values)] = values
        return out

    def _admit(self, reqs: list[_Request]) -> None:
        slots = [self._free_slots.pop(0) for _ in reqs]
        for r, s in zip(reqs, slots):
            r.slot, r.released = s, False
            self._running[s] = r
        if self.pc is None:
            lens = [len(r.prompt) for r in reqs]
            self.state, status = self._alloc(self.state, self._pad(slots), self._pad(lens, 0))
            self._checks.append(("admission", status))
            self._free -= sum(self.cache.pages_for(n) for n in lens)
            cached = [0] * len(reqs)
        else:
            adm = self.pc.admit_batch(self._host, self._pad(slots),
                                      [r.prompt for r in reqs] + [np.zeros((1,), np.int32)] *
                                      (self.B - len(reqs)))
            if not adm.ok:
                raise RuntimeError(f"admission refused (status {adm.status[:len(reqs)].tolist()}): "
                                   "a scheduler bug, pages are checked before admission")
            self._host = adm.state
            self._replay()
            cached = [int(c) for c in adm.num_cached[:len(reqs)]]
            self._sync_rc()
        for r, c in zip(reqs, cached):
            r.cached = r.prefilled = c
            r.kv_len = c
            self.stats.reused_tokens += c
            if not r.prompt_done:
                self._prefilling[r.slot] = r
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))

    def _release_slots(self, reqs: list[_Request]) -> None:
        slots = self._pad([r.slot for r in reqs])
        if self.pc is None:
            self.state, status = self._release(self.state, slots)
            self._checks.append(("release", status))
            self._free += sum(self.cache.pages_for(self._held(r)) for r in reqs)
        else:
            self._host, status, _ = self.pc.release(self._host, slots)
            self._replay()
            if not np.all(status == Status.OK):
                raise RuntimeError(f"release of slots {[r.slot for r in reqs]} refused")
            self._sync_rc()
        for r in reqs:
            r.released = True

    def _held(self, r: _Request) -> int:
        """KV tokens the allocator holds for `r`: the whole prompt from admission on, plus the
        decode growth."""
        return max(len(r.prompt), r.kv_len)

    # ------------------------------------------------------------------------ steps

    def _step_fn(self, kind: StepKind, C: int):
        return _jitted_step(self.model, self.cache, kind, self.B, self.Bp, C, self.backend, self.tp)

    def _bucket(self, n: int) -> int:
        return next(b for b in self.config.chunk_buckets if b >= n)

    def _plan_prefill(self):
        """The next prefill chunk: [(request, n tokens)], oldest admitted first."""
        room, work = self.config.chunk, []
        for r in self._prefilling.values():
            if room == 0 or len(work) == self.Bp:
                break
            if r.finished or r.prompt_done:
                continue
            n = min(room, len(r.prompt) - r.prefilled)
            work.append((r, n))
            room -= n
        return work

    def _dispatch(self) -> bool:
        prefill = self._plan_prefill()
        decode = [r for r in self._running.values()   # every one holds its slot (`_events`)
                  if r.prefilled >= r.plen and r.finish_reason is None
                  and 0 < r.n_sched < r.max_new]
        if not prefill and not decode:
            return False
        if prefill and decode and self.config.mixed_steps:
            self._launch("mixed", prefill, decode)
        else:
            if prefill:
                self._launch("prefill", prefill, [])
            if decode:
                # K steps at once when no prefill waits for a step and no slot frees up for a
                # waiting request within them (a stop token may still end one earlier)
                K = self.config.decode_steps
                left = min(r.max_new - r.n_sched for r in decode)
                k = K if K > 1 and not prefill and (not self._waiting or left >= K) else 1
                self._launch("decode", [], decode, steps=k)
        return True

    def _launch(self, kind_name: str, prefill, decode, steps: int = 1) -> None:
        cfg, B, Bp = self.cache, self.B, self.Bp
        rows: list[tuple[int, _Request]] = []
        srows: list[tuple] = []     # per output row: `_sampling_row`
        counters: list[int] = []
        inp: dict[str, np.ndarray] = {}
        C = self._bucket(sum(n for _, n in prefill)) if prefill else self.config.chunk
        if prefill:
            toks, ids, new, end, emit = [], [], [], [], []
            for i, (r, n) in enumerate(prefill):
                toks.append(r.prompt[r.prefilled:r.prefilled + n])
                ids.append(r.slot)
                new.append(n)
                end.append(r.prefilled + n)
                last = r.prefilled + n == len(r.prompt)
                emit.append(r.slot if last else -1)
                r.prefilled += n
                r.kv_len = max(r.kv_len, r.prefilled)
                if last:
                    del self._prefilling[r.slot]
                self.stats.prefill_tokens += n
                srows.append(r.srow)
                counters.append(0)
                if last:
                    rows.append((i, r))
                    r.n_sched = 1
            t = np.zeros((C,), np.int32)
            cat = np.concatenate(toks)
            t[:cat.size] = cat
            inp.update(p_tokens=t, p_ids=self._padp(ids), p_new=self._padp(new, 0),
                       p_end=self._padp(end, 0), p_emit=self._padp(emit))
            srows += [_PAD_ROW] * (Bp - len(prefill))
            counters += [0] * (Bp - len(prefill))
        host_plan = None
        if decode:
            off = Bp if prefill else 0
            nd = len(decode)
            # sub-steps each row runs (multi-step decode: none past its max_new_tokens)
            ns = [min(steps, r.max_new - r.n_sched) for r in decode]
            kv0 = np.fromiter((r.kv_len for r in decode), np.int64, nd)
            d_ids = np.full((B,), -1, np.int32)
            d_ids[:nd] = [r.slot for r in decode]
            d_n = np.zeros((B,), np.int32)
            d_n[:nd] = ns
            # KV length after sub-step j (0 for rows that sit it out): the host plans' lengths
            j = np.arange(steps)[:, None]
            lens = np.zeros((steps, B), np.int32)
            lens[:, :nd] = np.where(j < d_n[:nd], kv0 + j + 1, 0)
            # the sub-steps' allocate_decoding take the pages that growing to kv0 + n needs
            self._free -= int(np.sum(cfg.pages_for(kv0 + d_n[:nd]) - cfg.pages_for(kv0)))
            d_counters = [r.n_sched for r in decode] + [0] * (B - nd)
            for r, n in zip(decode, ns):
                r.kv_len += n
                r.n_sched += n
            # rows in sub-step order, so each request's tokens arrive in order
            rows += [(off + j * B + i, r) for j in range(steps)
                     for i, (r, n) in enumerate(zip(decode, ns)) if j < n]
            inp["d_ids"] = d_ids
            if steps > 1:
                inp["d_n"] = d_n
            srows += [r.srow for r in decode] + [_PAD_ROW] * (B - nd)
            counters += d_counters
            self.stats.decode_rows += int(d_n.sum())
        use_host_plan = self.config.host_plans
        sampling = self._sampling_inputs(srows, counters)
        kind = StepKind(kind_name, greedy_only=not np.any(sampling["temperature"] > 0),
                        host_plan=use_host_plan, steps=steps)
        if use_host_plan:
            if steps > 1:
                host_plan = tuple(self._host_plan(kind_name, inp, lens[j], C)
                                  for j in range(steps))
            else:
                host_plan = self._host_plan(kind_name, inp, lens[0] if decode else None, C)
        inp.update(sampling)
        flat, host_plan = fold_host_plan(pack_inputs(step_inputs_spec(kind, B, Bp, C), inp),
                                         host_plan)
        fn = self._step_fn(kind, C)
        pend = _Pending(None, rows, kind_name)
        # reading kv / state / last_tok waits for the previous step's call (overlap_dispatch)
        args = (self.params, self.kv, self.state, self.last_tok, flat, host_plan)
        if self._worker is None:
            self._land(pend, use_host_plan, lambda: fn(*args))
        else:
            self._inflight = (self._worker.submit(fn, *args), pend, use_host_plan)
        self.stats.multi_steps += steps > 1
        if self.pc is not None and decode:   # the step's decode allocations, on the mirror
            self._host = mirror_decode(self._host, d_ids, d_n if steps > 1 else None, steps)
        self.stats.steps[kind_name] += 1
        self._pending.append(pend)
        in_use = cfg.num_pages - self._free
        self.stats.peak_pages_in_use = max(self.stats.peak_pages_in_use, in_use)

    def _host_plan(self, kind_name: str, inp: dict, d_lens, C: int):
        """The step's attention plan, made on the host from the lengths the host scheduled."""
        kw = dict(options=self.options, q_dtype=self.cache.jnp_dtype, backend=self.backend)
        cache, hq = self.cache, self.model.num_heads
        if self.tp is not None:   # the plan of one device's heads (see sharding.py)
            cache, hq = self.tp.local_cache(cache), self.tp.local_heads(hq)
        if kind_name == "decode":
            return attention.host_plan_decode(cache, d_lens, hq, **kw)
        if kind_name == "prefill":
            return attention.host_plan_prefill(cache, inp["p_end"], inp["p_new"], hq,
                                               max_tokens=C, **kw)
        return attention.host_plan_batch_pod(cache, inp["p_end"], inp["p_new"], d_lens, hq,
                                             max_tokens_p=C, **kw)

    def _padp(self, values, fill=-1) -> np.ndarray:
        out = np.full((self.Bp,), fill, np.int32)
        out[:len(values)] = values
        return out

    def _sampling_arrays(self, samplers, counters) -> dict[str, np.ndarray]:
        """The step's sampling inputs for rows of `SamplingParams` (None: a greedy padding row)."""
        return self._sampling_inputs([_sampling_row(s) for s in samplers], counters)

    @staticmethod
    def _sampling_inputs(srows, counters) -> dict[str, np.ndarray]:
        """The step's sampling inputs from per-row `_sampling_row` tuples: one array build."""
        a = np.array(srows, np.float64).reshape(-1, 4)
        return dict(temperature=a[:, 0].astype(np.float32), top_k=a[:, 1].astype(np.int32),
                    top_p=a[:, 2].astype(np.float32), seed=a[:, 3].astype(np.uint32),
                    counter=np.asarray(counters, np.int32))

    # ------------------------------------------------------------------------ read-back

    def _flush_checks(self) -> None:
        for what, status in self._checks:
            if not np.all(np.asarray(status) == Status.OK):
                raise RuntimeError(f"engine: a device {what} was refused (the host's page mirror "
                                   "is out of step with the allocator: an engine bug)")
        self._checks.clear()

    def _receive(self, p: _Pending) -> None:
        if p.out is None:                       # its dispatch is still on the worker thread
            self._settle()
        out = np.asarray(p.out)                 # the one device-to-host read of a step
        toks, flags = out[:-2].tolist(), out[-2:]
        if not flags[0]:
            raise RuntimeError(f"engine: a {p.kind} step's page allocation was refused (the host's "
                               "page mirror is out of step with the allocator: an engine bug)")
        if not flags[1]:
            raise RuntimeError(f"engine: a {p.kind} step ran with a host plan made for other "
                               "lengths (an engine bug)")
        self._flush_checks()
        generated = discarded = 0
        for i, r in p.rows:
            if r.finish_reason is not None:
                discarded += 1
                continue
            t = toks[i]
            r.tokens.append(t)
            generated += 1
            if r.on_token is not None:
                r.on_token(t)
            sp = r.sampling
            if t in sp.stop_token_ids:
                self._finish(r, "stop")
            elif len(r.tokens) >= sp.max_new_tokens:
                self._finish(r, "length")
        self.stats.generated_tokens += generated
        self.stats.discarded_tokens += discarded
