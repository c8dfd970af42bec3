"""Zero-order-hold discretization of a diagonal continuous-time system."""

from __future__ import annotations

from ._array import namespace, phi1

__all__ = ["zoh"]


def zoh(dt, A, xp=None):
    """Discretize ``h' = A h + B x`` over a step ``dt`` with a zero-order hold.

    Parameters
    ----------
    dt : array
        Step sizes, broadcastable against ``A``.
    A : array
        Diagonal of the (negative) continuous dynamics.

    Returns
    -------
    A_bar : array
        ``exp(dt * A)``.
    gain : array
        ``dt * phi1(dt * A)``, so that ``B_bar = gain * B``. Equal to
        ``(A_bar - 1) / A``, without its cancellation for small ``dt * A`` and
        without its 0/0 when ``A`` underflows to zero (the gain is then ``dt``).
    """
    xp = namespace(dt, A, xp=xp)
    dtA = dt * A  # broadcast of dt and A
    return xp.exp(dtA), dt * phi1(dtA, xp)
