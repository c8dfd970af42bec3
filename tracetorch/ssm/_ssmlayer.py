"""``tt.ssm.Layer``: the base of the state-space layers, bound to ``ssm_core``.

Besides the binding, it keeps traceTorch 0.19.2's helpers for state-space
layers of the user's own: ``_ensure_state`` with a trailing ``d_state`` axis,
``_state_to_working_dim`` / ``_state_from_working_dim`` and the
``_register_*scale`` parameter helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import ClassVar, Literal, NamedTuple, Optional

import array_api_compat.torch as xp_torch
import torch
from torch import nn

import ssm_core
from ssm_core.checks import check_axis
from ssm_core.layout import (
    StateArguments, check_loaded_state, check_loaded_states_agree, compute_dtype, in_compute_dtype, run, run_step,
    step_axis, zero_states,
)

from .. import _compat
from ..core import Layer as BaseLayer
from ..core._checkpoint import check_not_recomputed_unrestored, outside_backward
from ..core._layer import _SEQUENCE_MODE
from . import _fused
from ._backend import backend as torch_backend

__all__ = ["Layer", "Stateless"]


class _CheckedStep(NamedTuple):
    """What the checks of one step signature found (see ``Layer._checked_step``)."""

    signature: tuple
    out_dtype: torch.dtype
    axis: int  # the input's feature axis
    compute_dtype: torch.dtype
    autocast: Optional[torch.dtype]  # autocast's dtype on the input's device, None where it is off
    direct: bool  # features last and every state held: nothing to move or create
    plans: dict  # {(autograd records the step, a torch.func transform runs): its plan}, filled as they occur


_STATELESS_HINT = (
    "{layer}: {what} cannot carry the hidden state the layer keeps between calls (it would start every call "
    "from zeros). Capture the stateless form instead, which takes and returns the states: "
    "torch.export.export(layer.stateless(), (x, *layer.initial_states(x)))"
)


_UNCHANGED = contextlib.nullcontext()


def _autocast_off(x: torch.Tensor):
    """A context that turns ``torch.autocast`` off on ``x``'s device for the math inside, where it is on.

    Autocast would run the matrix products of S4/S5 (their chunked scans, S5's
    ``x @ B_bar``) in its low precision: they carry the recurrence, whose
    rounding then builds up over time (bfloat16: a relative error of 3e-3 in the
    state after 2000 steps). S4/S5 have no projections around the recurrence
    that autocast could lower, so all of their math runs in float32.
    """
    if _compat.autocast_dtype(x.device.type) is None:
        return _UNCHANGED
    return torch.autocast(x.device.type, enabled=False)


def _log_halvings(value: torch.Tensor) -> torch.Tensor:
    """``log(-log2(value))`` for ``0 < value < 1``: traceTorch 0.19.2's ``mamba_scale``."""
    if not bool(torch.all((value > 0) & (value < 1))):
        raise ValueError(f"a scale must lie strictly between 0 and 1, got {value}")
    return torch.log(-torch.log(value) / math.log(2.0))


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    # Weights come from ssm_core's init formulas: a meta-device Linear skips
    # nn.Linear's own draw (nn.utils.skip_init would too, but imports torch._refs, ~0.5 s).
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


