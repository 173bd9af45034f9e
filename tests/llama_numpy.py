"""An independent float64 numpy forward of a Llama-family decoder in Hugging Face terms.

Written from transformers' modeling code (LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM),
importing nothing from seqattn_jax: weights are HF-named tensors in HF orientation (`[out, in]`,
q/k/v and gate/up separate), hyperparameters come from an HF `config.json` dict. Attention is a
plain loop over heads with an explicit mask; RoPE is rotate-half with `cat(freqs, freqs)`.

Also `to_hf_tensors`, the inverse of the loader's fusion, so the model tests can check the library's
own parameter layout through this oracle.
"""

from __future__ import annotations

import math

import numpy as np


def hf_inv_freq(config: dict) -> np.ndarray:
    """float64 [head_dim/2] inverse frequencies (transformers' `_compute_default_rope_parameters`
    and `_compute_llama3_parameters`)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    rs = config.get("rope_scaling")
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv
    assert rs.get("rope_type", rs.get("type")) == "llama3", rs
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:  # high frequency: kept
            out.append(f)
        elif wavelen > old / low:  # low frequency: scaled down by factor
            out.append(f / factor)
        else:  # in between: interpolate
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.asarray(out)


def _sliding_window(config: dict, layer: int):
    """Window of `layer` or None. Qwen2 (transformers' Qwen2Config): only with use_sliding_window,
    and only in layers >= max_window_layers (default 28)."""
    if "Qwen2ForCausalLM" in config.get("architectures", []):
        if not config.get("use_sliding_window", False) or layer < config.get("max_window_layers", 28):
            return None
    return config.get("sliding_window")


def hf_forward(tensors: dict, config: dict, tokens) -> np.ndarray:
    """float64 logits [L, V] of one sequence tokens [L] (positions 0..L-1)."""
    w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    hq = config["num_attention_heads"]
    hkv = config.get("num_key_value_heads") or hq
    hd = config.get("head_dim") or config["hidden_size"] // hq
    eps = config["rms_norm_eps"]
    tokens = np.asarray(tokens)
    length = tokens.shape[0]

    def rms(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    def linear(x, name, bias=False):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if bias else y

    freqs = np.arange(length, dtype=np.float64)[:, None] * hf_inv_freq(config)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [L, hd]
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]

    def rope(x):  # x [L, H, hd]
        rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
        return x * cos + rotated * sin

    bias = config.get("attention_bias", False) or "Qwen2ForCausalLM" in config.get("architectures", [])
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope(linear(h, p + "self_attn.q_proj", bias).reshape(length, hq, hd))
        k = rope(linear(h, p + "self_attn.k_proj", bias).reshape(length, hkv, hd))
        v = linear(h, p + "self_attn.v_proj", bias).reshape(length, hkv, hd)
        out = np.zeros((length, hq, hd))
        window = _sliding_window(config, i)
        for head in range(hq):
            kh = head // (hq // hkv)
            s = q[:, head] @ k[:, kh].T / math.sqrt(hd)
            for qi in range(length):
                for kj in range(length):
                    if kj > qi or (window is not None and qi - kj >= window):
                        s[qi, kj] = -np.inf
            s = np.exp(s - s.max(axis=1, keepdims=True))
            out[:, head] = (s / s.sum(axis=1, keepdims=True)) @ v[:, kh]
        x = x + linear(out.reshape(length, hq * hd), p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = linear(h, p + "mlp.gate_proj")
        x = x + linear(g / (1 + np.exp(-g)) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def to_hf_tensors(params: dict, hq: int, hkv: int, hd: int, ffn: int) -> dict:
    """The library's fused parameter pytree -> HF-named numpy tensors ([out, in], q/k/v separate)."""
    a = lambda x: np.asarray(x, np.float64)  # noqa: E731
    out = {"model.embed_tokens.weight": a(params["embed"]), "model.norm.weight": a(params["final_norm"])}
    if "lm_head" in params:
        out["lm_head.weight"] = a(params["lm_head"]).T
    for i, layer in enumerate(params["layers"]):
        p = f"model.layers.{i}."
        wqkv = a(layer["wqkv"])
        cuts = [hq * hd, (hq + hkv) * hd]
        for name, wpart in zip("qkv", np.split(wqkv, cuts, axis=1)):
            out[p + f"self_attn.{name}_proj.weight"] = wpart.T
        if "bqkv" in layer:
            for name, bpart in zip("qkv", np.split(a(layer["bqkv"]), cuts)):
                out[p + f"self_attn.{name}_proj.bias"] = bpart
        out[p + "self_attn.o_proj.weight"] = a(layer["wo"]).T
        out[p + "input_layernorm.weight"] = a(layer["attn_norm"])
        out[p + "post_attention_layernorm.weight"] = a(layer["mlp_norm"])
        gu = a(layer["w_gate_up"])
        out[p + "mlp.gate_proj.weight"] = gu[:, :ffn].T
        out[p + "mlp.up_proj.weight"] = gu[:, ffn:].T
        out[p + "mlp.down_proj.weight"] = a(layer["w_down"]).T
    return out


def hf_config_of(cfg) -> dict:
    """An HF config.json dict for a seqattn_jax LlamaConfig (what the oracle reads)."""
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    out = {"architectures": [arch], "hidden_size": cfg.d_model, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
           "num_hidden_layers": cfg.num_layers, "intermediate_size": cfg.ffn_dim,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
           "sliding_window": cfg.sliding_window, "use_sliding_window": cfg.sliding_window is not None,
           "max_window_layers": 0,
           "tie_word_embeddings": cfg.tie_embeddings, "vocab_size": cfg.vocab_size}
    return out
