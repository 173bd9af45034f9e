"""Fast path: FlashInfer's run functions as XLA FFI custom calls (no Python per layer).

`jax-tvm-ffi` registers a tvm-ffi function as an XLA FFI target: XLA calls it from C++ on its own
stream with the operands as DLTensors, attributes as compile-time constants, and (with
`allow_cuda_graph`) lets XLA capture it in a command buffer. FlashInfer's compiled module
functions are tvm-ffi functions, but their argument lists cannot be fed directly: K and V are
strided views of our one pool, the workspaces are torch-owned buffers, and `plan_info` must sit
between the workspaces and the query. So a ~100-line C++ shim (compiled once with
`tvm_ffi.cpp.load_inline` from bridge/fi_shim.cpp, registered as the global function
`seqattn.fi_call`) receives

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

Static plans (`FlashInferBackend(cuda_graphs=True)`, host plans of decode and prefill steps): the
plan is made in FlashInfer's CUDA-graph mode, where `plan_info` depends only on the batch's shape
(the request count and the row count), not on its lengths. Its `plan_info` is then a compile-time
constant of the call (`PLAN_CONST`) and its schedule (the int workspace's bytes) an XLA operand of
the call, passed into the step with the step's other inputs. Such a call reads nothing but its
operands, its attributes and the permanent float workspace, so it goes to a second FFI target
registered with `allow_cuda_graph`: XLA may capture it in the step's command buffer (one CUDA
graph) and replay it; a new `plan_info` is a new jit cache entry, never a stale capture.
"""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


_TARGET = "seqattn_fi_call"
_GRAPH_TARGET = "seqattn_fi_call_graph"   # capturable: static plans only (see above)
# No string attribute: jax-tvm-ffi 0.1.3 passes a string attribute as a view of a temporary, which
# dangles for strings longer than the 7 bytes tvm-ffi stores inline (seen: heap corruption). The
# FlashInfer function is named by an integer id in `prog` instead.
_ARG_SPEC = ["args", "rets", "attrs.prog", "attrs.iconst", "attrs.fconst"]
_FN_PREFIX = "seqattn.fi.fn"

# program opcodes (keep in sync with fi_shim.cpp)
IN, OUT, KH, VH, INT, FLT, BOOL, NONE, PLAN, RAW, ROWS, KIN, VIN, KOUT, VOUT, PLAN_WS, PLAN_CONST = \
    range(17)
# opcodes whose value is fixed when the program is built: a call made only of these may be replayed
_CAPTURABLE = {IN, OUT, KH, VH, INT, FLT, BOOL, NONE, RAW, KIN, VIN, KOUT, VOUT, PLAN_CONST}
RAW_U8, RAW_F32, RAW_I32 = 0, 1, 2

_SOURCE = Path(__file__).with_name("fi_shim.cpp")   # shipped as package data


