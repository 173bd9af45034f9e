"""Tensor parallelism with JAX's own sharding: a 1-D device mesh over attention heads.

    mesh = tp_mesh(2)                                   # Mesh over 2 devices, axis "tp"
    tp = TensorParallel(mesh)                           # hashable: a jitted step keys on it
    kv = tp.init_kv(cache)                              # the pool, sharded over its KV-head axis
    model, params = shard_llama(LlamaModel(cfg), params, mesh)   # Megatron layout, sharded

What lives where (N = the mesh axis size):

    KV pool         kv[L * P, 2, page, Hkv, D] (NHD) sharded on Hkv: device i holds KV heads
                    [i * Hkv/N, (i+1) * Hkv/N) of every page; page ids mean the same everywhere.
    allocator state, packed batches, plans of the reference backend, step inputs, sampled tokens:
                    replicated (small int arrays; every device computes the same page tables).
    attention       `TensorParallel.attend` runs the attention ops under `jax.shard_map`: device i
                    gets q heads [i * Hq/N, ...) (whole GQA groups: query head h reads KV head
                    h // (Hq/Hkv), so a contiguous split of q by N matches the split of KV by N),
                    its own K/V rows and its pool shard, and runs the ops with the LOCAL cache
                    config (`num_kv_heads = Hkv/N`) and the local query heads Hq/N.
    Llama weights   Megatron: wqkv and w_gate_up split by output columns, wo and w_down by input
                    rows; embed and norms replicated. XLA inserts the all-reduce after wo and
                    after w_down (the only collectives of a layer) from these shardings.
    lm_head         split by vocabulary (columns) when N divides the vocabulary, else replicated:
                    each device reads 1/N of it (at the 8B shape it is 1 GB, ~0.25 ms of an
                    H200's HBM time a step when every device reads all of it). The logits come out vocabulary-sharded; XLA
                    partitions the greedy argmax into a per-device argmax and an all-gather of one
                    (max, index) pair per row and device, and gathers the logits only where a
                    step samples (sort / top-k / top-p over the whole vocabulary). Tied
                    embeddings (no lm_head) stay replicated: the embedding gather reads them.

The fused projections need their columns reordered before a column split: wqkv's columns are
[all q heads | all k heads | all v heads], so a plain split would give device 0 only q heads.
`shard_llama` permutes them to N groups of [q_i | k_i | v_i] (and w_gate_up to N groups of
[gate_i | up_i]) and returns the model with `tp = N`, whose forward reads that grouped layout.
With N = 1 the layout is the original one.

Plans per device. A plan's static metadata (`PlanMeta`) is made for the local shapes (local
config, Hq/N heads), and the plan is made (or a host plan adopted) inside `shard_map`, by every
device for itself (`TensorParallel.plan`): its token is one int32[1] per device (sharded on the
axis), its `ok` the AND over devices. The reference backend's plans hold no device data, so this
costs nothing there. FlashInfer's plans are device state (plan_info on the host, a schedule in an
int workspace on the GPU); under `shard_map` each device runs the plan / adopt / run callbacks
itself, with its local buffers, on its own thread (checked on CPU: `buffer_callback` inside
`shard_map` runs once per device with local shapes). So the backend must be made for the mesh's
devices, `FlashInferBackend(devices=mesh.devices.flat)`: it keeps a plan slot (modules,
workspaces, host-plan queue) per (PlanKey, device), each callback picks its device's slot from
its buffers' device, and `host_plan_*` plans once per device (each device adopts its own copy).
Static host plans (`FlashInferBackend(cuda_graphs=True)`, the default) are the exception and the
fast path: their plan_info and schedule depend only on the shard's shapes, which every device
shares, so one plan is made on the host, its schedule enters the step replicated, and every
device runs the same capturable FFI calls (no Python in the step), the shim substituting each
device's own workspaces (bridge/ffi.py, `alias_peers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqattn_jax.config import CacheConfig

__all__ = ["AXIS", "TensorParallel", "check_pool_sharding", "device_ordinal", "gate_up_permutation",
           "llama_param_shardings", "pool_spec", "qkv_permutation", "shard_llama",
           "shard_params", "shard_pool", "tp_mesh"]

AXIS = "tp"


def tp_mesh(n: int | None = None, *, devices=None, axis: str = AXIS) -> Mesh:
    """A 1-D `Mesh` over the first `n` devices (all of `devices`, default `jax.devices()`) with
    axis name `axis`."""
    devs = list(jax.devices() if devices is None else devices)
    if n is None:
        n = len(devs)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(devs):
        raise ValueError(f"tp_mesh: n must be an int in [1, {len(devs)}] (the devices there are), "
                         f"got {n!r}")
    return Mesh(np.asarray(devs[:int(n)]), (axis,))


def _axis_size(mesh: Mesh, axis: str, where: str) -> int:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"{where}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"{where}: the mesh has axes {mesh.axis_names}, not {axis!r}")
    return int(mesh.shape[axis])


def _divides(where: str, name: str, value: int, n: int, axis: str):
    if value % n:
        raise ValueError(f"{where}: {name} = {value} does not divide by the mesh axis {axis!r} of "
                         f"size {n}")


def pool_spec(cache: CacheConfig, axis: str = AXIS) -> P:
    """The PartitionSpec of the pool: its KV-head axis (3 in NHD, 2 in HND) on `axis`."""
    if cache.kv_layout == "NHD":
        return P(None, None, None, axis, None)
    return P(None, None, axis, None, None)


def shard_pool(kv: jax.Array, cache: CacheConfig, mesh: Mesh, axis: str = AXIS) -> jax.Array:
    """`kv` (the pool of `cache`) laid out over `mesh`, sharded on its KV-head axis (a copy
    unless it is already laid out so)."""
    n = _axis_size(mesh, axis, "shard_pool")
    _divides("shard_pool", "cache.num_kv_heads", cache.num_kv_heads, n, axis)
    if tuple(kv.shape) != cache.kv_shape:
        raise ValueError(f"shard_pool: kv must have shape {cache.kv_shape}, got {tuple(kv.shape)}")
    return jax.device_put(kv, NamedSharding(mesh, pool_spec(cache, axis)))


def check_pool_sharding(kv, cache: CacheConfig, mesh: Mesh, axis: str = AXIS,
                        where: str = "kv") -> None:
    """Raise a ValueError naming `where` unless `kv` is `cache`'s pool on exactly the mesh's
    devices, sharded on its KV-head axis over `axis`."""
    if not isinstance(kv, jax.Array):
        raise ValueError(f"{where} must be a jax.Array (the KV pool), got {type(kv).__name__}")
    if tuple(kv.shape) != cache.kv_shape or kv.dtype != cache.jnp_dtype:
        raise ValueError(f"{where} must be {cache.dtype}{list(cache.kv_shape)}, got "
                         f"{kv.dtype}{list(kv.shape)}")
    want_devs = set(mesh.devices.flat)
    if set(kv.sharding.device_set) != want_devs:
        raise ValueError(f"{where} lives on devices {sorted(d.id for d in kv.sharding.device_set)}"
                         f"; the mesh has {sorted(d.id for d in want_devs)} (use "
                         f"sharding.shard_pool)")
    want = NamedSharding(mesh, pool_spec(cache, axis))
    if not kv.sharding.is_equivalent_to(want, kv.ndim):
        raise ValueError(f"{where} has sharding {kv.sharding}; tensor parallel needs it sharded on "
                         f"its KV-head axis: {want.spec} (use sharding.shard_pool)")


# ----------------------------------------------------------------------------------------------
# the step's view: local shapes and attention under shard_map
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """A mesh axis over attention heads, as a jitted step sees it (hashable: steps key on it).

    Attributes:
      mesh: the `Mesh`; axis: the name of the axis the heads are split over (default "tp").
    """

    mesh: Mesh
    axis: str = AXIS

    def __post_init__(self):
        _axis_size(self.mesh, self.axis, "TensorParallel")

    @property
    def size(self) -> int:
        """N, the number of head shards."""
        return int(self.mesh.shape[self.axis])

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def check(self, cache: CacheConfig, num_heads: int, backend=None, where: str = "mesh"):
        """ValueError unless the heads split evenly over the axis (and `backend` runs there)."""
        n = self.size
        _divides(where, "num_kv_heads", cache.num_kv_heads, n, self.axis)
        _divides(where, "num_heads (query heads)", num_heads, n, self.axis)
        name = backend if isinstance(backend, str) else getattr(backend, "name", None)
        if n > 1 and name == "flashinfer":
            want = tuple(device_ordinal(d) for d in self.mesh.devices.flat)
            have = getattr(backend, "devices", None) if not isinstance(backend, str) else None
            if have is None or set(have) != set(want):
                raise ValueError(
                    f"{where}: backend: FlashInfer over {n} devices needs a plan slot per device: "
                    f"pass FlashInferBackend(devices=mesh.devices.flat) (devices {want}), got "
                    f"{backend!r}")

    def local_cache(self, cache: CacheConfig) -> CacheConfig:
        """The cache config one device sees: `num_kv_heads / N` heads, the rest unchanged."""
        _divides("local_cache", "cache.num_kv_heads", cache.num_kv_heads, self.size, self.axis)
        return dataclasses.replace(cache, num_kv_heads=cache.num_kv_heads // self.size)

    def local_heads(self, num_heads: int) -> int:
        _divides("local_heads", "num_heads", num_heads, self.size, self.axis)
        return num_heads // self.size

    def pool_sharding(self, cache: CacheConfig) -> NamedSharding:
        return NamedSharding(self.mesh, pool_spec(cache, self.axis))

    def init_kv(self, cache: CacheConfig) -> jax.Array:
        """A zero pool created directly in its shards (no full copy on one device first)."""
        self.local_cache(cache)
        make = jax.jit(lambda: jnp.zeros(cache.kv_shape, cache.jnp_dtype),
                       out_shardings=self.pool_sharding(cache))
        return make()

    def replicate(self, tree):
        """`tree`'s arrays replicated over the mesh."""
        return jax.device_put(tree, self.replicated)

    def plan(self, make, *args):
        """`make(*args) -> AttentionPlan` (made for one device's heads: `local_cache`,
        `local_heads`) run by every device under `shard_map`, `args` replicated. Returns the
        plan with one token per device (int32[N], sharded on the axis; None stays None) and `ok`
        the AND of every device's. Pass it to `attend`, which hands each device its own token.
        """
        from seqattn_jax.plans import AttentionPlan  # noqa: PLC0415

        box = {}

        def body(args):
            p = make(*args)
            box["meta"], box["none"] = p.meta, p.token is None
            tok = jnp.zeros((1,), jnp.int32) if p.token is None else p.token
            return tok, jnp.reshape(p.ok, (1,))

        ax = P(self.axis)
        tok, ok = jax.shard_map(body, mesh=self.mesh, in_specs=(P(),), out_specs=(ax, ax),
                                check_vma=False)(args)
        return AttentionPlan(None if box["none"] else tok, box["meta"], jnp.all(ok))

    def attend(self, cache: CacheConfig, fn):
        """`fn(q, k, v, kv, extras, plan) -> (out, kv)` written for ONE device's shard (the local
        cache config, Hq/N query heads), as a function of the global arrays, run under
        `shard_map`.

        Args of the returned function: q [T, Hq, D], k / v [T, Hkv, D] (sharded or not: they are
        split on the head axis), kv the pool (sharded by `pool_spec`), extras a pytree of
        replicated values (packed batches, ...), plan the step's plan from `TensorParallel.plan`
        (each device gets its own token; `ok` is not passed in). Returns (out [T, Hq, D] sharded
        on heads, the pool). Inside, q / k / v hold heads [i * H/N, (i+1) * H/N) of device i.
        """
        from seqattn_jax.plans import AttentionPlan  # noqa: PLC0415

        heads = P(None, self.axis, None)
        kv_spec = pool_spec(cache, self.axis)

        def run(q, k, v, kv, extras, plan):
            def body(q, k, v, kv, extras, token):
                return fn(q, k, v, kv, extras, AttentionPlan(token, plan.meta))

            tok_spec = None if plan.token is None else P(self.axis)
            return jax.shard_map(body, mesh=self.mesh,
                                 in_specs=(heads, heads, heads, kv_spec, P(), tok_spec),
                                 out_specs=(heads, kv_spec), check_vma=False)(
                q, k, v, kv, extras, plan.token)

        return run


