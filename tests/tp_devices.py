"""Tensor-parallel checks that need several devices: run as a script in a fresh process with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (tests/test_sharding.py does), since the
test process has already initialised JAX with one CPU device. Prints one JSON object.

    python -m tests.tp_devices          # from the repository root
"""

from __future__ import annotations

import json
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import seqattn_jax as sj  # noqa: E402
from seqattn_jax import sharding  # noqa: E402
from seqattn_jax.models.llama import LlamaConfig, LlamaModel  # noqa: E402
from seqattn_jax.serving import Engine, EngineConfig, SamplingParams  # noqa: E402

CFG = LlamaConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4,
                  head_dim=16, ffn_dim=128, dtype="float32")
CACHE = sj.CacheConfig(num_pages=64, page_size=4, num_kv_heads=4, head_dim=16, max_seqs=4,
                       max_pages_per_seq=16, num_layers=2, dtype="float32")


def _prompts():
    rng = np.random.default_rng(7)
    prefix = rng.integers(0, CFG.vocab_size, size=9)
    out = []
    for i in range(7):
        own = rng.integers(0, CFG.vocab_size, size=int(rng.integers(2, 20)))
        out.append(np.concatenate([prefix, own]) if i % 2 else own)
    return out


def _pointers(kv) -> list[int]:
    return [s.data.unsafe_buffer_pointer() for s in
            sorted(kv.addressable_shards, key=lambda s: s.device.id)]


def _serve(model, params, mesh, **ecfg):
    """Greedy tokens of every prompt, and what the pool looked like along the way."""
    eng = Engine(model, params, CACHE, EngineConfig(chunk=16, max_prefill_requests=3,
                                                    backend="reference", mesh=mesh, **ecfg))
    if mesh is not None and mesh.size == 2 and not ecfg:
        eng.warmup()   # every step program, on scratch state, before serving
    before = _pointers(eng.kv)
    shardings, pointers = set(), set()
    handles = [eng.submit(p, SamplingParams(max_new_tokens=n))
               for p, n in zip(_prompts(), [5, 3, 7, 1, 6, 4, 8])]
    while eng.step():
        shardings.add(str(eng.kv.sharding.spec) if mesh is not None else "single")
        pointers.add(tuple(_pointers(eng.kv)))
        if mesh is not None:   # raises unless still sharded on KV heads over the mesh
            sharding.check_pool_sharding(eng.kv, CACHE, mesh)
    return {"tokens": [h.result().tolist() for h in handles],
            "steps": dict(eng.stats.steps),
            "pool_specs": sorted(shardings),
            "pointers_kept": pointers == {tuple(before)},
            "local_pool_shape": list(eng.kv.addressable_shards[0].data.shape),
            "multi_steps": eng.stats.multi_steps,
            "idle": eng.check_idle()}


def _hlo_collectives(model, params, mesh) -> dict:
    """Collectives of the compiled decode step (an all-gather of the pool would be a copy)."""
    from seqattn_jax.serving.engine import _jitted_step  # noqa: PLC0415
    from seqattn_jax.serving.step import StepKind, pack_inputs, step_inputs_spec  # noqa: PLC0415

    eng = Engine(model, params, CACHE, EngineConfig(chunk=16, backend="reference", mesh=mesh,
                                                    host_plans=False))
    kind = StepKind("decode", host_plan=False)
    spec = step_inputs_spec(kind, eng.B, eng.Bp, 16)
    inp = pack_inputs(spec, {k: np.zeros(s, d) for k, (s, d) in spec.items()})
    fn = _jitted_step(model, CACHE, kind, eng.B, eng.Bp, 16, eng.backend, eng.tp)
    hlo = fn.lower(eng.params, eng.kv, eng.state, eng.last_tok, inp, None).compile().as_text()
    lines = [ln for ln in hlo.splitlines() if "all-gather(" in ln or "all-reduce(" in ln
             or "all-to-all(" in ln or "collective-permute(" in ln]
    pool_elems = int(np.prod(CACHE.kv_shape))
    big = [ln for ln in lines if "all-gather(" in ln and
           any(int(np.prod([int(x) for x in dims.split(",") if x])) >= pool_elems // 4
               for dims in _shapes(ln))]
    # the layer's all-reduces carry [rows, d_model] activations (after wo, after w_down)
    hidden = [ln for ln in lines if "all-reduce(" in ln and
              any(dims.endswith(f",{CFG.d_model}") for dims in _shapes(ln))]
    # the vocabulary-split lm_head's greedy argmax: per device a (max, index) pair per row, gathered
    gathered = [int(np.prod([int(x) for x in _shapes(ln)[0].split(",") if x]))
                for ln in lines if "all-gather(" in ln]
    return {"all_reduce": sum("all-reduce(" in ln for ln in lines),
            "hidden_all_reduce": len(hidden),
            "all_gather": len(gathered), "largest_all_gather": max(gathered, default=0),
            "rows": eng.B, "lm_head_spec": str(eng.params["lm_head"].sharding.spec),
            "all_to_all": sum("all-to-all(" in ln for ln in lines),
            "pool_sized_all_gather": len(big)}


