"""Paged-attention ops inside `jax.jit` through `buffer_callback`, with one plan per step.

Planning design
---------------
FlashInfer splits each op into `plan` (host: reads the CSR indptr / last_page_len arrays, decides
the work split, writes the schedule into an int workspace on the GPU and returns `plan_info`) and
`run` (device: the kernel). Inside one jitted step the page table lives on the device, so:

1. `plan(key, meta)` emits ONE buffer_callback per step. `meta` is a single int32 array (indptr,
   last_page_len, qo_indptr, ... concatenated in JAX: one device->host copy). The callback makes
   XLA's stream torch's current stream, copies `meta` to the host (this waits for the step's work
   so far on that stream: the only host sync of the step, a few hundred bytes), calls FlashInfer's
   raw plan function (which enqueues the schedule copy into the slot's int workspace on XLA's
   stream) and stores `plan_info` in the slot. It returns a small int32 *token* array.
2. Every `run` callback (one per layer) takes the token as an input. The data dependency makes XLA
   run the plan before the runs, and XLA executes callbacks in program order on its stream, so the
   runs of this step see this step's `plan_info` and workspace. The layer's pages are addressed by
   passing the layer-offset page indices (`indices + layer * num_pages`) as a device buffer, so one
   plan serves all layers, including a `lax.scan` over layers (the token is a loop constant).
3. A slot (`PlanSlot`) is keyed by everything static about the plan (op kind, shapes, heads,
   dtypes, page size, layout, mask/window/soft-cap/pos-encoding, decode kernel, and a user `slot`
   number). The next plan of the same key synchronises the stream before overwriting the slot's
   workspace, so earlier runs have finished with it. Two plans of the SAME key that are alive at
   once in one step (two different batches of identical shape) must use different `slot=` numbers.
4. Workspaces: one 128 MiB float workspace per device shared by all slots (runs are serialised on
   XLA's stream), an 8 MiB int workspace and 8 MiB pinned host buffer per slot, all allocated once.
   Kernel modules are loaded (JIT-compiled on first use) when the slot is created, at trace time.

5. Host plans (decode): `host_plan` plans on the host before the step from lengths the caller
   knows, into a ring entry's own int workspace; `adopt` (a buffer_callback with no inputs) takes
   it inside the step without any sync. See the "host plans" section below.

FFI path (bridge/ffi.py): slots with `PlanKey.ffi` also publish `plan_info`, the int workspace it
lives in and the batch's real row count to the C++ shim at the end of the plan (or adopt)
callback; the FFI runs read them by slot id.

The kernel provider is pluggable: `flashinfer` (GPU) or `torch` (a small torch implementation,
used by the CPU tests to exercise the exact same callback/plan/alias mechanics).

Padding: requests with no pages output 0 (lse -inf); rows past `qo_indptr[B]` output 0 (lse -inf).
The plan knows both on the host, so the fix-up costs nothing when there is no padding.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.experimental.buffer_callback import buffer_callback

from .interop import StreamScope, as_torch, xla_stream

__all__ = ["PlanKey", "RunParams", "plan", "host_plan", "adopt", "decode", "prefill", "pod",
           "batch_pod", "append", "get_slot", "TOKEN_SHAPE", "HOST_PLAN_DEPTH"]

TOKEN_SHAPE = (1,)


@dataclasses.dataclass(frozen=True)
class PlanKey:
    """Everything static about one plan. Hashable; the slot registry is keyed by it."""

    kind: str                     # "decode" | "prefill" | "pod" | "batch_pod"
    provider: str                 # "flashinfer" | "torch"
    batch_size: int               # B (decode part for pod / batch_pod)
    num_rows: int                 # T query rows (prefill part for batch_pod; B for decode / pod)
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    kv_layout: str                # "NHD" | "HND"
    q_dtype: str
    kv_dtype: str
    causal: bool = False          # prefill / prefill part of batch_pod
    pos_encoding_mode: str = "NONE"
    window_left: int = -1
    logits_soft_cap: float = 0.0
    decode_kernel: str = "tensor_core"   # "tensor_core" | "cuda_core"
    batch_size_p: int = 0         # batch_pod: prefill requests
    ffi: bool = False             # runs are XLA FFI calls (bridge/ffi.py): publish plan_info
    slot: int = 0

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class RunParams:
    """Per-call scalars (they do not change the plan)."""

    sm_scale: float
    rope_scale: float = 1.0
    rope_theta: float = 1e4
    return_lse: bool = False


class PlanSlot:
    """Host-side state of one plan key: kernel modules, workspaces, the latest plan."""

    def __init__(self, key: PlanKey, provider):
        self.key = key
        self.provider = provider
        self.state: Any = provider.make_state(key)   # modules, workspaces (trace time)
        self.id = next(_slot_ids)                     # the FFI shim's name for this slot
        self.on_plan = None                           # FFI path: publishes plan_info
        self.plan_info: Any = None
        self.plan_info_p: Any = None
        self.empty_req: torch.Tensor | None = None   # decode requests with no pages
        self.empty_req_p: torch.Tensor | None = None
        self.total_rows: int = key.num_rows          # real query rows (prefill)
        self.append_rows: int | None = None          # real rows form a prefix of this length
        self.append_rows_index: torch.Tensor | None = None
        self.int_ws: Any = None                       # int workspace the runs read (None: the
                                                      # provider's own, st.int_ws)
        self.num_plans = 0
        # host plans (see `host_plan` / `adopt`): a ring of workspaces and the FIFO of plans
        # made on the host that wait for the step that adopts them
        self.ring: list[_RingEntry] = []
        self.ring_next = 0
        self.queue: collections.deque = collections.deque()
        self.current: _RingEntry | None = None        # ring entry adopted by the latest step
        self.host_seq = 0


_slots: dict[PlanKey, PlanSlot] = {}
_slot_ids = itertools.count()
_slots_lock = threading.Lock()


def _provider(name: str):
    if name == "flashinfer":
        from . import fi_provider

        return fi_provider.PROVIDER
    if name == "torch":
        from . import torch_provider

        return torch_provider.PROVIDER
    raise ValueError(f"unknown kernel provider {name!r}")


def get_slot(key: PlanKey) -> PlanSlot:
    slot = _slots.get(key)
    if slot is None:
        with _slots_lock:
            slot = _slots.get(key)
            if slot is None:
                slot = PlanSlot(key, _provider(key.provider))
                _slots[key] = slot
    return slot


# --------------------------------------------------------------------------------------------
# host-side meta layout


def _meta_sections(key: PlanKey) -> list[tuple[str, int]]:
    B, T = key.batch_size, key.num_rows
    if key.kind == "decode" or key.kind == "pod":
        return [("indptr", B + 1), ("lpl", B), ("batch_indices", B)]
    if key.kind == "prefill":
        return [("indptr", B + 1), ("lpl", B), ("qo_indptr", B + 1), ("batch_indices", T)]
    if key.kind == "batch_pod":
        Bp = key.batch_size_p
        return [("indptr_p", Bp + 1), ("lpl_p", Bp), ("qo_indptr_p", Bp + 1),
                ("indptr", B + 1), ("lpl", B)]
    raise ValueError(key.kind)


class HostMeta(dict):
    """numpy int32 views of the planning arrays, by name."""


def _split_meta(key: PlanKey, flat: np.ndarray) -> HostMeta:
    out = HostMeta()
    off = 0
    for name, n in _meta_sections(key):
        out[name] = flat[off: off + n]
        off += n
    return out


def _empty_requests(indptr: np.ndarray, device) -> torch.Tensor | None:
    empty = np.nonzero(indptr[1:] == indptr[:-1])[0]
    if empty.size == 0:
        return None
    return torch.from_numpy(empty.astype(np.int64)).to(device, non_blocking=False)


def _plan_callback(slot: PlanSlot):
    key = slot.key

    def cb(ctx, token, meta):
        stream = xla_stream(ctx)
        with StreamScope(stream):
            meta_t = as_torch(meta)
            device = meta_t.device
            host = _split_meta(key, meta_t.cpu().numpy())   # waits for XLA's stream
            _retire_current(slot, stream)
            slot.provider.plan(slot, host)
            slot.int_ws = None
            # padding bookkeeping (host only; device index tensors only when padding exists)
            if key.kind in ("decode", "pod", "batch_pod") and \
                    not getattr(slot.provider, "zeroes_empty_requests", False):
                slot.empty_req = _empty_requests(host["indptr"], device)
            if key.kind == "batch_pod":
                slot.total_rows = int(host["qo_indptr_p"][-1])
            if key.kind == "prefill":
                slot.total_rows = int(host["qo_indptr"][-1])
                slot.empty_req = None
            if "batch_indices" in host:
                bi = host["batch_indices"]
                valid = bi >= 0
                n = int(valid.sum())
                if valid[:n].all():
                    slot.append_rows, slot.append_rows_index = n, None
                else:
                    slot.append_rows = None
                    slot.append_rows_index = torch.from_numpy(
                        np.nonzero(valid)[0].astype(np.int64)).to(device)
            if slot.on_plan is not None:      # FFI path: publish plan_info and the row count
                slot.on_plan(slot)
            slot.num_plans += 1
            as_torch(token).fill_(slot.num_plans & 0x7FFFFFFF)

    return cb


def plan(key: PlanKey, *arrays: jax.Array) -> jax.Array:
    """Emit the plan callback for `key`; `arrays` are the int32 sections of `_meta_sections`."""
    slot = get_slot(key)
    sections = _meta_sections(key)
    if len(arrays) != len(sections):
        raise ValueError(f"plan({key.kind}) takes {[n for n, _ in sections]}")
    for (name, n), a in zip(sections, arrays):
        if a.shape != (n,):
            raise ValueError(f"plan({key.kind}): {name} must have shape ({n},), got {a.shape}")
    meta = jnp.concatenate([jnp.asarray(a, jnp.int32) for a in arrays])
    f = buffer_callback(_plan_callback(slot), jax.ShapeDtypeStruct(TOKEN_SHAPE, jnp.int32),
                        vmap_method=None)
    return f(meta)


# --------------------------------------------------------------------------------------------
# host plans: plan on the host before the step, adopt inside it with no stream sync
#
# The device-planned path above reads the step's lengths back from the GPU, so the GPU idles
# while the host plans (the previous step's work must drain first). When the caller knows the
# step's lengths on the host (a scheduler does: a decode step adds one token per request), the
# plan can be made before the step is dispatched, while the GPU still runs the previous step:
#
#   host_plan(key, meta)   host, outside jit: FlashInfer's plan writes its schedule into a pinned
#                          buffer of a ring entry and copies it (async, on a private stream) into
#                          that entry's own int workspace; the plan joins the slot's FIFO.
#   adopt(key)             inside the step: one buffer_callback that pops the FIFO, makes XLA's
#                          stream wait for the entry's copy (a GPU-side event wait, no host sync),
#                          points the slot's runs at the entry's workspace and plan_info, and
#                          writes the plan's sequence number into the token.
#
# Steps pop plans in the order they were dispatched, which is the order plans were pushed. The
# caller checks on the device that the step adopted the plan it meant (the token holds the
# sequence number) and that the plan's lengths are the packed batch's (attention.plan_decode
# returns this as `plan.ok`). A ring entry is rewritten only after a later adopt of the same slot
# recorded (on XLA's stream, after every run of the step that used it) that it is free.

HOST_PLAN_DEPTH = 6      # host plans that may wait for their step, per slot
_RING = HOST_PLAN_DEPTH + 2
_RING_WS_BYTES = 1 << 20
_EXPECTED_BYTES = 1 << 16          # the tail of each ring workspace: the plan's own lengths
MAX_HOST_PLAN_ROWS = _EXPECTED_BYTES // 4   # int32 entries of `expected`


class _RingEntry:
    __slots__ = ("int_ws", "pinned", "exp_dev", "exp_pinned", "copied", "released", "state",
                 "plan_info", "append_rows", "empty_req", "seq", "expected")

    def __init__(self, device):
        self.int_ws = self.pinned = self.copied = self.released = None
        self.exp_dev = self.exp_pinned = None
        if device is not None:
            ws = torch.empty(_RING_WS_BYTES, dtype=torch.uint8, device=device)
            pinned = torch.empty(_RING_WS_BYTES, dtype=torch.uint8, pin_memory=True)
            head = _RING_WS_BYTES - _EXPECTED_BYTES
            # FlashInfer's schedule in the head; the plan's lengths (`expected`) in the tail
            self.int_ws, self.pinned = ws[:head], pinned[:head]
            self.exp_dev, self.exp_pinned = ws[head:].view(torch.int32), pinned[head:].view(torch.int32)
            self.copied = torch.cuda.Event()
            self.released = torch.cuda.Event()
        self.expected = None
        self.state = "free"          # free | queued | current | retired
        self.plan_info = None
        self.append_rows = None
        self.empty_req = None
        self.seq = 0


_side_streams: dict[int, Any] = {}


def _side_stream(device):
    s = _side_streams.get(device.index)
    if s is None:
        s = _side_streams[device.index] = torch.cuda.Stream(device=device)
    return s


def _retire_current(slot: PlanSlot, stream) -> None:
    """The slot's current ring entry is done once XLA's stream passes this point."""
    cur = slot.current
    if cur is not None:
        if stream is not None and cur.released is not None:
            cur.released.record(stream)
            cur.state = "retired"
        else:
            cur.state = "free"       # CPU: everything ran synchronously
        slot.current = None


def _take_entry(slot: PlanSlot) -> _RingEntry:
    if not slot.ring:
        device = getattr(slot.state, "device", None)
        if device is not None and device.type != "cuda":
            device = None
        slot.ring = [_RingEntry(device) for _ in range(_RING)]
    for _ in range(_RING):
        e = slot.ring[slot.ring_next]
        slot.ring_next = (slot.ring_next + 1) % _RING
        if e.state in ("free", "retired"):
            return e
    raise RuntimeError("seqattn_jax: no free host-plan workspace (internal error)")


def host_plan(key: PlanKey, arrays: dict[str, np.ndarray], append_rows: int | None,
              expected: np.ndarray) -> int:
    """Plan `key` on the host from `arrays` (the `_meta_sections` of `key`, numpy int32) and queue
    the plan for the next step that adopts this slot. `expected` (int32, at most
    MAX_HOST_PLAN_ROWS entries) travels with the plan to the device: the step that adopts the plan
    gets it from `adopt`, so it checks the batch against the plan it really used. Returns the
    plan's sequence number."""
    expected = np.ascontiguousarray(expected, np.int32)
    if expected.size > MAX_HOST_PLAN_ROWS:
        raise ValueError(f"host plans take at most {(MAX_HOST_PLAN_ROWS - 2) // 2} requests")
    slot = get_slot(key)
    if len(slot.queue) >= HOST_PLAN_DEPTH:
        raise RuntimeError(
            f"seqattn_jax: {len(slot.queue)} host plans of this shape already wait for a step; "
            f"each jitted step adopts one (at most {HOST_PLAN_DEPTH} may wait)")
    host = HostMeta({name: np.ascontiguousarray(a, np.int32) for name, a in arrays.items()})
    e = _take_entry(slot)
    if e.int_ws is not None:
        side = _side_stream(e.int_ws.device)
        if e.state == "retired":
            side.wait_event(e.released)   # GPU-side: the step that used it has finished with it
        e.copied.synchronize()            # host-side: the last copy out of e.pinned is done
        with StreamScope(side):           # FlashInfer's schedule copy goes on the side stream
            e.plan_info = slot.provider.host_plan(slot, host, e.int_ws, e.pinned)
            n = expected.size
            e.exp_pinned[:n].copy_(torch.from_numpy(expected))
            e.exp_dev[:n].copy_(e.exp_pinned[:n], non_blocking=True)
            e.copied.record(side)
    else:
        e.plan_info = slot.provider.host_plan(slot, host, None, None)
    e.empty_req = None
    if "indptr" in host and not getattr(slot.provider, "zeroes_empty_requests", False):
        # providers whose kernels leave requests without pages unwritten (the torch test kernels)
        empty = np.nonzero(host["indptr"][1:] == host["indptr"][:-1])[0]
        e.empty_req = torch.from_numpy(empty.astype(np.int64)) if empty.size else None
    slot.host_seq = (slot.host_seq + 1) & 0x7FFFFFFF
    e.seq, e.append_rows, e.state = slot.host_seq, append_rows, "queued"
    e.expected = expected
    slot.queue.append(e)
    return e.seq


