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
Its first call is checked against the eager block on the same inputs
(outputs, final state, and gradients where autograd records): a compiler or
its on-disk cache can be wrong without raising (a kernel cached for another
CPU has given NaN), and a policy that compiles on its own initiative must not
pass that on. Where compiling fails (no C++ compiler, an unsupported
platform) or the check finds a difference, that key runs eagerly from then
on, with the eager numbers, after one warning. Only the compiler's own
failures count: an exception that is the caller's, or control flow of the
library's (a checkpoint ending its recomputation early), passes through.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from typing import Callable, Optional

from ._array import namespace

__all__ = [
    "ENV_VAR", "AUTO_WORK", "TRAINING_WEIGHT", "CompileFallbackWarning", "compile_mode", "disagreement",
    "check_outputs", "BlockCompiler", "checkpoint_contexts", "replayed_choice", "record_choice",
]

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
    """A compiled block is not used (compiling it failed, or it disagreed with eager): it runs eagerly (slower)."""


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


def disagreement(got, expected, labels=None, precision=None) -> Optional[str]:
    """Why the arrays ``got`` differ from ``expected`` beyond rounding, or None where they agree.

    Pairs of arrays (None pairs with None) agree when they have the same
    shape and dtype, NaN or infinity in the same places, and elsewhere
    differ by at most ``sqrt(eps)`` of ``expected``'s largest magnitude
    (3.5e-4 in float32, 1.5e-8 in float64). A reordered computation (a
    compiler fusing and reassociating) differs by some ulp per operation,
    growing with the square root of the terms a sum adds: orders of
    magnitude below that bound for one block's results and gradients. What
    the bound is meant to catch (a kernel built for another CPU, a wrong
    lane, a wrong formula) gives NaN or errors of order one. ``precision``:
    the dtype whose ``eps`` sets the bound where the computation rounds to a
    narrower one than its results' (autocast's matrix products).
    """
    for index, (a, b) in enumerate(zip(got, expected)):
        label = labels[index] if labels is not None else f"result {index}"
        if a is None or b is None:
            if (a is None) != (b is None):
                return f"{label}: {'missing' if a is None else 'present'}, unlike the eager block's"
            continue
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            return f"{label}: {a.dtype} {tuple(a.shape)} where the eager block has {b.dtype} {tuple(b.shape)}"
        if math.prod(a.shape) == 0:
            continue
        xp = namespace(a, b)
        finite = xp.isfinite(b)  # [a shape]
        differs = xp.isfinite(a) != finite  # [a shape]
        if bool(xp.any(differs)):
            count = int(xp.sum(xp.astype(differs, xp.int64)))
            return f"{label}: NaN or infinity in {count} of {math.prod(a.shape)} places where the eager block's " \
                   f"value is finite, or the other way round"
        zero = xp.zeros_like(b)
        error = float(xp.max(xp.abs(xp.where(finite, a - b, zero))))
        scale = float(xp.max(xp.abs(xp.where(finite, b, zero))))
        bound = math.sqrt(float(xp.finfo(b.dtype if precision is None else precision).eps))
        if error > bound * scale:
            relative = error / scale if scale else math.inf
            return f"{label}: differs by {error:.3g}, {relative:.3g} of its largest value (allowed {bound:.2g})"
    return None


def check_outputs(compiled_block: Callable, eager: Callable, args) -> Optional[str]:
    """The default first-call check: :func:`disagreement` of both blocks' results on ``args``."""
    return disagreement(compiled_block(*args), eager(*args), ("outputs", "final state"))