def _shapes(line: str) -> list[str]:
    import re  # noqa: PLC0415

    return re.findall(r"(?:f32|s32|pred)\[([0-9,]*)\]", line)


def _errors() -> dict:
    out = {}
    mesh4 = sharding.tp_mesh(4)
    cache2 = CACHE.__class__(**{**CACHE.__dict__, "num_kv_heads": 2})
    cfg2 = LlamaConfig(**{**CFG.__dict__, "num_kv_heads": 2})
    tries = {
        "engine_heads": lambda: Engine(LlamaModel(cfg2, tp=2), None, cache2,
                                       EngineConfig(backend="reference", mesh=mesh4)),
        "shard_params_heads": lambda: sharding.shard_params(
            LlamaModel(cfg2).init_params(0), cfg2, mesh4),
        "shard_pool_heads": lambda: sharding.shard_pool(sj.init_kv(cache2), cache2, mesh4),
        "pool_wrong_devices": lambda: sharding.check_pool_sharding(
            sharding.shard_pool(sj.init_kv(CACHE), CACHE, sharding.tp_mesh(2)), CACHE, mesh4),
        "pool_replicated": lambda: sharding.check_pool_sharding(
            jax.device_put(sj.init_kv(CACHE), sharding.TensorParallel(mesh4).replicated), CACHE,
            mesh4),
        "engine_model_tp": lambda: Engine(LlamaModel(CFG, tp=2), None, CACHE,
                                          EngineConfig(backend="reference", mesh=mesh4)),
        "engine_mesh_axis": lambda: EngineConfig(mesh=mesh4, mesh_axis="model"),
        "flashinfer_refused": lambda: sharding.TensorParallel(sharding.tp_mesh(2)).check(
            CACHE, CFG.num_heads, "flashinfer", "Engine"),
    }
    for name, f in tries.items():
        try:
            f()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def _flashinfer_mechanics() -> dict:
    """The FlashInfer backend's plan / adopt / run callbacks under shard_map, with the bridge's
    torch CPU kernels (FlashInfer's own need a GPU): a float16 model over 2 devices against the
    same backend kind on one device, and each device's plan slots."""
    from seqattn_jax import bridge  # noqa: PLC0415

    cfg = LlamaConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=64, ffn_dim=256, dtype="float16")
    cache = sj.CacheConfig(num_pages=48, page_size=4, num_kv_heads=2, head_dim=64, max_seqs=4,
                           max_pages_per_seq=12, num_layers=2, dtype="float16")
    base = LlamaModel(cfg)
    params = base.init_params(5)
    prompts = _prompts()[:5]
    sampling = [SamplingParams(max_new_tokens=n) for n in (4, 6, 2, 5, 3)]
    out = {}
    for host_plans in (True, False):
        one = Engine(base, params, cache, EngineConfig(
            chunk=16, max_prefill_requests=3, host_plans=host_plans,
            backend=bridge.FlashInferBackend(provider="torch")))
        single = [o.tolist() for o in one.generate(prompts, sampling)]
        mesh = sharding.tp_mesh(2)
        be = bridge.FlashInferBackend(provider="torch", devices=mesh.devices.flat)
        model, sp = sharding.shard_llama(base, params, mesh)
        eng = Engine(model, sp, cache, EngineConfig(chunk=16, max_prefill_requests=3,
                                                    host_plans=host_plans, backend=be))
        tp2 = [o.tolist() for o in eng.generate(prompts, sampling)]
        per_dev: dict[int, int] = {}
        for slot in be.slots:
            per_dev[slot.device] = per_dev.get(slot.device, 0) + slot.num_plans
        out["host_plans" if host_plans else "device_plans"] = {
            "single": single, "tp2": tp2, "steps": sum(eng.stats.steps.values()),
            "plans_per_device": {str(k): v for k, v in sorted(per_dev.items())},
            "devices": list(be.devices), "idle": eng.check_idle()}
    return out


def main():
    assert len(jax.devices()) >= 4, jax.devices()
    base_model = LlamaModel(CFG)
    params = base_model.init_params(3)
    res = {"devices": len(jax.devices()), "single": _serve(base_model, params, None)}
    for n in (1, 2, 4):
        mesh = sharding.tp_mesh(n)
        model, sp = sharding.shard_llama(base_model, params, mesh)
        res[f"tp{n}"] = _serve(model, sp, mesh)
        if n == 2:
            res["hlo_tp2"] = _hlo_collectives(model, sp, mesh)
            res["tp2_multi_step"] = _serve(model, sp, mesh, decode_steps=3)
    res["errors"] = _errors()
    res["flashinfer_torch"] = _flashinfer_mechanics()
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
