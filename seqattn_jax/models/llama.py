"""A functional Llama-family decoder in pure JAX: the model a serving engine drives.

RMSNorm, rotate-half RoPE (optionally Llama 3's frequency scaling), grouped-query attention with
optional q/k/v biases (Qwen2) and an optional sliding window (Mistral), SwiGLU MLP, optionally tied
embeddings. The numerics follow transformers' `LlamaForCausalLM`: RMSNorm in float32 then cast back
before the weight, RoPE angles in float32.

Parameters are a plain dict pytree in the compute dtype (no per-step casts of weights):

    "embed":      [V, d]
    "layers":     a Python list of L dicts (not stacked: a Python loop over layers measured faster
                  than `lax.scan`, and slicing stacked weights may copy them), each
        "attn_norm": [d]
        "wqkv":      [d, (Hq + 2 Hkv) * hd]   columns: all q heads, then k heads, then v heads
        "bqkv":      [(Hq + 2 Hkv) * hd]       only when `qkv_bias`
        "wo":        [Hq * hd, d]
        "mlp_norm":  [d]
        "w_gate_up": [d, 2 * ffn]              gate columns first, then up
        "w_down":    [ffn, d]
    "final_norm": [d]
    "lm_head":    [d, V]                      absent when `tie_embeddings` (logits = h @ embed.T)

The serving forward takes its attention as a function (`attend`), so the engine decides how K/V
reach the page pool and which kernel runs; `dense_logits` is the cache-free float32 oracle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MODEL_DTYPES", "ROPE_TYPES", "LlamaConfig", "LlamaModel", "attention_options", "check_params",
           "dense_logits", "forward", "init_params", "param_shapes", "rope_inv_freq"]

MODEL_DTYPES = ("float32", "float16", "bfloat16")
# rope_scaling types implemented here ("default" is plain RoPE and is stored as None).
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_F32 = jnp.float32

Params = dict
# attend(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], kv, layer: int) -> (out [T, Hq, D], kv)
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any, int], tuple[jax.Array, Any]]


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _normalize_rope_scaling(value):
    """None, a dict or an items tuple -> None or a sorted, hashable tuple of (key, value) items.

    Accepts transformers' spellings: the type under "rope_type" or (legacy) "type"."""
    if value is None:
        return None
    if isinstance(value, dict):
        items = dict(value)
    elif isinstance(value, tuple) and all(isinstance(i, tuple) and len(i) == 2 for i in value):
        items = dict(value)
    else:
        raise ValueError(f"LlamaConfig.rope_scaling must be None, a dict or a tuple of (key, value) "
                         f"items, got {value!r}")
    if "type" in items and "rope_type" not in items:
        items["rope_type"] = items.pop("type")
    items.pop("type", None)
    rope_type = items.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"LlamaConfig.rope_scaling: rope_type {rope_type!r} is not implemented "
                         f"(implemented: {ROPE_TYPES})")
    if rope_type == "default":
        return None
    for key in _LLAMA3_KEYS:
        if not _is_number(items.get(key)) or not math.isfinite(items[key]) or items[key] <= 0:
            raise ValueError(f"LlamaConfig.rope_scaling: rope_type 'llama3' needs a positive number "
                             f"{key!r}, got {items.get(key)!r}")
    if items["high_freq_factor"] <= items["low_freq_factor"]:
        raise ValueError(f"LlamaConfig.rope_scaling: high_freq_factor ({items['high_freq_factor']}) "
                         f"must be > low_freq_factor ({items['low_freq_factor']})")
    # Keep only what the computation reads (other keys, e.g. transformers' rope_theta copy, are
    # ignored), so two configs that compute the same thing are equal and hash the same.
    return tuple(sorted([(k, items[k]) for k in _LLAMA3_KEYS] + [("rope_type", "llama3")]))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static, hashable shape and numerics of a Llama-family decoder.

    Attributes:
      vocab_size, d_model, num_layers, num_heads (Hq), num_kv_heads (Hkv), head_dim (hd), ffn_dim:
        positive ints; num_heads must be a multiple of num_kv_heads (GQA), head_dim even (RoPE).
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon (transformers' `rms_norm_eps`).
      rope_scaling: None, or Llama 3's scaling as a dict / tuple of items with rope_type "llama3"
        and factor, low_freq_factor, high_freq_factor, original_max_position_embeddings (stored
        as a sorted tuple of items so the config hashes).
      tie_embeddings: logits use `embed.T` (no "lm_head" parameter).
      qkv_bias: the fused q/k/v projection has a bias (Qwen2).
      sliding_window: None, or each query sees itself and the `sliding_window - 1` keys before it
        (Mistral; transformers' convention).
      dtype: compute dtype and the dtype parameters are stored in, one of MODEL_DTYPES.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: tuple | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    dtype: str = "float16"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                    or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads}) (GQA)")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even (rotate-half RoPE), got {self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive finite float, got {value!r}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling))
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        sw = self.sliding_window
        if sw is not None:
            if isinstance(sw, (bool, np.bool_)) or not isinstance(sw, (int, np.integer)) or sw <= 0:
                raise ValueError(f"LlamaConfig.sliding_window must be None or a positive int, got {sw!r}")
            object.__setattr__(self, "sliding_window", int(sw))
        try:
            name = jnp.dtype(self.dtype).name
        except TypeError:
            name = None
        if name not in MODEL_DTYPES:
            raise ValueError(f"LlamaConfig.dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", name)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def qkv_dim(self) -> int:
        """Output columns of the fused q/k/v projection, (Hq + 2 Hkv) * hd."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def num_params(self) -> int:
        d, f = self.d_model, self.ffn_dim
        layer = d * self.qkv_dim + self.num_heads * self.head_dim * d + 3 * d * f + 2 * d
        layer += self.qkv_dim if self.qkv_bias else 0
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.num_layers * layer + self.vocab_size * d + d + head


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies, float32 [head_dim / 2], as transformers computes them.

    Plain: `1 / theta ** (2i / hd)`. Llama 3 (`_compute_llama3_parameters`): wavelengths longer
    than `original_max_position_embeddings / low_freq_factor` are divided by `factor`, shorter than
    `... / high_freq_factor` kept, and those between interpolated smoothly. Computed with float32
    numpy operations in transformers' order (its torch code runs in float32).
    """
    d = cfg.head_dim
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, d, 2).astype(f32) / f32(d)))
    if cfg.rope_scaling is None:
        return inv_freq
    s = dict(cfg.rope_scaling)
    factor, low, high = f32(s["factor"]), f32(s["low_freq_factor"]), f32(s["high_freq_factor"])
    old_len = f32(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(f32)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def _rope_tables(cfg: LlamaConfig, positions):
    """cos, sin float32 [..., 1, hd/2] of int positions [...] (broadcast over heads)."""
    angle = positions.astype(_F32)[..., None, None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(angle), jnp.sin(angle)


def _rope(x, cos, sin):
    """Rotate-half RoPE of x [..., H, D] in float32, cast back to x.dtype."""
    half = x.shape[-1] // 2
    x32 = x.astype(_F32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rms_norm(x, weight, eps: float):
    """transformers' LlamaRMSNorm: normalise in float32, cast to x.dtype, then times the weight."""
    x32 = x.astype(_F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(eps))
    return y.astype(x.dtype) * weight


def _qkv(cfg: LlamaConfig, layer: dict, h, rope_tables, precision=None, groups: int = 1):
    """h [..., d] -> q [..., Hq, hd], k, v [..., Hkv, hd], RoPE (`_rope_tables`) applied to q and k.

    `groups` > 1: wqkv's columns are `groups` blocks of [q | k | v] heads (tensor parallel's
    layout, `seqattn_jax.sharding.qkv_permutation`): block i holds q heads [i * Hq/g, ...) and
    their k / v heads, so a column split by g gives each device its own heads and no reshard."""
    qkv = jnp.dot(h, layer["wqkv"], precision=precision)
    if cfg.qkv_bias:
        qkv = qkv + layer["bqkv"]
    g, lead = groups, h.shape[:-1]
    hq, hkv, hd = cfg.num_heads // g, cfg.num_kv_heads // g, cfg.head_dim
    qkv = qkv.reshape(*lead, g, hq + 2 * hkv, hd)
    qk = _rope(qkv[..., : hq + hkv, :], *(t[..., None, :, :] for t in rope_tables))
    return (qk[..., :hq, :].reshape(*lead, g * hq, hd), qk[..., hq:, :].reshape(*lead, g * hkv, hd),
            qkv[..., hq + hkv:, :].reshape(*lead, g * hkv, hd))


def _mlp(layer: dict, h, ffn: int, precision=None, groups: int = 1):
    """SwiGLU; `groups` > 1: w_gate_up's columns are `groups` blocks of [gate | up] (see `_qkv`)."""
    gu = jnp.dot(h, layer["w_gate_up"], precision=precision)
    gu = gu.reshape(*h.shape[:-1], groups, 2 * (ffn // groups))
    f = ffn // groups
    act = (jax.nn.silu(gu[..., :f]) * gu[..., f:]).reshape(*h.shape[:-1], ffn)
    return jnp.dot(act, layer["w_down"], precision=precision)


def _logits(cfg: LlamaConfig, params: Params, h, precision=None):
    """h [..., d] (final-normed) -> float32 logits [..., V], accumulated in float32."""
    if cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"], precision=precision,
                          preferred_element_type=_F32)
    return jnp.dot(h, params["lm_head"], precision=precision, preferred_element_type=_F32)


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------

def param_shapes(cfg: LlamaConfig) -> dict:
    """The parameter layout as a pytree of shape tuples (same structure as the params)."""
    d, hd = cfg.d_model, cfg.head_dim
    layer = {"attn_norm": (d,), "wqkv": (d, cfg.qkv_dim), "wo": (cfg.num_heads * hd, d),
             "mlp_norm": (d,), "w_gate_up": (d, 2 * cfg.ffn_dim), "w_down": (cfg.ffn_dim, d)}
    if cfg.qkv_bias:
        layer["bqkv"] = (cfg.qkv_dim,)
    shapes = {"embed": (cfg.vocab_size, d), "layers": [dict(layer) for _ in range(cfg.num_layers)],
              "final_norm": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def check_params(cfg: LlamaConfig, params: Params) -> None:
    """Raise a ValueError naming the first parameter whose presence, shape or dtype is wrong."""
    expected = param_shapes(cfg)
    if not isinstance(params, dict) or set(params) != set(expected):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params must be a dict with keys {sorted(expected)}, got {got}")
    if not isinstance(params["layers"], (list, tuple)) or len(params["layers"]) != cfg.num_layers:
        raise ValueError(f"params['layers'] must be a list of {cfg.num_layers} dicts")
    flat_exp = jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, shape in flat_exp:
        where = "params" + jax.tree_util.keystr(path)
        try:
            node = params
            for k in path:
                node = node[k.key if hasattr(k, "key") else k.idx]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{where} is missing") from e
        if tuple(node.shape) != shape or jnp.dtype(node.dtype) != cfg.jnp_dtype:
            raise ValueError(f"{where} must be {cfg.dtype}{list(shape)}, got "
                             f"{jnp.dtype(node.dtype).name}{list(node.shape)}")
    for i, layer in enumerate(params["layers"]):
        if set(layer) != set(expected["layers"][i]):
            raise ValueError(f"params['layers'][{i}] must have keys {sorted(expected['layers'][i])}, "
                             f"got {sorted(layer)}")


def init_params(cfg: LlamaConfig, seed: int) -> Params:
    """Random parameters in `cfg.dtype`, drawn with numpy (no XLA compilation per shape).

    Scales as `examples/model.py`: embeddings std 1, kernels std 1/sqrt(n_in), `wo` and `w_down`
    further scaled by 1/sqrt(2L), lm_head std 4/sqrt(d) (so greedy decoding is not degenerate),
    biases std 0.1, norm weights 1.
    """
    if not isinstance(cfg, LlamaConfig):
        raise ValueError(f"cfg must be a LlamaConfig, got {type(cfg).__name__}")
    rng = np.random.default_rng(seed)
    dt = cfg.jnp_dtype
    depth = 1.0 / math.sqrt(2 * cfg.num_layers)

    def normal(shape, std):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * np.float32(std), dt)

    def kernel(shape, scale=1.0):
        return normal(shape, scale / math.sqrt(shape[0]))

    shapes = param_shapes(cfg)
    layers = []
    for shp in shapes["layers"]:
        layer = {"attn_norm": jnp.ones(shp["attn_norm"], dt), "wqkv": kernel(shp["wqkv"]),
                 "wo": kernel(shp["wo"], depth), "mlp_norm": jnp.ones(shp["mlp_norm"], dt),
                 "w_gate_up": kernel(shp["w_gate_up"]), "w_down": kernel(shp["w_down"], depth)}
        if cfg.qkv_bias:
            layer["bqkv"] = normal(shp["bqkv"], 0.1)
        layers.append(layer)
    params = {"embed": normal(shapes["embed"], 1.0), "layers": layers,
              "final_norm": jnp.ones(shapes["final_norm"], dt)}
    if not cfg.tie_embeddings:
        params["lm_head"] = kernel(shapes["lm_head"], 4.0)
    return params


# ----------------------------------------------------------------------------------------------
# the serving forward and the oracle
# ----------------------------------------------------------------------------------------------

def attention_options(cfg: LlamaConfig) -> dict:
    """Keyword options the engine must plan and run attention with (seqattn_jax's `plan_*`,
    `batch_decode`, `batch_prefill`, `pod`, `batch_pod`).

    RoPE is applied in the model (Llama 3 scaling is not FlashInfer's), so `pos_encoding_mode` is
    "NONE". transformers' sliding window lets a query at position i see keys j with
    `i - sliding_window < j <= i` (sliding_window keys including itself); FlashInfer's `window_left`
    keeps `j >= i - window_left`, so `window_left = sliding_window - 1` (-1: no window).
    """
    window_left = -1 if cfg.sliding_window is None else cfg.sliding_window - 1
    return {"sm_scale": 1.0 / math.sqrt(cfg.head_dim), "logits_soft_cap": 0.0,
            "window_left": window_left, "pos_encoding_mode": "NONE"}


def forward(params: Params, cfg: LlamaConfig, tokens, positions, kv, attend: Attend, logits_rows,
            tp: int = 1):
    """The paged serving forward of one step's token rows (any mix of prefill and decode).

    Args:
      params: the parameter pytree (module docstring) in `cfg.dtype`.
      cfg: the model's `LlamaConfig` (static).
      tokens: int32 [T] token ids of the step's rows (padding rows: any id, clamped into range).
      positions: int32 [T] position of each row in its sequence; -1 for padding rows (RoPE uses 0;
        their outputs are ignored).
      kv: the attention state (e.g. the page pool); passed through `attend` only.
      attend: `attend(q [T, Hq, hd], k [T, Hkv, hd], v [T, Hkv, hd], kv, layer: int) ->
        (out [T, Hq, hd], kv)`, in cfg.dtype: writes this step's K/V (RoPE applied) into `kv` and
        attends with `attention_options(cfg)`.
      logits_rows: int32 [R] rows whose logits are wanted (e.g. each request's last row); only
        these go through the final norm and the vocabulary projection.
      tp: the params' fused projections are in tensor parallel's grouped layout for `tp` devices
        (`seqattn_jax.sharding.shard_params`); 1: the layout of the module docstring.
    Returns:
      (logits float32 [R, V], kv).
    """
    if not isinstance(cfg, LlamaConfig):
        raise ValueError(f"cfg must be a LlamaConfig, got {type(cfg).__name__}")
    check_params(cfg, params)  # Python at trace time only
    dt = cfg.jnp_dtype
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be int32 [T], got shape {tuple(tokens.shape)}")
    if positions.shape != tokens.shape or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be int32 [T] = {tuple(tokens.shape)}, got "
                         f"{positions.dtype}{tuple(positions.shape)}")
    if jnp.ndim(logits_rows) != 1:
        raise ValueError(f"logits_rows must be int32 [R], got shape {jnp.shape(logits_rows)}")
    x = jnp.take(params["embed"], tokens, axis=0, mode="clip")  # [T, d]
    rope = _rope_tables(cfg, jnp.maximum(positions.astype(jnp.int32), 0))  # once, for all layers
    t = tokens.shape[0]
    for i, layer in enumerate(params["layers"]):
        h = _rms_norm(x, layer["attn_norm"], cfg.norm_eps)
        q, k, v = _qkv(cfg, layer, h, rope, groups=tp)
        out, kv = attend(q, k, v, kv, i)
        x = x + jnp.dot(out.astype(dt).reshape(t, cfg.num_heads * cfg.head_dim), layer["wo"])
        h = _rms_norm(x, layer["mlp_norm"], cfg.norm_eps)
        x = x + _mlp(layer, h, cfg.ffn_dim, groups=tp)
    rows = jnp.take(x, jnp.asarray(logits_rows, jnp.int32), axis=0, mode="clip")
    return _logits(cfg, params, _rms_norm(rows, params["final_norm"], cfg.norm_eps)), kv


def _dense_attention(cfg: LlamaConfig, q, k, v):
    """Causal (and sliding-window) GQA attention in float32: q [R, L, Hq, hd], k/v [R, L, Hkv, hd]."""
    r, length, hq, hd = q.shape
    group = hq // cfg.num_kv_heads
    hi = jax.lax.Precision.HIGHEST
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    s = jnp.einsum("rqhd,rkhd->rhqk", q, k, precision=hi) * jnp.float32(1.0 / math.sqrt(hd))
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    mask = j <= i
    if cfg.sliding_window is not None:
        mask &= j > i - cfg.sliding_window
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("rhqk,rkhd->rqhd", p, v, precision=hi)


def dense_logits(params: Params, cfg: LlamaConfig, tokens):
    """The oracle: float32 logits [R, L, V] of whole sequences tokens int32 [R, L].

    Plain causal (and sliding-window) attention over each sequence from position 0, no cache; the
    weights are upcast and everything runs in float32 at the highest matmul precision. Trailing
    padding is harmless (position i sees only tokens <= i). Jitted (one compile per config and
    token shape).
    """
    if not isinstance(cfg, LlamaConfig):
        raise ValueError(f"cfg must be a LlamaConfig, got {type(cfg).__name__}")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int32 [R, L], got shape {tuple(tokens.shape)}")
    return _dense_logits(params, cfg, tokens)


@functools.partial(jax.jit, static_argnums=(1,))
def _dense_logits(params: Params, cfg: LlamaConfig, tokens):
    hi = jax.lax.Precision.HIGHEST
    p32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(_F32), params)
    r, length = tokens.shape
    x = jnp.take(p32["embed"], tokens, axis=0, mode="clip")  # [R, L, d]
    rope = _rope_tables(cfg, jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (r, length)))
    for layer in p32["layers"]:
        h = _rms_norm(x, layer["attn_norm"], cfg.norm_eps)
        q, k, v = _qkv(cfg, layer, h, rope, precision=hi)
        out = _dense_attention(cfg, q, k, v).reshape(r, length, -1)
        x = x + jnp.dot(out, layer["wo"], precision=hi)
        h = _rms_norm(x, layer["mlp_norm"], cfg.norm_eps)
        x = x + _mlp(layer, h, cfg.ffn_dim, precision=hi)
    return _logits(cfg, p32, _rms_norm(x, p32["final_norm"], cfg.norm_eps), precision=hi)


@dataclasses.dataclass(frozen=True)
class LlamaModel:
    """The model as an engine takes it (`model, params`): the config plus the functions over it.

    Hashable (it holds only the frozen config), so it can be a static argument of `jax.jit`.
    `tp`: its params are in tensor parallel's grouped layout for `tp` devices (made by
    `seqattn_jax.sharding.shard_llama`); 1 for the plain layout.
    """

    cfg: LlamaConfig
    tp: int = 1

    def __post_init__(self):
        if not isinstance(self.cfg, LlamaConfig):
            raise ValueError(f"LlamaModel.cfg must be a LlamaConfig, got {type(self.cfg).__name__}")
        tp = self.tp
        if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp <= 0 or \
                self.cfg.num_kv_heads % tp or self.cfg.ffn_dim % tp:
            raise ValueError(f"LlamaModel.tp must be a positive int dividing num_kv_heads "
                             f"({self.cfg.num_kv_heads}) and ffn_dim ({self.cfg.ffn_dim}), got {tp!r}")

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def num_heads(self) -> int:
        return self.cfg.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.cfg.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.cfg.head_dim

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def dtype(self) -> str:
        return self.cfg.dtype

    def init_params(self, seed: int) -> Params:
        return init_params(self.cfg, seed)

    def check_params(self, params: Params) -> None:
        check_params(self.cfg, params)

    def attention_options(self) -> dict:
        return attention_options(self.cfg)

    def forward(self, params: Params, tokens, positions, kv, attend: Attend, logits_rows):
        """`forward(params, self.cfg, ...)`: (logits float32 [R, V], kv)."""
        return forward(params, self.cfg, tokens, positions, kv, attend, logits_rows, tp=self.tp)

    def dense_logits(self, params: Params, tokens):
        """`dense_logits(params, self.cfg, tokens)`: float32 [R, L, V] (plain layout: tp=1)."""
        if self.tp != 1:
            raise ValueError(f"dense_logits takes the plain parameter layout; this model's params "
                             f"are grouped for tp={self.tp} (use LlamaModel(cfg) and the unsharded "
                             f"params)")
        return dense_logits(params, self.cfg, tokens)
