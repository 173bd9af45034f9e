"""Flax NNX integration: paged attention as a layer that a Flax model calls inside its jitted step.

`import seqattn_jax` never imports flax; this module does: `from seqattn_jax import nnx as sa_nnx`.

The KV pool is not a variable of the model. It is threaded through the step as an explicit value
and donated, like the `CacheState` (state in, state out), so XLA updates it in place:

    attn = PagedAttention(cache_config, num_q_heads=Hq)            # a static sub-module of the model

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def decode_step(params, kv, state, tokens, seq_ids):
        state, status = seqattn_jax.allocate_decoding(state, seq_ids)
        ok = seqattn_jax.ok(status)
        packed = seqattn_jax.pack_for_flashinfer(state, seq_ids)
        model = nnx.merge(graphdef, params)
        plan = attn.plan(packed, mode="decode")                    # once per step, every layer
        ...                                                        # per layer l (a lax.scan):
        out, kv = attn(q, k, v, kv, packed, layer=l, mode="decode", plan=plan)
        ...
        return logits, kv, state

`PagedAttention.__call__` writes this step's K/V rows into layer `layer`'s pages, then attends over
the pages. One pool holds every layer (page p of layer l is row `l * num_pages + p`), so a
`lax.scan` over layers carries the whole pool and passes a traced `layer`; no slice of the pool is
ever materialised. With the pool donated there is no copy of the cache per step
(`tests/test_nnx.py` checks that `kv.unsafe_buffer_pointer()` is unchanged across donated steps).

Row layout: q, k, v are `[T, heads, head_dim]` with T = `packed.num_token_rows`; request b's rows
are `packed.qo_indptr[b] : packed.qo_indptr[b + 1]` (the order in which `pack_for_flashinfer` lays
out the step's new tokens) and rows past `qo_indptr[B]` are padding: not written, output 0. A decode
batch (`pack_for_flashinfer(state, seq_ids)`) has row b = request b; a padding request's row is not
written and outputs 0. The model applies RoPE itself at `packed.positions` before calling the layer.

Backends: the ops of `seqattn_jax.attention` with `backend="auto"` (FlashInfer on a CUDA GPU where it
imports and can run the configuration, else the pure-JAX reference), "reference" or "flashinfer".
FlashInfer plans once per step on the host: make the plan with `PagedAttention.plan` outside the
layer loop and pass it to every layer (the reference backend ignores plans, so the same model code
runs on both).
"""

from __future__ import annotations

try:
    from flax import nnx
except ModuleNotFoundError as e:  # name the extra, not only the missing module
    if e.name != "flax" and not (e.name or "").startswith("flax."):
        raise
    raise ModuleNotFoundError(
        "seqattn_jax.nnx needs Flax: pip install 'seqattn-jax[example]' (or pip install flax)",
        name=e.name) from e

from seqattn_jax import attention
from seqattn_jax.config import CacheConfig
from seqattn_jax.packing import PackedBatch

__all__ = ["BACKENDS", "MODES", "PagedAttention", "paged_attention", "plan_attention", "resolve_backend"]

MODES = ("prefill", "decode")
BACKENDS = attention.BACKENDS


def resolve_backend(backend: str = "auto") -> str:
    """The backend `backend` names on this machine: "reference" or "flashinfer" (before the
    per-configuration checks, e.g. FlashInfer takes no float32 pool: "auto" then falls back)."""
    return attention.resolve_backend(backend)


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_inputs(config: CacheConfig, q, k, v, packed):
    if not isinstance(config, CacheConfig):
        raise ValueError(f"config must be a seqattn_jax.CacheConfig, got {type(config).__name__}")
    if not isinstance(packed, PackedBatch):
        raise ValueError(f"packed must be a seqattn_jax.PackedBatch, got {type(packed).__name__}")
    t = packed.num_token_rows
    hkv, d = config.num_kv_heads, config.head_dim
    if q.ndim != 3 or q.shape[0] != t or q.shape[2] != d:
        raise ValueError(f"q must have shape [T = packed.num_token_rows = {t}, num_q_heads, "
                         f"head_dim = {d}], got {tuple(q.shape)}")
    if q.shape[1] < hkv or q.shape[1] % hkv:
        raise ValueError(f"q.shape[1] (num_q_heads = {q.shape[1]}) must be a positive multiple of "
                         f"config.num_kv_heads = {hkv} (GQA)")
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != (t, hkv, d):
            raise ValueError(f"{name} must have shape [T, num_kv_heads, head_dim] = {(t, hkv, d)}, "
                             f"got {tuple(x.shape)}")


def plan_attention(config: CacheConfig, packed: PackedBatch, num_q_heads: int, *, mode: str = "prefill",
                   q_dtype=None, backend: str = "auto", sm_scale=None, logits_soft_cap: float = 0.0,
                   window_left: int = -1, decode_kernel: str = "auto") -> attention.AttentionPlan:
    """This step's attention plan for every layer (`attention.plan_prefill` / `plan_decode`).

    Call it inside the jitted step, once, outside the loop over layers. `q_dtype` defaults to the
    pool dtype. The options must be those later given to `paged_attention`.
    """
    _check_mode(mode)
    opts = dict(q_dtype=q_dtype, backend=backend, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                window_left=window_left)
    if mode == "prefill":
        return attention.plan_prefill(config, packed, num_q_heads, causal=True, **opts)
    return attention.plan_decode(config, packed, num_q_heads, decode_kernel=decode_kernel, **opts)