class _Shim:
    """The process's one compiled shim and its registrations (tvm-ffi globals and XLA FFI targets
    are process-wide by nature)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.module = None                 # the loaded shim (kept alive)
        self.error: str | None = None      # why it cannot build here (cached)
        self.targets: dict[tuple[str, bool], str] = {}  # (platform, capturable) -> target name
        self.fn_ids: dict[int, tuple[int, object]] = {}   # id(func) -> (shim id, func)
        self.plan_set = None               # `seqattn.fi_plan_set`
        self.raw_alias = None              # `seqattn.fi_raw_alias`
        self.aliased: set = set()          # (home pointer, device) pairs registered


_SHIM = _Shim()


def available() -> bool:
    """jax-tvm-ffi imports and the shim builds (cached)."""
    if _SHIM.error is not None:
        return False
    try:
        _register()
        return True
    except Exception as e:  # noqa: BLE001
        _SHIM.error = f"{type(e).__name__}: {e}"
        return False


def unavailable_reason() -> str | None:
    return _SHIM.error


def _register(platform: str = "gpu", capturable: bool = False) -> str:
    """The XLA FFI target name of the shim on `platform`; `capturable`: the target registered with
    `allow_cuda_graph` (for calls whose every argument is fixed when the program is built)."""
    name = _SHIM.targets.get((platform, capturable))
    if name is not None:
        return name
    with _SHIM.lock:
        if (platform, capturable) in _SHIM.targets:
            return _SHIM.targets[(platform, capturable)]
        import jax_tvm_ffi  # noqa: PLC0415
        import tvm_ffi  # noqa: PLC0415
        import tvm_ffi.cpp  # noqa: PLC0415

        if _SHIM.module is None:
            _SHIM.module = tvm_ffi.cpp.load_inline(name="seqattn_fi_shim",
                                                   cpp_sources=_SOURCE.read_text())
        func = tvm_ffi.get_global_func("seqattn.fi_call")
        name = _GRAPH_TARGET if capturable else _TARGET
        if platform != "gpu":
            name = f"{name}_{platform}"
        # the ordinary target is not capturable: its calls read the step's plan_info, published
        # at run time; the graph target's calls read only what the program fixed
        jax_tvm_ffi.register_ffi_target(name, func, _ARG_SPEC, platform=platform,
                                        allow_cuda_graph=capturable)
        _SHIM.targets[(platform, capturable)] = name
        return name


def register_function(func) -> int:
    """Make a tvm-ffi function callable by the shim; returns its integer id (idempotent)."""
    import tvm_ffi  # noqa: PLC0415

    with _SHIM.lock:
        key = id(func)
        if key in _SHIM.fn_ids and _SHIM.fn_ids[key][1] is func:
            return _SHIM.fn_ids[key][0]
        fn_id = len(_SHIM.fn_ids)
        tvm_ffi.register_global_func(f"{_FN_PREFIX}{fn_id}", func, override=True)
        _SHIM.fn_ids[key] = (fn_id, func)   # keep func alive: its id must never be reused
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

    def plan_const(self, plan_info):
        """A static plan_info (a tuple of ints), fixed in the program."""
        idx = self._i(len(plan_info))
        for v in plan_info:
            self._i(v)
        self.prog += [PLAN_CONST, idx]
        return self

    @property
    def capturable(self) -> bool:
        """Every argument is fixed by the program: XLA may capture and replay the call."""
        return all(op in _CAPTURABLE for op in self.prog[3::2])

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


def publish_plan(slot) -> None:
    """Hand the slot's new plan_info to the shim (called by the plan / adopt callback, every
    step): the plan, the real token rows (a prefix, or -1) and the int workspace holding the
    plan's schedule."""
    if _SHIM.plan_set is None:
        import tvm_ffi  # noqa: PLC0415

        _SHIM.plan_set = tvm_ffi.get_global_func("seqattn.fi_plan_set")
    rows = slot.append_rows if slot.append_rows is not None else -1
    ws = slot.int_ws[0] if slot.int_ws else None
    ws_ptr, ws_size = (ws.data_ptr(), ws.numel()) if ws is not None else (0, 0)
    _SHIM.plan_set(slot.id, slot.plan_info if slot.plan_info is not None else [], rows, ws_ptr,
                   ws_size)


def raw_buffer(slot, a):
    """The permanent device buffer argument `a` of `slot`'s argument list stands for (its float
    workspace, or a torch tensor of the slot's state), or None where `a` is not one (a symbol
    filled at run time, a scalar, None). `program` emits these as RAW, `alias_peers` maps them."""
    from . import fi_provider as fp  # noqa: PLC0415

    if a is fp.FLOAT_WS:
        return slot.state.float_ws
    if isinstance(a, fp.Arg) or a is None or isinstance(a, (bool, int, float)):
        return None
    return a


def _raw_code(t) -> int:
    return {"torch.float32": RAW_F32, "torch.int32": RAW_I32}.get(str(t.dtype), RAW_U8)


def program(slot, args, inputs: dict, n_in: int, n_out: int, pages, kv_input: int,
            kv_output: int | None = None, static_plan: dict | None = None,
            outputs: dict | None = None) -> Program:
    """Compile a FlashInfer argument list (`fi_provider.run_args` / `batch_pod_args` /
    `append_args`) into the shim's program. `inputs`: the input index of each symbolic buffer;
    `pages`: the layer's static page range of the pool (None: the whole pool); `kv_input` /
    `kv_output`: where the pool is (K / V halves of an input for runs, of the aliased output for
    append); `outputs`: the output index of each output symbol (default OUT 0, LSE 1; an index
    past the outputs passes None). `static_plan`: a static plan's symbols: a plan_info symbol ->
    its tuple (fixed in the program), an int workspace symbol -> the input index of its schedule
    (else both come from the slot at run time)."""
    from . import fi_provider as fp  # noqa: PLC0415

    outputs = {fp.OUT: 0, fp.LSE: 1} if outputs is None else outputs
    static = static_plan or {}
    p = Program(n_in, n_out)
    first, count = pages if pages is not None else (0, -1)
    for a in args:
        if isinstance(a, fp.Arg):
            if a in static:
                v = static[a]
                p.plan_const(v) if isinstance(v, tuple) else p.inp(v)
            elif a is fp.FLOAT_WS:
                p.raw(raw_buffer(slot, a), RAW_U8)
            elif a is fp.INT_WS:
                p.plan_ws(slot.id)
            elif a is fp.PLAN_INFO:
                p.plan(slot.id)
            elif a is fp.K or a is fp.V:
                p.kv_pages("k" if a is fp.K else "v", kv_input, first, count)
            elif a is fp.K_CACHE or a is fp.V_CACHE:
                p.kv_pages("k" if a is fp.K_CACHE else "v", kv_output, first, count, output=True)
            elif a in outputs:
                p.out(outputs[a]) if outputs[a] < n_out else p.none()
            elif any(a is r for r in (fp.KEYS, fp.VALUES, fp.BATCH_INDICES, fp.POSITIONS)):
                p.rows(inputs[a], slot.id)      # cut to the plan's real token rows
            else:
                p.inp(inputs[a])
        elif a is None:
            p.none()
        elif isinstance(a, bool):
            p.bool_(a)
        elif isinstance(a, int):
            p.int_(a)
        elif isinstance(a, float):
            p.float_(a)
        else:   # a permanent torch buffer
            p.raw(a, _raw_code(a))
    return p


