"""Between the user's layout (features at ``dim``) and the features-last one of ``ssm_core``.

Pure functions that every stateful binding (torch modules, NumPy/CuPy/MLX
layers) calls around a step: they check the input's shape against the layer
and its held states, move axes, create missing states as zeros, and move the
new states back; and what shape a state loaded into a layer must have. The
input's type, dtype and device are the binding's to check, once per call.
Nothing is stored here; a binding stores the returned states only once its
step has succeeded, so an error leaves its states as they were.

traceTorch layout of a state (see :class:`~ssm_core.spec.StateSlot`): the
input's shape with ``slot.size`` at the feature axis and ``slot.trailing``
appended. Features-last: the feature axis moved to the end (before the trailing axis).
"""

from __future__ import annotations

from typing import NamedTuple

from ._array import moveaxis
from .checks import check_dim, check_step_input

__all__ = [
    "run", "step_axis", "run_step", "zero_states", "compute_dtype", "in_compute_dtype", "StateArguments", "check_loaded_state",
    "check_loaded_states_agree",
]


class StateArguments(dict):
    """States given to a call as arguments (a stateless form), where a binding otherwise passes the ones it holds.

    The same mapping ``{state name: array or None}``; errors about these
    states then speak of the arguments, not of a held state that
    ``zero_states()`` would reset.
    """


def compute_dtype(dtype, xp):
    """The dtype a layer of ``dtype`` computes and keeps its states in.

    float32 for float16/bfloat16: a state is a running sum over many steps,
    which half precision would round away. Every other dtype is its own.
    """
    key = (getattr(xp, "__name__", None) or id(xp), str(dtype))  # traceable by torch.compile, unlike a dtype's hash
    found = _COMPUTE_DTYPES.get(key)
    if found is None:  # asked at every call of every layer: finfo once per namespace and dtype
        found = _COMPUTE_DTYPES[key] = xp.float32 if xp.finfo(dtype).bits < 32 else dtype
    return found


_COMPUTE_DTYPES: dict = {}


def in_compute_dtype(params, xp, dtype=None) -> tuple:
    """``(params, dtype)``: a layer's parameters (a ``spec.params`` record) in its compute dtype, and that dtype.

    The dtype is :func:`compute_dtype` of the parameters' (a layer's
    parameters share one), or ``dtype`` where the caller knows it already.
    Absent parameters stay None; those already in the compute dtype are
    passed on, not copied.
    """
    if dtype is None:
        dtype = compute_dtype(next(p for p in params if p is not None).dtype, xp)
    for p in params:  # the usual case, at every call: nothing to make (a loop: no generator per call)
        if p is not None and p.dtype != dtype:
            return type(params)(*(p if p is None or p.dtype == dtype else xp.astype(p, dtype) for p in params)), dtype
    return params, dtype


def expected_state_shape(x_shape: tuple, axis: int, size: int, trailing: int | None) -> tuple:
    """A state's shape in the traceTorch layout for an input of ``x_shape``.

    The input's feature axis ``axis`` becomes ``size``; ``trailing`` (the state
    or kernel size), when given, is appended as a last axis.
    """
    shape = list(x_shape)
    shape[axis] = size
    if trailing is not None:
        shape.append(trailing)
    return tuple(shape)


def _feature_axis(slot) -> int:
    return -1 if slot.trailing is None else -2


def _check_states(layer, step_shape, axis, dtype, held, slots) -> None:
    """Raise unless each held state (None: not made yet) fits one step's input of ``step_shape`` and ``dtype``."""
    given = isinstance(held, StateArguments)
    for slot in slots:
        current = held[slot.name]
        if current is None:
            continue
        if current.dtype != dtype:
            if given:
                raise TypeError(
                    f"{layer}: the state argument {slot.name} has dtype {current.dtype}, expected {dtype} "
                    "(the dtype the layer computes in for this input); initial_states(x) gives zeros that fit"
                )
            raise TypeError(
                f"{layer}: the held {slot.name} has dtype {current.dtype}, the input {dtype}; "
                "call zero_states() before changing dtype, or convert the input"
            )
        expected = expected_state_shape(step_shape, axis, slot.size, slot.trailing)
        if tuple(current.shape) != expected:
            if given:
                raise ValueError(
                    f"{layer}: the state argument {slot.name} has shape {tuple(current.shape)}, expected {expected} "
                    f"for input of step shape {step_shape}; initial_states(x) gives zeros that fit"
                )
            raise ValueError(
                f"{layer}: input of step shape {step_shape} needs {slot.name} of shape {expected}, but the held "
                f"{slot.name} has shape {tuple(current.shape)}; the batch shape changed while states are held: "
                "call zero_states() first"
            )


