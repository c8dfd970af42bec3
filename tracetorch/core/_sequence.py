"""Sequence mode: a whole model over ``[T, ...]`` in one call."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ._layer import Layer
from ._model import _walk

__all__ = ["sequence_mode"]


@contextmanager
def sequence_mode(module: nn.Module, time_dim: int = 0):
    r"""Within the block, every traceTorch layer in ``module`` takes whole sequences.

    Each layer's ``forward`` runs its ``scan(x, time_dim)``: the input carries
    a time axis at ``time_dim``, and the result equals stepping the layer over
    that axis. Layers that act on each timestep alone (``nn.Linear``,
    activations, normalisation over features) need nothing: the time axis is
    one more batch axis for them.

    ::

        with tt.sequence_mode(model):
            ys = model(xs)          # xs: [T, batch, features]

    Raises ``TypeError`` when a traceTorch layer of ``module`` has no sequence mode.
    """
    layers = [obj for _, obj in _walk(module) if isinstance(obj, Layer)]
    for layer in layers:
        if not callable(getattr(layer, "scan", None)):
            raise TypeError(f"sequence_mode: {type(layer).__name__} has no sequence mode (no scan method)")
    previous = [layer.__dict__.get("_sequence_time_dim") for layer in layers]
    for layer in layers:
        layer._sequence_time_dim = time_dim
    try:
        yield module
    finally:
        for layer, value in zip(layers, previous):
            layer._sequence_time_dim = value
