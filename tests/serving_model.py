"""A tiny pure-JAX decoder implementing `seqattn_jax.serving.ServingModel`, with a dense oracle.

Independent of the library's own models: embedding, `num_layers` x (RMS-normed attention with
rotate-half RoPE and GQA, a ReLU MLP), tied output projection. `dense_logits` recomputes whole
sequences with plain causal attention in float32 and no cache: the engine's greedy tokens must
equal its argmax continuation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _rope(x, pos):
    d = x.shape[-1]
    inv = 1.0 / (10000.0 ** (jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d))
    ang = pos.astype(jnp.float32)[..., None, None] * inv
    x1, x2 = x[..., : d // 2].astype(jnp.float32), x[..., d // 2:].astype(jnp.float32)
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang),
                            x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], -1).astype(x.dtype)


def _norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class TinyModel:
    vocab_size: int = 61
    d_model: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    dtype: str = "float32"

    def init(self, seed: int):
        rng = np.random.default_rng(seed)
        d, hq, hk, hd = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
        dt = jnp.dtype(self.dtype)
        w = lambda *s: jnp.asarray(rng.standard_normal(s) / math.sqrt(s[0]), dt)  # noqa: E731
        return {"embed": jnp.asarray(rng.standard_normal((self.vocab_size, d)), dt),
                "layers": [{"wq": w(d, hq * hd), "wk": w(d, hk * hd), "wv": w(d, hk * hd),
                            "wo": w(hq * hd, d), "w1": w(d, 2 * d), "w2": w(2 * d, d)}
                           for _ in range(self.num_layers)]}

    def attention_options(self) -> dict:
        return {}

    def _qkv(self, p, x, pos):
        h = _norm(x)
        lead = x.shape[:-1]
        q = (h @ p["wq"]).reshape(*lead, self.num_heads, self.head_dim)
        k = (h @ p["wk"]).reshape(*lead, self.num_kv_heads, self.head_dim)
        v = (h @ p["wv"]).reshape(*lead, self.num_kv_heads, self.head_dim)
        return _rope(q, pos), _rope(k, pos), v

    def _mlp(self, p, x):
        return x + jax.nn.relu(_norm(x) @ p["w1"]) @ p["w2"]

    def forward(self, params, tokens, positions, kv, attend, logits_rows):
        x = params["embed"][jnp.maximum(tokens, 0)]
        pos = jnp.maximum(positions, 0)
        for layer, p in enumerate(params["layers"]):
            q, k, v = self._qkv(p, x, pos)
            out, kv = attend(q, k, v, kv, layer)
            x = self._mlp(p, x + out.reshape(x.shape[0], -1) @ p["wo"])
        h = _norm(x[logits_rows])
        return (h @ params["embed"].T).astype(jnp.float32), kv

    def dense_logits(self, params, tokens):
        """tokens int32 [L] -> float32 logits [L, V], plain causal attention, float32, no cache."""
        p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
        x = p32["embed"][tokens]
        n = tokens.shape[0]
        pos = jnp.arange(n)
        g = self.num_heads // self.num_kv_heads
        mask = jnp.tril(jnp.ones((n, n), bool))
        for p in p32["layers"]:
            q, k, v = self._qkv(p, x, pos)
            k, v = jnp.repeat(k, g, 1), jnp.repeat(v, g, 1)
            s = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim)
            a = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), -1)
            out = jnp.einsum("hqk,khd->qhd", a, v).reshape(n, -1)
            x = self._mlp(p, x + out @ p["wo"])
        return _norm(x) @ p32["embed"].T

    def greedy_reference(self, params, prompt, n_new: int, stop=()):
        """The dense model's greedy continuation (recomputed from scratch for every token).

        Each sequence is right-padded to a power of two >= 32 and the row of its last token read:
        causal attention makes that row independent of the padding, and the few padded shapes
        compile once per process instead of once per length."""
        seq = list(int(t) for t in prompt)
        out = []
        for _ in range(n_new):
            n = len(seq)
            padded = np.zeros(max(32, 1 << (n - 1).bit_length()), np.int32)
            padded[:n] = seq
            t = int(jnp.argmax(_dense_logits_jit(self, params, jnp.asarray(padded))[n - 1]))
            out.append(t)
            if t in stop:
                break
            seq.append(t)
        return out


@functools.partial(jax.jit, static_argnums=0)
def _dense_logits_jit(model, params, tokens):
    return model.dense_logits(params, tokens)
