"""``tt.Model``: state management across a whole module tree."""

from __future__ import annotations

import re
from typing import Dict, Iterator, Tuple

import torch
from torch import nn

from ._layer import Layer, check_state_dict
from ._sequence import sequence_mode
from ._walk import _join, _walk

__all__ = ["Model"]

# traceTorch 0.19.2 also names a state through the ``_modules`` dict
# ("net._modules[1].state") and with a leading dot for plain attributes
# (".extra[0].state"); both are read as the plain name ("net.1.state").
_MODULES_ALIAS = re.compile(r"(^|\.)_modules\[([^\]]*)\]")


def _canonical_key(key: str) -> str:
    return _MODULES_ALIAS.sub(r"\1\2", key.lstrip("."))


def _same_tensor(a, b) -> bool:
    if a is b:
        return True
    return (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))
    )


class Model(nn.Module):
    r"""The superclass of traceTorch models.

    Zeroes, detaches, saves and loads the hidden states of every traceTorch
    layer in the model tree, and compiles or decompiles them, whether a layer
    is a registered submodule (``nn.Sequential``, ``nn.ModuleList``, ...) or
    kept in a plain Python list, tuple, set or dict on a module.

    Notes
    -----
    State keys are module paths with the state name: ``"net.1.state"``, and
    ``"layers[0].ssm_state"`` for a layer in a plain list ``self.layers``.
    ``load_states`` also reads the key forms traceTorch 0.19.2 wrote
    (``"net._modules[1].state"``, ``".layers[0].ssm_state"``).
    """

    def __init__(self):
        super().__init__()

    def _layers(self) -> Iterator[Tuple[str, Layer]]:
        for path, obj in _walk(self):
            if isinstance(obj, Layer):
                yield path, obj

    def _call_recursive(self, method_name: str) -> None:
        r"""Call ``method_name()`` on every traceTorch layer of the tree.

        Nested ``tt.Model``\ s that override the method, and other objects
        with a method of that name, have it called too.
        """
        for _, obj in _walk(self):
            if obj is self:
                continue
            if isinstance(obj, Layer):
                getattr(obj, method_name)()
            elif isinstance(obj, Model):
                override = getattr(type(obj), method_name, None)
                if override is not None and override is not getattr(Model, method_name):
                    override(obj)
            elif isinstance(obj, nn.Module) and callable(getattr(obj, method_name, None)):
                getattr(obj, method_name)()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        r"""``nn.Module.load_state_dict``, all or nothing (see ``tt.Layer.load_state_dict``)."""
        check_state_dict(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def scan(self, xs, time_dim: int = 0):
        r"""Run the model over a whole sequence ``xs`` in one call (see ``tt.sequence_mode``).

        Equal to calling the model once per timestep along ``time_dim`` and
        stacking the outputs there; the layers end in the states after the last step.
        """
        with sequence_mode(self, time_dim):
            return self(xs)

    def zero_states(self) -> None:
        r"""Reset every hidden state in the tree to ``None`` (recreated as zeros on the next call)."""
        self._call_recursive("zero_states")

    def detach_states(self) -> None:
        r"""Cut every hidden state in the tree from the autograd graph (truncated BPTT, online learning)."""
        self._call_recursive("detach_states")

    def TTcompile(self) -> None:
        r"""Compile every layer of the tree for inference."""
        self._call_recursive("TTcompile")

    def TTdecompile(self) -> None:
        r"""Decompile every layer of the tree so that it trains again."""
        self._call_recursive("TTdecompile")

    def save_states(self) -> Dict[str, torch.Tensor]:
        r"""Copies of every hidden state that exists, keyed by ``"<path>.<state name>"``.

        The tensors are detached clones: later steps do not change them. The
        dict can go through ``torch.save``.
        """
        states = {}
        for path, layer in self._layers():
            for name in sorted(layer._state_names):
                value = getattr(layer, name)
                if value is not None:
                    states[_join(path, name)] = value.detach().clone()
        return states

    def load_states(self, states: Dict[str, torch.Tensor], strict: bool = True, device=None) -> None:
        r"""Load hidden states saved by ``save_states()``; all or nothing.

        Parameters
        ----------
        states : dict
            ``{key: tensor}`` from ``save_states()`` (of this package or of
            traceTorch 0.19.2), possibly through ``torch.save``/``torch.load``.
        strict : bool, default True
            Raise if a state of the model has no entry or an entry names no
            state of the model.
        device : torch.device or str, optional
            Where the states go; by default the device of each layer's
            parameters (or of the loaded tensor for a layer without any).

        Loaded states replace the held ones, whatever batch shape those had.
        They are copies (writing into ``states`` later leaves the model alone)
        that keep the autograd graph: a learned initial state, such as an
        ``nn.Parameter`` given here, gets gradients through the steps that
        follow (``detach_states()`` cuts them off). ``save_states()``, by
        contrast, returns detached copies.

        Raises ``ValueError`` on a missing or unexpected key (when strict), a
        state given twice (under both key forms), an entry whose shape does
        not fit its layer or whose floating dtype is not the layer's state
        dtype, or states of one layer that disagree on their batch shape;
        ``TypeError`` on an entry that is not a floating-point tensor. Nothing
        is loaded then.
        """
        targets = {}
        for path, layer in self._layers():
            for name in layer._state_names:
                targets[_join(path, name)] = (layer, name)

        incoming = {}
        for key, value in states.items():
            canonical = _canonical_key(key)
            if canonical in incoming:
                # 0.19.2's save_states writes each state under every form of its key, all equal;
                # two different values for one state would leave a silent pick.
                if not _same_tensor(incoming[canonical][1], value):
                    raise ValueError(
                        f"{type(self).__name__}.load_states: {incoming[canonical][0]!r} and {key!r} name the "
                        "same state with different values; give it once"
                    )
                continue
            incoming[canonical] = (key, value)
        missing = sorted(set(targets) - set(incoming))
        unexpected = sorted(incoming[k][0] for k in set(incoming) - set(targets))
        if strict and (missing or unexpected):
            raise ValueError(
                f"{type(self).__name__}.load_states: missing states {missing}, unexpected states {unexpected}"
            )

        per_layer = {}  # id(layer) -> (layer, {state name: (key, tensor)})
        for key, (layer, name) in targets.items():
            if key not in incoming:
                continue
            original_key, value = incoming[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{type(self).__name__}.load_states: {original_key} must be a tensor, got {type(value).__name__}")
            per_layer.setdefault(id(layer), (layer, {}))[1][name] = (original_key, value)
        plan = []
        for layer, loaded in per_layer.values():
            layer._check_loaded_states(loaded)  # each state, and the states of one layer against each other
            reference = next(iter(layer.parameters()), None)
            for name, (_, value) in loaded.items():
                where = device if device is not None else (value.device if reference is None else reference.device)
                # A copy that keeps the autograd graph: a learned initial state (a parameter
                # loaded here) gets its gradient, as in traceTorch 0.19.2.
                plan.append((layer, name, value.to(where, copy=True)))
        for layer, name, value in plan:
            setattr(layer, name, value)
