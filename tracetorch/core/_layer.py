"""``tt.Layer``: the base of every traceTorch layer (states, dims, compilation).

Its underscore helpers are traceTorch 0.19.2's subclassing API, which users
call from layers of their own (``_register_parameter``, ``_initialize_state``,
``_ensure_state(s)``, ``_zero_state``, ``_detach_state``, ``_to_working_dim``,
``_from_working_dim``): same names, arguments and behaviour.
"""

from __future__ import annotations

from typing import Callable, Literal, Union

import torch
from torch import nn

__all__ = ["Layer", "check_state_dict"]

# The attribute ``tt.sequence_mode`` sets on a layer for the length of its block: the time axis of the inputs.
_SEQUENCE_MODE = "_sequence_time_dim"


def _identity(x):
    return x


def check_state_dict(module: nn.Module, state_dict, strict: bool) -> None:
    """Raise before ``module.load_state_dict`` changes anything if ``state_dict`` does not fit.

    ``nn.Module.load_state_dict`` copies entry by entry and raises at the end,
    leaving a half-loaded module; checking keys, shapes and kinds first makes
    the load all or nothing. Floating entries of another floating dtype are
    cast, as torch casts them.
    """
    name = type(module).__name__
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"{name}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}; nothing loaded")
    for key in own.keys() & state_dict.keys():
        value, target = state_dict[key], own[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}.load_state_dict: {key} must be a tensor, got {type(value).__name__}; nothing loaded")
        if value.is_meta:
            raise ValueError(f"{name}.load_state_dict: {key} is a meta tensor, which holds no data; nothing loaded")
        if value.shape != target.shape:
            raise ValueError(
                f"{name}.load_state_dict: {key} must have shape {tuple(target.shape)}, got {tuple(value.shape)}; "
                "nothing loaded"
            )
        if target.is_floating_point() and not value.is_floating_point():
            raise TypeError(
                f"{name}.load_state_dict: {key} must be floating-point like {target.dtype}, got {value.dtype}; "
                "nothing loaded"
            )


