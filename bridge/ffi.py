"""Fast path: FlashInfer's run functions as XLA FFI custom calls (no Python per layer).

`jax-tvm-ffi` registers a tvm-ffi function as an XLA FFI target: XLA calls it from C++ on its own
stream with the operands as DLTensors, attributes as compile-time constants, and (with
`allow_cuda_graph`) lets XLA capture it in a command buffer. FlashInfer's compiled module
functions are tvm-ffi functions, but their argument lists cannot be fed directly: K and V are
strided views of our one pool, the workspaces are torch-owned buffers, and `plan_info` must sit
between the workspaces and the query. So a ~100-line C++ shim (compiled once with
`tvm_ffi.cpp.load_inline`, registered as the global function `seqattn.fi_call`) receives

    [XLA inputs..., XLA outputs..., fn (str), prog (int64[]), iconst (int64[]), fconst (f64[]),
     plan_info (int64[])]

and assembles the target's argument list from a tiny program: input / output buffer i, the K or V
view of buffer i, an int / float / bool constant, None, plan_info, or a raw device buffer
(pointer, numel, dtype) for the workspaces and ALiBi slopes. It then calls the FlashInfer function
named `fn` (registered as a tvm-ffi global at trace time).

Plans: `plan_info` is an attribute, i.e. fixed at compile time. FlashInfer's CUDA-graph planning
mode (`enable_cuda_graph=True`) makes `plan_info` a function of the static shapes only (batch size,
rows, heads, page size): it pads the work grid and writes the per-step schedule into the int
workspace. So the trace computes the static `plan_info` once (a host plan on a dummy batch), and
the per-step plan callback (a buffer_callback, the step's only Python) re-plans in the same mode,
writes the schedule into the int workspace on XLA's stream and checks that `plan_info` did not
change (it raises if it did). The runs then read this step's schedule from the workspace.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from . import ops

_TARGET = "seqattn_fi_call"
# No string attribute: jax-tvm-ffi 0.1.3 passes a string attribute as a view of a temporary, which
# dangles for strings longer than the 7 bytes tvm-ffi stores inline (seen: heap corruption). The
# FlashInfer function is named by an integer id in `prog` instead.
_ARG_SPEC = ["args", "rets", "attrs.prog", "attrs.iconst", "attrs.fconst", "attrs.plan_info"]
_FN_PREFIX = "seqattn.fi.fn"

# program opcodes (keep in sync with _SHIM)
IN, OUT, KH, VH, INT, FLT, BOOL, NONE, PLAN, RAW = range(10)
RAW_U8, RAW_F32, RAW_I32 = 0, 1, 2

_SHIM = r"""
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {
using namespace tvm::ffi;

constexpr int kMaxViews = 16;

struct Views {
  DLTensor t[kMaxViews];
  int64_t shape[kMaxViews][6];
  int64_t stride[kMaxViews][6];
  int n = 0;
  DLTensor* next() {
    TVM_FFI_ICHECK_LT(n, kMaxViews) << "seqattn.fi_call: too many views";
    return &t[n];
  }
};

const Function& Lookup(int64_t id) {
  // never destroyed: the functions may be Python-backed, and nothing must run at exit
  static auto* cache = new std::unordered_map<int64_t, Function>();
  static auto* mu = new std::mutex();
  std::lock_guard<std::mutex> lock(*mu);
  auto it = cache->find(id);
  if (it == cache->end()) {
    it = cache->emplace(id, Function::GetGlobalRequired("seqattn.fi.fn" + std::to_string(id))).first;
  }
  return it->second;
}

// K (which = 0) or V (which = 1) half of a compact pool [P, 2, a, b, D] -> [P, a, b, D] view.
DLTensor* Half(Views& vs, const DLTensor* kv, int which) {
  TVM_FFI_ICHECK_EQ(kv->ndim, 5) << "seqattn.fi_call: the KV pool must be 5-D";
  DLTensor* t = vs.next();
  int64_t* sh = vs.shape[vs.n];
  int64_t* st = vs.stride[vs.n];
  vs.n++;
  int64_t P = kv->shape[0], a = kv->shape[2], b = kv->shape[3], d = kv->shape[4];
  sh[0] = P; sh[1] = a; sh[2] = b; sh[3] = d;
  st[0] = 2 * a * b * d; st[1] = b * d; st[2] = d; st[3] = 1;
  *t = *kv;
  t->ndim = 4;
  t->shape = sh;
  t->strides = st;
  size_t elem = (kv->dtype.bits * kv->dtype.lanes + 7) / 8;
  t->data = static_cast<char*>(kv->data) + kv->byte_offset + which * a * b * d * elem;
  t->byte_offset = 0;
  return t;
}

// A permanent device buffer (workspace, ALiBi slopes) as an owned ffi::Tensor that does not own
// the memory: FlashInfer's optional tensor arguments are `Optional<ffi::Tensor>`, which a raw
// DLTensor* cannot bind to. Cached per (pointer, size, dtype, device): the buffers live for the
// process (they belong to plan slots that are never freed).
struct NoAlloc {
  void* ptr;
  void AllocData(DLTensor* t) { t->data = ptr; }
  void FreeData(DLTensor*) {}
};

const Tensor& Raw(DLDevice dev, int64_t ptr, int64_t numel, int64_t code) {
  static auto* cache = new std::unordered_map<std::string, Tensor>();
  static auto* mu = new std::mutex();
  std::string key = std::to_string(ptr) + ":" + std::to_string(numel) + ":" +
                    std::to_string(code) + ":" + std::to_string(dev.device_id);
  std::lock_guard<std::mutex> lock(*mu);
  auto it = cache->find(key);
  if (it == cache->end()) {
    DLDataType dt = code == 0 ? DLDataType{kDLUInt, 8, 1}
                  : code == 1 ? DLDataType{kDLFloat, 32, 1} : DLDataType{kDLInt, 32, 1};
    int64_t shape[1] = {numel};
    Tensor t = Tensor::FromNDAlloc(NoAlloc{reinterpret_cast<void*>(ptr)}, ShapeView(shape, 1),
                                   dt, dev);
    it = cache->emplace(key, std::move(t)).first;
  }
  return it->second;
}

void FiCall(PackedArgs args, Any* rv) {
  const int n = args.size();
  TVM_FFI_ICHECK_GE(n, 4) << "seqattn.fi_call: missing attributes";
  Array<int64_t> prog = args[n - 4].cast<Array<int64_t>>();
  Array<int64_t> iconst = args[n - 3].cast<Array<int64_t>>();
  Array<double> fconst = args[n - 2].cast<Array<double>>();
  AnyView plan_info = args[n - 1];
  const int64_t n_in = prog[0], n_out = prog[1], fn_id = prog[2];
  TVM_FFI_ICHECK_EQ(n_in + n_out + 4, n) << "seqattn.fi_call: operand count mismatch";
  Views vs;
  DLTensor* first = args[0].cast<DLTensor*>();
  DLDevice dev = first->device;
  std::vector<AnyView> call;
  call.reserve((prog.size() - 2) / 2);
  for (int64_t i = 3; i + 1 < static_cast<int64_t>(prog.size()); i += 2) {
    const int64_t op = prog[i], x = prog[i + 1];
    switch (op) {
      case 0: call.emplace_back(args[x]); break;
      case 1: call.emplace_back(args[n_in + x]); break;
      case 2: call.emplace_back(Half(vs, args[x].cast<DLTensor*>(), 0)); break;
      case 3: call.emplace_back(Half(vs, args[x].cast<DLTensor*>(), 1)); break;
      case 4: call.emplace_back(static_cast<int64_t>(iconst[x])); break;
      case 5: call.emplace_back(static_cast<double>(fconst[x])); break;
      case 6: call.emplace_back(static_cast<bool>(iconst[x] != 0)); break;
      case 7: call.emplace_back(AnyView()); break;
      case 8: call.emplace_back(plan_info); break;
      case 9: call.emplace_back(Raw(dev, iconst[x], iconst[x + 1], iconst[x + 2])); break;
      default: TVM_FFI_THROW(ValueError) << "seqattn.fi_call: bad opcode " << op;
    }
  }
  Any result;
  Lookup(fn_id).CallPacked(call.data(), static_cast<int32_t>(call.size()), &result);
}
}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  tvm::ffi::reflection::GlobalDef().def_packed("seqattn.fi_call", FiCall);
}
"""

_lock = threading.Lock()
_state: dict = {}


def available() -> bool:
    """jax-tvm-ffi imports and the shim builds (cached)."""
    if "error" in _state:
        return False
    try:
        _register()
        return True
    except Exception as e:  # noqa: BLE001
        _state["error"] = f"{type(e).__name__}: {e}"
        return False


def unavailable_reason() -> str | None:
    return _state.get("error")


def _register(platform: str = "gpu"):
    key = ("target", platform)
    if key in _state:
        return _state[key]
    with _lock:
        if key in _state:
            return _state[key]
        import jax_tvm_ffi  # noqa: PLC0415
        import tvm_ffi  # noqa: PLC0415
        import tvm_ffi.cpp  # noqa: PLC0415

        if "shim" not in _state:
            _state["shim"] = tvm_ffi.cpp.load_inline(name="seqattn_fi_shim", cpp_sources=_SHIM)
        func = tvm_ffi.get_global_func("seqattn.fi_call")
        name = _TARGET if platform == "gpu" else f"{_TARGET}_{platform}"
        jax_tvm_ffi.register_ffi_target(name, func, _ARG_SPEC, platform=platform,
                                        allow_cuda_graph=True)
        _state[key] = name
        return name


def register_function(func) -> int:
    """Make a tvm-ffi function callable by the shim; returns its integer id (idempotent)."""
    import tvm_ffi  # noqa: PLC0415

    with _lock:
        ids = _state.setdefault("fn_ids", {})
        key = id(func)
        if key in ids and ids[key][1] is func:
            return ids[key][0]
        fn_id = len(ids)
        tvm_ffi.register_global_func(f"{_FN_PREFIX}{fn_id}", func, override=True)
        ids[key] = (fn_id, func)   # keep func alive: its id must never be reused
        return fn_id


class Program:
    """Builder of the shim's argument program."""

    def __init__(self, n_in: int, n_out: int, fn_id: int = -1):
        self.prog = [n_in, n_out, fn_id]
        self.iconst: list[int] = []
        self.fconst: list[float] = []

    def _i(self, v: int) -> int:
        self.iconst.append(int(v))
        return len(self.iconst) - 1

    def inp(self, i):
        self.prog += [IN, i]
        return self

    def out(self, i):
        self.prog += [OUT, i]
        return self

    def k(self, i):
        self.prog += [KH, i]
        return self

    def v(self, i):
        self.prog += [VH, i]
        return self

    def int_(self, v):
        self.prog += [INT, self._i(v)]
        return self

    def bool_(self, v):
        self.prog += [BOOL, self._i(1 if v else 0)]
        return self

    def float_(self, v):
        self.fconst.append(float(v))
        self.prog += [FLT, len(self.fconst) - 1]
        return self

    def none(self):
        self.prog += [NONE, 0]
        return self

    def plan(self):
        self.prog += [PLAN, 0]
        return self

    def raw(self, tensor, code: int):
        idx = self._i(tensor.data_ptr())
        self._i(tensor.numel())
        self._i(code)
        self.prog += [RAW, idx]
        return self

    def attrs(self, fn_id: int, plan_info) -> dict:
        self.prog[2] = int(fn_id)
        return dict(prog=np.asarray(self.prog, np.int64),
                    iconst=np.asarray(self.iconst or [0], np.int64),
                    fconst=np.asarray(self.fconst or [0.0], np.float64),
                    plan_info=np.asarray(list(plan_info), np.int64))


