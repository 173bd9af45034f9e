"""Bridge mechanics on a CPU: buffer_callback + DLPack zero-copy, in-place aliasing with donation,
plan tokens shared by layers, padding, host plans, errors and backend selection.

FlashInfer needs a GPU, so the plan/run callbacks here drive the bridge's small torch kernels
(`FlashInferBackend(provider="torch")`) through exactly the code path the FlashInfer backend uses
(`seqattn_jax.attention` -> `bridge.backend` -> `bridge.ops` -> buffer_callback). Skipped when
torch is missing.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the bridge's CPU-mechanics tests need torch (CPU build: pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu; .ci/run installs it)")

import seqattn_jax as sj  # noqa: E402
from seqattn_jax import attention, bridge, reference  # noqa: E402
from seqattn_jax import backend as backend_mod  # noqa: E402
from seqattn_jax.bridge import ffi, fi_provider, interop, ops  # noqa: E402
from seqattn_jax.bridge.backend import decode_kernel_for  # noqa: E402
from seqattn_jax.config import CacheConfig  # noqa: E402
from seqattn_jax.kv import scatter_kv as scatter_append  # noqa: E402
from seqattn_jax.options import AttentionOptions  # noqa: E402
from seqattn_jax.packing import PackedBatch  # noqa: E402


def _allocate(*args):
    """`sj.allocate` with a per-request bool instead of Status codes."""
    state, status = sj.allocate(*args)
    return state, status == sj.Status.OK


def _allocate_decoding(*args):
    state, status = sj.allocate_decoding(*args)
    return state, status == sj.Status.OK

ROOT = Path(__file__).resolve().parent.parent
O = AttentionOptions


# ----------------------------------------------------------------------------------------------
# helpers


def make_config(layout="NHD", dtype="float16", num_layers=3, hkv=2, head_dim=64, page_size=4):
    return CacheConfig(num_pages=48, page_size=page_size, num_kv_heads=hkv, head_dim=head_dim,
                       max_seqs=8, max_pages_per_seq=8, num_layers=num_layers, dtype=dtype,
                       kv_layout=layout)


def make_packed(rng, cfg, kv_lens, q_lens=None, num_rows=None):
    """Requests of `kv_lens` tokens (0 = padding request), pages in random order from 1..P-1."""
    ps, b = cfg.page_size, len(kv_lens)
    perm = 1 + rng.permutation(cfg.num_pages - 1)
    page_lists, cur = [], 0
    for n in kv_lens:
        k = -(-n // ps)
        page_lists.append(perm[cur:cur + k])
        cur += k
    counts = [len(p) for p in page_lists]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = np.zeros(b * cfg.max_pages_per_seq, np.int32)
    if indptr[-1]:
        indices[: indptr[-1]] = np.concatenate(page_lists)
    last = np.array([n - (c - 1) * ps if c else 0 for n, c in zip(kv_lens, counts)], np.int32)
    if q_lens is None:
        q_lens = [1 if n else 0 for n in kv_lens]
        num_rows = b
    qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(qo[-1]) if num_rows is None else num_rows
    bi, pos, tp, to = (np.full(t, -1, np.int32) for _ in range(4))
    for r in range(b):
        for i, row in enumerate(range(qo[r], qo[r + 1])):
            p = kv_lens[r] - q_lens[r] + i
            bi[row], pos[row], tp[row], to[row] = r, p, page_lists[r][p // ps], p % ps
    packed = PackedBatch(
        seq_ids=jnp.asarray([r if n else -1 for r, n in enumerate(kv_lens)], jnp.int32),
        kv_page_indptr=jnp.asarray(indptr), kv_page_indices=jnp.asarray(indices),
        kv_last_page_len=jnp.asarray(last), seq_lens=jnp.asarray(kv_lens, jnp.int32),
        qo_indptr=jnp.asarray(qo), batch_indices=jnp.asarray(bi), positions=jnp.asarray(pos),
        token_pages=jnp.asarray(tp), token_offsets=jnp.asarray(to))
    return packed, page_lists


def make_pool(rng, cfg, page_lists, kv_lens):
    """Random pool with NaN in every free page and past each request's length, in every layer."""
    pool = rng.standard_normal(cfg.kv_shape).astype(np.float32)
    used = np.zeros(cfg.num_pages, bool)
    for p in page_lists:
        used[p] = True
    for layer in range(cfg.num_layers):
        base = layer * cfg.num_pages
        pool[base + np.flatnonzero(~used)] = np.nan
        for pages, n in zip(page_lists, kv_lens):
            if n:
                tail = slice((n - 1) % cfg.page_size + 1, None)
                if cfg.kv_layout == "NHD":
                    pool[base + pages[-1], :, tail] = np.nan
                else:
                    pool[base + pages[-1], :, :, tail] = np.nan
    return jnp.asarray(pool).astype(cfg.jnp_dtype)


def rand(rng, shape, dtype="float16"):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def close(a, b, tol=2e-2):
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    chex.assert_trees_all_close(jax.tree_util.tree_map(f32, a), jax.tree_util.tree_map(f32, b),
                                atol=tol, rtol=tol)


def close_lse(a, b, tol=1e-2):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], atol=tol, rtol=tol)


@pytest.fixture
def torch_backend():
    """A FlashInfer backend running the bridge's torch kernels (CPU): pass it as backend=."""
    return bridge.FlashInferBackend(provider="torch")


@pytest.fixture
def torch_default(monkeypatch, torch_backend):
    """Make the process default FlashInfer backend (backend="auto" / "flashinfer") the torch one."""
    monkeypatch.setattr(backend_mod, "flashinfer_available", lambda: True)
    monkeypatch.setitem(backend_mod._DEFAULTS, "flashinfer", torch_backend)
    return torch_backend


# ----------------------------------------------------------------------------------------------
# import hygiene and backend selection


