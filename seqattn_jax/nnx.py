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

Backends: `backend="auto"` (FlashInfer on a CUDA GPU where it imports and can run the
configuration, else the pure-JAX reference), "reference", "flashinfer", or a backend object (e.g.
`seqattn_jax.bridge.FlashInferBackend(transport="callback")`). FlashInfer plans once per step: make
the plan with `PagedAttention.plan` outside the layer loop and pass it to every layer (the
reference backend's plans are free, so the same model code runs on both).
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

from seqattn_jax import attention, backend as backend_mod
from seqattn_jax.config import CacheConfig
from seqattn_jax.options import AttentionOptions
from seqattn_jax.packing import PackedBatch

__all__ = ["BACKENDS", "MODES", "PagedAttention", "paged_attention", "plan_attention", "resolve_backend"]

MODES = ("prefill", "decode")
BACKENDS = backend_mod.BACKENDS


def resolve_backend(backend="auto") -> str:
    """The backend `backend` names on this machine: "reference" or "flashinfer" (before the
    per-configuration checks, e.g. FlashInfer takes no float32 pool: "auto" then falls back)."""
    return backend_mod.resolve_backend(backend)


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


def _layer_options(options: AttentionOptions | None) -> AttentionOptions:
    """The layer's options: causal (prefill mode), no LSE (the layer returns `out`)."""
    options = AttentionOptions() if options is None else options
    if not isinstance(options, AttentionOptions):
        raise ValueError(f"options must be a seqattn_jax.AttentionOptions, got {type(options).__name__}")
    return options.replace(causal=True, return_lse=False)


def plan_attention(config: CacheConfig, packed: PackedBatch, num_q_heads: int, *, mode: str = "prefill",
                   q_dtype=None, backend="auto",
                   options: AttentionOptions | None = None) -> attention.AttentionPlan:
    """This step's attention plan for every layer (`attention.plan_prefill` / `plan_decode`).

    Call it inside the jitted step, once, outside the loop over layers. `q_dtype` defaults to the
    pool dtype. `options` (sm_scale, soft cap, window, decode kernel, ...) are the layer's: it
    always runs causal and returns no LSE.
    """
    _check_mode(mode)
    opts = dict(q_dtype=q_dtype, backend=backend, options=_layer_options(options))
    if mode == "prefill":
        return attention.plan_prefill(config, packed, num_q_heads, **opts)
    return attention.plan_decode(config, packed, num_q_heads, **opts)


def paged_attention(config: CacheConfig, q, k, v, kv, packed: PackedBatch, *, layer=0,
                    mode: str = "prefill", plan: attention.AttentionPlan | None = None,
                    backend="auto", options: AttentionOptions | None = None):
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
      plan: this step's `plan_attention(...)` (same mode). None plans per call from `backend` and
        `options`: fine for the reference backend, one host sync per layer for FlashInfer.
      backend, options: as in `plan_attention` (used only when `plan` is None).
    Returns:
      (out [T, Hq, D] in q.dtype, 0 on padding rows; the updated pool).
    """
    _check_mode(mode)
    _check_inputs(config, q, k, v, packed)
    if plan is None:
        plan = plan_attention(config, packed, q.shape[1], mode=mode, q_dtype=q.dtype,
                              backend=backend, options=options)
    kv = attention.append_kv(config, kv, k, v, packed, layer=layer, plan=plan)
    if mode == "prefill":
        return attention.batch_prefill(config, q, kv, packed, layer=layer, plan=plan), kv
    # Decode: `pack_for_flashinfer(state, seq_ids)` lays row b = request b, as the kernel's q[B].
    if packed.num_token_rows != packed.batch_size:
        raise ValueError(f"paged_attention: mode='decode' needs one row per request "
                         f"(pack_for_flashinfer with new_lens=None), got {packed.num_token_rows} rows "
                         f"for {packed.batch_size} requests")
    out = attention.batch_decode(config, q, kv, packed, layer=layer, plan=plan)
    return out.astype(q.dtype), kv


class PagedAttention(nnx.Module):
    """Paged attention as an NNX layer: no parameters, static options; the pool goes in and out.

    Args (all static):
      config: the cache's `CacheConfig` (heads, head_dim, page size, pool shape, layers).
      num_q_heads: query heads, a multiple of `config.num_kv_heads`.
      mode: default mode, "prefill" (causal, ragged rows) or "decode" (one row per request).
      backend: "auto" | "reference" | "flashinfer" | a backend object.
      options: the `AttentionOptions` (sm_scale, logits_soft_cap, window_left, decode_kernel, ...;
        the layer always runs causal and returns no LSE).

    `plan(packed, mode=None)` -> the step's plan (once per step); `__call__(q, k, v, kv, packed, *,
    layer=0, mode=None, plan=None)` -> (out, kv): see `paged_attention`.
    """

    def __init__(self, config: CacheConfig, *, num_q_heads: int, mode: str = "prefill",
                 backend="auto", options: AttentionOptions | None = None):
        if not isinstance(config, CacheConfig):
            raise ValueError(f"PagedAttention: config must be a CacheConfig, got {type(config).__name__}")
        if (isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads <= 0
                or num_q_heads % config.num_kv_heads):
            raise ValueError(f"PagedAttention: num_q_heads must be a positive multiple of "
                             f"config.num_kv_heads = {config.num_kv_heads}, got {num_q_heads!r}")
        _check_mode(mode)
        if isinstance(backend, str) and backend not in BACKENDS:
            raise ValueError(f"PagedAttention: backend must be one of {BACKENDS} or a backend "
                             f"object, got {backend!r}")
        self.config = config
        self.num_q_heads = num_q_heads
        self.mode = mode
        self.backend = backend
        self.options = _layer_options(options)

    def plan(self, packed: PackedBatch, *, mode: str | None = None, q_dtype=None):
        """The step's `AttentionPlan` (make it once per step, pass it to every layer)."""
        return plan_attention(self.config, packed, self.num_q_heads, mode=mode or self.mode,
                              q_dtype=q_dtype, backend=self.backend, options=self.options)

    def __call__(self, q, k, v, kv, packed: PackedBatch, *, layer=0, mode: str | None = None,
                 plan=None):
        if q.ndim == 3 and q.shape[1] != self.num_q_heads:
            raise ValueError(f"PagedAttention: q must have num_q_heads = {self.num_q_heads} heads, "
                             f"got shape {tuple(q.shape)}")
        return paged_attention(self.config, q, k, v, kv, packed, layer=layer, mode=mode or self.mode,
                               plan=plan, backend=self.backend, options=self.options)