def _adopt_callback(slot: PlanSlot):
    def cb(ctx, outs):
        stream = xla_stream(ctx)
        with StreamScope(stream):
            if not slot.queue:
                raise RuntimeError(f"seqattn_jax: a step adopts a host plan of slot {slot.id} but "
                                   "none is queued: call the host plan before each step")
            e = slot.queue.popleft()
            exp_out = as_torch(outs[1])
            if e.exp_dev is not None:
                stream.wait_event(e.copied)     # GPU-side: the schedule and lengths are there
                exp_out.copy_(e.exp_dev[:exp_out.numel()], non_blocking=True)
            else:                               # CPU (the torch test kernels)
                exp_out.copy_(torch.from_numpy(e.expected))
            _retire_current(slot, stream)
            e.state, slot.current = "current", e
            slot.plan_info, slot.int_ws = e.plan_info, e.int_ws
            slot.append_rows, slot.append_rows_index = e.append_rows, None
            slot.empty_req = e.empty_req
            if slot.on_plan is not None:
                slot.on_plan(slot)
            slot.num_plans += 1
            as_torch(outs[0]).fill_(e.seq)

    return cb


def discard_host_plans() -> int:
    """Drop every host plan still waiting for a step (after a step failed to run, say). Returns
    how many were dropped."""
    n = 0
    for slot in list(_slots.values()):
        while slot.queue:
            e = slot.queue.popleft()
            e.state = "free"     # never used by a step; host_plan waits for its copy anyway
            n += 1
    return n


