"""A binding's backend: what it knows of its array library, and the :class:`~ssm_core.plan.Plan` of each call.

Every binding holds one :class:`Backend`: torch's in ``tracetorch``, NumPy's,
CuPy's, MLX's and array-api-strict's in ``backends``. The defaults here are
the array API standard's forms and the choices measured on CPU cores; a
backend overrides what was measured otherwise for its library or device (the
parallel recurrence on GPUs, MLX's CPU build stepping S4/S5, torch's forms
of ``expm1`` under autograd and inside a compiler). A binding's call asks
:meth:`Backend.plan` once and passes the plan on; the pure functions decide
nothing from a library's name or a device.
"""

from __future__ import annotations

import math

from . import fused
from .fused import TRAINING_WEIGHT, BlockCompiler
from .plan import SCAN_BLOCK, Plan
from .selective import selective_block

__all__ = ["Backend"]

_STANDARD = Plan()
_OVERWRITING = Plan(inplace=True)


class Backend:
    """One library's arrays, and how calls on them run (see ``backends/_layer.py`` for the rest of the contract).

    A subclass names ``name`` and ``xp``. A library with a compiler defines
    ``compile_block(key)`` (a compiled :func:`ssm_core.selective_block` taking
    one :class:`~ssm_core.selective.BlockInputs`), ``compiler_name``,
    ``fused_block`` (the compiled block's length) and ``compile_auto``
    (whether the automatic policy of :mod:`ssm_core.fused` compiles).
    """

    name: str
    xp = None
    compile_block = None  # no compiler: S6/Mamba scans run eagerly
    compiler_name = None  # the library's name stands for it
    fused_block = SCAN_BLOCK
    compile_auto = False

    reads_torch_pickles = False  # whether read_tensors reads pytorch_model.bin
    # Whether a call may overwrite the temporaries it makes (Plan.inplace): arrays that are
    # mutable, and that no autograd records. array-api-strict's, whose in-place operators
    # check the standard's rules; not NumPy's, which gained nothing measurable from it (it
    # has no fused multiply-add, so the passes over memory are the same).
    overwrites_temporaries = False

    def read_tensors(self, file) -> dict:
        """``{name: array}`` of one safetensors file, as this library's arrays: through NumPy, unless overridden."""
        from .pretrained import read_safetensors

        return {name: self.asarray(value) for name, value in read_safetensors(file).items()}

    def finish(self, arrays) -> None:
        """Make a step's results usable (eager libraries: nothing to do)."""

    def synchronize(self) -> None:
        """Wait for queued work (libraries that do not queue: nothing to do)."""

    # ------------------------------------------------------------- the plan

    def plan(self, spec, x, params, sequence: bool, compiled=None, config=None, grad=None, state=()) -> Plan:
        """How a call of layer ``spec`` on ``x`` (features last; ``[T, ..., N]`` for a ``sequence``) runs.

        ``params`` are the parameters the call uses; ``compiled``: a scan's
        switch for the compiled S6/Mamba block (see :mod:`ssm_core.fused`);
        ``config``: the layer's config, whose discretization a compiled block
        is made and keyed for (None: the default zero-order hold); ``grad``:
        whether autograd records the call, when the caller knows it already,
        else asked of ``x``, ``params`` and ``state`` (the arrays of the call's state record).
        """
        if grad is None:
            grad = self.records_gradients(x, params, state)
        # One step's selective state: the batch times A_log's [width, d_state] (Mamba's width is expand * N).
        state_elements = math.prod(x.shape[1 if sequence else 0 : -1]) * math.prod(params.A_log.shape)
        plan = self.forms(x, grad, spec.time_invariant, state_elements)
        if not sequence:
            return plan
        plan = plan._replace(method=self.scan_method(spec.time_invariant, x))
        if spec.time_invariant:
            return plan
        rule = "zoh" if config is None else config.discretization
        block_fn, block = self.scan_block(x, tuple(params.A_log.shape), compiled, plan, grad, rule)
        return plan._replace(block=block, block_fn=block_fn)

    def records_gradients(self, x, params, state=()) -> bool:
        """Whether autograd records a call on ``x``, ``params`` and ``state`` (libraries without autograd: never)."""
        return False

    def forms(self, x, grad: bool, time_invariant: bool = False, state_elements: int = 0) -> Plan:
        """A plan naming the forms of the operations whose best form depends on the library (the standard's here).

        ``time_invariant``: the call discretizes parameter-sized arrays only (S4, S5), not input-sized ones;
        ``state_elements``: the size of one step's selective state (S6, Mamba).
        """
        return _OVERWRITING if self.overwrites_temporaries else _STANDARD

    def scan_method(self, time_invariant: bool, xs) -> str:
        """The scan method for ``xs`` ``[T, ..., N]``.

        S4/S5 (``time_invariant``): ``"auto"``, the chunked matrix-product
        form (stepping short or non-finite sequences). S6/Mamba: the blocked
        ``"loop"``, fastest on CPU cores; GPUs take the log-depth ``"parallel"``.
        """
        return "auto" if time_invariant else "loop"

    # ------------------------------------------------------------- the compiled block

    @property
    def block_compiler(self) -> BlockCompiler:
        """This backend's compiled S6/Mamba blocks (made on first use)."""
        compiler = self.__dict__.get("_block_compiler")
        if compiler is None:
            compiler = self.__dict__["_block_compiler"] = BlockCompiler(
                "the S6/Mamba scan block", self.compiler_name or self.name, self.compile_block, self.compile_auto
            )
        return compiler

    def compile_skipped(self, xs) -> bool:
        """Whether a scan of ``xs`` runs the eager block whatever the policy says."""
        return False

    def block_key(self, xs, batch: int, width: int, d_state: int) -> tuple:
        """What a compiled block is specialised on: one per key. ``width``: the features the block runs on."""
        return (self.fused_block, batch, width, d_state, xs.dtype)

    def scan_block(self, xs, state_shape: tuple, compiled, plan: Plan, grad: bool = False, discretization: str = "zoh"):
        """``(block_fn, block)`` for an S6/Mamba scan of ``xs`` ``[T, ..., N]`` (``block_fn`` None: eager).

        ``state_shape``: ``(width, d_state)``, the shape of ``A_log``: the
        block runs on ``width`` features (Mamba's inner width, ``expand * N``).

        The eager block runs ``plan``: the first call's reference and what a
        failing compiled block falls back to. A checkpoint's recomputation
        makes the choices its forward pass made (:func:`ssm_core.fused.checkpoint_contexts`).
        The key of a compiled block ends with the ``discretization`` it runs:
        one block per rule, each checked against the eager block of its rule.
        """
        if xs.shape[0] == 0 or self.compile_skipped(xs):
            return None, SCAN_BLOCK
        pinned = fused.replayed_choice((None, SCAN_BLOCK))
        if pinned is not None:
            return pinned
        batch = math.prod(xs.shape[1:-1])
        width, d_state = state_shape
        key = (*self.block_key(xs, batch, width, d_state), discretization)
        # Under autograd a compiled block saves more per element-step (its backward): it pays for itself sooner.
        work = xs.shape[0] * batch * width * d_state * (TRAINING_WEIGHT if grad else 1)
        xp = self.xp

        def eager(inputs):
            return selective_block(inputs, xp, plan)

        block_fn = self.block_compiler.select(key, work, compiled, eager)
        choice = block_fn, (SCAN_BLOCK if block_fn is None else self.fused_block)
        fused.record_choice(choice)
        return choice
