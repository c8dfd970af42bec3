"""Array-library backends of the state-space layers: NumPy, CuPy, MLX (and array-api-strict for tests).

Each backend module (``backends.numpy``, ``backends.cupy``, ``backends.mlx``,
``backends.array_api_strict``) exposes ``S4``, ``S5``, ``S6``, ``Mamba``,
``asarray`` and ``backend``. Importing ``backends`` imports no array library:
a backend's library is imported when its module is, or when ``available()``
is asked.
"""

from __future__ import annotations

import importlib

__all__ = ["NAMES", "available", "load"]

NAMES = ("numpy", "cupy", "mlx", "array_api_strict")

_INSTALL = {
    "numpy": "pip install numpy",
    "cupy": "pip install cupy-cuda12x (an NVIDIA GPU and driver are needed)",
    "mlx": "pip install mlx (macOS) or 'mlx[cpu]' (Linux)",
    "array_api_strict": "pip install array-api-strict",
}


def _unusable_reason(name: str):
    try:
        if name == "mlx":
            importlib.import_module("mlx.core")
        else:
            importlib.import_module(name)
    except Exception as error:  # ImportError, or a library failing to load its native part
        return f"{name} cannot be imported ({type(error).__name__}: {error}); {_INSTALL[name]}"
    if name == "cupy":
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:
            return f"cupy is installed but finds no CUDA device ({type(error).__name__}: {error})"
        if count == 0:
            return "cupy is installed but finds no CUDA device"
    return None


def available() -> dict:
    """``{name: None}`` for each usable backend and ``{name: reason}`` for each unusable one.

    Imports each library to find out (and, for CuPy, asks for a GPU).
    """
    return {name: _unusable_reason(name) for name in NAMES}


def load(name: str):
    """The backend module ``name`` (``"numpy"``, ``"cupy"``, ``"mlx"``, ``"array_api_strict"``)."""
    if name not in NAMES:
        raise ValueError(f"backends.load: unknown backend {name!r}; expected one of {NAMES}")
    reason = _unusable_reason(name)
    if reason is not None:
        raise ImportError(f"backends.load: {reason}")
    return importlib.import_module(f"backends.{name}")
