// seqattn_jax XLA FFI shim: assembles a FlashInfer function's argument list from a small
// program (see bridge/ffi.py, which compiles this file once with tvm_ffi.cpp.load_inline).
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

// Several devices (tensor parallel): XLA runs the same program, with the same constants, on every
// device of a mesh, but a raw buffer's pointer is the home device's. `seqattn.fi_raw_alias`
// registers, per (home pointer, device), the pointer of that device's own copy (the same plan
// slot's buffer there); a call substitutes its device's. Set at trace time, never changed.
std::unordered_map<std::string, int64_t>* Aliases() {
  static auto* aliases = new std::unordered_map<std::string, int64_t>();
  return aliases;
}
std::mutex* AliasesMu() {
  static auto* mu = new std::mutex();
  return mu;
}

void RawAlias(int64_t ptr, int64_t device_id, int64_t peer_ptr) {
  std::lock_guard<std::mutex> lock(*AliasesMu());
  (*Aliases())[std::to_string(ptr) + ":" + std::to_string(device_id)] = peer_ptr;
}

int64_t AliasOf(int64_t ptr, int32_t device_id) {
  std::lock_guard<std::mutex> lock(*AliasesMu());
  if (Aliases()->empty()) return ptr;
  auto it = Aliases()->find(std::to_string(ptr) + ":" + std::to_string(device_id));
  return it == Aliases()->end() ? ptr : it->second;
}

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
  keep.reserve(4);
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
      case 9:  // a raw buffer: this device's copy of it (see RawAlias)
        call.emplace_back(Raw(dev, AliasOf(iconst[x], dev.device_id), iconst[x + 1],
                              iconst[x + 2]));
        break;
      case 16: {  // a static plan_info: iconst[x] entries from iconst[x + 1] (graph-mode plans)
        std::vector<int64_t> info;
        for (int64_t j = 0; j < iconst[x]; ++j) info.push_back(iconst[x + 1 + j]);
        keep.push_back(Array<int64_t>(info.begin(), info.end()));
        call.emplace_back(keep.back());
        break;
      }
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
      .def("seqattn.fi_plan_set", PlanSet)
      .def("seqattn.fi_raw_alias", RawAlias);
}
