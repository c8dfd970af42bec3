"""Argument and input checks shared by every binding.

Pure Python on shapes and flags, so the torch layers and the NumPy/CuPy/MLX
layers raise the same errors with the same words. Every message names the
layer, what it expected and what it got.
"""

from __future__ import annotations

__all__ = [
    "check_int",
    "check_axis",
    "check_dim",
    "check_step_input",
    "expected_state_shape",
    "check_loaded_state",
    "check_loaded_states_agree",
]


def check_int(layer: str, name: str, value, minimum: int, *, also: tuple = ()) -> int:
    """``value`` as an int ``>= minimum`` (or one of ``also``), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{layer}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum and value not in also:
        allowed = f"an int >= {minimum}" + "".join(f" or {a}" for a in also)
        raise ValueError(f"{layer}: {name} must be {allowed}, got {value}")
    return value


def check_axis(layer: str, name: str, value) -> int:
    """An axis argument: any int (its range is checked against each input)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{layer}: {name} must be an int, got {type(value).__name__} {value!r}")
    return value


def check_dim(layer: str, dim, ndim: int, name: str = "dim") -> int:
    """Normalise an axis index for an array of ``ndim`` axes."""
    check_axis(layer, name, dim)
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"{layer}: {name}={dim} is out of range for an input with {ndim} axes "
            f"(expected {-ndim} <= {name} < {ndim})"
        )
    return dim % ndim


def check_step_input(layer: str, shape: tuple, is_floating: bool, dtype, dim: int, num_neurons: int) -> int:
    """Check one step's input; return ``dim`` normalised to ``[0, ndim)``."""
    if not is_floating:
        raise TypeError(f"{layer}: expected a real floating-point input, got dtype {dtype}")
    if len(shape) == 0:
        raise ValueError(f"{layer}: expected an input with a feature axis of size {num_neurons}, got a 0-d array")
    axis = check_dim(layer, dim, len(shape))
    if shape[axis] != num_neurons:
        raise ValueError(
            f"{layer}: expected {num_neurons} features on axis dim={dim}, got input of shape "
            f"{tuple(shape)} with {shape[axis]} there"
        )
    return axis


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
