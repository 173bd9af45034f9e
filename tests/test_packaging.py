"""The package as a user gets it: the wheel holds the package (bridge/ as seqattn_jax.bridge, the
license, py.typed, one version) and nothing else; the sdist carries what its tests need, and pytest
collects them in an unpacked sdist. Builds with setuptools' own backend in a copy of the tree
(slow: SEQATTN_SLOW=1 or -m slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                ".pytest_cache", ".hypothesis", "results")


def _version() -> str:
    for line in (ROOT / "seqattn_jax" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise AssertionError("no __version__ in seqattn_jax/__init__.py")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    setuptools = pytest.importorskip("setuptools", reason="building the sdist/wheel needs setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build SPDX license metadata "
                    f"(pip install 'setuptools>=77', as .ci/run does)")
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    out, stderr = {}, ""
    for kind in ("sdist", "wheel"):  # one process each: setuptools keeps state between builds
        code = f"import sys; from setuptools import build_meta as b; print('BUILT', b.build_{kind}(sys.argv[1]))"
        res = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp / "dist")], cwd=src,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        out[kind], stderr = res.stdout.split("BUILT")[-1].strip(), stderr + res.stderr
    sdist, wheel = out["sdist"], out["wheel"]
    return tmp, tmp / "dist" / sdist, tmp / "dist" / wheel, stderr


@pytest.mark.slow
def test_build_has_no_deprecation_warning(built):
    *_, stderr = built
    assert "Deprecat" not in stderr and "deprecat" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_wheel_holds_the_package_license_and_types_only(built):
    _, _, wheel, _ = built
    version = _version()
    assert wheel.name == f"seqattn_jax-{version}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"seqattn_jax", f"seqattn_jax-{version}.dist-info"}, tops  # no bare `bridge`
    for f in ("seqattn_jax/__init__.py", "seqattn_jax/py.typed", "seqattn_jax/bridge/__init__.py",
              "seqattn_jax/bridge/ops.py", f"seqattn_jax-{version}.dist-info/licenses/LICENSE"):
        assert f in names, f
    meta = zipfile.ZipFile(wheel).read(f"seqattn_jax-{version}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in meta and f"Version: {version}" in meta
    assert "Classifier: Typing :: Typed" in meta
    # The test extra installs no torch (it would pull GB of CUDA wheels); flashinfer's extra does.
    test_reqs = [l for l in meta.splitlines() if l.startswith("Requires-Dist") and "extra == \"test\"" in l]
    assert test_reqs and not any("torch" in l for l in test_reqs), test_reqs


@pytest.mark.slow
def test_sdist_tests_collect_and_run(built):
    tmp, sdist, _, _ = built
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    root = tmp / "unpacked" / sdist.name[: -len(".tar.gz")]
    for f in ("LICENSE", "constraints.txt", ".ci/run", "tests/__init__.py", "tests/conftest.py",
              "tests/allocator_model.py", "tests/dense_oracle.py", "examples/decode.py",
              "examples/model.py", "bridge/__init__.py", "seqattn_jax/py.typed"):
        assert (root / f).is_file(), f
    assert not (root / "benchmarks").exists()
    env = {**os.environ, "SEQATTN_SLOW": "0"}
    res = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"],
                         cwd=root, capture_output=True, text=True, timeout=600, env=env)
    summary = res.stdout.strip().splitlines()[-1]  # "N tests collected in ..." (no "M errors")
    assert res.returncode == 0 and "error" not in summary, res.stdout[-3000:] + res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_state.py", "-k", "duplicate_ids or double_release"],
                         cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout[-3000:]
