"""Fast path: FlashInfer's run functions as XLA FFI custom calls (no Python per layer).

`jax-tvm-ffi` registers a tvm-ffi function as an XLA FFI target: XLA calls it from C++ on its own
stream with the operands as DLTensors, attributes as compile-time constants, and (with
`allow_cuda_graph`) lets XLA capture it in a command buffer. FlashInfer's compiled module
functions are tvm-ffi functions, but their argument lists cannot be fed directly: K and V are
strided views of our one pool, the workspaces are torch-owned buffers, and `plan_info` must sit
between the workspaces and the query. So a ~100-line C++ shim (compiled once with
`tvm_ffi.cpp.load_inline`, registered as the global function `seqattn.fi_call`) receives

    [XLA inputs..., XLA outputs..., prog (int64[]), iconst (int64[]), fconst (f64[])]

and assembles the target's argument list from a tiny program: input / output buffer i, the K or V
view of buffer i, an int / float / bool constant, None, a slot's current plan_info, or a raw
device buffer (pointer, numel, dtype) for the workspaces and ALiBi slopes. It then calls the
FlashInfer function whose id is in `prog` (registered as a tvm-ffi global at trace time).

Plans: FlashInfer's run needs the step's `plan_info` (a few int64, decided on the host from the
step's lengths). The per-step plan callback (a buffer_callback: the step's only Python) plans as in
the buffer_callback path and publishes `plan_info` to the shim under the slot's integer id
(`seqattn.fi_plan_set`); each FFI call names its slot in `prog` and reads the latest `plan_info`.
XLA executes a program's thunks in order on one host thread, and every run takes the plan's token,
so a step's runs read that step's plan (and, through PLAN_WS, the int workspace holding its
schedule: a host plan's ring entry, or the slot's own workspace). Because `plan_info` changes at run time, the FFI target is
registered without `allow_cuda_graph` (XLA must call it every time rather than replay a capture).
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
_ARG_SPEC = ["args", "rets", "attrs.prog", "attrs.iconst", "attrs.fconst"]
_FN_PREFIX = "seqattn.fi.fn"

# program opcodes (keep in sync with _SHIM)
IN, OUT, KH, VH, INT, FLT, BOOL, NONE, PLAN, RAW, ROWS, KIN, VIN, KOUT, VOUT, PLAN_WS = range(16)
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

// K (which = 0) or V (which = 1) half of pages [first, first + count) of a compact pool
// [P, 2, a, b, D] -> a [count, a, b, D] strided view (count < 0: all pages).
DLTensor* Half(Views& vs, const DLTensor* kv, int which, int64_t first = 0, int64_t count = -1) {
  TVM_FFI_ICHECK_EQ(kv->ndim, 5) << "seqattn.fi_call: the KV pool must be 5-D";
  DLTensor* t = vs.next();
  int64_t* sh = vs.shape[vs.n];
  int64_t* st = vs.stride[vs.n];
  vs.n++;
  int64_t P = kv->shape[0], a = kv->shape[2], b = kv->shape[3], d = kv->shape[4];
  if (count < 0) count = P - first;
  TVM_FFI_ICHECK(first >= 0 && first + count <= P) << "seqattn.fi_call: page range out of pool";
  sh[0] = count; sh[1] = a; sh[2] = b; sh[3] = d;
  st[0] = 2 * a * b * d; st[1] = b * d; st[2] = d; st[3] = 1;
  *t = *kv;
  t->ndim = 4;
  t->shape = sh;
  t->strides = st;
  size_t elem = (kv->dtype.bits * kv->dtype.lanes + 7) / 8;
  t->data = static_cast<char*>(kv->data) + kv->byte_offset +
            (first * 2 * a * b * d + which * a * b * d) * elem;
  t->byte_offset = 0;
  return t;
}

// The first `rows` rows of a buffer (the real token rows of a packed batch).
DLTensor* Rows(Views& vs, const DLTensor* x, int64_t rows) {
  DLTensor* t = vs.next();
  int64_t* sh = vs.shape[vs.n];
  int64_t* st = vs.stride[vs.n];
  vs.n++;
  TVM_FFI_ICHECK_LE(x->ndim, 6);
  *t = *x;
  int64_t s = 1;
  for (int i = x->ndim - 1; i >= 0; --i) {
    sh[i] = x->shape[i];
    st[i] = x->strides ? x->strides[i] : s;
    s *= x->shape[i];
  }
  sh[0] = rows;
  t->shape = sh;
  t->strides = st;
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

// The latest plan_info of each plan slot, published by the step's plan callback (host, Python)
// before XLA runs the step's FFI calls: XLA executes a program's thunks in order on one host thread.
struct PlanRec {
  Array<int64_t> info;
  int64_t rows;  // real token rows (a prefix of the batch's rows), -1 if not a prefix
  int64_t ws_ptr;   // the int workspace holding this plan's schedule (device pointer)
  int64_t ws_size;  // its size in bytes
};
std::unordered_map<int64_t, PlanRec>* Plans() {
  static auto* plans = new std::unordered_map<int64_t, PlanRec>();
  return plans;
}
std::mutex* PlansMu() {
  static auto* mu = new std::mutex();
  return mu;
}

void PlanSet(int64_t slot, Array<int64_t> plan_info, int64_t rows, int64_t ws_ptr,
             int64_t ws_size) {
  std::lock_guard<std::mutex> lock(*PlansMu());
  (*Plans())[slot] = PlanRec{plan_info, rows, ws_ptr, ws_size};
}

PlanRec PlanGet(int64_t slot) {
  std::lock_guard<std::mutex> lock(*PlansMu());
  auto it = Plans()->find(slot);
  TVM_FFI_ICHECK(it != Plans()->end()) << "seqattn.fi_call: plan slot " << slot
                                       << " was never planned";
  return it->second;
}

void FiCall(PackedArgs args, Any* rv) {
  const int n = args.size();
  TVM_FFI_ICHECK_GE(n, 3) << "seqattn.fi_call: missing attributes";
  Array<int64_t> prog = args[n - 3].cast<Array<int64_t>>();
  Array<int64_t> iconst = args[n - 2].cast<Array<int64_t>>();
  Array<double> fconst = args[n - 1].cast<Array<double>>();
  const int64_t n_in = prog[0], n_out = prog[1], fn_id = prog[2];
  TVM_FFI_ICHECK_EQ(n_in + n_out + 3, n) << "seqattn.fi_call: operand count mismatch";
  std::vector<Array<int64_t>> keep;   // plan_info objects stay alive during the call
  keep.reserve(2);
  bool skip = false;                    // nothing to do (no real rows)
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
      case 8: keep.push_back(PlanGet(x).info); call.emplace_back(keep.back()); break;
      case 10: {  // input iconst[x] cut to the real rows of plan slot iconst[x + 1]
        int64_t rows = PlanGet(iconst[x + 1]).rows;
        TVM_FFI_ICHECK_GE(rows, 0) << "seqattn.fi_call: the batch's real token rows are not a "
                                      "prefix of its rows";
        if (rows == 0) skip = true;
        call.emplace_back(Rows(vs, args[iconst[x]].cast<DLTensor*>(), rows));
        break;
      }
      case 11: case 12:  // K / V of input iconst[x], pages [iconst[x+1], +iconst[x+2])
        call.emplace_back(Half(vs, args[iconst[x]].cast<DLTensor*>(), op == 12, iconst[x + 1],
                               iconst[x + 2]));
        break;
      case 13: case 14:  // K / V of output iconst[x], pages [iconst[x+1], +iconst[x+2])
        call.emplace_back(Half(vs, args[n_in + iconst[x]].cast<DLTensor*>(), op == 14,
                               iconst[x + 1], iconst[x + 2]));
        break;
      case 9: call.emplace_back(Raw(dev, iconst[x], iconst[x + 1], iconst[x + 2])); break;
      case 15: {  // the int workspace of plan slot x's current plan (a host plan's ring entry)
        PlanRec rec = PlanGet(x);
        call.emplace_back(Raw(dev, rec.ws_ptr, rec.ws_size, 0));
        break;
      }
      default: TVM_FFI_THROW(ValueError) << "seqattn.fi_call: bad opcode " << op;
    }
  }
  if (skip) return;
  Any result;
  Lookup(fn_id).CallPacked(call.data(), static_cast<int32_t>(call.size()), &result);
}
}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  tvm::ffi::reflection::GlobalDef()
      .def_packed("seqattn.fi_call", FiCall)
      .def("seqattn.fi_plan_set", PlanSet);
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
        # not capturable: each call reads the step's plan_info, published at run time
        jax_tvm_ffi.register_ffi_target(name, func, _ARG_SPEC, platform=platform,
                                        allow_cuda_graph=False)
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

    def rows(self, i, slot_id: int):
        """Input i cut to the plan slot's real token rows (published each step)."""
        idx = self._i(i)
        self._i(slot_id)
        self.prog += [ROWS, idx]
        return self

    def kv_pages(self, which: str, i: int, first: int, count: int, output: bool = False):
        """K or V view of pages [first, first + count) of input (or output) pool i."""
        op = {("k", False): KIN, ("v", False): VIN, ("k", True): KOUT, ("v", True): VOUT}[
            (which, output)]
        idx = self._i(i)
        self._i(first)
        self._i(count)
        self.prog += [op, idx]
        return self

    def plan(self, slot_id: int):
        self.prog += [PLAN, int(slot_id)]
        return self

    def plan_ws(self, slot_id: int):
        """The int workspace of the slot's current plan (it moves between host plans)."""
        self.prog += [PLAN_WS, int(slot_id)]
        return self

    def raw(self, tensor, code: int):
        idx = self._i(tensor.data_ptr())
        self._i(tensor.numel())
        self._i(code)
        self.prog += [RAW, idx]
        return self

    def attrs(self, fn_id: int) -> dict:
        self.prog[2] = int(fn_id)
        return dict(prog=np.asarray(self.prog, np.int64),
                    iconst=np.asarray(self.iconst or [0], np.int64),
                    fconst=np.asarray(self.fconst or [0.0], np.float64))


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