@pytest.mark.slow  # the same subprocess check as test_state.py's import test, which runs by default
def test_import_does_not_import_torch():
    code = ("import sys, seqattn_jax, seqattn_jax.attention, seqattn_jax.reference\n"
            "bad = [m for m in ('torch', 'flashinfer', 'seqattn_jax.bridge') if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT))


def test_auto_backend_is_reference_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("JAX runs on an accelerator here")
    assert backend_mod.resolve_backend("auto") == "reference"
    assert not backend_mod.flashinfer_available()
    assert sj.default_backend() == sj.ReferenceBackend()
    with pytest.raises(RuntimeError, match="flashinfer"):
        backend_mod.resolve_backend("flashinfer")
    with pytest.raises(ValueError, match="backend"):
        backend_mod.resolve_backend("cuda")
    rng = np.random.default_rng(0)
    cfg = make_config()
    packed, pages = make_packed(rng, cfg, [5, 0, 9])
    kv = make_pool(rng, cfg, pages, [5, 0, 9])
    q = rand(rng, (3, 4, 64))
    out = attention.batch_decode(cfg, q, kv, packed, layer=1)
    close(out, reference.batch_decode(cfg, q, kv, packed, layer=1), tol=0)
    plan = attention.plan_decode(cfg, packed, 4)
    assert plan.backend.name == "reference" and plan.token is None
    close(attention.batch_decode(cfg, q, kv, packed, layer=1, plan=plan), out, tol=0)


# ----------------------------------------------------------------------------------------------
# generic torch buffer_callback mechanics


def test_callback_is_zero_copy_and_fills_outputs():
    seen = {}

    def kernel(outs, x, y):
        seen["ptrs"] = (x.data_ptr(), y.data_ptr(), outs[0].data_ptr())
        outs[0].copy_(x * 2 + y)

    f = interop.torch_callback(kernel, (jax.ShapeDtypeStruct((4, 8), jnp.float32),))
    x = jnp.arange(32, dtype=jnp.float32).reshape(4, 8)
    y = jnp.ones((4, 8), jnp.float32)
    (out,) = jax.jit(f)(x, y)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2 + 1)
    assert seen["ptrs"][0] == x.unsafe_buffer_pointer()
    assert seen["ptrs"][1] == y.unsafe_buffer_pointer()
    assert seen["ptrs"][2] == out.unsafe_buffer_pointer()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int32"])
def test_callback_dtypes_round_trip(dtype):
    def kernel(outs, x):
        outs[0].copy_(x)

    x = jnp.arange(12).astype(dtype).reshape(3, 4)
    f = interop.torch_callback(kernel, (jax.ShapeDtypeStruct(x.shape, x.dtype),))
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)[0]), np.asarray(x))


def test_callback_alias_is_in_place_with_donation():
    def bump(outs, pool, rows):
        outs[0][rows.long()] += 1.0    # in place: outs[0] is the pool's buffer

    f = interop.torch_callback(bump, (jax.ShapeDtypeStruct((16, 4), jnp.float32),),
                               input_output_aliases={0: 0})
    step = jax.jit(lambda pool, rows: f(pool, rows)[0], donate_argnums=0)
    pool = jnp.zeros((16, 4), jnp.float32)
    ptr = pool.unsafe_buffer_pointer()
    rows = jnp.array([1, 5], jnp.int32)
    for i in range(3):
        pool = step(pool, rows)
        assert pool.unsafe_buffer_pointer() == ptr, "the pool was copied"
    assert float(pool[1, 0]) == 3.0 and float(pool[0, 0]) == 0.0


def test_callback_alias_without_donation_keeps_input():
    def bump(outs, pool):
        outs[0].add_(1.0)

    f = interop.torch_callback(bump, (jax.ShapeDtypeStruct((8,), jnp.float32),),
                               input_output_aliases={0: 0})
    pool = jnp.zeros((8,), jnp.float32)
    out = jax.jit(lambda p: f(p)[0])(pool)   # not donated: XLA copies first
    assert float(out[0]) == 1.0 and float(pool[0]) == 0.0


def test_callback_alias_shape_mismatch_is_an_error():
    f = interop.torch_callback(lambda outs, x: None, (jax.ShapeDtypeStruct((3,), jnp.float32),),
                               input_output_aliases={0: 0})
    with pytest.raises(ValueError, match="input_output_aliases"):
        jax.jit(f)(jnp.zeros((4,), jnp.float32))


def test_outside_jit_helpers_are_zero_copy():
    x = jnp.arange(6, dtype=jnp.float32)
    t = interop.jax_to_torch(x)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    u = torch.arange(5, dtype=torch.float32)
    y = interop.torch_to_jax(u)
    assert y.unsafe_buffer_pointer() == u.data_ptr()
    np.testing.assert_array_equal(np.asarray(y), u.numpy())


# ----------------------------------------------------------------------------------------------
# the FlashInfer code path, with the torch kernels


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("opts", [{}, {"logits_soft_cap": 4.0}, {"window_left": 5},
                                  {"sm_scale": 0.07}])
def test_decode_matches_reference(torch_backend, layout, opts):
    rng = np.random.default_rng(1)
    cfg = make_config(layout)
    lens = [7, 0, 13, 1, 30]
    packed, pages = make_packed(rng, cfg, lens)
    kv = make_pool(rng, cfg, pages, lens)
    q = rand(rng, (5, 4, 64))
    f = jax.jit(lambda q, kv, p: attention.batch_decode(
        cfg, q, kv, p, layer=2, options=O(return_lse=True, **opts), backend=torch_backend))
    out, lse = f(q, kv, packed)
    ref, ref_lse = reference.batch_decode(cfg, q, kv, packed, layer=2, return_lse=True, **opts)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    close(out, ref)
    close_lse(lse, ref_lse)
    assert (np.asarray(out[1], np.float32) == 0).all() and np.isinf(np.asarray(lse[1])).all()


