"""A small torch implementation of the kernel provider (`ops.KernelProvider`): decode, prefill,
batch POD, append.

It exists so the CPU tests can drive the bridge's real plan/run/alias mechanics (buffer_callback,
DLPack views, tokens, host plans, donation) without FlashInfer or a GPU:
`FlashInferBackend(provider="torch")`. It is slow (loops over requests) and supports
pos_encoding_mode="NONE" only, and no POD. LSE is base 2, like FlashInfer's; like FlashInfer's
kernels it writes 0 (LSE -inf) for a request without pages and leaves rows past `qo_indptr[B]`
unwritten.
"""

from __future__ import annotations

import math

import torch


class _State:
    pass


def _pages_view(cache: torch.Tensor, layout: str) -> torch.Tensor:
    # -> [P, page, H, D]
    return cache if layout == "NHD" else cache.transpose(1, 2)


class TorchProvider:
    name = "torch"
    has_ffi = False

    def unsupported(self, kind, options):
        if options.pos_encoding_mode != "NONE":
            return ("torch test provider: pos_encoding_mode must be 'NONE' (RoPE/ALiBi run on the "
                    "flashinfer provider and the reference backend)")
        if kind == "pod":
            return "torch test provider: POD runs on the flashinfer provider only"
        return None

    def make_state(self, key):
        return _State()

    def workspaces(self, slot):
        return None, None    # the runs read the CSR arrays themselves: no schedule to keep

    def plan(self, slot, host, int_ws, pinned, cuda_graph: bool = False):
        return {k: v.copy() for k, v in host.items()}, None   # plan_info: nothing reads it

    @staticmethod
    def _attend(key, q, kk, vv, q_pos, kv_len, sm_scale):
        # q [R,Hq,D], kk/vv [L,Hkv,D], q_pos [R] absolute positions
        g = key.num_qo_heads // key.num_kv_heads
        kk = kk.float().repeat_interleave(g, dim=1)
        vv = vv.float().repeat_interleave(g, dim=1)
        s = torch.einsum("rhd,lhd->hrl", q.float(), kk) * sm_scale
        if key.logits_soft_cap > 0:
            s = key.logits_soft_cap * torch.tanh(s / key.logits_soft_cap)
        pos = torch.arange(kv_len, device=q.device)
        q_pos = q_pos.to(q.device)
        mask = pos[None, :] <= q_pos[:, None]
        if key.window_left >= 0:
            mask &= pos[None, :] >= (q_pos[:, None] - key.window_left)
        s = s.masked_fill(~mask[None], -math.inf)
        lse = torch.logsumexp(s, dim=-1)                       # [H,R] natural
        p = torch.exp(s - lse[..., None])
        o = torch.einsum("hrl,lhd->rhd", p, vv)
        return o, (lse / math.log(2.0)).transpose(0, 1)

    def _gather(self, key, cache, indices, indptr, b, kv_len):
        pages = indices[int(indptr[b]):int(indptr[b + 1])].long().to(cache.device)
        x = _pages_view(cache, key.kv_layout)[pages]            # [n, page, H, D]
        return x.reshape(-1, key.num_kv_heads, key.head_dim)[:kv_len]

    def _run(self, slot, q, k, v, qo_indptr, indptr, indices, lpl, o, lse, rp, causal):
        key = slot.key
        indptr = indptr.cpu()
        lpl = lpl.cpu()
        for b in range(len(lpl)):
            n = int(indptr[b + 1] - indptr[b])
            r0, r1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
            if r1 == r0:
                continue
            if n == 0:           # a request without pages: 0, LSE -inf (as FlashInfer's kernels)
                o[r0:r1] = 0
                if lse is not None:
                    lse[r0:r1] = -math.inf
                continue
            kv_len = (n - 1) * key.page_size + int(lpl[b])
            rows = r1 - r0
            if causal:
                q_pos = torch.arange(kv_len - rows, kv_len)
            else:
                q_pos = torch.full((rows,), kv_len - 1 + 10**9)
            indices_h = indices if indices.device.type == "cpu" else indices.cpu()
            kk = self._gather(key, k, indices_h, indptr, b, kv_len)
            vv = self._gather(key, v, indices_h, indptr, b, kv_len)
            ob, lb = self._attend(key, q[r0:r1], kk, vv, q_pos, kv_len, rp.sm_scale)
            o[r0:r1] = ob.to(o.dtype)
            if lse is not None:
                lse[r0:r1] = lb

    def decode(self, slot, q, k, v, indptr, indices, lpl, o, lse, rp):
        B = q.shape[0]
        qo = torch.arange(B + 1)
        # a decode query sits at the last position: causal == attend to everything (+ window)
        self._run(slot, q, k, v, qo, indptr, indices, lpl, o, lse, rp, causal=True)

    def prefill(self, slot, q, k, v, qo_indptr, indptr, indices, lpl, o, lse, rp):
        self._run(slot, q, k, v, qo_indptr.cpu(), indptr, indices, lpl, o, lse, rp,
                  causal=slot.key.causal)

    def pod(self, *a, **k):
        raise ValueError("torch test provider: POD runs on the flashinfer provider only")

    def batch_pod(self, slot, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d,
                  indices_d, lpl_d, k, v, o_p, o_d, lse_p, lse_d, rp):
        self.prefill(slot, q_p, k, v, qo_indptr_p, indptr_p, indices_p, lpl_p, o_p, lse_p, rp)
        self.decode(slot, q_d, k, v, indptr_d, indices_d, lpl_d, o_d, lse_d, rp)

    def append(self, slot, keys, values, batch_indices, positions, k_cache, v_cache, indptr,
               indices, lpl):
        key = slot.key
        kc = _pages_view(k_cache, key.kv_layout)
        vc = _pages_view(v_cache, key.kv_layout)
        batch_indices, positions = batch_indices.cpu(), positions.cpu()
        indptr, indices = indptr.cpu(), indices.cpu()
        for i in range(keys.shape[0]):
            b = int(batch_indices[i])
            if b < 0:
                continue
            pos = int(positions[i])
            page = int(indices[int(indptr[b]) + pos // key.page_size])
            kc[page, pos % key.page_size] = keys[i]
            vc[page, pos % key.page_size] = values[i]

