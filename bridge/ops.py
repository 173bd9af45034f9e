"""Paged-attention ops inside `jax.jit` through `buffer_callback`, with one plan per step.

Planning design
---------------
FlashInfer splits each op into `plan` (host: reads the CSR indptr / last_page_len arrays, decides
the work split, writes the schedule into an int workspace on the GPU and returns `plan_info`) and
`run` (device: the kernel). Inside one jitted step the page table lives on the device, so:

1. `plan(slot, *arrays)` emits ONE buffer_callback per step. Its arrays are concatenated in JAX
   into one int32 array (one device->host copy). The callback makes XLA's stream torch's current
   stream, copies the array to the host (this waits for the step's work so far on that stream:
   the only host sync of the step, a few hundred bytes), calls the provider's plan (FlashInfer's
   raw plan function enqueues the schedule copy into the slot's int workspace on XLA's stream)
   and stores `plan_info` in the slot. It returns a small int32 *token* array.
2. Every run callback (one per layer) takes the token as an input. The data dependency makes XLA
   run the plan before the runs, and XLA executes callbacks in program order on its stream, so the
   runs of this step see this step's `plan_info` and workspace. The layer's pages are addressed by
   passing the layer-offset page indices (`indices + layer * num_pages`) as a device buffer, so one
   plan serves all layers, including a `lax.scan` over layers (the token is a loop constant).
3. A slot (`PlanSlot`) is keyed by everything static about the plan (`PlanKey`: op kind, shapes,
   heads, dtypes, page size, layout, mask / window / soft cap / pos-encoding, decode kernel,
   transport and a `plan_id`). Slots belong to a `PlanSlots` registry, which belongs to one
   `FlashInferBackend`. Two plans of the SAME key alive at once in one step (two different
   batches of identical shape) must use different `plan_id`s.
4. Workspaces: one float workspace per device and provider shared by all slots (runs are
   serialised on XLA's stream), an int workspace and pinned host buffer per slot, all allocated
   once.
6. Several devices (tensor parallel, `seqattn_jax.sharding`): under `shard_map` every device runs
   the plan / adopt / run callbacks itself, with its own buffers, on its own thread. A slot is
   therefore per (PlanKey, device): the slot a trace binds into its callbacks is the key's slot on
   the home device, and each callback takes `slot.on(device)`, the key's slot on the device its
   buffers live on (their DLPack device id), with that device current in torch. A host plan is
   made once per device of the backend (`FlashInferBackend(devices=...)`) and each device's adopt
   pops its own queue. Kernel modules are loaded (JIT-compiled on first use) when the slot is created, at trace
   time.
5. Host plans (decode, prefill, batch POD): `host_plan` plans on the host before the step from
   lengths the caller knows, into a ring entry's own int workspaces; `adopt` (a buffer_callback
   with no inputs) takes it inside the step without any sync. See "host plans" below.

FFI path (bridge/ffi.py): slots with `PlanKey.ffi` also publish `plan_info`, the int workspace it
lives in and the batch's real row count to the C++ shim at the end of the plan (or adopt)
callback; the FFI runs read them by slot id.

The kernel provider (`KernelProvider`) is FlashInfer (`fi_provider`) or a small torch
implementation (`torch_provider`, used by the CPU tests to exercise the same callback / plan /
alias mechanics). Providers write 0 (LSE -inf) for a request without pages; rows past
`qo_indptr[B]` are zeroed in XLA by the backend (bridge/backend.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.experimental.buffer_callback import buffer_callback

from . import ffi
from .interop import StreamScope, as_torch, xla_stream

__all__ = ["HOST_PLAN_DEPTH", "MAX_HOST_PLAN_ENTRIES", "TOKEN_SHAPE", "KernelProvider", "PlanKey",
           "PlanSlot", "PlanSlots", "RunParams", "adopt", "append", "batch_pod", "decode",
           "host_plan", "host_plan_static", "plan", "pod", "prefill"]

TOKEN_SHAPE = (1,)


@dataclasses.dataclass(frozen=True)
class PlanKey:
    """Everything static about one plan. Hashable; a backend's slots are keyed by it."""

    kind: str                     # "decode" | "prefill" | "pod" | "batch_pod"
    batch_size: int               # B (decode part for pod / batch_pod)
    num_rows: int                 # T query rows (prefill part for batch_pod; B for decode / pod)
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    kv_layout: str                # "NHD" | "HND"
    q_dtype: str
    kv_dtype: str
    causal: bool = False          # prefill / prefill part of pod and batch_pod
    pos_encoding_mode: str = "NONE"
    window_left: int = -1
    logits_soft_cap: float = 0.0
    decode_kernel: str = "tensor_core"   # "tensor_core" | "cuda_core"
    batch_size_p: int = 0         # batch_pod: prefill requests
    ffi: bool = False             # runs are XLA FFI calls (bridge/ffi.py): publish plan_info
    plan_id: int = 0


