"""S6/Mamba compiled with ``torch.compile``: the scan's time block, and ``TTcompile()``'s step.

Both compile ``ssm_core``'s own functions, nothing written twice: the scan
compiles :func:`ssm_core.selective_block` (C++/OpenMP through inductor on
CPUs, Triton on CUDA GPUs), ``TTcompile()`` the layer's whole step. When to
compile, and the eager fallback, is :mod:`ssm_core.fused`'s policy.

Each key (shapes, dtype, device) gets a function with a code object of its
own: dynamo keeps compiled graphs per code object, at most
``torch._dynamo.config.recompile_limit`` of them, and would silently run
eagerly past that in a model of many layer sizes.
"""

from __future__ import annotations

import math
import types

import array_api_compat.torch as xp_torch
import torch

import ssm_core
from ssm_core.fused import TRAINING_WEIGHT, BlockCompiler, compile_mode
from ssm_core.selective import SCAN_BLOCK

__all__ = ["FUSED_BLOCK", "scan_block", "step_function", "block_compiler", "step_compiler"]

# Steps per compiled block: the block is unrolled, so longer blocks compile
# longer; 8 ran as fast as 16 and 32 and compiled in a third of 32's time (see the README).
FUSED_BLOCK = 8


def _own_code(fn):
    """``fn`` with a code object of its own, so dynamo's cache for it is its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# ----------------------------------------------------------------------------- the scan's block


def _flat_block(u, dt, B, C, h, A, inv_A, D):
    # One batch axis: a compiled block then serves every batch shape of the same size.
    L, N, d = u.shape[0], u.shape[-1], h.shape[-1]
    ys, h_L = ssm_core.selective_block(
        u.reshape(L, -1, N), dt.reshape(L, -1, N), B.reshape(L, -1, d), C.reshape(L, -1, d),
        h.reshape(-1, N, d), A, inv_A, D, xp_torch,
    )  # [L, batch, N], [batch, N, d]
    return ys.reshape(u.shape), h_L.reshape(h.shape)  # [L, ..., N], [..., N, d]


def _compile_block(key):
    compiled = torch.compile(_own_code(_flat_block), fullgraph=True, dynamic=False)

    def block(*arrays):
        # Dynamo specialises a graph on its inputs' strides and on which of
        # them require grad. Contiguous inputs, and under autograd all inputs
        # requiring grad (a detached copy where one does not: its gradient is
        # dropped), make one graph without autograd and one with it per key,
        # whether the sequence was padded, the state is fresh or the input a leaf.
        arrays = [a.contiguous() for a in arrays]  # shapes unchanged
        if torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
            arrays = [a if a.requires_grad else a.detach().requires_grad_() for a in arrays]
        return compiled(*arrays)

    return block


block_compiler = BlockCompiler("the S6/Mamba scan block", "torch.compile", _compile_block)


def scan_block(xs: torch.Tensor, d_state: int, compiled, method: str):
    """``(block_fn, block)`` for :func:`ssm_core.selective_scan` on ``xs`` ``[T, ..., N]``.

    ``block_fn`` is None (the eager block; ``block`` the eager length) unless
    the policy picks the compiled one; ``method`` is the eager block's, which
    a failing compiled block falls back to. Inside someone else's
    ``torch.compile`` the eager code is what gets traced: their compile fuses it.
    """
    if torch.compiler.is_compiling() or xs.device.type not in ("cpu", "cuda") or xs.shape[0] == 0:
        return None, SCAN_BLOCK
    batch = math.prod(xs.shape[1:-1])
    key = (FUSED_BLOCK, batch, xs.shape[-1], d_state, xs.dtype, xs.device)
    work = xs.shape[0] * batch * xs.shape[-1] * d_state * (TRAINING_WEIGHT if torch.is_grad_enabled() else 1)
    def eager(u, dt, B, C, h, A, inv_A, D):
        return ssm_core.selective_block(u, dt, B, C, h, A, inv_A, D, xp_torch, method)

    block_fn = block_compiler.select(key, work, compiled, eager)
    return block_fn, (SCAN_BLOCK if block_fn is None else FUSED_BLOCK)


# ----------------------------------------------------------------------------- TTcompile's step


def _step_of(spec):
    def step(x, state, params, decay):
        return spec.step(x, state, params, xp=xp_torch, prepared=decay)

    return step


def _compile_step(key):
    return torch.compile(_own_code(_step_of(ssm_core.LAYERS[key[0]])), fullgraph=True, dynamic=False)


step_compiler = BlockCompiler("the S6/Mamba step", "torch.compile", _compile_step)


def step_function(spec, config, x: torch.Tensor):
    """``step(x, state, params, decay)`` for ``TTcompile()``: compiled, unless ``SSM_COMPILE=0`` or compiling failed.

    One per layer kind, config, input shape, dtype and device; layers of one
    kind and size share it (the weights are arguments, not constants).
    """
    eager = _step_of(spec)
    if torch.compiler.is_compiling():
        return eager
    key = (spec.name, config, tuple(x.shape), x.dtype, x.device)
    step = step_compiler.select(key, 0, compile_mode() != "eager", eager)
    return eager if step is None else step
