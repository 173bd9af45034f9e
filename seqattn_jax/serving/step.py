"""The engine's jitted step: one forward over a prefill chunk, a decode batch, or both at once.

Row layout of a step (static shapes, so each kind compiles once):

    rows [0, C)        prefill chunk: up to `Bp` requests' next prompt tokens, back to back
    rows [C, C + B)    decode batch: row C + b is slot `d_ids[b]`'s next token (-1: padding)

kind "prefill" has only the first block, "decode" only the second, "mixed" both, run through one
batch-POD attention call per layer (FlashInfer's fused prefill + decode kernel) instead of a prefill
forward and then a decode forward.

The decode rows' input tokens are never sent from the host: `last_tok` (int32 [max_seqs], one
entry per slot, on the device) holds each slot's latest sampled token and the step reads it there,
so the host can dispatch step t+1 before it has read step t's tokens. The step writes its sampled
tokens back into `last_tok` (decode rows always; a prefill row only when that chunk ends the
prompt, `p_emit`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax import attention
from seqattn_jax.config import CacheConfig
from seqattn_jax.options import AttentionOptions
from seqattn_jax.packing import PackedBatch, pack_for_flashinfer
from seqattn_jax.serving.mirror import decode_sub_step_ids
from seqattn_jax.serving.sampling import sample_tokens
from seqattn_jax.state import allocate_decoding
from seqattn_jax.validation import ok

__all__ = ["FoldedPlan", "StepKind", "build_step", "fold_host_plan", "pack_inputs",
           "step_inputs_spec", "unpack_inputs"]

KINDS = ("prefill", "decode", "mixed")


@dataclasses.dataclass(frozen=True)
class StepKind:
    """Everything static about one step program (the jit cache key besides shapes).

    kind: "prefill" | "decode" | "mixed"; greedy_only: every row greedy (no sort / draws);
    host_plan: the step's attention plan comes from a `HostPlan` argument (made on the host before
    dispatch: no device sync inside the step); else it is planned inside the step.
    steps: decode only: K decode steps in one program (multi-step decode), each feeding its
    sampled tokens to the next on the device; row b runs the first `d_n[b]` of them. With host
    plans the program takes a tuple of K `HostPlan`s, one per sub-step.
    """

    kind: str
    greedy_only: bool = True
    host_plan: bool = False
    steps: int = 1

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"StepKind.steps must be a positive int, got {self.steps!r}")
        if self.steps > 1 and self.kind != "decode":
            raise ValueError(f"StepKind.steps > 1 is for decode steps, not {self.kind!r}")

    @property
    def has_prefill(self) -> bool:
        return self.kind in ("prefill", "mixed")

    @property
    def has_decode(self) -> bool:
        return self.kind in ("decode", "mixed")


def num_out_rows(kind: StepKind, B: int, Bp: int) -> int:
    """Sampling rows of a step: one per prefill request, then one per decode slot (a multi-step
    decode samples K tokens per row: `kind.steps * B` tokens out, row b of sub-step j at j * B + b)."""
    return (Bp if kind.has_prefill else 0) + (B if kind.has_decode else 0)


def step_inputs_spec(kind: StepKind, B: int, Bp: int, C: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of the host arrays a step of `kind` takes."""
    spec = {}
    if kind.has_prefill:
        spec.update(p_tokens=((C,), "int32"), p_ids=((Bp,), "int32"), p_new=((Bp,), "int32"),
                    p_end=((Bp,), "int32"), p_emit=((Bp,), "int32"))
    if kind.has_decode:
        spec.update(d_ids=((B,), "int32"))
    if kind.steps > 1:
        spec.update(d_n=((B,), "int32"))
    r = num_out_rows(kind, B, Bp)
    spec.update(temperature=((r,), "float32"), top_k=((r,), "int32"), top_p=((r,), "float32"),
                seed=((r,), "uint32"), counter=((r,), "int32"))
    return spec