@dataclasses.dataclass(frozen=True)
class RunParams:
    """The options that are arguments of a run (not of the plan), from `AttentionOptions`."""

    sm_scale: float
    rope_scale: float = 1.0
    rope_theta: float = 1e4
    return_lse: bool = False


class KernelProvider(Protocol):
    """The kernels behind a backend. `plan` returns (plan_info, plan_info of batch POD's prefill
    part or None) and writes the schedule into `int_ws` (one workspace; batch POD: decode then
    prefill); every run writes 0 / LSE -inf for a request without pages."""

    name: str
    has_ffi: bool                 # its decode / prefill runs can be XLA FFI calls

    def unsupported(self, kind: str, options) -> str | None: ...
    def make_state(self, key: PlanKey) -> Any: ...
    def workspaces(self, slot: "PlanSlot") -> tuple[list | None, list | None]: ...
    def plan(self, slot: "PlanSlot", host: dict, int_ws, pinned,
             cuda_graph: bool = False) -> tuple[Any, Any]: ...
    def decode(self, slot, q, k, v, indptr, indices, lpl, o, lse, rp: RunParams) -> None: ...
    def prefill(self, slot, q, k, v, qo_indptr, indptr, indices, lpl, o, lse, rp) -> None: ...
    def pod(self, slot, q_p, k_p, v_p, causal_p, q_d, k, v, indptr, indices, lpl, o_p, o_d,
            lse_p, lse_d, rp) -> None: ...
    def batch_pod(self, slot, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d,
                  indices_d, lpl_d, k, v, o_p, o_d, lse_p, lse_d, rp) -> None: ...
    def append(self, slot, keys, values, batch_indices, positions, k_cache, v_cache, indptr,
               indices, lpl) -> None: ...


_slot_ids = itertools.count()     # the FFI shim's names for slots: unique in the process


def _device(buf) -> int:
    """The device ordinal of a callback buffer: its DLPack device id (the CUDA device index on a
    GPU, the CPU device's id on a CPU)."""
    return int(buf.__dlpack_device__()[1])


def _device_guard(device: int):
    """torch's current CUDA device set to `device` for the block (nothing without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.current_device() != device:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def home_device() -> int:
    """The device ordinal slots are created on by default: torch's current CUDA device, else 0."""
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


_peer_lock = threading.Lock()


class PlanSlot:
    """Host-side state of one plan key on one device: kernel modules, workspaces, the current
    plan. `on(device)` is the same key's slot on another device."""

    def __init__(self, key: PlanKey, provider: KernelProvider, device: int | None = None):
        self.key = key
        self.provider = provider
        self.device = home_device() if device is None else int(device)
        with _device_guard(self.device):
            self.state: Any = provider.make_state(key)   # modules, workspaces (trace time)
        self.peers: dict[int, PlanSlot] = {self.device: self}   # shared by the key's slots
        self.id = next(_slot_ids)
        self.plan_info: Any = None
        self.plan_info_p: Any = None                  # batch POD: the prefill part's
        self.int_ws: list | None = None               # the int workspaces the runs read
        self.append_rows: int | None = None           # real token rows form a prefix this long
        self.append_rows_index: torch.Tensor | None = None   # ... or are these rows
        self.num_plans = 0
        self.callbacks: dict = {}                     # run callbacks by (op, RunParams, ...)
        # host plans (see `host_plan` / `adopt`): a ring of workspaces and the FIFO of plans
        # made on the host that wait for the step that adopts them
        self.ring: list[_RingEntry] = []
        self.ring_next = 0
        self.queue: collections.deque = collections.deque()
        self.current: _RingEntry | None = None        # ring entry adopted by the latest step
        self.host_seq = 0

    def on(self, device: int) -> "PlanSlot":
        """This key's slot on `device` (created on first use: modules, workspaces there)."""
        s = self.peers.get(device)
        if s is None:
            with _peer_lock:
                s = self.peers.get(device)
                if s is None:
                    s = PlanSlot(self.key, self.provider, device)
                    s.peers, s.callbacks = self.peers, self.callbacks
                    self.peers[device] = s
        return s