def test_one_plan_serves_every_layer_loop_and_scan(torch_backend):
    rng = np.random.default_rng(2)
    cfg = make_config(num_layers=3)
    lens = [9, 4, 0, 17]
    packed, pages = make_packed(rng, cfg, lens)
    kv = make_pool(rng, cfg, pages, lens)
    q = rand(rng, (4, 4, 64))

    def loop_step(q, kv, packed):
        plan = attention.plan_decode(cfg, packed, 4, backend=torch_backend)
        return jnp.stack([attention.batch_decode(cfg, q, kv, packed, layer=l, plan=plan)
                          for l in range(cfg.num_layers)])

    def scan_step(q, kv, packed):
        plan = attention.plan_decode(cfg, packed, 4, backend=torch_backend)

        def body(carry, layer):
            return carry, attention.batch_decode(cfg, q, kv, packed, layer=layer, plan=plan)

        return jax.lax.scan(body, 0, jnp.arange(cfg.num_layers, dtype=jnp.int32))[1]

    ref = jnp.stack([reference.batch_decode(cfg, q, kv, packed, layer=l)
                     for l in range(cfg.num_layers)])
    for step in (loop_step, scan_step):
        jitted = jax.jit(step)
        jitted(q, kv, packed)[0].block_until_ready()   # compile + one run
        before = torch_backend.slots.num_plans()
        out = jitted(q, kv, packed)
        out.block_until_ready()
        assert torch_backend.slots.num_plans() == before + 1, "one plan per step"
        close(out, ref)
        hlo = jitted.lower(q, kv, packed).as_text()
        assert "pure_callback" not in hlo and "io_callback" not in hlo


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_prefill_matches_reference_with_padding_rows(torch_backend, causal, layout):
    rng = np.random.default_rng(3)
    cfg = make_config(layout)
    lens, q_lens = [12, 0, 7, 20], [5, 0, 7, 3]
    packed, pages = make_packed(rng, cfg, lens, q_lens, num_rows=20)
    kv = make_pool(rng, cfg, pages, lens)
    q = rand(rng, (20, 4, 64))
    out, lse = jax.jit(lambda q, kv, p: attention.batch_prefill(
        cfg, q, kv, p, layer=1, options=O(causal=causal, return_lse=True),
        backend=torch_backend))(q, kv, packed)
    ref, ref_lse = reference.batch_prefill(cfg, q, kv, packed, layer=1, causal=causal,
                                           return_lse=True)
    close(out, ref)
    close_lse(lse, ref_lse)
    assert (np.asarray(out[15:], np.float32) == 0).all()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_flashinfer_append_is_in_place(torch_backend, layout):
    rng = np.random.default_rng(4)
    cfg = make_config(layout)
    lens = [6, 0, 11, 3]
    packed, pages = make_packed(rng, cfg, lens)
    kv = rand(rng, cfg.kv_shape)
    keys, vals = rand(rng, (4, 2, 64)), rand(rng, (4, 2, 64))
    want = scatter_append(cfg, kv, keys, vals, packed, layer=2)

    def step(kv, keys, vals, packed):
        plan = attention.plan_decode(cfg, packed, 4, backend=torch_backend)
        return attention.append_kv(cfg, kv, keys, vals, packed, layer=2, plan=plan,
                                   impl="backend")

    jstep = jax.jit(step, donate_argnums=0)
    kv2 = kv + 0
    ptr = kv2.unsafe_buffer_pointer()
    out = jstep(kv2, keys, vals, packed)
    assert out.unsafe_buffer_pointer() == ptr, "the pool was copied"
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_plan_must_match_the_call(torch_backend):
    rng = np.random.default_rng(5)
    cfg = make_config()
    packed, pages = make_packed(rng, cfg, [5, 6])
    kv = make_pool(rng, cfg, pages, [5, 6])
    q = rand(rng, (2, 4, 64))

    def f(**kw):
        plan = attention.plan_decode(cfg, packed, 4, backend=torch_backend,
                                     options=O(window_left=3))
        return attention.batch_decode(cfg, q, kv, packed, plan=plan, **kw)

    with pytest.raises(ValueError, match="options belong to the plan"):
        jax.jit(lambda: f(options=O()))()
    with pytest.raises(ValueError, match=r"q.shape=\(2, 4, 64\) differs from the plan's"):
        plan = attention.plan_decode(cfg, packed, 2, backend=torch_backend)
        attention.batch_decode(cfg, q, kv, packed, plan=plan)
    with pytest.raises(ValueError, match="make it with plan_prefill"):
        plan = attention.plan_decode(cfg, packed, 4, backend=torch_backend)
        attention.batch_prefill(cfg, q, kv, packed, plan=plan)
    with pytest.raises(ValueError, match="plan_id must be an int"):
        attention.plan_decode(cfg, packed, 4, backend=torch_backend, plan_id=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention.plan_decode(cfg, packed, 4, backend=object())


def test_unsupported_configurations(torch_default):
    torch_backend = torch_default
    rng = np.random.default_rng(6)
    packed, pages = make_packed(rng, make_config(), [5, 6])
    cases = [
        (make_config(dtype="float32"), "float32", "dtype"),
        (make_config(head_dim=96), "float16", "head_dim"),
        (make_config(), "bfloat16", "q.dtype"),
    ]
    for cfg, qdt, what in cases:
        kv = jnp.zeros(cfg.kv_shape, cfg.jnp_dtype)
        q = rand(rng, (2, 4, cfg.head_dim), qdt)
        with pytest.raises(ValueError, match=what):
            attention.batch_decode(cfg, q, kv, packed, backend=torch_backend)
        with pytest.raises(ValueError, match=what):
            attention.batch_decode(cfg, q, kv, packed, backend=torch_backend)
        with pytest.warns(UserWarning, match="falling back"):
            backend_mod._warned.clear()
            out = attention.batch_decode(cfg, q, kv, packed, backend="auto")
        close(out, reference.batch_decode(cfg, q, kv, packed), tol=0)
    cfg = make_config()
    kv = jnp.zeros(cfg.kv_shape, cfg.jnp_dtype)
    q = rand(rng, (2, 10, 64))
    with pytest.raises(ValueError, match="cuda_core"):
        attention.batch_decode(cfg, q, kv, packed, backend=torch_backend,
                               options=O(decode_kernel="cuda_core"))
    q = rand(rng, (2, 4, 64))
    with pytest.raises(ValueError, match="soft cap"):
        attention.pod(cfg, q, rand(rng, (3, 2, 64)), rand(rng, (3, 2, 64)), q, kv, packed,
                      options=O(logits_soft_cap=5.0), backend=torch_backend)
    with pytest.raises(ValueError, match="sm_scale"):
        jax.jit(lambda s: attention.batch_decode(cfg, q, kv, packed, options=O(sm_scale=s),
                                                 backend=torch_backend))(jnp.float32(0.1))
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        attention.batch_decode(cfg, q, kv, packed, backend=torch_backend,
                               options=O(pos_encoding_mode="ROPE_LLAMA"))


def test_decode_kernel_choice():
    assert decode_kernel_for("auto", 4) == "tensor_core"
    assert decode_kernel_for("auto", 1) == "cuda_core"
    assert decode_kernel_for("auto", 5) == "tensor_core"
    assert decode_kernel_for("cuda_core", 8) == "cuda_core"


# ----------------------------------------------------------------------------------------------
# the XLA FFI shim (jax-tvm-ffi), CPU build with a Python target


@pytest.fixture
def cpu_shim():
    """(tvm_ffi, the shim's CPU FFI target); skipped without jax-tvm-ffi or a C++ compiler."""
    pytest.importorskip("jax_tvm_ffi")
    tvm_ffi = pytest.importorskip("tvm_ffi")
    try:
        return tvm_ffi, ffi._register("cpu")
    except Exception as e:  # noqa: BLE001 - no C++ compiler here
        pytest.skip(f"shim does not build here: {e}")


def test_ffi_shim_assembles_views_and_constants(cpu_shim):
    tvm_ffi, target = cpu_shim
    seen = {}

    def fn(*args):
        seen["args"] = [(tuple(a.shape), tuple(a.strides), a.data_ptr(), str(a.dtype))
                        if type(a).__name__ == "Tensor" else
                        (list(a) if type(a).__name__ == "Array" else a) for a in args]

    fn_id = ffi.register_function(tvm_ffi.convert(fn))
    ws = torch.zeros(64, dtype=torch.uint8)
    tvm_ffi.get_global_func("seqattn.fi_plan_set")(12345, tvm_ffi.convert([11, 12]), 3,
                                                      ws.data_ptr(), ws.numel())
    p = (ffi.Program(2, 1).raw(ws, ffi.RAW_U8).plan(12345).inp(0).k(1).v(1).out(0).none()
         .int_(7).float_(2.5).bool_(True).kv_pages("v", 1, 1, 1).rows(0, 12345)
         .plan_ws(12345))
    cpu = jax.devices("cpu")[0]
    kv = jax.device_put(jnp.arange(2 * 2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 2, 3, 4, 5),
                        cpu)
    q = jax.device_put(jnp.ones((3, 5), jnp.float32), cpu)
    out = jax.jit(lambda q, kv: jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))(
        q, kv, **p.attrs(fn_id)))(q, kv)
    out.block_until_ready()
    a = seen["args"]
    assert a[0] == ((64,), (1,), ws.data_ptr(), "uint8")
    assert a[1] == [11, 12]
    assert a[2][0] == (3, 5)
    assert a[3][:2] == ((2, 3, 4, 5), (120, 20, 5, 1))
    assert a[4][:2] == ((2, 3, 4, 5), (120, 20, 5, 1))
    assert a[4][2] - a[3][2] == 3 * 4 * 5 * 4           # V = K + one half-page of float32
    assert a[5][0] == (3, 5) and a[6] is None and a[7:10] == [7, 2.5, True]
    # V of page 1 only: one page further and one half-page on from K's start
    assert a[10][:2] == ((1, 3, 4, 5), (120, 20, 5, 1))
    assert a[10][2] - a[3][2] == (2 * 60 + 60) * 4
    assert a[11][:2] == ((3, 5), (5, 1))      # rows of input 0 cut to the published 3 rows
    assert a[12] == a[0]                       # the published plan's int workspace


