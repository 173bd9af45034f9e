"""FlashInfer kernels behind the bridge's plan/run callbacks (pinned: flashinfer 0.7.2.post1).

We call FlashInfer's module functions (`plan`, `run`, `paged_run`, `run_tensor`,
`append_paged_kv_cache`) directly, as its wrappers do, rather than the wrapper classes: a run must
take the layer's page indices as an explicit device buffer (the wrappers keep the indices they
were planned with), and one float workspace is shared by all plans. The argument lists mirror
`flashinfer/decode.py`, `prefill.py`, `pod.py` and `page.py` of that version; re-check them when
upgrading FlashInfer.

Kernels run on torch's current stream, which the callers set to XLA's stream.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

_FLOAT_WS_BYTES = 128 * 1024 * 1024
_INT_WS_BYTES = 8 * 1024 * 1024
_POD_TMP_BYTES = 32 * 1024 * 1024


def _fi():
    import flashinfer  # noqa: F401  (heavy: ~2 s, only when a GPU kernel is needed)
    import flashinfer.decode
    import flashinfer.page
    import flashinfer.pod
    import flashinfer.prefill
    import flashinfer.utils

    return flashinfer


def _torch_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
            "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}[name]


class _State:
    """Modules and workspaces of one plan slot."""


def _pos_code(mode: str) -> int:
    return {"NONE": 0, "ROPE_LLAMA": 1, "ALIBI": 2}[mode]


def _layout_code(layout: str) -> int:
    return {"NHD": 0, "HND": 1}[layout]


@functools.lru_cache(maxsize=None)
def _decode_module(q, kv, o, d, pos, sliding, softcap):
    fi = _fi()
    return fi.decode.get_batch_decode_module(q, kv, o, torch.int32, d, d, pos, sliding, softcap)


@functools.lru_cache(maxsize=None)
def _prefill_module(q, kv, o, d, pos, sliding, softcap):
    fi = _fi()
    return fi.prefill.get_batch_prefill_module("fa2", q, kv, o, torch.int32, d, d, pos, sliding,
                                               softcap, False)


@functools.lru_cache(maxsize=None)
def _raw_decode_module(*mod_args):
    """The CUDA-core decode module itself (tvm-ffi Module: plan / run functions)."""
    return _fi().decode.gen_batch_decode_module(*mod_args).build_and_load()


@functools.lru_cache(maxsize=None)
def _raw_prefill_module(*mod_args):
    """The FA2 prefill module itself (equal K/V strides variant: plan / paged_run)."""
    return _fi().prefill._gen_batch_prefill_primary_module("fa2", *mod_args, False).build_and_load()


@functools.lru_cache(maxsize=None)
def _pod_module(q, kv, o, d, pos, sliding):
    fi = _fi()
    return fi.pod.get_pod_module(q, kv, o, d, pos, sliding, False, False, torch.int32, pos,
                                 sliding, False)


@functools.lru_cache(maxsize=None)
def _batch_pod_module(q, kv, o, d, pos, sliding):
    fi = _fi()
    return fi.pod.get_batch_pod_module(q, kv, o, d, pos, sliding, False, False, torch.int32, pos,
                                       sliding, False)


@functools.lru_cache(maxsize=None)
def _page_module():
    fi = _fi()
    return fi.page.get_page_module()


# ----------------------------------------------------------------------------------------------
# FlashInfer's raw run argument lists: the one copy. The buffer_callback path calls the raw
# function with them (`FlashInferProvider._call`); the XLA FFI path compiles them into the C++
# shim's argument program (`ffi.program`). Symbols stand for the call's buffers; every other
# entry is a constant: None, a bool / int / float, or a torch tensor (a permanent device buffer).


class Arg:
    """A symbolic argument of a raw run: a buffer known only at the call."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name


FLOAT_WS, INT_WS, PLAN_INFO = Arg("float_ws"), Arg("int_ws"), Arg("plan_info")
Q, K, V, QO_INDPTR, INDPTR, INDICES, LPL, OUT, LSE = (
    Arg(n) for n in ("q", "k", "v", "qo_indptr", "indptr", "indices", "lpl", "out", "lse"))
# batch POD's prefill half (the decode half uses the names above)
INT_WS_P, PLAN_INFO_P, Q_P, QO_INDPTR_P, INDPTR_P, INDICES_P, LPL_P, OUT_P, LSE_P = (
    Arg(n) for n in ("int_ws_p", "plan_info_p", "q_p", "qo_indptr_p", "indptr_p", "indices_p",
                     "lpl_p", "out_p", "lse_p"))