def adopt(key: PlanKey, n_expected: int) -> tuple[jax.Array, jax.Array]:
    """Inside the step: take the oldest host plan of `key` (no stream sync). Returns the token
    (int32[1], the plan's sequence number) and the plan's `expected` (int32[n_expected]), both
    written on XLA's stream from the plan's ring entry."""
    slot = get_slot(key)
    f = buffer_callback(_adopt_callback(slot),
                        (jax.ShapeDtypeStruct(TOKEN_SHAPE, jnp.int32),
                         jax.ShapeDtypeStruct((n_expected,), jnp.int32)),
                        vmap_method=None)
    return f()

# --------------------------------------------------------------------------------------------
# padding fix-ups (run on XLA's stream inside the run callbacks)


def _fix_requests(o, lse, idx, provider=None):
    # FlashInfer's kernels already write 0 / -inf for a request without pages (measured on H200,
    # both decode kernels); other providers get the fix-up.
    if idx is not None and not getattr(provider, "zeroes_empty_requests", False):
        idx = idx.to(o.device)
        o.index_fill_(0, idx, 0)
        if lse is not None:
            lse.index_fill_(0, idx, -math.inf)


def _fix_rows(o, lse, total):
    if total < o.shape[0]:
        o[total:].zero_()
        if lse is not None:
            lse[total:].fill_(-math.inf)


