"""FlashInfer backend against the pure-JAX reference, on a CUDA GPU (marker `gpu`).

Skipped without a CUDA device for JAX, torch with CUDA, and flashinfer. Every op and option runs
inside `jax.jit` through the bridge, with pages in random order and every free page (and every slot
past a request's length) poisoned with NaN in every layer: outputs must be finite and match the
reference. Run on the GPU machine:

    python3 -m pytest -q -m gpu tests/test_flashinfer_gpu.py

Each FlashInfer kernel variant (dtype, head_dim, pos-encoding, window, soft cap) JIT-compiles on
first use; the options below are chosen so that each variant is built once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqattn_jax import attention, reference
from seqattn_jax.backend import flashinfer_available
from seqattn_jax.options import AttentionOptions as O

pytestmark = pytest.mark.gpu

if not flashinfer_available():
    pytest.skip("needs JAX on a CUDA GPU with torch (CUDA) and flashinfer", allow_module_level=True)

try:  # tests/ is on sys.path under pytest's rootdir insertion
    import test_bridge_cpu as cpu_tests
    from test_bridge_cpu import close, close_lse, make_packed, make_pool, rand
except ImportError:  # pragma: no cover - imported as the `tests` package
    import tests.test_bridge_cpu as cpu_tests
    from tests.test_bridge_cpu import close, close_lse, make_packed, make_pool, rand

import seqattn_jax as sj  # noqa: E402
from seqattn_jax.bridge import FlashInferBackend, ffi  # noqa: E402
from seqattn_jax.config import CacheConfig  # noqa: E402
import torch  # noqa: E402  (CUDA torch: the module skips above without it)

HQ, HKV, D, PS = 16, 4, 128, 16
TRANSPORTS = ["callback"] + (["ffi"] if ffi.available() else [])
_BACKENDS: dict[str, FlashInferBackend] = {}   # one per transport: each owns its workspaces


def test_ffi_bridge_builds():
    if not ffi.available():
        pytest.skip(f"XLA FFI bridge unavailable: {ffi.unavailable_reason()}")


def cfg_(layout="NHD", dtype="float16", hkv=HKV, num_layers=2, num_pages=96, max_pages=12,
         max_seqs=16):
    return CacheConfig(num_pages=num_pages, page_size=PS, num_kv_heads=hkv, head_dim=D,
                       max_seqs=max_seqs, max_pages_per_seq=max_pages, num_layers=num_layers,
                       dtype=dtype, kv_layout=layout)


@pytest.fixture(params=TRANSPORTS)
def bridge(request):
    """A FlashInfer backend of each transport (callback, ffi where it builds), with queued host
    plans (the static plans of `cuda_graphs=True` have their own tests below)."""
    be = _BACKENDS.get(request.param)
    if be is None:
        be = _BACKENDS[request.param] = FlashInferBackend(transport=request.param,
                                                          cuda_graphs=False)
    yield be
    assert be.discard_host_plans() == 0, "a test left host plans behind"


def decode_case(seed, cfg, lens=(37, 0, 100, 1, 161, 16, 17, 0), hq=HQ, qdt=None):
    rng = np.random.default_rng(seed)
    packed, pages = make_packed(rng, cfg, list(lens))
    kv = make_pool(rng, cfg, pages, list(lens))
    q = rand(rng, (len(lens), hq, D), qdt or cfg.dtype)
    return q, kv, packed


def prefill_case(seed, cfg, lens=(60, 0, 33, 100, 16), q_lens=(20, 0, 33, 1, 16), rows=80):
    rng = np.random.default_rng(seed)
    packed, pages = make_packed(rng, cfg, list(lens), list(q_lens), num_rows=rows)
    kv = make_pool(rng, cfg, pages, list(lens))
    q = rand(rng, (rows, HQ, D), cfg.dtype)
    return q, kv, packed


def tol_for(dtype):
    return 3e-2 if dtype == "bfloat16" else 1e-2


def check_decode(cfg, q, kv, packed, *, kernel, layer=1, backend="flashinfer", **opts):
    f = jax.jit(lambda q, kv, p: attention.batch_decode(
        cfg, q, kv, p, layer=layer, options=O(return_lse=True, decode_kernel=kernel, **opts),
        backend=backend))
    out, lse = f(q, kv, packed)
    ref, ref_lse = reference.batch_decode(cfg, q, kv, packed, layer=layer, return_lse=True, **opts)
    assert np.isfinite(np.asarray(out, np.float32)).all(), "NaN from a poisoned page"
    close(out, ref, tol_for(jnp.dtype(q.dtype).name))
    close_lse(lse, ref_lse, 2e-2)


# ----------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kernel", ["tensor_core", "cuda_core"])
def test_decode(bridge, kernel, layout, dtype):
    cfg = cfg_(layout, dtype)
    check_decode(cfg, *decode_case(0, cfg), kernel=kernel, backend=bridge)


@pytest.mark.parametrize("kernel", ["tensor_core", "cuda_core"])
@pytest.mark.parametrize("opts", [
    {"logits_soft_cap": 30.0},
    {"window_left": 20},
    {"pos_encoding_mode": "ROPE_LLAMA", "rope_scale": 2.0, "rope_theta": 5e4},
    {"pos_encoding_mode": "ALIBI"},
    {"sm_scale": 0.05},
], ids=["softcap", "window", "rope", "alibi", "sm_scale"])
def test_decode_options(bridge, kernel, opts):
    cfg = cfg_()
    check_decode(cfg, *decode_case(1, cfg), kernel=kernel, backend=bridge, **opts)


@pytest.mark.parametrize("hq,hkv,kernel", [(4, 4, "cuda_core"), (32, 4, "cuda_core"),
                                           (20, 4, "tensor_core"), (8, 8, "tensor_core")])
def test_decode_gqa_group_sizes(hq, hkv, kernel):
    cfg = cfg_(hkv=hkv)
    check_decode(cfg, *decode_case(2, cfg, hq=hq), kernel=kernel)


@pytest.mark.parametrize("kernel", ["cuda_core", "tensor_core"])
def test_decode_fp8_pool(kernel):
    cfg = cfg_(dtype="float8_e4m3fn")
    q, kv, packed = decode_case(3, cfg, qdt="float16")
    f = jax.jit(lambda q, kv, p: attention.batch_decode(
        cfg, q, kv, p, layer=1, backend="flashinfer", options=O(decode_kernel=kernel)))
    out = f(q, kv, packed)
    ref = reference.batch_decode(cfg, q, kv, packed, layer=1)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    close(out, ref, 3e-2)


def test_decode_auto_backend_and_kernel():
    cfg = cfg_()
    q, kv, packed = decode_case(4, cfg)
    out = jax.jit(lambda q, kv, p: attention.batch_decode(cfg, q, kv, p, layer=1))(q, kv, packed)
    close(out, reference.batch_decode(cfg, q, kv, packed, layer=1))
    plan = attention.plan_decode(cfg, packed, HQ)
    assert plan.backend.name == "flashinfer" and plan.meta.key.decode_kernel == "tensor_core"


# ----------------------------------------------------------------------------------------------
# prefill


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill(bridge, causal, layout):
    cfg = cfg_(layout)
    q, kv, packed = prefill_case(5, cfg)
    out, lse = jax.jit(lambda q, kv, p: attention.batch_prefill(
        cfg, q, kv, p, layer=1, options=O(causal=causal, return_lse=True),
        backend=bridge))(q, kv, packed)
    ref, ref_lse = reference.batch_prefill(cfg, q, kv, packed, layer=1, causal=causal,
                                           return_lse=True)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    close(out, ref)
    close_lse(lse, ref_lse, 2e-2)
    assert (np.asarray(out[70:], np.float32) == 0).all()


@pytest.mark.parametrize("opts", [
    {"logits_soft_cap": 30.0},
    {"window_left": 20},
    {"pos_encoding_mode": "ROPE_LLAMA", "rope_scale": 2.0, "rope_theta": 5e4},
    {"pos_encoding_mode": "ALIBI"},
    {"sm_scale": 0.05},
], ids=["softcap", "window", "rope", "alibi", "sm_scale"])
def test_prefill_options(opts):
    cfg = cfg_()
    q, kv, packed = prefill_case(6, cfg)
    out = jax.jit(lambda q, kv, p: attention.batch_prefill(
        cfg, q, kv, p, layer=0, backend="flashinfer", options=O(**opts)))(q, kv, packed)
    ref = reference.batch_prefill(cfg, q, kv, packed, layer=0, **opts)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    close(out, ref)


def test_prefill_bf16():
    cfg = cfg_(dtype="bfloat16")
    q, kv, packed = prefill_case(7, cfg)
    out = jax.jit(lambda q, kv, p: attention.batch_prefill(
        cfg, q, kv, p, layer=1, backend="flashinfer"))(q, kv, packed)
    close(out, reference.batch_prefill(cfg, q, kv, packed, layer=1), 3e-2)


# ----------------------------------------------------------------------------------------------
# POD and batch POD


@pytest.mark.parametrize("return_lse", [False, True])
def test_pod(return_lse):
    cfg = cfg_()
    q_d, kv, packed = decode_case(8, cfg)
    rng = np.random.default_rng(9)
    q_p = rand(rng, (40, HQ, D))
    k_p, v_p = rand(rng, (64, HKV, D)), rand(rng, (64, HKV, D))
    f = jax.jit(lambda *a: attention.pod(cfg, *a, layer=1, backend="flashinfer",
                                         options=O(causal=True, return_lse=return_lse)))
    got = f(q_p, k_p, v_p, q_d, kv, packed)
    want = reference.pod(cfg, q_p, k_p, v_p, q_d, kv, packed, layer=1, causal_p=True,
                         return_lse=return_lse)
    if return_lse:
        close(got[0], want[0])
        close_lse(got[1][0], want[1][0], 2e-2)
        close_lse(got[1][1], want[1][1], 2e-2)
    else:
        close(got, want)


def test_pod_back_to_back():
    """Chained POD calls in one program (FlashInfer's POD resets its scheduler counters on the
    legacy stream: the bridge must keep that ordered with XLA's stream)."""
    cfg = cfg_()
    q_d, kv, packed = decode_case(15, cfg)
    rng = np.random.default_rng(16)
    q_p = rand(rng, (64, HQ, D))
    k_p, v_p = rand(rng, (64, HKV, D)), rand(rng, (64, HKV, D))

    def chain(pod_fn, q_p, q_d):
        for _ in range(4):
            q_p, q_d = pod_fn(q_p, k_p, v_p, q_d, kv, packed)
        return q_p, q_d

    got = jax.jit(lambda a, b: chain(lambda *x: attention.pod(
        cfg, *x, layer=1, options=O(causal=True), backend="flashinfer"), a, b))(q_p, q_d)
    want = chain(lambda *x: reference.pod(cfg, *x, layer=1, causal_p=True), q_p, q_d)
    close(got, want, 3e-2)


@pytest.mark.parametrize("causal_p", [True, False])
def test_batch_pod(causal_p):
    cfg = cfg_()
    q_p, _, packed_p = prefill_case(10, cfg)
    # the two batches draw their pages independently from one pool: no poison here (the other
    # tests poison every free page)
    rng = np.random.default_rng(11)
    kv = rand(rng, cfg.kv_shape)
    packed_d, _ = make_packed(rng, cfg, [37, 0, 50, 1])
    q_d = rand(rng, (4, HQ, D))
    got = jax.jit(lambda *a: attention.batch_pod(cfg, *a, layer=1, backend="flashinfer",
                                                 options=O(causal=causal_p, return_lse=True)))(
        q_p, packed_p, q_d, packed_d, kv)
    want = reference.batch_pod(cfg, q_p, packed_p, q_d, packed_d, kv, layer=1, causal_p=causal_p,
                               return_lse=True)
    close(got[0], want[0])
    close_lse(got[1][0], want[1][0], 2e-2)
    close_lse(got[1][1], want[1][1], 2e-2)


def test_pod_rejects_soft_cap():
    cfg = cfg_()
    q_d, kv, packed = decode_case(12, cfg)
    with pytest.raises(ValueError, match="soft cap"):
        attention.pod(cfg, q_d, q_d[:, :HKV], q_d[:, :HKV], q_d, kv, packed,
                      options=O(logits_soft_cap=10.0), backend="flashinfer")


# ----------------------------------------------------------------------------------------------
# append and full steps (no KV page copied)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("impl", ["backend", "scatter"])
def test_append_in_place(layout, impl):
    cfg = cfg_(layout)
    rng = np.random.default_rng(13)
    lens = [37, 0, 100, 1, 161]
    packed, _ = make_packed(rng, cfg, lens)
    kv = rand(rng, cfg.kv_shape)
    keys, vals = rand(rng, (5, HKV, D)), rand(rng, (5, HKV, D))
    want = sj.append_kv(cfg, kv, keys, vals, packed, layer=1)

    def step(kv, keys, vals, packed):
        plan = attention.plan_decode(cfg, packed, HQ, backend="flashinfer")
        return attention.append_kv(cfg, kv, keys, vals, packed, layer=1, plan=plan, impl=impl)

    jstep = jax.jit(step, donate_argnums=0)
    kv2 = kv + 0
    ptr = kv2.unsafe_buffer_pointer()
    out = jstep(kv2, keys, vals, packed)
    assert out.unsafe_buffer_pointer() == ptr, "the pool was copied"
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    # stacked K/V rows (values=None) give the same pool
    stacked = jax.jit(lambda kv, kvr, packed: attention.append_kv(
        cfg, kv, kvr, None, packed, layer=1,
        plan=attention.plan_decode(cfg, packed, HQ, backend="flashinfer"), impl=impl),
        donate_argnums=0)(kv + 0, jnp.stack([keys, vals], 1), packed)
    np.testing.assert_array_equal(np.asarray(stacked, np.float32), np.asarray(want, np.float32))


def _decode_step(cfg, use_scan, backend, append_impl="scatter", planning="device",
                 decode_kernel="auto"):
    """allocate_decoding -> pack -> plan -> per layer (append_kv + batch_decode), one jit.
    planning "device": plan_decode inside the step; "host": adopt the step's HostPlan (`hp`)."""

    def step(state, kv, seq_ids, q, k, v, hp=None):
        state, status = sj.allocate_decoding(state, seq_ids)
        ok = sj.ok(status)
        packed = sj.pack_for_flashinfer(state, seq_ids)
        if planning == "host":
            plan = attention.adopt_plan(hp, packed)
            ok = ok & plan.ok
        else:
            plan = attention.plan_decode(cfg, packed, HQ, backend=backend,
                                         options=O(decode_kernel=decode_kernel))

        def layer_fn(kv, layer):
            kv = attention.append_kv(cfg, kv, k[layer], v[layer], packed, layer=layer, plan=plan,
                                     impl=append_impl if backend != "reference" else "scatter")
            out = attention.batch_decode(cfg, q[layer], kv, packed, layer=layer, plan=plan)
            return kv, out

        if use_scan:
            kv, outs = jax.lax.scan(layer_fn, kv, jnp.arange(cfg.num_layers, dtype=jnp.int32))
        else:
            outs = []
            for layer in range(cfg.num_layers):
                kv, o = layer_fn(kv, layer)
                outs.append(o)
            outs = jnp.stack(outs)
        return state, kv, outs, ok

    return jax.jit(step, donate_argnums=(1,))


@pytest.mark.parametrize("use_scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("append_impl", ["scatter", "backend"])
def test_decode_step_in_one_jit_copies_no_page(bridge, use_scan, append_impl):
    cfg = cfg_(num_layers=3, num_pages=128)
    rng = np.random.default_rng(14)
    state = sj.init_state(cfg)
    ids = jnp.arange(5, dtype=jnp.int32)
    state, status = sj.allocate(state, ids, jnp.asarray([30, 15, 1, 64, 47], jnp.int32))
    ok = sj.ok(status)
    assert bool(ok.all())
    kv = rand(rng, cfg.kv_shape)
    seq_ids = jnp.asarray([0, 1, -1, 2, 3, 4], jnp.int32)
    step = _decode_step(cfg, use_scan, bridge, append_impl)
    ref_step = _decode_step(cfg, use_scan, "reference")
    ref_state, ref_kv = state, kv + 0
    for it in range(3):
        n = seq_ids.shape[0]
        q = rand(rng, (cfg.num_layers, n, HQ, D))
        k, v = rand(rng, (cfg.num_layers, n, HKV, D)), rand(rng, (cfg.num_layers, n, HKV, D))
        ptr = kv.unsafe_buffer_pointer()
        state, kv, outs, ok = step(state, kv, seq_ids, q, k, v)
        assert bool(ok.all())
        assert kv.unsafe_buffer_pointer() == ptr, "the KV pool was copied"
        ref_state, ref_kv, ref_outs, _ = ref_step(ref_state, ref_kv, seq_ids, q, k, v)
        close(outs, ref_outs)
        np.testing.assert_array_equal(np.asarray(kv, np.float32), np.asarray(ref_kv, np.float32))
    assert step._cache_size() == 1, "the step retraced"


def _host_planned_decode_steps(backend, use_scan, kernel, seed, on_plan=lambda hp: None,
                               n_req=5):
    """12 decode steps adopting host plans of `backend`, with a padding row (the third): each step
    matches the reference step and writes the pool in place. Returns (the jitted step, the last
    step's state, kv, seq_ids, q, k, v, host lengths) for further checks. `n_req` requests (5:
    lengths 30, 15, 1, 64, 47; more: random lengths up to 64)."""
    cfg = cfg_(num_layers=3, num_pages=max(160, 6 * n_req), max_pages=16,
               max_seqs=max(16, n_req))
    rng = np.random.default_rng(seed)
    state = sj.init_state(cfg)
    lens0 = np.asarray([30, 15, 1, 64, 47]) if n_req == 5 else rng.integers(1, 65, size=n_req)
    state, status = sj.allocate(state, jnp.arange(n_req, dtype=jnp.int32),
                                jnp.asarray(lens0, jnp.int32))
    assert bool(sj.ok(status).all())
    kv = rand(rng, cfg.kv_shape)
    seq_ids = jnp.asarray([0, 1, -1, *range(2, n_req)], jnp.int32)
    host_lens = np.concatenate([lens0[:2], [0], lens0[2:]])
    step = _decode_step(cfg, use_scan, backend, "scatter", planning="host")
    ref_step = _decode_step(cfg, use_scan, "reference")
    ref_state, ref_kv = state, kv + 0
    q = k = v = None
    for it in range(12):
        host_lens = np.where(host_lens > 0, host_lens + 1, 0)
        hp = attention.host_plan_decode(cfg, host_lens, HQ, backend=backend,
                                        options=O(decode_kernel=kernel))
        on_plan(hp)
        n = n_req + 1
        q = rand(rng, (cfg.num_layers, n, HQ, D))
        k, v = rand(rng, (cfg.num_layers, n, HKV, D)), rand(rng, (cfg.num_layers, n, HKV, D))
        ptr = kv.unsafe_buffer_pointer()
        state, kv, outs, ok = step(state, kv, seq_ids, q, k, v, hp)
        ref_state, ref_kv, ref_outs, _ = ref_step(ref_state, ref_kv, seq_ids, q, k, v)
        assert bool(ok.all()), f"step {it}: the host plan did not match"
        assert kv.unsafe_buffer_pointer() == ptr, "the KV pool was copied"
        close(outs, ref_outs)
        np.testing.assert_array_equal(np.asarray(kv, np.float32), np.asarray(ref_kv, np.float32))
    return step, (cfg, state, kv, seq_ids, q, k, v, host_lens)


@pytest.mark.parametrize("use_scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("kernel", ["tensor_core", "cuda_core"])
def test_decode_steps_with_host_plans(bridge, use_scan, kernel):
    """Queued host plans (made before each step, adopted with no sync) over 12 steps: more steps
    than the ring of workspaces; the step compiles once."""
    step, _ = _host_planned_decode_steps(bridge, use_scan, kernel, seed=21)
    assert step._cache_size() == 1, "the step retraced"


def test_host_plan_mismatch_is_flagged_and_the_queue_recovers(bridge):
    cfg = cfg_(num_layers=2, num_pages=128)
    rng = np.random.default_rng(22)
    state = sj.init_state(cfg)
    ids = jnp.arange(3, dtype=jnp.int32)
    state, _ = sj.allocate(state, ids, jnp.asarray([40, 9, 77], jnp.int32))
    kv = rand(rng, cfg.kv_shape)
    step = _decode_step(cfg, False, bridge, "scatter", planning="host")
    ref_step = _decode_step(cfg, False, "reference")
    q = rand(rng, (cfg.num_layers, 3, HQ, D))
    k = rand(rng, (cfg.num_layers, 3, HKV, D))
    lens = np.asarray([41, 10, 78])
    # wrong lengths: flagged (the pool is still written correctly: append uses the device batch)
    hp = attention.host_plan_decode(cfg, lens + 20, HQ, backend=bridge)
    state2, kv2, _, ok = step(state, kv + 0, ids, q, k, k, hp)
    ref_state, ref_kv, _, _ = ref_step(state, kv + 0, ids, q, k, k)
    assert not bool(ok.all())
    np.testing.assert_array_equal(np.asarray(kv2, np.float32), np.asarray(ref_kv, np.float32))
    # a plan left over from a step that never ran: the next step adopts it and says so
    hp_a = attention.host_plan_decode(cfg, lens + 7, HQ, backend=bridge)
    hp_b = attention.host_plan_decode(cfg, lens + 1, HQ, backend=bridge)
    state3, kv3, _, ok = step(state2, kv2, ids, q, k, k, hp_b)
    assert not bool(ok.all())
    assert bridge.discard_host_plans() == 1
    del hp_a
    hp = attention.host_plan_decode(cfg, lens + 2, HQ, backend=bridge)
    _, _, outs, ok = step(state3, kv3, ids, q, k, k, hp)
    assert bool(ok.all())
    r_state, r_kv, _, _ = ref_step(ref_state, ref_kv, ids, q, k, k)
    _, _, ref_outs, _ = ref_step(r_state, r_kv, ids, q, k, k)
    close(outs, ref_outs)


@pytest.mark.parametrize("kind", ["prefill", "batch_pod"])
def test_host_plans_of_chunked_prefill_steps(bridge, kind):
    """The CPU test of prefill and batch-POD host plans (tests/test_bridge_cpu.py), on
    FlashInfer's kernels: chunked prefill steps (and a decode batch) adopting host plans over more
    steps than the ring holds, against the reference."""
    cpu_tests.test_host_plans_of_chunked_prefill_steps(bridge, kind, "bridge")


# ----------------------------------------------------------------------------------------------
# static host plans (FlashInferBackend(cuda_graphs=True)): plan_info fixed in the program, the
# schedule a step argument, the runs on the FFI target XLA may capture in a CUDA graph

_GRAPH_BACKEND: list = []


def _graphs_backend() -> FlashInferBackend:
    if not ffi.available():
        pytest.skip(f"XLA FFI bridge unavailable: {ffi.unavailable_reason()}")
    if not _GRAPH_BACKEND:
        _GRAPH_BACKEND.append(FlashInferBackend(transport="ffi", cuda_graphs=True))
    return _GRAPH_BACKEND[0]


@pytest.mark.parametrize("kernel", ["tensor_core", "cuda_core"])
def test_static_host_plans_over_decode_steps(kernel):
    """12 decode steps adopting static host plans: each matches the reference step; the step
    compiles once per distinct plan_info (once for the tensor-core kernel, whose CUDA-graph plan
    depends on the shape only); a plan made for other lengths is flagged; nothing is queued."""
    be = _graphs_backend()
    infos = set()

    def on_plan(hp):
        assert hp.meta.static is not None and hp.schedule is not None, "not a static plan"
        infos.add(hp.meta.static)

    step, (cfg, state, kv, seq_ids, q, k, v, host_lens) = _host_planned_decode_steps(
        be, False, kernel, seed=23, on_plan=on_plan)
    assert step._cache_size() == len(infos), "the step retraced for the same plan_info"
    if kernel == "tensor_core":
        assert len(infos) == 1, f"CUDA-graph plan_info changed with the lengths: {infos}"
    hp = attention.host_plan_decode(cfg, np.where(host_lens > 0, host_lens + 9, 0), HQ,
                                    backend=be, options=O(decode_kernel=kernel))
    *_, ok = step(state, kv, seq_ids, q, k, v, hp)
    assert not bool(ok.all()), "a plan for other lengths was not flagged"
    assert be.discard_host_plans() == 0, "static plans queue nothing"


def test_static_host_plans_without_the_kv_split_at_a_full_batch():
    """40 live requests x 4 KV heads fill the H200's 132 SMs: the CUDA-graph decode plan drops
    FlashInfer's KV split (`fi_provider.whole_kv_per_cta`; plan_info's last field, split_kv, is 0)
    and 12 steps still match the reference; with 5 requests the split stays (split_kv 1)."""
    be = _graphs_backend()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n_req = -(-sms // HKV) + 7
    infos = set()
    step, _ = _host_planned_decode_steps(be, False, "tensor_core", seed=24, n_req=n_req,
                                         on_plan=lambda hp: infos.add(hp.meta.static))
    assert len(infos) == 1 and next(iter(infos))[-1] == 0, f"split_kv not dropped: {infos}"
    assert step._cache_size() == 1
    few = set()
    _host_planned_decode_steps(be, False, "tensor_core", seed=25,
                               on_plan=lambda hp: few.add(hp.meta.static))
    assert len(few) == 1 and next(iter(few))[-1] == 1, f"the split was dropped for 5 requests: {few}"


@pytest.mark.parametrize("kind", ["prefill", "batch_pod"])
def test_static_host_plans_of_chunked_prefill_steps(kind):
    """The chunked-prefill host-plan test (tests/test_bridge_cpu.py) with static prefill and batch
    POD plans (batch POD then runs as an FFI call too)."""
    cpu_tests.test_host_plans_of_chunked_prefill_steps(_graphs_backend(), kind, "bridge")
