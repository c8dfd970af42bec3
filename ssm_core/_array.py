"""Namespace resolution and the few operations the array API standard lacks.

Every public function of ``ssm_core`` resolves its namespace once, here, and
then uses only ``xp.*`` and operators. ``softplus``, ``silu`` and ``phi1`` are
not in the standard: each is written from standard functions, with a native
fast path where a library has one (torch), looked up once per namespace.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from array_api_compat import array_namespace, is_torch_namespace

__all__ = ["namespace", "register_namespace", "register_native", "softplus", "silu", "phi1"]


def namespace(*arrays, xp=None):
    """The array namespace of ``arrays``, or ``xp`` when the caller already knows it."""
    if xp is not None:
        return xp
    found = array_namespace(*(a for a in arrays if a is not None))
    completed = _COMPLETED.get(found)
    if completed is not None:
        return completed
    if getattr(found, "__name__", "") == "mlx.core":
        raise TypeError(
            "ssm_core: MLX arrays need `import backends.mlx` first; it completes mlx.core where MLX "
            "differs from the array API standard (float64 exp, moving several axes at once)"
        )
    return found


# Namespaces that a backend completed where its library misses part of the
# standard (MLX): ``namespace()`` hands out the completed one.
_COMPLETED: dict = {}


def register_namespace(found, completed) -> None:
    """Make ``namespace()`` answer ``completed`` where ``array_namespace`` answers ``found``."""
    _COMPLETED[found] = completed


def _standard_softplus(x, xp):
    # log(1 + e^x) without overflow for large x or loss for very negative x.
    return xp.logaddexp(x, 0.0)


def _standard_silu(x, xp):
    # x * sigmoid(x); for x -> -inf, exp(-x) -> inf and the quotient -> -0.
    return x / (1.0 + xp.exp(-x))


def _native_ops(xp):
    """softplus/silu for ``xp``: the library's own kernels where it has them."""
    ops = _NATIVE.get(xp)
    if ops is None:
        if is_torch_namespace(xp):
            F = sys.modules["torch"].nn.functional  # torch is loaded: xp is its namespace
            ops = SimpleNamespace(softplus=lambda x, xp: F.softplus(x), silu=lambda x, xp: F.silu(x))
        else:
            ops = SimpleNamespace(softplus=_standard_softplus, silu=_standard_silu)
        _NATIVE[xp] = ops
    return ops


_NATIVE: dict = {}


def register_native(xp, *, softplus=None, silu=None):
    """Let a backend supply fused ``softplus``/``silu`` kernels for its namespace.

    Each callable takes ``(x, xp)``. Missing ones keep the standard form.
    """
    ops = _native_ops(xp)
    _NATIVE[xp] = SimpleNamespace(softplus=softplus or ops.softplus, silu=silu or ops.silu)


def softplus(x, xp=None):
    """``log(1 + exp(x))``, elementwise."""
    xp = namespace(x, xp=xp)
    return _native_ops(xp).softplus(x, xp)


def silu(x, xp=None):
    """``x * sigmoid(x)``, elementwise (also called swish)."""
    xp = namespace(x, xp=xp)
    return _native_ops(xp).silu(x, xp)


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
