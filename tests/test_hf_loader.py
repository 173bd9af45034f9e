"""seqattn_jax.models.hf: tiny Hugging Face checkpoints written here (numpy + safetensors, HF tensor
names, `[out, in]` weights, q/k/v and gate/up separate), loaded, and checked against the independent
numpy forward of tests/llama_numpy.py (and against transformers where it is installed); tokenizer
round trips; one clear error per unsupported config field. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqattn_jax.models import hf as hf_mod
from seqattn_jax.models import llama
from tests.llama_numpy import hf_forward

safetensors_numpy = pytest.importorskip(
    "safetensors.numpy", reason="safetensors (the optional extra 'hf') is not installed")

# head_dim 64 (FlashInfer has kernels for it; Llama's is given explicitly, != hidden/heads).
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "num_hidden_layers": 2, "vocab_size": 120, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
         "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
         "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 128,
           "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1,
           "num_hidden_layers": 2, "vocab_size": 120, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "sliding_window": 5, "head_dim": None}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128,
         "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 120, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
         "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "bfloat16",
         "use_sliding_window": False, "sliding_window": 4, "max_window_layers": 21}


def hf_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors with HF names and shapes for `config` (norm weights near 1)."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hq = config["num_attention_heads"]
    hkv = config.get("num_key_value_heads") or hq
    hd = config.get("head_dim") or d // hq

    def w(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32),
         "model.norm.weight": norm(d)}
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = (4 * w(v, d))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(d)
        t[p + "post_attention_layernorm.weight"] = norm(d)
        t[p + "self_attn.q_proj.weight"] = w(hq * hd, d)
        t[p + "self_attn.k_proj.weight"] = w(hkv * hd, d)
        t[p + "self_attn.v_proj.weight"] = w(hkv * hd, d)
        t[p + "self_attn.o_proj.weight"] = w(d, hq * hd) * 0.5
        if "Qwen2ForCausalLM" in config["architectures"]:
            for n, size in (("q", hq * hd), ("k", hkv * hd), ("v", hkv * hd)):
                t[p + f"self_attn.{n}_proj.bias"] = (0.3 * rng.standard_normal(size)).astype(np.float32)
        t[p + "mlp.gate_proj.weight"] = w(f, d)
        t[p + "mlp.up_proj.weight"] = w(f, d)
        t[p + "mlp.down_proj.weight"] = w(d, f) * 0.5
    return t


def write_checkpoint(path, config: dict, tensors: dict, *, shards: int = 1, file_dtype=None,
                     generation_config: dict | None = None) -> str:
    """Write config.json and the tensors as one model.safetensors or `shards` files with an index."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    if file_dtype is not None:
        tensors = {k: v.astype(file_dtype) for k, v in tensors.items()}
    if shards == 1:
        safetensors_numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
        return str(path)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors_numpy.save_file(part, os.path.join(path, file))
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
             "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return str(path)


def check_against_numpy(path, config, tensors, *, dtype="float32", length=12, rtol=1e-4):
    cfg, params = hf_mod.load_hf_checkpoint(path, dtype=dtype)
    llama.check_params(cfg, params)
    tokens = np.random.default_rng(5).integers(0, config["vocab_size"], (2, length)).astype(np.int32)
    got = np.asarray(llama.dense_logits(params, cfg, tokens))
    for r in range(2):
        want = hf_forward(tensors, config, tokens[r])
        err = np.abs(got[r] - want).max() / np.abs(want).max()
        assert err <= rtol, f"max |loaded - numpy| / max|numpy| = {err:.2e}"
    return cfg, params


@pytest.mark.parametrize("name,config", [("llama3", LLAMA), ("mistral", MISTRAL), ("qwen2", QWEN2)])
def test_each_architecture_matches_numpy_forward(tmp_path, name, config):
    tensors = hf_tensors(config)
    cfg, params = check_against_numpy(write_checkpoint(tmp_path / name, config, tensors), config, tensors)
    assert cfg.qkv_bias == (name == "qwen2") and cfg.tie_embeddings == (name == "qwen2")
    assert ("lm_head" in params) == (name != "qwen2")
    # Qwen2 carries sliding_window but use_sliding_window=false: no window (as transformers).
    assert cfg.sliding_window == (5 if name == "mistral" else None)
    assert llama.attention_options(cfg)["window_left"] == (4 if name == "mistral" else -1)
    if name == "llama3":
        assert dict(cfg.rope_scaling)["factor"] == 8.0 and cfg.norm_eps == 1e-5
        assert cfg.rope_theta == 500000.0


