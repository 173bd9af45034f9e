"""Tensor parallel (seqattn_jax.sharding) on CPU devices.

The checks that need several devices run once in a subprocess with 4 fake CPU devices
(tests/tp_devices.py): the engine's greedy tokens over 1, 2 and 4 devices against one device
without a mesh, the pool's sharding after every step, the donated pool's per-device buffers
kept (no copy of the cache per step), the compiled decode step's collectives, and the errors.
The layout arithmetic is checked here, in-process, against the model's own forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqattn_jax as sj
from seqattn_jax import sharding
from seqattn_jax.models.llama import LlamaConfig, LlamaModel, forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = LlamaConfig(vocab_size=97, d_model=48, num_layers=2, num_heads=8, num_kv_heads=4,
                  head_dim=8, ffn_dim=40, qkv_bias=True, dtype="float32")


def test_qkv_permutation_gives_each_group_its_own_heads():
    hq, hkv, hd, n = 8, 4, 2, 2
    perm = sharding.qkv_permutation(hq, hkv, hd, n)
    assert sorted(perm.tolist()) == list(range((hq + 2 * hkv) * hd))
    head_of = perm.reshape(n, -1, hd)[:, :, 0] // hd          # [group, heads in group]
    # group i: q heads 4i..4i+3, k heads 2i, 2i+1 (after Hq), v heads likewise (after Hq + Hkv)
    for i in range(n):
        assert head_of[i].tolist() == [4 * i + j for j in range(4)] + \
            [hq + 2 * i, hq + 2 * i + 1] + [hq + hkv + 2 * i, hq + hkv + 2 * i + 1]
    gu = sharding.gate_up_permutation(6, 3)
    assert gu.tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_grouped_layout_computes_the_same_forward(n):
    """The permuted params read with `tp=n` give the plain forward's logits (one device: this is
    the layout only; the shardings are tested in the subprocess)."""
    params = LlamaModel(CFG).init_params(1)
    perm_qkv = sharding.qkv_permutation(CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, n)
    perm_gu = sharding.gate_up_permutation(CFG.ffn_dim, n)
    grouped = {**params, "layers": [
        {**ly, "wqkv": ly["wqkv"][:, perm_qkv], "bqkv": ly["bqkv"][perm_qkv],
         "w_gate_up": ly["w_gate_up"][:, perm_gu]} for ly in params["layers"]]}
    tokens = jnp.asarray([5, 17, 3, 96, 42, 0], jnp.int32)
    positions = jnp.arange(6, dtype=jnp.int32)
    seen = []

    def attend(q, k, v, kv, layer):   # dense causal GQA over the step's rows (the oracle's)
        seen.append((q, k, v))
        g = q.shape[1] // k.shape[1]
        s = jnp.einsum("qhd,khd->hqk", q, jnp.repeat(k, g, 1)) / np.sqrt(q.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), s, -jnp.inf)
        return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, -1), jnp.repeat(v, g, 1)), kv

    rows = jnp.arange(6, dtype=jnp.int32)
    want, _ = forward(params, CFG, tokens, positions, None, attend, rows)
    got, _ = forward(grouped, CFG, tokens, positions, None, attend, rows, tp=n)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(seen[:CFG.num_layers], seen[CFG.num_layers:]):   # same q / k / v heads
        for x, y in zip(a, b):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_one_device_mesh_and_bad_arguments():
    mesh = sharding.tp_mesh(1)
    cache = sj.CacheConfig(num_pages=8, page_size=4, num_kv_heads=2, head_dim=8, max_seqs=2,
                           max_pages_per_seq=4, num_layers=2, dtype="float32", kv_layout="HND")
    kv = sharding.shard_pool(sj.init_kv(cache), cache, mesh)
    sharding.check_pool_sharding(kv, cache, mesh)
    assert sharding.pool_spec(cache) == jax.sharding.PartitionSpec(None, None, "tp", None, None)
    with pytest.raises(ValueError, match="n must be an int"):
        sharding.tp_mesh(len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="not 'model'"):
        sharding.TensorParallel(mesh, "model")
    with pytest.raises(ValueError, match="kv must be"):
        sharding.check_pool_sharding(jnp.zeros((3,)), cache, mesh)
    with pytest.raises(ValueError, match="LlamaModel.tp"):
        LlamaModel(CFG, tp=3)
    with pytest.raises(ValueError, match="plain parameter layout"):
        LlamaModel(CFG, tp=2).dense_logits(None, jnp.zeros((1, 2), jnp.int32))


@pytest.fixture(scope="module")
def devices4():
    # the suite's own XLA_FLAGS (conftest: fast CPU compiles) plus 4 fake CPU devices
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.tp_devices"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.slow
def test_engine_over_n_devices_gives_one_devices_greedy_tokens(devices4, n):
    assert devices4["devices"] == 4
    single, run = devices4["single"], devices4[f"tp{n}"]
    assert run["tokens"] == single["tokens"]
    assert run["steps"] == single["steps"] and run["steps"].get("mixed", 0) > 0
    assert run["idle"] == {"pages_in_use": 0, "active_slots": 0}
    # the pool stayed sharded on its KV-head axis, each device holding Hkv / n heads
    assert run["local_pool_shape"][3] == 4 // n
    if n > 1:
        assert run["pool_specs"] == ["P(None, None, None, 'tp')"]


@pytest.mark.slow
def test_multi_step_decode_over_two_devices_gives_one_devices_greedy_tokens(devices4):
    """EngineConfig.decode_steps=3 on a 2-device mesh: K forwards per program, each sub-step's plan
    made per device under shard_map; the same greedy tokens as one device, one step at a time."""
    run = devices4["tp2_multi_step"]
    assert run["tokens"] == devices4["single"]["tokens"]
    assert run["multi_steps"] > 0
    assert run["idle"] == {"pages_in_use": 0, "active_slots": 0}
    assert run["pool_specs"] == ["P(None, None, None, 'tp')"] and run["pointers_kept"]


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.slow
def test_no_copy_of_the_cache_per_step(devices4, n):
    """Every device's pool buffer is the one it started with after every step (donated and
    updated in place), and the compiled decode step gathers nothing pool-sized."""
    assert devices4[f"tp{n}"]["pointers_kept"]
    hlo = devices4["hlo_tp2"]
    assert hlo["pool_sized_all_gather"] == 0
    # the activations are all-reduced after wo and after w_down in each of the 2 layers (plus one
    # bool: the plan's ok over devices); nothing is exchanged all-to-all
    assert hlo["hidden_all_reduce"] == 2 * 2 and hlo["all_reduce"] == 2 * 2 + 1
    assert hlo["all_to_all"] == 0
    # lm_head is split by vocabulary (256 over 2), so greedy gathers only the per-device argmax:
    # a (max, index) pair per row and device, never a row of logits
    assert hlo["lm_head_spec"] == "P(None, 'tp')"
    assert 1 <= hlo["all_gather"] <= 2 and hlo["largest_all_gather"] <= hlo["rows"] * 2


@pytest.mark.parametrize("plans", ["host_plans", "device_plans"])
@pytest.mark.slow
def test_flashinfer_backend_plans_per_device_under_shard_map(devices4, plans):
    """FlashInferBackend(devices=...) with the bridge's torch CPU kernels over 2 devices: the
    same greedy tokens as on one device, and every device made (or adopted) its own plan in
    every step, through its own slots."""
    run = devices4["flashinfer_torch"][plans]
    assert run["tp2"] == run["single"]
    assert run["devices"] == [0, 1]
    assert run["plans_per_device"] == {"0": run["steps"], "1": run["steps"]}
    assert run["idle"] == {"pages_in_use": 0, "active_slots": 0}


@pytest.mark.slow
def test_errors_name_the_argument(devices4):
    err = devices4["errors"]
    assert "num_kv_heads = 2 does not divide by the mesh axis 'tp' of size 4" in err["engine_heads"]
    assert "cfg.num_kv_heads = 2" in err["shard_params_heads"]
    assert "cache.num_kv_heads = 2" in err["shard_pool_heads"]
    assert err["pool_wrong_devices"].startswith("kv lives on devices [0, 1]")
    assert "sharded on its KV-head axis" in err["pool_replicated"]
    assert "model.tp = 2" in err["engine_model_tp"]
    assert err["engine_mesh_axis"].startswith("EngineConfig.mesh")
    assert "FlashInfer over 2 devices needs a plan slot per device" in err["flashinfer_refused"]
