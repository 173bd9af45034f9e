"""seqattn_jax.xla_flags: the command-buffer flags reach XLA_FLAGS before JAX's backend exists,
never twice, never overriding a flag the user set, and not at all once the backend exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import json, os
from seqattn_jax.xla_flags import COMMAND_BUFFER_FLAGS, use_command_buffers
first = use_command_buffers()
again = use_command_buffers()
flags = os.environ.get("XLA_FLAGS", "")
import jax.numpy as jnp
jnp.ones(2).block_until_ready()          # the backend exists from here on
late = use_command_buffers()
print(json.dumps(dict(first=first, again=again, flags=flags, late=late,
                      want=list(COMMAND_BUFFER_FLAGS))))
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
