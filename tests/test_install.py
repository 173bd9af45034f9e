"""What a newcomer meets before any kernel runs: optional parts name the extra to install, the
bridge imports by its plain name from a checkout, and the version lives in one place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str):
    """Run `code` in a fresh interpreter from outside the repository, the checkout on sys.path."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                          capture_output=True, text=True, timeout=300, cwd="/")


@pytest.mark.parametrize("module, missing, extra", [("seqattn_jax.nnx", "flax", "seqattn-jax[example]"),
                                                    ("seqattn_jax.bridge", "torch", "seqattn-jax[flashinfer]")])
def test_missing_optional_dependency_names_the_extra(module, missing, extra):
    # `sys.modules[name] = None` makes `import name` fail exactly as if it were not installed.
    res = _run(f"sys.modules[{missing!r}] = None; import {module}")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError") and extra in last, res.stderr[-2000:]


def test_bridge_imports_by_its_plain_name_from_a_checkout():
    """No install: `import seqattn_jax.bridge` finds ../bridge through the seqattn_jax/bridge link
    (an installed mapping wins)."""
    pytest.importorskip("torch", reason="importing the bridge imports torch")
    res = _run("import seqattn_jax, seqattn_jax.bridge as b, seqattn_jax.bridge.ops as ops; "
               "from seqattn_jax import bridge; assert bridge is b and b.ops is ops; "
               "print(b.__file__)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()).resolve() == (ROOT / "bridge" / "__init__.py").resolve(), res.stdout


def test_importing_the_package_imports_no_optional_dependency():
    res = _run("import seqattn_jax, seqattn_jax.checked, seqattn_jax.validation; "
               "bad = [m for m in ('torch', 'flashinfer', 'flax') if m in sys.modules]; assert not bad, bad")
    assert res.returncode == 0, res.stderr[-2000:]


def test_version_is_written_once():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'version = { attr = "seqattn_jax.__version__" }' in text
    assert "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]
    import seqattn_jax

    assert seqattn_jax.__version__.count(".") == 2
