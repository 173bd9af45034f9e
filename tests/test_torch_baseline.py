"""The torch + FlashInfer baseline (benchmarks/torch_llama.py) on a CPU.

The model's math runs with its dense torch attention (`attention="torch"`) and is checked against an
independent float64 numpy forward of the same params pytree (written here, cache-free, one whole
sequence at a time): the logits agree after a prefill, chunked prefills, mixed iterations and decode
steps, so the weights are read in the layout the JAX model writes. The FlashInfer code path (host
plans, metadata upload, wrapper calls, append) runs against a small CPU stand-in of the FlashInfer
API; the CUDA graph needs a GPU and is not exercised here.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "torch_llama.py"
if not _PATH.exists():   # the sdist leaves benchmarks/ out
    pytest.skip("benchmarks/torch_llama.py is not in this tree (the sdist leaves benchmarks/ out)",
                allow_module_level=True)
_spec = importlib.util.spec_from_file_location("torch_llama", _PATH)
tl = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tl          # dataclasses look their module up there
_spec.loader.exec_module(tl)

CFG = tl.BaselineConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, ffn_dim=48, rope_theta=500.0, norm_eps=1e-5, dtype="float32")


# ---------------------------------------------------------------------------------------------
# the oracle: a dense float64 numpy forward of one whole sequence


def np_forward(cfg, params, tokens):
    """Logits [L, V] (float64) at every position of one sequence `tokens` [L]."""
    p64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    hq, hkv, hd, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    L = len(tokens)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * p64(w)

    inv = 1.0 / cfg.rope_theta ** (np.arange(hd // 2) * 2.0 / hd)
    ang = np.arange(L)[:, None, None] * inv                      # [L, 1, hd/2]

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                               x2 * np.cos(ang) + x1 * np.sin(ang)], -1)

    x = p64(params["embed"])[np.asarray(tokens)]
    causal = np.tril(np.ones((L, L), bool))
    for p in params["layers"]:
        qkv = rms(x, p["attn_norm"]) @ p64(p["wqkv"])
        if p.get("bqkv") is not None:
            qkv = qkv + p64(p["bqkv"])
        q = rope(qkv[:, :hq * hd].reshape(L, hq, hd))
        k = rope(qkv[:, hq * hd:(hq + hkv) * hd].reshape(L, hkv, hd))
        v = qkv[:, (hq + hkv) * hd:].reshape(L, hkv, hd)
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        s = np.where(causal[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", a, v).reshape(L, hq * hd) @ p64(p["wo"])
        gu = rms(x, p["mlp_norm"]) @ p64(p["w_gate_up"])
        gate, up = gu[:, :f], gu[:, f:]
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ p64(p["w_down"])
    head = p64(params["lm_head"]) if params.get("lm_head") is not None else p64(params["embed"]).T
    return rms(x, params["final_norm"]) @ head


def _model(params, **kw):
    kw = dict(page_size=4, num_pages=64, max_batch=4, attention="torch", seed=3) | kw
    return tl.TorchLlama(CFG, params, "cpu", **kw)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_prefill_then_decode_equals_numpy(tied, bias):
    params = tl.random_params(CFG, seed=1, tied=tied, bias=bias)
    model = _model(params)
    rng = np.random.default_rng(0)
    seqs = [0, 2]                                   # not 0..n-1: slots are ids, not positions
    hist = [list(rng.integers(0, CFG.vocab_size, n)) for n in (5, 9)]
    logits = model.prefill(seqs, hist, logits="all").numpy()
    _close(logits[:5], np_forward(CFG, params, hist[0]))
    _close(logits[5:], np_forward(CFG, params, hist[1]))
    tokens = [int(np.argmax(np_forward(CFG, params, h)[-1])) for h in hist]
    for _ in range(4):                              # crosses a page boundary (page_size 4)
        for h, t in zip(hist, tokens):
            h.append(t)
        got = model.decode_logits(seqs, torch.tensor(tokens)).numpy()
        want = np.stack([np_forward(CFG, params, h)[-1] for h in hist])
        _close(got, want)
        tokens = [int(t) for t in np.argmax(got, -1)]
    assert model.pages.lens[seqs].tolist() == [9, 13]


def test_step_eager_feeds_back_greedy_tokens():
    params = tl.random_params(CFG, seed=2)
    model = _model(params)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    first = torch.argmax(model.prefill([0, 1], prompts), -1)
    hist = [list(p) + [int(t)] for p, t in zip(prompts, first)]
    toks = first
    for _ in range(3):
        toks = model.step_eager([0, 1], toks)
        for h, t in zip(hist, toks.tolist()):
            h.append(t)
    for h in hist:                                   # greedy decode of the dense oracle
        ref = list(h[:len(h) - 4])
        for _ in range(4):
            ref.append(int(np.argmax(np_forward(CFG, params, ref)[-1])))
        assert ref == h


def test_chunked_prefill_and_mixed_iteration_equal_numpy():
    params = tl.random_params(CFG, seed=4)
    model = _model(params)
    rng = np.random.default_rng(1)
    a = list(rng.integers(0, CFG.vocab_size, 6))     # decodes while b prefills
    b = list(rng.integers(0, CFG.vocab_size, 11))
    model.prefill([1], [a])
    _close(model.prefill([3], [b[:3]], logits="all").numpy(), np_forward(CFG, params, b[:3]))
    # a mixed iteration: b's second chunk (4 rows, 3 cached) + one decode token of a
    a.append(7)
    got = model.mixed_logits([3], [b[3:7]], [1], [7]).numpy()
    _close(got[0], np_forward(CFG, params, b[:7])[-1])
    _close(got[1], np_forward(CFG, params, a)[-1])
    # the last chunk, every row's logits, at positions 7..10
    _close(model.prefill([3], [b[7:]], logits="all").numpy(), np_forward(CFG, params, b)[7:])


def test_bad_params_and_arguments_raise():
    params = tl.random_params(CFG, seed=0)
    bad = dict(params, layers=[dict(params["layers"][0]), params["layers"][1]])
    bad["layers"][0]["wqkv"] = bad["layers"][0]["wqkv"].T
    with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['wqkv'\].*\(32, 64\)"):
        _model(bad)
    with pytest.raises(ValueError, match="num_layers=2"):
        _model(dict(params, layers=params["layers"][:1]))
    with pytest.raises(ValueError, match="attention must be"):
        _model(params, attention="xla")
    with pytest.raises(ValueError, match="cfg.sliding_window must be None"):
        tl.TorchLlama(types.SimpleNamespace(**CFG.__dict__, sliding_window=8), params, "cpu",
                      attention="torch")
    with pytest.raises(ValueError, match="cfg.dtype"):
        tl.torch_dtype("int8")
    model = _model(params)
    with pytest.raises(ValueError, match="tokens must have shape"):
        model.decode_logits([0, 1], [1])
    with pytest.raises(ValueError, match="capture_graph needs"):
        model.capture_graph(2)


# ---------------------------------------------------------------------------------------------
# the host page table


def test_page_table_matches_a_plain_model():
    ps, P, S = 4, 40, 5
    pt = tl.HostPageTable(ps, P, S, seed=7)
    rng = np.random.default_rng(5)
    lens = [0] * S
    for _ in range(300):
        seqs = list(rng.choice(S, size=int(rng.integers(1, S + 1)), replace=False))
        if rng.random() < 0.25:
            n = int(rng.integers(0, min(lens[s] for s in seqs) + 1))
            pt.truncate(seqs, n)
            for s in seqs:
                lens[s] = n
        else:
            counts = rng.integers(1, 7, len(seqs))
            need = sum(-(-(lens[s] + c) // ps) - (-(-lens[s] // ps)) for s, c in zip(seqs, counts))
            if need > pt.num_free:
                with pytest.raises(ValueError, match="out of pages"):
                    pt.extend(seqs, counts)
                continue
            lay = pt.extend(seqs, counts)
            for i, (s, c) in enumerate(zip(seqs, counts)):
                lens[s] += int(c)
                rows = range(lay.qo_indptr[i], lay.qo_indptr[i + 1])
                assert lay.batch_indices[list(rows)].tolist() == [i] * int(c)
                assert lay.positions[list(rows)].tolist() == list(range(lens[s] - c, lens[s]))
                assert lay.seq_lens[i] == lens[s]
                assert lay.kv_indptr[i + 1] - lay.kv_indptr[i] == -(-lens[s] // ps)
                assert 0 < lay.kv_last_page_len[i] <= ps
        # every held page is held once, and held + free = the pool
        held = np.concatenate([pt.table[s, :-(-lens[s] // ps)] for s in range(S)])
        assert len(set(held.tolist())) == len(held) == P - pt.num_free
        assert set(held.tolist()).isdisjoint(pt._free[:pt.num_free].tolist())
    with pytest.raises(ValueError, match="distinct"):
        pt.extend([1, 1], 1)
    with pytest.raises(ValueError, match="in \\[0, 5\\)"):
        pt.extend([5], 1)


def test_concat_layouts():
    pt = tl.HostPageTable(4, 20, 3, seed=0)
    a, b = pt.extend([0], [6]), pt.extend([2, 1], [1, 3])
    ab = tl.concat_layouts(a, b)
    assert ab.qo_indptr.tolist() == [0, 6, 7, 10]
    assert ab.kv_indptr.tolist() == [0, 2, 3, 4]
    assert ab.kv_indices.tolist() == a.kv_indices.tolist() + b.kv_indices.tolist()
    assert ab.batch_indices.tolist() == [0] * 6 + [1] + [2] * 3
    assert ab.positions.tolist() == list(range(6)) + [0] + [0, 1, 2]


def test_hbm_floor_counts_every_weight_a_step_reads():
    cfg, _ = tl.SHAPES["small"]
    small = tl.BaselineConfig(**{**cfg.__dict__, "vocab_size": 1000})
    params = tl.random_params(small, seed=0)
    n = sum(a.size for layer in params["layers"] for a in layer.values())
    n += params["final_norm"].size + params["lm_head"].size          # not the embedding gather
    kv = 64 * 320 * small.num_layers * 2 * small.num_kv_heads * small.head_dim
    want = (n + kv) * 2 / 4.3e12 * 1e3
    assert tl.hbm_floor_ms(small, 64, 320, 2) == pytest.approx(want, rel=1e-12)
    assert tl.hbm_floor_ms(small, 64, 320, 2, bw=2.15e12) == pytest.approx(2 * want)


# ---------------------------------------------------------------------------------------------
# the FlashInfer path against a CPU stand-in of FlashInfer's API


def _check_pages(cache, indices, indptr, lpl, ps):
    """What a kernel reading these pages needs in bounds (on a GPU, an illegal memory access)."""
    indptr, lpl = indptr.long(), lpl.long()
    assert indptr.dim() == lpl.dim() == 1 and len(indptr) == len(lpl) + 1 and int(indptr[0]) == 0
    assert (indptr[1:] > indptr[:-1]).all(), f"a sequence without pages: indptr {indptr.tolist()}"
    assert int(indptr[-1]) <= len(indices), f"indptr[-1] {int(indptr[-1])} > {len(indices)} ids"
    used = indices[:int(indptr[-1])].long()
    assert ((used >= 0) & (used < cache.shape[0])).all(), f"page ids {used.tolist()} off the pool"
    assert ((lpl >= 1) & (lpl <= ps)).all(), f"last page lengths {lpl.tolist()}"


def _fi_attend(q, cache, qo_indptr, indptr, indices, lpl, ps):
    """FlashInfer's paged attention semantics: a sequence's rows are its last rows (causal,
    aligned to the end of its KV); GQA maps q head h to kv head h // group."""
    hq, hkv, hd = q.shape[1], cache.shape[-2], cache.shape[-1]
    _check_pages(cache, indices, indptr, lpl, ps)
    out = torch.empty_like(q)
    for b in range(len(lpl)):
        pages = indices[int(indptr[b]):int(indptr[b + 1])].long()
        n = (len(pages) - 1) * ps + int(lpl[b])
        kvb = cache[pages]
        k = kvb[:, 0].reshape(-1, hkv, hd)[:n].repeat_interleave(hq // hkv, 1)
        v = kvb[:, 1].reshape(-1, hkv, hd)[:n].repeat_interleave(hq // hkv, 1)
        r0, r1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        s = torch.einsum("rhd,khd->hrk", q[r0:r1], k) / math.sqrt(hd)
        qpos = torch.arange(n - (r1 - r0), n)
        s = s.masked_fill(torch.arange(n)[None, None, :] > qpos[None, :, None], -math.inf)
        out[r0:r1] = torch.einsum("hrk,khd->rhd", torch.softmax(s, -1), v)
    return out


class _FakeDecode:
    """FlashInfer's decode wrapper contract. With use_cuda_graph the batch is fixed and plan copies
    indptr / indices / last_page_len into the caller's buffers, which run() reads (a captured
    kernel sees only those buffers)."""

    def __init__(self, ws, layout, use_tensor_cores=False, use_cuda_graph=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None):
        assert layout == "NHD" and use_tensor_cores
        self.graph = use_cuda_graph
        if use_cuda_graph:
            self.bufs = (paged_kv_indptr_buffer, paged_kv_indices_buffer,
                         paged_kv_last_page_len_buffer)
        self.planned = 0

    def plan(self, indptr, indices, lpl, hq, hkv, hd, ps, q_data_type=None):
        assert indptr.device.type == "cpu" and lpl.device.type == "cpu"   # planned on the host
        assert indptr.dtype == indices.dtype == lpl.dtype == torch.int32
        assert len(indices) == int(indptr[-1]) and (hq, hkv, hd) == (4, 2, 8)
        if self.graph:
            ib, xb, lb = self.bufs
            assert len(lpl) == len(lb) and len(indices) <= len(xb)
            ib.copy_(indptr)
            lb.copy_(lpl)
            xb[:len(indices)].copy_(indices)
            self.args = (torch.arange(len(lpl) + 1), ib, xb, lb, ps)
        else:
            self.args = (torch.arange(len(lpl) + 1), indptr.clone(), indices.clone(), lpl.clone(),
                         ps)
        self.planned += 1

    def run(self, q, cache):
        assert q.shape[0] == len(self.args[3])
        return _fi_attend(q, cache, *self.args)


class _FakePrefill(_FakeDecode):
    def __init__(self, ws, layout, backend="auto"):
        self.planned = 0

    def plan(self, qo_indptr, indptr, indices, lpl, hq, hkv, hd, ps, causal=False,
             q_data_type=None):
        assert causal and qo_indptr.device.type == "cpu" and indptr.device.type == "cpu"
        assert len(indices) == int(indptr[-1])
        self.args = (qo_indptr.clone(), indptr.clone(), indices.clone(), lpl.clone(), ps)
        self.planned += 1

    def run(self, q, cache):
        assert q.shape[0] == int(self.args[0][-1])
        return _fi_attend(q, cache, *self.args)


def _append(k, v, bi, pos, cache, indices, indptr, lpl, layout):
    assert layout == "NHD" and bi.dtype == pos.dtype == torch.int32
    ps = cache.shape[2]
    _check_pages(cache, indices, indptr, lpl, ps)
    assert bi.shape == pos.shape == (k.shape[0],)
    assert ((bi >= 0) & (bi < len(lpl))).all(), f"batch indices {bi.tolist()} vs {len(lpl)} seqs"
    npages = (indptr[1:] - indptr[:-1]).long()[bi.long()]
    seq_len = (npages - 1) * ps + lpl.long()[bi.long()]
    assert ((pos >= 0) & (pos.long() < seq_len)).all(), \
        f"positions {pos.tolist()} past the sequences' lengths {seq_len.tolist()}"
    for i in range(k.shape[0]):
        page = int(indices[int(indptr[int(bi[i])]) + int(pos[i]) // ps])
        cache[page, 0, int(pos[i]) % ps] = k[i]
        cache[page, 1, int(pos[i]) % ps] = v[i]


FAKE_FI = types.SimpleNamespace(
    BatchDecodeWithPagedKVCacheWrapper=_FakeDecode,
    BatchPrefillWithPagedKVCacheWrapper=_FakePrefill,
    append_paged_kv_cache=_append,
    rmsnorm=lambda x, w, eps: (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * w)


def test_flashinfer_path_with_a_cpu_stand_in():
    params = tl.random_params(CFG, seed=5, bias=True)
    fi_model = _model(params, attention="flashinfer", fi=FAKE_FI, seed=9)
    ref = _model(params)
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (3, 10, 6)]
    seqs = [0, 1, 3]
    _close(fi_model.prefill(seqs, prompts, logits="all").numpy(),
           ref.prefill(seqs, prompts, logits="all").numpy())
    toks = torch.tensor([1, 2, 3])
    for _ in range(3):
        got, want = fi_model.decode_logits(seqs, toks), ref.decode_logits(seqs, toks)
        _close(got.numpy(), want.numpy())
        toks = torch.argmax(want, -1)
    # a mixed iteration: two prefill rows planned on the prefill wrapper, three decode rows
    got = fi_model.mixed_logits([2], [[5, 6]], seqs, toks).numpy()
    _close(got, ref.mixed_logits([2], [[5, 6]], seqs, toks).numpy())
    _close(got[0], np_forward(CFG, params, [5, 6])[-1])
    assert fi_model._decode_w.planned == 4 and fi_model._prefill_w.planned == 2


def test_timing_functions_run_on_cpu():
    params = tl.random_params(CFG, seed=6)
    model = _model(params, attention="flashinfer", fi=FAKE_FI, num_pages=80)
    free = model.pages.num_free
    d = tl.time_decode(model, batch=3, ctx=9, steps=2, repeats=2, graph=False)
    assert d["eager_ms"] > 0 and d["graph_ms"] is None
    assert tl.time_prefill(model, rows=5, prior=2, seq=3, repeats=2) > 0
    m = tl.time_mixed(model, batch=2, ctx=7, rows=4, repeats=2, graph=False)
    assert all(m[k] > 0 for k in ("prefill_ms", "decode_ms", "separate_ms", "fused_ms"))
    assert m["separate_graph_ms"] is None
    assert model.pages.num_free == free and not model.pages.lens.any()     # nothing leaked


def test_check_paths_on_cpu():
    params = tl.random_params(CFG, seed=7)
    model = _model(params, attention="flashinfer", fi=FAKE_FI, num_pages=80)
    res = tl.check_paths(model, batch=3, prompt_len=5, steps=3, graph=False)
    assert res["max_abs_logit_diff"] < 1e-4 and res["argmax_agree"] == 1.0
    assert res["tokens_graph_eq_eager"] is None and not model.pages.lens.any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CLI runs the benchmark on a GPU")
def test_cli_says_it_needs_a_gpu(capsys):
    assert tl.main(["--shape", "small"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_stacked_layer_params_read_the_same():
    params = tl.random_params(CFG, seed=8, bias=True)
    stacked = dict(params, layers={k: np.stack([lay[k] for lay in params["layers"]])
                                   for k in params["layers"][0]})
    prompt = [[3, 1, 4, 1, 5, 9, 2]]
    _close(_model(stacked).prefill([0], prompt, logits="all").numpy(),
           np_forward(CFG, params, prompt[0]))


def test_logits_equal_the_jax_models_dense_oracle():
    """The same params pytree through seqattn_jax's own Llama (its dense float32 oracle)."""
    llama = pytest.importorskip("seqattn_jax.models.llama")
    for tied, bias in ((False, False), (True, True)):
        cfg = llama.LlamaConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, ffn_dim=48, rope_theta=500.0,
                                tie_embeddings=tied, qkv_bias=bias, dtype="float32")
        params = llama.init_params(cfg, 3)
        params_np = {k: ([{n: np.asarray(a) for n, a in lay.items()} for lay in v]
                         if k == "layers" else np.asarray(v)) for k, v in params.items()}
        tokens = np.random.default_rng(4).integers(0, 61, 13)
        want = np.asarray(llama.dense_logits(params, cfg, tokens[None]))[0]
        model = tl.TorchLlama(cfg, params_np, "cpu", page_size=4, num_pages=16, max_batch=1,
                              attention="torch")
        _close(model.prefill([0], [tokens[:6]], logits="all").numpy(), want[:6])
        _close(model.prefill([0], [tokens[6:]], logits="all").numpy(), want[6:])


def test_graph_step_plumbing_without_cuda():
    """The graph step's static buffers, plans and token feedback, replayed eagerly (no CUDA here):
    its greedy tokens equal the eager steps' (check_paths), and a mixed iteration with the decode
    step replayed times on the CPU."""
    params = tl.random_params(CFG, seed=10)
    model = _model(params, attention="flashinfer", fi=FAKE_FI, num_pages=80)
    model.capture_graph(3, capture=False)
    res = tl.check_paths(model, batch=3, prompt_len=6, steps=5, graph=True)
    assert res["tokens_graph_eq_eager"] == 1.0 and res["max_abs_logit_diff"] < 1e-4
    m = tl.time_mixed(model, batch=3, ctx=5, rows=4, repeats=1)
    assert m["separate_graph_ms"] > 0 and not model.pages.lens.any()
    with pytest.raises(ValueError, match="no graph for batch 2"):
        model.step_graph([0, 1])


def _base_ref(t):
    """A weak reference to the tensor owning t's memory (a view's base: a view made per call, as
    kv[layer], dies at once while its memory lives on)."""
    return weakref.ref(t if t._base is None else t._base)


def test_graph_step_owns_every_buffer_its_kernels_read():
    """The CUDA graph bug this catches: the graph's append read its batch indices from a tensor
    only a local of capture_graph held; a CUDA graph keeps no tensor alive, so once capture_graph
    returned that block went back to torch's allocator, the next 512-byte allocation (a clone of
    the token buffer) reused it, and the replay read token ids as batch indices (an illegal memory
    access on an H200). Here every tensor the capture hands FlashInfer is recorded (weakly); with
    the replay stand-in dropped (a real graph holds no references), each must still be alive.
    The stand-in also bounds-checks every append and attention call (_check_pages): the capture
    writes only the scratch page, and the graph steps stay inside their sequences' pages."""
    seen = []
    written = []

    def append(k, v, bi, pos, cache, indices, indptr, lpl, layout):
        seen.extend(_base_ref(t) for t in (bi, pos, cache, indices, indptr, lpl))
        ps = cache.shape[2]
        written.extend(int(indices[int(indptr[int(b)]) + int(p) // ps]) for b, p in zip(bi, pos))
        _append(k, v, bi, pos, cache, indices, indptr, lpl, layout)

    class Decode(_FakeDecode):
        def run(self, q, cache):
            seen.extend(_base_ref(t) for t in (cache, *self.args[:4]))
            return super().run(q, cache)

    fi = types.SimpleNamespace(**dict(vars(FAKE_FI), append_paged_kv_cache=append,
                                      BatchDecodeWithPagedKVCacheWrapper=Decode))
    params = tl.random_params(CFG, seed=11)
    model = _model(params, attention="flashinfer", fi=fi, num_pages=80)
    model.capture_graph(3, capture=False)
    assert len(seen) == 11 * CFG.num_layers and set(written) == {model.num_pages}   # scratch
    model._graphs[3].graph = None                # what a torch.cuda.CUDAGraph keeps: no tensors
    gc.collect()
    dead = [i for i, r in enumerate(seen) if r() is None]
    assert not dead, f"tensors the captured step reads were freed after capture: {dead}"
    # the graph path end to end with the bounds-checking stand-in (and the page ids it wrote)
    model.capture_graph(3, capture=False)
    written.clear()
    res = tl.check_paths(model, batch=3, prompt_len=6, steps=5, graph=True)
    assert res["tokens_graph_eq_eager"] == 1.0
    assert model.num_pages not in written        # no step but the capture writes the scratch page