def _split_kv(kv_t: torch.Tensor):
    # [P, 2, ...] -> strided K and V views of the one pool (no copy)
    return kv_t.select(1, 0), kv_t.select(1, 1)


def _out_struct(shape, dtype, rp: RunParams, lse_rows_heads):
    outs = [jax.ShapeDtypeStruct(shape, dtype)]
    if rp.return_lse:
        outs.append(jax.ShapeDtypeStruct(lse_rows_heads, jnp.float32))
    return tuple(outs)


# --------------------------------------------------------------------------------------------
# decode


@functools.lru_cache(maxsize=None)
def _decode_cb(key: PlanKey, rp: RunParams):
    slot = get_slot(key)
    run = slot.provider.decode

    def cb(ctx, outs, q, kv, indptr, indices, lpl, token):
        with StreamScope(xla_stream(ctx)):
            k, v = _split_kv(as_torch(kv))
            o = as_torch(outs[0])
            lse = as_torch(outs[1]) if rp.return_lse else None
            run(slot, as_torch(q), k, v, as_torch(indptr), as_torch(indices), as_torch(lpl), o,
                lse, rp)
            _fix_requests(o, lse, slot.empty_req, slot.provider)

    return cb


def decode(key: PlanKey, rp: RunParams, token, q, kv, indptr, indices, lpl):
    """q[B,Hq,D] against the paged pool -> (out[B,Hq,D],) or (out, lse[B,Hq])."""
    f = buffer_callback(_decode_cb(key, rp), _out_struct(q.shape, q.dtype, rp, q.shape[:2]),
                        vmap_method=None)
    return f(q, kv, indptr, indices, lpl, token)


