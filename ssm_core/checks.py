"""Argument and input checks shared by every binding.

Pure Python on shapes and flags, so the torch layers and the NumPy/CuPy/MLX
layers raise the same errors with the same words. Every message names the
layer, what it expected and what it got. What a state's shape must be is
:mod:`.layout`'s.
"""

from __future__ import annotations

__all__ = [
    "check_int",
    "check_axis",
    "check_dim",
    "check_step_input",
    "check_sizes",
    "check_bool",
    "check_choice",
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


def check_step_input(layer: str, shape: tuple, dim: int, num_neurons: int) -> int:
    """Check one step's input shape; return ``dim`` normalised to ``[0, ndim)``.

    Its dtype is the binding's to check (one check per call, with the layer's dtype and device).
    """
    if len(shape) == 0:
        raise ValueError(f"{layer}: expected an input with a feature axis of size {num_neurons}, got a 0-d array")
    axis = check_dim(layer, dim, len(shape))
    if shape[axis] != num_neurons:
        raise ValueError(
            f"{layer}: expected {num_neurons} features on axis dim={dim}, got input of shape "
            f"{tuple(shape)} with {shape[axis]} there"
        )
    return axis


def check_sizes(layer: str, config) -> None:
    """The sizes every layer's config has: ``num_neurons`` and ``d_state`` at least 1, ``dim`` an int."""
    check_int(layer, "num_neurons", config.num_neurons, 1)
    check_int(layer, "d_state", config.d_state, 1)
    check_axis(layer, "dim", config.dim)


def check_bool(layer: str, name: str, value) -> bool:
    """``value`` as a bool option (``True`` or ``False``, not a truthy stand-in), else a clear error."""
    if not isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(layer: str, name: str, value, choices: tuple):
    """``value`` as one of the strings ``choices``, else a clear error."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{layer}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