class Layer(BaseLayer):
    r"""The base of traceTorch's state-space layers.

    SSM states carry one more trailing axis than the input (``d_state``, or the
    convolution kernel), so this base creates states with that axis, and moves
    a state's feature axis to the second-to-last position and back.

    Parameters
    ----------
    num_neurons : int
        Number of features on axis ``dim``.
    dim : int, default -1
        Input axis the layer operates along.
    d_state : int, default 1
        Latent state size per feature.

    Notes
    -----
    A concrete layer names its ``ssm_core`` record in ``spec`` and registers
    the parameters ``spec.param_keys`` names; ``forward`` then
    checks the input, creates missing states, runs the pure step of
    ``ssm_core`` in its features-last layout, and stores the new states only
    once the step has succeeded, so an error leaves the states as they were.
    """

    spec: ClassVar[Optional[ssm_core.LayerSpec]] = None
    backend: ClassVar[ssm_core.backend.Backend] = torch_backend  # how each call runs: its plan

    def __init__(self, num_neurons: int, dim: int = -1, d_state: int = 1):
        super().__init__(num_neurons, dim)
        self.d_state = d_state

    # ------------------------------------------------------------- traceTorch 0.19.2 helpers

    def _ensure_state(self, state_name: str, reference_tensor: torch.Tensor):
        r"""Create ``state_name`` as zeros: the input's shape, ``num_neurons`` at ``dim``, ``d_state`` appended."""
        if getattr(self, state_name) is None:
            shape = list(reference_tensor.shape)
            shape[self.dim] = self.num_neurons
            shape.append(self.d_state)
            setattr(self, state_name, reference_tensor.new_zeros(shape))

    def _state_to_working_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        r"""Move a state's feature axis to the second-to-last position."""
        # A state has one more (trailing) axis than the input: a negative dim shifts by one.
        return tensor.movedim(self.dim if self.dim >= 0 else self.dim - 1, -2)

    def _state_from_working_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        r"""Move a state's second-to-last axis back to the feature position."""
        return tensor.movedim(-2, self.dim if self.dim >= 0 else self.dim - 1)

    def _register_scale(self, name: str, value, rank: Literal[0, 1], learnable: bool) -> None:
        r"""Register ``name`` as traceTorch 0.19.2 did: ``raw = log(-log2(value))`` for ``0 < value < 1``,
        read as ``exp(raw)`` (that is, ``-log2(value)``), recovered with ``log`` by ``TTdecompile()``."""
        self._register_parameter(
            name, value, rank, learnable, init_fn=_log_halvings, inverse_fn=torch.log, activation_fn=torch.exp
        )

    def _register_log_scale(self, name: str, value, rank: Literal[0, 1], learnable: bool) -> None:
        r"""Register a positive ``name`` stored as ``log(value)`` and read as ``exp(raw)``."""
        self._register_parameter(
            name, value, rank, learnable, init_fn=torch.log, inverse_fn=torch.log, activation_fn=torch.exp
        )

    def _register_state_scale(self, name: str, value, rank: Literal[0, 1], learnable: bool) -> None:
        r"""``_register_scale`` with a rank-1 size of ``d_state`` instead of ``num_neurons``."""
        self._sized_by_d_state(self._register_scale, name, value, rank, learnable)

    def _register_log_state_scale(self, name: str, value, rank: Literal[0, 1], learnable: bool) -> None:
        r"""``_register_log_scale`` with a rank-1 size of ``d_state`` instead of ``num_neurons``."""
        self._sized_by_d_state(self._register_log_scale, name, value, rank, learnable)

    def _sized_by_d_state(self, register, *args) -> None:
        # _register_parameter sizes rank-1 values by num_neurons: lend it d_state for one call.
        num_neurons, self.num_neurons = self.num_neurons, self.d_state
        try:
            register(*args)
        finally:
            self.num_neurons = num_neurons

    # ------------------------------------------------------------- binding to ssm_core

    @property
    def config(self):
        """The constructor arguments as an ``ssm_core`` config (``ssm_core.S6Config`` ...), kept since construction."""
        config = self.__dict__.get("_ssm_config")
        if config is None:  # a layer unpickled from traceTorch 0.19.2: its sizes are its parameters'
            config = dataclasses.replace(self.spec.config.from_params(self._core_params()), dim=self.dim)
            self.__dict__["_ssm_config"] = config
        return config

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.spec is not None:  # (submodule name or "", parameter name) of each state_dict() key
            cls._param_paths = tuple(key.rpartition(".")[::2] for key in cls.spec.param_keys)

    def _core_params(self):
        """The parameters as ``spec.params`` (None where absent).

        Looked up on every call: a parameter, or the module holding it, may have been replaced.
        """
        modules, own = self._modules, self._parameters
        return self.spec.params(
            *[(modules[owner]._parameters if owner else own).get(name) for owner, name in self._param_paths]
        )

    @property
    def _slots(self) -> tuple:
        slots = self.__dict__.get("_state_slots")
        if slots is None:  # also a layer unpickled from traceTorch 0.19.2
            slots = self.__dict__["_state_slots"] = self.config.state_slots()
        return slots

    def _init_parameters(self, config) -> None:
        """Keep ``config`` as the layer's, draw the parameters with ``ssm_core``'s init formulas and register them
        under their traceTorch names."""
        self.__dict__["_ssm_config"] = config
        params = self.spec.init(config, self.backend.draws(torch.get_default_dtype()))
        for key, value in self.spec.params_to_mapping(params).items():
            owner_name, _, attr = key.rpartition(".")
            owner = getattr(self, owner_name) if owner_name else self
            setattr(owner, attr, nn.Parameter(value))

    def _check_input(self, x) -> torch.dtype:
        """Check ``x`` against the layer's parameters; return the dtype of the output.

        Under ``torch.autocast`` a float32 layer also takes input of the
        autocast dtype and answers in it, as torch's own layers do; its
        discretization, recurrence and states stay in float32.
        """
        layer = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{layer}: expected a real floating-point input, got dtype {x.dtype}")
        reference = self._reference_param()
        autocast = _compat.autocast_dtype(x.device.type) if reference.dtype == torch.float32 else None
        if x.dtype != reference.dtype and x.dtype != autocast:
            allowed = f"{reference.dtype}" + ("" if autocast is None else f" or {autocast} (autocast)")
            raise TypeError(
                f"{layer}: expected input of dtype {allowed} (the layer's parameters), got {x.dtype}; "
                f"convert the input, or the layer with .to({x.dtype})"
            )
        if x.device != reference.device:
            raise ValueError(
                f"{layer}: expected input on {reference.device} (the layer's parameters), got {x.device}; "
                f"move the input, or the layer with .to({str(x.device)!r})"
            )
        return x.dtype if autocast is None else autocast

    def _reference_param(self) -> torch.Tensor:
        """``A_log``, which every layer has: the layer's parameters share its dtype and device."""
        return self._parameters["A_log"]

    def _compute_inputs(self, x):
        """``x`` and the parameters in the compute dtype: the layer's, float32 for a half-precision layer."""
        params, compute = in_compute_dtype(self._core_params(), xp_torch)
        return (x if x.dtype == compute else x.to(compute)), params

    def _run(self, x, held: dict, time_dim, compiled: Optional[bool] = None):
        """The layer on ``x`` from the states ``held``: one step (``time_dim`` None) or a sequence.

        Returns ``(y, {state name: new state})`` and changes nothing: the
        callers store the states, so an error leaves the layer as it was.
        ``compiled``: ``scan``'s switch.
        """
        sequence = time_dim is not None
        checked = None if sequence else self._checked_step(x, held)
        if checked is not None and checked.direct:
            y, new_states = self._direct_step(checked, x, list(held.values()))
            return y, dict(zip(held, new_states))
        out_dtype = self._check_input(x) if checked is None else checked.out_dtype
        x_c, params = self._compute_inputs(x)
        run_core = self._core_scan if sequence else self._core_step
        frozen = not sequence and self._frozen()  # a TTcompile'd step: the frozen weights, and no plan to make
        config = self.config

        def core(x_last, state):
            if frozen:
                with self._math_context(x_last):
                    return self._frozen_step(x_last, state)
            plan = self.backend.plan(self.spec, x_last, params, sequence, compiled, config, state=state)
            with self._math_context(x_last):
                return run_core(x_last, state, params, plan)

        if checked is None:
            y, states = run(
                type(self).__name__, self.spec, self._slots, self.dim, self.num_neurons, x_c, held, core, xp_torch,
                time_dim,
            )
        else:
            y, states = run_step(checked.axis, self.spec, self._slots, x_c, held, core, xp_torch)
        return (y if y.dtype == out_dtype else y.to(out_dtype)), states

    def _direct_step(self, checked: "_CheckedStep", x, states: list):
        """A checked step of features-last input from every held state (in the state record's order):
        ``run_step`` without its moves. Returns ``(y, new states)``, the states in that order.

        What a loop of steps runs from its second call on; its plan is the
        signature's, per autograd mode.
        """
        compute = checked.compute_dtype
        x_c = x if x.dtype == compute else x.to(compute)
        state = self.spec.state(*states)
        if self._frozen():  # TTcompile'd: the frozen weights, not the parameters, and no plan to make
            step, args = self._frozen_step, (x_c, state)
        else:
            params, _ = in_compute_dtype(self._core_params(), xp_torch, compute)
            grad = torch.is_grad_enabled() and self.backend.records_gradients(x_c, params, states)
            mode = (grad, _fused.functorch_active())  # what the plan's forms depend on besides the signature
            plan = checked.plans.get(mode)
            if plan is None:
                plan = checked.plans[mode] = self.backend.plan(self.spec, x_c, params, False, config=self.config, grad=grad)
            step, args = self._core_step, (x_c, state, params, plan)
        if checked.autocast is None:
            y, new_state = step(*args)
        else:
            with self._math_context(x_c):
                y, new_state = step(*args)
        return (y if y.dtype == checked.out_dtype else y.to(checked.out_dtype)), new_state

    def _math_context(self, x):
        """Where the step's or scan's math runs: autocast off for S4/S5, whose matrix products carry the
        recurrence (see :func:`_autocast_off`); as the caller has it for S6/Mamba."""
        return _autocast_off(x) if self.spec.time_invariant else _UNCHANGED

    def _checked_step(self, x, held: dict) -> "Optional[_CheckedStep]":
        """What the checks of a step's input found, or None where the call is not checked here.

        A loop of steps gives the checks the same input signature at every call
        (the input's type, shape, dtype and device, the parameters' dtype and
        device, the layer's ``dim`` and width, the autocast state, the held
        states' shapes and dtypes): they
        run once per signature, and any other input is checked again. States
        given as arguments (the stateless form) and traced calls are checked at
        every call.
        """
        if type(held) is not dict or not isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
            return None
        signature = self._step_key(x, held.values())
        cached = self.__dict__.get("_step_signature")
        if cached is not None and cached.signature == signature:
            return cached
        out_dtype = self._check_input(x)
        x_c, _ = self._compute_inputs(x)
        axis = step_axis(type(self).__name__, x_c, held, self._slots, self.dim, self.num_neurons)
        # Held states in the order the state record takes them: _direct_step builds it from held's values.
        in_order = tuple(held) == self.spec.state._fields
        direct = axis == x.ndim - 1 and in_order and all(state is not None for state in held.values())
        checked = _CheckedStep(signature, out_dtype, axis, x_c.dtype, _compat.autocast_dtype_of(x), direct, {})
        self.__dict__["_step_signature"] = checked
        return checked

    def _step_key(self, x, states) -> tuple:
        """What the checks of a step depend on: ``x``'s type, shape, dtype and device, the parameters' dtype and
        device, ``dim`` and the width, the autocast state, and the held ``states``' shapes and dtypes."""
        reference = self._reference_param()
        return (
            type(x), x.shape, x.dtype, x.device, reference.dtype, reference.device, self.dim, self.num_neurons,
            _compat.autocast_dtype_of(x), *[None if state is None else (state.shape, state.dtype) for state in states],
        )

    def _held_states(self) -> dict:
        check_not_recomputed_unrestored(self)  # plain torch checkpointing would recompute from later states
        return {slot.name: getattr(self, slot.name) for slot in self._slots}

    def _refuse_export(self) -> None:
        if _compat.is_exporting():
            raise RuntimeError(_STATELESS_HINT.format(layer=type(self).__name__, what="torch.export"))

    def __prepare_scriptable__(self):
        raise RuntimeError(_STATELESS_HINT.format(layer=type(self).__name__, what="torch.jit.script"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A loop's steps from its second on: the input and the held states are as the last checked step's
        # (its key), nothing traces the call, and no backward pass recomputes it.
        checked = None if torch.compiler.is_compiling() else self.__dict__.get("_step_signature")
        if (checked is not None and checked.direct and isinstance(x, torch.Tensor)
                and self.__dict__.get(_SEQUENCE_MODE) is None):
            names = self.spec.state._fields
            held = [getattr(self, name) for name in names]
            if self._step_key(x, held) == checked.signature and outside_backward() and not _compat.is_exporting():
                y, new_states = self._direct_step(checked, x, held)
                self.__dict__.update(zip(names, new_states))  # states are plain attributes: skip nn.Module.__setattr__
                return y
        self._refuse_export()
        time_dim = self.__dict__.get(_SEQUENCE_MODE)  # inside tt.sequence_mode: x is a whole sequence
        y, states = self._run(x, self._held_states(), time_dim)
        self.__dict__.update(states)  # states are plain attributes: skip nn.Module.__setattr__
        return y

    def _core_step(self, x, state, params, plan):
        """One eager step of ``spec.step``, which discretizes from the parameters' current values.

        At every call: no key on a parameter (its version, its data pointer)
        sees every way its values change (writes through ``p.data`` bump no
        version), and a stale value here is a silently wrong output. Only
        ``TTcompile()`` keeps such values across calls, by explicit request.
        """
        return self.spec.step(x, state, params, xp=xp_torch, plan=plan, config=self.config)

    def _compiled_step(self, x, state, params, prepared):
        """``TTcompile()``'s step: ``spec.step`` compiled by inductor (:func:`_fused.step_function`)."""
        if torch.compiler.is_compiling():
            # Traced by someone's torch.compile: the eager step, which their compile fuses. Kept, it
            # would be this key's step after their compile too (dynamo replays the attribute's write).
            return _fused.step_function(self.spec, self.config, x)(x, state, params, prepared)
        key = (x.shape, x.dtype, x.device, _compat.autocast_dtype_of(x))  # a graph per autocast state
        cached = self.__dict__.get("_compiled_step_fn")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_compiled_step_fn"] = (key, _fused.step_function(self.spec, self.config, x))
        return cached[1](x, state, params, prepared)

    def _frozen(self) -> bool:
        """Whether ``TTcompile()`` froze the layer: its steps then run :meth:`_frozen_step`."""
        return False

    def _frozen_step(self, x, state):
        """A step on what ``TTcompile()`` froze, in ``x``'s dtype (the compute dtype); each kind its own."""
        raise NotImplementedError

    def _frozen_inputs(self, dtype):
        """What ``TTcompile()`` froze, in ``dtype`` (the compute dtype), as the compiled step takes it.

        Kept across steps: the frozen buffers change only by ``TTcompile()``,
        ``TTdecompile()`` and a conversion of the layer (``_apply``), which drop it.
        """
        kept = self.__dict__.get("_frozen_inputs_kept")
        if kept is None or kept[0] != dtype:
            kept = self.__dict__["_frozen_inputs_kept"] = (dtype, self._make_frozen_inputs(dtype))
        return kept[1]

    def _make_frozen_inputs(self, dtype):
        """The frozen buffers in ``dtype``, as :meth:`_frozen_inputs` gives them (each TTcompile'd kind its own)."""
        raise NotImplementedError

    def _forget_compiled(self) -> None:
        """Drop what steps keep of a ``TTcompile()``: the frozen inputs and the step function."""
        self.__dict__.pop("_frozen_inputs_kept", None)
        self.__dict__.pop("_compiled_step_fn", None)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_frozen_inputs_kept", None)  # .to(), .half(), .cuda(): the frozen buffers are new tensors
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_compiled_step_fn", None)  # a compiled function does not pickle; the next step finds it again
        state.pop("_frozen_inputs_kept", None)  # views or copies of the buffers: made again from them
        return state

    def scan(self, xs: torch.Tensor, time_dim: int = 0, compiled: Optional[bool] = None) -> torch.Tensor:
        r"""Run a whole sequence in one call: the same outputs and final states as stepping.

        Starts from the held states (zeros when there are none) and leaves the
        layer in the states after the last step, as ``T`` calls of ``forward``
        would; gradients flow through the whole sequence.

        Parameters
        ----------
        xs : Tensor
            The sequence; with its ``time_dim`` axis removed it is one step's
            input ``[*, num_neurons, *]``, with ``num_neurons`` at ``dim``.
        time_dim : int, default 0
            The time axis of ``xs``.
        compiled : bool or None, default None
            S6/Mamba: run the recurrence as a block compiled with
            ``torch.compile`` (True), eagerly (False), or as the environment
            variable ``SSM_COMPILE`` (``0``, ``1``, ``auto``) says, by default
            ``auto``: compiled once a block shape has done enough eager work
            to pay for its compile (see :mod:`ssm_core.fused`). The same
            numbers either way, to rounding. S4/S5 have nothing to compile.

        Returns
        -------
        Tensor of the shape of ``xs``: the output of every step.

        Notes
        -----
        Checkpoint chunks of a sequence with ``tt.checkpoint(layer.scan, chunk)``.
        Plain ``torch.utils.checkpoint.checkpoint`` would recompute the chunk
        during backward from the states the layer holds by then, those of a
        later time: the layer raises ``RuntimeError`` there instead.
        """
        self._refuse_export()
        check_axis(type(self).__name__, "time_dim", time_dim)  # None would mean one step to _run
        ys, states = self._run(xs, self._held_states(), time_dim, compiled)
        self.__dict__.update(states)
        return ys

    # ------------------------------------------------------------- the stateless form

    @property
    def state_names(self) -> tuple:
        """The names of the hidden states, in the order the stateless form takes and returns them."""
        return tuple(slot.name for slot in self._slots)

    def initial_states(self, x: torch.Tensor, time_dim: Optional[int] = None) -> tuple:
        """Zero states for input ``x`` (one step, or a sequence with its time axis at ``time_dim``).

        In the order of :attr:`state_names`, shaped and typed as the layer
        would create them.
        """
        self._check_input(x)
        x_c, _ = self._compute_inputs(x)
        zeros = zero_states(type(self).__name__, self.spec, self._slots, self.dim, self.num_neurons, x_c, xp_torch, time_dim)
        return tuple(zeros[name] for name in self.state_names)

    def stateless(self, time_dim: Optional[int] = None) -> "Stateless":
        """This layer as a pure module ``(x, *states) -> (y, *new_states)``, sharing its parameters.

        What ``torch.export`` captures with the states as inputs and outputs::

            step = layer.stateless()
            program = torch.export.export(step, (x, *layer.initial_states(x)))
            y, *states = program.module()(x, *states)

        With ``time_dim`` set, the module runs whole sequences (``scan``) instead of steps.
        """
        return Stateless(self, time_dim)
    def _core_scan(self, xs, state, params, plan):
        return self.spec.scan(xs, state, params, xp=xp_torch, plan=plan, config=self.config)

    def _check_loaded_state(self, state_name: str, value: torch.Tensor, key: str) -> None:
        super()._check_loaded_state(state_name, value, key)
        if self.spec is None:  # a layer of the user's own on this base: its states are its business
            return
        param_dtype = self._reference_param().dtype
        state_dtype = compute_dtype(param_dtype, xp_torch)
        if value.dtype != state_dtype:
            raise ValueError(
                f"{type(self).__name__}: state {key} must have dtype {state_dtype} (for parameters of "
                f"{param_dtype}), got {value.dtype}"
            )
        for slot in self._slots:
            if slot.name == state_name:
                check_loaded_state(type(self).__name__, key, slot, tuple(value.shape), self.dim)

    def _check_loaded_states(self, loaded: dict) -> None:
        super()._check_loaded_states(loaded)
        if self.spec is None:
            return
        # The states kept (a partial load) must agree with the loaded ones too.
        slots, shapes = [], {}
        for slot in self._slots:
            key, value = loaded.get(slot.name, (f"held {slot.name}", getattr(self, slot.name)))
            if value is not None:
                slots.append(slot)
                shapes[key] = tuple(value.shape)
        check_loaded_states_agree(type(self).__name__, slots, shapes, self.dim, self.num_neurons)


class TimeInvariantLayer(Layer):
    r"""An SSM layer whose dynamics depend on parameters only (S4, S5).

    ``TTcompile()`` discretizes the system once for fast inference steps and
    freezes it: until ``TTdecompile()``, steps use the weights as they were
    when compiled (kept as non-persistent buffers, so ``state_dict()`` is
    unchanged and ``.to()`` moves them), and changing the parameters has no
    effect on them. Without ``TTcompile()`` every call follows the current weights.
    """

    _COMPILED = "_compiled_dynamics_"
    _FROZEN = _COMPILED + "A_bar"  # present from TTcompile() to TTdecompile()
    # Whether TTcompile() also compiles the step: where it is elementwise over a [batch, N, d_state] state (S4),
    # fused into one pass; S5's is two matrix products around a [batch, d_state] state, which the compiled
    # step ran slower than eager on the frozen system (inductor's graph: 1.09-1.12x 0.19.2's eager step
    # against 0.54-0.77x at batch 1 x 64 and 32 x 256 features under AVX-512; 0.81-0.92x against
    # 0.46-0.65x under ATEN_CPU_CAPABILITY=avx2 and default).
    _fuses_step = True

    def _frozen(self) -> bool:
        return self._FROZEN in self._buffers

    def _frozen_step(self, x, state):
        # The frozen system (float32 for a half-precision layer) takes no parameters: None in their record.
        dynamics, no_params = self._frozen_inputs(x.dtype)
        if self._fuses_step:
            return self._compiled_step(x, state, no_params, dynamics)
        return self.spec.step(x, state, no_params, xp=xp_torch, prepared=dynamics, config=self.config)

    def _make_frozen_inputs(self, dtype):
        buffers, fields = self._buffers, self.spec.dynamics._fields
        no_params = self.spec.params(*([None] * len(self.spec.params._fields)))
        return self.spec.dynamics(*(buffers[self._COMPILED + f].to(dtype) for f in fields)), no_params

    def TTcompile(self) -> None:
        r"""Discretize the system once and compile the step, for fast inference; the weights are frozen until
        ``TTdecompile()``.

        S4's steps then run one function compiled by inductor (the update and
        the readout fused), compiled at the first step of each input
        shape, dtype and device, and checked against the eager step there, as
        S6's and Mamba's (see :meth:`SelectiveLayer.TTcompile`); S5's step, two
        matrix products, runs eagerly on the frozen dynamics.
        """
        super().TTcompile()
        params, _ = in_compute_dtype(self._core_params(), xp_torch)
        with torch.no_grad():  # the forms of a step without autograd, which the frozen dynamics serve
            dynamics = self.spec.prepare(params, xp_torch, self.backend.forms(params.A_log, False, time_invariant=True))
        for field, value in zip(dynamics._fields, dynamics):
            self.register_buffer(self._COMPILED + field, value.detach().clone(), persistent=False)
        self._forget_compiled()

    def TTdecompile(self) -> None:
        r"""Drop the frozen dynamics and the compiled step: steps follow the parameters again and train."""
        super().TTdecompile()
        for field in self.spec.dynamics._fields:
            self._buffers.pop(self._COMPILED + field, None)
        self._forget_compiled()


class Stateless(nn.Module):
    r"""A traceTorch layer as a pure module: ``forward(x, *states) -> (y, *new_states)``.

    Holds no state of its own and leaves the wrapped layer's held states
    untouched; the parameters are the layer's. States are in the order of
    ``layer.state_names`` and in traceTorch's layout; ``layer.initial_states(x)``
    gives zeros. This is the form ``torch.export`` captures.
    """

    def __init__(self, layer: Layer, time_dim: Optional[int] = None):
        super().__init__()
        self.layer = layer
        self.time_dim = time_dim

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self.layer).__name__}.stateless(): TorchScript cannot compile the array-API step math; "
            "capture this form with torch.export.export(layer.stateless(), (x, *layer.initial_states(x)))"
        )

    def forward(self, x: torch.Tensor, *states: torch.Tensor):
        names = self.layer.state_names
        if len(states) != len(names):
            raise TypeError(
                f"{type(self.layer).__name__}.stateless(): expected {len(names)} state(s) {list(names)} "
                f"after the input, got {len(states)}"
            )
        y, new = self.layer._run(x, StateArguments(zip(names, states)), self.time_dim)
        return (y, *(new[name] for name in names))