def alias_peers(slot, args_of) -> None:
    """Several devices (tensor parallel): a program is built once from the home slot's buffers,
    and XLA runs it, constants included, on every device of the mesh. Register with the shim, for
    every raw buffer the program names, the same slot's buffer on each peer device (same role,
    same size), so that a call on device d reads d's own workspace (fi_shim.cpp, RawAlias).
    `args_of(slot)`: the argument list the program was built from, for any of the key's slots.
    A no-op on one device."""
    peers = [s for d, s in slot.peers.items() if d != slot.device]
    if not peers:
        return
    if _SHIM.raw_alias is None:
        import tvm_ffi  # noqa: PLC0415

        _register()   # the shim is built and loaded
        _SHIM.raw_alias = tvm_ffi.get_global_func("seqattn.fi_raw_alias")
    home = [raw_buffer(slot, a) for a in args_of(slot)]
    for peer in peers:
        for a, b in zip(home, [raw_buffer(peer, a) for a in args_of(peer)], strict=True):
            if a is None:
                continue
            if b is None or a.numel() != b.numel() or a.dtype != b.dtype:
                raise AssertionError(f"seqattn_jax: plan slot {slot.key} has no matching buffer "
                                     f"on device {peer.device}")
            if (a.data_ptr(), peer.device) not in _SHIM.aliased:
                _SHIM.raw_alias(a.data_ptr(), peer.device, b.data_ptr())
                _SHIM.aliased.add((a.data_ptr(), peer.device))


def _run(slot, rp, operands: tuple, names: tuple, out_like, pages, static_plan=None):
    from . import fi_provider as fp  # noqa: PLC0415

    fn_id = register_function(fp.run_function(slot))
    inputs = {getattr(fp, n.upper()): i for i, n in enumerate(names)
              if n not in ("kv", "token", "schedule")}
    n_out = 2 if rp.return_lse else 1
    static = None if static_plan is None else {fp.PLAN_INFO: static_plan,
                                               fp.INT_WS: names.index("schedule")}
    p = program(slot, fp.run_args(slot, rp), inputs, len(operands), n_out, pages,
                kv_input=names.index("kv"), static_plan=static)
    alias_peers(slot, lambda s: fp.run_args(s, rp))
    target = _capturable_target(p) if static is not None else _register()
    outs = [jax.ShapeDtypeStruct(out_like.shape, out_like.dtype)]
    if rp.return_lse:
        outs.append(jax.ShapeDtypeStruct(out_like.shape[:2], jnp.float32))
    return tuple(jax.ffi.ffi_call(target, tuple(outs))(*operands, **p.attrs(fn_id)))


def _capturable_target(p: Program) -> str:
    """The capturable FFI target, for a program that reads nothing decided at run time."""
    if not p.capturable:
        raise AssertionError(f"seqattn_jax: a static-plan call reads run-time state: {p.prog}")
    return _register(capturable=True)


def _as_bytes(schedule):
    """A static plan's schedule (int32 [S]) as the uint8 workspace FlashInfer addresses by byte
    offsets (a bitcast: no copy)."""
    return jax.lax.bitcast_convert_type(schedule, jnp.uint8).reshape(-1)


