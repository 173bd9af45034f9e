"""The serving engine on the reference backend (CPU): tokens against a dense model, modes, sampling,
stop conditions, streaming, bad input, cancellation, page leaks."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqattn_jax as sj
from seqattn_jax.reference_backend import ReferenceBackend
from seqattn_jax.serving import Engine, EngineConfig, SamplingParams, sample_tokens
from seqattn_jax.serving import engine as engine_mod
from seqattn_jax.serving.mirror import RecordingPrefixCache, mirror_differences
from tests.serving_model import TinyModel

MODEL = TinyModel()
PARAMS = MODEL.init(0)
CACHE = sj.CacheConfig(num_pages=48, page_size=4, num_kv_heads=2, head_dim=8, max_seqs=4,
                       max_pages_per_seq=12, num_layers=2, dtype="float32")


def _engine(**kw):
    kw.setdefault("chunk", 16)
    kw.setdefault("max_prefill_requests", 3)
    kw.setdefault("backend", "reference")
    return Engine(MODEL, PARAMS, CACHE, EngineConfig(**kw))


def _prompts(seed, n, lo=1, hi=20, prefix_len=9):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, MODEL.vocab_size, size=prefix_len)
    out = []
    for i in range(n):
        own = rng.integers(0, MODEL.vocab_size, size=int(rng.integers(lo, hi)))
        out.append(np.concatenate([prefix, own]) if i % 2 else own)
    return out


_REF: dict = {}


def _reference(prompt, n):
    key = (tuple(int(t) for t in prompt), n)
    if key not in _REF:
        _REF[key] = MODEL.greedy_reference(PARAMS, prompt, n)
    return _REF[key]


MODES = {
    "all_on": {},
    "no_async": {"async_steps": False},
    "no_mixed": {"mixed_steps": False},
    "no_prefix_cache": {"prefix_cache": False},
    "multi_step": {"decode_steps": 3},
    "multi_step_sync_device_plans": {"decode_steps": 4, "async_steps": False, "host_plans": False},
    "all_off": {"async_steps": False, "mixed_steps": False, "prefix_cache": False,
                "host_plans": False},
    "overlap_dispatch": {"overlap_dispatch": True},
    "overlap_dispatch_multi_step": {"overlap_dispatch": True, "decode_steps": 3},
}


# all_off and multi_step_sync_device_plans (device plans) compile their own step programs: slow.
# The other modes run the all_on programs (each compiles once per process) or, multi_step, one
# more decode program, so they cost a few engine steps.
@pytest.mark.parametrize("mode", [m if m not in ("all_off", "multi_step_sync_device_plans") else
                                  pytest.param(m, marks=pytest.mark.slow) for m in sorted(MODES)])
def test_greedy_equals_dense_model_in_every_mode(mode):
    prompts = _prompts(1, 9)
    gen = [int(n) for n in np.random.default_rng(2).integers(1, 8, size=len(prompts))]
    eng = _engine(**MODES[mode])
    outs = eng.generate(prompts, [SamplingParams(max_new_tokens=n) for n in gen])
    for p, n, o in zip(prompts, gen, outs):
        assert list(o) == _reference(p, n)
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}
    if mode == "all_on":
        assert eng.stats.steps["mixed"] > 0 and eng.stats.reused_tokens > 0
    if mode.startswith("multi_step"):
        assert eng.stats.multi_steps > 0, "no multi-step decode ran"


def test_each_step_program_compiles_once():
    eng = _engine()
    eng.generate(_prompts(3, 12), SamplingParams(max_new_tokens=5))
    mine = {k: v for k, v in engine_mod.STEP_TRACES.items() if k[0] is MODEL or k[0] == MODEL}
    assert mine and max(mine.values()) == 1, mine


@pytest.mark.parametrize("mixed", [pytest.param(True, marks=pytest.mark.slow), False])
def test_warmup_compiles_what_serving_runs_and_nothing_else(mixed):
    """warmup() traces each program the config can run; without mixed steps no mixed program
    (FlashInfer would otherwise build its batch-POD kernel for nothing); serving then traces
    nothing new."""
    C = 10 if mixed else 14   # a chunk no other test uses: these programs are this test's own
    eng = _engine(mixed_steps=mixed, chunk=C, chunk_buckets=(C,))
    eng.warmup()
    kinds = {k[2].kind for k in engine_mod.STEP_TRACES if k[0] is MODEL and k[5] == C}
    assert kinds == ({"prefill", "decode", "mixed"} if mixed else {"prefill", "decode"})
    before = dict(engine_mod.STEP_TRACES)
    eng.generate(_prompts(4, 6), SamplingParams(max_new_tokens=4))
    assert dict(engine_mod.STEP_TRACES) == before


class LiveRowsBackend(ReferenceBackend):
    """The reference backend whose decode host plans are fixed in the step program differently
    with many and with few live rows, like FlashInfer's CUDA-graph decode plans (which drop the
    KV split when the live rows fill the GPU): static = ("many",) with >= 3 live rows."""

    def __eq__(self, other):
        return type(other) is LiveRowsBackend

    def __hash__(self):
        return hash(LiveRowsBackend)

    def host_plan(self, config, meta, layout):
        if meta.kind == "decode":
            live = int(np.count_nonzero(np.diff(layout["indptr"]) > 0))
            meta = dataclasses.replace(meta, static=("many" if live >= 3 else "few",))
        return super().host_plan(config, meta, layout)


@pytest.mark.parametrize("steps", [1, 3])
def test_warmup_compiles_the_plan_variants_live_rows_select(steps):
    """A backend whose decode plan (and so the step program) depends on how many rows are live:
    warm-up compiles each variant serving reaches, including K-step dispatches in which rows that
    reach max_new_tokens sit out the later sub-steps (live rows drop within the dispatch); the
    workload's greedy tokens still equal the dense model's."""
    eng = _engine(backend=LiveRowsBackend(), decode_steps=steps, chunk=18, chunk_buckets=(18,),
                  prefix_cache=False)
    eng.warmup()
    before = dict(engine_mod.STEP_TRACES)
    prompts = _prompts(11, 4, lo=2, hi=5, prefix_len=0)
    gen = [5, 6, 8, 12]     # rows end at different sub-steps: 4 -> 3 -> 2 -> 1 live
    outs = eng.generate(prompts, [SamplingParams(max_new_tokens=n) for n in gen])
    for p, n, o in zip(prompts, gen, outs):
        assert list(o) == _reference(p, n)
    assert dict(engine_mod.STEP_TRACES) == before, "serving compiled a program warm-up did not"
    mine = {k[2] for k in before if k[6] == LiveRowsBackend() and k[5] == 18}
    assert any(k.steps == steps for k in mine)


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    sp = SamplingParams(max_new_tokens=8, temperature=3.0, top_k=40, top_p=0.98, seed=1234)
    prompt = _prompts(4, 1)[0]
    alone = _engine().generate([prompt], sp)[0]
    others = _prompts(5, 5)
    crowd = _engine().generate(others[:2] + [prompt] + others[2:],
                               [SamplingParams(max_new_tokens=6, temperature=1.0, seed=i)
                                for i in range(2)] + [sp] + [SamplingParams(max_new_tokens=4)] * 3)
    np.testing.assert_array_equal(alone, crowd[2])
    # multi-step decode samples with the same per-token counters
    np.testing.assert_array_equal(alone, _engine(decode_steps=3).generate([prompt], sp)[0])
    other_seed = _engine().generate([prompt], SamplingParams(
        max_new_tokens=8, temperature=3.0, top_k=40, top_p=0.98, seed=99))[0]
    assert not np.array_equal(alone, other_seed)


@pytest.mark.parametrize("steps", [1, 4])
def test_stop_token_and_max_tokens_end_at_the_right_token(steps):
    prompt = _prompts(6, 1)[0]
    ref = _reference(prompt, 10)
    stop = ref[3]
    first = ref.index(stop)
    eng = _engine(decode_steps=steps)
    h_stop = eng.submit(prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    h_len = eng.submit(prompt, SamplingParams(max_new_tokens=5))
    eng.run()
    assert h_stop.tokens == ref[:first + 1] and h_stop.finish_reason == "stop"
    assert h_len.tokens == ref[:5] and h_len.finish_reason == "length"
    assert eng.check_idle()["pages_in_use"] == 0
    if steps > 1:
        assert eng.stats.multi_steps > 0


def test_streamed_tokens_arrive_in_order_and_complete():
    prompts = _prompts(7, 6)
    eng = _engine()
    seen = {i: [] for i in range(len(prompts))}
    handles = [eng.submit(p, SamplingParams(max_new_tokens=6),
                          on_token=seen[i].append) for i, p in enumerate(prompts)]
    streamed = list(handles[0])           # drives the engine until request 0 is done
    assert streamed == _reference(prompts[0], 6)
    eng.run()
    for i, (p, h) in enumerate(zip(prompts, handles)):
        assert seen[i] == h.tokens == _reference(p, 6)
        assert list(h) == h.tokens and h.done


def test_bad_requests_get_clear_errors_and_leave_others_alone():
    eng = _engine()
    good = eng.submit(_prompts(8, 1)[0], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.submit([], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.submit([1, 2, MODEL.vocab_size], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="can hold at most"):
        eng.submit(np.zeros(40, np.int32), SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    eng.run()
    assert good.tokens == _reference(_prompts(8, 1)[0], 4)


def test_cancelled_requests_free_their_pages():
    prompts = _prompts(9, 6, lo=10, hi=20)
    eng = _engine()
    hs = [eng.submit(p, SamplingParams(max_new_tokens=12)) for p in prompts]
    hs[5].cancel()                       # still waiting
    for _ in range(4):
        eng.step()
    hs[0].cancel()                       # running (prefilled, decoding)
    eng.run()
    assert hs[0].finish_reason == "cancelled" and len(hs[0].tokens) < 12
    assert hs[5].finish_reason == "cancelled" and hs[5].tokens == []
    for p, h in zip(prompts[1:5], hs[1:5]):
        assert h.tokens == _reference(p, 12)
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}


def _random_workload(n_requests, seed, check_mirror=False, shared_prefix=False, **cfg):
    rng = np.random.default_rng(seed)
    eng = _engine(**cfg)
    prefix = rng.integers(0, MODEL.vocab_size, size=10)
    handles = []
    submitted = 0
    while submitted < n_requests or eng.has_work:
        for _ in range(int(rng.integers(0, 4))):
            if submitted < n_requests:
                p = rng.integers(0, MODEL.vocab_size, size=int(rng.integers(1, 30)))
                if shared_prefix and rng.random() < 0.5:
                    p = np.concatenate([prefix, p[:20]])
                sp = SamplingParams(max_new_tokens=int(rng.integers(1, 12)),
                                    temperature=float(rng.choice([0.0, 0.8])), seed=submitted,
                                    stop_token_ids=(int(rng.integers(0, MODEL.vocab_size)),))
                handles.append(eng.submit(p, sp))
                submitted += 1
        if handles and rng.random() < 0.15:
            handles[int(rng.integers(0, len(handles)))].cancel()
        eng.step()
        if check_mirror:   # the host's copies equal the device state after every iteration
            if eng.pc is not None:
                assert mirror_differences(eng.state, eng._host) == []
            else:           # without the prefix cache the host counts free pages itself
                assert eng.num_free_pages == int(np.sum(np.asarray(eng.state.refcount) == 0))
    for h in handles:
        assert h.done
        assert h.finish_reason == "cancelled" or len(h.tokens) >= 1
    return eng


@pytest.mark.parametrize("cfg", [{}, {"prefix_cache": False, "mixed_steps": False},
                                 {"decode_steps": 3}, {"overlap_dispatch": True}])
def test_random_workload_with_cancellations_leaks_no_page(cfg):
    eng = _random_workload(60, 11, **cfg)
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}


@pytest.mark.parametrize("steps", [1, 3])
def test_overlapped_dispatch_serves_the_same_tokens(steps):
    """EngineConfig.overlap_dispatch (step programs called on a worker thread while the host
    prepares the next step) against the same engine calling them inline: the same tokens,
    sampled ones included, step for step, and the same steps; the worker's calls all landed."""
    prompts = _prompts(5, 10, lo=2, hi=25)
    sampling = [SamplingParams(max_new_tokens=int(n), temperature=t, seed=i, top_k=k)
                for i, (n, t, k) in enumerate(zip([3, 9, 1, 6, 12, 4, 7, 2, 10, 5],
                                                  [0.0, 0.9] * 5, [0, 0, 5, 0, 3] * 2))]
    runs = {}
    for overlap in (False, True):
        eng = _engine(decode_steps=steps, overlap_dispatch=overlap)
        hs = [eng.submit(p, sp) for p, sp in zip(prompts, sampling)]
        trace = []
        while eng.step():
            trace.append(sum(len(h.tokens) for h in hs))
        runs[overlap] = ([h.tokens for h in hs], trace, dict(eng.stats.steps), eng.check_idle())
        assert eng._inflight is None and all(p.out is not None for p in eng._pending)
    assert runs[True] == runs[False]
    assert runs[True][3] == {"pages_in_use": 0, "active_slots": 0}


