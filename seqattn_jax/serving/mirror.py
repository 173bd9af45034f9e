"""The allocator state mirrored on the host CPU, so the prefix cache never reads the GPU.

The prefix cache decides on the host from the allocator's state: which cached pages only it holds
(refcount 1: evictable), which pages a prefilled prompt got (to index them), whether an admission
or a release went through. Read from the GPU, each of those reads waits for every step in flight:
the pipeline drains and the GPU idles while the host schedules (issue 10: 162 such reads in the
README's GPU workload).

The allocator is pure integer arithmetic in jitted functions (seqattn_jax/state.py), so the same
functions run on the CPU give the same state, bit for bit. The engine keeps a second `CacheState`
on the CPU device and applies every change to both: the prefix cache runs on the CPU copy (its
reads cost microseconds and wait for nothing on the GPU) and records each change it makes
(`RecordingPrefixCache`), which the engine then replays on the GPU copy without reading anything
back; the steps' decode allocations (`allocate_decoding`, inside the jitted step on the GPU) are
applied to the CPU copy by `mirror_decode`, with the same sub-step masking as the step. The two
copies are compared when the engine goes idle (`Engine.check_idle`).

    host = to_host(init_state(cache))             # the CPU copy
    pc = RecordingPrefixCache(cache)
    adm = pc.admit_batch(host, slots, prompts)    # runs on the CPU, reads the CPU copy
    host = adm.state
    device_state = pc.replay(device_state)        # the same changes on the GPU, nothing read
    host = mirror_decode(host, d_ids, d_n, steps) # after dispatching a decode / mixed step
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqattn_jax.prefix_cache import PrefixCache
from seqattn_jax.state import CacheState, allocate_decoding

__all__ = ["RecordingPrefixCache", "decode_sub_step_ids", "host_device", "mirror_decode",
           "mirror_differences", "to_host"]


def host_device():
    """JAX's CPU device, or None where the CPU backend is off (e.g. `JAX_PLATFORMS=cuda`)."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def to_host(state: CacheState) -> CacheState:
    """A copy of `state` on the CPU device (the mirror). Where JAX has no CPU backend the copy
    stays on the state's device: still exact, but then its reads wait for the steps in flight."""
    dev = host_device()
    if dev is None:
        return jax.tree_util.tree_map(jnp.copy, state)
    return jax.device_put(state, dev)


def decode_sub_step_ids(d_ids, d_n, j: int, steps: int):
    """The slots that decode in sub-step j of a decode step of `steps` sub-steps: row b runs the
    first d_n[b] sub-steps (multi-step decode); with one sub-step every row of `d_ids` does. The
    step (serving/step.py) and the mirror use this one definition."""
    return d_ids if steps == 1 else jnp.where(j < d_n, d_ids, -1)


@functools.partial(jax.jit, static_argnums=(3,))
def _mirror_decode(state, d_ids, d_n, steps: int):
    for j in range(steps):
        state, _ = allocate_decoding(state, decode_sub_step_ids(d_ids, d_n, j, steps))
    return state


def mirror_decode(state: CacheState, d_ids: np.ndarray, d_n: np.ndarray | None,
                  steps: int) -> CacheState:
    """The decode allocations of one dispatched decode / mixed step applied to the CPU copy:
    `d_ids` int32 [B] (the step's decode slots, -1 padding), `d_n` int32 [B] sub-steps per row
    (None: one step)."""
    if d_n is None:
        d_n = np.ones_like(d_ids)
    return _mirror_decode(state, d_ids, d_n, steps)


class RecordingPrefixCache(PrefixCache):
    """A `PrefixCache` that records every change it makes to the state it is given (the CPU
    copy), for `replay` on the GPU copy. Scrubbing (`scrub_on_free`) writes the KV pool, which
    lives on the GPU only: not supported here."""

    def __init__(self, config):
        super().__init__(config)
        self._log: list = []

    def _op(self, fn, state, *args):
        out = fn(state, *args)
        self._log.append((fn, args))
        return out

    def replay(self, state: CacheState) -> CacheState:
        """Apply the recorded changes, in order, to `state` (the GPU copy); nothing is read back.
        The functions are the ones that ran on the CPU copy, with the same arguments, so the two
        copies stay equal (an op refused on the CPU copy is refused identically here)."""
        log, self._log = self._log, []
        for fn, args in log:
            state = fn(state, *args)[0]
        return state


def mirror_differences(device: CacheState, host: CacheState) -> list[str]:
    """The fields in which the GPU state and its CPU copy differ (empty: equal). Reads both."""
    out = []
    for name in ("refcount", "page_table", "seq_lens", "active", "num_free"):
        if not np.array_equal(np.asarray(getattr(device, name)), np.asarray(getattr(host, name))):
            out.append(name)
    n = int(np.asarray(host.num_free))
    if not np.array_equal(np.asarray(device.free_pages)[:n], np.asarray(host.free_pages)[:n]):
        out.append("free_pages")
    return out