class BlockCompiler:
    """Compiled block functions for one library, one per key, made on demand, checked once and kept.

    Parameters
    ----------
    what : str
        What is compiled, for the fallback warning (``"the S6/Mamba scan block"``).
    library : str
        The compiler, for the fallback warning (``"torch.compile"``, ``"mx.compile"``).
    compile : callable or None
        ``compile(key)`` returns the compiled block for ``key``; None where the
        library has no compiler (``compiled=True`` then warns once and runs eagerly).
        Any exception it raises is a compile failure.
    auto : bool, default True
        Whether the automatic policy may compile at all (False where
        compiling measured no faster, e.g. MLX on CPUs).
    is_failure : callable, optional
        ``is_failure(error)``: whether an exception raised by a compiled
        block's call is the compiler's failure (the call then falls back to
        eager). Any other exception passes through untouched: it is the
        caller's, or the library's own control flow. Default: every
        ``Exception`` (a library whose compiler raises no types of its own).
    check : callable, optional
        ``check(compiled_block, eager, args)``: None where the compiled block
        agrees with the eager one on ``args``, else why not. It must leave
        no trace (no autograd history, no state). Default :func:`check_outputs`.
    """

    def __init__(
        self, what: str, library: str, compile: Optional[Callable], auto: bool = True, *,
        is_failure: Optional[Callable] = None, check: Optional[Callable] = None,
    ):
        self.what = what
        self.library = library
        self._compile = compile
        self.auto = auto
        self._is_failure = is_failure or (lambda error: True)
        self._check = check or check_outputs
        self.failed: Optional[str] = None  # why this library has no compiled blocks at all
        self.failed_keys: dict = {}  # key -> why that key's block runs eagerly for good
        self._blocks: dict = {}
        self._checked: set = set()
        self._work: dict = {}

    def compiled_keys(self) -> list:
        """The keys whose compiled block has passed its first-call check and runs."""
        return [key for key in self._blocks if key in self._checked and key not in self.failed_keys]

    def select(self, key, work: float, compiled: Optional[bool], eager: Callable) -> Optional[Callable]:
        """The block function for a scan of ``work`` element-steps with block key ``key``.

        None means: run the eager block. ``eager`` is the eager block with the
        compiled one's signature: the reference of the first-call check, and
        what a failing compiled call falls back to.
        """
        mode = compile_mode(compiled)
        if mode == "eager":
            return None
        if self._compile is None or self.failed is not None:
            if mode == "always" and self.failed is None:
                self._warn(f"{self.what} runs eagerly on {self.library}: compiled=True has no compiler to use there")
                self.failed = "no compiler"
            return None
        if key in self.failed_keys:
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
        except Exception as error:  # making it is compiling: whatever fails there is the compiler's
            self.fail(key, error)
            return None
        block = self._blocks[key] = self._guard(key, compiled_block, eager)
        return block

    def _guard(self, key, compiled_block: Callable, eager: Callable) -> Callable:
        def block(*args):
            if key in self.failed_keys:
                return eager(*args)
            try:
                if key not in self._checked:
                    problem = self._check(compiled_block, eager, args)
                    if problem is not None:
                        self.fail(key, f"its first results differ from the eager block's, {problem}")
                        return eager(*args)
                    self._checked.add(key)
                return compiled_block(*args)
            except Exception as error:
                if not self._is_failure(error):
                    raise  # the caller's error, or control flow (a checkpoint's early stop): not ours to catch
                # Eager is the reference: if it fails too, the error is the caller's, not the compiler's.
                result = eager(*args)
                self.fail(key, error)
                return result

        return block

    def fail(self, key, reason) -> None:
        """Run ``key``'s block eagerly from now on, after one warning; ``reason`` (text, or the
        exception) says why. Also for what the binding finds wrong outside a block's call (its backward)."""
        if isinstance(reason, BaseException):
            reason = f"compiling it failed: {type(reason).__name__}: {(str(reason).strip().splitlines() or [''])[0]}"
        first = key not in self.failed_keys
        self.failed_keys[key] = reason
        self._blocks.pop(key, None)
        if first:
            self._warn(
                f"{self.what} compiled with {self.library} for {key} is not used ({reason}); that block "
                f"runs eagerly from now on, with the eager results, more slowly. "
                f"Set {ENV_VAR}=0 (or pass compiled=False) to skip compiling."
            )

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, CompileFallbackWarning, stacklevel=_caller_stacklevel())

    def reset(self) -> None:
        """Forget compiled blocks, checks, work counts and failures (the next calls decide afresh)."""
        self.failed = None
        self.failed_keys.clear()
        self._blocks.clear()
        self._checked.clear()
        self._work.clear()


# ----------------------------------------------------------------------------- a checkpoint's recomputation

# A checkpoint's recomputation must save the tensors its forward pass saved,
# and a compiled block saves other ones than the eager block: where the
# automatic policy switched between a region's forward pass and its
# recomputation (another region's forward pass in between), the
# recomputation would differ. A checkpoint records the choices of its
# forward pass, and its recomputation replays them.
_pins = threading.local()


class _Pinning:
    """Entered around a checkpointed region's forward pass (``record``) or its recomputation (``replay``)."""

    def __init__(self, kind: str, choices: list):
        self.kind, self.choices = kind, choices

    def __enter__(self):
        entry = self.choices if self.kind == "record" else iter(self.choices)
        _pins.__dict__.setdefault("stack", []).append((self.kind, entry))

    def __exit__(self, *exc):
        _pins.stack.pop()


def checkpoint_contexts():
    """``(forward, recompute)`` context managers: a recomputation chooses each block as its forward pass did.

    A binding records each scan's choice with :func:`record_choice` and asks
    :func:`replayed_choice` first. Both may be entered again (a second
    backward with ``retain_graph=True`` recomputes again).
    """
    choices: list = []
    return _Pinning("record", choices), _Pinning("replay", choices)


def replayed_choice(default=(None, None)):
    """In a recomputation, the choice its forward pass made at this point (``default`` past its end); else None."""
    for kind, entry in reversed(_pins.__dict__.get("stack", ())):
        if kind == "replay":
            return next(entry, default)
    return None


def record_choice(choice) -> None:
    """Record ``choice`` (any object but None) for every checkpointed forward pass this call is inside."""
    for kind, entry in _pins.__dict__.get("stack", ()):
        if kind == "record":
            entry.append(choice)


# Packages whose frames a warning skips to name the user's line: this
# project's, and the libraries its calls pass through (nn.Module.__call__,
# a checkpoint's recomputation inside autograd).
_LIBRARY_PACKAGES = ("ssm_core", "tracetorch", "backends", "torch", "mlx", "array_api_compat", "contextlib")


def _caller_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel``, from our caller, of the first frame outside :data:`_LIBRARY_PACKAGES`."""
    prefixes = []
    for name in _LIBRARY_PACKAGES:
        module = sys.modules.get(name)  # a package not loaded has no frames on the stack
        origin = getattr(module, "__file__", None)
        if origin:
            package = os.path.basename(origin) == "__init__.py"
            prefixes.append(os.path.dirname(origin) + os.sep if package else origin)
    prefixes = tuple(prefixes)
    frame = sys._getframe(1)  # the frame that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(prefixes):
        frame = frame.f_back
        level += 1
    return level
