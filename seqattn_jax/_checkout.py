"""`import seqattn_jax.bridge` in a source checkout that is not installed.

An install maps the top-level `bridge/` directory to the subpackage `seqattn_jax.bridge` (setuptools
`package-dir`, see pyproject.toml). A bare checkout on `sys.path` (running from the repository root)
has no such mapping, so this finder supplies it: it answers for that one module name only, and it is
appended to `sys.meta_path`, so an installed `seqattn_jax.bridge` is always found first. It imports
nothing from the bridge (no torch) until the bridge itself is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_NAME = "seqattn_jax.bridge"
_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_BRIDGE = _PACKAGE_DIR.parent / "bridge"


class _CheckoutBridgeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_file_location(
            _NAME, _CHECKOUT_BRIDGE / "__init__.py", submodule_search_locations=[str(_CHECKOUT_BRIDGE)])


def install() -> None:
    """Add the finder when this package is a checkout: no `bridge/` inside the package directory,
    `../bridge/__init__.py` and `../pyproject.toml` next to it. Idempotent."""
    if (_PACKAGE_DIR / "bridge").is_dir() or not (_CHECKOUT_BRIDGE / "__init__.py").is_file() \
            or not (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return
    if not any(isinstance(f, _CheckoutBridgeFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutBridgeFinder())
