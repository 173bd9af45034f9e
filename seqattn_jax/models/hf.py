"""Load Hugging Face Llama-family checkpoints (safetensors) and their tokenizers.

    cfg, params = load_hf_checkpoint("path/to/Llama-3.2-1B", dtype="bfloat16")
    tok = load_tokenizer("path/to/Llama-3.2-1B")

Architectures: `LlamaForCausalLM` (Llama 1, 2, 3, 3.x with rope_scaling type "llama3"),
`MistralForCausalLM` (sliding window, served through attention's `window_left`), `Qwen2ForCausalLM`
(q/k/v biases; its window only when `use_sliding_window` is set). Tied embeddings where the config
says so. A config this loader cannot serve gets a ValueError naming the field.

Weights are read with `safetensors`' numpy API (no torch), one checkpoint file or shards listed in
`model.safetensors.index.json`, and converted to the serving layout of `seqattn_jax.models.llama`
(q/k/v and gate/up fused, `[in, out]` kernels) in the compute dtype on the default device: the
fusion, transpose and cast run there as small jitted programs (one compile per distinct shape).

`safetensors` and `tokenizers` are the optional extra `seqattn-jax[hf]`; they are imported on first
use, with an error naming the extra when missing. HF Llama checkpoints already store q/k weights in
the rotate-half order, so RoPE is applied as rotate-half with no un-permute (as transformers does).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax.models.llama import MODEL_DTYPES, ROPE_TYPES, LlamaConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "HFTokenizer", "TextStream", "config_from_hf", "eos_token_ids",
           "load_hf_checkpoint", "load_tokenizer", "read_json"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Tensors some checkpoints carry that the model recomputes (old Llama conversions saved RoPE's table).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EXTRA_HINT = "pip install 'seqattn-jax[hf]'"


def _require(module: str):
    """Import an optional dependency of the `hf` extra, or raise an ImportError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"seqattn_jax.models.hf needs the {module.split('.')[0]!r} package (the "
                          f"optional extra 'hf'): {_EXTRA_HINT}") from e


