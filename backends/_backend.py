"""The base of the tiny backend classes: the defaults a library overrides where it differs."""

from __future__ import annotations

import math

from ssm_core.fused import BlockCompiler
from ssm_core.selective import SCAN_BLOCK, selective_block

__all__ = ["Backend"]


class Backend:
    """How to make, move and synchronise one library's arrays (see ``backends/_layer.py``).

    A subclass names ``name``, ``xp``, ``array_types`` and ``default_dtype``,
    and defines ``dtype``, ``asarray``, ``to_numpy`` and ``draws``. A library
    with a compiler defines ``compile_block(key)`` (a compiled
    :func:`ssm_core.selective_block`), ``compiler_name``, ``fused_block`` (the
    compiled block's length) and ``compile_auto`` (whether the automatic
    policy of :mod:`ssm_core.fused` compiles).
    """

    compile_block = None  # no compiler: S6/Mamba scans run eagerly
    compiler_name = None  # the library's name stands for it
    fused_block = SCAN_BLOCK
    compile_auto = False

    def finish(self, arrays) -> None:
        """Make a step's results usable (eager libraries: nothing to do)."""

    def synchronize(self) -> None:
        """Wait for queued work (libraries that do not queue: nothing to do)."""

    def scan_block(self, xs, d_state: int, compiled, method: str):
        """``(block_fn, block)`` for an S6/Mamba scan of ``xs`` ``[T, ..., N]`` (``block_fn`` None: eager)."""
        compiler = self.__dict__.get("_compiler")
        if compiler is None:
            compiler = self._compiler = BlockCompiler(
                "the S6/Mamba scan block", self.compiler_name or self.name, self.compile_block, self.compile_auto
            )
        if xs.shape[0] == 0:
            return None, SCAN_BLOCK
        xp = self.xp

        def eager(u, dt, B, C, h, A, inv_A, D):
            return selective_block(u, dt, B, C, h, A, inv_A, D, xp, method)

        batch = math.prod(xs.shape[1:-1])
        key = (self.fused_block, batch, xs.shape[-1], d_state, xs.dtype)
        block_fn = compiler.select(key, xs.shape[0] * batch * xs.shape[-1] * d_state, compiled, eager)
        return block_fn, (SCAN_BLOCK if block_fn is None else self.fused_block)
