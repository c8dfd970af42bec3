"""Zero-order-hold discretization of a diagonal continuous-time system."""

from __future__ import annotations

from ._array import namespace, zoh_terms

__all__ = ["zoh", "decay_rates"]


def decay_rates(A, xp=None):
    """``(A, 1 / A)`` with ``A`` kept at least a tiny floor away from zero (see :func:`zoh`)."""
    xp = namespace(A, xp=xp)
    floor, shift = _floor(xp, A.dtype)
    # A shift is one operator (and traces under torch.compile); it moves only
    # |A| below about 1e-154 (float64) or 1e-19 (float32). float16's floor is
    # too large for that: there A is clamped instead.
    A = A - floor if shift else xp.minimum(A, -floor)  # [parameter shape]
    return A, 1.0 / A


def zoh(dt, A, xp=None, inv_A=None):
    """Discretize ``h' = A h + B x`` over a step ``dt`` with a zero-order hold.

    Parameters
    ----------
    dt : array
        Step sizes, broadcastable against ``A``.
    A : array
        Diagonal of the (negative) continuous dynamics; a parameter-sized array.
    inv_A : array, optional
        ``1 / A`` when ``(A, inv_A)`` come from :func:`decay_rates` already
        (reused across steps); otherwise computed here.

    Returns
    -------
    A_bar : array
        ``exp(dt * A)``.
    gain : array
        ``dt * phi1(dt * A) = expm1(dt * A) / A``, so that ``B_bar = gain * B``.
        Equal to ``(A_bar - 1) / A`` without its cancellation for small
        ``dt * A``, and without a branch: on the big, input-dependent arrays
        of S6/Mamba the fewest whole-array operations win.

    Notes
    -----
    ``A`` is moved ``sqrt(smallest normal)`` away from zero (about 1e-154 in
    float64, 1e-19 in float32; clamped at the smallest normal in the narrow
    range of float16) so that ``1 / A`` stays finite when ``A = -exp(A_log)``
    underflows. The gain then tends to ``dt`` as it should (``expm1(z) = z``
    for such tiny ``z``), where ``(A_bar - 1) / A`` is 0/0.
    """
    xp = namespace(dt, A, xp=xp)
    if inv_A is None:
        A, inv_A = decay_rates(A, xp)  # [parameter shape] x2
    return zoh_terms(dt * A, inv_A, xp)  # [broadcast shape] x2


_FLOORS: dict = {}


def _floor(xp, dtype) -> tuple:
    """``(floor, shift)``: how far ``A`` stays from zero, and whether shifting by it is harmless."""
    key = (getattr(xp, "__name__", None) or id(xp), str(dtype))
    floor = _FLOORS.get(key)
    if floor is None:
        info = xp.finfo(dtype)
        tiny = float(info.smallest_normal)
        # The square root keeps dt * A a normal number for any dt > sqrt(tiny);
        # float16's range is too narrow for that margin.
        floor = _FLOORS[key] = (tiny**0.5, True) if info.bits >= 32 else (tiny, False)
    return floor
