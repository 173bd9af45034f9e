"""Serving: continuous batching over a paged KV cache for any JAX model (`Engine`).

  engine      `Engine`, `EngineConfig`, `RequestHandle`: admission, chunked prefill, decode,
              mixed steps, stop conditions, cancellation, streaming; host-side page mirrors
  step        the jitted step (prefill / decode / mixed) and its row layout
  sampling    `SamplingParams` and on-device sampling (greedy, temperature, top-k, top-p, seeded)
  model       `ServingModel`: the protocol a model implements (a forward with injected attention)
"""

from seqattn_jax.serving.engine import Engine, EngineConfig, EngineStats, RequestHandle
from seqattn_jax.serving.model import Attend, ServingModel
from seqattn_jax.serving.sampling import SamplingParams, sample_tokens

__all__ = ["Attend", "Engine", "EngineConfig", "EngineStats", "RequestHandle", "SamplingParams",
           "ServingModel", "sample_tokens"]