# --------------------------------------------------------------------------------------------
# prefill (paged, batch)


@functools.lru_cache(maxsize=None)
def _prefill_cb(key: PlanKey, rp: RunParams):
    slot = get_slot(key)
    run = slot.provider.prefill

    def cb(ctx, outs, q, kv, qo_indptr, indptr, indices, lpl, token):
        with StreamScope(xla_stream(ctx)):
            k, v = _split_kv(as_torch(kv))
            o = as_torch(outs[0])
            lse = as_torch(outs[1]) if rp.return_lse else None
            run(slot, as_torch(q), k, v, as_torch(qo_indptr), as_torch(indptr),
                as_torch(indices), as_torch(lpl), o, lse, rp)
            _fix_rows(o, lse, slot.total_rows)

    return cb


def prefill(key: PlanKey, rp: RunParams, token, q, kv, qo_indptr, indptr, indices, lpl):
    f = buffer_callback(_prefill_cb(key, rp), _out_struct(q.shape, q.dtype, rp, q.shape[:2]),
                        vmap_method=None)
    return f(q, kv, qo_indptr, indptr, indices, lpl, token)


# --------------------------------------------------------------------------------------------
# POD: one prefill request (contiguous k_p / v_p) + a decode batch, one launch


@functools.lru_cache(maxsize=None)
def _pod_cb(key: PlanKey, rp: RunParams, causal_p: bool):
    slot = get_slot(key)
    run = slot.provider.pod

    def cb(ctx, outs, q_p, k_p, v_p, q_d, kv, indptr, indices, lpl, token):
        with StreamScope(xla_stream(ctx)):
            k, v = _split_kv(as_torch(kv))
            o_p, o_d = as_torch(outs[0]), as_torch(outs[1])
            lse_p = as_torch(outs[2]) if rp.return_lse else None
            lse_d = as_torch(outs[3]) if rp.return_lse else None
            run(slot, as_torch(q_p), as_torch(k_p), as_torch(v_p), causal_p, as_torch(q_d), k, v,
                as_torch(indptr), as_torch(indices), as_torch(lpl), o_p, o_d, lse_p, lse_d, rp)
            _fix_requests(o_d, lse_d, slot.empty_req, slot.provider)

    return cb