def _raw_functions(slot):
    """Register the slot's FlashInfer run function as a tvm-ffi global; returns its name."""
    st = slot.state
    if getattr(st, "ffi_run_name", None) is not None:
        return st.ffi_run_name
    from . import fi_provider  # noqa: PLC0415

    key = slot.key
    if key.kind == "decode" and key.decode_kernel == "cuda_core":
        mod = fi_provider.raw_decode_module(st)
        fn = mod.run
        tag = "decode"
    else:
        mod = fi_provider.raw_prefill_module(st)
        fn = mod.paged_run
        tag = "paged"
    st.ffi_raw_module = mod
    st.ffi_run_name = register_function(fn)
    del tag
    return st.ffi_run_name


def static_plan_info(slot) -> tuple:
    """plan_info of the slot's CUDA-graph-mode plan: a function of the static shapes only."""
    if slot.static_plan_info is not None:
        return slot.static_plan_info
    import torch  # noqa: PLC0415

    key = slot.key
    B = key.batch_size
    host = {"indptr": np.arange(B + 1, dtype=np.int32), "lpl": np.ones(B, np.int32),
            "batch_indices": np.arange(key.num_rows, dtype=np.int32) % max(B, 1)}
    if key.kind == "prefill":
        host["qo_indptr"] = np.minimum(np.arange(B + 1, dtype=np.int32), key.num_rows)
        host["qo_indptr"][-1] = key.num_rows
    slot.provider.plan(slot, host)
    torch.cuda.synchronize()
    slot.static_plan_info = tuple(int(x) for x in slot.plan_info)
    return slot.static_plan_info