class PlanSlots:
    """A backend's plan slots, by `PlanKey` (created at trace time, kept for the backend's life)."""

    def __init__(self, provider: KernelProvider, devices: tuple[int, ...] | None = None):
        self.provider = provider
        self.devices = devices          # device ordinals every key gets a slot on (None: home)
        self._slots: dict[PlanKey, PlanSlot] = {}
        self._lock = threading.Lock()

    def get(self, key: PlanKey) -> PlanSlot:
        """The key's slot on the home device (its peers on `devices` created with it)."""
        slot = self._slots.get(key)
        if slot is None:
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    home = None if not self.devices else self.devices[0]
                    slot = PlanSlot(key, self.provider, home)
                    for d in self.devices or ():
                        slot.on(d)
                    self._slots[key] = slot
        return slot

    def __iter__(self):
        return iter([p for s in list(self._slots.values()) for p in list(s.peers.values())])

    def num_plans(self) -> int:
        """Plans made (in steps or adopted) over all slots."""
        return sum(s.num_plans for s in self)

    def discard_host_plans(self) -> int:
        """Drop every host plan still waiting for a step. Returns how many were dropped."""
        n = 0
        for slot in self:
            while slot.queue:
                slot.queue.popleft().state = "free"   # never used by a step
                n += 1
        return n


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


def _split_meta(key: PlanKey, flat: np.ndarray) -> dict[str, np.ndarray]:
    """numpy int32 views of the planning arrays, by name."""
    out, off = {}, 0
    for name, n in _meta_sections(key):
        out[name] = flat[off: off + n]
        off += n
    return out


def _append_rows(slot: PlanSlot, batch_indices: np.ndarray, device) -> None:
    """Where the batch's real token rows are (FlashInfer's append takes them as a prefix)."""
    valid = batch_indices >= 0
    n = int(valid.sum())
    if valid[:n].all():
        slot.append_rows, slot.append_rows_index = n, None
    else:
        slot.append_rows = None
        slot.append_rows_index = torch.from_numpy(np.nonzero(valid)[0].astype(np.int64)).to(device)


def _planned(slot: PlanSlot) -> None:
    """End of a plan or adopt callback: hand the plan to the FFI shim, count it."""
    if slot.key.ffi:
        ffi.publish_plan(slot)
    slot.num_plans += 1


def _plan_callback(home: PlanSlot):
    key = home.key

    def cb(ctx, token, meta):
        slot = home.on(_device(meta))
        stream = xla_stream(ctx, slot.device)
        with StreamScope(stream):
            meta_t = as_torch(meta)
            host = _split_meta(key, meta_t.cpu().numpy())   # waits for XLA's stream
            _retire_current(slot, stream)
            int_ws, pinned = slot.provider.workspaces(slot)
            slot.plan_info, slot.plan_info_p = slot.provider.plan(slot, host, int_ws, pinned)
            slot.int_ws = int_ws
            if "batch_indices" in host:
                _append_rows(slot, host["batch_indices"], meta_t.device)
            _planned(slot)
            as_torch(token).fill_(slot.num_plans & 0x7FFFFFFF)

    return cb


