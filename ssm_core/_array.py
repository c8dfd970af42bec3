"""Namespace resolution and the few operations the array API standard lacks.

Every public function of ``ssm_core`` resolves its namespace once, here, and
then uses only ``xp.*``, operators and the few operations of
:func:`native_ops`: ``softplus``, ``silu``, ``phi1`` are not in the standard,
and a linear map, a multiply-add and ``exp(z)`` with ``expm1(z) / A`` have faster
fused forms in some libraries. Each is written from standard functions, with
a native fast path where a library has one (torch), looked up once per namespace.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from array_api_compat import array_namespace, is_torch_namespace

__all__ = ["namespace", "register_namespace", "register_native", "native_ops", "softplus", "silu", "phi1"]


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


def _standard_linear(x, weight, bias, xp):
    y = x @ weight.T
    return y if bias is None else y + bias


def _standard_muladd(a, b, c, xp):
    return a * b + c


def _standard_zoh_terms(z, inv_A, xp):
    decay_minus_one = xp.expm1(z)
    return decay_minus_one + 1.0, decay_minus_one * inv_A


def _torch_linear(x, weight, bias, xp):
    y = sys.modules["torch"].nn.functional.linear(x, weight, bias)
    # Under autocast the product comes back in the low precision; what follows
    # it (softplus, the discretization, the recurrence) stays in x's dtype.
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _torch_ops():
    torch = sys.modules["torch"]  # loaded: the namespace is torch's
    F = torch.nn.functional

    def zoh_terms(z, inv_A, xp):
        if z.is_cuda or z.requires_grad:
            # On GPUs expm1 is fast; under autograd the two-kernel form below
            # costs more in its backward than it saves (measured on CPU).
            return _standard_zoh_terms(z, inv_A, xp)
        # torch's CPU expm1 is not vectorised (about 6x exp's time): use
        # expm1(z) = tanh(z/2) * (exp(z) + 1), exact to a few ulp, from two vectorised kernels.
        decay = torch.exp(z)
        return decay, torch.tanh(z * 0.5) * torch.addcmul(inv_A, decay, inv_A)

    return dict(
        softplus=lambda x, xp: F.softplus(x),
        silu=lambda x, xp: F.silu(x),
        linear=_torch_linear,
        muladd=lambda a, b, c, xp: torch.addcmul(c, a, b),
        zoh_terms=zoh_terms,
    )


_STANDARD = dict(
    softplus=_standard_softplus,
    silu=_standard_silu,
    linear=_standard_linear,
    muladd=_standard_muladd,
    zoh_terms=_standard_zoh_terms,
)
_NATIVE: dict = {}


def native_ops(xp) -> SimpleNamespace:
    """The non-standard operations for ``xp``: the library's own kernels where it has faster ones.

    Each takes its arrays and ``xp``: ``softplus(x)``, ``silu(x)``,
    ``linear(x, weight, bias)`` (``x @ weight.T + bias``),
    ``muladd(a, b, c)`` (``a * b + c``), ``zoh_terms(z, inv_A)``
    (``(exp(z), expm1(z) * inv_A)``).
    """
    ops = _NATIVE.get(_key(xp))
    if ops is None:
        ops = _NATIVE[_key(xp)] = SimpleNamespace(**{**_STANDARD, **(_torch_ops() if is_torch_namespace(xp) else {})})
    return ops


def _key(xp):
    # Namespaces are keyed by name: a string compares under torch.compile, a module does not.
    return getattr(xp, "__name__", None) or id(xp)


def register_native(xp, **kernels) -> None:
    """Let a backend supply its own kernels for some of :func:`native_ops` for namespace ``xp``."""
    unknown = set(kernels) - set(_STANDARD)
    if unknown:
        raise ValueError(f"register_native: unknown operations {sorted(unknown)}; expected some of {sorted(_STANDARD)}")
    _NATIVE[_key(xp)] = SimpleNamespace(**{**vars(native_ops(xp)), **kernels})


def softplus(x, xp=None):
    """``log(1 + exp(x))``, elementwise."""
    xp = namespace(x, xp=xp)
    return native_ops(xp).softplus(x, xp)


def silu(x, xp=None):
    """``x * sigmoid(x)``, elementwise (also called swish)."""
    xp = namespace(x, xp=xp)
    return native_ops(xp).silu(x, xp)


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
