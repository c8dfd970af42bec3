"""Bring any array to host memory as a NumPy array, without copying when possible."""

from __future__ import annotations

import numpy as np

__all__ = ["to_host"]


def to_host(value) -> np.ndarray:
    """A NumPy array with ``value``'s data and dtype.

    Accepts NumPy arrays, torch tensors (detached and moved to the CPU first),
    CPU arrays exposing ``__dlpack__``, and anything ``numpy.asarray`` takes.
    """
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu()
    if hasattr(value, "__dlpack__"):
        try:
            return np.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass  # e.g. a device array: fall back to the array protocol
    return np.asarray(value)
