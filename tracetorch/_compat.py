"""The torch features that differ between the releases this package supports, looked up once.

The oldest release is ``MIN_TORCH``: ``pyproject.toml`` says the same, and CI
runs the parity, step and scan tests on it (``.ci/oldest``). On older releases
importing ``tracetorch`` fails with a message that says so. What newer
releases add is looked up here, with what stands in for it before them.
Measured on the oldest release: compiled scans and ``TTcompile()`` give the
eager numbers; ``torch.export`` captures the stateless form with
``strict=False`` (its default from torch 2.8 on; the strict mode of earlier
releases cannot trace the layers' class attributes).
"""

from __future__ import annotations

import re

import torch

__all__ = ["TORCH_VERSION", "MIN_TORCH", "is_exporting", "is_autocast_available", "autocast_dtype", "autocast_dtype_of", "inductor_options"]


def _release(version: str) -> tuple:
    """``(major, minor)`` of a version string: ``"2.4.1+cu121"`` -> ``(2, 4)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


TORCH_VERSION = _release(torch.__version__)
# The oldest release that runs the layers: 2.3 lacks the per-device autocast
# queries (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype).
MIN_TORCH = (2, 4)
if TORCH_VERSION < MIN_TORCH:
    raise ImportError(
        f"tracetorch needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found torch {torch.__version__}; "
        "upgrade it (pip install -U torch), or use the NumPy, CuPy or MLX backends, which do not need torch"
    )

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


def autocast_dtype(device_type: str):
    """The dtype ``torch.autocast`` lowers to on ``device_type``, or None when autocast is off there."""
    if not is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_dtype_of(x: torch.Tensor):
    """:func:`autocast_dtype` on ``x``'s device, for a loop's every step: where autocast is off on every
    device, one call answers, without asking ``x`` its device type (``x.device.type`` took longer than
    the rest of a step's key together).

    Not for code that ``torch.compile`` traces: dynamo does not know the private call.
    """
    if _any_autocast_enabled is not None and not _any_autocast_enabled():
        return None
    return autocast_dtype(x.device.type)


def inductor_options() -> dict:
    """``torch.compile`` options that key inductor's on-disk cache by the vector instructions it compiles for.

    Inductor picks its vector ISA from the CPU and ``ATEN_CPU_CAPABILITY``,
    but its cache does not tell them apart: a kernel built for AVX-512 and
    loaded under ``ATEN_CPU_CAPABILITY=avx2`` (or on another machine sharing
    the cache directory) crashed the process or gave NaN (torch 2.13). Naming
    the vector width it picks anyway (0: none) changes no kernel and makes it
    part of the cache key. Empty where that choice cannot be asked for.
    """
    try:
        from torch._inductor import cpu_vec_isa

        isa = cpu_vec_isa.pick_vec_isa()
        return {"cpp.simdlen": isa.bit_width() if isa else 0}
    except Exception:  # a private module: another release may lay it out differently
        return {}