@pytest.mark.parametrize("steps", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_host_free_page_count_tracks_the_device(steps):
    """Without the prefix cache the host's free-page count (admission, the decode steps' page
    crossings, releases) equals the device allocator's after every iteration."""
    eng = _random_workload(25, 14, check_mirror=True, prefix_cache=False, decode_steps=steps)
    assert eng.stats.multi_steps > 0 or steps == 1
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}


@pytest.mark.parametrize("cfg", [{}, pytest.param({"decode_steps": 3, "mixed_steps": False},
                                                 marks=pytest.mark.slow)])
def test_prefix_cache_reads_only_the_cpu_mirror_which_tracks_the_device(cfg):
    """With the prefix cache, every PrefixCache call gets the allocator's CPU copy (never the
    device state, whose reads would wait for the steps in flight), and that copy equals the device
    state after every iteration of a random workload with cancellations."""
    seen = []
    orig = {}

    class Spy(RecordingPrefixCache):
        pass

    for name in ("admit_batch", "insert_slots", "release", "make_room", "evict"):
        orig[name] = getattr(RecordingPrefixCache, name)

        def spy(self, state, *a, _name=name, **kw):
            seen.append((_name, state.refcount.devices() == {jax.devices("cpu")[0]}))
            return orig[_name](self, state, *a, **kw)
        setattr(Spy, name, spy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "RecordingPrefixCache", Spy)
        eng = _random_workload(30, 13, check_mirror=True, shared_prefix=True, **cfg)
    assert eng.stats.reused_tokens > 0 and {n for n, _ in seen} >= {"admit_batch", "release",
                                                                      "insert_slots"}
    assert all(on_cpu for _, on_cpu in seen)
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}