class Layer(nn.Module):
    r"""The superclass of all traceTorch layers.

    Handles hidden-state management (lazily created, zeroed, detached), moving
    the operating dimension to the last axis and back, parameters registered
    with an activation function, and compilation for inference.

    Parameters
    ----------
    num_neurons : int
        The number of neurons (features) of the layer: the size of axis ``dim``
        of its input, and of its states.
    dim : int, default -1
        The input axis the layer operates along.

    Variables
    ---------
    num_neurons, dim : as given.
    Hidden states : registered with ``_initialize_state(name)``; ``None`` until
        the first forward call, which creates them as zeros in the input's
        dtype and device.

    Notes
    -----
    States are plain attributes, not buffers: they are not part of
    ``state_dict()``; ``tt.Model.save_states()`` / ``load_states()`` move them.
    Copies (``copy.deepcopy``, ``pickle``) carry the states detached from the
    autograd graph, and step: a copy made inside ``tt.sequence_mode`` is not in it.
    """

    def __init__(self, num_neurons: int, dim: int = -1):
        super().__init__()
        self._state_names = set()
        self.num_neurons = num_neurons
        self.dim = dim

    # ------------------------------------------------------------- parameters with an activation

    def _register_parameter(
        self,
        name: str,
        value: Union[float, torch.Tensor],
        rank: Literal[0, 1],
        learnable: bool,
        init_fn: Callable = _identity,
        inverse_fn: Callable = _identity,
        activation_fn: Callable = _identity,
    ) -> None:
        r"""Register ``raw_{name}`` and expose ``activation_fn(raw_{name})`` as ``self.{name}``.

        ``value`` is a scalar (``rank`` 0 or 1, filled to ``num_neurons``) or a
        0-d/1-d tensor of ``num_neurons`` elements; ``init_fn(value)`` is stored.
        The raw value is an ``nn.Parameter`` when ``learnable``, a buffer
        otherwise. ``TTcompile()`` bakes the activation in, ``TTdecompile()``
        recovers the raw value with ``inverse_fn``.
        """
        layer = type(self).__name__
        if isinstance(value, torch.Tensor):
            if value.ndim > 1:
                raise ValueError(f"{layer}: {name} must be a scalar or a vector, got a tensor of shape {tuple(value.shape)}")
            if value.ndim == 1 and value.numel() != self.num_neurons:
                raise ValueError(f"{layer}: {name} must have {self.num_neurons} elements, got {value.numel()}")
            raw = init_fn(value)
        elif rank == 0:
            raw = init_fn(torch.tensor(float(value)))
        elif rank == 1:
            raw = init_fn(torch.full([self.num_neurons], float(value)))
        else:
            raise ValueError(f"{layer}: rank of {name} must be 0 (scalar) or 1 (vector), got {rank!r}")

        if "_dynamic_params" not in self.__dict__:
            self._dynamic_params = {}
            self._inverse_functions = {}
        raw = raw.detach().clone()
        if learnable:
            setattr(self, f"raw_{name}", nn.Parameter(raw))
        else:
            self.register_buffer(f"raw_{name}", raw)
        self._dynamic_params[name] = activation_fn
        self._inverse_functions[name] = inverse_fn

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            dynamic = self.__dict__.get("_dynamic_params")
            if dynamic is not None and name in dynamic:
                return dynamic[name](super().__getattr__(f"raw_{name}"))
            raise

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        r"""``nn.Module.load_state_dict``, all or nothing: a missing (when strict), unexpected (when
        strict), mis-shaped or non-floating entry raises ``ValueError``/``TypeError`` before any
        parameter changes."""
        check_state_dict(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------- states

    def _initialize_state(self, state_name: str) -> None:
        r"""Declare a hidden state ``state_name`` (``None`` until first used)."""
        self._state_names.add(state_name)
        setattr(self, state_name, None)

    def _zero_state(self, state_name: str) -> None:
        r"""Reset hidden state ``state_name`` to ``None``."""
        setattr(self, state_name, None)

    def zero_states(self) -> None:
        r"""Reset every hidden state to ``None``; the next call recreates them as zeros."""
        for name in self._state_names:
            self._zero_state(name)

    def _detach_state(self, state_name: str) -> None:
        r"""Cut hidden state ``state_name`` from the autograd graph, if it exists."""
        state = getattr(self, state_name)
        if state is not None:
            setattr(self, state_name, state.detach())

    def detach_states(self) -> None:
        r"""Cut every hidden state from the autograd graph (no data is copied)."""
        for name in self._state_names:
            self._detach_state(name)

    def _ensure_state(self, state_name: str, reference_tensor: torch.Tensor) -> None:
        r"""Create ``state_name`` as zeros shaped like ``reference_tensor`` with ``num_neurons`` at ``dim``."""
        if getattr(self, state_name) is None:
            shape = list(reference_tensor.shape)
            shape[self.dim] = self.num_neurons
            setattr(self, state_name, reference_tensor.new_zeros(shape))

    def _ensure_states(self, reference_tensor: torch.Tensor) -> None:
        r"""Create every missing hidden state from ``reference_tensor``."""
        for name in self._state_names:
            self._ensure_state(name, reference_tensor)

    def _check_loaded_state(self, state_name: str, value: torch.Tensor, key: str) -> None:
        r"""Raise if ``value`` cannot be state ``state_name`` (called before anything is loaded).

        A loaded state replaces the held one: its batch shape may differ.
        """
        layer = type(self).__name__
        if value.is_meta:
            raise ValueError(f"{layer}: state {key} is a meta tensor, which holds no data")
        if not value.is_floating_point():
            raise TypeError(f"{layer}: state {key} must be a floating-point tensor, got dtype {value.dtype}")

    def _check_loaded_states(self, loaded: dict) -> None:
        r"""Raise if the states ``{state name: (key, tensor)}`` cannot be loaded together."""
        for name, (key, value) in loaded.items():
            self._check_loaded_state(name, value, key)

    def __getstate__(self):
        # Copies carry states detached: a non-leaf tensor cannot be deep-copied,
        # and a copy cannot share the original's autograd graph anyway.
        state = dict(self.__dict__)
        for name in state.get("_state_names", ()):
            if isinstance(state.get(name), torch.Tensor):
                state[name] = state[name].detach()
        # Sequence mode belongs to a ``tt.sequence_mode`` block, which restores the layers it
        # set when it ends; a copy made inside the block (a snapshot of the best model) steps.
        state.pop(_SEQUENCE_MODE, None)
        return state

    def __setstate__(self, state):
        state = dict(state)
        state.pop(_SEQUENCE_MODE, None)  # pickled inside a sequence_mode block by an earlier version
        super().__setstate__(state)

    # ------------------------------------------------------------- dims

    def _to_working_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        r"""Move axis ``dim`` of ``tensor`` to the last position (the features-last layout)."""
        return tensor.movedim(self.dim, -1)

    def _from_working_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        r"""Move the last axis of ``tensor`` back to ``dim``."""
        return tensor.movedim(-1, self.dim)

    # ------------------------------------------------------------- compilation

    def TTcompile(self) -> None:
        r"""Prepare the layer for inference: bake activations into plain buffers.

        Every parameter registered with ``_register_parameter`` becomes a buffer
        holding its activated value. Training a compiled layer is not supported;
        ``TTdecompile()`` restores it.
        """
        if self.__dict__.get("_compiled"):
            return
        metadata = {}
        for name in list(self.__dict__.get("_dynamic_params", {})):
            raw_name = f"raw_{name}"
            if raw_name not in self._parameters and raw_name not in self._buffers:
                continue
            raw = getattr(self, raw_name)
            value = getattr(self, name).detach().clone()
            is_parameter = isinstance(raw, nn.Parameter)
            metadata[name] = {"is_parameter": is_parameter, "learnable": is_parameter and raw.requires_grad}
            delattr(self, raw_name)
            self.register_buffer(name, value)
        self._compile_metadata = metadata
        self._compiled = True

    def TTdecompile(self) -> None:
        r"""Undo ``TTcompile()``: restore raw parameters so the layer trains again."""
        if not self.__dict__.get("_compiled"):
            return
        for name, meta in self._compile_metadata.items():
            value = self._buffers.pop(name, None)
            if value is None:  # removed since compiling: nothing to restore
                continue
            raw = self._inverse_functions[name](value).detach().clone()
            if meta["is_parameter"]:
                self.register_parameter(f"raw_{name}", nn.Parameter(raw, requires_grad=meta["learnable"]))
            else:
                self.register_buffer(f"raw_{name}", raw)
        del self._compiled, self._compile_metadata