def paged_attention(config: CacheConfig, q, k, v, kv, packed: PackedBatch, *, layer=0,
                    mode: str = "prefill", plan: attention.AttentionPlan | None = None,
                    backend: str = "auto", sm_scale=None, logits_soft_cap: float = 0.0,
                    window_left: int = -1, decode_kernel: str = "auto"):
    """Write this step's K/V into the pool, then attend over the pages (one layer).

    Args:
      config: the cache's `CacheConfig`.
      q: [T, Hq, D] queries, T = `packed.num_token_rows`, rows laid out by `packed.qo_indptr`.
      k, v: [T, Hkv, D] the new tokens' keys and values (RoPE already applied to q and k).
      kv: the all-layer pool (`config.kv_shape`); donate it in the enclosing `jax.jit`.
      packed: the step's `PackedBatch` (`pack_for_flashinfer` after allocating this step's tokens).
      layer: Python int or traced int32 scalar (e.g. the index of a `lax.scan` over layers).
      mode (static): "prefill": any number of rows per request, causal (chunked prefill; also right
        for decode); "decode": exactly one new token per valid request (`pack_for_flashinfer(state,
        seq_ids)` without new_lens): runs the decode kernel.
      plan: this step's `plan_attention(...)` (same mode and options). None plans per call: fine for
        the reference backend, one host sync per layer for FlashInfer.
      backend, sm_scale, logits_soft_cap, window_left, decode_kernel: as in `seqattn_jax.attention`.
    Returns:
      (out [T, Hq, D] in q.dtype, 0 on padding rows; the updated pool).
    """
    _check_mode(mode)
    _check_inputs(config, q, k, v, packed)
    if plan is None and backend != "reference":
        plan = plan_attention(config, packed, q.shape[1], mode=mode, q_dtype=q.dtype, backend=backend,
                              sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                              window_left=window_left, decode_kernel=decode_kernel)
    kv = attention.append_kv(config, kv, k, v, packed, layer=layer, backend=backend, plan=plan)
    opts = dict(layer=layer, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                window_left=window_left, backend=backend, plan=plan)
    if mode == "prefill":
        return attention.batch_prefill(config, q, kv, packed, causal=True, **opts), kv
    # Decode: `pack_for_flashinfer(state, seq_ids)` lays row b = request b, as the kernel's q[B].
    if packed.num_token_rows != packed.batch_size:
        raise ValueError(f"paged_attention: mode='decode' needs one row per request "
                         f"(pack_for_flashinfer with new_lens=None), got {packed.num_token_rows} rows "
                         f"for {packed.batch_size} requests")
    out = attention.batch_decode(config, q, kv, packed, decode_kernel=decode_kernel, **opts)
    return out.astype(q.dtype), kv


class PagedAttention(nnx.Module):
    """Paged attention as an NNX layer: no parameters, static options; the pool goes in and out.

    Args (all static):
      config: the cache's `CacheConfig` (heads, head_dim, page size, pool shape, layers).
      num_q_heads: query heads, a multiple of `config.num_kv_heads`.
      mode: default mode, "prefill" (causal, ragged rows) or "decode" (one row per request).
      backend: "auto" | "reference" | "flashinfer".
      sm_scale: softmax scale (default `1/sqrt(head_dim)`); logits_soft_cap, window_left: as in
        FlashInfer (0 / -1 disable them); decode_kernel: "auto" | "tensor_core" | "cuda_core".

    `plan(packed, mode=None)` -> the step's plan (once per step); `__call__(q, k, v, kv, packed, *,
    layer=0, mode=None, plan=None)` -> (out, kv): see `paged_attention`.
    """

    def __init__(self, config: CacheConfig, *, num_q_heads: int, mode: str = "prefill",
                 backend: str = "auto", sm_scale: float | None = None, logits_soft_cap: float = 0.0,
                 window_left: int = -1, decode_kernel: str = "auto"):
        if not isinstance(config, CacheConfig):
            raise ValueError(f"PagedAttention: config must be a CacheConfig, got {type(config).__name__}")
        if (isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads <= 0
                or num_q_heads % config.num_kv_heads):
            raise ValueError(f"PagedAttention: num_q_heads must be a positive multiple of "
                             f"config.num_kv_heads = {config.num_kv_heads}, got {num_q_heads!r}")
        _check_mode(mode)
        if backend not in BACKENDS:
            raise ValueError(f"PagedAttention: backend must be one of {BACKENDS}, got {backend!r}")
        self.config = config
        self.num_q_heads = num_q_heads
        self.mode = mode
        self.backend = backend
        self.sm_scale = sm_scale
        self.logits_soft_cap = float(logits_soft_cap)
        self.window_left = int(window_left)
        self.decode_kernel = decode_kernel

    def _opts(self):
        return dict(backend=self.backend, sm_scale=self.sm_scale, logits_soft_cap=self.logits_soft_cap,
                    window_left=self.window_left, decode_kernel=self.decode_kernel)

    def plan(self, packed: PackedBatch, *, mode: str | None = None, q_dtype=None):
        """The step's `AttentionPlan` (make it once per step, pass it to every layer)."""
        return plan_attention(self.config, packed, self.num_q_heads, mode=mode or self.mode,
                              q_dtype=q_dtype, **self._opts())

    def __call__(self, q, k, v, kv, packed: PackedBatch, *, layer=0, mode: str | None = None,
                 plan=None):
        if q.ndim == 3 and q.shape[1] != self.num_q_heads:
            raise ValueError(f"PagedAttention: q must have num_q_heads = {self.num_q_heads} heads, "
                             f"got shape {tuple(q.shape)}")
        return paged_attention(self.config, q, k, v, kv, packed, layer=layer, mode=mode or self.mode,
                               plan=plan, **self._opts())