def test_llama2_style_and_sharded(tmp_path):
    """Llama 1/2 shape (no rope_scaling, MHA, no num_key_value_heads key), 3 shards + index, and an
    old checkpoint's stored rotary_emb.inv_freq (ignored)."""
    config = {k: v for k, v in LLAMA.items() if k != "rope_scaling"}
    config["num_key_value_heads"] = None
    config["rope_theta"] = 10000.0
    tensors = hf_tensors(config, seed=1)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    path = write_checkpoint(tmp_path / "sharded", config, tensors, shards=3)
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) == 3
    del tensors["model.layers.0.self_attn.rotary_emb.inv_freq"]
    cfg, _ = check_against_numpy(path, config, tensors)
    assert cfg.num_kv_heads == cfg.num_heads == 4 and cfg.rope_scaling is None and cfg.head_dim == 64


def test_qwen2_with_window_on_every_layer(tmp_path):
    config = dict(QWEN2, use_sliding_window=True, max_window_layers=0)
    tensors = hf_tensors(config, seed=2)
    cfg, _ = check_against_numpy(write_checkpoint(tmp_path / "q", config, tensors), config, tensors)
    assert cfg.sliding_window == 4


@pytest.mark.parametrize("file_dtype,dtype,tol", [("bfloat16", None, 1e-4), (None, "float16", 1e-2),
                                                  ("float16", "bfloat16", 5e-2)])
def test_dtypes(tmp_path, file_dtype, dtype, tol):
    """bfloat16 / float16 files; params land in the requested (or config's) dtype, no float32 copies."""
    import ml_dtypes

    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, None: None}[file_dtype]
    config = dict(MISTRAL)
    tensors = hf_tensors(config, seed=3)
    path = write_checkpoint(tmp_path / "d", config, tensors, file_dtype=np_dtype)
    if np_dtype is not None:  # the oracle sees exactly the stored values
        tensors = {k: v.astype(np_dtype).astype(np.float64) for k, v in tensors.items()}
    want_dtype = dtype or "bfloat16"  # MISTRAL's torch_dtype
    cfg, params = hf_mod.load_hf_checkpoint(path, dtype=dtype)
    assert cfg.dtype == want_dtype
    for leaf in jax.tree_util.tree_leaves(params):
        chex.assert_type(leaf, jnp.dtype(want_dtype))
    cfg32, params32 = check_against_numpy(path, config, tensors, dtype="float32",
                                          rtol=1e-4 if file_dtype else 1e-4)
    # Low-precision params upcast give the oracle within the rounding of the weights.
    got = np.asarray(llama.dense_logits(params, cfg, jnp.arange(10, dtype=jnp.int32)[None]))
    want = np.asarray(llama.dense_logits(params32, cfg32, jnp.arange(10, dtype=jnp.int32)[None]))
    assert np.abs(got - want).max() / np.abs(want).max() <= tol


@pytest.mark.slow
def test_loaded_model_serves_through_the_paged_forward(tmp_path):
    """The loaded params drive the paged forward (a chunked prefill + decode through the cache)."""
    from tests.test_llama_model import run_paged

    config = dict(MISTRAL, torch_dtype="float32")
    tensors = hf_tensors(config, seed=4)
    cfg, params = hf_mod.load_hf_checkpoint(write_checkpoint(tmp_path / "p", config, tensors))
    seqs = [np.arange(11, dtype=np.int32) * 7 % 120, np.arange(9, dtype=np.int32) * 5 % 120]
    got = run_paged(cfg, params, seqs, [7, 4])
    for (r, pos), logits in got.items():
        want = hf_forward(tensors, config, seqs[r][:pos + 1])[-1]
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.skipif(__import__("importlib").util.find_spec("transformers") is None
                    or __import__("importlib").util.find_spec("torch") is None,
                    reason="transformers is not installed (the numpy oracle still checks every architecture)")