_KEEP_ALIVE = []   # buffers aliased in the shim: their pointers must never be reused by others


def test_ffi_shim_substitutes_each_devices_own_raw_buffer(cpu_shim):
    """Tensor parallel: one program, built from the home device's buffers, runs on every device;
    a raw buffer aliased for a device (`seqattn.fi_raw_alias`) is replaced by that device's own
    on calls there, and a buffer with no alias passes unchanged."""
    tvm_ffi, target = cpu_shim
    seen = {}

    def fn(*args):
        seen["ptrs"] = [a.data_ptr() for a in args]

    fn_id = ffi.register_function(tvm_ffi.convert(fn))
    home, peer, plain = (torch.zeros(32, dtype=torch.uint8) for _ in range(3))
    _KEEP_ALIVE.extend([home, peer, plain])
    cpu = jax.devices("cpu")[0]
    tvm_ffi.get_global_func("seqattn.fi_raw_alias")(home.data_ptr(), cpu.id, peer.data_ptr())
    tvm_ffi.get_global_func("seqattn.fi_raw_alias")(plain.data_ptr(), cpu.id + 1, home.data_ptr())
    p = ffi.Program(1, 1).raw(home, ffi.RAW_U8).raw(plain, ffi.RAW_U8)
    assert p.capturable
    q = jax.device_put(jnp.ones((3,), jnp.float32), cpu)
    jax.jit(lambda q: jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))(
        q, **p.attrs(fn_id)))(q).block_until_ready()
    # on device cpu.id: home -> peer; plain's alias is for another device: unchanged
    assert seen["ptrs"] == [peer.data_ptr(), plain.data_ptr()]


