"""traceTorch's state-space layers: S4, S5, S6 and Mamba, one timestep per call."""

from ._s_series import S4, S5, S6, Mamba
from ._ssmlayer import Layer

__all__ = ["Layer", "S4", "S5", "S6", "Mamba"]
