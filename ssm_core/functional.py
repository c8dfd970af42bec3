"""The functional API: each layer's step and scan, checking their arguments first.

``ssm_core.s6_step(x, state, params)`` and the others are the functions of
:mod:`ssm_core.lti` and :mod:`ssm_core.selective` behind a check of shapes
and dtypes (no array work): input, states and parameters are arrays of one
library and share one dtype, the input is floating, each parameter has
exactly the shape the layer gives it (its sizes read from ``A_log`` and the
other parameters that fix them, by the config's ``from_params``), each
state's batch shape is the input's, the feature size is the parameters', and
a sequence has a time axis. A mistake
raises ``TypeError``/``ValueError`` naming the function instead of
broadcasting or promoting silently. The stateful bindings check their inputs
themselves and call the unchecked functions of the ``LayerSpec`` records.

A layer's options go in as ``config=`` (an ``S6Config``, ``MambaConfig`` ...):
the parameters must then have exactly the shapes that config gives them, and
its ``discretization`` and ``residual`` apply. Without one the config is the
one the parameters imply (``from_params``: Mamba's ``expand`` from the widths,
its biases from their presence) with the default options, those of
traceTorch 0.19.2 (a zero-order hold, the residual inside the block)::

    config = ssm_core.MambaConfig(64, expand=2, discretization="euler", residual=False, bias=True)
    y, state = ssm_core.mamba_step(x, state, params, config=config)
"""

from __future__ import annotations

import functools

from array_api_compat import array_namespace

from ._array import namespace
from .lti import S4, S5
from .selective import S6, Mamba, MambaConfig

__all__ = ["s4_step", "s4_scan", "s5_step", "s5_scan", "s6_step", "s6_scan", "mamba_step", "mamba_scan"]


def _library(value) -> str:
    """The top-level module of ``value``'s type (``torch``, ``numpy``, ``mlx``, ...): its array library."""
    return type(value).__module__.partition(".")[0]


def _type_name(value) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _same_library(x, value) -> bool:
    if _library(value) == _library(x):  # the quick answer, for the usual case
        return True
    try:  # a subclass defined elsewhere (its module is its own) still belongs to its library
        return array_namespace(x) is array_namespace(value)
    except TypeError:  # not an array (a Python float ...)
        return False


def _check_library(function: str, x, what: str, value) -> None:
    if not _same_library(x, value):
        raise TypeError(
            f"{function}: the input is a {_library(x)} array ({_type_name(x)}), {what} a {_library(value)} "
            f"{'array' if hasattr(value, 'shape') else 'object'} ({_type_name(value)}); pass arrays of one library"
        )


def _described(config) -> str:
    """The sizes and options of ``config`` the parameters show (its options given apart and ``dim`` left out)."""
    hidden = {"dim", *getattr(config, "OPTIONS", ())}
    return ", ".join(f"{name}={value}" for name, value in vars(config).items() if name not in hidden)


def _config(function: str, config_type, params, given=None):
    """The config of the call, and the words saying where its sizes come from.

    ``given``: the caller's ``config=``, which the parameters must then fit;
    else the config ``params`` imply (``config_type.from_params``, default options).
    """
    if given is not None:
        if type(given) is not config_type:
            raise TypeError(f"{function}: config must be a {config_type.__name__}, got {type(given).__name__}")
        return given, f"{_described(given)} of the config given"
    if config_type is MambaConfig and params.conv_weights is None and params.conv_bias is not None:
        raise TypeError(
            f"{function}: parameter conv_bias is given but conv_weights is None; pass conv_weights too (a causal "
            "convolution) or neither (no convolution)"
        )
    sources = {}  # the parameters the sizes are read from: {name: shape}
    for name, ndim in config_type.SIZED_BY.items():
        value = getattr(params, name)
        if value is None and name == "conv_weights":
            continue
        if value is None:
            raise TypeError(f"{function}: parameter {name} is missing (None)")
        if value.ndim != ndim:
            raise ValueError(
                f"{function}: parameter {name} must have {ndim} {'axis' if ndim == 1 else 'axes'}, "
                f"got shape {tuple(value.shape)}"
            )
        sources[name] = tuple(value.shape)
    origin = ", ".join(f"{name} {shape}" for name, shape in sources.items())
    if len(sources) < len(config_type.SIZED_BY):
        origin += ", no conv_weights"
    try:
        config = config_type.from_params(params)
    except (TypeError, ValueError) as error:  # a size of 0
        raise ValueError(f"{function}: the parameters give no layer (from {origin}): {error}") from None
    return config, f"{_described(config)} from {origin}"


def _check_param_shapes(function: str, config, origin: str, params) -> None:
    """Each parameter has exactly the shape the config gives it, or is None where the config has none."""
    shapes = config.param_shapes()
    for key, name, value in zip(params.state_dict_keys, params._fields, params):
        expected = shapes.get(key)
        if expected is None and value is not None:
            raise ValueError(
                f"{function}: parameter {name} is given (shape {tuple(value.shape)}), but the layer of "
                f"{origin} has none; pass None"
                + (" for conv_weights and conv_bias (a kernel of 1 is no convolution)" if name.startswith("conv_") else "")
            )
        if expected is not None and value is None:
            raise TypeError(f"{function}: parameter {name} is missing (None); expected shape {expected} ({origin})")
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(
                f"{function}: parameter {name} must have shape {expected} ({origin}), got {tuple(value.shape)}"
            )


def check_arguments(function: str, spec, x, state, params, xp, sequence: bool, config=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``function`` unless its arguments fit together (and ``config``)."""
    if not isinstance(state, spec.state):
        raise TypeError(f"{function}: expected state of type {spec.state.__name__}, got {type(state).__name__}")
    if not isinstance(params, spec.params):
        raise TypeError(f"{function}: expected params of type {spec.params.__name__}, got {type(params).__name__}")
    for name, value in zip(spec.params._fields, params):
        if value is not None:
            _check_library(function, x, f"parameter {name}", value)
    for name, value in zip(spec.state._fields, state):
        if value is not None:
            _check_library(function, x, f"state {name}", value)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{function}: expected a real floating-point input, got dtype {x.dtype}")
    config, origin = _config(function, spec.config, params, config)
    # The parameters agree with each other first: a misshapen one that gives a size would
    # otherwise be reported as an input of the wrong width.
    _check_param_shapes(function, config, origin, params)
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
    slots = config.state_slots()
    for name, value in zip(spec.state._fields, state):
        if value is not None and name not in {slot.name for slot in slots}:
            raise ValueError(
                f"{function}: state {name} is given (shape {tuple(value.shape)}), but the layer of {origin} "
                "has none; pass None"
            )
    for slot in slots:
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


def _checked(unchecked, spec, sequence: bool):
    function = unchecked.__name__

    @functools.wraps(unchecked)
    def checked(x, state, params, xp=None, **options):
        xp = namespace(x, xp=xp)
        check_arguments(function, spec, x, state, params, xp, sequence, options.get("config"))
        return unchecked(x, state, params, xp, **options)

    return checked


s4_step = _checked(S4.step, S4, sequence=False)
s4_scan = _checked(S4.scan, S4, sequence=True)
s5_step = _checked(S5.step, S5, sequence=False)
s5_scan = _checked(S5.scan, S5, sequence=True)
s6_step = _checked(S6.step, S6, sequence=False)
s6_scan = _checked(S6.scan, S6, sequence=True)
mamba_step = _checked(Mamba.step, Mamba, sequence=False)
mamba_scan = _checked(Mamba.scan, Mamba, sequence=True)
