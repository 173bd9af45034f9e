"""seqattn_jax.xla_flags: the command-buffer flags reach XLA_FLAGS before jax is imported, never
twice, never overriding a flag the user set, and not at all once jax is imported; the example and
benchmark scripts set them before importing jax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import json, os, runpy
m = runpy.run_path("seqattn_jax/xla_flags.py")    # as the scripts do: without the package (jax)
first = m["use_command_buffers"]()
again = m["use_command_buffers"]()
flags = os.environ.get("XLA_FLAGS", "")
import jax.numpy as jnp
jnp.ones(2).block_until_ready()
late = m["use_command_buffers"]()               # jax is imported: too late, nothing changes
assert os.environ.get("XLA_FLAGS", "") == flags
print(json.dumps(dict(first=first, again=again, flags=flags, late=late,
                      want=list(m["COMMAND_BUFFER_FLAGS"]))))
"""


def _run(env_flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if env_flags is not None:
        env["XLA_FLAGS"] = env_flags
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_flags_are_added_once_before_the_backend_exists():
    r = _run(None)
    assert r["first"] and r["again"] and not r["late"]
    assert r["flags"].split() == r["want"]          # each flag once, although called twice


def test_a_flag_the_user_set_is_kept():
    r = _run("--xla_gpu_graph_min_graph_size=7 --xla_dump_to=/tmp/x")
    flags = r["flags"].split()
    assert "--xla_gpu_graph_min_graph_size=7" in flags and "--xla_dump_to=/tmp/x" in flags
    assert not any(f.startswith("--xla_gpu_graph_min_graph_size=1") for f in flags)
    assert r["want"][0] in flags                     # the other flag is still added


def test_the_scripts_set_the_flags_before_importing_jax():
    for script in ("examples/decode.py", "examples/serve_hf.py", "benchmarks/serve_bench.py",
                   "benchmarks/profile_step.py", "benchmarks/tp_bench.py"):
        path = ROOT / script
        if not path.exists():      # the sdist has no benchmarks/
            continue
        text = path.read_text()
        assert '"xla_flags.py"))["use_command_buffers"]()' in text, script
        assert text.index("use_command_buffers") < text.index("\nimport jax"), script
