"""Checked mode: the allocator ops (and packing) that raise instead of returning `Status` codes.

Every op here runs the op of the same name from `seqattn_jax.state` (jitted, cached per op) and,
when any request failed, raises `seqattn_jax.AllocatorError` (a `ValueError`) through
`validation.raise_for_status`: the message names the op and, for each failing request, its index, its
id and the reason. The state is then unchanged, as always. For host-side schedulers and tests that
prefer errors to codes:

    state = checked.allocate(state, seq_ids, new_lens)    # raises on failure, returns the state

Inside your own jitted function, call `check_status(op_name, status, ids)` on an op's status and
wrap the function with `jax.experimental.checkify.checkify` (see JAX's checkify documentation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from seqattn_jax import packing, state as st
from seqattn_jax.validation import STATUS_MESSAGES, AllocatorError, raise_for_status


def check_status(op: str, status: jax.Array, ids: jax.Array) -> None:
    """In-jit form: `checkify.check` that every entry of `status` is OK, naming the first failing
    request (its index, id and reason). Wrap the caller with `checkify.checkify`."""
    for code, reason in STATUS_MESSAGES.items():
        bad = status == code
        i = jnp.argmax(bad)
        checkify.check(~jnp.any(bad), f"{op}: {reason} ({code.name}) at request {{i}} (id {{id}})",
                       i=i, id=ids[i])


def _checked(op_name: str, op, ids_arg: int):
    jitted = jax.jit(op)

    @functools.wraps(op)
    def run(*args):
        out = jitted(*args)
        raise_for_status(op_name, out[1], args[ids_arg])
        return out[0] if len(out) == 2 else (out[0], *out[2:])

    run.__doc__ = (f"Checked `seqattn_jax.{op_name}`: the same arguments; returns the new state"
                   + (" and copies" if op_name in ("truncate", "fork") else "")
                   + "; raises AllocatorError naming every failing request.")
    return run


allocate = _checked("allocate", st.allocate, 1)
allocate_decoding = _checked("allocate_decoding", st.allocate_decoding, 1)
release = _checked("release", st.release, 1)
truncate = _checked("truncate", st.truncate, 1)
fork = _checked("fork", st.fork, 2)
share_prefix = _checked("share_prefix", st.share_prefix, 1)
ref = _checked("ref", st.ref, 1)
unref = _checked("unref", st.unref, 1)


# new_lens / kv_lens of None and of an array are different pytrees, so jit keys on them itself.
_pack_jit = jax.jit(packing.pack_for_flashinfer, static_argnames=("max_tokens",))


def pack_for_flashinfer(state: st.CacheState, seq_ids, new_lens=None, *, max_tokens=None, kv_lens=None):
    """Checked `pack_for_flashinfer`: the same arguments; raises AllocatorError if any request could
    not be packed (an id that is not an active slot or repeats, `new_lens` / `kv_lens` out of range,
    more tokens than `max_tokens` rows)."""
    packed = _pack_jit(state, seq_ids, new_lens, max_tokens=max_tokens, kv_lens=kv_lens)
    raise_for_status("pack_for_flashinfer", packed.status, seq_ids)
    return packed


def check_plan(plan) -> None:
    """`checkify.check` that an adopted host plan (`attention.adopt_plan`) matched the step's
    packed batch; call inside a jitted step wrapped with `checkify.checkify`."""
    checkify.check(plan.ok, "adopt_plan: the host plan does not match the step's packed batch "
                   "(its seq_lens differ from the batch's lengths, or the step adopted a plan made "
                   "for another step)")


__all__ = ["AllocatorError", "allocate", "allocate_decoding", "check_plan", "check_status", "fork",
           "pack_for_flashinfer", "ref", "release", "share_prefix", "truncate", "unref"]
