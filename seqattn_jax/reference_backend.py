"""`ReferenceBackend`: the `seqattn_jax.backend.Backend` contract over the pure-JAX reference.

It runs anywhere (CPU, GPU, TPU) and every configuration the reference takes. Plans hold no
device state (a `None` token); host plans carry only the lengths they were made for, so a step
adopting one checks its batch exactly as with FlashInfer. Appends are the JAX scatter.
"""

from __future__ import annotations

import jax.numpy as jnp

from seqattn_jax import host_layout, kv as kv_mod, reference
from seqattn_jax.plans import AttentionPlan, HostPlan

__all__ = ["ReferenceBackend"]


def _kwargs(options):
    return dict(sm_scale=options.sm_scale, logits_soft_cap=options.logits_soft_cap,
                window_left=options.window_left, pos_encoding_mode=options.pos_encoding_mode,
                rope_scale=options.rope_scale, rope_theta=options.rope_theta,
                return_lse=options.return_lse)


class ReferenceBackend:
    """Stateless; all instances are equal (so a step traced with one serves them all)."""

    name = "reference"

    def __eq__(self, other):
        return type(other) is ReferenceBackend

    def __hash__(self):
        return hash(ReferenceBackend)

    def __repr__(self):
        return "ReferenceBackend()"

    def unsupported(self, config, q_dtype, num_qo_heads, kind, options):
        if jnp.dtype(q_dtype).name not in reference.Q_DTYPES:
            return f"q.dtype={jnp.dtype(q_dtype).name}: the reference takes {reference.Q_DTYPES}"
        return None

    def plan(self, config, meta, packed, packed_d=None):
        return AttentionPlan(None, meta)

    def host_plan(self, config, meta, layout):
        return HostPlan(host_layout.expected(meta.kind, layout), meta)

    def adopt(self, host_plan, n_expected):
        return None, jnp.asarray(host_plan.expected)

    def discard_host_plans(self) -> int:
        return 0

    def decode(self, config, plan, q, kv, packed, layer):
        return reference.batch_decode(config, q, kv, packed, layer=layer, **_kwargs(plan.options))

    def prefill(self, config, plan, q, kv, packed, layer):
        return reference.batch_prefill(config, q, kv, packed, layer=layer,
                                       causal=plan.options.causal, **_kwargs(plan.options))

    def pod(self, config, plan, q_p, k_p, v_p, q_d, kv, packed_d, layer):
        return reference.pod(config, q_p, k_p, v_p, q_d, kv, packed_d, layer=layer,
                             causal_p=plan.options.causal, **_kwargs(plan.options))

    def batch_pod(self, config, plan, q_p, packed_p, q_d, packed_d, kv, layer):
        return reference.batch_pod(config, q_p, packed_p, q_d, packed_d, kv, layer=layer,
                                   causal_p=plan.options.causal, **_kwargs(plan.options))

    def append(self, config, plan, kv, keys, values, packed, layer):
        return kv_mod.scatter_kv(config, kv, keys, values, packed, layer=layer)