def _decode_program(slot, rp, n_out):
    key, st = slot.key, slot.state
    p = Program(6, n_out)   # inputs: q, kv, indptr, indices, lpl, token
    if key.decode_kernel == "cuda_core":
        (p.raw(st.float_ws, RAW_U8).raw(st.int_ws, RAW_U8).plan().inp(0).k(1).v(1).inp(2).inp(3)
         .inp(4).out(0))
        p.out(1) if rp.return_lse else p.none()
        (p.int_(st.layout).int_(key.window_left).bool_(st.pdl).raw(st.alibi, RAW_F32)
         .float_(key.logits_soft_cap).float_(rp.sm_scale).float_(1.0 / rp.rope_scale)
         .float_(1.0 / rp.rope_theta))
    else:
        (p.raw(st.float_ws, RAW_U8).raw(st.int_ws, RAW_U8).plan().inp(0).k(1).v(1)
         .raw(st.arange_qo, RAW_I32).inp(2).inp(3).inp(4).out(0))
        p.out(1) if rp.return_lse else p.none()
        _paged_tail(p, st, key, rp, mask_mode=0)
    return p


def _paged_tail(p, st, key, rp, mask_mode):
    (p.int_(mask_mode).int_(st.layout).int_(key.window_left).bool_(st.pdl)
     .none().none().raw(st.alibi, RAW_F32).none().none().none().none().none()
     .float_(key.logits_soft_cap).float_(rp.sm_scale).float_(1.0 / rp.rope_scale)
     .float_(1.0 / rp.rope_theta).int_(0))


