"""Shared helpers for the tracetorch / ssm_core test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not necessarily installed
    sys.path.insert(0, str(ROOT))

import tracetorch as tt  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from numpy_oracle import FIXTURE_DIR  # noqa: E402,F401


def rel_err(a, b) -> float:
    """Normwise relative error ``max|a - b| / max|b|`` (``b`` is the reference)."""
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    assert a.shape == b.shape, f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


# Small configurations of every layer used throughout the suite: (id, class name, kwargs).
N = 4
D_STATE = 3
LAYER_CASES = [
    ("S4", "S4", dict(num_neurons=N, d_state=D_STATE)),
    ("S5", "S5", dict(num_neurons=N, d_state=D_STATE)),
    ("S6", "S6", dict(num_neurons=N, d_state=D_STATE)),
    ("S6_rank2", "S6", dict(num_neurons=N, d_state=D_STATE, dt_rank=2)),
    ("Mamba", "Mamba", dict(num_neurons=N, d_state=D_STATE)),
    ("Mamba_k2", "Mamba", dict(num_neurons=N, d_state=D_STATE, conv_kernel=2)),
    ("Mamba_noconv", "Mamba", dict(num_neurons=N, d_state=D_STATE, conv_kernel=1)),
]
LAYER_IDS = [case[0] for case in LAYER_CASES]

# The hidden states each layer keeps (by constructor kwargs).
def state_names(cls_name: str, kwargs: dict) -> list:
    if cls_name in ("S4", "S6"):
        return ["state"]
    if cls_name == "S5":
        return ["global_state"]
    if cls_name == "Mamba":
        return ["ssm_state", "conv_buffer"] if kwargs.get("conv_kernel", 4) > 1 else ["ssm_state"]
    raise AssertionError(cls_name)


def perturb_(layer: torch.nn.Module, scale: float = 0.1, seed: int = 1234) -> torch.nn.Module:
    """Shift every parameter by ``scale * randn`` (so default values like B=1, D=1 hide nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return layer


def make_layer(cls_name: str, kwargs: dict, *, dim=None, dtype=torch.float64, seed: int = 0, perturb=True):
    """A layer built under ``torch.manual_seed(seed)``, cast to ``dtype``, parameters perturbed."""
    kw = dict(kwargs)
    if dim is not None:
        kw["dim"] = dim
    torch.manual_seed(seed)
    layer = getattr(tt.ssm, cls_name)(**kw).to(dtype)
    if perturb:
        perturb_(layer, seed=seed + 1000)
    return layer


def copy_params(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    dst.load_state_dict(src.state_dict(), strict=True)


def held_states(layer) -> dict:
    """``{name: tensor or None}`` of a layer's hidden states (references, not copies)."""
    return {name: getattr(layer, name) for name in sorted(layer._state_names)}


def snapshot(layer) -> dict:
    """Detached clones of a layer's hidden states (None stays None)."""
    return {k: (None if v is None else v.detach().clone()) for k, v in held_states(layer).items()}


def assert_states_equal(layer, snap: dict) -> None:
    now = held_states(layer)
    assert set(now) == set(snap)
    for name, before in snap.items():
        after = now[name]
        if before is None:
            assert after is None, f"{name} was None, is now a tensor"
        else:
            assert after is not None, f"{name} was a tensor, is now None"
            assert after.shape == before.shape and after.dtype == before.dtype, name
            assert torch.equal(after, before), f"{name} changed"


def run_steps(layer, xs):
    """Step ``layer`` over ``xs[t]`` and stack the outputs."""
    return torch.stack([layer(x) for x in xs])