def test_alias_peers_gives_each_device_its_own_slot_buffers(cpu_shim):
    """A program built from the home slot's argument list (`ffi.program`) and run on a peer
    device reads the peer slot's buffers in every raw position (the float workspace and any
    permanent tensor), once `ffi.alias_peers` registered them; scalars and None pass as built."""
    tvm_ffi, target = cpu_shim
    fp = fi_provider
    seen = {}

    def fn(*args):
        seen["args"] = [a.data_ptr() if type(a).__name__ == "Tensor" else a for a in args]

    fn_id = ffi.register_function(tvm_ffi.convert(fn))
    cpu = jax.devices("cpu")[0]

    def slot(device):
        st = _Fake(float_ws=torch.zeros(64, dtype=torch.uint8), extra=torch.zeros(4))
        _KEEP_ALIVE.extend([st.float_ws, st.extra])
        return _Fake(state=st, device=device, id=device, key="k")

    home, peer = slot(cpu.id + 7), slot(cpu.id)      # the call runs on the peer's device
    home.peers = peer.peers = {home.device: home, peer.device: peer}

    def args_of(s):
        return [fp.FLOAT_WS, s.state.extra, 3, None]

    p = ffi.program(home, args_of(home), {}, 1, 1, None, kv_input=0)
    ffi.alias_peers(home, args_of)
    q = jax.device_put(jnp.ones((3,), jnp.float32), cpu)
    jax.jit(lambda q: jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))(
        q, **p.attrs(fn_id)))(q).block_until_ready()
    assert seen["args"] == [peer.state.float_ws.data_ptr(), peer.state.extra.data_ptr(), 3, None]


# ----------------------------------------------------------------------------------------------
# host plans: planned on the host before the step, adopted inside it (no stream sync)


def _host_plan_step(cfg, hq, seq_ids, use_scan):
    def step(state, kv, q, k, hp):
        state, ok = _allocate_decoding(state, seq_ids)
        packed = sj.pack_for_flashinfer(state, seq_ids)
        plan = attention.adopt_plan(hp, packed)

        def layer_fn(kv, layer):
            kv = attention.append_kv(cfg, kv, k[layer], k[layer], packed, layer=layer, plan=plan)
            out = attention.batch_decode(cfg, q[layer], kv, packed, layer=layer, plan=plan)
            ref = reference.batch_decode(cfg, q[layer], kv, packed, layer=layer)
            return kv, (out, ref)

        if use_scan:
            kv, (outs, refs) = jax.lax.scan(layer_fn, kv,
                                            jnp.arange(cfg.num_layers, dtype=jnp.int32))
        else:
            res = [None] * cfg.num_layers
            for layer in range(cfg.num_layers):
                kv, res[layer] = layer_fn(kv, layer)
            outs, refs = (jnp.stack([r[i] for r in res]) for i in (0, 1))
        return state, kv, outs, refs, ok & plan.ok

    chex.clear_trace_counter()   # the counter is per function code: reset it for each test
    return jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=(1,))


@pytest.mark.parametrize("use_scan", [False, True], ids=["loop", "scan"])
def test_host_plans_drive_steps_like_device_plans(torch_backend, use_scan):
    """12 steps (more than the ring of host-plan workspaces), a padding row in the middle: every
    step adopts its own plan (ok), matches the reference and compiles once."""
    cfg = make_config(num_layers=2)
    state = sj.init_state(cfg)
    state, ok = _allocate(state, jnp.arange(3, dtype=jnp.int32), jnp.asarray([5, 1, 8], jnp.int32))
    assert bool(ok.all())
    seq_ids = jnp.asarray([0, -1, 1, 2], jnp.int32)
    lens = np.asarray([5, 0, 1, 8])
    rng = np.random.default_rng(7)
    kv = rand(rng, cfg.kv_shape)
    step = _host_plan_step(cfg, 4, seq_ids, use_scan)
    for it in range(12):
        lens = np.where(lens > 0, lens + 1, 0)
        hp = attention.host_plan_decode(cfg, lens, 4, backend=torch_backend)
        q, k = rand(rng, (2, 4, 4, 64)), rand(rng, (2, 4, 2, 64))
        state, kv, outs, refs, ok = step(state, kv, q, k, hp)
        assert bool(jnp.all(ok)), f"step {it}"
        close(outs, refs)
    assert torch_backend.discard_host_plans() == 0


def test_host_plan_mismatch_desync_and_limits(torch_backend):
    cfg = make_config(num_layers=1)
    state = sj.init_state(cfg)
    state, _ = _allocate(state, jnp.arange(2, dtype=jnp.int32), jnp.asarray([6, 3], jnp.int32))
    seq_ids = jnp.asarray([0, 1], jnp.int32)
    rng = np.random.default_rng(8)
    kv = rand(rng, cfg.kv_shape)
    step = _host_plan_step(cfg, 4, seq_ids, False)
    q, k = rand(rng, (1, 2, 4, 64)), rand(rng, (1, 2, 2, 64))
    # lengths that are not the step's: flagged
    hp = attention.host_plan_decode(cfg, [7, 5], 4, backend=torch_backend)
    state, kv, _, _, ok = step(state, kv, q, k, hp)
    assert not bool(jnp.all(ok))
    # a plan left over from a step that never ran: the next step adopts it, and says so
    attention.host_plan_decode(cfg, [7, 4], 4, backend=torch_backend)
    hp_b = attention.host_plan_decode(cfg, [8, 5], 4, backend=torch_backend)
    state, kv, _, _, ok = step(state, kv, q, k, hp_b)
    assert not bool(jnp.all(ok))
    assert torch_backend.discard_host_plans() == 1
    hp = attention.host_plan_decode(cfg, [9, 6], 4, backend=torch_backend)
    state, kv, outs, refs, ok = step(state, kv, q, k, hp)
    assert bool(jnp.all(ok))
    close(outs, refs)
    # at most HOST_PLAN_DEPTH plans wait
    for _ in range(ops.HOST_PLAN_DEPTH):
        attention.host_plan_decode(cfg, [10, 7], 4, backend=torch_backend)
    with pytest.raises(RuntimeError, match="host plans"):
        attention.host_plan_decode(cfg, [10, 7], 4, backend=torch_backend)
    assert torch_backend.discard_host_plans() == ops.HOST_PLAN_DEPTH
    # a step with no plan queued fails loudly instead of reusing a stale plan
    with pytest.raises(Exception, match="none is queued"):
        jax.block_until_ready(step(state, kv, q, k, hp))


