"""The fair baseline: seqattn_jax's Llama, with the same weights, served by torch + FlashInfer the
vLLM way (eager, and the decode step captured as one CUDA graph).

    python benchmarks/torch_llama.py --shape small --batch 64 --ctx 320
    python benchmarks/torch_llama.py --shape 1b --batch 256 --ctx 1024 --json out.json

The CLI needs a CUDA GPU and flashinfer (it says so and exits 1 otherwise); the model itself also
runs on a CPU with ``attention="torch"`` (dense attention over the cached K/V), which is how the CPU
tests check that the weights are read in the right layout.

Weights: the JAX model's params pytree converted to numpy (``jax.tree.map(np.asarray, params)``):

    params["embed"]        [V, d]
    params["layers"][l]    (a list of L dicts; a dict of stacked [L, ...] leaves works too)
                           "attn_norm" [d]; "wqkv" [d, (Hq + 2 Hkv) hd] (columns: every q head,
                           then k, then v, head-major); optional "bqkv" [(Hq + 2 Hkv) hd];
                           "wo" [Hq hd, d]; "mlp_norm" [d]; "w_gate_up" [d, 2 ffn] (gate
                           columns, then up); "w_down" [ffn, d]
    params["final_norm"]   [d]
    params["lm_head"]      [d, V]; absent when tied (logits = h @ embed.T)

The model (per layer): h = rmsnorm(x); qkv = h @ wqkv (+ bqkv); rotate-half RoPE in float32 at each
token's position; the new K/V appended to the paged cache; attention over the sequence's pages;
x += o @ wo; h = rmsnorm(x); x += (silu(gate) * up) @ w_down. Logits: rmsnorm(x) @ lm_head, returned
as float32 (the matmul runs in the compute dtype with float32 accumulation, as cuBLAS does; an
upcast lm_head would double its bytes every step). Greedy decoding takes the argmax.

The serving recipe (what vLLM does with FlashInfer, and what ../shared/probes/torch_model_probe.py
measured on an H200): fused qkv and gate/up matmuls; ``flashinfer.rmsnorm``;
``flashinfer.append_paged_kv_cache``; decode through ``BatchDecodeWithPagedKVCacheWrapper(
use_tensor_cores=True)`` planned on the host every step from lengths the host knows; prefill through
``BatchPrefillWithPagedKVCacheWrapper``; a mixed iteration as one forward over the prefill rows and
the decode rows (one matmul per weight, a prefill and a decode attention call per layer). The CUDA
graph version uses the ``use_cuda_graph=True`` decode wrapper with fixed indptr / indices /
last-page-len buffers, plans before each replay and captures the whole forward, argmax and the token
feedback.
Sampled tokens stay on the device and feed the next step; the host never reads them while timing.

KV pool: one tensor [L, num_pages + 1, 2, page_size, Hkv, hd] (FlashInfer's NHD layout, K then V);
the extra last page is a scratch page that graph capture writes into, so capture never touches a
sequence's data. Page accounting is on the host (`HostPageTable`, numpy, no loop over sequences).

Failures: a device-side fault (illegal memory access, ...) is reported asynchronously, at the next
call that synchronises (a `.cpu()`, `float(...)`, `torch.cuda.synchronize()`), as
torch.AcceleratorError, so the line in its traceback is rarely the faulting kernel's (run with
CUDA_LAUNCH_BLOCKING=1, or under compute-sanitizer, to find that). Such an error is sticky: the
process's CUDA context is unusable afterwards, for torch and for anything sharing the device's
primary context in the same process (JAX / XLA included); catching the exception does not recover
it. It is never swallowed here: it propagates to the caller. A caller whose own (JAX) work must
survive a failing baseline runs this module in a separate process (the CLI, `--json`).
`run_benchmark` checks the paths (`check_paths`, which syncs after the eager steps, after the
capture and after the graph steps) before it times anything.

From the serving benchmark (run from the repository root; params from seqattn_jax's Llama):

    from benchmarks.torch_llama import TorchLlama, run_benchmark, time_decode, hbm_floor_ms
    res = run_benchmark(cfg, batch=64, ctx=320, params=jax.tree.map(np.asarray, params))
    # or: model = TorchLlama(cfg, params_np, "cuda", page_size=16, num_pages=..., max_batch=65)
    #     time_decode(model, 64, 320); time_prefill(model, 512); time_mixed(model, 64, 320, 512)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import types
from typing import Any, Callable, Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# configuration

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """The model shape, with the fields the baseline reads from any config (seqattn_jax's
    LlamaConfig is duck-typed the same way). `dtype` is the compute, weight and KV dtype."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float16"


# The two shapes of issue 10 (and their default context lengths).
SHAPES = {
    "small": (BaselineConfig(vocab_size=32000, d_model=1024, num_layers=8, num_heads=16,
                             num_kv_heads=4, head_dim=128, ffn_dim=2816), 320),
    "1b": (BaselineConfig(vocab_size=32000, d_model=2048, num_layers=16, num_heads=32,
                          num_kv_heads=8, head_dim=64, ffn_dim=8192), 1024),
}


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a config's `dtype` (a name, a numpy / jnp dtype or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"cfg.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[name]


def _check_cfg(cfg) -> None:
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "ffn_dim"):
        value = getattr(cfg, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"cfg.{name} must be a positive int, got {value!r}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"cfg.num_heads ({cfg.num_heads}) must be a multiple of "
                         f"cfg.num_kv_heads ({cfg.num_kv_heads})")
    if cfg.head_dim % 2:
        raise ValueError(f"cfg.head_dim must be even (rotate-half RoPE), got {cfg.head_dim}")
    # LlamaConfig's options this baseline does not implement (the benchmark shapes use neither)
    for name in ("rope_scaling", "sliding_window"):
        if getattr(cfg, name, None) is not None:
            raise ValueError(f"cfg.{name} must be None for the torch baseline (plain RoPE, full "
                             f"attention), got {getattr(cfg, name)!r}")


def random_params(cfg, seed: int = 0, tied: bool = False, bias: bool = False,
                  dtype: Any = np.float32) -> dict:
    """Random weights in the params layout above, as numpy arrays of `dtype` (scaled 1/sqrt(fan_in),
    norm weights near 1 so a transposed or misread norm shows up)."""
    rng = np.random.default_rng(seed)
    d, f, V = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    nqkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[0])).astype(dtype)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(d, dtype=np.float32)).astype(dtype)

    layers = []
    for _ in range(cfg.num_layers):
        layer = dict(attn_norm=norm(), wqkv=w(d, nqkv), wo=w(cfg.num_heads * cfg.head_dim, d),
                     mlp_norm=norm(), w_gate_up=w(d, 2 * f), w_down=w(f, d))
        if bias:
            layer["bqkv"] = (0.1 * rng.standard_normal(nqkv, dtype=np.float32)).astype(dtype)
        layers.append(layer)
    params = dict(embed=rng.standard_normal((V, d), dtype=np.float32).astype(dtype), layers=layers,
                  final_norm=norm())
    if not tied:
        params["lm_head"] = w(d, V)
    return params


