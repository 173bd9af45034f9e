"""A small Llama-style decoder in Flax NNX with two attention paths over the same weights.

RMSNorm, RoPE (applied in the model, rotate-half), grouped-query attention, SwiGLU MLP; weights from
a seed, nothing downloaded. The layers are stacked (`nnx.vmap` at construction) and run as a
`lax.scan` that carries the one KV pool of every layer, addressing layer l by a traced index.

  * `Llama.paged(tokens[T], packed, kv, mode=...)`: the serving path. The step's new tokens (any
    mix of requests, laid out by `packed.qo_indptr`) are embedded, each layer writes their K/V into
    its pages and attends through `seqattn_jax.nnx.PagedAttention`; returns hidden states and the pool.
  * `Llama.dense(tokens[R, L])`: the oracle. Plain causal attention over whole sequences, recomputed
    from scratch in float32: no cache, no pages, no chunks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqattn_jax import CacheConfig, PackedBatch
from seqattn_jax.nnx import PagedAttention


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. `dtype` is the compute (and KV pool) dtype; parameters are float32."""

    vocab_size: int = 1024
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    ffn_dim: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads}) (GQA)")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (RoPE), got {self.head_dim}")

    def num_params(self) -> int:
        d, f, hd = self.d_model, self.ffn_dim, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        block = attn + 3 * d * f + 2 * d
        return self.num_layers * block + 2 * self.vocab_size * d + d