def read_json(path: str, name: str, *, required: bool = True) -> dict | None:
    """`path/name` parsed, or None when absent and not required."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        if required:
            raise FileNotFoundError(f"{file} not found: a Hugging Face checkpoint directory has a {name}")
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# config.json -> LlamaConfig
# ----------------------------------------------------------------------------------------------

def _architecture(hf: dict) -> str:
    archs = hf.get("architectures")
    if archs is None and hf.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf["model_type"]]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"config.json: architectures={archs!r} is not supported (supported: one of "
                         f"{SUPPORTED_ARCHITECTURES})")
    return archs[0]


def _int_field(hf: dict, name: str, default=None) -> int:
    value = hf.get(name, default)
    if value is None:
        raise ValueError(f"config.json: {name} is required")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json: {name} must be a positive int, got {value!r}")
    return value


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling dict or None) from either spelling: `rope_theta` + `rope_scaling`
    (transformers 4.x) or `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], dict(params)
        field = "rope_parameters"
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
        field = "rope_scaling"
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise ValueError(f"config.json: {field} must be null or an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: {field}.rope_type={rope_type!r} is not implemented "
                         f"(implemented: {ROPE_TYPES})")
    if rope_type == "default":
        return theta, None
    return theta, {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")} | \
        {"rope_type": rope_type}


def _sliding_window(hf: dict, arch: str, num_layers: int) -> int | None:
    """The one window every layer uses, or None. Per-layer mixes are refused (one attention plan)."""
    window = hf.get("sliding_window")
    if arch == "Qwen2ForCausalLM":
        # transformers' Qwen2Config: the window applies only with use_sliding_window, and only in
        # layers >= max_window_layers (default 28).
        if not hf.get("use_sliding_window", False):
            window = None
        elif window is not None:
            first = hf.get("max_window_layers", 28)
            if first >= num_layers:
                window = None
            elif first > 0:
                raise ValueError(f"config.json: use_sliding_window=true with max_window_layers={first} "
                                 f"< num_hidden_layers={num_layers} windows only some layers; one "
                                 f"window for every layer is supported")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        kinds = set(layer_types)
        if kinds - {"full_attention", "sliding_attention"} or len(kinds) > 1:
            raise ValueError(f"config.json: layer_types={sorted(kinds)} mixes attention kinds; one kind "
                             f"for every layer is supported")
        if kinds == {"full_attention"}:
            window = None
        elif window is None:
            raise ValueError("config.json: layer_types says sliding_attention but sliding_window is null")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"config.json: sliding_window must be null or a positive int, got {window!r}")
    return window


def _dtype_name(value, field: str) -> str:
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = None
    if name not in MODEL_DTYPES:
        raise ValueError(f"{field}={value!r} is not supported (one of {MODEL_DTYPES})")
    return name


def config_from_hf(hf: dict, dtype=None, *, backend: str = "auto") -> LlamaConfig:
    """A `LlamaConfig` from a Hugging Face `config.json` dict.

    Args:
      hf: the parsed config.json.
      dtype: compute dtype; None takes config.json's `torch_dtype` (or `dtype`), float32 if absent.
      backend: "flashinfer" raises when FlashInfer cannot run the head_dim; "auto" warns (the
        reference backend still runs it); "reference" accepts any even head_dim.
    Raises:
      ValueError naming the config.json field this loader cannot serve.
    """
    if backend not in ("auto", "flashinfer", "reference"):
        raise ValueError(f"backend must be 'auto', 'flashinfer' or 'reference', got {backend!r}")
    arch = _architecture(hf)
    if hf.get("quantization_config") is not None:
        raise ValueError("config.json: quantization_config is set; quantized checkpoints are not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not supported (only 'silu': SwiGLU)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            raise ValueError(f"config.json: {field}=true is not supported (only q/k/v biases, as Qwen2)")
    d = _int_field(hf, "hidden_size")
    heads = _int_field(hf, "num_attention_heads")
    layers = _int_field(hf, "num_hidden_layers")
    # Absent or null means multi-head attention (transformers' default).
    kv_heads = _int_field({"num_key_value_heads": hf.get("num_key_value_heads") or heads},
                          "num_key_value_heads")
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if d % heads:
            raise ValueError(f"config.json: hidden_size={d} is not a multiple of num_attention_heads="
                             f"{heads} and head_dim is not given")
        head_dim = d // heads
    head_dim = _int_field({"head_dim": head_dim}, "head_dim")
    if head_dim % 2:
        raise ValueError(f"config.json: head_dim={head_dim} must be even (rotate-half RoPE)")
    if heads % kv_heads:
        raise ValueError(f"config.json: num_attention_heads={heads} must be a multiple of "
                         f"num_key_value_heads={kv_heads}")
    from seqattn_jax.config import FLASHINFER_HEAD_DIMS  # noqa: PLC0415

    if head_dim not in FLASHINFER_HEAD_DIMS and backend != "reference":
        msg = (f"config.json: head_dim={head_dim}: FlashInfer's kernels are compiled for head_dim in "
               f"{FLASHINFER_HEAD_DIMS}")
        if backend == "flashinfer":
            raise ValueError(msg)
        warnings.warn(msg + "; attention will run on the reference backend", stacklevel=3)
    theta, scaling = _rope(hf)
    if dtype is None:
        dtype = hf.get("torch_dtype", hf.get("dtype")) or "float32"
        dtype = _dtype_name(dtype, "config.json: torch_dtype")
    else:
        dtype = _dtype_name(dtype, "dtype")
    try:
        return LlamaConfig(
            vocab_size=_int_field(hf, "vocab_size"), d_model=d, num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, ffn_dim=_int_field(hf, "intermediate_size"),
            rope_theta=theta, norm_eps=hf.get("rms_norm_eps", 1e-6),  # transformers' default
            rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM", sliding_window=_sliding_window(hf, arch, layers),
            dtype=dtype)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from e


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------

def _tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the shard index or from every *.safetensors file."""
    index = read_json(path, "model.safetensors.index.json", required=False)
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError("model.safetensors.index.json: weight_map is missing")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith(".bin")]
        hint = " (pytorch .bin checkpoints are not supported: convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"{path}: no *.safetensors files{hint}")
    safetensors = _require("safetensors")
    out = {}
    for f in files:
        with safetensors.safe_open(os.path.join(path, f), framework="numpy") as h:
            for name in h.keys():
                out[name] = os.path.join(path, f)
    return out