def hbm_floor_ms(cfg, batch: int, ctx: int, bytes_per_elem: int, bw: float = 4.3e12) -> float:
    """Milliseconds to read, once, every weight a decode step uses plus the batch's KV at `bw` B/s.

    Weights: every layer's matrices and norms, the final norm and the output projection (lm_head, or
    the embedding when tied); the embedding's gather reads only `batch` rows and is left out (when
    untied), as are biases. KV: `batch * ctx` tokens of K and V in every layer."""
    d, f, hd = cfg.d_model, cfg.ffn_dim, cfg.head_dim
    per_layer = (d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
                 + 3 * d * f + 2 * d)
    weights = cfg.num_layers * per_layer + d + d * cfg.vocab_size
    kv = batch * ctx * cfg.num_layers * cfg.num_kv_heads * hd * 2
    return (weights + kv) * bytes_per_elem / bw * 1e3


# ---------------------------------------------------------------------------------------------
# host-side page accounting and a step's CSR layout


@dataclasses.dataclass(frozen=True)
class PagedLayout:
    """One step's batch in FlashInfer's CSR format (host numpy, int32). n sequences, T new rows.

    qo_indptr [n+1]: sequence b's new rows are rows qo_indptr[b]:qo_indptr[b+1] of the step.
    kv_indptr [n+1], kv_indices [kv_indptr[-1]], kv_last_page_len [n]: the pages of each sequence
    *including* this step's new tokens (FlashInfer appends first, then attends).
    batch_indices [T], positions [T]: each new row's sequence and absolute position."""

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    kv_last_page_len: np.ndarray
    batch_indices: np.ndarray
    positions: np.ndarray
    page_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.kv_last_page_len)

    @property
    def num_rows(self) -> int:
        return len(self.positions)

    @property
    def seq_lens(self) -> np.ndarray:
        npages = np.diff(self.kv_indptr)
        return (npages - 1) * self.page_size + self.kv_last_page_len


def concat_layouts(a: PagedLayout, b: PagedLayout) -> PagedLayout:
    """The layout of a's sequences followed by b's (rows too): one append for a mixed step."""
    if a.page_size != b.page_size:
        raise ValueError(f"page sizes differ: {a.page_size} and {b.page_size}")
    i32 = np.int32
    return PagedLayout(
        qo_indptr=np.concatenate([a.qo_indptr, a.qo_indptr[-1] + b.qo_indptr[1:]]).astype(i32),
        kv_indptr=np.concatenate([a.kv_indptr, a.kv_indptr[-1] + b.kv_indptr[1:]]).astype(i32),
        kv_indices=np.concatenate([a.kv_indices, b.kv_indices]).astype(i32),
        kv_last_page_len=np.concatenate([a.kv_last_page_len, b.kv_last_page_len]).astype(i32),
        batch_indices=np.concatenate([a.batch_indices, a.num_seqs + b.batch_indices]).astype(i32),
        positions=np.concatenate([a.positions, b.positions]).astype(i32),
        page_size=a.page_size)


