"""Host plans on the reference backend (no torch needed): the host's view of a decode batch
(`decode_layout_from_lens`) against `pack_for_flashinfer`, and `adopt_plan`'s device-side check.
The FlashInfer side (ring of workspaces, FIFO, no-sync adopt) is in test_bridge_cpu.py (torch
kernels) and test_flashinfer_gpu.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import checkify

import seqattn_jax as sj
from seqattn_jax import attention, checked, host_layout, reference

CFG = sj.CacheConfig(num_pages=96, page_size=4, num_kv_heads=2, head_dim=16, max_seqs=6,
                     max_pages_per_seq=12, num_layers=1, dtype="float32")


# Jitted once at module level with fixed shapes (allocate: all max_seqs slots, unused ones padding;
# pack: one compile per batch size 1..6), so each example runs compiled code instead of retracing.
_allocate = jax.jit(sj.allocate)
_pack = jax.jit(sj.pack_for_flashinfer)


@settings(max_examples=20, deadline=None)  # 20 batches of 1-6 random lengths
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_layout_from_lens_is_what_pack_gives(lens, rnd):
    """Allocate sequences of `lens` (0: a padding row), then decode-pack them in a random order:
    the host's indptr / last_page_len from the lengths equal the packed batch's."""
    padded = lens + [0] * (CFG.max_seqs - len(lens))
    ids = np.asarray([i if n > 0 else -1 for i, n in enumerate(padded)], np.int32)
    state, status = _allocate(sj.init_state(CFG), jnp.asarray(ids), jnp.asarray(padded, jnp.int32))
    assert bool(sj.ok(status).all())
    order = list(range(len(lens)))
    rnd.shuffle(order)
    seq_ids = np.asarray([i if lens[i] > 0 else -1 for i in order], np.int32)
    host_lens = np.asarray([lens[i] for i in order])
    packed = _pack(state, jnp.asarray(seq_ids))
    indptr, lpl = host_layout.decode_layout_from_lens(CFG, host_lens)
    np.testing.assert_array_equal(indptr, np.asarray(packed.kv_page_indptr))
    np.testing.assert_array_equal(lpl, np.asarray(packed.kv_last_page_len))
    np.testing.assert_array_equal(np.asarray(packed.seq_lens), host_lens)


def _step(hp, state, kv, q, seq_ids):
    state, status = sj.allocate_decoding(state, seq_ids)
    ok = sj.ok(status)
    packed = sj.pack_for_flashinfer(state, seq_ids)
    plan = attention.adopt_plan(hp, packed)
    out = attention.batch_decode(CFG, q, kv, packed, plan=plan)
    return state, out, reference.batch_decode(CFG, q, kv, packed), plan


def test_reference_backend_adopts_host_plans_and_checks_them():
    state = sj.init_state(CFG)
    state, _ = sj.allocate(state, jnp.arange(3, dtype=jnp.int32), jnp.asarray([5, 9, 2], jnp.int32))
    kv = jax.random.normal(jax.random.PRNGKey(0), CFG.kv_shape)
    q = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 16))
    seq_ids = jnp.asarray([0, 1, -1, 2], jnp.int32)
    step = jax.jit(lambda hp, *a: (lambda s, o, r, p: (s, o, r, p.ok))(*_step(hp, *a)))
    hp = attention.host_plan_decode(CFG, [6, 10, 0, 3], 4, backend="reference")
    assert hp.meta.backend.name == "reference" and hp.batch_size == 4
    _, out, ref, ok = step(hp, state, kv, q, seq_ids)
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref))
    bad = attention.host_plan_decode(CFG, [6, 10, 1, 3], 4, backend="reference")
    assert not bool(step(bad, state, kv, q, seq_ids)[3])
    assert step._cache_size() == 1, "a new host plan retraced the step"


def test_checked_mode_raises_on_a_mismatched_host_plan():
    state = sj.init_state(CFG)
    state, _ = sj.allocate(state, jnp.arange(2, dtype=jnp.int32), jnp.asarray([5, 9], jnp.int32))
    kv = jnp.zeros(CFG.kv_shape)
    q = jnp.zeros((2, 4, 16))
    seq_ids = jnp.arange(2, dtype=jnp.int32)

    def body(hp, state):
        _, out, _, plan = _step(hp, state, kv, q, seq_ids)
        checked.check_plan(plan)
        return out

    f = jax.jit(checkify.checkify(body))
    err, _ = f(attention.host_plan_decode(CFG, [6, 10], 4, backend="reference"), state)
    err.throw()
    err, _ = f(attention.host_plan_decode(CFG, [6, 11], 4, backend="reference"), state)
    with pytest.raises(checkify.JaxRuntimeError, match="host plan does not match"):
        err.throw()
