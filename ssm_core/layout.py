"""Between the user's layout (features at ``dim``) and the canonical one (features last).

Pure functions that every stateful binding (torch modules, NumPy/CuPy/MLX
layers) calls around a step: they check the input against the layer and its
held states, move axes, create missing states as zeros, and move the new
states back. Nothing is stored here; a binding stores the returned states only
once its step has succeeded, so an error leaves its states as they were.

traceTorch layout of a state (see :class:`~ssm_core.spec.StateSlot`): the
input's shape with ``slot.size`` at the feature axis and ``slot.trailing``
appended. Canonical: the feature axis moved to the end (before the trailing axis).
"""

from __future__ import annotations

from .checks import check_step_input, expected_state_shape

__all__ = ["enter_step", "leave_step"]


def _feature_axis(slot) -> int:
    return -1 if slot.trailing is None else -2


def enter_step(layer: str, x, held: dict, slots: tuple, dim: int, num_neurons: int, state_type, xp):
    """Check ``x`` and the held states; return ``(axis, x_canonical, state_canonical)``.

    ``held`` maps state names to arrays in the traceTorch layout, or None for
    a state not created yet (it is created as zeros of ``x``'s dtype and device).
    """
    floating = xp.isdtype(x.dtype, "real floating")
    axis = check_step_input(layer, tuple(x.shape), floating, x.dtype, dim, num_neurons)
    last = x.ndim - 1
    x_w = x if axis == last else xp.moveaxis(x, axis, -1)  # [..., N]
    batch = tuple(x_w.shape[:-1])
    states = {}
    for slot in slots:
        current = held[slot.name]
        if current is None:
            tail = (slot.size,) if slot.trailing is None else (slot.size, slot.trailing)
            states[slot.name] = xp.zeros(batch + tail, dtype=x.dtype, device=getattr(x, "device", None))
            continue
        expected = expected_state_shape(tuple(x.shape), axis, slot.size, slot.trailing)
        if tuple(current.shape) != expected:
            raise ValueError(
                f"{layer}: input of shape {tuple(x.shape)} needs {slot.name} of shape {expected}, but the held "
                f"{slot.name} has shape {tuple(current.shape)}; the batch shape changed while states are held: "
                "call zero_states() first"
            )
        states[slot.name] = current if axis == last else xp.moveaxis(current, axis, _feature_axis(slot))
    return axis, x_w, state_type(**states)


def leave_step(axis: int, ndim: int, y, new_state, slots: tuple, xp):
    """``(y, {state name: array})`` moved back from the canonical to the traceTorch layout."""
    if axis == ndim - 1:
        return y, {slot.name: getattr(new_state, slot.name) for slot in slots}
    states = {slot.name: xp.moveaxis(getattr(new_state, slot.name), _feature_axis(slot), axis) for slot in slots}
    return xp.moveaxis(y, -1, axis), states