class HostPageTable:
    """Pages of up to `max_seqs` sequences in a pool of `num_pages` (numpy; vectorised over the
    sequences of a step). Free pages are handed out in a seeded random order, as a long-running
    server's pages end up scattered."""

    def __init__(self, page_size: int, num_pages: int, max_seqs: int, seed: int = 0):
        for name, value in (("page_size", page_size), ("num_pages", num_pages),
                            ("max_seqs", max_seqs)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.page_size, self.num_pages = int(page_size), int(num_pages)
        self.max_seqs = int(max_seqs)
        self._free = np.random.default_rng(seed).permutation(num_pages).astype(np.int32)
        self._num_free = num_pages
        self.table = np.zeros((max_seqs, num_pages), np.int32)   # [seq, page slot] -> page id
        self.lens = np.zeros(max_seqs, np.int64)

    @property
    def num_free(self) -> int:
        return self._num_free

    def _seqs(self, seqs) -> np.ndarray:
        seqs = np.asarray(seqs, np.int64).reshape(-1)
        if seqs.size == 0:
            raise ValueError("seqs must name at least one sequence")
        if seqs.min() < 0 or seqs.max() >= self.max_seqs:
            raise ValueError(f"seqs must be in [0, {self.max_seqs}), got {seqs.tolist()}")
        if len(np.unique(seqs)) != len(seqs):
            raise ValueError(f"seqs must be distinct, got {seqs.tolist()}")
        return seqs

    def _npages(self, lens):
        return -(-lens // self.page_size)

    def extend(self, seqs, counts) -> PagedLayout:
        """Add counts[i] > 0 tokens to sequence seqs[i], granting pages; the step's layout."""
        seqs = self._seqs(seqs)
        counts = np.broadcast_to(np.asarray(counts, np.int64), seqs.shape)
        if counts.min() <= 0:
            raise ValueError(f"counts must be positive, got {counts.tolist()}")
        old = self.lens[seqs]
        have, need = self._npages(old), self._npages(old + counts)
        extra = need - have
        total = int(extra.sum())
        if total > self._num_free:
            raise ValueError(f"out of pages: the step needs {total}, {self._num_free} are free")
        grant = self._free[self._num_free - total:self._num_free]
        self._num_free -= total
        first = np.cumsum(extra) - extra                       # each sequence's first grant
        rows = np.repeat(seqs, extra)
        cols = np.repeat(have, extra) + np.arange(total) - np.repeat(first, extra)
        self.table[rows, cols] = grant
        self.lens[seqs] = old + counts
        return self.layout(seqs, counts)

    def layout(self, seqs, counts) -> PagedLayout:
        """The CSR layout of `seqs` whose last counts[i] tokens are this step's new rows."""
        seqs = self._seqs(seqs)
        counts = np.broadcast_to(np.asarray(counts, np.int64), seqs.shape)
        lens = self.lens[seqs]
        if (counts > lens).any() or counts.min() <= 0:
            raise ValueError(f"counts must be in [1, seq_len]: {counts.tolist()} vs "
                             f"{lens.tolist()}")
        npages = self._npages(lens)
        kv_indptr = np.concatenate([[0], np.cumsum(npages)])
        cols = int(npages.max())
        kv_indices = self.table[seqs, :cols][np.arange(cols)[None, :] < npages[:, None]]
        qo_indptr = np.concatenate([[0], np.cumsum(counts)])
        rows = int(qo_indptr[-1])
        batch_indices = np.repeat(np.arange(len(seqs)), counts)
        positions = (np.repeat(lens - counts, counts) + np.arange(rows)
                     - np.repeat(qo_indptr[:-1], counts))
        i32 = np.int32
        return PagedLayout(qo_indptr.astype(i32), kv_indptr.astype(i32), kv_indices.astype(i32),
                           (lens - (npages - 1) * self.page_size).astype(i32),
                           batch_indices.astype(i32), positions.astype(i32), self.page_size)

    def truncate(self, seqs, length: int) -> None:
        """Cut sequences back to `length` tokens (0 releases them), freeing the pages past it."""
        seqs = self._seqs(seqs)
        if length < 0 or (self.lens[seqs] < length).any():
            raise ValueError(f"length must be in [0, seq_len], got {length} for lengths "
                             f"{self.lens[seqs].tolist()}")
        keep = self._npages(np.int64(length))
        npages = self._npages(self.lens[seqs])
        mask = (np.arange(self.num_pages)[None, :] < npages[:, None]) & \
               (np.arange(self.num_pages)[None, :] >= keep)
        freed = self.table[seqs][mask]
        self._free[self._num_free:self._num_free + len(freed)] = freed
        self._num_free += len(freed)
        self.lens[seqs] = length


# ---------------------------------------------------------------------------------------------
# attention over the paged cache: FlashInfer, or a dense torch fallback


class _FlashInferAttention:
    """Append with FlashInfer and attend with planned wrappers; `runs` is a list of (wrapper,
    first row, end row) covering the step's rows in order (one entry, or prefill then decode)."""

    def __init__(self, fi, kv, bi, pos, indices, indptr, lpl, runs):
        self.fi, self.kv, self.runs = fi, kv, runs
        self.meta = (bi, pos, indices, indptr, lpl)

    def append(self, layer, k, v):
        bi, pos, indices, indptr, lpl = self.meta
        self.fi.append_paged_kv_cache(k, v, bi, pos, self.kv[layer], indices, indptr, lpl, "NHD")

    def __call__(self, layer, q):
        outs = [w.run(q[r0:r1], self.kv[layer]) for w, r0, r1 in self.runs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


class _DenseTorchAttention:
    """The fallback for CPUs and tests: writes K/V into the pages with indexing and attends densely
    (float32, causal by absolute position) over each sequence's gathered pages. A Python loop over
    the sequences: a correctness path, never timed on a GPU."""

    def __init__(self, kv, layout: PagedLayout):
        self.kv, self.layout = kv, layout
        dev = kv.device
        self.bi = torch.from_numpy(layout.batch_indices.astype(np.int64)).to(dev)
        self.pos = torch.from_numpy(layout.positions.astype(np.int64)).to(dev)
        self.indices = torch.from_numpy(layout.kv_indices.astype(np.int64)).to(dev)
        self.indptr = torch.from_numpy(layout.kv_indptr.astype(np.int64)).to(dev)

    def append(self, layer, k, v):
        ps = self.layout.page_size
        page = self.indices[self.indptr[self.bi] + self.pos // ps]
        slot = self.pos % ps
        self.kv[layer, page, 0, slot] = k.to(self.kv.dtype)
        self.kv[layer, page, 1, slot] = v.to(self.kv.dtype)

    def __call__(self, layer, q):
        lay, ps = self.layout, self.layout.page_size
        hq, hkv, hd = q.shape[1], self.kv.shape[-2], self.kv.shape[-1]
        out = torch.empty_like(q)
        for b, seq_len in enumerate(lay.seq_lens.tolist()):
            r0, r1 = int(lay.qo_indptr[b]), int(lay.qo_indptr[b + 1])
            pages = self.indices[int(lay.kv_indptr[b]):int(lay.kv_indptr[b + 1])]
            kvb = self.kv[layer, pages].float()                   # [n, 2, ps, Hkv, hd]
            k = kvb[:, 0].reshape(-1, hkv, hd)[:seq_len].repeat_interleave(hq // hkv, dim=1)
            v = kvb[:, 1].reshape(-1, hkv, hd)[:seq_len].repeat_interleave(hq // hkv, dim=1)
            s = torch.einsum("rhd,khd->hrk", q[r0:r1].float(), k) / math.sqrt(hd)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= self.pos[r0:r1, None]
            p = torch.softmax(s.masked_fill(~mask[None], -math.inf), dim=-1)
            out[r0:r1] = torch.einsum("hrk,khd->rhd", p, v).to(q.dtype)
        return out


def _import_flashinfer():
    try:
        import flashinfer
    except ImportError as e:  # pragma: no cover - GPU machine only
        raise RuntimeError("attention='flashinfer' needs the flashinfer package (pip install "
                           "-e '.[flashinfer]' on a CUDA machine); attention='torch' runs "
                           "anywhere") from e
    return flashinfer


@dataclasses.dataclass
class _Graph:
    """A captured decode step for a fixed batch: its static buffers and the wrapper over them.

    Lifetime rule: a CUDA graph holds raw device pointers, never references to torch tensors, so
    every tensor its kernels read or write that was allocated *outside* the capture (the caching
    allocator's normal pool) must be owned here (or by the model) for as long as the graph can be
    replayed. A tensor kept only by a local of `capture_graph` is freed when it returns, its block
    goes back to the allocator and the next allocation of that size (e.g. a 512-byte `.clone()` of
    the token buffer) reuses it; the replay then reads that data as its indices. (Tensors the
    capture itself allocates live in the graph's private pool, which the graph keeps.)"""

    batch: int
    graph: Any
    wrapper: Any
    tokens: torch.Tensor        # [B] int64: read by the graph, overwritten with its argmax
    meta: torch.Tensor          # [B + num_pages + 1] int32: positions, then the step's page ids
    indptr: torch.Tensor        # the wrapper's fixed buffers, which the graph's append reads too
    indices: torch.Tensor
    lpl: torch.Tensor
    bi: torch.Tensor            # [B] int32 0..B-1: the append's batch_indices (row b: sequence b)
    attn: Any = None            # the _FlashInferAttention over the buffers above (kept, see above)

    @property
    def pos(self) -> torch.Tensor:
        """[B] int32: the rows' positions (RoPE and the append), a view of meta."""
        return self.meta[:self.batch]


# ---------------------------------------------------------------------------------------------
# the model


class TorchLlama:
    """The Llama model in torch over a paged KV cache, served the vLLM way.

    Args:
      cfg: the shape (fields as `BaselineConfig`; seqattn_jax's LlamaConfig works as is).
      params: the numpy params pytree (layout in the module docstring); cast to cfg.dtype.
      device: torch device ("cuda", "cpu", ...).
      page_size, num_pages: the KV pool (plus one scratch page, see the module docstring).
      max_batch: how many sequences the host page table tracks (ids 0..max_batch-1).
      attention: "flashinfer" (GPU) or "torch" (dense fallback; any device).
      fi: the flashinfer module to use (default: import it); tests pass a CPU stand-in.
      workspace_mb: FlashInfer's float workspace, shared by every wrapper (one stream).
      prefill_backend: the prefill wrapper's backend ("auto", vLLM's default: FA3 on Hopper; "fa2").

    Every step is given sequence ids; the model's `pages` (a `HostPageTable`) grants their pages and
    builds the step's layout on the host, which plans FlashInfer, as a serving loop would.
    """

    def __init__(self, cfg, params: dict, device, page_size: int = 16, num_pages: int = 4096,
                 max_batch: int = 256, attention: str = "flashinfer", fi=None, seed: int = 0,
                 workspace_mb: int = 128, prefill_backend: str = "auto"):
        _check_cfg(cfg)
        if attention not in ("flashinfer", "torch"):
            raise ValueError(f"attention must be 'flashinfer' or 'torch', got {attention!r}")
        self.cfg, self.device, self.attention = cfg, torch.device(device), attention
        self.dtype = torch_dtype(cfg.dtype)
        self.hq, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.page_size, self.num_pages = int(page_size), int(num_pages)
        self._load(params)
        self.pages = HostPageTable(page_size, num_pages, max_batch, seed=seed)
        # page num_pages is the scratch page (graph capture writes there)
        self.kv = torch.zeros(cfg.num_layers, num_pages + 1, 2, page_size, self.hkv, self.hd,
                              dtype=self.dtype, device=self.device)
        self.inv_freq = 1.0 / (float(cfg.rope_theta) ** (
            torch.arange(0, self.hd // 2, dtype=torch.float32, device=self.device) * 2.0 / self.hd))
        self.fi = None
        self._graphs: dict[int, _Graph] = {}
        self._plan_events: dict[int, Any] = {}     # id(wrapper) -> CUDA event after its last plan
        if attention == "flashinfer":
            self.fi = fi if fi is not None else _import_flashinfer()
            self._ws = torch.zeros(workspace_mb * 1024 * 1024, dtype=torch.uint8,
                                   device=self.device)
            self._decode_w = self.fi.BatchDecodeWithPagedKVCacheWrapper(self._ws, "NHD",
                                                                        use_tensor_cores=True)
            self._prefill_w = self.fi.BatchPrefillWithPagedKVCacheWrapper(
                self._ws, "NHD", backend=prefill_backend)

    # -- weights --------------------------------------------------------------------------------

    def _tensor(self, x, shape, name):
        x = np.asarray(x)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"params{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
        if x.dtype.name not in ("float16", "float32", "float64"):
            x = x.astype(np.float32)        # bfloat16 (ml_dtypes) has no torch.from_numpy
        if not x.flags.writeable:           # a jax array's numpy view: torch wants a writable one
            x = x.copy()
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype)

    def _load(self, params):
        c = self.cfg
        d, f, V = c.d_model, c.ffn_dim, c.vocab_size
        nqkv = (self.hq + 2 * self.hkv) * self.hd
        for key in ("embed", "layers", "final_norm"):
            if key not in params:
                raise ValueError(f"params must have the key {key!r} (layout: benchmarks/"
                                 f"torch_llama.py's docstring); got {sorted(params)}")
        layers = params["layers"]
        if isinstance(layers, dict):           # stacked (a scan's params): leaves [L, ...]
            n = {np.shape(v)[0] for v in layers.values() if v is not None}
            if n != {c.num_layers}:
                raise ValueError(f"stacked params['layers'] leaves must lead with cfg.num_layers="
                                 f"{c.num_layers}, got leading sizes {sorted(n)}")
            layers = [{k: (None if v is None else v[i]) for k, v in layers.items()}
                      for i in range(c.num_layers)]
        if len(layers) != c.num_layers:
            raise ValueError(f"params['layers'] must have cfg.num_layers={c.num_layers} entries, "
                             f"got {len(layers)}")
        self.embed = self._tensor(params["embed"], (V, d), "['embed']")
        self.layers = []
        for i, p in enumerate(layers):
            t = lambda k, shape: self._tensor(p[k], shape, f"['layers'][{i}][{k!r}]")  # noqa: E731
            self.layers.append(dict(
                attn_norm=t("attn_norm", (d,)), wqkv=t("wqkv", (d, nqkv)),
                bqkv=t("bqkv", (nqkv,)) if p.get("bqkv") is not None else None,
                wo=t("wo", (self.hq * self.hd, d)), mlp_norm=t("mlp_norm", (d,)),
                w_gate_up=t("w_gate_up", (d, 2 * f)), w_down=t("w_down", (f, d))))
        self.final_norm = self._tensor(params["final_norm"], (d,), "['final_norm']")
        if params.get("lm_head") is not None:
            self.lm_head = self._tensor(params["lm_head"], (d, V), "['lm_head']")
        else:
            self.lm_head = self.embed.t()      # tied: a transposed view, no copy

    # -- the forward ----------------------------------------------------------------------------

    def _rms(self, x, w):
        if self.fi is not None:
            return self.fi.rmsnorm(x, w, self.cfg.norm_eps)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
                ).to(x.dtype) * w

    def _rope(self, x, cos, sin):
        half = self.hd // 2
        x32 = x.float()
        x1, x2 = x32[..., :half], x32[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn: Callable,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits float32 [R, V] of a step's rows: tokens [T] (int64, device), positions [T] (int32,
        device); `attn` appends and attends (one of the attention classes above); logits_rows [R]
        picks the rows to project (None: all T)."""
        c = self.cfg
        T = tokens.shape[0]
        hq, hkv, hd = self.hq, self.hkv, self.hd
        ang = positions.float()[:, None] * self.inv_freq              # [T, hd/2] float32
        cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
        x = self.embed[tokens]
        for l, p in enumerate(self.layers):
            h = self._rms(x, p["attn_norm"])
            qkv = h @ p["wqkv"]
            if p["bqkv"] is not None:
                qkv = qkv + p["bqkv"]
            q = qkv[:, :hq * hd].view(T, hq, hd)
            k = qkv[:, hq * hd:(hq + hkv) * hd].view(T, hkv, hd)
            v = qkv[:, (hq + hkv) * hd:].view(T, hkv, hd)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            attn.append(l, k, v)
            o = attn(l, q)
            x = x + o.reshape(T, hq * hd) @ p["wo"]
            h = self._rms(x, p["mlp_norm"])
            gu = h @ p["w_gate_up"]
            x = x + (torch.nn.functional.silu(gu[:, :c.ffn_dim]) * gu[:, c.ffn_dim:]) @ p["w_down"]
        if logits_rows is not None:
            x = x[logits_rows]
        return (self._rms(x, self.final_norm) @ self.lm_head).float()

    # -- eager steps ----------------------------------------------------------------------------
    # Every host->device copy below is non_blocking from pageable memory: CUDA stages the bytes at
    # once and returns; a blocking copy would synchronise the stream and stall the host each step.

    def _upload(self, lay: PagedLayout):
        """One host->device copy of the step's metadata; device views (int32) of its parts."""
        n, T = lay.num_seqs, lay.num_rows
        packed = np.concatenate([lay.kv_indptr, lay.kv_last_page_len, lay.batch_indices,
                                 lay.positions, lay.kv_indices]).astype(np.int32)
        # pageable source + non_blocking: the host buffer is staged at once, the stream not synced
        dev = torch.from_numpy(packed).to(self.device, non_blocking=True)
        o = np.cumsum([0, n + 1, n, T, T])
        return dict(indptr=dev[o[0]:o[1]], lpl=dev[o[1]:o[2]], bi=dev[o[2]:o[3]],
                    pos=dev[o[3]:o[4]], indices=dev[o[4]:])

    def _fenced_plan(self, wrapper, plan: Callable[[], None]) -> None:
        """Run `plan` (one wrapper.plan call) so it cannot overwrite data a queued copy still reads.

        FlashInfer's plan writes its schedule (request / tile indices, chunk size, ...) into the
        wrapper's page-locked host buffer and queues an asynchronous copy of it to the device
        buffer the kernels read, without waiting for the previous plan's copy. The host runs ahead
        of the GPU here (tokens stay on the device, nothing syncs a decode loop), so a second plan
        could rewrite the host buffer before the first copy ran: that step's kernels would read
        another plan's schedule against their own indptr (or, outside CUDA-graph mode, at other
        offsets). An event recorded after each plan and waited for before the wrapper's next one
        keeps the host at most one plan ahead of the GPU (still overlapped: the host plans step
        t+1 while the GPU runs step t). No-op off CUDA."""
        if self.device.type != "cuda":
            plan()
            return
        ev = self._plan_events.get(id(wrapper))
        if ev is None:
            ev = self._plan_events[id(wrapper)] = torch.cuda.Event()
        else:
            ev.synchronize()
        plan()
        ev.record()

    def _plan_decode(self, wrapper, lay: PagedLayout, indices_dev):
        # indptr / last_page_len on the host (plan reads them there; in CUDA-graph mode it copies
        # them into the wrapper's fixed buffers), indices on the device, all int32, as the probe
        self._fenced_plan(wrapper, lambda: wrapper.plan(
            torch.from_numpy(lay.kv_indptr), indices_dev, torch.from_numpy(lay.kv_last_page_len),
            self.hq, self.hkv, self.hd, self.page_size, q_data_type=self.dtype))

    def _plan_prefill(self, lay: PagedLayout, indices_dev):
        self._fenced_plan(self._prefill_w, lambda: self._prefill_w.plan(
            torch.from_numpy(lay.qo_indptr), torch.from_numpy(lay.kv_indptr), indices_dev,
            torch.from_numpy(lay.kv_last_page_len), self.hq, self.hkv, self.hd, self.page_size,
            causal=True, q_data_type=self.dtype))

    def _step(self, tokens, prefill: PagedLayout | None, decode: PagedLayout | None,
              logits: str, dense: bool = False) -> torch.Tensor:
        """One eager forward over prefill rows (first) and decode rows (one per sequence); `dense`
        attends with the dense torch fallback even when FlashInfer is loaded (a check)."""
        parts = [x for x in (prefill, decode) if x is not None]
        lay = parts[0] if len(parts) == 1 else concat_layouts(*parts)
        tokens = torch.as_tensor(tokens).to(self.device, torch.int64, non_blocking=True)
        if tokens.shape != (lay.num_rows,):
            raise ValueError(f"tokens must have shape ({lay.num_rows},) (the step's rows), got "
                             f"{tuple(tokens.shape)}")
        if logits == "last":
            rows = torch.from_numpy(lay.qo_indptr[1:].astype(np.int64) - 1).to(
                self.device, non_blocking=True)
        elif logits == "all":
            rows = None
        else:
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        if self.fi is None or dense:
            attn = _DenseTorchAttention(self.kv, lay)
            positions = attn.pos.to(torch.int32)
        else:
            m = self._upload(lay)
            runs, r0 = [], 0
            if prefill is not None:
                # the prefill wrapper's page list is the front of the combined one
                self._plan_prefill(prefill, m["indices"][:len(prefill.kv_indices)])
                runs.append((self._prefill_w, 0, prefill.num_rows))
                r0 = prefill.num_rows
            if decode is not None:
                self._plan_decode(self._decode_w, decode, m["indices"][len(lay.kv_indices)
                                                                       - len(decode.kv_indices):])
                runs.append((self._decode_w, r0, lay.num_rows))
            attn = _FlashInferAttention(self.fi, self.kv, m["bi"], m["pos"], m["indices"],
                                        m["indptr"], m["lpl"], runs)
            positions = m["pos"]
        return self.forward(tokens, positions, attn, rows)

    def prefill(self, seqs: Sequence[int], prompts: Sequence[Sequence[int]],
                logits: str = "last") -> torch.Tensor:
        """Append prompts[i] (a chunk: the sequence may already hold tokens) to sequence seqs[i] and
        run them. Returns float32 logits: [n, V] of each sequence's last row, or [T, V] of every row
        (`logits="all"`)."""
        counts = [len(p) for p in prompts]
        lay = self.pages.extend(seqs, counts)
        return self._step(np.concatenate([np.asarray(p, np.int64) for p in prompts]), lay, None,
                          logits)

    def decode_logits(self, seqs: Sequence[int], tokens) -> torch.Tensor:
        """One decode step (eager): token [B] appended to each sequence; float32 logits [B, V]."""
        return self._step(tokens, None, self.pages.extend(seqs, 1), "all")

    def step_eager(self, seqs: Sequence[int], tokens) -> torch.Tensor:
        """One greedy decode step, eager: plan on the host, forward, argmax. tokens [B] (a device
        tensor from the previous step, or host ints) -> the next tokens [B] int64 on the device."""
        return torch.argmax(self.decode_logits(seqs, tokens), -1)

    def mixed_logits(self, prefill_seqs, prompts, decode_seqs, tokens) -> torch.Tensor:
        """A mixed iteration as one forward (vLLM's mixed batch): prompts[i] appended to
        prefill_seqs[i] and one token to each decode sequence; every matmul over all rows, a
        prefill and a decode attention call per layer. Float32 logits [n_prefill + B, V]: each
        prefill sequence's last row, then the decode rows."""
        counts = [len(p) for p in prompts]
        lay_p = self.pages.extend(prefill_seqs, counts)
        lay_d = self.pages.extend(decode_seqs, 1)
        prompt_rows = np.concatenate([np.asarray(p, np.int64) for p in prompts])
        toks = torch.cat([torch.from_numpy(prompt_rows).to(self.device, non_blocking=True),
                          torch.as_tensor(tokens).to(self.device, torch.int64, non_blocking=True)])
        return self._step(toks, lay_p, lay_d, "last")

    # -- the CUDA graph --------------------------------------------------------------------------

    def capture_graph(self, batch: int, capture: bool = True) -> None:
        """Capture the whole greedy decode step for `batch` sequences as one CUDA graph (GPU +
        flashinfer only): embedding, every layer (FlashInfer append and the use_cuda_graph decode
        wrapper over fixed buffers), the logits, the argmax and the token feedback.

        Every tensor the captured kernels read that is allocated here (tokens, positions and page
        ids, the wrapper's indptr / indices / last-page-len buffers, the append's batch indices)
        is owned by the `_Graph` (see its docstring): the graph itself keeps no tensor alive.

        The capture runs over a dummy plan (every sequence: one token on the scratch page). That
        is sound because in CUDA-graph mode FlashInfer's plan fixes the launch shape from the
        batch alone (padded grid, tile size, split-kv always on, workspace offsets), so a later
        plan of real lengths only rewrites the buffers' contents (its scheduler's
        enable_cuda_graph branch: PrefillSplitQOKVIndptr / PrefillPlan).

        capture=False builds the same static buffers and wrapper and runs the step once, as the
        capture does, but "replays" by running the forward over the buffers eagerly, without CUDA:
        the CPU tests check the graph step's plumbing (buffers, plans, token feedback, and that
        every tensor the step reads is owned by the `_Graph`) that way. Never a timing path."""
        if self.fi is None or (capture and self.device.type != "cuda"):
            raise ValueError("capture_graph needs attention='flashinfer' on a CUDA device")
        B, dev = int(batch), self.device
        if not 0 < B <= self.pages.max_seqs:
            raise ValueError(f"batch must be in [1, {self.pages.max_seqs}] (max_batch), got {B}")
        i32 = dict(dtype=torch.int32, device=dev)
        g = _Graph(batch=B, graph=torch.cuda.CUDAGraph() if capture else None, wrapper=None,
                   tokens=torch.zeros(B, dtype=torch.int64, device=dev),
                   meta=torch.zeros(B + self.num_pages + 1, **i32),
                   indptr=torch.arange(B + 1, **i32),
                   # every page of the pool fits (a step holds at most num_pages), plus the scratch
                   indices=torch.zeros(self.num_pages + 1, **i32),
                   lpl=torch.ones(B, **i32),
                   bi=torch.arange(B, **i32))
        g.wrapper = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self._ws, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=g.indptr, paged_kv_indices_buffer=g.indices,
            paged_kv_last_page_len_buffer=g.lpl)
        # plan a dummy batch for the warm-up and capture: every row is token 0 of the scratch page
        # (position 0, so the capture's append and attention stay inside that page)
        scratch = np.full(B, self.num_pages, np.int32)
        dummy = PagedLayout(np.arange(B + 1, dtype=np.int32), np.arange(B + 1, dtype=np.int32),
                            scratch, np.ones(B, np.int32), np.arange(B, dtype=np.int32),
                            np.zeros(B, np.int32), self.page_size)
        g.meta[:B].zero_()
        g.meta[B:2 * B].copy_(torch.from_numpy(scratch))
        self._plan_decode(g.wrapper, dummy, g.meta[B:2 * B])
        g.attn = _FlashInferAttention(self.fi, self.kv, g.bi, g.pos, g.indices, g.indptr, g.lpl,
                                      [(g.wrapper, 0, B)])
        if not capture:
            self._graph_body(g)                  # what the warm-up and the capture run
            # holds g (and the model) only, as a CUDA graph's owner does: nothing else is kept
            g.graph = types.SimpleNamespace(replay=lambda: self._graph_body(g))
            self._graphs[B] = g
            return
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._graph_body(g)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g.graph):
            self._graph_body(g)
        # a fault in the warm-up surfaces here (CUDA errors are asynchronous), not at a later sync
        torch.cuda.synchronize()
        self._graphs[B] = g

    def _graph_body(self, g: _Graph) -> None:
        """The captured step: reads only g's buffers (and the model's weights and KV pool)."""
        g.tokens.copy_(torch.argmax(self.forward(g.tokens, g.pos, g.attn), -1))

    def step_graph(self, seqs: Sequence[int], tokens=None) -> torch.Tensor:
        """One greedy decode step by graph replay (after `capture_graph(len(seqs))`): the host
        grants pages and plans the wrapper (which copies the step's indptr / indices / last page
        lengths into the graph's buffers), one copy of the positions, then replay. `tokens` [B]
        sets the input tokens; None feeds back the previous replay's argmax. Returns the graph's
        token buffer [B] int64 (overwritten by the next replay: clone to keep it).

        The graph's append writes row b at sequence b's position; `seqs` must be distinct (the
        page table checks) and is mapped in order onto the graph's rows 0..B-1."""
        B = len(seqs)
        if B not in self._graphs:
            raise ValueError(f"no graph for batch {B}: call capture_graph({B}) first "
                             f"(captured: {sorted(self._graphs)})")
        g = self._graphs[B]
        if tokens is not None:
            tokens = torch.as_tensor(tokens)
            if tokens.shape != (B,):
                raise ValueError(f"tokens must have shape ({B},), got {tuple(tokens.shape)}")
            g.tokens.copy_(tokens.to(self.device, torch.int64, non_blocking=True))
        lay = self.pages.extend(seqs, 1)
        nnz = len(lay.kv_indices)
        if nnz > len(g.indices) or B + nnz > len(g.meta):   # cannot happen: nnz <= num_pages
            raise ValueError(f"the step holds {nnz} pages, more than the graph's index buffer")
        packed = np.concatenate([lay.positions, lay.kv_indices]).astype(np.int32)
        g.meta[:B + nnz].copy_(torch.from_numpy(packed), non_blocking=True)
        self._plan_decode(g.wrapper, lay, g.meta[B:B + nnz])
        g.graph.replay()
        return g.tokens


# ---------------------------------------------------------------------------------------------
# timing


class _Timer:
    """Seconds of GPU time between two points (CUDA events) or wall time on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.s, self.e = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.s.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.e.record()
            torch.cuda.synchronize()
            self.seconds = self.s.elapsed_time(self.e) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def _median_ms(model: TorchLlama, reset: Callable, run: Callable, n: int, repeats: int) -> float:
    """Median over `repeats` (after one warm-up) of the ms per call of `n` calls of run(); reset()
    (host-side: page-table truncation) runs before each batch of calls, outside the timing."""
    ts = []
    for r in range(repeats + 1):
        reset()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        with _Timer(model.device) as t:
            for _ in range(n):
                run()
        if r:
            ts.append(t.seconds * 1e3 / n)
    return statistics.median(ts)


def _fill(model: TorchLlama, seqs, length: int) -> None:
    """Give `seqs` `length` cached tokens without computing them (their KV pages hold whatever the
    pool holds): a decode step's cost does not depend on the values."""
    model.pages.truncate(seqs, 0)
    if length:
        model.pages.extend(seqs, length)


def time_decode(model: TorchLlama, batch: int, ctx: int, steps: int = 30, repeats: int = 5,
                graph: bool = True) -> dict:
    """Per-step ms of greedy decode for `batch` sequences (ids 0..batch-1) of context `ctx`, the way
    a server runs it: each step's lengths grow by one, its pages are granted and the plan re-made on
    the host, tokens stay on the device. Each timed run starts back at `ctx` (mean context ctx +
    steps/2). Returns eager_ms, graph_ms (plan + replay), graph_replay_only_ms (replays of an
    unchanged plan: lengths do not grow, so it only times the GPU work), None where not run."""
    seqs = list(range(batch))
    res = dict(batch=batch, ctx=ctx, steps=steps, repeats=repeats)
    tok = {"t": torch.zeros(batch, dtype=torch.int64, device=model.device)}

    def eager():
        tok["t"] = model.step_eager(seqs, tok["t"])

    res["eager_ms"] = _median_ms(model, lambda: _fill(model, seqs, ctx), eager, steps, repeats)
    res["graph_ms"] = res["graph_replay_only_ms"] = None
    if graph:
        if batch not in model._graphs:
            model.capture_graph(batch)
        g = model._graphs[batch]
        res["graph_ms"] = _median_ms(model, lambda: _fill(model, seqs, ctx),
                                     lambda: model.step_graph(seqs), steps, repeats)
        res["graph_replay_only_ms"] = _median_ms(model, lambda: None, g.graph.replay, steps,
                                                 repeats)
    _fill(model, seqs, 0)
    return res


def time_prefill(model: TorchLlama, rows: int, prior: int = 0, seq: int = 0,
                 repeats: int = 10) -> float:
    """Ms of one eager prefill chunk of `rows` tokens for sequence `seq` that already holds `prior`
    cached tokens (logits of its last row only, as a server computes them)."""
    prompt = np.zeros(rows, np.int64)
    ms = _median_ms(model, lambda: _fill(model, [seq], prior),
                    lambda: model.prefill([seq], [prompt]), 1, repeats)
    _fill(model, [seq], 0)
    return ms


def time_mixed(model: TorchLlama, batch: int, ctx: int, rows: int, prior: int = 0,
               repeats: int = 10, graph: bool = True) -> dict:
    """A mixed iteration: sequences 0..batch-1 (context ctx) decode one token while sequence `batch`
    (`prior` cached tokens) prefills a chunk of `rows`. Ms (one iteration per timing, median of
    `repeats`) of: the prefill call and the decode call alone, the two one after the other (two
    eager forwards: `separate_ms`), the same with the decode step replayed as the CUDA graph
    (`separate_graph_ms`, `graph` and a GPU only: what a vLLM-style server with graphs does when it
    splits the work), and one eager forward over all rows with a prefill and a decode attention
    call per layer (`fused_ms`, vLLM's mixed batch)."""
    dseqs, pseq = list(range(batch)), batch
    prompt = np.zeros(rows, np.int64)
    tokens = torch.zeros(batch, dtype=torch.int64, device=model.device)

    def reset():
        _fill(model, dseqs, ctx)
        _fill(model, [pseq], prior)

    res = dict(batch=batch, ctx=ctx, prefill_rows=rows, prefill_prior=prior, repeats=repeats)
    res["prefill_ms"] = _median_ms(model, reset, lambda: model.prefill([pseq], [prompt]), 1,
                                   repeats)
    res["decode_ms"] = _median_ms(model, reset, lambda: model.step_eager(dseqs, tokens), 1, repeats)

    def separate():
        model.prefill([pseq], [prompt])
        model.step_eager(dseqs, tokens)

    res["separate_ms"] = _median_ms(model, reset, separate, 1, repeats)
    res["fused_ms"] = _median_ms(
        model, reset, lambda: torch.argmax(model.mixed_logits([pseq], [prompt], dseqs, tokens), -1),
        1, repeats)
    res["separate_graph_ms"] = None
    if graph:
        if batch not in model._graphs:
            model.capture_graph(batch)

        def separate_graph():
            model.prefill([pseq], [prompt])
            model.step_graph(dseqs)

        res["separate_graph_ms"] = _median_ms(model, reset, separate_graph, 1, repeats)
    _fill(model, dseqs + [pseq], 0)
    return res


def check_paths(model: TorchLlama, batch: int, prompt_len: int = 24, steps: int = 8,
                graph: bool = True, seed: int = 0) -> dict:
    """Checks, on the model's device, that the timed paths compute the model: `batch` random prompts
    are prefilled and decoded greedily for `steps` steps eagerly; the last step is re-run with the
    dense torch attention (same weights, same cache) and its logits compared; then the same steps
    run by CUDA graph replay (`graph`) and their tokens compared with the eager ones. Returns
    max_abs_logit_diff / argmax_agree (FlashInfer eager vs dense) and tokens_graph_eq_eager (the
    fraction of equal tokens; fp16 near-ties can flip one and the sequence then diverges)."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    seqs = list(range(batch))
    prompts = list(np.random.default_rng(seed).integers(0, model.cfg.vocab_size,
                                                        (batch, prompt_len)))
    _fill(model, seqs, 0)
    first = torch.argmax(model.prefill(seqs, prompts), -1)
    toks, eager = first, []
    for _ in range(steps):
        toks = model.step_eager(seqs, toks)
        eager.append(toks)
    eager = torch.stack(eager).cpu()
    res = dict(batch=batch, prompt_len=prompt_len, steps=steps)
    # the last step again, through FlashInfer and through the dense attention (same K/V written)
    model.pages.truncate(seqs, prompt_len + steps - 1)
    fi_logits = model.decode_logits(seqs, eager[-2])
    model.pages.truncate(seqs, prompt_len + steps - 1)
    dense_logits = model._step(eager[-2], None, model.pages.extend(seqs, 1), "all", dense=True)
    res["max_abs_logit_diff"] = float((fi_logits - dense_logits).abs().max())
    res["argmax_agree"] = float((fi_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    res["tokens_graph_eq_eager"] = None
    if graph:
        model.pages.truncate(seqs, prompt_len)
        if batch not in model._graphs:
            model.capture_graph(batch)
        out = [model.step_graph(seqs, first).clone()]
        for _ in range(steps - 1):
            out.append(model.step_graph(seqs).clone())
        res["tokens_graph_eq_eager"] = float((torch.stack(out).cpu() == eager).float().mean())
    _fill(model, seqs, 0)
    return res


def run_benchmark(cfg, batch: int, ctx: int, params: dict | None = None, prefill_rows: int = 512,
                  steps: int = 30, repeats: int = 5, page_size: int = 16, seed: int = 0,
                  prefill_backend: str = "auto") -> dict:
    """Every figure for one shape on the GPU: decode (eager, graph), a prefill chunk, a mixed
    iteration, and the HBM floor. `params` default: `random_params(cfg)` in cfg.dtype.
    `prefill_backend`: the prefill wrapper's ("auto": FA3 on Hopper, as vLLM; "fa2": the kernel
    the engine runs, and no FA3 compile).

    Runs in the caller's process: a CUDA fault in it raises (torch.AcceleratorError) and leaves the
    process's CUDA context, JAX's included, unusable (see the module docstring, "Failures")."""
    if params is None:
        params = random_params(cfg, seed=seed, dtype=np.float16 if torch_dtype(cfg.dtype) ==
                               torch.float16 else np.float32)
    room = 2 * steps + 2 + 1                      # tokens the timing adds past ctx (and slack)
    pages_per_seq = -(-(ctx + room) // page_size)
    prefill_pages = -(-(prefill_rows + ctx) // page_size)
    model = TorchLlama(cfg, params, "cuda", page_size=page_size,
                       num_pages=batch * pages_per_seq + prefill_pages + 8, max_batch=batch + 1,
                       seed=seed, prefill_backend=prefill_backend)
    del params
    check = check_paths(model, batch, steps=8)
    res = dict(config=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else
               {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "num_layers", "num_heads",
                                             "num_kv_heads", "head_dim", "ffn_dim", "rope_theta",
                                             "norm_eps")},
               dtype=str(model.dtype).replace("torch.", ""), page_size=page_size)
    res["check"] = check
    res["decode"] = time_decode(model, batch, ctx, steps=steps, repeats=repeats)
    res["prefill_ms"] = time_prefill(model, prefill_rows, repeats=2 * repeats)
    res["mixed"] = time_mixed(model, batch, ctx, prefill_rows, repeats=2 * repeats)
    nbytes = torch.finfo(model.dtype).bits // 8
    res["hbm_floor_ms"] = hbm_floor_ms(cfg, batch, ctx, nbytes)
    # the timed decode steps run at contexts ctx+1 .. ctx+steps
    res["decode"]["mean_ctx"] = ctx + (steps + 1) / 2
    res["hbm_floor_ms_at_mean_ctx"] = hbm_floor_ms(cfg, batch, ctx + (steps + 1) / 2, nbytes)
    return res


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=None, help="context length (default: the shape's)")
    ap.add_argument("--prefill-rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("torch_llama.py: needs a CUDA GPU (torch.cuda.is_available() is False); the model "
              "runs on a CPU only through TorchLlama(..., attention='torch')", file=sys.stderr)
        return 1
    try:
        import flashinfer
    except ImportError:
        print("torch_llama.py: needs flashinfer (pip install -e '.[flashinfer]')", file=sys.stderr)
        return 1
    cfg, default_ctx = SHAPES[args.shape]
    ctx = args.ctx if args.ctx is not None else default_ctx
    res = run_benchmark(cfg, args.batch, ctx, prefill_rows=args.prefill_rows, steps=args.steps,
                        repeats=args.repeats)
    res.update(shape=args.shape, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               flashinfer=flashinfer.__version__)
    d, m, c = res["decode"], res["mixed"], res["check"]
    print(f"torch + FlashInfer, {args.shape} ({res['gpu']}), batch {args.batch}, ctx {ctx}, "
          f"{res['dtype']}")
    print(f"  check         FlashInfer vs dense attention: max |logit diff| "
          f"{c['max_abs_logit_diff']:.2e}, argmax agree {c['argmax_agree']:.3f}; graph tokens = "
          f"eager tokens: {c['tokens_graph_eq_eager']:.3f}")
    print(f"  decode step   eager {d['eager_ms']:.3f} ms | CUDA graph (plan + replay) "
          f"{d['graph_ms']:.3f} ms | replay only {d['graph_replay_only_ms']:.3f} ms | "
          f"HBM floor {res['hbm_floor_ms']:.3f} ms")
    print(f"  prefill chunk {args.prefill_rows} rows: {res['prefill_ms']:.3f} ms")
    print(f"  mixed         prefill {m['prefill_ms']:.3f} + decode {m['decode_ms']:.3f}: separate "
          f"{m['separate_ms']:.3f} ms (with the decode graph {m['separate_graph_ms']:.3f} ms), one "
          f"forward {m['fused_ms']:.3f} ms")
    print("TORCH_LLAMA", json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