def _features_last_states(axis, step_ndim, batch, x, held, slots, state_type, xp):
    """The held states (checked) moved to the features-last layout; zeros of ``x``'s dtype and device for None."""
    states = {}
    for slot in slots:
        current = held[slot.name]
        if current is None:
            states[slot.name] = slot.zeros(batch, xp, x.dtype, getattr(x, "device", None))
        else:
            states[slot.name] = current if axis == step_ndim - 1 else moveaxis(current, axis, _feature_axis(slot), xp)
    return state_type(**states)


def _tracetorch_layout(axis, step_ndim, new_state, slots, xp):
    if axis == step_ndim - 1:
        return {slot.name: getattr(new_state, slot.name) for slot in slots}
    return {slot.name: moveaxis(getattr(new_state, slot.name), _feature_axis(slot), axis, xp) for slot in slots}


def step_axis(layer: str, x, held: dict, slots: tuple, dim: int, num_neurons: int) -> int:
    """Check one step's input ``x`` and the held states; return its feature axis, in ``[0, x.ndim)``.

    The same answer for every input of ``x``'s shape and dtype and states of
    the same shapes and dtypes: a binding may keep it for those (see :func:`run_step`).
    """
    axis = check_step_input(layer, tuple(x.shape), dim, num_neurons)
    _check_states(layer, tuple(x.shape), axis, x.dtype, held, slots)
    return axis


def enter_step(axis: int, x, held: dict, slots: tuple, state_type, xp):
    """``(x_last, state_last)``: ``x`` and the states moved to features-last (checked by :func:`step_axis`).

    ``held`` maps state names to arrays in the traceTorch layout, or None for
    a state not created yet (it is created as zeros of ``x``'s dtype and device).
    """
    x_last = x if axis == x.ndim - 1 else moveaxis(x, axis, -1, xp)  # [..., N]
    return x_last, _features_last_states(axis, x.ndim, tuple(x_last.shape[:-1]), x, held, slots, state_type, xp)


def leave_step(axis: int, ndim: int, y, new_state, slots: tuple, xp):
    """``(y, {state name: array})`` moved back from the features-last to the traceTorch layout."""
    states = _tracetorch_layout(axis, ndim, new_state, slots, xp)
    return (y if axis == ndim - 1 else moveaxis(y, -1, axis, xp)), states


class ScanAxes(NamedTuple):
    """Where a sequence keeps its axes: ``time`` and ``feature`` in the sequence, ``step_feature`` in one step."""

    time: int
    feature: int
    step_feature: int
    step_ndim: int


def enter_scan(layer: str, xs, held: dict, slots: tuple, dim: int, num_neurons: int, state_type, time_dim, xp):
    """Check a sequence ``xs`` and the held states; return ``(axes, xs_last, state_last)``, both features-last.

    ``xs`` with its ``time_dim`` axis removed is one step's input, and the
    layer's ``dim`` indexes that step input (so a layer keeps its ``dim`` when
    a model runs in sequence mode). ``xs_last`` is ``[T, ..., N]``.
    """
    time = check_dim(layer, time_dim, xs.ndim, name="time_dim")
    step_shape = tuple(xs.shape[:time]) + tuple(xs.shape[time + 1 :])
    if len(step_shape) == 0:
        raise ValueError(
            f"{layer}: expected a sequence with a time axis and a feature axis of size {num_neurons}, "
            f"got shape {tuple(xs.shape)}"
        )
    step_feature = check_step_input(layer, step_shape, dim, num_neurons)
    feature = step_feature if step_feature < time else step_feature + 1
    axes = ScanAxes(time, feature, step_feature, len(step_shape))
    if (time, feature) == (0, xs.ndim - 1):
        xs_last = xs
    else:
        xs_last = moveaxis(xs, (time, feature), (0, -1), xp)  # [T, ..., N]
    _check_states(layer, step_shape, step_feature, xs.dtype, held, slots)
    state = _features_last_states(step_feature, len(step_shape), tuple(xs_last.shape[1:-1]), xs, held, slots, state_type, xp)
    return axes, xs_last, state


def leave_scan(axes: ScanAxes, ys, new_state, slots: tuple, xp):
    """``(ys, {state name: array})`` moved back to the sequence's and the traceTorch layout."""
    states = _tracetorch_layout(axes.step_feature, axes.step_ndim, new_state, slots, xp)
    if (axes.time, axes.feature) != (0, ys.ndim - 1):
        ys = moveaxis(ys, (0, -1), (axes.time, axes.feature), xp)
    return ys, states


