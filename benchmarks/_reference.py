"""The published traceTorch 0.19.2, installed apart and imported as ``tracetorch_ref``.

Our import package is also called ``tracetorch``, so the published one cannot
be installed next to it in site-packages. It is installed with ``pip
--target`` into ``benchmarks/.reference`` (ignored by git) and loaded from
there under the name ``tracetorch_ref``; its internal imports are all
relative, so they resolve inside that package.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

__all__ = ["VERSION", "REFERENCE_DIR", "ensure_installed", "load"]

VERSION = "0.19.2"
REFERENCE_DIR = Path(__file__).resolve().parent / ".reference"
MODULE_NAME = "tracetorch_ref"


def _init_file() -> Path:
    return REFERENCE_DIR / "tracetorch" / "__init__.py"


def ensure_installed() -> None:
    """Install ``tracetorch==0.19.2`` (without dependencies) into ``benchmarks/.reference`` if missing.

    Raises ``RuntimeError`` with pip's last output lines when it fails
    (e.g. no network access).
    """
    if _init_file().is_file():
        return
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
        "--target", str(REFERENCE_DIR), f"tracetorch=={VERSION}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not _init_file().is_file():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"could not install tracetorch=={VERSION} into {REFERENCE_DIR}: {tail}")


def load(install: bool = True):
    """The reference package as the module ``tracetorch_ref`` (installed first if ``install``).

    Raises ``RuntimeError`` (not installed and not installable) or whatever
    importing the package raises.
    """
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    if install:
        ensure_installed()
    elif not _init_file().is_file():
        raise RuntimeError(f"tracetorch=={VERSION} is not installed in {REFERENCE_DIR}")
    package_dir = _init_file().parent
    spec = importlib.util.spec_from_file_location(
        MODULE_NAME, _init_file(), submodule_search_locations=[str(package_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == MODULE_NAME or n.startswith(MODULE_NAME + ".")]:
            del sys.modules[name]
        raise
    return module
