"""How one call runs: the :class:`Plan` a binding's backend makes and the pure functions follow.

The functions of ``ssm_core`` compute the same numbers however they run;
*how* (which scan method, which time blocks, a compiled block or the eager
one, which form of an operation whose speed or accuracy depends on the
device, on autograd or on a compiler) is the binding's question, asked of its
:class:`~ssm_core.backend.Backend` once per call. Called without a plan, the
functions run the array API standard's forms.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

__all__ = ["Plan", "SCAN_BLOCK", "EXPM1_FORMS", "READOUT_FORMS", "with_method"]

# Steps per block of the S6/Mamba sequence scan. Eager, the loop form runs step by step
# either way and the parallel form makes [L, ..., N, d] arrays per block: 16-64
# measured best on CPU. Compiled blocks are unrolled: their length is the backend's.
SCAN_BLOCK = 32

# expm1 in the zero-order hold (see discretize.zoh_terms): the library's own;
# tanh(z/2) (exp(z) + 1), from two kernels that are vectorised where expm1 is not;
# exp(z) - 1 with a series near 0, for compilers that lower expm1 to exp(z) - 1.
EXPM1_FORMS = ("expm1", "tanh", "exp")
# A state read out by C: one batched matrix product, a multiply and a sum (which a compiler
# fuses), or the standard's vecdot (see _array.readout).
READOUT_FORMS = ("matmul", "sum", "vecdot")


class Plan(NamedTuple):
    """The choices of one call.

    ``method``: the scan method (None: the layer's default); ``block``: steps
    per time block of an S6/Mamba scan; ``block_fn(inputs)``: a compiled
    :func:`~ssm_core.selective.selective_block` for blocks of ``block`` steps
    (None: the eager block); ``expm1`` and ``readout``: the forms of those
    operations (:data:`EXPM1_FORMS`, :data:`READOUT_FORMS`); ``inplace``:
    the call may overwrite the temporary arrays it makes itself (never its
    inputs), for libraries whose arrays are mutable, where nothing records
    the call for a backward pass: S4's, S6's and Mamba's steps and eager
    scan blocks do. The numbers are the same either way.
    """

    method: Optional[str] = None
    block: int = SCAN_BLOCK
    block_fn: Optional[Callable] = None
    expm1: str = "expm1"
    readout: str = "matmul"
    inplace: bool = False


def with_method(plan: Optional[Plan], method: Optional[str]) -> Plan:
    """``plan`` (or the default plan) with ``method`` where one is given: a scan's ``method=`` shorthand."""
    plan = Plan() if plan is None else plan
    return plan if method is None else plan._replace(method=method)
