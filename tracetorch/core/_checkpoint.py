"""Activation checkpointing that knows the hidden states: ``tt.checkpoint``."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ssm_core import fused

from ._layer import Layer
from ._model import _walk

__all__ = ["checkpoint"]


def _module_of(function):
    owner = getattr(function, "__self__", function)  # a bound method's module, or the module itself
    if not isinstance(owner, nn.Module):
        raise TypeError(
            "tt.checkpoint: expected a module or a bound method of one (layer.scan, model, model.scan), "
            f"got {type(function).__name__}"
        )
    return owner


def checkpoint(function, *args, **kwargs):
    r"""``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)`` for stateful layers.

    A traceTorch layer reads the states it holds and leaves new ones: when
    plain checkpointing recomputes ``function`` during the backward pass, the
    layers hold the states of a later time and the recomputation differs from
    the forward pass. Here the recomputation starts from the states the
    forward pass started from, and the layers keep their current states
    afterwards, so gradients equal those of the unchecked run::

        for chunk in xs.split(256):                  # [T, batch, features] in chunks of time
            ys.append(tt.checkpoint(model.scan, chunk))
        torch.cat(ys).sum().backward()

    ``function`` is a module (a layer, a ``tt.Model``, any ``nn.Module``
    holding traceTorch layers) or a bound method of one; every traceTorch
    layer in that module's tree is covered. ``kwargs`` go to
    ``torch.utils.checkpoint.checkpoint`` (``preserve_rng_state``, ...).
    """
    layers = [obj for _, obj in _walk(_module_of(function)) if isinstance(obj, Layer)]
    before: list = []

    def held():
        return [{name: getattr(layer, name) for name in layer._state_names} for layer in layers]

    def restore(states):
        for layer, named in zip(layers, states):
            layer.__dict__.update(named)  # states are plain attributes

    # The recomputation also runs each scan block compiled or eager as the forward pass did.
    pinned_forward, pinned_recompute = fused.checkpoint_contexts()

    @contextmanager
    def forward_context():
        before[:] = held()
        with pinned_forward:
            yield

    @contextmanager
    def recompute_context():
        after = held()
        restore(before)
        try:
            with pinned_recompute:
                yield
        finally:
            restore(after)

    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=lambda: (forward_context(), recompute_context()), **kwargs
    )