def pack_inputs(spec: dict, inp: dict) -> np.ndarray:
    """The step's host arrays as ONE int32 vector (floats and uint32 bitcast), in `spec` order: one
    host-to-device transfer per step instead of one per array."""
    parts = []
    for name, (shape, dtype) in spec.items():
        a = np.ascontiguousarray(inp[name], dtype)
        if a.shape != shape:
            raise ValueError(f"step input {name} must have shape {shape}, got {a.shape}")
        parts.append(a.view(np.int32).reshape(-1))
    return np.concatenate(parts)


def unpack_inputs(spec: dict, flat) -> dict:
    """Inside the step: `pack_inputs`' vector back into named arrays."""
    out, off = {}, 0
    for name, (shape, dtype) in spec.items():
        n = int(np.prod(shape))
        x = flat[off:off + n].reshape(shape)
        out[name] = x if dtype == "int32" else jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
        off += n
    return out


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FoldedPlan:
    """A `HostPlan` whose arrays ride at the end of the step's one input vector (`fold_host_plan`):
    its tree structure (the static plan metadata) and its leaves' (shape, dtype). A static pytree:
    the jitted step keys on it, like on the `HostPlan`'s metadata."""

    treedef: object
    leaves: tuple

    def unfold(self, flat, offset: int):
        """Inside the step: the `HostPlan`, its leaves sliced from `flat` from `offset` on."""
        out = []
        for shape, dtype in self.leaves:
            n = int(np.prod(shape))
            x = flat[offset:offset + n].reshape(shape)
            out.append(x if dtype == "int32" else jax.lax.bitcast_convert_type(x, jnp.dtype(dtype)))
            offset += n
        return jax.tree_util.tree_unflatten(self.treedef, out)


def fold_host_plan(flat: np.ndarray, host_plan):
    """(flat with the host plan's arrays appended, the `FoldedPlan` to pass instead of the plan):
    the plan's arrays (the reference backend's planned lengths, FlashInfer's static schedules)
    join the step's one host-to-device transfer instead of one transfer each. None stays None."""
    if host_plan is None:
        return flat, None
    leaves, treedef = jax.tree_util.tree_flatten(host_plan)
    arrays = [np.ascontiguousarray(x) for x in leaves]
    for x in arrays:
        if x.dtype.itemsize != 4:
            raise ValueError(f"fold_host_plan: plan arrays must be 32-bit, got {x.dtype}")
    folded = FoldedPlan(treedef, tuple((x.shape, x.dtype.name) for x in arrays))
    return np.concatenate([flat] + [x.view(np.int32).reshape(-1) for x in arrays]), folded


def _write_view(packed_p: PackedBatch, packed_d: PackedBatch) -> PackedBatch:
    """A PackedBatch whose token rows are the prefill rows then the decode rows: what `append_kv`
    reads (`token_pages`, `token_offsets`) for one scatter over the whole step."""
    cat = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
    return dataclasses.replace(
        packed_p, batch_indices=cat(packed_p.batch_indices, packed_d.batch_indices),
        positions=cat(packed_p.positions, packed_d.positions),
        token_pages=cat(packed_p.token_pages, packed_d.token_pages),
        token_offsets=cat(packed_p.token_offsets, packed_d.token_offsets))


def step_options(model) -> AttentionOptions:
    """The model's attention options as one `AttentionOptions` (causal prefill rows)."""
    return AttentionOptions(**{**dict(model.attention_options()), "causal": True})