class SelectiveLayer(Layer):
    r"""An SSM layer whose dynamics depend on the input (S6, Mamba).

    ``TTcompile()`` freezes the weights and compiles the whole step with
    inductor (see :meth:`TTcompile`); ``TTdecompile()`` undoes both.
    """

    _COMPILED = "_compiled_params_"

    def _frozen(self) -> bool:
        return "_compiled_fields" in self.__dict__

    def _frozen_step(self, x, state):
        # The compiled step, which runs eagerly where autograd records or a torch.func transform runs.
        return self._compiled_step(x, state, *self._frozen_inputs(x.dtype))

    def _make_frozen_inputs(self, dtype):
        buffers = self._buffers

        def frozen_value(field):
            value = buffers[self._COMPILED + field]
            return value if value.dtype == dtype else value.to(dtype)

        params = self.spec.params(*(None if f is None else frozen_value(f) for f in self.__dict__["_compiled_fields"]))
        return params, (frozen_value("A"), frozen_value("inv_A"))

    def TTcompile(self) -> None:
        r"""Freeze the weights and compile the step, for fast inference.

        Steps then run one function compiled by inductor (the projections as
        matrix products, everything else fused into few kernels; on CPUs a
        graph called without dynamo, see :func:`_fused._graph_step`),
        compiled at the first step of each input shape, dtype and device:
        seconds, once per process, less when inductor's disk cache has it.

        **The weights are frozen from ``TTcompile()`` until ``TTdecompile()``**:
        steps use copies of the parameters as they were at ``TTcompile()``, so
        changing the parameters (an optimizer step, ``load_state_dict``) has no
        effect on steps, and no gradient reaches the parameters, until the
        layer is decompiled (and compiled again). ``state_dict()`` is
        unchanged, and ``.to()`` moves the copies. ``scan`` is not affected: it
        follows the parameters (and its own ``compiled=`` switch).

        The outputs are eager stepping's, to rounding: the first step of each
        input shape is checked against the eager step. ``SSM_COMPILE=0`` keeps
        the step eager (the weights are still frozen); where compiling fails,
        or the check finds a difference, the step runs eagerly after one
        warning. So does a step that autograd records (an input or a state
        that requires grad: differentiable to any order), and a step under a
        ``torch.func`` transform.
        """
        super().TTcompile()
        with torch.no_grad():
            params, _ = in_compute_dtype(self._core_params(), xp_torch)
            A, inv_A = self.spec.prepare(params, xp_torch)
            for field, value in (*zip(params._fields, params), ("A", A), ("inv_A", inv_A)):
                if value is not None:
                    self.register_buffer(self._COMPILED + field, value.detach().clone(), persistent=False)
        self.__dict__["_compiled_fields"] = tuple(f if p is not None else None for f, p in zip(params._fields, params))
        self._forget_compiled()

    def TTdecompile(self) -> None:
        r"""Drop the frozen weights and the compiled step: steps follow the parameters again and train."""
        super().TTdecompile()
        for name in [n for n in self._buffers if n.startswith(self._COMPILED)]:
            del self._buffers[name]
        self.__dict__.pop("_compiled_fields", None)
        self._forget_compiled()