def pod(key: PlanKey, rp: RunParams, causal_p: bool, token, q_p, k_p, v_p, q_d, kv, indptr,
        indices, lpl):
    shapes = [jax.ShapeDtypeStruct(q_p.shape, q_p.dtype), jax.ShapeDtypeStruct(q_d.shape, q_d.dtype)]
    if rp.return_lse:
        shapes += [jax.ShapeDtypeStruct(q_p.shape[:2], jnp.float32),
                   jax.ShapeDtypeStruct(q_d.shape[:2], jnp.float32)]
    f = buffer_callback(_pod_cb(key, rp, causal_p), tuple(shapes), vmap_method=None)
    return f(q_p, k_p, v_p, q_d, kv, indptr, indices, lpl, token)


# --------------------------------------------------------------------------------------------
# batch POD: a paged prefill batch + a decode batch, one launch


@functools.lru_cache(maxsize=None)
def _batch_pod_cb(key: PlanKey, rp: RunParams):
    slot = get_slot(key)
    run = slot.provider.batch_pod

    def cb(ctx, outs, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d, indices_d,
           lpl_d, kv, token):
        with StreamScope(xla_stream(ctx)):
            k, v = _split_kv(as_torch(kv))
            o_p, o_d = as_torch(outs[0]), as_torch(outs[1])
            lse_p = as_torch(outs[2]) if rp.return_lse else None
            lse_d = as_torch(outs[3]) if rp.return_lse else None
            run(slot, as_torch(q_p), as_torch(qo_indptr_p), as_torch(indptr_p),
                as_torch(indices_p), as_torch(lpl_p), as_torch(q_d), as_torch(indptr_d),
                as_torch(indices_d), as_torch(lpl_d), k, v, o_p, o_d, lse_p, lse_d, rp)
            _fix_rows(o_p, lse_p, slot.total_rows)
            _fix_requests(o_d, lse_d, slot.empty_req, slot.provider)

    return cb


