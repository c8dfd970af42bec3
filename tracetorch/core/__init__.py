"""traceTorch's core: the ``Layer`` and ``Model`` base classes."""

from ._layer import Layer
from ._model import Model

__all__ = ["Layer", "Model"]