def rope(x, positions, theta: float):
    """Rotate-half RoPE of x[..., H, D] at int positions[...] (broadcast over heads), in float32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d))
    ang = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [..., 1, D/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def dense_causal_attention(q, k, v):
    """Plain causal GQA attention in float32: q[R, L, Hq, D], k/v[R, L, Hkv, D] -> [R, L, Hq, D]."""
    r, length, hq, d = q.shape
    group = hq // k.shape[2]
    k = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    s = jnp.einsum("rqhd,rkhd->rhqk", q.astype(jnp.float32), k) / math.sqrt(d)
    causal = jnp.tril(jnp.ones((length, length), bool))
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    return jnp.einsum("rhqk,rkhd->rqhd", p, v)


class Block(nnx.Module):
    """One decoder layer: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        d, hd = cfg.d_model, cfg.head_dim

        def linear(n_in, n_out, scale=1.0):
            init = nnx.initializers.normal(stddev=scale / math.sqrt(n_in))
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                              kernel_init=init, rngs=rngs)

        self.cfg = cfg
        self.attn_norm = nnx.RMSNorm(d, epsilon=cfg.norm_eps, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.wq = linear(d, cfg.num_heads * hd)
        self.wk = linear(d, cfg.num_kv_heads * hd)
        self.wv = linear(d, cfg.num_kv_heads * hd)
        self.wo = linear(cfg.num_heads * hd, d, scale=1.0 / math.sqrt(2 * cfg.num_layers))
        self.mlp_norm = nnx.RMSNorm(d, epsilon=cfg.norm_eps, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.w_gate = linear(d, cfg.ffn_dim)
        self.w_up = linear(d, cfg.ffn_dim)
        self.w_down = linear(cfg.ffn_dim, d, scale=1.0 / math.sqrt(2 * cfg.num_layers))

    def _qkv(self, x, positions):
        cfg = self.cfg
        h = self.attn_norm(x)
        lead = x.shape[:-1]
        q = self.wq(h).reshape(*lead, cfg.num_heads, cfg.head_dim)
        k = self.wk(h).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        v = self.wv(h).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        return rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta), v

    def _finish(self, x, attn_out):
        x = x + self.wo(attn_out.reshape(*x.shape[:-1], -1).astype(x.dtype))
        h = self.mlp_norm(x)
        return x + self.w_down(nnx.silu(self.w_gate(h)) * self.w_up(h))

    def paged(self, x, attn: PagedAttention, packed: PackedBatch, kv, layer, mode: str, plan):
        q, k, v = self._qkv(x, jnp.maximum(packed.positions, 0))
        out, kv = attn(q, k, v, kv, packed, layer=layer, mode=mode, plan=plan)
        return self._finish(x, out), kv

    def dense(self, x):
        positions = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
        q, k, v = self._qkv(x, positions)
        return self._finish(x, dense_causal_attention(q, k, v))


class Llama(nnx.Module):
    """The decoder. `cache` (a `CacheConfig`) enables the paged path; None builds a dense-only model."""

    def __init__(self, cfg: ModelConfig, *, cache: CacheConfig | None = None, backend: str = "auto",
                 rngs: nnx.Rngs):
        if cache is not None and (cache.num_layers != cfg.num_layers or cache.num_kv_heads != cfg.num_kv_heads
                                  or cache.head_dim != cfg.head_dim):
            raise ValueError(f"cache config ({cache.num_layers} layers, {cache.num_kv_heads} kv heads, head_dim "
                             f"{cache.head_dim}) does not match the model ({cfg.num_layers}, "
                             f"{cfg.num_kv_heads}, {cfg.head_dim})")
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(stddev=1.0), rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return Block(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        # One attention layer for every decoder layer: the pool holds all layers, `layer` picks one.
        self.attn = None if cache is None else PagedAttention(cache, num_q_heads=cfg.num_heads,
                                                              backend=backend)
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dt,
                                  param_dtype=jnp.float32, rngs=rngs,
                                  kernel_init=nnx.initializers.normal(stddev=4.0 / math.sqrt(cfg.d_model)))

    @classmethod
    def from_seed(cls, cfg: ModelConfig, seed: int, *, cache: CacheConfig | None = None,
                  backend: str = "auto") -> "Llama":
        """The model with weights drawn by numpy from `seed` (same shapes and scales as `__init__`'s
        initializers). Building abstractly and filling with numpy compiles nothing: JAX's random
        initializers cost ~0.3 s of XLA compilation per distinct shape on a small CPU."""
        abstract = nnx.eval_shape(lambda: cls(cfg, cache=cache, backend=backend, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        rng = np.random.default_rng(seed)
        out_scale = {"wo": 1.0 / math.sqrt(2 * cfg.num_layers), "w_down": 1.0 / math.sqrt(2 * cfg.num_layers),
                     "lm_head": 4.0}

        def init(path, x):
            names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
            shape = x.shape
            if names[-1] == "scale":  # RMSNorm
                value = np.ones(shape, np.float32)
            elif names[-1] == "embedding":
                value = rng.standard_normal(shape, np.float32)
            else:  # a kernel [.., n_in, n_out]
                std = out_scale.get(names[-2], 1.0) / math.sqrt(shape[-2])
                value = rng.standard_normal(shape, np.float32) * np.float32(std)
            return jnp.asarray(value, x.dtype)

        return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))

    def _scan(self, x, body_fn, carry_extra):
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, layer_state):
            x, extra, layer = carry
            x, extra = body_fn(nnx.merge(graphdef, layer_state), x, extra, layer)
            return (x, extra, layer + 1), None

        (x, extra, _), _ = jax.lax.scan(body, (x, carry_extra, jnp.int32(0)), stacked)
        return x, extra

    def paged(self, tokens, packed: PackedBatch, kv, *, mode: str = "prefill"):
        """tokens int32 [T] (rows of `packed`; padding rows any id) -> (hidden [T, d_model], kv).

        The attention plan is made once here and shared by every layer of the scan.
        """
        if self.attn is None:
            raise ValueError("Llama.paged needs a model built with cache=CacheConfig(...)")
        x = self.embed(jnp.maximum(tokens, 0))
        plan = self.attn.plan(packed, mode=mode)
        return self._scan(x, lambda blk, x, kv, l: blk.paged(x, self.attn, packed, kv, l, mode, plan), kv)

    def logits(self, hidden):
        """hidden [..., d_model] -> float32 logits [..., vocab]."""
        return self.lm_head(self.norm(hidden)).astype(jnp.float32)

    def dense(self, tokens):
        """tokens int32 [R, L] -> float32 logits [R, L, vocab]; plain causal attention, no cache.

        Causal masking makes trailing padding harmless: position i sees only tokens <= i.
        """
        x = self.embed(jnp.maximum(tokens, 0))
        x, _ = self._scan(x, lambda blk, x, extra, l: (blk.dense(x), extra), jnp.zeros((), jnp.int32))
        return self.logits(x)