def test_host_plan_argument_errors(torch_backend):
    cfg = make_config(num_layers=1)
    with pytest.raises(ValueError, match="seq_lens must be a 1-D integer"):
        attention.host_plan_decode(cfg, [[1, 2]], 4, backend=torch_backend)
    with pytest.raises(ValueError, match="seq_lens must be a 1-D integer"):
        attention.host_plan_decode(cfg, [1.5, 2.0], 4, backend=torch_backend)
    with pytest.raises(ValueError, match=r"seq_lens must be in \[0, max_pages_per_seq"):
        attention.host_plan_decode(cfg, [1, 33], 4, backend=torch_backend)
    with pytest.raises(ValueError, match="seq_lens must be host data"):
        jax.jit(lambda x: attention.host_plan_decode(cfg, x, 4))(jnp.ones(2, jnp.int32))
    hp = attention.host_plan_decode(cfg, [3, 0], 4, backend=torch_backend)
    state = sj.init_state(cfg)
    state, _ = _allocate(state, jnp.arange(3, dtype=jnp.int32), jnp.asarray([3, 1, 1], jnp.int32))
    packed3 = sj.pack_for_flashinfer(state, jnp.arange(3, dtype=jnp.int32))
    with pytest.raises(ValueError, match="plan was made for 2 requests"):
        attention.adopt_plan(hp, packed3)
    with pytest.raises(ValueError, match="host_plan must be a HostPlan"):
        attention.adopt_plan(None, packed3)
    packed = sj.pack_for_flashinfer(state, jnp.asarray([0, -1], jnp.int32))
    kv = sj.init_kv(cfg)
    with pytest.raises(ValueError, match="not a host plan"):
        jax.jit(lambda kv, hp: attention.append_kv(
            cfg, kv, jnp.zeros((2, 2, 64), kv.dtype), jnp.zeros((2, 2, 64), kv.dtype), packed,
            plan=attention.adopt_plan(hp, packed), impl="backend"))(kv, hp)
    torch_backend.discard_host_plans()


# ----------------------------------------------------------------------------------------------
# host plans of paged prefill and batch POD steps (what a serving loop's mixed steps use)


def _chunk_step(cfg, be, kind, ids_p, ids_d, T, hq=4):
    """One jitted step: allocate the prefill chunk (and a decode token), pack, adopt the host
    plan, append K/V, attend; the reference of the same batch rides along."""

    def step(state, kv, new_p, q_p, k_p, q_d, k_d, hp):
        state, ok = _allocate(state, ids_p, new_p)
        packed_p = sj.pack_for_flashinfer(state, ids_p, new_p, max_tokens=T)
        if kind == "prefill":
            plan = attention.adopt_plan(hp, packed_p)
            kv = attention.append_kv(cfg, kv, k_p, k_p, packed_p, layer=1, plan=plan)
            out = attention.batch_prefill(cfg, q_p, kv, packed_p, layer=1, plan=plan)
            ref = reference.batch_prefill(cfg, q_p, kv, packed_p, layer=1, return_lse=True)
            return state, kv, out, ref, ok.all() & plan.ok
        state, ok_d = _allocate_decoding(state, ids_d)
        packed_d = sj.pack_for_flashinfer(state, ids_d)
        plan = attention.adopt_plan(hp, packed_p, packed_d)
        kv = attention.append_kv(cfg, kv, k_p, k_p, packed_p, layer=1, plan=plan)
        kv = attention.append_kv(cfg, kv, k_d, k_d, packed_d, layer=1, plan=plan)
        out = attention.batch_pod(cfg, q_p, packed_p, q_d, packed_d, kv, layer=1, plan=plan)
        ref = reference.batch_pod(cfg, q_p, packed_p, q_d, packed_d, kv, layer=1,
                                  return_lse=True)
        return state, kv, out, ref, ok.all() & ok_d.all() & plan.ok

    chex.clear_trace_counter()
    return jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=(1,))


def _host_plan(cfg, be, kind, lens, new, lens_d, T, **kw):
    opts = O(return_lse=True, **kw)
    if kind == "prefill":
        return attention.host_plan_prefill(cfg, lens, new, 4, max_tokens=T, options=opts,
                                           backend=be)
    return attention.host_plan_batch_pod(cfg, lens, new, lens_d, 4, max_tokens_p=T,
                                         options=opts, backend=be)


@pytest.mark.parametrize("kind", ["prefill", "batch_pod"])
@pytest.mark.parametrize("be_name", ["bridge", "reference"])
def test_host_plans_of_chunked_prefill_steps(torch_backend, kind, be_name):
    """Chunked prefill over 9 steps (more than the ring) with a padding request in the middle and
    requests that finish their prompt early; batch POD adds a decode batch. Each step adopts its
    own host plan (ok), matches the reference and compiles once; a wrong plan is flagged.
    test_flashinfer_gpu.py runs it with FlashInfer's kernels (`torch_backend` is then theirs)."""
    be = torch_backend if be_name == "bridge" else sj.ReferenceBackend()
    cfg = make_config(num_layers=2)
    T = 8
    ids_p = jnp.asarray([0, -1, 1, 2], jnp.int32)
    ids_d = jnp.asarray([3, 4], jnp.int32)
    state = sj.init_state(cfg)
    state, ok = _allocate(state, ids_d, jnp.asarray([5, 2], jnp.int32))
    assert bool(ok.all())
    prompt = np.asarray([13, 0, 4, 9])
    lens, lens_d = np.zeros(4, np.int64), np.asarray([5, 2])
    rng = np.random.default_rng(30)
    kv = rand(rng, cfg.kv_shape)
    step = _chunk_step(cfg, be, kind, ids_p, ids_d, T)
    for it in range(9):
        new = np.minimum(prompt - lens, np.asarray([3, 0, 2, 3]))
        lens = lens + new
        lens_d = lens_d + 1
        host_lens = np.where(np.asarray(ids_p) >= 0, lens, 0)
        hp = _host_plan(cfg, be, kind, host_lens, new, lens_d, T)
        q_p, k_p = rand(rng, (T, 4, 64)), rand(rng, (T, 2, 64))
        q_d, k_d = rand(rng, (2, 4, 64)), rand(rng, (2, 2, 64))
        state, kv, out, ref, ok = step(state, kv, jnp.asarray(new, jnp.int32), q_p, k_p, q_d,
                                       k_d, hp)
        assert bool(ok), f"step {it}"
        if kind == "prefill":
            close(out[0], ref[0])
            close_lse(out[1], ref[1])
        else:
            close(out[0], ref[0])
            for a, b in zip(out[1], ref[1]):
                close_lse(a, b)
    # a plan made for other lengths is flagged
    new = np.asarray([0, 0, 1, 0])
    hp = _host_plan(cfg, be, kind, np.where(np.asarray(ids_p) >= 0, lens + 5, 0), new,
                    lens_d + 1, T)
    *_, ok = step(state, kv, jnp.asarray(new, jnp.int32), q_p, k_p, q_d, k_d, hp)
    assert not bool(ok)
    assert be.discard_host_plans() == 0


