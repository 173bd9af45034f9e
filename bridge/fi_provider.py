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

_lock = threading.Lock()
_float_ws: dict[tuple[str, int], torch.Tensor] = {}


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


def float_workspace(device: torch.device, name: str = "main") -> torch.Tensor:
    key = (name, device.index or 0)
    ws = _float_ws.get(key)
    if ws is None:
        with _lock:
            ws = _float_ws.get(key)
            if ws is None:
                ws = torch.zeros(_FLOAT_WS_BYTES, dtype=torch.uint8, device=device)
                _float_ws[key] = ws
    return ws


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


class FlashInferProvider:
    name = "flashinfer"
    # A request without pages gets out 0 / lse -inf from both decode kernels (measured, H200).
    zeroes_empty_requests = True

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
        st.float_ws = float_workspace(dev)
        st.int_ws = torch.empty(_INT_WS_BYTES, dtype=torch.uint8, device=dev)
        st.pinned = torch.empty(_INT_WS_BYTES, dtype=torch.uint8, pin_memory=True)
        st.alibi = fi.utils._get_cache_alibi_slopes_buf(key.num_qo_heads, dev)
        st.ws_size = st.float_ws.numel()
        B = key.batch_size
        st.arange_qo = torch.arange(B + 1, dtype=torch.int32, device=dev)
        st.arange_qo_host = torch.arange(B + 1, dtype=torch.int32)
        d = key.head_dim
        st.mod_args = (st.q_dt, st.kv_dt, st.q_dt, torch.int32, d, d, st.pos, st.sliding,
                       st.softcap)
        if key.kind == "decode" and key.decode_kernel == "cuda_core":
            st.module = _decode_module(st.q_dt, st.kv_dt, st.q_dt, d, st.pos, st.sliding,
                                       st.softcap)
        else:
            st.module = _prefill_module(st.q_dt, st.kv_dt, st.q_dt, d, st.pos, st.sliding,
                                        st.softcap)
        if key.kind == "pod":
            st.pod = _pod_module(st.q_dt, st.kv_dt, st.q_dt, d, st.pos, st.sliding)
            st.tmp_p = torch.empty(_POD_TMP_BYTES, dtype=torch.uint8, device=dev)
        if key.kind == "batch_pod":
            st.bpod = _batch_pod_module(st.q_dt, st.kv_dt, st.q_dt, d, st.pos, st.sliding)
            ws = float_workspace(dev, "batch_pod")
            st.float_ws_p, st.float_ws_d = torch.chunk(ws, 2, dim=0)
            st.int_ws_p = torch.empty(_INT_WS_BYTES, dtype=torch.uint8, device=dev)
            st.pinned_p = torch.empty(_INT_WS_BYTES, dtype=torch.uint8, pin_memory=True)
            props = torch.cuda.get_device_properties(dev)
            st.sm_aware_sched = torch.empty(props.multi_processor_count + 2, dtype=torch.int32,
                                            device=dev)
        if key.kind in ("decode", "prefill", "pod"):
            st.page = _page_module()
        return st

    # ---------------------------------------------------------------- plan

    @staticmethod
    def _kv_lens(indptr: np.ndarray, lpl: np.ndarray, page: int) -> torch.Tensor:
        n = indptr[1:] - indptr[:-1]
        return torch.from_numpy((np.maximum(n - 1, 0) * page + lpl).astype(np.int32))

    def _plan_prefill_like(self, st, key, float_ws, int_ws, pinned, qo_host, indptr, lpl,
                           total_rows, causal, num_colocated=0):
        B = len(lpl)
        return st.module.plan(
            float_ws, int_ws, pinned, qo_host, torch.from_numpy(indptr),
            self._kv_lens(indptr, lpl, key.page_size), total_rows, B, key.num_qo_heads,
            key.num_kv_heads, key.page_size, False, key.head_dim, key.head_dim, causal,
            key.window_left, -1, False, num_colocated, 0)

    def _plan_decode(self, st, key, host, int_ws, pinned):
        if key.decode_kernel == "cuda_core" and key.kind == "decode":
            return st.module.plan(
                st.float_ws, int_ws, pinned, torch.from_numpy(host["indptr"]),
                key.batch_size, key.num_qo_heads, key.num_kv_heads, key.page_size, False,
                key.window_left, key.logits_soft_cap, key.head_dim, key.head_dim,
                torch.empty(0, dtype=st.q_dt), torch.empty(0, dtype=st.kv_dt))
        return self._plan_prefill_like(st, key, st.float_ws, int_ws, pinned, st.arange_qo_host,
                                       host["indptr"], host["lpl"], key.batch_size, False)

    def host_plan(self, slot, host, int_ws, pinned):
        """Plan on the host into a ring entry's workspace (the caller set a private stream for
        FlashInfer's schedule copy); returns plan_info. Decode plans only."""
        if slot.key.kind != "decode":
            raise ValueError(f"host plans are made for decode batches, not {slot.key.kind!r}")
        return self._plan_decode(slot.state, slot.key, host, int_ws, pinned)

    def plan(self, slot, host):
        key, st = slot.key, slot.state
        if key.kind in ("decode", "pod"):
            slot.plan_info = self._plan_decode(st, key, host, st.int_ws, st.pinned)
        elif key.kind == "prefill":
            qo = host["qo_indptr"]
            rows = int(qo[-1])
            slot.plan_info = self._plan_prefill_like(
                st, key, st.float_ws, st.int_ws, st.pinned, torch.from_numpy(qo.copy()),
                host["indptr"], host["lpl"], rows, key.causal)
        elif key.kind == "batch_pod":
            slot.plan_info = self._plan_prefill_like(
                st, key, st.float_ws_d, st.int_ws, st.pinned, st.arange_qo_host, host["indptr"],
                host["lpl"], key.batch_size, False)
            qo_p = host["qo_indptr_p"]
            rows_p = int(qo_p[-1])
            colocated = 0 if rows_p > 1536 else int(slot.plan_info[0])
            slot.plan_info_p = self._plan_prefill_like(
                st, key, st.float_ws_p, st.int_ws_p, st.pinned_p, torch.from_numpy(qo_p.copy()),
                host["indptr_p"], host["lpl_p"], rows_p, key.causal, colocated)
        else:
            raise ValueError(key.kind)

    # ---------------------------------------------------------------- runs

    def decode(self, slot, q, k, v, indptr, indices, lpl, o, lse, rp):
        key, st = slot.key, slot.state
        int_ws = st.int_ws if slot.int_ws is None else slot.int_ws   # a host plan's ring entry
        if key.decode_kernel == "cuda_core":
            st.module.run(st.float_ws, int_ws, slot.plan_info, q, k, v, indptr, indices, lpl,
                          o, lse, st.layout, key.window_left, st.pdl, st.alibi,
                          key.logits_soft_cap, rp.sm_scale, rp.rope_scale, rp.rope_theta)
        else:
            self._paged_run(st, key, slot.plan_info, st.float_ws, int_ws, q, k, v, st.arange_qo,
                            indptr, indices, lpl, o, lse, 0, rp)

    def _paged_run(self, st, key, plan_info, float_ws, int_ws, q, k, v, qo_indptr, indptr,
                   indices, lpl, o, lse, mask_mode, rp):
        st.module.paged_run(
            float_ws, int_ws, plan_info, q, k, v, qo_indptr, indptr, indices, lpl, o, lse,
            mask_mode, st.layout, key.window_left, st.pdl, None, None, st.alibi, None, None, None,
            key.logits_soft_cap, rp.sm_scale, None, None, None, rp.rope_scale, rp.rope_theta, 0,
            st.ws_size)

    def prefill(self, slot, q, k, v, qo_indptr, indptr, indices, lpl, o, lse, rp):
        key, st = slot.key, slot.state
        self._paged_run(st, key, slot.plan_info, st.float_ws, st.int_ws, q, k, v, qo_indptr,
                        indptr, indices, lpl, o, lse, 1 if key.causal else 0, rp)

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
            st.float_ws, st.int_ws, slot.plan_info, q_d, k, v, st.arange_qo, indptr, indices,
            lpl, o_d, lse_d, 0, st.layout, key.window_left, None, None, st.alibi, 0.0,
            rp.sm_scale, rs, rt, st.pdl)

    def batch_pod(self, slot, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d,
                  indices_d, lpl_d, k, v, o_p, o_d, lse_p, lse_d, rp):
        key, st = slot.key, slot.state
        rs, rt = 1.0 / rp.rope_scale, 1.0 / rp.rope_theta
        st.bpod.run_tensor(
            st.float_ws_p, st.int_ws_p, slot.plan_info_p, q_p, k, v, qo_indptr_p, indptr_p,
            indices_p, lpl_p, o_p, lse_p, 1 if key.causal else 0, st.layout, key.window_left,
            None, None, st.alibi, 0.0, rp.sm_scale, rs, rt,
            st.float_ws_d, st.int_ws, slot.plan_info, q_d, k, v, st.arange_qo, indptr_d,
            indices_d, lpl_d, o_d, lse_d, 0, st.layout, key.window_left, None, None, st.alibi,
            0.0, rp.sm_scale, rs, rt, st.pdl, st.sm_aware_sched)

    def append(self, slot, keys, values, batch_indices, positions, k_cache, v_cache, indptr,
               indices, lpl):
        st = slot.state
        n = slot.append_rows
        if n is not None:
            if n:
                st.page.append_paged_kv_cache(keys[:n], values[:n], batch_indices[:n],
                                              positions[:n], k_cache, v_cache, indices, indptr,
                                              lpl, st.layout)
        else:
            idx = slot.append_rows_index
            st.page.append_paged_kv_cache(keys[idx], values[idx], batch_indices[idx],
                                          positions[idx], k_cache, v_cache, indices, indptr, lpl,
                                          st.layout)


PROVIDER = FlashInferProvider()


def raw_decode_module(st):
    """The CUDA-core decode module itself (tvm-ffi Module: plan / run functions), for the FFI path."""
    fi = _fi()
    return fi.decode.gen_batch_decode_module(*st.mod_args).build_and_load()


def raw_prefill_module(st):
    """The FA2 prefill module itself (equal K/V strides variant: plan / paged_run), for the FFI path."""
    fi = _fi()
    return fi.prefill._gen_batch_prefill_primary_module("fa2", *st.mod_args, False).build_and_load()


def decode_supported_group_sizes() -> tuple[int, ...]:
    """Group sizes the CUDA-core decode kernel is compiled for (flashinfer's DISPATCH_GQA)."""
    return (1, 2, 3, 4, 6, 8, 16)
