"""The serving engine on FlashInfer (GPU): greedy tokens against the dense float32 model (fp16
near-ties counted), every mode, seeded sampling, stop tokens, cancellation, no page leaked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqattn_jax as sj
from seqattn_jax.backend import flashinfer_available
from seqattn_jax.models.llama import LlamaConfig, LlamaModel, init_params
from seqattn_jax.serving import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.gpu

if not flashinfer_available():
    pytest.skip("needs JAX on a CUDA GPU with torch (CUDA) and flashinfer", allow_module_level=True)

CFG = LlamaConfig(vocab_size=512, d_model=256, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=128, ffn_dim=512, dtype="float16")
MODEL = LlamaModel(CFG)
PARAMS = init_params(CFG, 0)
CACHE = sj.CacheConfig(num_pages=96, page_size=16, num_kv_heads=2, head_dim=128, max_seqs=6,
                       max_pages_per_seq=8, num_layers=2, dtype="float16")
TOL = 0.05   # dense-logit margin under which an fp16 difference is a near-tie


def _prompts(seed, n):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, CFG.vocab_size, size=40)
    return [np.concatenate([prefix, rng.integers(0, CFG.vocab_size, size=int(rng.integers(1, 50)))])
            if i % 2 else rng.integers(0, CFG.vocab_size, size=int(rng.integers(1, 70)))
            for i in range(n)]


def _check_dense(prompts, outs):
    """Teacher-forced dense float32 logits: each served token is the argmax or a near-tie."""
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), PARAMS)
    cfg32 = LlamaConfig(**{**CFG.__dict__, "dtype": "float32"})
    ties = 0
    for p, o in zip(prompts, outs):
        seq = np.concatenate([p, np.asarray(o[:-1], np.int32)])[None]
        with jax.default_matmul_precision("highest"):
            logits = np.asarray(LlamaModel(cfg32).dense_logits(p32, jnp.asarray(seq)))[0]
        at = logits[len(p) - 1:, :]
        margin = at.max(-1) - at[np.arange(len(o)), np.asarray(o)]
        assert np.all(margin <= TOL), margin
        ties += int(np.sum(margin > 0))
    return ties


MODES = {"all_on": {}, "no_mixed": {"mixed_steps": False}, "sync": {"async_steps": False},
         "no_prefix_cache": {"prefix_cache": False}, "device_plans": {"host_plans": False},
         "cuda_graphs": {"cuda_graphs": True}, "cuda_graphs_no_mixed": {"cuda_graphs": True,
                                                                       "mixed_steps": False}}


def _backend(cuda_graphs: bool):
    from seqattn_jax.bridge import FlashInferBackend, ffi  # noqa: PLC0415

    if cuda_graphs and not ffi.available():
        pytest.skip(f"XLA FFI bridge unavailable: {ffi.unavailable_reason()}")
    return FlashInferBackend(cuda_graphs=cuda_graphs)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_engine_on_flashinfer_matches_the_dense_model(mode):
    prompts = _prompts(1, 10)
    kw = dict(MODES[mode])
    eng = Engine(MODEL, PARAMS, CACHE, EngineConfig(
        chunk=64, backend=_backend(kw.pop("cuda_graphs", False)), **kw))
    assert eng.backend.name == "flashinfer"
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=12))
    _check_dense(prompts, outs)
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}


def test_engine_on_flashinfer_sampling_stop_and_cancel():
    prompts = _prompts(2, 8)
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = Engine(MODEL, PARAMS, CACHE, EngineConfig(chunk=64, backend="flashinfer")).generate(
        [prompts[0]], sp)[0]
    eng = Engine(MODEL, PARAMS, CACHE, EngineConfig(chunk=64, backend="flashinfer"))
    hs = [eng.submit(p, SamplingParams(max_new_tokens=10, temperature=0.7, seed=i))
          for i, p in enumerate(prompts[1:])]
    h0 = eng.submit(prompts[0], sp)
    greedy = eng.submit(prompts[1], SamplingParams(max_new_tokens=10))
    for _ in range(3):
        eng.step()
    hs[2].cancel()
    eng.run()
    np.testing.assert_array_equal(a, h0.result())          # same seed, other batch: same tokens
    stop = greedy.tokens[4]
    first = greedy.tokens.index(stop)
    eng2 = Engine(MODEL, PARAMS, CACHE, EngineConfig(chunk=64, backend="flashinfer"))
    h = eng2.submit(prompts[1], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    eng2.run()
    assert h.tokens == greedy.tokens[:first + 1] and h.finish_reason == "stop"
    assert hs[2].finish_reason == "cancelled"
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}
