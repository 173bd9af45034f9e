"""Issue 11's silent wrong answers, each now a clear error (or a correct answer), and the allocator's
one error surface (`Status` codes, `sj.ok`, `sj.raise_for_status`, checked mode).

Each test here failed before its fix: the mismatched configs wrote nothing and read NaN, the plan
head counts were accepted, int32 / float64 keys were cast, `init_kv(None)` raised AttributeError,
and a refused call returned `ok = [True, True, False]`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqattn_jax as sj
from seqattn_jax import attention, checked
from seqattn_jax.validation import Status


def ids(*x):
    return jnp.array(x, jnp.int32)


def _cfg(**kw):
    base = dict(num_pages=16, page_size=4, num_kv_heads=2, head_dim=8, max_seqs=4,
                max_pages_per_seq=8, dtype="float32")
    return sj.CacheConfig(**{**base, **kw})


def _decode_batch(cfg, lens=(9, 3)):
    state, status = sj.allocate(sj.init_state(cfg), ids(*range(len(lens))), ids(*lens))
    assert bool(sj.ok(status))
    return state, sj.pack_for_flashinfer(state, ids(*range(len(lens))))


# ----------------------------------------------------------------------------- mismatched configs


def test_state_and_pool_from_different_configs_raise():
    """A state of 64 pages and a pool of 16: pages >= 16 were dropped by append_kv's scatter (nothing
    written) and batch_decode read NaN; now every op that meets both raises at trace time."""
    big, small = _cfg(num_pages=64), _cfg(num_pages=16)
    state, _ = sj.allocate(sj.init_state(big), ids(0, 1, 2), ids(32, 32, 5))  # slot 2: pages 16, 17
    packed = sj.pack_for_flashinfer(state, ids(2))
    assert int(packed.token_pages[0]) == 17  # outside the small pool: the write used to be dropped
    kv = sj.init_kv(small)
    k = jnp.ones((1, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"different CacheConfig.*num_pages: 64 vs 16"):
        sj.append_kv(small, kv, k, k, packed)
    with pytest.raises(ValueError, match=r"different CacheConfig"):  # used to read NaN
        sj.batch_decode(small, jnp.ones((1, 4, 8), jnp.float32), kv, packed, backend="reference")
    with pytest.raises(ValueError, match=r"different CacheConfig.*page_size: 8 vs 4"):
        sj.batch_prefill(small, jnp.ones((2, 4, 8), jnp.float32), kv, sj.pack_for_flashinfer(
            sj.allocate(sj.init_state(_cfg(page_size=8)), ids(0, 1), ids(1, 1))[0], ids(0, 1), ids(1, 1),
            max_tokens=2), backend="reference")


def test_configs_that_address_the_same_pages_may_differ_elsewhere():
    """A draft and a target model can share one allocator: heads, layers and dtype may differ."""
    alloc_cfg = _cfg()
    pool_cfg = _cfg(num_kv_heads=1, head_dim=4, num_layers=3)
    state, packed = _decode_batch(alloc_cfg)
    kv = sj.append_kv(pool_cfg, sj.init_kv(pool_cfg), jnp.ones((2, 1, 4)), jnp.ones((2, 1, 4)), packed,
                      layer=2)
    assert float(jnp.sum(kv)) == 2 * 2 * 4  # both rows written, K and V


# ----------------------------------------------------------------------------- plans vs queries


def test_plan_head_count_must_match_the_query():
    cfg = _cfg()
    state, packed = _decode_batch(cfg)
    kv = jax.random.normal(jax.random.key(0), cfg.kv_shape)
    plan = sj.plan_decode(cfg, packed, 4, backend="reference")
    q8 = jnp.ones((2, 8, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"q.shape=\(2, 8, 8\) differs from the plan's"):
        sj.batch_decode(cfg, q8, kv, packed, plan=plan)
    sj.batch_decode(cfg, jnp.ones((2, 4, 8), jnp.float32), kv, packed, plan=plan)  # the planned count runs
    with pytest.raises(ValueError, match=r"num_qo_heads must be a positive multiple of config.num_kv_heads = 2"):
        sj.plan_decode(cfg, packed, 3, backend="reference")
    prefill = sj.pack_for_flashinfer(state, ids(0, 1), ids(2, 1), max_tokens=4)
    plan = sj.plan_prefill(cfg, prefill, 2, backend="reference")
    with pytest.raises(ValueError, match=r"q.shape=\(4, 4, 8\) differs from the plan's"):
        sj.batch_prefill(cfg, jnp.ones((4, 4, 8), jnp.float32), kv, prefill, plan=plan)
    with pytest.raises(ValueError, match="num_qo_heads must be a positive multiple"):
        sj.host_plan_decode(cfg, np.array([9, 3], np.int32), 5, backend="reference")


def test_config_says_what_flashinfer_runs():
    """head_dim 7 or 1000 and page_size 3 are valid caches (the reference runs them); the config
    names what rules FlashInfer out, and plan-time selection agrees."""
    assert "head_dim in (64, 128, 256)" in _cfg(head_dim=7, dtype="float16").flashinfer_unsupported_reason()
    assert "head_dim=1000" in _cfg(head_dim=1000, dtype="float16").flashinfer_unsupported_reason()
    assert "dtype='float32'" in _cfg(head_dim=128).flashinfer_unsupported_reason()
    assert _cfg(head_dim=128, page_size=3, dtype="bfloat16").flashinfer_unsupported_reason() is None
    pytest.importorskip("torch", reason="the FlashInfer backend's own check needs the bridge (torch)")
    from seqattn_jax import bridge
    cfg = _cfg(head_dim=7, dtype="float16")
    why = bridge.FlashInferBackend(provider="torch").unsupported(cfg, jnp.float16, 4, "decode",
                                                                 sj.AttentionOptions())
    assert why is not None and "head_dim" in why


# ----------------------------------------------------------------------------- pool writes


@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.float16])
def test_append_kv_refuses_rows_of_another_dtype(dtype):
    """int32 or float64 keys (numpy arrays keep their dtype) were cast into the pool silently."""
    cfg = _cfg()
    _, packed = _decode_batch(cfg)
    k = np.ones((2, 2, 8), dtype)
    with pytest.raises(ValueError, match=r"keys must have the pool dtype float32, got " + np.dtype(dtype).name):
        sj.append_kv(cfg, sj.init_kv(cfg), k, k, packed)


def test_fp8_pool_takes_half_precision_rows():
    cfg = _cfg(dtype="float8_e4m3fn")
    _, packed = _decode_batch(cfg)
    k = jnp.full((2, 2, 8), 0.5, jnp.bfloat16)
    kv = sj.append_kv(cfg, sj.init_kv(cfg), k, k, packed)
    assert float(jnp.sum(kv.astype(jnp.float32))) == 0.5 * 2 * 2 * 2 * 8
    with pytest.raises(ValueError, match="pool dtype float8_e4m3fn or one of"):
        sj.append_kv(cfg, sj.init_kv(cfg), k.astype(jnp.int32), k.astype(jnp.int32), packed)


def test_init_kv_and_init_state_reject_a_non_config_alike():
    for fn in (sj.init_kv, sj.init_state):
        with pytest.raises(ValueError, match=r"config must be a seqattn_jax.CacheConfig, got NoneType"):
            fn(None)


# ----------------------------------------------------------------------------- the error surface


def test_a_refused_call_is_unmistakable_and_names_each_failure():
    cfg = _cfg(num_pages=4, max_pages_per_seq=4)
    state, status = sj.allocate(sj.init_state(cfg), ids(0, 1), ids(4, 4))
    assert bool(sj.ok(status)) and status.dtype == jnp.int32
    after, status = sj.allocate(state, ids(2, 3, 0), ids(4, 4, 1))  # 3 pages needed, 2 free: the 3rd fails
    assert not bool(sj.ok(status))                                  # the call as a whole
    assert after is not state and jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), after, state))
    # Requests 0 and 1 read OK (not "succeeded": nothing was applied), request 2 names the reason.
    np.testing.assert_array_equal(status, [Status.OK, Status.OK, Status.OUT_OF_PAGES])
    with pytest.raises(sj.AllocatorError, match=r"1 of 3 requests failed, nothing was applied") as e:
        sj.raise_for_status("allocate", status, ids(2, 3, 0))
    assert e.value.failures == [(2, 0, Status.OUT_OF_PAGES)]
    assert isinstance(e.value, ValueError)
    sj.raise_for_status("allocate", jnp.zeros((3,), jnp.int32))  # all OK: no error
    with pytest.raises(sj.AllocatorError, match="OUT_OF_PAGES"):
        checked.allocate(state, ids(2, 3, 0), ids(4, 4, 1))


def test_ok_and_raise_for_status_inside_and_outside_jit():
    cfg = _cfg()

    @jax.jit
    def step(state, seq_ids):
        state, status = sj.allocate_decoding(state, seq_ids)
        return state, status, sj.ok(status)

    state, status, ok = step(sj.init_state(cfg), ids(0))
    assert not bool(ok) and int(status[0]) == Status.INACTIVE

    @jax.jit
    def bad(state, seq_ids):
        _, status = sj.allocate_decoding(state, seq_ids)
        sj.raise_for_status("allocate_decoding", status, seq_ids)

    with pytest.raises(ValueError, match="status is traced; call it outside jax.jit"):
        bad(sj.init_state(cfg), ids(0))


def test_no_status_twins_remain():
    """One error surface: the ops return Status codes; the `*_status` twins are gone."""
    from seqattn_jax import state as st

    assert not [n for n in dir(st) if n.endswith("_status")]