def plan(slot: PlanSlot, *arrays: jax.Array) -> jax.Array:
    """Emit the plan callback of `slot`; `arrays` are the int32 sections of `_meta_sections`."""
    key = slot.key
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
# step's lengths on the host (a scheduler does), the plan can be made before the step is
# dispatched, while the GPU still runs the previous step:
#
#   host_plan(slot, ...)   host, outside jit: the provider's plan writes its schedule into pinned
#                          buffers of a ring entry and copies it (async, on a private stream) into
#                          that entry's own int workspaces; the plan joins the slot's FIFO.
#   adopt(slot, n)         inside the step: one buffer_callback that pops the FIFO, makes XLA's
#                          stream wait for the entry's copy (a GPU-side event wait, no host sync),
#                          points the slot's runs at the entry's workspaces and plan_info, and
#                          writes the plan's sequence number into the token.
#
# Steps pop plans in the order they were dispatched, which is the order plans were pushed. The
# step checks on the device that the plan it adopted was made for its packed batch: the plan's
# `expected` lengths travel in the tail of the entry's first workspace and `adopt` returns them
# on XLA's stream (attention.adopt_plan compares them into `plan.ok`). A ring entry is rewritten
# only after a later adopt of the same slot recorded (on XLA's stream, after every run of the
# step that used it) that it is free.

HOST_PLAN_DEPTH = 6      # host plans that may wait for their step, per slot
_RING = HOST_PLAN_DEPTH + 2
_RING_WS_BYTES = {"decode": 1 << 20, "prefill": 2 << 20, "batch_pod": 2 << 20}
_EXPECTED_BYTES = 1 << 16          # the tail of an entry's first workspace: the plan's lengths
MAX_HOST_PLAN_ENTRIES = _EXPECTED_BYTES // 4   # int32 entries of `expected`


class _RingEntry:
    __slots__ = ("int_ws", "pinned", "exp_dev", "exp_pinned", "copied", "released", "state",
                 "plan_info", "append_rows", "seq", "expected")

    def __init__(self, device, kind: str, n_ws: int):
        self.int_ws = self.pinned = self.copied = self.released = None
        self.exp_dev = self.exp_pinned = None
        if device is not None:
            size = _RING_WS_BYTES[kind]
            ws = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(n_ws)]
            pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(n_ws)]
            head = size - _EXPECTED_BYTES
            # FlashInfer's schedule in the head; the plan's lengths (`expected`) in the tail
            self.exp_dev = ws[0][head:].view(torch.int32)
            self.exp_pinned = pinned[0][head:].view(torch.int32)
            ws[0], pinned[0] = ws[0][:head], pinned[0][:head]
            self.int_ws, self.pinned = ws, pinned
            self.copied = torch.cuda.Event()
            self.released = torch.cuda.Event()
        self.expected = None
        self.state = "free"          # free | queued | current | retired
        self.plan_info = None
        self.append_rows = None
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
        ws, _ = slot.provider.workspaces(slot)
        device = ws[0].device if ws else None
        if device is not None and device.type != "cuda":
            device = None
        n_ws = len(ws) if ws else 0
        slot.ring = [_RingEntry(device, slot.key.kind, n_ws) for _ in range(_RING)]
    for _ in range(_RING):
        e = slot.ring[slot.ring_next]
        slot.ring_next = (slot.ring_next + 1) % _RING
        if e.state in ("free", "retired"):
            return e
    raise RuntimeError("seqattn_jax: no free host-plan workspace (internal error)")


def host_plan(slot: PlanSlot, layout: dict[str, np.ndarray], append_rows: int | None,
              expected: np.ndarray, devices: tuple[int, ...] | None = None) -> int:
    """`_host_plan_one` on each of `devices` (None: the slot's own device): every device that
    runs the step adopts its own copy of the plan."""
    slots = [slot] if not devices else [slot.on(d) for d in devices]
    for s in slots:
        if len(s.queue) >= HOST_PLAN_DEPTH:
            raise RuntimeError(
                f"seqattn_jax: {len(s.queue)} host plans of this shape already wait for a step; "
                f"each jitted step adopts one (at most {HOST_PLAN_DEPTH} may wait)")
    seq = 0
    for s in slots:
        with _device_guard(s.device):
            seq = _host_plan_one(s, layout, append_rows, expected)
    return seq


