"""Dense float64 numpy attention: the independent oracle for paged attention tests.

Written from the formulas, not from `seqattn_jax.reference` (import nothing from the package under
test). Per request, K/V are rebuilt as contiguous arrays in token order from the page list, then
attention runs with explicit loops over queries and heads. FlashInfer's conventions
(see `seqattn_jax/reference.py` for the source lines):

  * query i of a request with q_len queries and kv_len keys sits at position kv_len - q_len + i;
  * causal: key j visible iff j <= position; window_left >= 0: iff position - j <= window_left;
  * logits: ALiBi `x*sm_scale + slope*(j - i)` (i = row index in the request, 0 for decode);
    soft cap `cap*tanh(x*sm_scale/cap)` (with ALiBi, applied to the biased logit, scaled again);
  * RoPE (LLaMA, rotate-half) on q at its position and on k at j, inv_freq = theta^(-2k/D) / scale;
  * LSE in base 2; a query with no visible key gives output 0 and LSE -inf.

Inputs may be any dtype; everything is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes (Press et al.): the geometric sequence 2^(-8/n), ... for the largest power of two
    n <= num_heads, then every other slope of the 2n-head sequence for the remaining heads."""
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra = 2.0 ** (-8.0 / (2 * closest))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return np.asarray(slopes, np.float64)


def rope_llama(x: np.ndarray, pos: float, rope_scale: float, rope_theta: float) -> np.ndarray:
    """HF-LLaMA rotary embedding of one vector x[D] at position `pos` (rotate_half convention)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (rope_scale * rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    emb = np.concatenate([pos * inv_freq, pos * inv_freq])
    rotated = np.concatenate([-x[d // 2:], x[: d // 2]])
    return x * np.cos(emb) + rotated * np.sin(emb)


def attention(q, k, v, *, causal=True, sm_scale=None, logits_soft_cap=0.0, window_left=-1,
              pos_encoding_mode="NONE", rope_scale=1.0, rope_theta=1e4, alibi_origin="row"):
    """One request: q [Q, Hq, D] against contiguous k, v [L, Hkv, D].

    alibi_origin: "row" (FlashInfer: bias slope*(j - i)) or "position" (textbook: slope*(j - pos)).
    Returns out [Q, Hq, D] float64, lse [Q, Hq] base 2.
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    n_q, hq, d = q.shape
    n_kv, hkv = k.shape[0], k.shape[1]
    assert hq % hkv == 0
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    slopes = alibi_slopes(hq)
    if pos_encoding_mode == "ROPE_LLAMA":
        k = np.stack([[rope_llama(k[j, h], j, rope_scale, rope_theta) for h in range(hkv)]
                      for j in range(n_kv)]).reshape(k.shape)
    out = np.zeros((n_q, hq, d))
    lse = np.full((n_q, hq), -np.inf)
    for i in range(n_q):
        pos = n_kv - n_q + i
        visible = [j for j in range(n_kv)
                   if (not causal or j <= pos) and (window_left < 0 or pos - j <= window_left)]
        if not visible:
            continue
        for h in range(hq):
            kh = h // group
            qv = q[i, h]
            if pos_encoding_mode == "ROPE_LLAMA":
                qv = rope_llama(qv, pos, rope_scale, rope_theta)
            logits = []
            for j in visible:
                x = float(qv @ k[j, kh])
                if pos_encoding_mode == "ALIBI":
                    origin = i if alibi_origin == "row" else pos
                    x = x * scale + slopes[h] * (j - origin)
                if logits_soft_cap > 0:
                    x = logits_soft_cap * math.tanh(x * scale / logits_soft_cap)
                elif pos_encoding_mode != "ALIBI":
                    x = x * scale
                logits.append(x)
            logits = np.asarray(logits)
            m = logits.max()
            w = np.exp(logits - m)
            out[i, h] = (w[:, None] * v[visible, kh]).sum(0) / w.sum()
            lse[i, h] = (m + math.log(w.sum())) / math.log(2.0)
    return out, lse


def contiguous_kv(pool, layout, pages, kv_len, *, layer=0, num_pages=0):
    """K, V [kv_len, Hkv, D] float64 of one request, read token by token from its page list."""
    pool = np.asarray(pool, np.float64)
    page_size = pool.shape[2] if layout == "NHD" else pool.shape[3]
    hkv = pool.shape[3] if layout == "NHD" else pool.shape[2]
    k = np.zeros((kv_len, hkv, pool.shape[-1]))
    v = np.zeros_like(k)
    for j in range(kv_len):
        row = layer * num_pages + pages[j // page_size]
        off = j % page_size
        if layout == "NHD":
            k[j], v[j] = pool[row, 0, off], pool[row, 1, off]
        else:
            k[j], v[j] = pool[row, 0, :, off], pool[row, 1, :, off]
    return k, v


def batch_decode(q, pool, layout, page_lists, kv_lens, *, layer=0, num_pages=0, **opts):
    """q [B, Hq, D]; request b has pages page_lists[b] and kv_lens[b] tokens (0: padding)."""
    q = np.asarray(q, np.float64)
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:2], -np.inf)
    for b, (pages, kv_len) in enumerate(zip(page_lists, kv_lens)):
        if kv_len == 0:
            continue
        k, v = contiguous_kv(pool, layout, pages, kv_len, layer=layer, num_pages=num_pages)
        o, l = attention(q[b:b + 1], k, v, causal=True, **opts)
        out[b], lse[b] = o[0], l[0]
    return out, lse


def batch_prefill(q, pool, layout, page_lists, kv_lens, qo_indptr, *, layer=0, num_pages=0,
                  causal=True, **opts):
    """q [T, Hq, D]; rows qo_indptr[b]:qo_indptr[b+1] are request b's; rows past qo_indptr[-1] give 0."""
    q = np.asarray(q, np.float64)
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:2], -np.inf)
    for b, (pages, kv_len) in enumerate(zip(page_lists, kv_lens)):
        lo, hi = qo_indptr[b], qo_indptr[b + 1]
        if hi == lo:
            continue
        k, v = contiguous_kv(pool, layout, pages, kv_len, layer=layer, num_pages=num_pages)
        out[lo:hi], lse[lo:hi] = attention(q[lo:hi], k, v, causal=causal, **opts)
    return out, lse