def publish_plan(slot) -> None:
    """Hand the slot's new plan_info to the shim (called by the plan callback, every step)."""
    fn = _state.get("plan_set")
    if fn is None:
        import tvm_ffi  # noqa: PLC0415

        fn = _state["plan_set"] = tvm_ffi.get_global_func("seqattn.fi_plan_set")
    rows = slot.append_rows if slot.append_rows is not None else -1
    ws = slot.int_ws if slot.int_ws is not None else getattr(slot.state, "int_ws", None)
    ws_ptr, ws_size = (ws.data_ptr(), ws.numel()) if ws is not None else (0, 0)
    fn(slot.id, slot.plan_info if slot.plan_info is not None else [], rows, ws_ptr, ws_size)


def _prepare(slot) -> tuple[str, int]:
    target = _register()
    fn_id = _raw_functions(slot)
    slot.on_plan = publish_plan
    return target, fn_id


def _kv(p, i, pages):
    """K and V views of pool input i: the whole pool (pages None) or a static page range."""
    if pages is None:
        return p.k(i).v(i)
    return p.kv_pages("k", i, *pages).kv_pages("v", i, *pages)


def _decode_program(slot, rp, n_out, pages):
    key, st = slot.key, slot.state
    p = Program(6, n_out)   # inputs: q, kv, indptr, indices, lpl, token
    p.raw(st.float_ws, RAW_U8).plan_ws(slot.id).plan(slot.id).inp(0)
    _kv(p, 1, pages)
    if key.decode_kernel == "cuda_core":
        p.inp(2).inp(3).inp(4).out(0)
        p.out(1) if rp.return_lse else p.none()
        (p.int_(st.layout).int_(key.window_left).bool_(st.pdl).raw(st.alibi, RAW_F32)
         .float_(key.logits_soft_cap).float_(rp.sm_scale).float_(1.0 / rp.rope_scale)
         .float_(1.0 / rp.rope_theta))
    else:
        p.raw(st.arange_qo, RAW_I32).inp(2).inp(3).inp(4).out(0)
        p.out(1) if rp.return_lse else p.none()
        _paged_tail(p, st, key, rp, mask_mode=0)
    return p


