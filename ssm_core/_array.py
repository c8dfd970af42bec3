"""Namespace resolution and the few operations the array API standard lacks.

Every public function of ``ssm_core`` resolves its namespace once, with
:func:`namespace`, and then uses only ``xp.*``, operators and the functions
here. ``softplus`` and ``silu`` are not in the standard; ``linear``,
``muladd`` and ``readout`` are short compositions of standard functions that
torch has faster kernels for. Each function is the standard form, with an
explicit ``if _is_torch(xp):`` branch where torch's own kernel is faster and
gives the same numbers. Which form of an operation a call takes (``readout``'s)
is its plan's choice (:mod:`.plan`), not decided here.
"""

from __future__ import annotations

import sys

from array_api_compat import array_namespace

__all__ = [
    "namespace", "register_namespace", "softplus", "silu", "linear", "muladd", "reciprocal", "subtract_from", "at_least",
    "readout", "scaled", "elementwise",
    "moveaxis", "unstack",
]


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


_TORCH_NAMES = frozenset({"torch", "array_api_compat.torch"})


def _is_torch(xp) -> bool:
    # By name, not array_api_compat.is_torch_namespace: that one is an lru_cache,
    # and torch.compile warns at every cached function it traces. A torch
    # namespace means torch is loaded: sys.modules["torch"] imports nothing.
    return getattr(xp, "__name__", None) in _TORCH_NAMES


def softplus(x, xp=None):
    """``log(1 + exp(x))``, elementwise."""
    xp = namespace(x, xp=xp)
    if _is_torch(xp):
        torch = sys.modules["torch"]
        # torch answers x above `threshold` (20 by default), off by log1p(exp(-x)). That is
        # below half an ulp of x from about 15 on in float32, but only from about 34 on in
        # float64 (2e-9 at 20, 2e-10 of dt): there the switch waits until 40.
        return torch.nn.functional.softplus(x, threshold=40.0 if x.dtype == torch.float64 else 20.0)
    # log(1 + e^x) without overflow for large x or loss for very negative x.
    return xp.logaddexp(x, 0.0)


def silu(x, xp=None):
    """``x * sigmoid(x)``, elementwise (also called swish)."""
    xp = namespace(x, xp=xp)
    if _is_torch(xp):
        return sys.modules["torch"].nn.functional.silu(x)
    # For x -> -inf, exp(-x) -> inf and the quotient -> -0.
    return x / (1.0 + xp.exp(-x))


def linear(x, weight, bias, xp):
    """``x @ weight.T + bias`` (``bias`` may be None): ``torch.nn.Linear``'s map, weight ``[out, in]``."""
    if _is_torch(xp):
        y = sys.modules["torch"].nn.functional.linear(x, weight, bias)  # one kernel with the bias
        # Under autocast the product comes back in the low precision; what follows
        # it (softplus, the discretization, the recurrence) stays in x's dtype.
        return y if y.dtype == x.dtype else y.to(x.dtype)
    if x.ndim > 2:
        # One [rows, in] x [in, out] product: NumPy multiplies a stack of matrices by a
        # transposed weight matrix by matrix, several times slower (7x for a [1024, 8, 256] sequence).
        y = xp.reshape(xp.reshape(x, (-1, x.shape[-1])) @ weight.T, (*x.shape[:-1], weight.shape[0]))  # [..., out]
    else:
        y = x @ weight.T  # [..., out]
    return y if bias is None else y + bias


def moveaxis(x, source, destination, xp):
    """The standard's ``moveaxis`` (single axes or tuples of them)."""
    if _is_torch(xp):
        # array-api-compat calls torch.moveaxis, which torch.func.vmap has no batching rule for; movedim is the same op.
        return sys.modules["torch"].movedim(x, source, destination)
    return xp.moveaxis(x, source, destination)


def unstack(x, axis, xp):
    """The standard's ``unstack``: the slices of ``x`` along ``axis``, as a tuple."""
    if _is_torch(xp):
        return sys.modules["torch"].unbind(x, axis)  # array-api-compat's goes through torch.moveaxis (see moveaxis)
    return xp.unstack(x, axis=axis)


