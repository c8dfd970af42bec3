"""What to benchmark on: torch devices, array backends, and layer pairs (ours + reference).

The discovery helpers give a reason string instead of raising when something
is not usable here, so the benchmarks can write the reason into their tables.
"""

from __future__ import annotations

import copy

import torch

import tracetorch as tt

__all__ = [
    "LAYERS", "TIME_INVARIANT", "torch_devices", "array_backends", "torch_sync",
    "build_pair", "fresh_copy", "reference_or_reason",
]

LAYERS = ("S4", "S5", "S6", "Mamba")
TIME_INVARIANT = ("S4", "S5")  # the layers with TTcompile()


def torch_devices() -> dict:
    """``{"cpu": None, "cuda": None or why it is skipped}``."""
    devices = {"cpu": None}
    if not torch.cuda.is_available():
        devices["cuda"] = "torch CUDA not available (torch.cuda.is_available() is False)"
    else:
        devices["cuda"] = None
    return devices


def array_backends(names=("numpy", "mlx", "cupy")) -> dict:
    """``{name: backend module or why it is skipped}`` for our array backends."""
    import backends

    found = {}
    reasons = backends.available()
    for name in names:
        if reasons.get(name) is not None:
            found[name] = reasons[name]
            continue
        try:
            found[name] = backends.load(name)
        except Exception as error:  # e.g. a native library failing on first use
            found[name] = f"{name} failed to load ({type(error).__name__}: {error})"
    return found


def torch_sync(device: str):
    """A function waiting for queued work on ``device`` (nothing to wait for on CPU)."""
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def reference_or_reason():
    """``(published package, None)`` or ``(None, why it is unavailable)``."""
    from . import _published

    try:
        return _published.load(install=True), None
    except Exception as error:
        return None, f"published tracetorch=={_published.VERSION} unavailable ({type(error).__name__}: {error})"


def build_pair(name: str, features: int, device: str, reference, seed: int = 0):
    """``(ours, upstream)``: our ``tt.ssm.<name>(features)`` and the reference's, same weights.

    The upstream layer (``None`` without a reference module) gets our
    ``state_dict`` so both compute on the same numbers (its own init draws
    ``log_dt`` from ``randn``, which could make its state decay differently).
    """
    torch.manual_seed(seed)
    ours = getattr(tt.ssm, name)(features).to(device)
    upstream = None
    if reference is not None:
        upstream = getattr(reference.ssm, name)(features)
        upstream.load_state_dict(copy.deepcopy(ours.state_dict()), strict=True)
        upstream = upstream.to(device)
    return ours, upstream


def fresh_copy(layer: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``layer`` with no hidden states (its own parameters)."""
    clone = copy.deepcopy(layer)
    clone.zero_states()
    return clone