def _paged_tail(p, st, key, rp, mask_mode):
    (p.int_(mask_mode).int_(st.layout).int_(key.window_left).bool_(st.pdl)
     .none().none().raw(st.alibi, RAW_F32).none().none().none().none().none()
     .float_(key.logits_soft_cap).float_(rp.sm_scale).float_(1.0 / rp.rope_scale)
     .float_(1.0 / rp.rope_theta).int_(0))


def decode(key, rp, token, q, kv, indptr, indices, lpl, pages=None):
    """FlashInfer decode as an XLA FFI call. `pages=(first, count)`: a static layer's page range
    of the pool (then `indices` are layer-local); None: `indices` address the whole pool."""
    slot = ops.get_slot(key)
    target, fn_id = _prepare(slot)
    p = _decode_program(slot, rp, 2 if rp.return_lse else 1, pages)
    outs = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if rp.return_lse:
        outs.append(jax.ShapeDtypeStruct(q.shape[:2], jnp.float32))
    res = jax.ffi.ffi_call(target, tuple(outs))(q, kv, indptr, indices, lpl, token,
                                                **p.attrs(fn_id))
    return tuple(res)


def prefill(key, rp, token, q, kv, qo_indptr, indptr, indices, lpl, pages=None):
    slot = ops.get_slot(key)
    target, fn_id = _prepare(slot)
    st = slot.state
    p = Program(7, 2 if rp.return_lse else 1)  # q, kv, qo_indptr, indptr, indices, lpl, token
    p.raw(st.float_ws, RAW_U8).raw(st.int_ws, RAW_U8).plan(slot.id).inp(0)
    _kv(p, 1, pages)
    p.inp(2).inp(3).inp(4).inp(5).out(0)
    p.out(1) if rp.return_lse else p.none()
    _paged_tail(p, st, key, rp, mask_mode=1 if key.causal else 0)
    outs = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if rp.return_lse:
        outs.append(jax.ShapeDtypeStruct(q.shape[:2], jnp.float32))
    res = jax.ffi.ffi_call(target, tuple(outs))(q, kv, qo_indptr, indptr, indices, lpl, token,
                                                **p.attrs(fn_id))
    # rows past qo_indptr[B] are not written by the kernel: zero them (lse -inf) in XLA
    row_ok = jnp.arange(q.shape[0], dtype=jnp.int32) < qo_indptr[-1]
    out = jnp.where(row_ok[:, None, None], res[0], jnp.zeros((), q.dtype))
    if rp.return_lse:
        return out, jnp.where(row_ok[:, None], res[1], -jnp.inf)
    return (out,)