Q_D, OUT_D, LSE_D = Arg("q_d"), Arg("out_d"), Arg("lse_d")
# append: the real token rows of each input, and the K / V halves of the (aliased) output pool
KEYS, VALUES, BATCH_INDICES, POSITIONS, K_CACHE, V_CACHE = (
    Arg(n) for n in ("keys", "values", "batch_indices", "positions", "k_cache", "v_cache"))


def run_function(slot):
    """The raw tvm-ffi run function of a decode / prefill slot."""
    st, key = slot.state, slot.key
    if key.kind == "decode" and key.decode_kernel == "cuda_core":
        return st.raw.run
    return st.raw.paged_run


def run_args(slot, rp) -> list:
    """`run_function(slot)`'s argument list (flashinfer 0.7.2.post1, `decode.py` / `prefill.py`:
    what their `run` / `paged_run` wrappers pass; RoPE's scale and theta as reciprocals)."""
    key, st = slot.key, slot.state
    scalars = [float(key.logits_soft_cap), float(rp.sm_scale), 1.0 / rp.rope_scale,
               1.0 / rp.rope_theta]
    if key.kind == "decode" and key.decode_kernel == "cuda_core":
        return [FLOAT_WS, INT_WS, PLAN_INFO, Q, K, V, INDPTR, INDICES, LPL, OUT, LSE, st.layout,
                key.window_left, st.pdl, st.alibi, *scalars]
    qo, mask = (st.arange_qo, 0) if key.kind == "decode" else (QO_INDPTR, 1 if key.causal else 0)
    return [FLOAT_WS, INT_WS, PLAN_INFO, Q, K, V, qo, INDPTR, INDICES, LPL, OUT, LSE, mask,
            st.layout, key.window_left, st.pdl, None, None, st.alibi, None, None, None, None, None,
            *scalars, 0]


def batch_pod_args(slot, rp) -> list:
    """`batch_pod_function(slot)`'s argument list (`pod.py`, BatchPODWithPagedKVCacheWrapper.run:
    the prefill half, then the decode half as a tensor-core decode, then PDL and the SM-aware
    scheduling counters); the float workspaces are the slot's two halves."""
    key, st = slot.key, slot.state
    rs, rt = 1.0 / rp.rope_scale, 1.0 / rp.rope_theta
    return [st.float_ws_p, INT_WS_P, PLAN_INFO_P, Q_P, K, V, QO_INDPTR_P, INDPTR_P, INDICES_P,
            LPL_P, OUT_P, LSE_P, 1 if key.causal else 0, st.layout, key.window_left, None, None,
            st.alibi, 0.0, float(rp.sm_scale), rs, rt,
            st.float_ws_d, INT_WS, PLAN_INFO, Q_D, K, V, st.arange_qo, INDPTR, INDICES, LPL,
            OUT_D, LSE_D, 0, st.layout, key.window_left, None, None, st.alibi, 0.0,
            float(rp.sm_scale), rs, rt, st.pdl, st.sm_aware_sched]


def batch_pod_function(slot):
    """The raw tvm-ffi batch POD function of a batch_pod slot."""
    return slot.state.bpod.run_tensor


def append_args(slot) -> list:
    """`append_function()`'s argument list (`page.py`, `append_paged_kv_cache`)."""
    return [KEYS, VALUES, BATCH_INDICES, POSITIONS, K_CACHE, V_CACHE, INDICES, INDPTR, LPL,
            slot.state.layout]


def append_function():
    return _page_module().append_paged_kv_cache


def whole_kv_per_cta(indptr, num_kv_heads: int, num_sms: int) -> bool:
    """Whether a CUDA-graph tensor-core decode plan drops FlashInfer's KV split: when the live
    requests (those with pages in `indptr`, int [B + 1]) alone give every SM a CTA (live x KV
    heads >= SMs). In CUDA-graph mode FlashInfer always splits: it writes partial outputs and runs
    a merge kernel even when each request gets one chunk. Measured on an H200
    (`benchmarks/decode_kernel_probe.py`, run Q) the unsplit plan is 5-16 % faster at the
    engine's decode shapes (batch 64-256, ctx 320-1024). With few live requests the split stays:
    it spreads a long context over the SMs. The choice is in plan_info, so each has its own step
    program (the engine's warm-up compiles every combination a K-step dispatch can reach)."""
    live = int(np.count_nonzero(np.diff(np.asarray(indptr)) > 0))
    return live * num_kv_heads >= num_sms


