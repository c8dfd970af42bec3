"""Sequence primitives: the diagonal linear recurrence, and cutting time into blocks.

Time is axis 0 here, and everything is written against the array API
standard. The recurrence has a sequential and a parallel (log-depth) form;
which one is faster depends on the hardware (on a few CPU cores the
sequential form, on a GPU the parallel one), so a binding's backend chooses
(:meth:`ssm_core.backend.Backend.scan_method`).
"""

from __future__ import annotations

from ._array import muladd, unstack

__all__ = ["linear_recurrence", "contiguous", "time_blocks", "RECURRENCE_METHODS"]

RECURRENCE_METHODS = ("loop", "parallel")


def linear_recurrence(a, b, h0, xp, method: str = "loop"):
    """All states of ``h_t = a_t * h_{t-1} + b_t``, ``t = 0..T-1``, from ``h_{-1} = h0``.

    ``a`` and ``b`` are ``[T, ...]`` (``a`` may broadcast against ``b``),
    ``h0`` broadcasts against ``b[0]``. Returns ``[T, ...]``; the last entry
    is the final state. ``method="loop"`` does exactly the arithmetic of T
    single steps; ``"parallel"`` combines the associative pairs ``(a, b)`` in
    ``log2(T)`` rounds (Hillis-Steele), multiplying decays only (no division,
    no growth), so it is as safe on long sequences.
    """
    T = b.shape[0]
    if method == "loop":
        states = []
        h = h0
        # unstack, not a[t]: autograd's gradient of each index is a zero-filled full-size array.
        for a_t, b_t in zip(unstack(a, 0, xp), unstack(b, 0, xp)):
            h = muladd(a_t, h, b_t, xp)  # [...]
            states.append(h)
        return xp.stack(states, axis=0)  # [T, ...]
    if method != "parallel":
        raise ValueError(f"linear_recurrence: method must be one of {RECURRENCE_METHODS}, got {method!r}")
    a = a * xp.ones_like(b)  # [T, ...]: materialise a broadcast decay
    b = xp.concat((a[:1, ...] * h0 + b[:1, ...], b[1:, ...]), axis=0)  # fold h0 into the first step
    offset = 1
    while offset < T:
        # (a, b)_t <- (a, b)_{t-offset} followed by (a, b)_t, for t >= offset
        b = xp.concat((b[:offset, ...], a[offset:, ...] * b[:-offset, ...] + b[offset:, ...]), axis=0)
        a = xp.concat((a[:offset, ...], a[offset:, ...] * a[:-offset, ...]), axis=0)
        offset *= 2
    return b


def contiguous(x, xp):
    """``x`` laid out row-major (a copy only when it is not): matrix products and
    transforms over a permuted view are several times slower."""
    return xp.reshape(xp.reshape(x, (-1,)), tuple(x.shape))


def time_blocks(x, block: int, xp) -> list:
    """``x`` ``[T, ...]`` cut along time into arrays of ``block`` steps (the last one shorter).

    One reshape and unstack rather than ``T / block`` slices: under autograd
    each slice's gradient is a zero-filled array of the whole ``x``.
    """
    T = x.shape[0]
    count = -(-T // block)
    if count <= 1:
        return [x]
    pad = count * block - T  # zeros that make the reshape whole, cut off the last block again
    if pad:
        zeros = xp.zeros((pad,) + tuple(x.shape[1:]), dtype=x.dtype, device=getattr(x, "device", None))
        x = xp.concat((x, zeros), axis=0)  # [count * block, ...]
    blocks = list(unstack(xp.reshape(x, (count, block) + tuple(x.shape[1:])), 0, xp))  # count x [block, ...]
    if pad:
        blocks[-1] = blocks[-1][: block - pad, ...]  # [block - pad, ...]
    return blocks
