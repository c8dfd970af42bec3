"""Discretization of a diagonal system ``h' = A h + B x``, ``A = -exp(A_log)``: the one module for it.

:func:`decay_rate_from_log` makes ``A`` for S4, S5, S6 and Mamba alike (:func:`decay_rates_from_log`
with ``1 / A``, which S6 and Mamba reuse over the steps of a block); :func:`zoh` is the
zero-order hold over a step ``dt``, in the form of ``expm1`` the call's plan names (:data:`~ssm_core.plan.EXPM1_FORMS`).
"""

from __future__ import annotations

import math

from ._array import at_least, elementwise, muladd, namespace, reciprocal, scaled, subtract_from
from .plan import EXPM1_FORMS

__all__ = ["zoh", "zoh_terms", "decay_rates", "decay_rates_from_log", "decay_rate_from_log", "phi1"]


def decay_rate_from_log(A_log, xp=None):
    """``A = -exp(A_log)``, kept off zero as :func:`decay_rates` does; ``A_log``'s shape."""
    xp = namespace(A_log, xp=xp)
    floor, shift = _rate_floor(xp, A_log.dtype)
    magnitude = xp.exp(A_log)  # [parameter shape]
    # The negation and the shift in one operator: every step of S4, S5, S6 and Mamba makes A.
    return subtract_from(-floor, magnitude, xp) if shift else -at_least(magnitude, floor, xp)  # [parameter shape]


def decay_rates_from_log(A_log, xp=None):
    """``(A, 1 / A)`` for ``A = -exp(A_log)`` (:func:`decay_rate_from_log`): what a caller reusing ``1 / A`` keeps."""
    xp = namespace(A_log, xp=xp)
    A = decay_rate_from_log(A_log, xp)  # [parameter shape]
    return A, reciprocal(A, xp)


def decay_rates(A, xp=None):
    """``(A, 1 / A)`` with ``A`` kept at least a tiny floor away from zero (see :func:`zoh`)."""
    xp = namespace(A, xp=xp)
    A = _off_zero(A, xp)  # [parameter shape]
    return A, reciprocal(A, xp)


def _off_zero(A, xp):
    floor, shift = _rate_floor(xp, A.dtype)
    # A shift is one operator (and traces under torch.compile); it moves only
    # |A| below about 1e-154 (float64) or 1e-19 (float32). float16's floor is
    # too large for that: there A is clamped instead.
    return A - floor if shift else xp.minimum(A, -floor)  # [parameter shape]


