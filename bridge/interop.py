"""JAX <-> torch plumbing: zero-copy DLPack views, stream ordering, and a generic
`buffer_callback` builder that runs torch code on XLA's buffers inside `jax.jit`.

Inside jit (`torch_callback`):
  * every XLA buffer reaches torch through DLPack with no copy (`torch.from_dlpack(Buffer)` gives a
    tensor on the same memory); the views live only during the callback;
  * on GPU all torch work is enqueued on XLA's compute stream (`ctx.stream`, wrapped once per stream
    pointer in a cached `torch.cuda.ExternalStream` and made torch's current stream for the
    callback), so it is ordered with the XLA ops around it without any host synchronisation;
  * outputs are written in place; `input_output_aliases` makes an output share an input's buffer
    (donate that argument in `jax.jit`, or XLA copies it first).

Outside jit (`jax_to_torch`, `torch_to_jax`): zero-copy where DLPack allows, with the consumer's
stream made to wait on the producer (JAX's DLPack export / import does the waiting).

Never JAX's host callbacks (pure / io) for device data: they copy every operand to the host.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import jax
import torch
from jax.experimental.buffer_callback import buffer_callback

__all__ = [
    "jax_to_torch",
    "torch_to_jax",
    "xla_stream",
    "as_torch",
    "torch_callback",
    "StreamScope",
]

_stream_lock = threading.Lock()
_streams: dict[tuple[int, int], "torch.cuda.ExternalStream"] = {}


def xla_stream(ctx, device_index: int | None = None):
    """torch ExternalStream wrapping XLA's stream of this callback (GPU), or None on CPU.

    Streams are cached by (device, pointer): XLA reuses its compute stream for the life of the
    client, so this costs one dict lookup per callback after the first.
    """
    try:
        ptr = ctx.stream
    except Exception:  # CPU: "XLA FFI GPU context is not available"
        return None
    if device_index is None:
        device_index = torch.cuda.current_device()
    key = (device_index, int(ptr))
    s = _streams.get(key)
    if s is None:
        with _stream_lock:
            s = _streams.get(key)
            if s is None:
                s = torch.cuda.ExternalStream(int(ptr), device=torch.device("cuda", device_index))
                _streams[key] = s
    return s


class StreamScope:
    """Make `stream` torch's current stream (no-op for None); restores the previous one.

    Cheaper than `torch.cuda.stream(...)` (no device guard juggling): callbacks run on the thread
    that enqueues XLA's work for one device.
    """

    __slots__ = ("stream", "prev", "prev_device")

    def __init__(self, stream):
        self.stream = stream
        self.prev = None
        self.prev_device = None

    def __enter__(self):
        if self.stream is not None:
            # several GPUs (tensor parallel): each device's callbacks run on that device's thread;
            # make the stream's device torch's current one there, so torch and FlashInfer launch
            # on it (a no-op on one GPU)
            dev, cur = self.stream.device_index, torch.cuda.current_device()
            if dev != cur:
                self.prev_device = cur
                torch.cuda.set_device(dev)
            self.prev = torch.cuda.current_stream(self.stream.device)
            torch.cuda.set_stream(self.stream)
        return self.stream

    def __exit__(self, *exc):
        if self.stream is not None:
            torch.cuda.set_stream(self.prev)
            if self.prev_device is not None:
                torch.cuda.set_device(self.prev_device)
                self.prev_device = None
        return False


def as_torch(buf) -> torch.Tensor:
    """Zero-copy torch view of a buffer_callback `Buffer` (valid during the callback only)."""
    return torch.from_dlpack(buf)


def jax_to_torch(x: jax.Array) -> torch.Tensor:
    """Zero-copy torch view of a JAX array (outside jit).

    torch's current stream waits for the array to be ready (DLPack `stream=` protocol). Do not
    write through the view: the JAX array is immutable (jax >= 0.12 exports read-only capsules
    that torch ignores). Do not donate `x` while the view is alive: donation then silently copies.
    """
    return torch.from_dlpack(x)


def torch_to_jax(t: torch.Tensor) -> jax.Array:
    """JAX array on the same memory as `t` (outside jit); XLA's stream waits on torch's current
    stream. Non-compact tensors are made contiguous first (one copy)."""
    if not t.is_contiguous():
        t = t.contiguous()
    return jax.dlpack.from_dlpack(t)


def torch_callback(
    fn: Callable[..., None],
    result_shape_dtypes: Any,
    *,
    input_output_aliases: dict[int, int] | None = None,
    has_side_effect: bool = False,
    command_buffer_compatible: bool = False,
):
    """Build a jit-compatible op that runs `fn(outs, *args)` on torch views of XLA's buffers.

    `fn` receives the outputs (same pytree as `result_shape_dtypes`, leaves torch tensors to fill
    in place) and the inputs (torch tensors, pytree structure kept). On GPU it runs with XLA's
    stream as torch's current stream. `input_output_aliases` maps flat input index -> flat output
    index (the output then *is* the input buffer: donate it).
    """

    def _cb(ctx, outs, *args):
        stream = xla_stream(ctx)
        with StreamScope(stream):
            t_outs = jax.tree_util.tree_map(as_torch, outs)
            t_args = jax.tree_util.tree_map(as_torch, args)
            fn(t_outs, *t_args)

    return buffer_callback(
        _cb,
        result_shape_dtypes,
        input_output_aliases=input_output_aliases,
        has_side_effect=has_side_effect,
        vmap_method=None,
        command_buffer_compatible=command_buffer_compatible,
    )

