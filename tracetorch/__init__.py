"""traceTorch's ``Layer``/``Model`` core and its state-space layers (``tt.ssm``).

Compatible with models and checkpoints of traceTorch 0.19.2 for these parts;
the step math comes from the backend-agnostic ``ssm_core``.
"""

from . import core, ssm
from .core import Layer, Model, checkpoint, sequence_mode

__version__ = "0.1.0"

__all__ = ["Layer", "Model", "checkpoint", "core", "ssm", "sequence_mode", "__version__"]
