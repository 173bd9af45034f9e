"""Checked mode: the allocator ops that raise instead of returning `ok` flags.

Every op here runs its `*_status` twin from `seqattn_jax.state` under `jax.experimental.checkify`,
jitted, and raises `checkify.JaxRuntimeError` naming the op, the reason, the request index and the
offending id when any request fails (the state is then unchanged, as always). Use it in host-side
schedulers and tests that prefer errors to flags:

    state = checked.allocate(state, seq_ids, new_lens)    # raises on failure, returns the state

Inside your own jitted function, call `check_status(op_name, status, ids)` on a `*_status` result and
wrap the function with `checkify.checkify` (see JAX's checkify documentation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from seqattn_jax import packing, state as st
from seqattn_jax.state import STATUS_MESSAGES, Status


def check_status(op: str, status: jax.Array, ids: jax.Array) -> None:
    """`checkify.check` that every entry of `status` is OK, naming the first failing request."""
    for code, reason in STATUS_MESSAGES.items():
        bad = status == code
        i = jnp.argmax(bad)
        checkify.check(~jnp.any(bad), f"{op}: {reason} ({code.name}) at request {{i}} (id {{id}})",
                       i=i, id=ids[i])


def _checked(op_name: str, status_fn, ids_arg: int, num_outputs: int):
    def body(*args):
        out = status_fn(*args)
        check_status(op_name, out[1], jnp.asarray(args[ids_arg], jnp.int32))
        return out[0] if num_outputs == 1 else (out[0], *out[2:])

    jitted = jax.jit(checkify.checkify(body))

    @functools.wraps(status_fn)
    def run(*args):
        err, out = jitted(*args)
        err.throw()
        return out

    run.__doc__ = (f"Checked `seqattn_jax.state.{op_name}`: returns the new state"
                   + (" and copies" if num_outputs > 1 else "")
                   + "; raises checkify.JaxRuntimeError naming the failing request.")
    return run


allocate = _checked("allocate", st.allocate_status, 1, 1)
allocate_decoding = _checked("allocate_decoding", st.allocate_decoding_status, 1, 1)
release = _checked("release", st.release_status, 1, 1)
truncate = _checked("truncate", st.truncate_status, 1, 2)
fork = _checked("fork", st.fork_status, 2, 2)
share_prefix = _checked("share_prefix", st.share_prefix_status, 1, 1)
ref = _checked("ref", st.ref_status, 1, 1)
unref = _checked("unref", st.unref_status, 1, 1)


def _pack_body(state, seq_ids, new_lens, max_tokens):
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    cfg = state.config
    in_range = (seq_ids >= 0) & (seq_ids < cfg.max_seqs)
    slot = jnp.where(in_range, seq_ids, cfg.max_seqs)
    active = state.active.at[slot].get(mode="fill", fill_value=False)
    lens = state.seq_lens.at[slot].get(mode="fill", fill_value=0)
    i = jnp.argmax((seq_ids >= 0) & ~active)
    checkify.check(jnp.all((seq_ids < 0) | active),
                   "pack_for_flashinfer: request {i} (id {id}) is not an active slot",
                   i=i, id=seq_ids[i])
    if new_lens is not None:
        new_lens = jnp.asarray(new_lens, jnp.int32)
        i = jnp.argmax((seq_ids >= 0) & ((new_lens < 0) | (new_lens > lens)))
        checkify.check(jnp.all((seq_ids < 0) | ((new_lens >= 0) & (new_lens <= lens))),
                       "pack_for_flashinfer: new_lens[{i}] = {n} is not in [0, seq_len = {l}] "
                       "(allocate the tokens first)", i=i, n=new_lens[i], l=lens[i])
        total = jnp.sum(jnp.where(seq_ids >= 0, new_lens, 0))
        checkify.check(total <= (max_tokens or seq_ids.shape[0]),
                       "pack_for_flashinfer: sum(new_lens) = {t} exceeds max_tokens", t=total)
    return packing.pack_for_flashinfer(state, seq_ids, new_lens, max_tokens=max_tokens)


@functools.lru_cache(maxsize=None)
def _checked_pack(max_tokens, decode: bool):
    del decode  # part of the cache key: None and an array trace differently
    return jax.jit(checkify.checkify(functools.partial(_pack_body, max_tokens=max_tokens)))


def pack_for_flashinfer(state: st.CacheState, seq_ids, new_lens=None, *, max_tokens=None):
    """Checked `pack_for_flashinfer`: raises if a valid id names an inactive slot, if
    `new_lens[i]` is outside `[0, seq_len]`, or if the tokens do not fit `max_tokens` rows."""
    err, out = _checked_pack(max_tokens, new_lens is None)(state, seq_ids, new_lens)
    err.throw()
    return out


def check_plan(plan) -> None:
    """`checkify.check` that an adopted host plan (`attention.adopt_plan`) matched the step's
    packed batch; call inside a jitted step wrapped with `checkify.checkify`."""
    checkify.check(plan.ok, "adopt_plan: the host plan does not match the step's packed batch "
                   "(its seq_lens differ from the batch's lengths, or the step adopted a plan made "
                   "for another step)")


__all__ = ["Status", "allocate", "allocate_decoding", "check_plan", "check_status", "fork",
           "pack_for_flashinfer", "ref", "release", "share_prefix", "truncate", "unref"]