def zoh(dt, A, xp=None, inv_A=None, expm1="expm1", overwrite=False):
    """Discretize ``h' = A h + B x`` over a step ``dt`` with a zero-order hold.

    Parameters
    ----------
    dt : array
        Step sizes, broadcastable against ``A``.
    A : array
        Diagonal of the (negative) continuous dynamics; a parameter-sized array.
    inv_A : array, optional
        ``1 / A`` when ``(A, inv_A)`` come from :func:`decay_rates` already
        (reused across steps). Otherwise ``A`` is kept off zero here, and the
        gain divides by it: one operation where a reciprocal used once
        and a product are two.
    expm1 : str, default "expm1"
        The form of ``expm1`` (:data:`~ssm_core.plan.EXPM1_FORMS`): the same
        numbers to a few ulp, at speeds that depend on the library and device.
    overwrite : bool, default False
        Reuse the temporary arrays made here for the results (a plan's
        ``inplace``, see :func:`~ssm_core._array.scaled`): the same numbers.

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
        A = _off_zero(A, xp)  # [parameter shape]
    return zoh_terms(dt * A, inv_A, xp, expm1, A, overwrite)  # [broadcast shape] x2


def zoh_terms(z, inv_A, xp, expm1="expm1", A=None, overwrite=False):
    """``(exp(z), expm1(z) * inv_A)``: the two terms of a zero-order hold with ``z = dt * A``.

    ``inv_A`` None: the gain is ``expm1(z) / A`` (``A`` off zero, see :func:`decay_rate_from_log`).
    ``overwrite``: ``z`` is the caller's own, and one of the results is written into it.
    """
    if expm1 == "expm1":
        decay_minus_one = xp.expm1(z)  # [z shape]
        # Without inv_A (S4's and S5's parameter-sized discretization) a division, into a new array.
        gain = decay_minus_one / A if inv_A is None else scaled(decay_minus_one, inv_A, xp, overwrite)  # [z shape]
        # exp(z), not expm1(z) + 1.0: the same to an ulp, and torch converts a
        # Python scalar at every call, which costs more than exp on small arrays.
        return elementwise("exp", z, xp, overwrite), gain  # [z shape] x2
    if inv_A is None:  # the other forms multiply by 1 / A in a fused operation
        inv_A = reciprocal(A, xp)  # [parameter shape]
    if expm1 == "exp":
        return _zoh_terms_from_exp(z, inv_A, xp)
    if expm1 == "tanh":
        # expm1(z) = tanh(z/2) * (exp(z) + 1), exact to a few ulp, from two vectorised kernels;
        # the gain t + t * exp(z) with t = tanh(z/2) / A, which a plan's inplace writes into z.
        decay = xp.exp(z)  # [z shape]
        t = scaled(elementwise("tanh", scaled(z, 0.5, xp, overwrite), xp, overwrite), inv_A, xp, overwrite)  # [z shape]
        return decay, muladd(t, decay, t, xp, overwrite)  # [z shape] x2
    raise ValueError(f"zoh: expm1 must be one of {EXPM1_FORMS}, got {expm1!r}")


# expm1(z) = z * sum_k z**k / (k+1)!, k < degree, for |z| < _SERIES_BOUND: the
# truncation stays below half an ulp there (degree 6 in float32, 12 in float64).
_SERIES_BOUND = 0.25
_SERIES_DEGREE = {32: 6, 64: 12}


def _zoh_terms_from_exp(z, inv_A, xp):
    """``(exp(z), expm1(z) * inv_A)`` from one ``exp``: ``exp(z) - 1``, or a short series near 0.

    For compilers that lower ``expm1`` to ``exp(z) - 1`` (inductor's C++ does),
    which loses all accuracy as ``z`` -> 0, and whose ``tanh`` is a slow
    library call. Both branches are elementwise chains, so it fuses; within
    about 5 ulp (float32) and 2 ulp (float64) of ``expm1`` everywhere.
    """
    decay = xp.exp(z)  # [z shape]
    small = xp.abs(z) < _SERIES_BOUND  # [z shape]
    # The series sees z only where it is used, 0 elsewhere: its powers of a
    # large z overflow, and the backward of `where` multiplies the lane it did
    # not select by a zero gradient, which 0 * inf would make NaN.
    z_small = xp.where(small, z, xp.zeros_like(z))  # [z shape]
    degree = _SERIES_DEGREE[64 if z.dtype == xp.float64 else 32]
    series = 1.0 / math.factorial(degree)
    for k in range(degree - 1, 0, -1):
        series = series * z_small + 1.0 / math.factorial(k)  # Horner: [z shape]
    return decay, xp.where(small, z_small * series, decay - 1.0) * inv_A  # [z shape] x2


def phi1(z, xp=None):
    """``expm1(z) / z`` with its limit ``phi1(0) = 1``, elementwise.

    Accurate for small ``|z|`` (no ``exp(z) - 1`` cancellation) and finite at
    ``z == 0``, where a zero-order hold with ``A`` underflowed to zero lands.
    ``phi1(-inf) = 0``.
    """
    xp = namespace(z, xp=xp)
    is_zero = z == 0
    safe_z = xp.where(is_zero, 1.0, z)
    return xp.where(is_zero, 1.0, xp.expm1(safe_z) / safe_z)


_RATE_FLOORS: dict = {}


def _rate_floor(xp, dtype) -> tuple:
    """``(floor, shift)``: how far ``A`` stays from zero (``1 / A`` finite), and whether shifting by it is harmless.

    Not the floor of the chunked scans' decay powers (``lti._power_floor``):
    that one keeps products of powers off subnormal numbers, for speed.
    """
    key = (getattr(xp, "__name__", None) or id(xp), str(dtype))  # traceable by torch.compile, unlike a dtype's hash
    floor = _RATE_FLOORS.get(key)
    if floor is None:
        info = xp.finfo(dtype)
        tiny = float(info.smallest_normal)
        # The square root keeps dt * A a normal number for any dt > sqrt(tiny);
        # float16's range is too narrow for that margin.
        floor = _RATE_FLOORS[key] = (tiny**0.5, True) if info.bits >= 32 else (tiny, False)
    return floor


# ----------------------------------------------------------------------------- the rules a layer may name

# The discretizations of the selective layers (S6, Mamba): a field of their config.
DISCRETIZATIONS = ("zoh", "euler")
__all__ += ["DISCRETIZATIONS", "euler", "discretized"]


def euler(dt, A, xp=None, overwrite=False):
    """``(A_bar, gain)`` of the rule the Mamba reference code uses: ``A_bar = exp(dt * A)``, ``gain = dt``.

    ``B_bar = gain * B = dt * B``: the input is held by Euler's rule (exact
    for ``A -> 0``), the decay is the zero-order hold's. This is what
    ``transformers``' ``MambaMixer`` and ``mamba-ssm`` compute, so checkpoints
    trained with them need it. ``gain`` is ``dt`` itself, broadcast against ``B``.
    """
    xp = namespace(dt, A, xp=xp)
    return elementwise("exp", dt * A, xp, overwrite), dt  # [broadcast shape], [dt shape]


def discretized(rule: str, dt, A, xp, inv_A=None, expm1="expm1", overwrite=False):
    """``(A_bar, gain)`` by ``rule`` (one of :data:`DISCRETIZATIONS`): :func:`zoh` or :func:`euler`.

    ``inv_A`` and ``expm1`` serve the zero-order hold (see :func:`zoh`); Euler's rule needs neither.
    ``overwrite``: reuse the temporaries made here (see :func:`zoh`); ``dt`` is never written.
    """
    if rule == "zoh":
        return zoh(dt, A, xp, inv_A, expm1, overwrite)  # [broadcast shape] x2
    if rule == "euler":
        return euler(dt, A, xp, overwrite)  # [broadcast shape], [dt shape]
    raise ValueError(f"discretized: rule must be one of {DISCRETIZATIONS}, got {rule!r}")
