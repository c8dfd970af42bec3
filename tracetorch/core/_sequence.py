"""Sequence mode: a whole model over ``[T, ...]`` in one call."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ._layer import _SEQUENCE_MODE, Layer
from ._walk import _walk

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

    The mode belongs to the block: copies of the model made inside it
    (``copy.deepcopy``, ``pickle``, ``torch.save``) step, and ``tt.checkpoint``
    recomputes in the mode of the forward pass even when the backward pass
    comes after the block.

    Raises ``TypeError`` when a traceTorch layer of ``module`` has no sequence mode.
    """
    layers = [obj for _, obj in _walk(module) if isinstance(obj, Layer)]
    for layer in layers:
        if not callable(getattr(layer, "scan", None)):
            raise TypeError(f"sequence_mode: {type(layer).__name__} has no sequence mode (no scan method)")
    # A plain attribute, set and restored here only: copies made inside the block do not carry it.
    previous = [layer.__dict__.get(_SEQUENCE_MODE) for layer in layers]
    for layer in layers:
        layer.__dict__[_SEQUENCE_MODE] = time_dim
    try:
        yield module
    finally:
        for layer, value in zip(layers, previous):
            if value is None:
                layer.__dict__.pop(_SEQUENCE_MODE, None)
            else:
                layer.__dict__[_SEQUENCE_MODE] = value
