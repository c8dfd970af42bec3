"""What differs between the torch releases this package supports, in one place.

The floor is ``MIN_TORCH`` (``pyproject.toml`` says the same; CI runs the
parity, step and scan tests on it). Features of newer releases are looked up
here once, and where an older torch lacks one the layers still run: eagerly,
or with a clear error naming the release that is needed.
"""

from __future__ import annotations

import re

import torch

__all__ = ["TORCH_VERSION", "MIN_TORCH", "is_exporting"]


def _release(version: str) -> tuple:
    """``(major, minor)`` of a version string: ``"2.4.1+cu121"`` -> ``(2, 4)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


TORCH_VERSION = _release(torch.__version__)
MIN_TORCH = (2, 4)

# torch.compiler.is_exporting is new in torch 2.7.
_is_exporting = getattr(torch.compiler, "is_exporting", None)


def is_exporting() -> bool:
    """Whether ``torch.export`` is tracing the calling code.

    Before torch 2.7, ``torch.export`` alone sets ``torch.compiler``'s compiling
    flag (``torch.compile`` leaves it False), around the tracing that runs this
    code as Python: the non-strict mode. Strict mode (the default before
    torch 2.8) traces with the compiler, which reads the flag as False there;
    it stops earlier on those releases in any case (an unsupported attribute).
    """
    if _is_exporting is not None:
        return _is_exporting()
    return getattr(torch.compiler, "_is_compiling_flag", False)


def is_autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available``, which torch.compile before 2.7 cannot trace (a graph break).

    CPU and CUDA always have autocast, so for them the answer needs no call.
    """
    return device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)
