"""Torch as a backend like NumPy's, CuPy's and MLX's: what torch's layers run their calls by."""

from __future__ import annotations

import array_api_compat.torch as xp_torch
import torch

import ssm_core
from ssm_core.backend import Backend

from .. import _compat
from . import _fused

__all__ = ["TorchBackend", "backend"]


class TorchBackend(Backend):
    """torch tensors on CPUs and CUDA GPUs, with ``torch.compile`` for the S6/Mamba scan block."""

    name = "torch"
    xp = xp_torch
    compiler_name = "torch.compile"
    # Steps per compiled block: the block is unrolled, so longer blocks compile
    # longer; 8 ran as fast as 16 and 32 and compiled in a third of 32's time (see the README).
    fused_block = 8

    def draws(self, dtype: torch.dtype) -> ssm_core.Draws:
        """Random sources for ``ssm_core``'s init formulas, from torch's global generator."""
        return ssm_core.Draws(
            xp=xp_torch,
            dtype=dtype,
            uniform=lambda shape: torch.rand(shape, dtype=dtype),
            normal=lambda shape: torch.randn(shape, dtype=dtype),
        )

    reads_torch_pickles = True

    def read_tensors(self, file):
        name = str(file)
        if name.endswith(".bin"):
            return torch.load(name, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        return load_file(name)

    def records_gradients(self, x, params, state=()) -> bool:
        # The states too: a held state that requires grad (a stateless form's, a loaded one) puts
        # every array made from it in autograd's graph, Mamba's conv buffer the whole step's.
        return torch.is_grad_enabled() and (
            x.requires_grad or any(a is not None and a.requires_grad for arrays in (params, state) for a in arrays)
        )

    def forms(self, x, grad, time_invariant=False, state_elements=0):
        return _fused.forms(x, grad, time_invariant, state_elements)

    def scan_method(self, time_invariant, xs):
        if time_invariant and torch.compiler.is_compiling():
            # A traced graph (torch.compile, torch.export) cannot branch on the data:
            # the chunked form always, where a NaN or Inf reaches its chunk's earlier outputs too.
            return "chunked"
        if not time_invariant and xs.is_cuda:
            return "parallel"
        return super().scan_method(time_invariant, xs)

    @property
    def block_compiler(self):
        return _fused.block_compiler  # module-level: read at each call, so a reset or a replacement takes effect

    def compile_skipped(self, xs):
        # Inside someone else's torch.compile the eager code is what gets traced (their compile
        # fuses it), and under a torch.func transform it is what gets transformed.
        return torch.compiler.is_compiling() or xs.device.type not in ("cpu", "cuda") or _fused.functorch_active()

    def block_key(self, xs, batch, width, d_state):
        return (*super().block_key(xs, batch, width, d_state), xs.device, _compat.autocast_dtype(xs.device.type))


backend = TorchBackend()
