"""traceTorch's core: the ``Layer`` and ``Model`` base classes."""

from ._checkpoint import checkpoint
from ._layer import Layer
from ._model import Model
from ._sequence import sequence_mode

__all__ = ["Layer", "Model", "checkpoint", "sequence_mode"]