def device_ordinal(device) -> int:
    """A device's local ordinal (what a buffer's DLPack device id says inside a callback)."""
    hw = getattr(device, "local_hardware_id", None)
    return int(device.id if hw is None else hw)


# ----------------------------------------------------------------------------------------------
# Llama weights, Megatron style
# ----------------------------------------------------------------------------------------------

def qkv_permutation(num_heads: int, num_kv_heads: int, head_dim: int, n: int) -> np.ndarray:
    """int64 [(Hq + 2 Hkv) * hd]: fused q/k/v column j of the grouped layout is column `perm[j]`
    of the model's [q | k | v] layout. Group i (a contiguous 1/N of the columns) holds q heads
    [i * Hq/N, ...), then k heads [i * Hkv/N, ...), then v heads likewise."""
    gq, gk = num_heads // n, num_kv_heads // n
    cols = np.arange((num_heads + 2 * num_kv_heads) * head_dim).reshape(-1, head_dim)
    q, k, v = cols[:num_heads], cols[num_heads:num_heads + num_kv_heads], \
        cols[num_heads + num_kv_heads:]
    groups = [np.concatenate([q[i * gq:(i + 1) * gq], k[i * gk:(i + 1) * gk],
                              v[i * gk:(i + 1) * gk]]) for i in range(n)]
    return np.concatenate(groups).reshape(-1)