def _read_raw(file: str, name: str) -> np.ndarray:
    """One tensor straight from the safetensors layout (8-byte little-endian header size, JSON
    header, raw little-endian data): the fallback for dtypes an old safetensors' numpy API lacks
    (bfloat16, fp8 need ml_dtypes, which jax depends on)."""
    import ml_dtypes  # noqa: PLC0415

    kinds = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "F8_E5M2": ml_dtypes.float8_e5m2, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[name]
    begin, end = info["data_offsets"]
    if info["dtype"] not in kinds:
        raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, not a float dtype")
    return np.memmap(file, dtype=kinds[info["dtype"]], mode="r", offset=8 + n + begin,
                     shape=tuple(info["shape"]) if info["shape"] else ())


class _Reader:
    """Opens each file once and reads tensors by name (numpy), checking each one's shape."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.handles: dict[str, Any] = {}
        self.safetensors = _require("safetensors")

    def __call__(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.files:
            raise ValueError(f"checkpoint: tensor {name} is missing")
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = self.safetensors.safe_open(file, framework="numpy")
        try:
            x = self.handles[file].get_tensor(name)
        except (TypeError, KeyError, ValueError, RuntimeError):  # e.g. bfloat16 in old safetensors
            x = _read_raw(file, name)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"checkpoint: tensor {name} has shape {list(x.shape)}, expected {list(shape)} "
                             f"from config.json")
        return x

    def close(self):
        for h in self.handles.values():
            if hasattr(h, "__exit__"):
                h.__exit__(None, None, None)
        self.handles.clear()


@functools.partial(jax.jit, static_argnames=("dtype", "transpose"))
def _fuse(parts, *, dtype, transpose):
    """Concatenate HF `[out, in]` parts along out, transpose to `[in, out]`, cast; on the device."""
    x = jnp.concatenate([jnp.asarray(p) for p in parts], axis=0) if len(parts) > 1 else parts[0]
    return (x.T if transpose else x).astype(dtype)


def _expected_names(cfg: LlamaConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names |= {p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
        if cfg.qkv_bias:
            names |= {p + f"self_attn.{n}_proj.bias" for n in "qkv"}
    return names


def load_hf_checkpoint(path: str, dtype=None, *, backend: str = "auto") -> tuple[LlamaConfig, dict]:
    """Read a Hugging Face checkpoint directory into the serving model's config and parameters.

    Args:
      path: a directory with config.json and model.safetensors, or shards listed in
        model.safetensors.index.json.
      dtype: compute dtype ("float16", "bfloat16", "float32"); None takes config.json's torch_dtype.
      backend: see `config_from_hf` (which head_dims raise or warn).
    Returns:
      (cfg, params): a `LlamaConfig` and the parameter pytree of `seqattn_jax.models.llama` in
      `cfg.dtype` on JAX's default device.
    Raises:
      ValueError naming the config.json field or tensor this loader cannot serve.
    """
    cfg = config_from_hf(read_json(path, "config.json"), dtype, backend=backend)
    files = _tensor_files(path)
    expected = _expected_names(cfg)
    extra = sorted(n for n in files if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                   and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if extra:
        raise ValueError(f"checkpoint: unexpected tensors {extra[:4]}{' ...' if len(extra) > 4 else ''} "
                         f"for {cfg.num_layers} layers, qkv_bias={cfg.qkv_bias}, "
                         f"tie_embeddings={cfg.tie_embeddings}")
    d, hd, hq, hkv, f = cfg.d_model, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim
    dt = cfg.dtype
    read = _Reader(files)
    try:
        def vec(name):
            return _fuse((read(name, (d,)),), dtype=dt, transpose=False)

        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = [read(p + "self_attn.q_proj.weight", (hq * hd, d)),
                   read(p + "self_attn.k_proj.weight", (hkv * hd, d)),
                   read(p + "self_attn.v_proj.weight", (hkv * hd, d))]
            layer = {"attn_norm": vec(p + "input_layernorm.weight"),
                     "wqkv": _fuse(tuple(qkv), dtype=dt, transpose=True)}
            if cfg.qkv_bias:
                bias = (read(p + "self_attn.q_proj.bias", (hq * hd,)),
                        read(p + "self_attn.k_proj.bias", (hkv * hd,)),
                        read(p + "self_attn.v_proj.bias", (hkv * hd,)))
                layer["bqkv"] = _fuse(bias, dtype=dt, transpose=False)
            layer["wo"] = _fuse((read(p + "self_attn.o_proj.weight", (d, hq * hd)),), dtype=dt,
                                transpose=True)
            layer["mlp_norm"] = vec(p + "post_attention_layernorm.weight")
            layer["w_gate_up"] = _fuse((read(p + "mlp.gate_proj.weight", (f, d)),
                                        read(p + "mlp.up_proj.weight", (f, d))), dtype=dt, transpose=True)
            layer["w_down"] = _fuse((read(p + "mlp.down_proj.weight", (d, f)),), dtype=dt, transpose=True)
            layers.append(layer)
        params = {"embed": _fuse((read("model.embed_tokens.weight", (cfg.vocab_size, d)),), dtype=dt,
                                 transpose=False),
                  "layers": layers, "final_norm": vec("model.norm.weight")}
        if not cfg.tie_embeddings:
            params["lm_head"] = _fuse((read("lm_head.weight", (cfg.vocab_size, d)),), dtype=dt,
                                      transpose=True)
    finally:
        read.close()
    return cfg, params


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

def _ids(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {value!r}")
    return list(values)


def eos_token_ids(path: str, tokenizer=None) -> tuple[int, ...]:
    """Stop tokens: generation_config.json's `eos_token_id`, then config.json's (each an int or a
    list), deduplicated in that order; if neither has one, tokenizer_config.json's `eos_token`
    looked up in `tokenizer` (a `tokenizers.Tokenizer`)."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        cfg = read_json(path, name, required=False) or {}
        ids += _ids(cfg.get("eos_token_id"))
    if not ids and tokenizer is not None:
        tc = read_json(path, "tokenizer_config.json", required=False) or {}
        tok = tc.get("eos_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and tokenizer.token_to_id(tok) is not None:
            ids.append(tokenizer.token_to_id(tok))
    return tuple(dict.fromkeys(ids))


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """A `tokenizers.Tokenizer` (from tokenizer.json) with the checkpoint's stop tokens.

    Attributes:
      tokenizer: the `tokenizers.Tokenizer`.
      eos_ids: token ids that end a generation (see `eos_token_ids`); may be empty.
    """

    tokenizer: Any
    eos_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g.
        Llama's BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def is_eos(self, token_id: int) -> bool:
        return int(token_id) in self.eos_ids

    def stream(self, *, skip_special_tokens: bool = True) -> "TextStream":
        """A `TextStream` that turns generated ids into text pieces as they arrive."""
        return TextStream(self, skip_special_tokens=skip_special_tokens)


class TextStream:
    """Incremental detokenisation: `push(id)` returns the text the new token completes.

    Decodes a short window of recent ids and emits the difference, holding text back while it ends
    in an incomplete UTF-8 sequence (U+FFFD) - byte-level BPE splits characters across tokens, and
    SentencePiece-style decoders change a token's leading space by context. The concatenation of
    every piece equals `decode(all ids)` for these tokenizers.
    """

    def __init__(self, tokenizer: HFTokenizer, *, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids before this are not decoded again
        self._read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        dec = functools.partial(self._tok.decode, skip_special_tokens=self._skip)
        before = dec(self._ids[self._prefix:self._read])
        now = dec(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a trailing incomplete character)."""
        dec = functools.partial(self._tok.decode, skip_special_tokens=self._skip)
        rest = dec(self._ids[self._prefix:])[len(dec(self._ids[self._prefix:self._read])):]
        self._prefix = self._read = len(self._ids)
        return rest


def load_tokenizer(path: str) -> HFTokenizer:
    """The checkpoint's tokenizer.json (through the `tokenizers` package) and its stop tokens."""
    tokenizers = _require("tokenizers")
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: load_tokenizer needs a tokenizer.json (the "
                                f"'fast' tokenizer format)")
    tok = tokenizers.Tokenizer.from_file(file)
    return HFTokenizer(tok, eos_token_ids(path, tok))
