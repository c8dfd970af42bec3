"""What a binding needs to know of a layer, in one record per layer.

A :class:`LayerSpec` ties a layer's constructor arguments (its config), its
parameters (named as in traceTorch 0.19.2's ``state_dict()``), its states
(named as traceTorch names them) and its pure functions together, so the torch
binding and the NumPy/CuPy/MLX layers are each written once for all layers.

A layer's parameter names and their order are written once, in
:func:`params_type`: the parameter tuple's fields, ``LayerSpec.param_keys``,
each config's ``param_shapes()`` and the torch layers' parameter lookup all
follow from it.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from typing import Callable, NamedTuple

__all__ = ["StateSlot", "LayerSpec", "params_type", "params_to_mapping"]


def params_type(name: str, module: str, keys: tuple, doc: str, optional: int = 0) -> type:
    """The tuple type of a layer's parameters: one field per ``state_dict()`` key, in that order.

    A field is its key with ``.`` written ``_`` (``x_proj.weight`` is field
    ``x_proj_weight``); the type keeps the keys as ``state_dict_keys``. The
    last ``optional`` fields default to None: parameters some configs lack.
    """
    fields = [key.replace(".", "_") for key in keys]
    cls = namedtuple(name, fields, defaults=(None,) * optional, module=module)
    cls.__doc__ = doc
    cls.state_dict_keys = tuple(keys)
    return cls


def params_to_mapping(params) -> dict:
    """``{state_dict key: value}`` of a parameter tuple's entries that are not None."""
    return {key: value for key, value in zip(params.state_dict_keys, params) if value is not None}


class StateSlot(NamedTuple):
    """One hidden state: ``name``, its size on the feature axis, and its trailing axis.

    In the traceTorch layout the state has the input's shape with the feature
    axis set to ``size`` and, when ``trailing`` is not None, one more last axis
    of that size. In the features-last layout of ``ssm_core`` the ``size`` axis is
    last, or second to last when there is a trailing axis.
    """

    name: str
    size: int
    trailing: int | None

    def zeros(self, batch_shape: tuple, xp, dtype=None, device=None):
        """This state as zeros in the features-last layout, for inputs of batch shape ``batch_shape``."""
        tail = (self.size,) if self.trailing is None else (self.size, self.trailing)
        kwargs = {} if device is None else {"device": device}
        return xp.zeros(tuple(batch_shape) + tail, dtype=dtype, **kwargs)


@dataclass(frozen=True)
class LayerSpec:
    """A layer's config type, parameter and state containers, and pure functions.

    ``param_keys`` are the traceTorch ``state_dict()`` keys, aligned with the
    fields of ``params`` (see :func:`params_type`). ``step(x, state, params, xp=None, prepared=None)``
    returns ``(y, new_state)``; ``scan(xs, state, params, xp=None, method=...,
    prepared=None)`` does the same for a sequence ``[T, ..., N]`` and returns
    ``(ys, final_state)``; ``init(config, draws)`` returns fresh parameters.

    ``prepare(params, xp)`` computes what a step needs of the parameters
    alone (S4/S5: the discretized dynamics; S6/Mamba: ``A`` and ``1/A``);
    ``step`` and ``scan`` take it as ``prepared=`` when a binding keeps it
    while the parameters do not change, and compute it otherwise.

    ``time_invariant``: the dynamics depend on the parameters only (S4, S5),
    so ``prepare`` gives the whole discretized system, of type ``dynamics``,
    and ``scan`` has a convolution form (its ``method`` names differ).
    """

    name: str
    config: type
    params: type
    state: type
    init: Callable
    step: Callable
    scan: Callable
    prepare: Callable
    time_invariant: bool
    dynamics: type | None = None

    @property
    def param_keys(self) -> tuple:
        return self.params.state_dict_keys

    def params_from_mapping(self, mapping) -> NamedTuple:
        """Parameters from a ``{state_dict key: array}`` mapping (absent keys are None)."""
        return self.params(*(mapping.get(key) for key in self.param_keys))

    def params_to_mapping(self, params) -> dict:
        """``{state_dict key: array}`` of the parameters that are present."""
        return params_to_mapping(params)

    def zero_state(self, config, batch_shape: tuple, xp, dtype=None, device=None):
        """Zero states in the features-last layout for inputs of batch shape ``batch_shape``."""
        return self.state(**{slot.name: slot.zeros(batch_shape, xp, dtype, device) for slot in config.state_slots()})