def test_mirror_without_a_cpu_backend_stays_on_the_device_and_exact(monkeypatch):
    """Where JAX has no CPU backend (JAX_PLATFORMS=cuda) the allocator's copy stays on the
    state's device: the engine still serves the dense model's tokens and leaks nothing."""
    from seqattn_jax.serving import mirror as mirror_mod

    monkeypatch.setattr(mirror_mod, "host_device", lambda: None)
    eng = _engine()
    prompts, gens = _prompts(15, 6), [3, 7, 2, 9, 4, 6]
    outs = eng.generate(prompts, [SamplingParams(max_new_tokens=n) for n in gens])
    assert [list(o) for o in outs] == [_reference(p, n) for p, n in zip(prompts, gens)]
    assert eng.stats.reused_tokens > 0
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [{}, {"prefix_cache": False, "mixed_steps": False},
                                 {"decode_steps": 4}])
def test_random_workload_of_1000_requests_leaks_no_page(cfg):
    eng = _random_workload(1000, 12, **cfg)
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}


# ----------------------------------------------------------------------------------- sampling

def test_sampling_top_k_one_and_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 50))
    r = logits.shape[0]
    ones = jnp.ones((r,), jnp.float32)
    args = dict(seed=jnp.arange(r, dtype=jnp.uint32), counter=jnp.zeros((r,), jnp.int32),
                greedy_only=False)
    greedy = jnp.argmax(logits, -1)
    chex.assert_trees_all_equal(
        sample_tokens(logits, ones, jnp.ones((r,), jnp.int32), ones, **args), greedy)
    chex.assert_trees_all_equal(
        sample_tokens(logits, ones, jnp.zeros((r,), jnp.int32), ones * 1e-6, **args), greedy)
    chex.assert_trees_all_equal(
        sample_tokens(logits, ones * 0, jnp.zeros((r,), jnp.int32), ones, **args), greedy)