def _host_plan_one(slot: PlanSlot, layout: dict[str, np.ndarray], append_rows: int | None,
                   expected: np.ndarray) -> int:
    """Plan `slot` on the host from `layout` (numpy int32 planning arrays by section name) and
    queue the plan for the next step that adopts this slot. `expected` (int32, at most
    MAX_HOST_PLAN_ENTRIES entries) travels with the plan to the device: the step that adopts the
    plan gets it from `adopt`, so it checks the batch against the plan it really used. Returns
    the plan's sequence number."""
    if slot.key.kind not in _RING_WS_BYTES:
        raise ValueError(f"host plans are made for {tuple(_RING_WS_BYTES)} plans, "
                         f"not {slot.key.kind!r}")
    expected = np.ascontiguousarray(expected, np.int32)
    if expected.size > MAX_HOST_PLAN_ENTRIES:
        raise ValueError(f"a host plan holds at most {MAX_HOST_PLAN_ENTRIES} planned entries, "
                         f"got {expected.size}")
    if len(slot.queue) >= HOST_PLAN_DEPTH:
        raise RuntimeError(
            f"seqattn_jax: {len(slot.queue)} host plans of this shape already wait for a step; "
            f"each jitted step adopts one (at most {HOST_PLAN_DEPTH} may wait)")
    host = {name: np.ascontiguousarray(a, np.int32) for name, a in layout.items()}
    e = _take_entry(slot)
    if e.int_ws is not None:
        side = _side_stream(e.int_ws[0].device)
        if e.state == "retired":
            side.wait_event(e.released)   # GPU-side: the step that used it has finished with it
        e.copied.synchronize()            # host-side: the last copy out of e.pinned is done
        with StreamScope(side):           # FlashInfer's schedule copy goes on the side stream
            e.plan_info = slot.provider.plan(slot, host, e.int_ws, e.pinned)
            n = expected.size
            e.exp_pinned[:n].copy_(torch.from_numpy(expected))
            e.exp_dev[:n].copy_(e.exp_pinned[:n], non_blocking=True)
            e.copied.record(side)
    else:
        e.plan_info = slot.provider.plan(slot, host, None, None)
    slot.host_seq = (slot.host_seq + 1) & 0x7FFFFFFF
    e.seq, e.append_rows, e.state = slot.host_seq, append_rows, "queued"
    e.expected = expected
    slot.queue.append(e)
    return e.seq


