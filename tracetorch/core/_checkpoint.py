"""Activation checkpointing that knows the hidden states: ``tt.checkpoint``."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from ssm_core import fused

from ._layer import _SEQUENCE_MODE, Layer
from ._walk import _walk

__all__ = ["checkpoint"]

# ids of the layers whose states (and sequence mode) a tt.checkpoint recomputation has set back:
# the only layers that may run during a backward pass.
_RESTORED_LAYERS: ContextVar[frozenset] = ContextVar("tracetorch_restored_layers", default=frozenset())
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside a backward pass


def outside_backward() -> bool:
    """Whether no backward pass runs the caller (so no checkpointing recomputes it): the usual forward call."""
    return _graph_task_id is None or _graph_task_id() == -1


def check_not_recomputed_unrestored(layer: nn.Module) -> None:
    """Raise if ``layer`` runs in a backward pass without ``tt.checkpoint`` having set its states back.

    Running a layer during backward is what checkpointing's recomputation does
    (``torch.utils.checkpoint.checkpoint``, reentrant or not). The layer then
    holds the states of a later time than those its forward pass started
    from, so the recomputation would differ: torch's check of the recomputed
    tensors fails where their shapes differ, and where they do not the
    gradients are silently wrong.
    """
    if torch.compiler.is_compiling():  # a traced graph holds no Python check
        return
    if outside_backward() or id(layer) in _RESTORED_LAYERS.get():
        return
    raise RuntimeError(
        f"{type(layer).__name__}: called during a backward pass, as checkpointing recomputes, but its hidden "
        "states are those of a later time than the forward pass started from, and the recomputation would "
        "differ from it. Checkpoint with tt.checkpoint(function, *args) (function: a module holding every "
        "traceTorch layer it calls, or its bound method such as model.scan), which starts the recomputation "
        "from the forward pass's states and sequence mode"
    )


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

    A traceTorch layer that runs during a backward pass without this
    restoration (under plain ``torch.utils.checkpoint.checkpoint``, or a layer
    outside ``function``'s module) raises ``RuntimeError`` rather than
    recompute from the wrong states.
    """
    layers = [obj for _, obj in _walk(_module_of(function)) if isinstance(obj, Layer)]
    restored = frozenset(id(layer) for layer in layers)
    before: list = []

    def held():
        # The states, and the sequence mode: a backward pass after the end of a
        # tt.sequence_mode block recomputes in the mode the forward pass ran in.
        return [
            ({name: getattr(layer, name) for name in layer._state_names}, layer.__dict__.get(_SEQUENCE_MODE))
            for layer in layers
        ]

    def restore(states):
        for layer, (named, mode) in zip(layers, states):
            layer.__dict__.update(named)  # states are plain attributes
            if mode is None:
                layer.__dict__.pop(_SEQUENCE_MODE, None)
            else:
                layer.__dict__[_SEQUENCE_MODE] = mode

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
        token = _RESTORED_LAYERS.set(_RESTORED_LAYERS.get() | restored)
        try:
            with pinned_recompute:
                yield
        finally:
            _RESTORED_LAYERS.reset(token)
            restore(after)

    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=lambda: (forward_context(), recompute_context()), **kwargs
    )
