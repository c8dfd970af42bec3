"""The functional API: each layer's step and scan, checking their arguments first.

``ssm_core.s6_step(x, state, params)`` and the others are the functions of
:mod:`ssm_core.lti` and :mod:`ssm_core.selective` behind a check of shapes
and dtypes (no array work): the input is floating, input, states and
parameters share one dtype, each state's batch shape is the input's, the
feature size is the parameters', and a sequence has a time axis. A mistake
raises ``TypeError``/``ValueError`` naming the function instead of
broadcasting or promoting silently. The stateful bindings check their inputs
themselves and call the unchecked functions of the ``LayerSpec`` records.
"""

from __future__ import annotations

import functools

from ._array import namespace
from .lti import S4, S4Config, S5, S5Config
from .selective import S6, Mamba, MambaConfig, S6Config

__all__ = ["s4_step", "s4_scan", "s5_step", "s5_scan", "s6_step", "s6_scan", "mamba_step", "mamba_scan"]


# The config each layer's parameters imply: it names the feature size and the state shapes.
_CONFIG_OF = {
    "s4": lambda p: S4Config(p.A_log.shape[0], p.A_log.shape[1]),
    "s5": lambda p: S5Config(p.B.shape[0], p.A_log.shape[0]),
    "s6": lambda p: S6Config(p.A_log.shape[0], p.A_log.shape[1], dt_rank=p.dt_proj_weight.shape[1]),
    "mamba": lambda p: MambaConfig(
        p.A_log.shape[0], p.A_log.shape[1], dt_rank=p.dt_proj_weight.shape[1],
        conv_kernel=1 if p.conv_weights is None else p.conv_weights.shape[1],
    ),
}


def check_arguments(function: str, layer: str, spec, x, state, params, xp, sequence: bool) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``function`` unless its arguments fit together."""
    if not isinstance(state, spec.state):
        raise TypeError(f"{function}: expected state of type {spec.state.__name__}, got {type(state).__name__}")
    if not isinstance(params, spec.params):
        raise TypeError(f"{function}: expected params of type {spec.params.__name__}, got {type(params).__name__}")
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{function}: expected a real floating-point input, got dtype {x.dtype}")
    config = _CONFIG_OF[layer](params)
    N = config.num_neurons
    if x.ndim < (2 if sequence else 1):
        what = f"a sequence [T, ..., {N}]" if sequence else f"an input [..., {N}]"
        raise ValueError(f"{function}: expected {what}, got shape {tuple(x.shape)}")
    if x.shape[-1] != N:
        raise ValueError(f"{function}: expected {N} features on the last axis, got {x.shape[-1]} (input shape {tuple(x.shape)})")
    for name, value in zip(spec.params._fields, params):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(f"{function}: the input has dtype {x.dtype}, parameter {name} {value.dtype}; they must agree")
    batch = tuple(x.shape[1:-1] if sequence else x.shape[:-1])
    for slot in config.state_slots():
        value = getattr(state, slot.name)
        tail = (slot.size,) if slot.trailing is None else (slot.size, slot.trailing)
        if value is None:
            raise TypeError(f"{function}: state {slot.name} is missing (None); expected shape {batch + tail}")
        if value.dtype != x.dtype:
            raise TypeError(f"{function}: the input has dtype {x.dtype}, state {slot.name} {value.dtype}; they must agree")
        if tuple(value.shape) != batch + tail:
            raise ValueError(
                f"{function}: the input has batch shape {batch}, so state {slot.name} must have shape "
                f"{batch + tail}; got {tuple(value.shape)} (batch shape {tuple(value.shape[: value.ndim - len(tail)])})"
            )


def _checked(unchecked, layer: str, spec, sequence: bool):
    function = unchecked.__name__

    @functools.wraps(unchecked)
    def checked(x, state, params, xp=None, **options):
        xp = namespace(x, xp=xp)
        check_arguments(function, layer, spec, x, state, params, xp, sequence)
        return unchecked(x, state, params, xp, **options)

    return checked


s4_step = _checked(S4.step, "s4", S4, sequence=False)
s4_scan = _checked(S4.scan, "s4", S4, sequence=True)
s5_step = _checked(S5.step, "s5", S5, sequence=False)
s5_scan = _checked(S5.scan, "s5", S5, sequence=True)
s6_step = _checked(S6.step, "s6", S6, sequence=False)
s6_scan = _checked(S6.scan, "s6", S6, sequence=True)
mamba_step = _checked(Mamba.step, "mamba", Mamba, sequence=False)
mamba_scan = _checked(Mamba.scan, "mamba", Mamba, sequence=True)