class FlashInferProvider:
    """FlashInfer's kernels. Owns the float workspaces (one per device) of its backend."""

    name = "flashinfer"
    has_ffi = True

    def __init__(self):
        self._float_ws: dict[tuple[str, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def unsupported(self, kind, options):
        return None

    def float_workspace(self, device: torch.device, name: str = "main") -> torch.Tensor:
        key = (name, device.index or 0)
        ws = self._float_ws.get(key)
        if ws is None:
            with self._lock:
                ws = self._float_ws.get(key)
                if ws is None:
                    ws = self._float_ws[key] = torch.zeros(_FLOAT_WS_BYTES, dtype=torch.uint8,
                                                           device=device)
        return ws

    def make_state(self, key):
        fi = _fi()
        dev = torch.device("cuda", torch.cuda.current_device())
        st = _State()
        st.device = dev
        st.q_dt = _torch_dtype(key.q_dtype)
        st.kv_dt = _torch_dtype(key.kv_dtype)
        st.pos = _pos_code(key.pos_encoding_mode)
        st.layout = _layout_code(key.kv_layout)
        st.sliding = key.window_left != -1
        st.softcap = key.logits_soft_cap > 0
        st.pdl = bool(fi.utils.device_support_pdl(dev))
        st.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        st.float_ws = self.float_workspace(dev)
        st.int_ws = torch.empty(_INT_WS_BYTES, dtype=torch.uint8, device=dev)
        st.pinned = torch.empty(_INT_WS_BYTES, dtype=torch.uint8, pin_memory=True)
        st.alibi = fi.utils._get_cache_alibi_slopes_buf(key.num_qo_heads, dev)
        B = key.batch_size
        st.arange_qo = torch.arange(B + 1, dtype=torch.int32, device=dev)
        st.arange_qo_host = torch.arange(B + 1, dtype=torch.int32)
        d = key.head_dim
        st.mod_args = (st.q_dt, st.kv_dt, st.q_dt, torch.int32, d, d, st.pos, st.sliding,
                       st.softcap)
        cuda_core = key.kind == "decode" and key.decode_kernel == "cuda_core"
        if cuda_core:
            st.module = _decode_module(st.q_dt, st.kv_dt, st.q_dt, d, st.pos, st.sliding,
                                       st.softcap)
        else:
            st.module = _prefill_module(st.q_dt, st.kv_dt, st.q_dt, d, st.pos, st.sliding,
                                        st.softcap)
        if key.kind in ("decode", "prefill"):   # runs call the raw module (`run_args`)
            st.raw = (_raw_decode_module if cuda_core else _raw_prefill_module)(*st.mod_args)
        if key.kind == "pod":
            st.pod = _pod_module(st.q_dt, st.kv_dt, st.q_dt, d, st.pos, st.sliding)
            st.tmp_p = torch.empty(_POD_TMP_BYTES, dtype=torch.uint8, device=dev)
        if key.kind == "batch_pod":
            st.bpod = _batch_pod_module(st.q_dt, st.kv_dt, st.q_dt, d, st.pos, st.sliding)
            ws = self.float_workspace(dev, "batch_pod")
            st.float_ws_p, st.float_ws_d = torch.chunk(ws, 2, dim=0)
            st.int_ws_p = torch.empty(_INT_WS_BYTES, dtype=torch.uint8, device=dev)
            st.pinned_p = torch.empty(_INT_WS_BYTES, dtype=torch.uint8, pin_memory=True)
            st.sm_aware_sched = torch.empty(st.num_sms + 2, dtype=torch.int32,
                                            device=dev)
        if key.kind in ("decode", "prefill", "pod"):
            st.page = _page_module()
        return st

    def workspaces(self, slot):
        """The slot's own int workspaces and pinned buffers (batch POD: decode, then prefill)."""
        st = slot.state
        if slot.key.kind == "batch_pod":
            return [st.int_ws, st.int_ws_p], [st.pinned, st.pinned_p]
        return [st.int_ws], [st.pinned]

    # ---------------------------------------------------------------- plan

    @staticmethod
    def _kv_lens(indptr: np.ndarray, lpl: np.ndarray, page: int) -> torch.Tensor:
        n = indptr[1:] - indptr[:-1]
        return torch.from_numpy((np.maximum(n - 1, 0) * page + lpl).astype(np.int32))

    def _plan_prefill_like(self, st, key, float_ws, int_ws, pinned, qo_host, indptr, lpl,
                           total_rows, causal, num_colocated=0, cuda_graph=False,
                           disable_split_kv=False):
        B = len(lpl)
        return st.module.plan(
            float_ws, int_ws, pinned, qo_host, torch.from_numpy(indptr),
            self._kv_lens(indptr, lpl, key.page_size), total_rows, B, key.num_qo_heads,
            key.num_kv_heads, key.page_size, cuda_graph, key.head_dim, key.head_dim, causal,
            key.window_left, -1, disable_split_kv, num_colocated, 0)

    def _plan_decode(self, st, key, host, float_ws, int_ws, pinned, cuda_graph=False):
        if key.decode_kernel == "cuda_core" and key.kind == "decode":
            return st.module.plan(
                float_ws, int_ws, pinned, torch.from_numpy(host["indptr"]),
                key.batch_size, key.num_qo_heads, key.num_kv_heads, key.page_size, cuda_graph,
                key.window_left, key.logits_soft_cap, key.head_dim, key.head_dim,
                torch.empty(0, dtype=st.q_dt), torch.empty(0, dtype=st.kv_dt))
        return self._plan_prefill_like(st, key, float_ws, int_ws, pinned, st.arange_qo_host,
                                       host["indptr"], host["lpl"], key.batch_size, False,
                                       cuda_graph=cuda_graph,
                                       disable_split_kv=cuda_graph and whole_kv_per_cta(
                                           host["indptr"], key.num_kv_heads, st.num_sms))

    def plan(self, slot, host, int_ws, pinned, cuda_graph: bool = False):
        """Plan from the host arrays into `int_ws` (the slot's own workspaces, or a host plan's
        ring entry's); returns (plan_info, batch POD's prefill plan_info or None).

        `cuda_graph` (decode and prefill): FlashInfer's CUDA-graph mode, whose plan_info depends
        only on the batch's shape (B requests, the prefill's T rows: planned for T, the real row
        count travels in the schedule), so a call captured with one plan replays with another."""
        key, st = slot.key, slot.state
        if cuda_graph and key.kind not in ("decode", "prefill", "batch_pod"):
            raise ValueError(f"CUDA-graph plans are made for decode, prefill and batch POD, not "
                             f"{key.kind!r}")
        if key.kind in ("decode", "pod"):
            return self._plan_decode(st, key, host, st.float_ws, int_ws[0], pinned[0],
                                     cuda_graph), None
        if key.kind == "prefill":
            qo = host["qo_indptr"]
            return self._plan_prefill_like(
                st, key, st.float_ws, int_ws[0], pinned[0], torch.from_numpy(qo.copy()),
                host["indptr"], host["lpl"], key.num_rows if cuda_graph else int(qo[-1]),
                key.causal, cuda_graph=cuda_graph), None
        if key.kind == "batch_pod":
            info_d = self._plan_prefill_like(
                st, key, st.float_ws_d, int_ws[0], pinned[0], st.arange_qo_host, host["indptr"],
                host["lpl"], key.batch_size, False, cuda_graph=cuda_graph)
            qo_p = host["qo_indptr_p"]
            # CUDA-graph mode plans for the bucket's T rows (the real count is in the schedule)
            rows_p = key.num_rows if cuda_graph else int(qo_p[-1])
            colocated = 0 if rows_p > 1536 else int(info_d[0])
            info_p = self._plan_prefill_like(
                st, key, st.float_ws_p, int_ws[1], pinned[1], torch.from_numpy(qo_p.copy()),
                host["indptr_p"], host["lpl_p"], rows_p, key.causal, colocated,
                cuda_graph=cuda_graph)
            return info_d, info_p
        raise ValueError(key.kind)

    @staticmethod
    def schedule_bytes(key, plan_info) -> int:
        """An upper bound on the int workspace bytes a plan of `key` writes (FlashInfer's
        scheduler.cuh: a prefill-style plan allocates request / qo-tile / kv-tile indices and the
        block-valid mask (padded_batch_size = plan_info[0] each), o_indptr (B + 1), merge_indptr
        (rows + 1) and two scalars, each aligned to 16 bytes; a CUDA-core decode plan a subset)."""
        P, B, T = int(plan_info[0]), key.batch_size, max(key.num_rows, key.batch_size)
        if key.kind == "batch_pod":   # either half: the larger request count and row count
            B = max(B, key.batch_size_p)
        return 4 * (3 * P + (B + 1) + (T + 1) + 2) + P + 8 * 16

    # ---------------------------------------------------------------- runs

    @staticmethod
    def _call(fn, args, bound: dict):
        fn(*[bound[a] if isinstance(a, Arg) else a for a in args])

    def _run(self, slot, rp, q, k, v, qo_indptr, indptr, indices, lpl, o, lse):
        self._call(run_function(slot), run_args(slot, rp), {
            FLOAT_WS: slot.state.float_ws, INT_WS: slot.int_ws[0], PLAN_INFO: slot.plan_info,
            Q: q, K: k, V: v, QO_INDPTR: qo_indptr, INDPTR: indptr, INDICES: indices, LPL: lpl,
            OUT: o, LSE: lse})

    def decode(self, slot, q, k, v, indptr, indices, lpl, o, lse, rp):
        self._run(slot, rp, q, k, v, None, indptr, indices, lpl, o, lse)

    def prefill(self, slot, q, k, v, qo_indptr, indptr, indices, lpl, o, lse, rp):
        self._run(slot, rp, q, k, v, qo_indptr, indptr, indices, lpl, o, lse)

    def pod(self, slot, q_p, k_p, v_p, causal_p, q_d, k, v, indptr, indices, lpl, o_p, o_d,
            lse_p, lse_d, rp):
        # FlashInfer 0.7.2's POD launcher resets its SM-scheduling counters with a synchronous
        # cudaMemset on the legacy default stream (include/flashinfer/attention/pod.cuh), which
        # is not ordered with a kernel on XLA's (non-blocking) stream: back-to-back POD calls then
        # skipped work (measured on H200: 138 us per call for a 1 GB KV read, wrong outputs after
        # the first call). So POD runs on the legacy default stream, fenced by events both ways.
        xla = torch.cuda.current_stream()
        legacy = torch.cuda.default_stream(xla.device)
        legacy.wait_stream(xla)
        with torch.cuda.stream(legacy):
            self._pod(slot, q_p, k_p, v_p, causal_p, q_d, k, v, indptr, indices, lpl, o_p, o_d,
                      lse_p, lse_d, rp)
        xla.wait_stream(legacy)

    def _pod(self, slot, q_p, k_p, v_p, causal_p, q_d, k, v, indptr, indices, lpl, o_p, o_d,
             lse_p, lse_d, rp):
        key, st = slot.key, slot.state
        rs, rt = 1.0 / rp.rope_scale, 1.0 / rp.rope_theta
        st.pod.run_tensor(
            q_p, k_p, v_p, st.tmp_p, o_p, lse_p, 1 if causal_p else 0, 0, key.window_left, None,
            st.alibi, 0.0, rp.sm_scale, rs, rt,
            st.float_ws, slot.int_ws[0], slot.plan_info, q_d, k, v, st.arange_qo, indptr, indices,
            lpl, o_d, lse_d, 0, st.layout, key.window_left, None, None, st.alibi, 0.0,
            rp.sm_scale, rs, rt, st.pdl)

    def batch_pod(self, slot, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d,
                  indices_d, lpl_d, k, v, o_p, o_d, lse_p, lse_d, rp):
        key, st = slot.key, slot.state
        rs, rt = 1.0 / rp.rope_scale, 1.0 / rp.rope_theta
        st.bpod.run_tensor(
            st.float_ws_p, slot.int_ws[1], slot.plan_info_p, q_p, k, v, qo_indptr_p, indptr_p,
            indices_p, lpl_p, o_p, lse_p, 1 if key.causal else 0, st.layout, key.window_left,
            None, None, st.alibi, 0.0, rp.sm_scale, rs, rt,
            st.float_ws_d, slot.int_ws[0], slot.plan_info, q_d, k, v, st.arange_qo, indptr_d,
            indices_d, lpl_d, o_d, lse_d, 0, st.layout, key.window_left, None, None, st.alibi,
            0.0, rp.sm_scale, rs, rt, st.pdl, st.sm_aware_sched)

    def append(self, slot, keys, values, batch_indices, positions, k_cache, v_cache, indptr,
               indices, lpl):
        n, idx = slot.append_rows, slot.append_rows_index
        if n == 0:
            return
        rows = slice(None, n) if n is not None else idx
        self._call(append_function(), append_args(slot), {
            KEYS: keys[rows], VALUES: values[rows], BATCH_INDICES: batch_indices[rows],
            POSITIONS: positions[rows], K_CACHE: k_cache, V_CACHE: v_cache, INDICES: indices,
            INDPTR: indptr, LPL: lpl})