# ----------------------------------------------------------------------------- a call


def run(layer: str, spec, slots: tuple, dim: int, num_neurons: int, x, held: dict, core, xp, time_dim=None):
    """A binding's call, the same for every binding: check, to features-last, ``core``, and back.

    ``held``: the states the binding holds, or a :class:`StateArguments` of
    those a stateless form was given. ``x`` is one step's input (``time_dim``
    None) or a sequence with its time axis at ``time_dim``, already checked
    for its type, device and dtype by the binding and cast to the compute dtype. ``core(x_last, state_last)``
    returns ``(y_last, new_state_last)``: the binding's step or scan with the
    parameters as it holds them. Returns ``(y, {state name: new state})`` in
    the traceTorch layout; nothing is stored, so an error leaves the binding's
    states as they were.
    """
    if time_dim is None:
        return run_step(step_axis(layer, x, held, slots, dim, num_neurons), spec, slots, x, held, core, xp)
    axes, xs_last, state = enter_scan(layer, x, held, slots, dim, num_neurons, spec.state, time_dim, xp)
    ys, new_state = core(xs_last, state)
    return leave_scan(axes, ys, new_state, slots, xp)


def run_step(axis: int, spec, slots: tuple, x, held: dict, core, xp):
    """:func:`run` for one step whose input and states :func:`step_axis` has checked, with its answer ``axis``."""
    x_last, state = enter_step(axis, x, held, slots, spec.state, xp)
    y, new_state = core(x_last, state)
    return leave_step(axis, x.ndim, y, new_state, slots, xp)


def zero_states(layer: str, spec, slots: tuple, dim: int, num_neurons: int, x, xp, time_dim=None) -> dict:
    """``{state name: zeros}`` in the traceTorch layout, as a call on ``x`` would create them."""
    held = dict.fromkeys(slot.name for slot in slots)
    if time_dim is None:
        axis = step_axis(layer, x, held, slots, dim, num_neurons)
        _, state = enter_step(axis, x, held, slots, spec.state, xp)
        return _tracetorch_layout(axis, x.ndim, state, slots, xp)
    axes, _, state = enter_scan(layer, x, held, slots, dim, num_neurons, spec.state, time_dim, xp)
    return _tracetorch_layout(axes.step_feature, axes.step_ndim, state, slots, xp)


# ----------------------------------------------------------------------------- loaded states


def check_loaded_state(layer: str, key: str, slot, shape: tuple, dim: int) -> None:
    """Raise if an array of ``shape`` cannot be state ``slot`` of a layer operating on ``dim``.

    Without an input, only what the layer fixes is checked: the size on the
    feature axis and the trailing axis.
    """
    ndim = len(shape) if slot.trailing is None else len(shape) - 1
    trailing_ok = slot.trailing is None or (ndim >= 1 and shape[-1] == slot.trailing)
    axis = dim + ndim if dim < 0 else dim
    if not (trailing_ok and 0 <= axis < ndim and shape[axis] == slot.size):
        raise ValueError(
            f"{layer}: state {key} must have {slot.size} on the feature axis dim={dim}"
            + ("" if slot.trailing is None else f" and {slot.trailing} on the last axis")
            + f", got shape {tuple(shape)}"
        )


def check_loaded_states_agree(layer: str, slots, shapes: dict, dim: int, num_neurons: int) -> None:
    """Raise unless the states ``{key: shape}`` loaded together into one layer fit one input shape.

    ``slots`` are the layer's :class:`~ssm_core.spec.StateSlot` records, in
    the order of ``shapes`` (each already passed :func:`check_loaded_state`).
    Each state implies the shape of the input that made it (its feature axis
    set to ``num_neurons``, its trailing axis dropped); two states of one
    layer that imply different inputs would only fail at the next step.
    """
    implied = {}
    for slot, (key, shape) in zip(slots, shapes.items()):
        step_shape = list(shape if slot.trailing is None else shape[:-1])
        step_shape[dim] = num_neurons
        implied[key] = tuple(step_shape)
    if len(set(implied.values())) > 1:
        described = ", ".join(f"{key} {tuple(shape)}" for key, shape in shapes.items())
        raise ValueError(
            f"{layer}: the loaded states belong to different input shapes ({described}); "
            "states saved together from one layer agree on their batch shape"
        )
