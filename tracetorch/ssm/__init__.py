"""traceTorch's state-space layers: S4, S5, S6 and Mamba, one timestep per call.

``_ssmlayer`` holds their base ``Layer`` (the binding to ``ssm_core``),
``_layers`` the four layers, ``_lm`` the Mamba language model ``MambaLM``.
"""

import sys

from . import _layers
from ._layers import S4, S5, S6, Mamba
from ._lm import MambaLM
from ._ssmlayer import Layer

# traceTorch 0.19.2 kept the four layers in ``tracetorch.ssm._s_series``:
# models it pickled (``torch.save(model)``) name their classes there.
sys.modules.setdefault(f"{__name__}._s_series", _layers)

__all__ = ["Layer", "S4", "S5", "S6", "Mamba", "MambaLM"]