def batch_pod(key: PlanKey, rp: RunParams, token, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p,
              q_d, indptr_d, indices_d, lpl_d, kv):
    shapes = [jax.ShapeDtypeStruct(q_p.shape, q_p.dtype), jax.ShapeDtypeStruct(q_d.shape, q_d.dtype)]
    if rp.return_lse:
        shapes += [jax.ShapeDtypeStruct(q_p.shape[:2], jnp.float32),
                   jax.ShapeDtypeStruct(q_d.shape[:2], jnp.float32)]
    f = buffer_callback(_batch_pod_cb(key, rp), tuple(shapes), vmap_method=None)
    return f(q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d, indices_d, lpl_d, kv,
             token)


# --------------------------------------------------------------------------------------------
# append new K/V rows into the pool, in place (the pool is aliased to the output: donate it)


@functools.lru_cache(maxsize=None)
def _append_cb(key: PlanKey):
    slot = get_slot(key)
    run = slot.provider.append

    def cb(ctx, outs, kv, keys, values, batch_indices, positions, indptr, indices, lpl, token):
        with StreamScope(xla_stream(ctx)):
            kv_t = as_torch(outs[0])        # == the input pool's buffer (aliased)
            k_cache, v_cache = _split_kv(kv_t)
            run(slot, as_torch(keys), as_torch(values), as_torch(batch_indices),
                as_torch(positions), k_cache, v_cache, as_torch(indptr), as_torch(indices),
                as_torch(lpl))

    return cb


def append(key: PlanKey, token, kv, keys, values, batch_indices, positions, indptr, indices, lpl):
    """Write rows `keys/values[T,Hkv,D]` at (batch_indices, positions) of the pool; returns the pool
    (same buffer when `kv` is donated)."""
    f = buffer_callback(_append_cb(key), (jax.ShapeDtypeStruct(kv.shape, kv.dtype),),
                        input_output_aliases={0: 0}, vmap_method=None)
    (out,) = f(kv, keys, values, batch_indices, positions, indptr, indices, lpl, token)
    return out