def decode(key, rp, token, q, kv, indptr, indices, lpl):
    slot = ops.get_slot(key)
    target = _register()
    name = _raw_functions(slot)
    plan_info = static_plan_info(slot)
    p = _decode_program(slot, rp, 2 if rp.return_lse else 1)
    outs = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if rp.return_lse:
        outs.append(jax.ShapeDtypeStruct(q.shape[:2], jnp.float32))
    res = jax.ffi.ffi_call(target, tuple(outs))(q, kv, indptr, indices, lpl, token,
                                                **p.attrs(name, plan_info))
    return tuple(res)


def prefill(key, rp, token, q, kv, qo_indptr, indptr, indices, lpl):
    slot = ops.get_slot(key)
    target = _register()
    name = _raw_functions(slot)
    plan_info = static_plan_info(slot)
    st = slot.state
    p = Program(7, 2 if rp.return_lse else 1)  # q, kv, qo_indptr, indptr, indices, lpl, token
    (p.raw(st.float_ws, RAW_U8).raw(st.int_ws, RAW_U8).plan().inp(0).k(1).v(1).inp(2).inp(3)
     .inp(4).inp(5).out(0))
    p.out(1) if rp.return_lse else p.none()
    _paged_tail(p, st, key, rp, mask_mode=1 if key.causal else 0)
    outs = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if rp.return_lse:
        outs.append(jax.ShapeDtypeStruct(q.shape[:2], jnp.float32))
    res = jax.ffi.ffi_call(target, tuple(outs))(q, kv, qo_indptr, indptr, indices, lpl, token,
                                                **p.attrs(name, plan_info))
    # rows past qo_indptr[B] are not written by the kernel: zero them (lse -inf) in XLA
    row_ok = jnp.arange(q.shape[0], dtype=jnp.int32) < qo_indptr[-1]
    out = jnp.where(row_ok[:, None, None], res[0], jnp.zeros((), q.dtype))
    if rp.return_lse:
        return out, jnp.where(row_ok[:, None], res[1], -jnp.inf)
    return (out,)