def test_host_plan_layout_errors():
    cfg = make_config(num_layers=1)
    with pytest.raises(ValueError, match="exceeds max_tokens"):
        attention.host_plan_prefill(cfg, [6, 4], [5, 4], 4, max_tokens=8, backend="reference")
    with pytest.raises(ValueError, match="new_lens must be integers"):
        attention.host_plan_prefill(cfg, [6, 4], [5], 4, max_tokens=8, backend="reference")
    with pytest.raises(ValueError, match="max_tokens must be a positive"):
        attention.host_plan_batch_pod(cfg, [6], [5], [3], 4, max_tokens_p=0,
                                      backend="reference")
    hp = attention.host_plan_prefill(cfg, [6, 4], [5, 3], 4, max_tokens=8, backend="reference")
    np.testing.assert_array_equal(hp.expected, [0, 2, 3, 2, 4, 0, 5, 8])


def test_a_jitted_step_keys_on_the_backend_object():
    """Two backends (here two transports' worth of objects) never share a trace: the backend
    object is in the plan's static metadata."""
    cfg = make_config(num_layers=1)
    rng = np.random.default_rng(31)
    packed, pages = make_packed(rng, cfg, [5, 7])
    kv = make_pool(rng, cfg, pages, [5, 7])
    q = rand(rng, (2, 4, 64))
    a, b = bridge.FlashInferBackend(provider="torch"), bridge.FlashInferBackend(provider="torch",
                                                                               transport="callback")
    step = jax.jit(lambda hp, q, kv, p: attention.batch_decode(cfg, q, kv, p,
                                                               plan=attention.adopt_plan(hp, p)))
    for be in (a, b, a):
        step(attention.host_plan_decode(cfg, [5, 7], 4, backend=be), q, kv, packed)
    assert step._cache_size() == 2
    assert a.slots.num_plans() == 2 and b.slots.num_plans() == 1
    with pytest.raises(ValueError, match="transport must be one of"):
        bridge.FlashInferBackend(provider="torch", transport="xla")
    with pytest.raises(ValueError, match="transport='ffi' needs FlashInfer's kernels"):
        bridge.FlashInferBackend(provider="torch", transport="ffi")


def test_bridge_import_without_torch_names_the_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    from seqattn_jax import bridge\nexcept ImportError as e:\n"
            "    assert \"pip install 'seqattn-jax[flashinfer]'\" in str(e), e\n"
            "else:\n    raise SystemExit('imported')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))


class _Fake:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_ffi_program_is_the_flashinfer_argument_list():
    """The FFI transport compiles the same argument list the callback transport calls
    (`fi_provider.run_args`): check the shim program against the list written out by hand."""
    fp = fi_provider
    st = _Fake(float_ws=torch.zeros(8, dtype=torch.uint8), layout=1, pdl=True,
               alibi=torch.zeros(4), arange_qo=torch.arange(3, dtype=torch.int32))
    rp = ops.RunParams(sm_scale=0.5, rope_scale=2.0, rope_theta=1e4, return_lse=True)
    key = ops.PlanKey(kind="decode", batch_size=2, num_rows=2, num_qo_heads=4, num_kv_heads=2,
                      head_dim=64, page_size=4, kv_layout="HND", q_dtype="float16",
                      kv_dtype="float16", window_left=7, logits_soft_cap=3.0,
                      decode_kernel="cuda_core", ffi=True)
    slot = _Fake(key=key, state=st, id=42)
    names = ("q", "kv", "indptr", "indices", "lpl", "token")
    inputs = {getattr(fp, n.upper()): i for i, n in enumerate(names) if n not in ("kv", "token")}
    got = ffi.program(slot, fp.run_args(slot, rp), inputs, 6, 2, (10, 5), kv_input=1)
    want = (ffi.Program(6, 2).raw(st.float_ws, ffi.RAW_U8).plan_ws(42).plan(42).inp(0)
            .kv_pages("k", 1, 10, 5).kv_pages("v", 1, 10, 5).inp(2).inp(3).inp(4).out(0).out(1)
            .int_(1).int_(7).bool_(True).raw(st.alibi, ffi.RAW_F32).float_(3.0).float_(0.5)
            .float_(0.5).float_(1e-4))
    for k in ("prog", "iconst", "fconst"):
        np.testing.assert_array_equal(got.attrs(3)[k], want.attrs(3)[k])
    # tensor-core decode: FlashInfer's paged prefill run with one query per request
    slot.key = dataclasses.replace(key, decode_kernel="tensor_core")
    got = ffi.program(slot, fp.run_args(slot, rp), inputs, 6, 1, None, kv_input=1)
    want = (ffi.Program(6, 1).raw(st.float_ws, ffi.RAW_U8).plan_ws(42).plan(42).inp(0)
            .kv_pages("k", 1, 0, -1).kv_pages("v", 1, 0, -1).raw(st.arange_qo, ffi.RAW_I32)
            .inp(2).inp(3).inp(4).out(0).none().int_(0).int_(1).int_(7).bool_(True).none()
            .none().raw(st.alibi, ffi.RAW_F32).none().none().none().none().none().float_(3.0)
            .float_(0.5).float_(0.5).float_(1e-4).int_(0))
    for k in ("prog", "iconst", "fconst"):
        np.testing.assert_array_equal(got.attrs(3)[k], want.attrs(3)[k])


