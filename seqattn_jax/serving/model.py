"""What the serving engine needs from a model: a small protocol.

A model is a pure forward over one step's token rows. The engine owns everything paged: it lays
out the step's rows, writes their K/V into the pool and runs attention through an `attend`
function it hands to the forward, so the model never sees page tables, plans or backends:

    def attend(q, k, v, kv, layer):         # supplied by the engine, one call per layer
        q: [T, Hq, D], k / v: [T, Hkv, D]    (RoPE already applied by the model)
        kv: the all-layer pool;  layer: a Python int in [0, num_layers)
        -> (out [T, Hq, D] in q.dtype, the pool with this step's K/V written)

    logits, kv = model.forward(params, tokens, positions, kv, attend, logits_rows)
        tokens: int32 [T]    the step's token ids (padding rows: any id >= 0)
        positions: int32 [T] each row's position in its sequence (padding rows: -1)
        logits_rows: int32 [R] rows whose next-token logits are wanted
        -> logits float32 [R, vocab_size], the pool

`seqattn_jax.models.llama.LlamaModel` implements it; any JAX model (Flax NNX included: split the
module into graphdef and state and merge inside `forward`) does so with a few lines. The params
pytree is passed to the engine separately so that the jitted step takes it as an argument (weights
in the compute dtype: the engine never casts them).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

__all__ = ["Attend", "ServingModel"]

Attend = Callable[[Any, Any, Any, Any, int], tuple[Any, Any]]


@runtime_checkable
class ServingModel(Protocol):
    """The model side of `seqattn_jax.serving.Engine` (see the module docstring).

    Attributes:
      num_layers, num_heads (query heads), num_kv_heads, head_dim, vocab_size: the shapes the
        engine's KV pool and attention plans are built for.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def forward(self, params, tokens, positions, kv, attend: Attend, logits_rows):
        """-> (logits float32 [R, vocab_size], kv); see the module docstring."""
        ...

    def attention_options(self) -> dict:
        """Keyword options every attention call of this model takes (e.g. `window_left` for a
        sliding window, `sm_scale`, `logits_soft_cap`); {} for the defaults."""
        ...