def build_step(model, cache: CacheConfig, kind: StepKind, *, B: int, Bp: int, C: int, backend,
               tp=None):
    """The pure step function of `kind` (jit it with the pool, state and last_tok donated).

    step(params, kv, state, last_tok, flat_inputs, host_plan) ->
        (kv, state, last_tok, out int32 [R + 2]: the R sampled tokens, then (allocation ok,
         plan ok) as 0/1)

    `flat_inputs` is `pack_inputs` of the arrays of `step_inputs_spec` (one transfer); `host_plan` is the step's `HostPlan`
    (`host_plan_decode` / `host_plan_prefill` / `host_plan_batch_pod`) when `kind.host_plan`,
    else None; or the `FoldedPlan` of `fold_host_plan`, whose arrays follow the inputs in
    `flat_inputs`. `backend` is a backend object (or name).

    `tp`: a `seqattn_jax.sharding.TensorParallel` (the pool sharded over KV heads on its mesh, the
    params in its layout) or None. With it, plans are made for one device's heads (its local cache
    config, Hq/N query heads) and attention runs per device under `shard_map`; the rest of the
    step is the same program, partitioned by XLA from the shardings of its arguments.
    """
    if kind.kind not in KINDS:
        raise ValueError(f"StepKind.kind must be one of {KINDS}, got {kind.kind!r}")
    opts = step_options(model)
    hq, dtype = model.num_heads, cache.jnp_dtype
    plan_kw = dict(options=opts, q_dtype=dtype, backend=backend)
    full = cache
    if tp is not None:   # plans and attention see one device's heads
        cache, hq = tp.local_cache(cache), tp.local_heads(hq)

    spec = step_inputs_spec(kind, B, Bp, C)
    n_spec = sum(int(np.prod(shape)) for shape, _ in spec.values())
    drop = cache.max_seqs   # a scatter index past every slot: dropped

    def decode_rows(state, d_ids, last_tok):
        """Allocate this decode sub-step's slots `d_ids` (-1: none) one token each; a refused
        allocation writes nowhere (its rows become padding). Returns (state, ok, d_ids, the
        packed decode batch, the rows' input tokens read from `last_tok`)."""
        state, status = allocate_decoding(state, d_ids)   # mirrored: serving/mirror.py
        ok_alloc = ok(status)
        d_ids = jnp.where(ok_alloc, d_ids, -1)
        packed = pack_for_flashinfer(state, d_ids)
        tokens = last_tok.at[jnp.where(d_ids >= 0, d_ids, drop)].get(mode="fill", fill_value=0)
        return state, ok_alloc, d_ids, packed, tokens

    def make_plan(host_plan, packed_p, packed_d):
        """This step's plan (adopting the host plan when `kind.host_plan`); with a mesh every
        device makes (or adopts) its own: see seqattn_jax/sharding.py."""
        def local(host_plan, packed_p, packed_d):
            if kind.kind == "prefill":
                return attention.adopt_plan(host_plan, packed_p) if kind.host_plan else \
                    attention.plan_prefill(cache, packed_p, hq, **plan_kw)
            if kind.kind == "decode":
                return attention.adopt_plan(host_plan, packed_d) if kind.host_plan else \
                    attention.plan_decode(cache, packed_d, hq, **plan_kw)
            return attention.adopt_plan(host_plan, packed_p, packed_d) if kind.host_plan else \
                attention.plan_batch_pod(cache, packed_p, packed_d, hq, **plan_kw)

        return local(host_plan, packed_p, packed_d) if tp is None else \
            tp.plan(local, host_plan, packed_p, packed_d)

    def attend_with(write, packed_p, packed_d, plan):
        """The model's `attend(q, k, v, kv, layer)` for this step's batch: write the rows' K/V
        (`write`: the packed rows in step order), then prefill, decode or batch POD attention;
        per device under `shard_map` with a mesh."""
        def local(q, k, v, kv, layer, write, packed_p, packed_d, plan):
            kv = attention.append_kv(cache, kv, k, v, write, layer=layer)
            if kind.kind == "prefill":
                out = attention.batch_prefill(cache, q, kv, packed_p, plan=plan, layer=layer)
            elif kind.kind == "decode":
                out = attention.batch_decode(cache, q, kv, packed_d, plan=plan, layer=layer)
            else:
                out_p, out_d = attention.batch_pod(cache, q[:C], packed_p, q[C:], packed_d, kv,
                                                   plan=plan, layer=layer)
                out = jnp.concatenate([out_p, out_d])
            return out.astype(q.dtype), kv

        def attend(q, k, v, kv, layer):
            if tp is None:
                return local(q, k, v, kv, layer, write, packed_p, packed_d, plan)
            return tp.attend(full, lambda q, k, v, kv, ex, plan: local(
                q, k, v, kv, layer, *ex, plan))(q, k, v, kv, (write, packed_p, packed_d), plan)

        return attend

    def step(params, kv, state, last_tok, flat, host_plan):
        inp = unpack_inputs(spec, flat)
        if isinstance(host_plan, FoldedPlan):
            host_plan = host_plan.unfold(flat, n_spec)
        if kind.steps > 1:
            return multi_decode(params, kv, state, last_tok, inp, host_plan)
        packed_p = packed_d = None
        ok_alloc = jnp.asarray(True)
        if kind.has_prefill:
            # Admission allocated every prompt page; a chunk covers positions end - new .. end - 1
            # (kv_lens: the length after the chunk, as the host planned it).
            packed_p = pack_for_flashinfer(state, inp["p_ids"], inp["p_new"], max_tokens=C,
                                           kv_lens=inp["p_end"])
        if kind.has_decode:
            state, ok_alloc, d_ids, packed_d, d_tokens = decode_rows(state, inp["d_ids"], last_tok)
        plan = make_plan(host_plan, packed_p, packed_d)
        if kind.kind == "prefill":
            tokens, positions, write = inp["p_tokens"], packed_p.positions, packed_p
            logit_rows = jnp.clip(packed_p.qo_indptr[1:] - 1, 0, C - 1)
        elif kind.kind == "decode":
            tokens, positions, write = d_tokens, packed_d.positions, packed_d
            logit_rows = jnp.arange(B, dtype=jnp.int32)
        else:
            tokens = jnp.concatenate([inp["p_tokens"], d_tokens])
            positions = jnp.concatenate([packed_p.positions, packed_d.positions])
            write = _write_view(packed_p, packed_d)
            logit_rows = jnp.concatenate([jnp.clip(packed_p.qo_indptr[1:] - 1, 0, C - 1),
                                          C + jnp.arange(B, dtype=jnp.int32)])

        logits, kv = model.forward(params, tokens, positions, kv,
                                   attend_with(write, packed_p, packed_d, plan), logit_rows)
        toks = sample_tokens(logits, inp["temperature"], inp["top_k"], inp["top_p"], inp["seed"],
                             inp["counter"], greedy_only=kind.greedy_only)
        if kind.has_prefill:
            emit = jnp.where(inp["p_emit"] >= 0, inp["p_emit"], drop)
            last_tok = last_tok.at[emit].set(toks[:Bp], mode="drop")
        if kind.has_decode:
            off = Bp if kind.has_prefill else 0
            last_tok = last_tok.at[jnp.where(d_ids >= 0, d_ids, drop)].set(toks[off:off + B],
                                                                            mode="drop")
        flags = jnp.stack([ok_alloc, plan.ok]).astype(jnp.int32)
        return kv, state, last_tok, jnp.concatenate([toks, flags])   # one device-to-host read

    def multi_decode(params, kv, state, last_tok, inp, host_plans):
        """K decode steps in one program: sub-step j allocates, plans (adopts host plan j),
        runs the forward and samples (counter + j) for the rows with j < d_n, and feeds its
        tokens to sub-step j + 1 through `last_tok` (the single decode step's pieces, K times)."""
        ok_alloc = plan_ok = jnp.asarray(True)
        toks_all = []
        for j in range(kind.steps):
            state, ok_j, d_ids, packed, tokens = decode_rows(
                state, decode_sub_step_ids(inp["d_ids"], inp["d_n"], j, kind.steps), last_tok)
            ok_alloc = ok_alloc & ok_j
            plan = make_plan(host_plans[j] if kind.host_plan else None, None, packed)
            plan_ok = plan_ok & plan.ok
            logits, kv = model.forward(params, tokens, packed.positions, kv,
                                       attend_with(packed, None, packed, plan),
                                       jnp.arange(B, dtype=jnp.int32))
            toks = sample_tokens(logits, inp["temperature"], inp["top_k"], inp["top_p"],
                                 inp["seed"], inp["counter"] + j, greedy_only=kind.greedy_only)
            last_tok = last_tok.at[jnp.where(d_ids >= 0, d_ids, drop)].set(toks, mode="drop")
            toks_all.append(toks)
        flags = jnp.stack([ok_alloc, plan_ok]).astype(jnp.int32)
        return kv, state, last_tok, jnp.concatenate(toks_all + [flags])

    return step