def muladd(a, b, c, xp, overwrite: bool = False):
    """``a * b + c``, elementwise with broadcasting; into ``c`` where ``overwrite`` (see :func:`scaled`).

    Overwriting, ``a`` broadcasts into ``c`` (the callers': an array of ``c``'s or the parameters' shape);
    ``b`` (their state) may be larger than ``c``, whose result then is a new array, as the plain operation's.
    """
    overwrite = overwrite and a.dtype == c.dtype and b.dtype == c.dtype and b.shape == c.shape
    if _is_torch(xp):
        if overwrite:
            return c.addcmul_(a, b)
        return sys.modules["torch"].addcmul(c, a, b)  # one pass over memory instead of two
    if overwrite:
        c += a * b
        return c
    return a * b + c


# Overwriting the arrays a call made itself (a plan's ``inplace``): a step on a large
# state makes several temporaries of the state's size and frees them at its end, and
# glibc's malloc hands such memory back to the system when enough of it lies free at the
# top of the heap, so that the next step faults every page of it in again (torch, S6 at
# [32, 256, 16]: 160-480 page faults and three times the time of the same step with its
# temporaries overwritten, which faulted none). Only where nothing records the arrays for
# a backward pass, and only on arrays no one else holds. An array of another dtype than the
# one written into (autocast's lower precision, a state of a wider dtype) makes a new array
# as the plain operation does: an in-place result keeps the dtype it is written into.


def scaled(a, b, xp, overwrite: bool = False):
    """``a * b``; into ``a`` where ``overwrite``: ``a`` is the caller's own, of the result's shape.

    ``b`` a Python float, or an array of ``a``'s dtype; otherwise a new array, of the promoted dtype.
    """
    if overwrite and (isinstance(b, float) or b.dtype == a.dtype):
        a *= b  # the standard's in-place operator
        return a
    return a * b


# Libraries whose elementwise functions write into an `out=` array (NumPy's and CuPy's ufuncs).
_UFUNC_NAMES = frozenset({"numpy", "array_api_compat.numpy", "cupy", "array_api_compat.cupy"})


def elementwise(name: str, x, xp, overwrite: bool = False):
    """``xp.<name>(x)`` (``"exp"``, ``"expm1"``, ``"tanh"``); into ``x`` where ``overwrite`` and the library can."""
    if overwrite:
        if _is_torch(xp):
            return getattr(x, name + "_")()
        if getattr(xp, "__name__", None) in _UFUNC_NAMES:
            return getattr(xp, name)(x, out=x)
    return getattr(xp, name)(x)


def reciprocal(x, xp):
    """``1 / x``, elementwise."""
    if _is_torch(xp):
        return sys.modules["torch"].reciprocal(x)  # 1 / tensor is a reciprocal and a multiply by 1
    return 1.0 / x


def subtract_from(value: float, x, xp):
    """``value - x`` for a Python float ``value``, elementwise."""
    if _is_torch(xp):
        return sys.modules["torch"].rsub(x, value)  # the reflected operator goes through a Python wrapper in torch
    return value - x


def at_least(x, floor: float, xp):
    """``maximum(x, floor)`` for a Python float ``floor``, elementwise; NaN stays NaN."""
    if _is_torch(xp):
        # array-api-compat's maximum(tensor, float) asks torch.result_type for the
        # dtype, which torch.compile cannot trace (a graph break at every call).
        return sys.modules["torch"].clamp_min(x, floor)
    return xp.maximum(x, floor)


def readout(h, C, xp, form="matmul"):
    """``sum(h * C[..., None, :], -1)``: a state ``h`` ``[..., N, d]`` read out by ``C`` ``[..., d]``, ``[..., N]``.

    ``form`` (:data:`~ssm_core.plan.READOUT_FORMS`): eager, one batched product
    beats a multiply and a sum on large states (2x in torch, 10x in NumPy at
    ``[32, 256, 16]``); on small ones the product's reshapes cost more than it
    saves, and ``"vecdot"`` (the standard's, one kernel in torch) does better;
    where a compiler fuses the multiply and the sum into the chain that makes
    ``h``, ``"sum"`` does, as the product would be a kernel of its own.
    """
    if form == "sum":
        return xp.sum(h * C[..., None, :], axis=-1)  # [..., N]
    if form == "vecdot":
        if _is_torch(xp):
            return sys.modules["torch"].linalg.vecdot(h, C[..., None, :])  # [..., N]; array-api-compat's moves axes first
        return xp.vecdot(h, C[..., None, :], axis=-1)  # [..., N]
    return (h @ C[..., None])[..., 0]  # [..., N]