# ----------------------------------------------------------------------------------------------
# static plans' FFI programs (bridge/ffi.py): what XLA may capture reads nothing decided at run time


def _fake_slot(kind, decode_kernel="tensor_core", batch_size=4, num_rows=16):
    """A slot with the state `fi_provider`'s argument lists read (permanent buffers as torch CPU
    tensors): enough to compile the shim's programs without FlashInfer."""
    key = ops.PlanKey(kind=kind, batch_size=batch_size, num_rows=num_rows, num_qo_heads=8,
                      num_kv_heads=2, head_dim=64, page_size=16, kv_layout="NHD",
                      q_dtype="float16", kv_dtype="float16", causal=kind != "decode",
                      decode_kernel=decode_kernel, batch_size_p=2 if kind == "batch_pod" else 0,
                      ffi=True)
    u8 = lambda n: torch.zeros(n, dtype=torch.uint8)  # noqa: E731
    st = type("State", (), {})()
    st.layout, st.pdl = 0, False
    st.float_ws, st.float_ws_p, st.float_ws_d = u8(64), u8(32), u8(32)
    st.alibi = torch.zeros(8, dtype=torch.float32)
    st.arange_qo = torch.arange(batch_size + 1, dtype=torch.int32)
    st.sm_aware_sched = torch.zeros(10, dtype=torch.int32)
    slot = type("Slot", (), {})()
    slot.key, slot.state, slot.id = key, st, 7
    return slot


_RP = ops.RunParams(sm_scale=0.125, rope_scale=1.0, rope_theta=1e4, return_lse=False)


@pytest.mark.parametrize("kind,kernel", [("decode", "tensor_core"), ("decode", "cuda_core"),
                                         ("prefill", "tensor_core")])
def test_static_plan_programs_are_capturable_and_queued_ones_are_not(kind, kernel):
    slot = _fake_slot(kind, kernel)
    args = fi_provider.run_args(slot, _RP)
    inputs = {fi_provider.Q: 0, fi_provider.INDPTR: 2, fi_provider.INDICES: 3, fi_provider.LPL: 4,
              fi_provider.QO_INDPTR: 5}
    info = (66, 4, 0, 16, 0, 272, 544, 816, 1088, 1120, 0, 0, 1136, 1, 1)
    static = ffi.program(slot, args, inputs, 7, 1, (32, 96), kv_input=1,
                         static_plan={fi_provider.PLAN_INFO: info, fi_provider.INT_WS: 6})
    queued = ffi.program(slot, args, inputs, 7, 1, (32, 96), kv_input=1)
    assert static.capturable and not queued.capturable
    ops_static = static.prog[3::2]
    assert ffi.PLAN not in ops_static and ffi.PLAN_WS not in ops_static
    # plan_info is in the program as (count, values...); the int workspace is input 6
    i = ops_static.index(ffi.PLAN_CONST)
    at = static.prog[3 + 2 * i + 1]
    assert static.iconst[at] == len(info) and tuple(static.iconst[at + 1:at + 1 + len(info)]) == info
    assert [ffi.IN, 6] == static.prog[3 + 2 * (i - 1):3 + 2 * i]   # INT_WS just before PLAN_INFO


def test_static_batch_pod_program_maps_both_halves():
    slot = _fake_slot("batch_pod")
    fp = fi_provider
    info_d, info_p = (66,) + (0,) * 14, (70,) + (1,) * 14
    inputs = {fp.Q_P: 0, fp.QO_INDPTR_P: 1, fp.INDPTR_P: 2, fp.INDICES_P: 3, fp.LPL_P: 4,
              fp.Q_D: 5, fp.INDPTR: 6, fp.INDICES: 7, fp.LPL: 8}
    p = ffi.program(slot, fp.batch_pod_args(slot, _RP), inputs, 12, 2, None, kv_input=9,
                    static_plan={fp.PLAN_INFO: info_d, fp.INT_WS: 10, fp.PLAN_INFO_P: info_p,
                                 fp.INT_WS_P: 11},
                    outputs={fp.OUT_P: 0, fp.OUT_D: 1, fp.LSE_P: 2, fp.LSE_D: 3})
    assert p.capturable
    pairs = list(zip(p.prog[3::2], p.prog[4::2]))
    assert pairs.count((ffi.IN, 10)) == 1 and pairs.count((ffi.IN, 11)) == 1
    assert pairs.count((ffi.OUT, 0)) == 1 and pairs.count((ffi.OUT, 1)) == 1
    consts = [tuple(p.iconst[x + 1:x + 1 + p.iconst[x]]) for op, x in pairs if op == ffi.PLAN_CONST]
    assert consts == [info_p, info_d]        # prefill half first, as FlashInfer's argument list
    assert [op for op, _ in pairs].count(ffi.NONE) >= 2    # no LSE outputs asked: None passed


def test_cuda_graph_decode_plans_drop_the_kv_split_only_when_live_requests_fill_the_sms():
    """`fi_provider.whole_kv_per_cta`: counted against a plain loop over the requests' pages."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        B, heads, sms = int(rng.integers(1, 300)), int(rng.choice([1, 2, 4, 8])), 132
        pages = rng.integers(0, 5, size=B) * (rng.random(B) < rng.random())
        indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        live = sum(1 for p in pages if p > 0)
        assert fi_provider.whole_kv_per_cta(indptr, heads, sms) == (live * heads >= sms)
    full = np.arange(0, 2 * 33 + 1, 2, dtype=np.int32)       # 33 live requests x 4 heads = 132
    assert fi_provider.whole_kv_per_cta(full, 4, 132)
    assert not fi_provider.whole_kv_per_cta(full[:-1], 4, 132)