def host_plan_static(slot: PlanSlot, layout: dict[str, np.ndarray]) -> tuple[tuple, np.ndarray]:
    """A static plan (FlashInfer's CUDA-graph mode: decode, prefill, batch POD): plan `slot` on
    the host from `layout` and return (static, schedule). `static` is the same for every plan of
    this shape, to be fixed in the step's program: plan_info as a tuple of ints (batch POD:
    (decode plan_info, prefill plan_info, words of the decode schedule)). `schedule` (int32[S],
    the int workspaces' bytes; batch POD: decode's then prefill's) is passed into the step as an
    operand of its runs. Nothing is queued: the step gets everything from its arguments, so XLA
    may capture its runs in a CUDA graph (bridge/ffi.py).

    FlashInfer's plan writes the schedule into pinned host memory and then copies it to a device
    workspace; the copy goes to a scratch workspace nobody reads (on a side stream), and the
    schedule is taken from the pinned buffer right after the plan returns, before any later plan
    can overwrite it (plans of one slot are made on one host thread)."""
    kind = slot.key.kind
    if kind not in ("decode", "prefill", "batch_pod"):
        raise ValueError(f"static host plans are made for decode, prefill and batch POD, not "
                         f"{kind!r}")
    host = {name: np.ascontiguousarray(a, np.int32) for name, a in layout.items()}
    st = slot.state
    n_ws = 2 if kind == "batch_pod" else 1
    if getattr(st, "static_ws", None) is None:
        size, dev = _RING_WS_BYTES[kind], st.float_ws.device
        st.static_ws = [torch.empty(size, dtype=torch.uint8, device=dev) for _ in range(n_ws)]
        st.static_pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=dev.type == "cuda")
                            for _ in range(n_ws)]
        st.static_np = [t.numpy() for t in st.static_pinned]
    side = _side_stream(st.static_ws[0].device) if st.static_ws[0].is_cuda else None
    with StreamScope(side):
        infos = slot.provider.plan(slot, host, st.static_ws, st.static_pinned, cuda_graph=True)
    parts, static = [], []
    for info, pinned in zip(infos[:n_ws], st.static_np):
        info = tuple(int(v) for v in info)
        n = slot.provider.schedule_bytes(slot.key, info)
        n = min(-(-n // 16) * 16, pinned.size)
        parts.append(pinned[:n].view(np.int32).copy())
        static.append(info)
    slot.num_plans += 1
    if kind == "batch_pod":
        return (static[0], static[1], parts[0].size), np.concatenate(parts)
    return static[0], parts[0]


def _adopt_callback(home: PlanSlot):
    def cb(ctx, outs):
        slot = home.on(_device(outs[0]))
        stream = xla_stream(ctx, slot.device)
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
            (slot.plan_info, slot.plan_info_p), slot.int_ws = e.plan_info, e.int_ws
            slot.append_rows, slot.append_rows_index = e.append_rows, None
            _planned(slot)
            as_torch(outs[0]).fill_(e.seq)

    return cb


def adopt(slot: PlanSlot, n_expected: int) -> tuple[jax.Array, jax.Array]:
    """Inside the step: take the oldest host plan of `slot` (no stream sync). Returns the token
    (int32[1], the plan's sequence number) and the plan's `expected` (int32[n_expected]), both
    written on XLA's stream from the plan's ring entry."""
    f = buffer_callback(_adopt_callback(slot),
                        (jax.ShapeDtypeStruct(TOKEN_SHAPE, jnp.int32),
                         jax.ShapeDtypeStruct((n_expected,), jnp.int32)),
                        vmap_method=None)
    return f()


# --------------------------------------------------------------------------------------------
# runs: one buffer_callback per call, on XLA's stream


def _split_kv(kv_t: torch.Tensor):
    # [P, 2, ...] -> strided K and V views of the one pool (no copy)
    return kv_t.select(1, 0), kv_t.select(1, 1)


def _outs(shapes, rp: RunParams):
    """Outputs [x...] then, with LSE, one float32 [rows, heads] per output."""
    outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in shapes]
    if rp.return_lse:
        outs += [jax.ShapeDtypeStruct(x.shape[:2], jnp.float32) for x in shapes]
    return tuple(outs)


def _cached(slot: PlanSlot, name: str, make, *args):
    cb = slot.callbacks.get((name, *args))
    if cb is None:
        cb = slot.callbacks[(name, *args)] = make(slot, *args)
    return cb


def _decode_cb(home: PlanSlot, rp: RunParams):
    run = home.provider.decode

    def cb(ctx, outs, q, kv, indptr, indices, lpl, token):
        slot = home.on(_device(q))
        with StreamScope(xla_stream(ctx, slot.device)):
            k, v = _split_kv(as_torch(kv))
            lse = as_torch(outs[1]) if rp.return_lse else None
            run(slot, as_torch(q), k, v, as_torch(indptr), as_torch(indices), as_torch(lpl),
                as_torch(outs[0]), lse, rp)

    return cb


def decode(slot: PlanSlot, rp: RunParams, token, q, kv, indptr, indices, lpl, pages=None):
    """q[B,Hq,D] against the paged pool -> (out[B,Hq,D],) or (out, lse[B,Hq]). `indices` address
    the whole pool (`pages` is the FFI path's and must be None here)."""
    assert pages is None, "the buffer_callback path takes global page indices"
    f = buffer_callback(_cached(slot, "decode", _decode_cb, rp), _outs([q], rp),
                        vmap_method=None)
    return f(q, kv, indptr, indices, lpl, token)


def _prefill_cb(home: PlanSlot, rp: RunParams):
    run = home.provider.prefill

    def cb(ctx, outs, q, kv, qo_indptr, indptr, indices, lpl, token):
        slot = home.on(_device(q))
        with StreamScope(xla_stream(ctx, slot.device)):
            k, v = _split_kv(as_torch(kv))
            lse = as_torch(outs[1]) if rp.return_lse else None
            run(slot, as_torch(q), k, v, as_torch(qo_indptr), as_torch(indptr),
                as_torch(indices), as_torch(lpl), as_torch(outs[0]), lse, rp)

    return cb


def prefill(slot: PlanSlot, rp: RunParams, token, q, kv, qo_indptr, indptr, indices, lpl,
            pages=None):
    """q[T,Hq,D] (rows by qo_indptr) -> (out,) or (out, lse); rows past qo_indptr[B] unwritten."""
    assert pages is None, "the buffer_callback path takes global page indices"
    f = buffer_callback(_cached(slot, "prefill", _prefill_cb, rp), _outs([q], rp),
                        vmap_method=None)
    return f(q, kv, qo_indptr, indptr, indices, lpl, token)


def _pod_cb(home: PlanSlot, rp: RunParams, causal_p: bool):
    run = home.provider.pod

    def cb(ctx, outs, q_p, k_p, v_p, q_d, kv, indptr, indices, lpl, token):
        slot = home.on(_device(kv))
        with StreamScope(xla_stream(ctx, slot.device)):
            k, v = _split_kv(as_torch(kv))
            lse_p = as_torch(outs[2]) if rp.return_lse else None
            lse_d = as_torch(outs[3]) if rp.return_lse else None
            run(slot, as_torch(q_p), as_torch(k_p), as_torch(v_p), causal_p, as_torch(q_d), k, v,
                as_torch(indptr), as_torch(indices), as_torch(lpl), as_torch(outs[0]),
                as_torch(outs[1]), lse_p, lse_d, rp)

    return cb


def pod(slot: PlanSlot, rp: RunParams, causal_p: bool, token, q_p, k_p, v_p, q_d, kv, indptr,
        indices, lpl):
    """One contiguous-K/V prefill request + a decode batch, one launch -> (o_p, o_d[, lse_p,
    lse_d])."""
    f = buffer_callback(_cached(slot, "pod", _pod_cb, rp, causal_p), _outs([q_p, q_d], rp),
                        vmap_method=None)
    return f(q_p, k_p, v_p, q_d, kv, indptr, indices, lpl, token)


def _batch_pod_cb(home: PlanSlot, rp: RunParams):
    run = home.provider.batch_pod

    def cb(ctx, outs, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d, indices_d,
           lpl_d, kv, token):
        slot = home.on(_device(kv))
        with StreamScope(xla_stream(ctx, slot.device)):
            k, v = _split_kv(as_torch(kv))
            lse_p = as_torch(outs[2]) if rp.return_lse else None
            lse_d = as_torch(outs[3]) if rp.return_lse else None
            run(slot, as_torch(q_p), as_torch(qo_indptr_p), as_torch(indptr_p),
                as_torch(indices_p), as_torch(lpl_p), as_torch(q_d), as_torch(indptr_d),
                as_torch(indices_d), as_torch(lpl_d), k, v, as_torch(outs[0]), as_torch(outs[1]),
                lse_p, lse_d, rp)

    return cb


def batch_pod(slot: PlanSlot, rp: RunParams, token, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p,
              q_d, indptr_d, indices_d, lpl_d, kv):
    """A paged prefill batch + a decode batch, one launch -> (o_p, o_d[, lse_p, lse_d]); prefill
    rows past qo_indptr_p[B] unwritten."""
    f = buffer_callback(_cached(slot, "batch_pod", _batch_pod_cb, rp), _outs([q_p, q_d], rp),
                        vmap_method=None)
    return f(q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d, indices_d, lpl_d, kv,
             token)


def _append_cb(home: PlanSlot):
    run = home.provider.append

    def cb(ctx, outs, kv, keys, values, batch_indices, positions, indptr, indices, lpl, token):
        slot = home.on(_device(kv))
        with StreamScope(xla_stream(ctx, slot.device)):
            k_cache, v_cache = _split_kv(as_torch(outs[0]))   # == the input pool (aliased)
            run(slot, as_torch(keys), as_torch(values), as_torch(batch_indices),
                as_torch(positions), k_cache, v_cache, as_torch(indptr), as_torch(indices),
                as_torch(lpl))

    return cb


def append(slot: PlanSlot, token, kv, keys, values, batch_indices, positions, indptr, indices, lpl,
           pages=None):
    """Write rows `keys/values[T,Hkv,D]` at (batch_indices, positions) of the pool; returns the
    pool (the same buffer when `kv` is donated)."""
    assert pages is None, "the buffer_callback path takes global page indices"
    f = buffer_callback(_cached(slot, "append", _append_cb), (jax.ShapeDtypeStruct(kv.shape,
                        kv.dtype),), input_output_aliases={0: 0}, vmap_method=None)
    (out,) = f(kv, keys, values, batch_indices, positions, indptr, indices, lpl, token)
    return out
