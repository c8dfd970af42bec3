"""When the S6/Mamba sequence scans run a compiled block, and what happens when compiling fails.

:func:`~ssm_core.selective.selective_block` is written in the form compilers
fuse; each binding compiles it with its library's own compiler
(``torch.compile`` in ``tracetorch``, ``mx.compile`` in ``backends.mlx``) and
asks one :class:`BlockCompiler` per call which block function to use. The
policy is the same everywhere, so it lives here, free of any array library:

- ``compiled=False`` (or ``SSM_COMPILE=0``): the eager block, always.
- ``compiled=True`` (or ``SSM_COMPILE=1``): the compiled block from the first call.
- ``compiled=None`` (the default, ``SSM_COMPILE=auto``): eager until the
  scans of one block shape have done :data:`AUTO_WORK` of eager work, then
  compiled. A compile costs seconds once per shape and process, and saves a
  few nanoseconds per state element and step: one-off scans never pay for it,
  a training loop pays for it within about ten steps at the sizes measured
  below. Waiting until the eager work equals the compile's cost keeps the
  total within about twice that of the best choice made in hindsight,
  however many calls follow.

A compiled block is made once per key (block shape, dtype, device) and kept.
Where compiling fails (no C++ compiler, an unsupported platform), the block
runs eagerly from then on, with the same numbers, after one warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

__all__ = ["ENV_VAR", "AUTO_WORK", "TRAINING_WEIGHT", "CompileFallbackWarning", "compile_mode", "BlockCompiler"]

ENV_VAR = "SSM_COMPILE"

# Eager work, in state elements times steps (T * batch * N * d_state), of one
# block shape after which the automatic policy compiles it. Measured with
# torch 2.13 on two CPU cores (T = 1024, batch 8, N = 256, d_state = 16): the
# first compiled call of a process takes about 7 s with inductor's disk cache
# warm (30 s more once per machine, cold), and the compiled block saves about
# 5 ns per element-step forward, 20 ns forward and backward. 7 s / 5 ns is
# about 1.4e9: some 40 such sequences in inference. Under autograd the binding
# counts each element-step TRAINING_WEIGHT times (20 ns / 5 ns): some 10 training steps.
AUTO_WORK = 1.4e9
TRAINING_WEIGHT = 4

_MODES = {
    "0": "eager", "false": "eager", "off": "eager",
    "1": "always", "true": "always", "on": "always",
    "auto": "auto", "": "auto",
}


class CompileFallbackWarning(RuntimeWarning):
    """Compiling a scan block failed: scans run eagerly (same numbers, slower)."""


def compile_mode(compiled: Optional[bool] = None) -> str:
    """``"eager"``, ``"always"`` or ``"auto"``: the ``compiled`` argument, else ``SSM_COMPILE``, else auto."""
    if compiled is not None:
        if not isinstance(compiled, bool):
            raise TypeError(f"compiled must be None, True or False, got {compiled!r}")
        return "always" if compiled else "eager"
    value = os.environ.get(ENV_VAR, "auto")
    mode = _MODES.get(value.strip().lower())
    if mode is None:
        raise ValueError(f"{ENV_VAR} must be 0, 1 or auto, got {value!r}")
    return mode


class BlockCompiler:
    """Compiled block functions for one library, one per key, made on demand and kept.

    Parameters
    ----------
    what : str
        What is compiled, for the fallback warning (``"the S6/Mamba scan block"``).
    library : str
        The compiler, for the fallback warning (``"torch.compile"``, ``"mx.compile"``).
    compile : callable or None
        ``compile(key)`` returns the compiled block for ``key``; None where the
        library has no compiler (``compiled=True`` then warns once and runs eagerly).
    auto : bool, default True
        Whether the automatic policy may compile at all (False where
        compiling measured no faster, e.g. MLX on CPUs).
    """

    def __init__(self, what: str, library: str, compile: Optional[Callable], auto: bool = True):
        self.what = what
        self.library = library
        self._compile = compile
        self.auto = auto
        self.failed: Optional[str] = None  # why compiling is off for good in this process
        self._blocks: dict = {}
        self._work: dict = {}

    def select(self, key, work: float, compiled: Optional[bool], eager: Callable) -> Optional[Callable]:
        """The block function for a scan of ``work`` element-steps with block key ``key``.

        None means: run the eager block. ``eager`` is the eager block with the
        compiled one's signature, which a failing compiled call falls back to.
        """
        mode = compile_mode(compiled)
        if mode == "eager":
            return None
        if self._compile is None or self.failed is not None:
            if mode == "always" and self.failed is None:
                self._warn(f"{self.what} runs eagerly on {self.library}: compiled=True has no compiler to use there")
                self.failed = "no compiler"
            return None
        block = self._blocks.get(key)
        if block is not None:
            return block
        if mode == "auto":
            if not self.auto:
                return None
            done = self._work[key] = self._work.get(key, 0.0) + float(work)
            if done < AUTO_WORK:
                return None
        try:
            compiled_block = self._compile(key)
        except Exception as error:  # compiling may fail before the first call too
            self._fail(f"{type(error).__name__}: {error}")
            return None
        block = self._blocks[key] = self._guard(compiled_block, eager)
        return block

    def _guard(self, compiled_block: Callable, eager: Callable) -> Callable:
        def block(*args):
            if self.failed is None:
                try:
                    return compiled_block(*args)
                except Exception as error:
                    # Eager is the reference: if it fails too, the error is the caller's, not the compiler's.
                    result = eager(*args)
                    first_line = (str(error).strip().splitlines() or [""])[0]
                    self._fail(f"{type(error).__name__}: {first_line}")
                    return result
            return eager(*args)

        return block

    def _fail(self, reason: str) -> None:
        first = self.failed is None
        self.failed = reason
        self._blocks.clear()
        if first:
            self._warn(
                f"compiling {self.what} with {self.library} failed ({reason}); it runs eagerly "
                f"from now on, with the same results, more slowly. "
                f"Set {ENV_VAR}=0 (or pass compiled=False) to skip compiling."
            )

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, CompileFallbackWarning, stacklevel=5)

    def reset(self) -> None:
        """Forget compiled blocks, work counts and failures (the next calls decide afresh)."""
        self.failed = None
        self._blocks.clear()
        self._work.clear()
