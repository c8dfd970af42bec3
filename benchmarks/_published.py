"""The published traceTorch 0.19.2, installed apart and imported as ``tracetorch_published``.

Our import package is also called ``tracetorch``, so the published one cannot
sit beside it in site-packages: ``pip --target`` puts it in
``benchmarks/.published`` (ignored by git), and it is loaded from there under
another name. Its internal imports are all relative, so they resolve inside it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

VERSION = "0.19.2"
FOLDER = Path(__file__).resolve().parent / ".published"
MODULE_NAME = "tracetorch_published"
_INIT = FOLDER / "tracetorch" / "__init__.py"


def load(install: bool = True):
    """The published package as a module, installed first if ``install`` and missing.

    Raises ``RuntimeError`` when it is not installed and cannot be (e.g. no
    network), or whatever importing it raises.
    """
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    if not _INIT.is_file():
        if not install:
            raise RuntimeError(f"tracetorch=={VERSION} is not installed in {FOLDER}")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                   "--target", str(FOLDER), f"tracetorch=={VERSION}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not _INIT.is_file():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"could not install tracetorch=={VERSION} into {FOLDER}: {tail}")
    spec = importlib.util.spec_from_file_location(MODULE_NAME, _INIT, submodule_search_locations=[str(_INIT.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == MODULE_NAME or n.startswith(MODULE_NAME + ".")]:
            del sys.modules[name]
        raise
    return module
