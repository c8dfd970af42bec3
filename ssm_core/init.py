"""Initialisation formulas, fed with random numbers drawn by the caller.

Each backend draws with its own generator (``torch.manual_seed`` makes the
torch layers deterministic; the NumPy layers take a ``numpy.random.Generator``)
and passes a :class:`Draws`: ``uniform(shape)`` in ``[0, 1)`` and
``normal(shape)``, both already in the target namespace and dtype. The formulas
are the published recipes:

- ``A``: S4D-Real, ``A_n = -(n + 1)``, stored as ``A_log = log(n + 1)``;
- ``dt``: log-uniform in ``[1e-3, 1e-1]`` (S4D, S5, Mamba), stored as ``log_dt``
  or as the inverse softplus in ``dt_proj.bias``;
- linear maps: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, the ``nn.Linear`` and
  depthwise ``nn.Conv1d`` default that the Mamba reference keeps;
- ``dt_proj.weight``: ``U(-dt_rank**-0.5, dt_rank**-0.5)`` (Mamba);
- S4 ``B = 1`` and ``C ~ N(0, 1)`` (S4D); S5 ``B ~ N(0, 1/N)`` and
  ``C ~ N(0, 1/d_state)`` (variance-preserving, as S5's LeCun-normal ``B``);
- ``D = 1``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

__all__ = [
    "Draws",
    "DT_MIN",
    "DT_MAX",
    "s4d_real_A_log",
    "log_uniform_log_dt",
    "inverse_softplus",
    "uniform_fan_in",
]

DT_MIN = 1e-3
DT_MAX = 1e-1


class Draws(NamedTuple):
    """Random sources in one namespace and dtype: ``uniform(shape)``, ``normal(shape)``."""

    xp: object
    dtype: object
    uniform: Callable
    normal: Callable


def s4d_real_A_log(draws: Draws, shape: tuple):
    """``log(1..d_state)`` along the last axis of ``shape`` (S4D-Real: ``A_n = -(n+1)``)."""
    xp = draws.xp
    d_state = shape[-1]
    log_n = xp.log(xp.arange(1, d_state + 1, dtype=draws.dtype))  # [d_state]
    return xp.ones(shape, dtype=draws.dtype) * log_n  # [*shape]


def log_uniform_log_dt(draws: Draws, shape: tuple, dt_min: float = DT_MIN, dt_max: float = DT_MAX):
    """``log(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]``."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    return lo + draws.uniform(shape) * (hi - lo)


def inverse_softplus(y, xp):
    """``x`` with ``softplus(x) == y`` for ``y > 0``: ``y + log(-expm1(-y))``."""
    return y + xp.log(-xp.expm1(-y))


def uniform_fan_in(draws: Draws, shape: tuple, fan_in: int):
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: ``nn.Linear``'s default weight init."""
    bound = 1.0 / math.sqrt(fan_in)
    return (2.0 * draws.uniform(shape) - 1.0) * bound