@pytest.mark.parametrize("config", [LLAMA, MISTRAL, QWEN2], ids=["llama3", "mistral", "qwen2"])
def test_against_transformers(tmp_path, config):
    import torch
    import transformers

    config = dict(config, torch_dtype="float32")
    tensors = hf_tensors(config, seed=6)
    path = write_checkpoint(tmp_path / "t", config, tensors)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    tokens = np.random.default_rng(7).integers(0, config["vocab_size"], (2, 12))
    with torch.no_grad():
        want = model(torch.as_tensor(tokens)).logits.numpy()
    cfg, params = hf_mod.load_hf_checkpoint(path)
    got = np.asarray(llama.dense_logits(params, cfg, tokens.astype(np.int32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ----------------------------------------------------------------------------------------------
# configs of released models (header only) and unsupported fields
# ----------------------------------------------------------------------------------------------

def test_released_model_configs():
    """Field values as in the released config.json files of these models."""
    llama31 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
               "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
               "torch_dtype": "bfloat16", "tie_word_embeddings": False, "attention_bias": False,
               "mlp_bias": False, "pretraining_tp": 1, "head_dim": 128,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    cfg = hf_mod.config_from_hf(llama31)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.dtype, cfg.sliding_window) == (128, 8, "bfloat16", None)
    mistral = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
               "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
               "torch_dtype": "bfloat16", "tie_word_embeddings": False, "hidden_act": "silu"}
    cfg = hf_mod.config_from_hf(mistral, "float16")
    assert llama.attention_options(cfg)["window_left"] == 4095 and cfg.dtype == "float16"
    qwen25 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
              "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24,
              "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    cfg = hf_mod.config_from_hf(qwen25)
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.sliding_window is None and cfg.head_dim == 64
    # transformers 5 spelling of RoPE.
    v5 = {k: v for k, v in llama31.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(llama31["rope_scaling"], rope_theta=500000.0)
    assert hf_mod.config_from_hf(v5) == hf_mod.config_from_hf(llama31)


BAD = [
    ({"architectures": ["GPTNeoXForCausalLM"]}, "architectures"),
    ({"architectures": None, "model_type": "gemma"}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling.rope_type='yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling.rope_type='linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling.rope_type='dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"hidden_size": 66, "head_dim": None}, "hidden_size=66 is not a multiple"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"head_dim": 15}, "head_dim=15 must be even"),
    ({"torch_dtype": "int8"}, "torch_dtype='int8'"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"vocab_size": None}, "vocab_size is required"),
    ({"sliding_window": -4}, "sliding_window"),
]


@pytest.mark.parametrize("change,match", BAD, ids=[m for _, m in BAD])
def test_unsupported_config_fields(change, match):
    with pytest.raises(ValueError, match=match):
        hf_mod.config_from_hf(dict(LLAMA, **change), backend="reference")


def test_qwen2_partial_window_and_head_dim_backend():
    with pytest.raises(ValueError, match="max_window_layers=1"):
        hf_mod.config_from_hf(dict(QWEN2, use_sliding_window=True, max_window_layers=1))
    odd = dict(LLAMA, head_dim=48)  # runs on the reference backend, not on FlashInfer's kernels
    with pytest.raises(ValueError, match=r"head_dim=48.*FlashInfer"):
        hf_mod.config_from_hf(odd, backend="flashinfer")
    with pytest.warns(UserWarning, match=r"head_dim=48.*reference backend"):
        assert hf_mod.config_from_hf(odd).head_dim == 48
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_mod.config_from_hf(odd, backend="reference")
        hf_mod.config_from_hf(LLAMA, backend="flashinfer")  # head_dim 64 has kernels
    with pytest.raises(ValueError, match="dtype='int4'"):
        hf_mod.config_from_hf(LLAMA, "int4")


def test_bad_checkpoints(tmp_path):
    config = dict(LLAMA)
    tensors = hf_tensors(config)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight is missing"):
        hf_mod.load_hf_checkpoint(write_checkpoint(tmp_path / "a", config, missing))
    wrong = dict(tensors)
    wrong["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \[8, 64\], expected \[128, 64\]"):
        hf_mod.load_hf_checkpoint(write_checkpoint(tmp_path / "b", config, wrong))
    extra = dict(tensors)
    extra["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="unexpected tensors"):
        hf_mod.load_hf_checkpoint(write_checkpoint(tmp_path / "c", config, extra))
    os.makedirs(tmp_path / "e")
    with open(tmp_path / "e" / "config.json", "w") as f:
        json.dump(config, f)
    open(tmp_path / "e" / "pytorch_model.bin", "wb").close()
    with pytest.raises(FileNotFoundError, match="bin checkpoints are not supported"):
        hf_mod.load_hf_checkpoint(str(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_mod.load_hf_checkpoint(str(tmp_path / "nowhere"))


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ImportError, match=r"seqattn-jax\[hf\]"):
        hf_mod.load_tokenizer("anywhere")


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

WORDS = ["<unk>", "<s>", "</s>", "<eot>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]


def write_word_tokenizer(path) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (the optional extra 'hf') is "
                                     "not installed")
    from tokenizers import models, pre_tokenizers, processors

    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<eot>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))


def test_tokenizer_round_trip_and_eos(tmp_path):
    write_word_tokenizer(tmp_path)
    write_checkpoint(tmp_path, LLAMA, {"x": np.zeros(1, np.float32)},
                     generation_config={"eos_token_id": [3, 2]})
    tok = hf_mod.load_tokenizer(str(tmp_path))
    text = "the cat sat on the mat ."
    ids = tok.encode(text)
    assert ids == [1, 4, 5, 6, 7, 4, 8, 12]  # BOS from the post-processor
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.eos_ids == (3, 2) and tok.is_eos(2) and not tok.is_eos(4)  # generation config first
    assert tok.vocab_size == len(WORDS)
    # Streamed pieces concatenate to the full decode; special tokens are skipped.
    stream = tok.stream()
    generated = [10, 11, 7, 9, 8, 12, 2]
    pieces = [stream.push(t) for t in generated] + [stream.flush()]
    assert "".join(pieces) == tok.decode(generated) == "dog ran on a mat ."


def test_eos_fallbacks(tmp_path):
    write_word_tokenizer(tmp_path)
    write_checkpoint(tmp_path, dict(LLAMA, eos_token_id=None), {"x": np.zeros(1, np.float32)})
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": {"content": "<eot>"}}, f)
    assert hf_mod.load_tokenizer(str(tmp_path)).eos_ids == (3,)
    write_checkpoint(tmp_path, dict(LLAMA, eos_token_id=[2, 3]), {"x": np.zeros(1, np.float32)})
    assert hf_mod.load_tokenizer(str(tmp_path)).eos_ids == (2, 3)
    with pytest.raises(ValueError, match="eos_token_id"):
        hf_mod.eos_token_ids(str(write_checkpoint(tmp_path / "b", dict(LLAMA, eos_token_id="x"), {})))


def test_byte_level_stream_holds_partial_characters(tmp_path):
    """A byte-level BPE splits 'é' over two tokens: the stream emits it whole, never U+FFFD."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    from tokenizers import decoders, models, pre_tokenizers

    byte_vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = tokenizers.Tokenizer(models.BPE(byte_vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = hf_mod.load_tokenizer(str(tmp_path))
    text = "café olé"
    ids = t.encode(text)
    assert len(ids) == len(text.encode()) and t.decode(ids) == text
    stream = t.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text and not any("\ufffd" in p for p in pieces)


def test_raw_reader_equals_safetensors(tmp_path):
    """The fallback reader (for a safetensors whose numpy API lacks bfloat16) reads the same values."""
    import ml_dtypes

    rng = np.random.default_rng(8)
    tensors = {"a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
               "b": rng.standard_normal(7).astype(np.float16),
               "c": rng.standard_normal((2, 2, 2)).astype(np.float32)}
    file = str(tmp_path / "x.safetensors")
    safetensors_numpy.save_file(tensors, file)
    for name, want in tensors.items():
        got = hf_mod._read_raw(file, name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want.astype(np.float32))


def test_readme_snippet_runs(tmp_path, capsys):
    """The README's load + greedy snippet runs as written on a checkpoint from the benchmark script."""
    import importlib.util
    import pathlib
    import re

    pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    root = pathlib.Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "write_random_checkpoint.py"
    if not script.exists():
        pytest.skip("benchmarks/ is not in this tree (the sdist leaves it out)")
    spec = importlib.util.spec_from_file_location("wrc", script)
    wrc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrc)
    wrc.main(["--out", str(tmp_path), "--preset", "tiny", "--dtype", "float16", "--shard-gb", "0.004"])
    capsys.readouterr()
    section = (root / "README.md").read_text().split("## Serve a Hugging Face checkpoint", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns = {"MODEL_DIR": str(tmp_path)}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
    assert ns["cfg"].vocab_size == 2048 and len(ns["ids"]) > 6
    assert ns["ids"][:6] == [0, 2, 2, 2, 2, 2]  # BOS, then <unk> for each English word
    out = capsys.readouterr().out
    assert out.strip() == ns["tok"].decode(ns["ids"][6:]).strip() != ""
