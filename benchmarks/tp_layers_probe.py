"""Where does tensor parallel's per-layer host cost come from? The 8B shape's matmuls and
all-reduces alone (no attention, no engine), timed back to back on 1 GPU, on N GPUs driven by one
process, and on N GPUs driven by one process each (`jax.distributed` on one host).

    python3 benchmarks/tp_layers_probe.py                       # 1 GPU, then N GPUs in one process
    python3 benchmarks/tp_layers_probe.py --processes 1 2       # + N GPUs, one process per GPU
    python3 benchmarks/tp_layers_probe.py --collectives-in-graphs --trace-dir /tmp/probe

One "layer" is the Megatron-split projections of a Llama-3-8B layer at batch `--batch`:
h @ wqkv (columns split) -> h @ wo (rows split) -> all-reduce -> h @ w_gate_up (columns)
-> SwiGLU -> @ w_down (rows) -> all-reduce, with residual adds, `--layers` of them in one jitted
program whose output is its next input. Only the attention is missing (its FFI call is one more
command of the same CUDA graph per layer, so it changes no launch count). Figures per program
run ("step"), device-bound: `--reps` x `--iters` dispatches, median over reps.

Why: in one process, XLA cuts a device's command buffer at every all-reduce, and each device's
host thread then launches 2 graphs and 2 NCCL thunks a layer; traces of the 2-GPU decode step
(session 6, run P) show those launches taking about as long as the GPU's work. One process per
GPU separates the two devices' host threads (no CUDA driver or runtime state shared) and drops
the per-execution rendezvous of the two device threads; this probe says whether that changes
the step before the engine is made to run that way. `--collectives-in-graphs` also records the
all-reduces into the command buffers (one graph per program).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import runpy
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# the serving scripts' command-buffer flags (seqattn_jax/xla_flags.py, loaded without the package);
# the first one names the captured command kinds, to which "COLLECTIVES" can be added
CMD_FLAGS = runpy.run_path(os.path.join(HERE, os.pardir, "seqattn_jax", "xla_flags.py"))[
    "COMMAND_BUFFER_FLAGS"]


def graph_flags(collectives: bool) -> str:
    first, *rest = CMD_FLAGS
    return " ".join([first + (",COLLECTIVES" if collectives else ""), *rest])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    """Build the program over this process's view of the devices and time it. Returns a dict."""
    import dataclasses  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

    from tp_bench import CFG_8B, SMOKE, hbm_floor_ms  # noqa: PLC0415  (the shapes, the floor)

    # --smoke: tp_bench's tiny shape on CPU devices, a plumbing check, not a measurement
    cfg = dataclasses.replace(SMOKE if args.smoke else CFG_8B, num_layers=args.layers)
    D, FFN, HQ, HKV, HD = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    devs = jax.devices()[:args.gpus]
    mesh = Mesh(np.asarray(devs), ("tp",))
    col, row, rep = (NamedSharding(mesh, s) for s in (P(None, "tp"), P("tp", None), P()))
    dt = jnp.dtype(cfg.dtype)
    shapes = {"wqkv": ((D, (HQ + 2 * HKV) * HD), col), "wo": ((HQ * HD, D), row),
              "w_gate_up": ((D, 2 * FFN), col), "w_down": ((FFN, D), row)}

    progs = {}   # one program per (shape, sharding): the 32 layers compile 4 programs, not 128

    def rnd(shape, shard, seed):
        if (shape, shard) not in progs:
            progs[shape, shard] = jax.jit(
                lambda k: (jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[0])
                           ).astype(dt), out_shardings=shard)
        return progs[shape, shard](jax.random.key(seed))

    layers = [{k: rnd(s, sh, 10 * i + j) for j, (k, (s, sh)) in enumerate(shapes.items())}
              for i in range(args.layers)]
    head = rnd((D, cfg.vocab_size), col if cfg.vocab_size % args.gpus == 0 else rep, 7)

    def norm(x):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(dt)

    def step(layers, head, h, x):
        if x is not None:   # a per-call input read by the first command, as the engine's steps have
            h = h + x[:, None].astype(dt) * jnp.asarray(1e-3, dt)
        for ly in layers:
            qkv = norm(h) @ ly["wqkv"]   # columns: N groups of [q_i | k_i | v_i] (sharding.py)
            q = qkv.reshape(h.shape[0], args.gpus, -1)[:, :, :HQ * HD // args.gpus]
            # stand-in for attention: the q heads, unchanged (same shapes out, nothing resharded)
            h = h + q.reshape(h.shape[0], HQ * HD) @ ly["wo"]
            gu = norm(h) @ ly["w_gate_up"]
            gu = gu.reshape(h.shape[0], args.gpus, 2, FFN // args.gpus)
            act = (jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]).reshape(h.shape[0], FFN)
            h = h + act @ ly["w_down"]
        tok = jnp.argmax(jnp.dot(norm(h), head, preferred_element_type=jnp.float32), -1)
        h = h * jnp.asarray(0.5, dt) + tok[:, None].astype(dt) * jnp.asarray(1e-6, dt)
        return h, tok.astype(jnp.int32)

    f = jax.jit(step, in_shardings=(None, None, rep, rep), out_shardings=(rep, rep),
                donate_argnums=2)
    # the program's collectives: 2 all-reduces a layer as in the model, and nothing resharded
    hlo = f.lower(layers, head, jax.ShapeDtypeStruct((args.batch, D), dt, sharding=rep),
                  np.zeros(args.batch, np.int32)).compile().as_text()
    collectives = {op: len(re.findall(rf"= [^=]*\b{op}(?:-start)?\(", hlo))
                   for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute")}
    out = []
    for mode in args.modes:
        fresh = mode == "fresh"
        rng = np.random.default_rng(0)

        def call(h):
            # "fresh": a new host array each call (a new device buffer) and a new token output,
            # like the engine's packed step inputs and its read-back; "stable": h alone, donated
            # and aliased to the output, so every buffer the program touches keeps its address
            x = rng.integers(0, 4, args.batch, dtype=np.int32) if fresh else None
            h, tok = f(layers, head, h, x)
            return h

        h = jax.jit(lambda: jnp.ones((args.batch, D), dt), out_shardings=rep)()
        t0 = time.perf_counter()
        h = jax.block_until_ready(call(h))
        compile_s = time.perf_counter() - t0
        for _ in range(args.iters):
            h = call(h)
        jax.block_until_ready(h)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                h = call(h)
            jax.block_until_ready(h)
            times.append((time.perf_counter() - t0) / args.iters * 1e3)
        row = dict(gpus=args.gpus, processes=jax.process_count(), mode=mode, batch=args.batch,
                   layers=args.layers, step_ms=statistics.median(times),
                   step_ms_all=[round(t, 3) for t in times], collectives=collectives,
                   weights_floor_ms=hbm_floor_ms(cfg, 0, 0, args.gpus),   # no KV read
                   compile_s=round(compile_s, 1), xla_flags=os.environ.get("XLA_FLAGS", ""))
        if args.trace_dir:   # every process runs the executions (collectives); process 0 traces
            import profile_step  # noqa: PLC0415  (benchmarks/profile_step.py)

            tdir = os.path.join(args.trace_dir, f"g{args.gpus}p{jax.process_count()}_{mode}_"
                                f"{'coll' if 'COLLECTIVES' in row['xla_flags'] else 'nocoll'}")
            n_exec = 5
            with (jax.profiler.trace(tdir) if jax.process_index() == 0 else
                  contextlib.nullcontext()):
                for _ in range(n_exec):
                    h = call(h)
                jax.block_until_ready(h)
        if args.trace_dir and jax.process_index() == 0:
            row["host"] = profile_step.host_summary(tdir, n_exec)
            # kernel time by name for one GPU: (name, us per execution, launches per execution)
            row["kernels_per_gpu"] = profile_step.summarize_trace(
                tdir, n_exec * args.gpus, top=10).get("top", [])
            dev = profile_step.per_device(tdir, n_exec, top=4)
            row["device"] = {k: v if not isinstance(v, dict) else
                             {a: v[a] for a in ("busy_us_per_step", "idle_us_per_step", "gaps")}
                             for k, v in dev.items()}
        out.append(row)
    return out


def child(args):
    """One process of the `--processes` run: this process drives local GPU `--rank` only."""
    import jax  # noqa: PLC0415

    if args.smoke:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.processes, process_id=args.rank,
                               local_device_ids=None if args.smoke else [args.rank])
    assert jax.process_count() == args.processes and len(jax.local_devices()) == 1
    rows = run(args)
    if args.rank == 0:
        for r in rows:
            print("RESULT " + json.dumps(r), flush=True)
    jax.distributed.shutdown()


def spawn(args, extra_env: dict) -> list[dict]:
    """Run `run` in fresh processes: one over `--gpus` devices, or `--processes` of them."""
    base = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch),
            "--layers", str(args.layers), "--iters", str(args.iters), "--reps", str(args.reps),
            "--gpus", str(args.gpus), "--modes", *args.modes] + \
        (["--smoke"] if args.smoke else []) + \
        (["--trace-dir", args.trace_dir] if args.trace_dir else [])
    env = dict(os.environ, **extra_env)
    if args.smoke:   # one CPU device per process, N in the single-process run
        env["JAX_PLATFORMS"] = "cpu"
        if args.processes <= 1:
            env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={args.gpus}"
    if args.processes <= 1:
        cmds = [base + ["--in-process"]]
    else:
        port = _free_port()
        cmds = [base + ["--child", "--rank", str(r), "--processes", str(args.processes),
                        "--port", str(port)] for r in range(args.processes)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=args.timeout)
        for ln in text.splitlines():
            if ln.startswith("RESULT "):
                out.append(json.loads(ln[7:]))
        if p.returncode:
            print(text[-3000:], flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2, help="N")
    ap.add_argument("--processes", type=int, nargs="*", default=[1],
                    help="also run N GPUs with this many processes (N: one each)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--collectives-in-graphs", action="store_true",
                    help="also time each N-GPU run with COLLECTIVES in XLA's command buffers")
    ap.add_argument("--modes", nargs="+", default=["fresh", "stable"], choices=("fresh", "stable"),
                    help="fresh: a new input buffer and a new output each call (as the engine "
                         "calls its steps); stable: every buffer keeps its address (donated)")
    ap.add_argument("--trace-dir", default=None,
                    help="also trace 5 executions of each and print XLA's host side per "
                         "execution (command-buffer re-recording, graph launches) and each GPU's "
                         "busy / idle time")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU devices (gloo across processes): the plumbing only")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.processes = args.processes[0]
        return child(args)
    if args.in_process:
        for r in run(args):
            print("RESULT " + json.dumps(r), flush=True)
        return None
    n = args.gpus
    rows = []
    variants = [(False, "")] + ([(True, "+collectives in graphs")]
                                if args.collectives_in_graphs else [])
    for gpus, procs in [(1, 1)] + [(n, p) for p in args.processes]:
        for collectives, label in variants if gpus > 1 else variants[:1]:
            sub = argparse.Namespace(**{**vars(args), "gpus": gpus, "processes": procs})
            env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " +
                                 graph_flags(collectives)).strip(),
                   "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
            for r in spawn(sub, env):
                r["variant"] = f"{gpus} GPU(s), {procs} process(es){label and ' ' + label}"
                rows.append(r)
                print(json.dumps(r), flush=True)
    one = {r["mode"]: r["step_ms"] for r in rows if r["gpus"] == 1}
    print(f"\n{'variant':48s} {'inputs':>6} {'step ms':>8} {'floor ms':>8} {'x floor':>7} "
          f"{'speedup':>7} {'re-record us':>12}")
    for r in rows:
        rec = r.get("host", {}).get("command_buffer::initialize", {}).get("us_per_exec", "")
        print(f"{r['variant']:48s} {r['mode']:>6} {r['step_ms']:8.3f} {r['weights_floor_ms']:8.3f} "
              f"{r['step_ms'] / r['weights_floor_ms']:7.2f} "
              f"{format(one[r['mode']] / r['step_ms'], '7.2f') if r['mode'] in one else '':>7} "
              f"{rec:>12}")
    return rows


if __name__ == "__main__":
    main()