def gate_up_permutation(ffn_dim: int, n: int) -> np.ndarray:
    """int64 [2 * ffn]: group i holds gate columns [i * ffn/N, ...) then the same up columns."""
    f = ffn_dim // n
    return np.concatenate([np.r_[i * f:(i + 1) * f, ffn_dim + i * f:ffn_dim + (i + 1) * f]
                           for i in range(n)])


def _check_llama(where, cfg, n, axis):
    from seqattn_jax.models.llama import LlamaConfig  # noqa: PLC0415 - models import sharding

    if not isinstance(cfg, LlamaConfig):
        raise ValueError(f"{where}: cfg must be a LlamaConfig, got {type(cfg).__name__}")
    _divides(where, "cfg.num_kv_heads", cfg.num_kv_heads, n, axis)
    _divides(where, "cfg.num_heads", cfg.num_heads, n, axis)
    _divides(where, "cfg.ffn_dim", cfg.ffn_dim, n, axis)


def llama_param_shardings(cfg, mesh: Mesh, axis: str = AXIS) -> dict:
    """The `NamedSharding` of every Llama parameter (same pytree structure as the params):
    wqkv / bqkv / w_gate_up split by output columns, wo / w_down by input rows, lm_head by
    vocabulary when the mesh axis divides it, the rest replicated. For the grouped column layout
    that `shard_params` writes."""
    n = _axis_size(mesh, axis, "llama_param_shardings")
    _check_llama("llama_param_shardings", cfg, n, axis)
    from seqattn_jax.models.llama import param_shapes  # noqa: PLC0415

    col, row, rep = (NamedSharding(mesh, s) for s in (P(None, axis), P(axis, None), P()))
    specs = {"wqkv": col, "bqkv": NamedSharding(mesh, P(axis)), "w_gate_up": col, "wo": row,
             "w_down": row}
    shapes = param_shapes(cfg)
    out: dict[str, Any] = {k: rep for k in shapes if k != "layers"}
    if "lm_head" in shapes and cfg.vocab_size % n == 0:   # [d, V] by vocabulary (module docstring)
        out["lm_head"] = col
    out["layers"] = [{k: specs.get(k, rep) for k in layer} for layer in shapes["layers"]]
    return out