def append(key, token, kv, keys, values, batch_indices, positions, indptr, indices, lpl,
           pages=None):
    """FlashInfer's append kernel as an XLA FFI call writing the pool in place (the output aliases
    input 0: donate the pool). Only the plan's real token rows (a prefix) are written."""
    slot = ops.get_slot(key)
    target = _register()
    st = slot.state
    fn_id = st.__dict__.get("ffi_append_id")
    if fn_id is None:
        from . import fi_provider  # noqa: PLC0415

        fn_id = st.ffi_append_id = register_function(
            fi_provider._page_module().append_paged_kv_cache)
    slot.on_plan = publish_plan
    # inputs: kv, keys, values, batch_indices, positions, indptr, indices, lpl, token
    p = Program(9, 1)
    p.rows(1, slot.id).rows(2, slot.id).rows(3, slot.id).rows(4, slot.id)
    if pages is None:
        p.kv_pages("k", 0, 0, -1, output=True).kv_pages("v", 0, 0, -1, output=True)
    else:
        p.kv_pages("k", 0, *pages, output=True).kv_pages("v", 0, *pages, output=True)
    p.inp(6).inp(5).inp(7).int_(st.layout)
    (out,) = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct(kv.shape, kv.dtype),),
                              input_output_aliases={0: 0})(
        kv, keys, values, batch_indices, positions, indptr, indices, lpl, token,
        **p.attrs(fn_id))
    return out