def test_sampling_follows_the_softmax_and_respects_top_k():
    v, n = 8, 4000
    base = jnp.log(jnp.asarray([0.4, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0]) + 1e-12)
    logits = jnp.broadcast_to(base, (n, v))
    ones = jnp.ones((n,), jnp.float32)
    f = jax.jit(sample_tokens, static_argnames="greedy_only")
    toks = f(logits, ones, jnp.zeros((n,), jnp.int32), ones, jnp.full((n,), 7, jnp.uint32),
             jnp.arange(n, dtype=jnp.int32), greedy_only=False)
    freq = np.bincount(np.asarray(toks), minlength=v) / n
    np.testing.assert_allclose(freq[:5], [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.03)
    toks = f(logits, ones, jnp.full((n,), 2, jnp.int32), ones, jnp.full((n,), 7, jnp.uint32),
             jnp.arange(n, dtype=jnp.int32), greedy_only=False)
    freq = np.bincount(np.asarray(toks), minlength=v) / n
    assert freq[2:].sum() == 0
    np.testing.assert_allclose(freq[:2], [4 / 7, 3 / 7], atol=0.03)


@pytest.mark.slow
def test_readme_serving_snippet_runs():
    """The README's Engine example runs as written (reference backend on a CPU)."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Engine(" in b)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
    assert ns["h"].done and len(ns["h"].tokens) == 8
    assert [len(o) for o in ns["outs"]] == [4, 4]


def test_releases_wait_while_nothing_waits_and_come_promptly_when_something_does():
    """With the prefix cache a release reads the device back (a sync). While no request waits,
    finished requests keep their slots until the last running one is done (one release call, not
    one per request); a waiting request gets a finished one's slot at once. Tokens unchanged."""
    prompts = _prompts(13, 5)
    gens = [2, 5, 8, 11, 3]
    eng = _engine()
    calls = []
    release = eng.pc.release
    eng.pc.release = lambda state, slots, **kw: calls.append(int(np.sum(np.asarray(slots) >= 0))) \
        or release(state, slots, **kw)
    outs = eng.generate(prompts[:4], [SamplingParams(max_new_tokens=n) for n in gens[:4]])
    assert calls == [4], calls                    # 4 slots, nothing waiting: one batch at the end
    assert [list(o) for o in outs] == [_reference(p, n) for p, n in zip(prompts, gens)][:4]
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}
    calls.clear()
    outs = eng.generate(prompts, [SamplingParams(max_new_tokens=n) for n in gens])  # 5 > 4 slots
    assert len(calls) >= 2 and calls[0] == 1, calls   # the first to finish frees a slot at once
    assert [list(o) for o in outs] == [_reference(p, n) for p, n in zip(prompts, gens)]
    assert eng.check_idle() == {"pages_in_use": 0, "active_slots": 0}
