"""The plan pytrees every backend returns: `AttentionPlan` (a step's plan, passed to every run)
and `HostPlan` (made on the host before the step, adopted inside it), with their static
`PlanMeta`. The backend that made a plan sits in its `PlanMeta`, so a jitted step keys on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from seqattn_jax.options import AttentionOptions

__all__ = ["AttentionPlan", "HostPlan", "PlanMeta"]


@dataclasses.dataclass(frozen=True)
class PlanMeta:
    """Everything static about one plan (hashable: the jitted step keys on it).

    kind: "decode" | "prefill" | "pod" | "batch_pod"; backend: the object that plans and runs;
    batch_size: B (the decode part of pod / batch_pod); num_rows: T query rows (prefill, the
    prefill part of batch_pod; B otherwise); batch_size_p: batch_pod's prefill requests;
    plan_id: tells apart two live plans of identical shape and options in one step; key: the
    backend's own static description (FlashInfer: its bridge PlanKey; reference: None); host: the
    plan was made on the host (`host_plan_*`) and adopted in the step; static: a host plan's
    backend data that is the same for every plan of its shape and is fixed in the step's program
    (FlashInfer's CUDA-graph-mode `plan_info`, see `FlashInferBackend(cuda_graphs=True)`; None
    otherwise)."""

    kind: str
    backend: Any
    options: AttentionOptions
    num_qo_heads: int
    q_dtype: str
    batch_size: int
    num_rows: int
    batch_size_p: int = 0
    plan_id: int = 0
    key: Any = None
    host: bool = False
    static: Any = None


@jax.tree_util.register_pytree_node_class
class AttentionPlan:
    """One step's attention plan: a token array (FlashInfer; None for the reference backend),
    static `meta` and, for a plan adopted from a `HostPlan`, `ok` (a bool scalar: the step's
    packed batch is the one planned on the host). A pytree: pass it into jitted functions, close
    over it in `lax.scan`."""

    def __init__(self, token, meta: PlanMeta, ok=None):
        self.token = token
        self.meta = meta
        self._ok = ok

    def tree_flatten(self):
        return (self.token, self._ok), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(children[0], meta, children[1])

    @property
    def ok(self) -> jax.Array:
        """bool[]: False when a host plan did not match the step's batch (then the outputs of the
        runs that used it are unspecified; the KV pool is never affected). Always True for a plan
        made from the packed batch itself."""
        return jnp.asarray(True) if self._ok is None else self._ok

    @property
    def backend(self):
        return self.meta.backend

    @property
    def options(self) -> AttentionOptions:
        return self.meta.options

    def __repr__(self):
        return f"AttentionPlan(kind={self.meta.kind!r}, backend={self.meta.backend!r})"


@jax.tree_util.register_pytree_node_class
class HostPlan:
    """A plan made on the host (`attention.host_plan_*`) that waits for the step adopting it
    (`attention.adopt_plan`). A pytree: pass it to the jitted step as an argument.

    Leaves (numpy int32 when made; None where a backend keeps nothing there):
      expected: the planned CSR arrays (see `seqattn_jax.host_layout`), which the step compares
        with its packed batch (`AttentionPlan.ok`). The reference backend and FlashInfer's static
        plans carry them; FlashInfer's queued plans keep them in the backend and reach the step
        through `adopt_plan` with no host-to-device transfer of the step's arguments.
      schedule: FlashInfer's static plans (`FlashInferBackend(cuda_graphs=True)`): the schedule
        the kernels read (int32 [S], the int workspace's bytes); its `plan_info` is static, in
        `meta.static`.
    """

    def __init__(self, expected, meta: PlanMeta, schedule=None):
        self.expected = expected
        self.meta = meta
        self.schedule = schedule

    def tree_flatten(self):
        return (self.expected, self.schedule), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(children[0], meta, children[1])

    @property
    def batch_size(self) -> int:
        return self.meta.batch_size

    def __repr__(self):
        return (f"HostPlan(kind={self.meta.kind!r}, batch_size={self.meta.batch_size}, "
                f"backend={self.meta.backend!r}{', static' if self.meta.static else ''})")
