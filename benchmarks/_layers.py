"""What to benchmark on: torch devices, array backends, and our layers beside the published ones.

Discovery gives a reason string instead of raising when something is not
usable here, so the tables can say why it is missing.
"""

from __future__ import annotations

import torch

import tracetorch as tt

from . import _published

LAYERS = ("S4", "S5", "S6", "Mamba")
PUBLISHED = "0.19.2 step"  # stepping the published traceTorch: the baseline of every ratio


def torch_devices() -> dict:
    """``{"cpu": None, "cuda": None or why it is skipped}``."""
    return {"cpu": None, "cuda": None if torch.cuda.is_available() else "torch.cuda.is_available() is False"}


def array_backends(names=("numpy", "mlx", "cupy")) -> dict:
    """``{name: backend module or why it is skipped}`` for our array backends."""
    import backends

    found, reasons = {}, backends.available()
    for name in names:
        try:
            found[name] = reasons.get(name) or backends.load(name)
        except Exception as error:  # e.g. a native library failing on first use
            found[name] = f"{name} failed to load ({type(error).__name__}: {error})"
    return found


def torch_sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def published_or_reason():
    """``(published package, None)`` or ``(None, why it is unavailable)``; installs it on first use."""
    try:
        return _published.load(install=True), None
    except Exception as error:
        return None, f"tracetorch=={_published.VERSION} unavailable ({type(error).__name__}: {error})"


def make_layer(name: str, features: int, device: str, published: bool = False) -> torch.nn.Module:
    """Our ``tt.ssm.<name>(features)``, or the published one carrying our weights; the same weights every call.

    The published layer gets our ``state_dict`` (its own init draws ``log_dt``
    from ``randn``, which could make its states decay differently).
    """
    torch.manual_seed(0)
    ours = getattr(tt.ssm, name)(features)
    if not published:
        return ours.to(device)
    theirs = getattr(_published.load(install=False).ssm, name)(features)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.to(device)