def batch_pod(slot, rp, schedule, q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d,
              indices_d, lpl_d, kv, pages, static_plan):
    """FlashInfer's batch POD (a paged prefill batch and a decode batch in one launch) as an XLA
    FFI call, for static plans only: `static_plan` = (decode plan_info, prefill plan_info),
    `schedule` their schedules end to end (int32: the decode half's `n_d` words first, as
    `ops.host_plan_static` lays them out). -> (o_p, o_d[, lse_p, lse_d]); prefill rows past
    qo_indptr_p[B] unwritten."""
    from . import fi_provider as fp  # noqa: PLC0415

    (info_d, info_p), n_d = static_plan[:2], static_plan[2]
    operands = (q_p, qo_indptr_p, indptr_p, indices_p, lpl_p, q_d, indptr_d, indices_d, lpl_d,
                kv, _as_bytes(schedule[:n_d]), _as_bytes(schedule[n_d:]))
    inputs = {fp.Q_P: 0, fp.QO_INDPTR_P: 1, fp.INDPTR_P: 2, fp.INDICES_P: 3, fp.LPL_P: 4,
              fp.Q_D: 5, fp.INDPTR: 6, fp.INDICES: 7, fp.LPL: 8}
    n_out = 4 if rp.return_lse else 2
    p = program(slot, fp.batch_pod_args(slot, rp), inputs, len(operands), n_out, pages,
                kv_input=9, static_plan={fp.PLAN_INFO: info_d, fp.INT_WS: 10,
                                         fp.PLAN_INFO_P: info_p, fp.INT_WS_P: 11},
                outputs={fp.OUT_P: 0, fp.OUT_D: 1, fp.LSE_P: 2, fp.LSE_D: 3})
    alias_peers(slot, lambda s: fp.batch_pod_args(s, rp))
    outs = [jax.ShapeDtypeStruct(q_p.shape, q_p.dtype), jax.ShapeDtypeStruct(q_d.shape, q_d.dtype)]
    if rp.return_lse:
        outs += [jax.ShapeDtypeStruct(q_p.shape[:2], jnp.float32),
                 jax.ShapeDtypeStruct(q_d.shape[:2], jnp.float32)]
    fn_id = register_function(fp.batch_pod_function(slot))
    return tuple(jax.ffi.ffi_call(_capturable_target(p), tuple(outs))(*operands,
                                                                       **p.attrs(fn_id)))


def _last(token, static_plan):
    """The run's last operand and its name: the plan's token, or a static plan's schedule (its
    int workspace bytes, int32 -> uint8: FlashInfer addresses it by byte offsets)."""
    if static_plan is None:
        return token, "token"
    return _as_bytes(token), "schedule"


def decode(slot, rp, token, q, kv, indptr, indices, lpl, pages=None, static_plan=None):
    """FlashInfer decode as an XLA FFI call. `pages=(first, count)`: a static layer's page range
    of the pool (then `indices` are layer-local); None: `indices` address the whole pool.
    `static_plan`: a static plan's plan_info (then `token` is its schedule, int32[S])."""
    last, name = _last(token, static_plan)
    return _run(slot, rp, (q, kv, indptr, indices, lpl, last),
                ("q", "kv", "indptr", "indices", "lpl", name), q, pages, static_plan)


def prefill(slot, rp, token, q, kv, qo_indptr, indptr, indices, lpl, pages=None,
            static_plan=None):
    """FlashInfer paged prefill as an XLA FFI call (rows past qo_indptr[B] are not written)."""
    last, name = _last(token, static_plan)
    return _run(slot, rp, (q, kv, qo_indptr, indptr, indices, lpl, last),
                ("q", "kv", "qo_indptr", "indptr", "indices", "lpl", name), q, pages,
                static_plan)


def append(slot, token, kv, keys, values, batch_indices, positions, indptr, indices, lpl,
           pages=None):
    """FlashInfer's append kernel as an XLA FFI call writing the pool in place (the output aliases
    input 0: donate the pool). Only the plan's real token rows (a prefix) are written."""
    from . import fi_provider as fp  # noqa: PLC0415

    target = _register()
    fn_id = register_function(fp.append_function())
    operands = (kv, keys, values, batch_indices, positions, indptr, indices, lpl, token)
    inputs = {fp.KEYS: 1, fp.VALUES: 2, fp.BATCH_INDICES: 3, fp.POSITIONS: 4, fp.INDPTR: 5,
              fp.INDICES: 6, fp.LPL: 7}
    p = program(slot, fp.append_args(slot), inputs, len(operands), 1, pages, kv_input=0,
                kv_output=0)
    (out,) = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct(kv.shape, kv.dtype),),
                              input_output_aliases={0: 0})(*operands, **p.attrs(fn_id))
    return out
