"""Serving models: pure-JAX functional forwards that a serving engine drives.

`llama` holds the Llama-family decoder (Llama 1/2/3, Mistral, Qwen2 shapes); `hf` loads Hugging Face
checkpoints into it (safetensors/tokenizers are imported only there, lazily).
"""

from seqattn_jax.models.llama import (
    LlamaConfig,
    LlamaModel,
    attention_options,
    check_params,
    dense_logits,
    forward,
    init_params,
    param_shapes,
    rope_inv_freq,
)

__all__ = ["LlamaConfig", "LlamaModel", "attention_options", "check_params", "dense_logits", "forward",
           "init_params", "param_shapes", "rope_inv_freq"]