def shard_params(params: dict, cfg, mesh: Mesh, axis: str = AXIS) -> dict:
    """Llama params (the model's [q | k | v], [gate | up] layout) -> the grouped layout of
    `qkv_permutation` / `gate_up_permutation`, placed by `llama_param_shardings`. Serve them with
    `LlamaModel(cfg, tp=N)` (`shard_llama` does both)."""
    n = _axis_size(mesh, axis, "shard_params")
    shardings = llama_param_shardings(cfg, mesh, axis)
    qkv = qkv_permutation(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, n)
    gu = gate_up_permutation(cfg.ffn_dim, n)
    layers = []
    for layer in params["layers"]:
        layer = dict(layer)
        layer["wqkv"] = jnp.take(layer["wqkv"], qkv, axis=1)
        if "bqkv" in layer:
            layer["bqkv"] = jnp.take(layer["bqkv"], qkv, axis=0)
        layer["w_gate_up"] = jnp.take(layer["w_gate_up"], gu, axis=1)
        layers.append(layer)
    return jax.device_put({**params, "layers": layers}, shardings)


def shard_llama(model, params: dict, mesh: Mesh, axis: str = AXIS):
    """(`LlamaModel(model.cfg, tp=N)`, params in its grouped layout, sharded over `mesh`)."""
    from seqattn_jax.models.llama import LlamaModel  # noqa: PLC0415

    if not isinstance(model, LlamaModel) or model.tp != 1:
        raise ValueError(f"shard_llama: model must be an unsharded LlamaModel (tp=1), got "
                         f"{model!r}")
    n = _axis_size(mesh, axis, "shard_llama")
    return LlamaModel(model.cfg, tp=n), shard_params(params, model.cfg, mesh, axis)
