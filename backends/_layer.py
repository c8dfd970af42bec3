"""The stateful layer of every array backend, written once.

A backend module (``backends.numpy``, ``backends.cupy``, ``backends.mlx``,
``backends.array_api_strict``) defines a tiny :class:`ssm_core.backend.Backend`
— how to make, convert and synchronise its arrays, and what its library runs
best — and calls :func:`bind` to get its
``S4``, ``S5``, ``S6`` and ``Mamba`` classes. All the state lifecycle, ``dim``
handling and parameter loading lives here; the math is ``ssm_core``'s.

The backend object provides:

``name``, ``xp`` (the array namespace), ``array_types`` (the library's array
classes), ``default_dtype``, ``dtype(spec)`` (a library dtype from None, a
name or a dtype), ``asarray(value)`` (from a torch tensor, a NumPy array or
any DLPack-capable array, keeping its dtype), ``to_numpy(array)``,
``draws(dtype, seed)`` (an
:class:`ssm_core.Draws`), ``finish(arrays)`` (make a step's results usable:
MLX evaluates them) and ``synchronize()``. The pipeline of a call (checks,
features-last, step or scan, back) is :func:`ssm_core.layout.run`, shared with
the torch layers; how each call runs is the backend's :meth:`ssm_core.backend.Backend.plan`.
"""

from __future__ import annotations

from typing import ClassVar

import ssm_core
from ssm_core.checks import check_axis
from ssm_core.layout import (
    check_loaded_state, check_loaded_states_agree, compute_dtype, in_compute_dtype, run, run_step, step_axis,
)

__all__ = ["Layer", "bind", "is_torch_bfloat16"]


def is_torch_bfloat16(value) -> bool:
    """Whether ``value`` is a torch tensor of dtype bfloat16 (without importing torch): NumPy has no such dtype."""
    return type(value).__module__.partition(".")[0] == "torch" and str(getattr(value, "dtype", "")) == "torch.bfloat16"


def _has_bfloat16(backend) -> bool:
    try:
        backend.dtype("bfloat16")
    except (TypeError, KeyError, ValueError):
        return False
    return True


class Layer:
    """A state-space layer on one array library: one timestep per call, states kept inside.

    Parameters
    ----------
    *args, **kwargs
        The torch layer's constructor arguments (e.g. ``S6(num_neurons,
        d_state=16, dt_rank=-1, dim=-1)``).
    dtype : dtype or str, optional
        Floating dtype of parameters and states. By default the backend's
        (float32), and ``load_state_dict`` then follows the loaded weights.
    seed : int, optional
        Seed of the backend's generator for the initial parameters.
    eager : bool, default True
        Lazy libraries (MLX) evaluate each step's output and states before
        returning; with ``eager=False`` the caller evaluates (see ``backends.mlx``).
        Eager libraries ignore it.

    Variables
    ---------
    params : NamedTuple
        The parameters as ``ssm_core`` takes them (``ssm_core.S6Params`` ...).
    <state names> : array or None
        The hidden states, named and shaped as traceTorch names them
        (``state``, ``global_state``, ``ssm_state``, ``conv_buffer``).

    Notes
    -----
    - **Input**: array of shape ``[*, num_neurons, *]`` with ``num_neurons``
      at index ``dim``, of this backend's library and the layer's dtype.
    - **Output**: array of the same shape.
    - Errors leave parameters and states exactly as they were.
    """

    spec: ClassVar[ssm_core.LayerSpec]
    backend: ClassVar[object]

    def __init__(self, *args, dtype=None, seed=None, eager: bool = True, **kwargs):
        config = self.spec.config(*args, **kwargs)
        self.config = config
        self.eager = eager
        self._fixed_dtype = dtype is not None
        try:
            self.dtype = self.backend.dtype(dtype)
            floating = self.backend.xp.isdtype(self.dtype, "real floating")
        except (TypeError, KeyError) as error:
            raise TypeError(f"{self._error_name()}: dtype must be a floating dtype, got {dtype!r}") from error
        if not floating:
            raise TypeError(f"{self._error_name()}: dtype must be a floating dtype, got {dtype!r}")
        self._slots = config.state_slots()
        self._states = dict.fromkeys(slot.name for slot in self._slots)
        self._set_params(self.spec.init(config, self.backend.draws(self.dtype, seed)))

    # ------------------------------------------------------------- attributes

    @property
    def num_neurons(self) -> int:
        return self.config.num_neurons

    @property
    def d_state(self) -> int:
        return self.config.d_state

    @property
    def dim(self) -> int:
        return self.config.dim

    def __getattr__(self, name):
        states = self.__dict__.get("_states")
        if states is not None and name in states:
            return states[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self.config).items())
        return f"{self.backend.name}.{self.spec.name}({args}, dtype={self.dtype})"

    def _error_name(self) -> str:
        return f"{self.spec.name} ({self.backend.name})"

    # ------------------------------------------------------------- parameters

    def _set_params(self, params) -> None:
        """Hold ``params``, of the layer's dtype ``self.dtype``."""
        self.params = params
        # Half-precision layers compute, and keep their states, in float32.
        self._compute_dtype = compute_dtype(self.dtype, self.backend.xp)
        self._device = getattr(params.A_log, "device", None)

    def _compute_params(self):
        """The parameters in the compute dtype, from their current values.

        Nothing derived from them is kept between calls: ``state_dict()`` hands
        out the live arrays, and an in-place edit of one must reach the next step.
        """
        return in_compute_dtype(self.params, self.backend.xp)[0]

    def state_dict(self) -> dict:
        """``{traceTorch state_dict key: array}``, as ``torch_layer.state_dict()`` names them."""
        return self.spec.params_to_mapping(self.params)

    def load_state_dict(self, mapping, strict: bool = True) -> None:
        """Load weights: torch tensors, NumPy arrays or any DLPack-capable arrays, keyed as ``state_dict()``.

        Missing, unexpected or mis-shaped entries raise ``ValueError`` and load
        nothing (``strict=False`` tolerates missing and unexpected keys). The
        layer's dtype follows the weights unless one was given to the constructor.
        torch bfloat16 tensors load exactly: as bfloat16 where the library has it
        (MLX); elsewhere into a layer built with ``dtype=`` (float32 holds them
        exactly), and without one they raise ``TypeError`` saying so.
        """
        layer, xp = self._error_name(), self.backend.xp
        shapes = self.config.param_shapes()
        missing = sorted(set(shapes) - set(mapping))
        unexpected = sorted(set(mapping) - set(shapes))
        if strict and (missing or unexpected):
            raise ValueError(f"{layer}: load_state_dict got missing keys {missing} and unexpected keys {unexpected}")
        loaded = {}
        for key, shape in shapes.items():
            if key not in mapping:
                continue
            array = self._convert(mapping[key], key)
            if tuple(array.shape) != shape:
                raise ValueError(f"{layer}: {key} must have shape {shape}, got {tuple(array.shape)}")
            if not xp.isdtype(array.dtype, "real floating"):
                raise TypeError(f"{layer}: {key} must be real floating-point, got dtype {array.dtype}")
            loaded[key] = array
        dtype = self.dtype
        if not self._fixed_dtype and loaded:
            dtype = next(iter(loaded.values())).dtype
        merged = {**self.state_dict(), **loaded}
        params = self.spec.params_from_mapping({k: xp.astype(v, dtype) for k, v in merged.items()})
        dtype_changed, self.dtype = dtype != self.dtype, dtype
        self._set_params(params)
        if dtype_changed:
            self._states = {k: None if v is None else xp.astype(v, self._compute_dtype) for k, v in self._states.items()}

    def _convert(self, value, key):
        if is_torch_bfloat16(value) and not _has_bfloat16(self.backend):
            # Weights pass through NumPy, which has no bfloat16. float32 holds every bfloat16
            # value exactly, but a layer whose dtype follows the weights would silently become float32.
            if not self._fixed_dtype:
                raise TypeError(
                    f"{self._error_name()}: {key} is a torch bfloat16 tensor, and {self.backend.name} has no "
                    "bfloat16; build the layer with dtype='float32' (bfloat16 weights convert to it exactly) "
                    "or load tensor.float()"
                )
            value = value.float()  # exact
        try:
            return self.backend.asarray(value)
        except (TypeError, ValueError, RuntimeError, BufferError) as error:  # e.g. a torch meta tensor
            raise TypeError(
                f"{self._error_name()}: {key} cannot become a {self.backend.name} array "
                f"({type(error).__name__}: {error})"
            ) from error

    # ------------------------------------------------------------- states

    def zero_states(self) -> None:
        """Forget the hidden states; the next call starts from zeros."""
        self._states = dict.fromkeys(self._states)

    def save_states(self) -> dict:
        """Copies of the hidden states that exist, ``{state name: array}``."""
        xp = self.backend.xp
        return {name: xp.asarray(value, copy=True) for name, value in self._states.items() if value is not None}

    def load_states(self, states: dict, strict: bool = True) -> None:
        """Load states saved by ``save_states()`` (copies them); all or nothing.

        Loaded states replace the held ones, whatever batch shape those had;
        the states a layer ends up with must agree on one batch shape.
        """
        layer, xp = self._error_name(), self.backend.xp
        missing = sorted(set(self._states) - set(states))
        unexpected = sorted(set(states) - set(self._states))
        if strict and (missing or unexpected):
            raise ValueError(f"{layer}: load_states got missing states {missing} and unexpected states {unexpected}")
        new = dict(self._states)
        for slot in self._slots:
            if slot.name not in states:
                continue
            array = self._convert(states[slot.name], slot.name)
            check_loaded_state(layer, slot.name, slot, tuple(array.shape), self.dim)
            if array.dtype != self._compute_dtype:
                raise TypeError(f"{layer}: state {slot.name} must have dtype {self._compute_dtype}, got {array.dtype}")
            new[slot.name] = xp.asarray(array, copy=True)
        present = [slot for slot in self._slots if new[slot.name] is not None]
        shapes = {slot.name: tuple(new[slot.name].shape) for slot in present}
        check_loaded_states_agree(layer, present, shapes, self.dim, self.num_neurons)
        self._states = new

    # ------------------------------------------------------------- stepping

    def _check_input(self, x) -> None:
        backend = self.backend
        if not isinstance(x, backend.array_types):
            raise TypeError(
                f"{self._error_name()}: expected a {backend.array_types[0].__module__}."
                f"{backend.array_types[0].__name__} input, got {type(x).__module__}.{type(x).__name__}; "
                f"convert it with backends.{backend.name}.asarray(x)"
            )
        if not backend.xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"{self._error_name()}: expected a real floating-point input, got dtype {x.dtype}")
        if x.dtype != self.dtype:
            raise TypeError(f"{self._error_name()}: expected input of dtype {self.dtype} (the layer's), got {x.dtype}")
        device = getattr(x, "device", None)
        if device is not None and self._device is not None and device != self._device:
            raise ValueError(f"{self._error_name()}: expected input on {self._device} (the layer's), got {device}")

    def _checked_step(self, x) -> int:
        """A step's input checked with the held states; its feature axis.

        The checks run once per input signature (the input's type, shape, dtype
        and device, the layer's dtype and device, the held states' shapes and dtypes): a loop of
        steps repeats one, and any other input is checked again.
        """
        states = self._states
        signature = (
            type(x), getattr(x, "shape", None), getattr(x, "dtype", None), getattr(x, "device", None), self.dtype,
            self._device,
            *(None if state is None else (state.shape, state.dtype) for state in states.values()),
        )
        cached = self.__dict__.get("_step_signature")
        if cached is not None and cached[0] == signature:
            return cached[1]
        self._check_input(x)
        axis = step_axis(self._error_name(), self._to_compute(x), states, self._slots, self.dim, self.num_neurons)
        self._step_signature = (signature, axis)
        return axis

    def _to_compute(self, x):
        return x if x.dtype == self._compute_dtype else self.backend.xp.astype(x, self._compute_dtype)

    def __call__(self, x):
        """One timestep: ``x`` ``[*, num_neurons, *]`` -> ``y`` of the same shape; states advance."""
        return self._run(x, None)

    def scan(self, xs, time_dim: int = 0, compiled=None):
        """A whole sequence in one call: the outputs of every step, as stepping gives them.

        ``xs`` with its ``time_dim`` axis removed is one step's input. Starts
        from the held states and leaves the layer in the states after the last
        step, as ``T`` calls would. ``compiled`` (S6/Mamba): run the
        recurrence as a block compiled by the library's compiler (True; MLX's
        ``mx.compile``), eagerly (False), or as ``SSM_COMPILE`` says (None; see
        :mod:`ssm_core.fused`). A library without a compiler (NumPy, CuPy)
        runs eagerly, and says so once when asked for ``compiled=True``.
        """
        check_axis(self._error_name(), "time_dim", time_dim)  # None would mean one step to _run
        return self._run(xs, time_dim, compiled)

    def _run(self, x, time_dim, compiled=None):
        backend, spec, params = self.backend, self.spec, self._compute_params()
        xp, sequence = backend.xp, time_dim is not None
        run_core = spec.scan if sequence else spec.step
        config = self.config

        def core(x_last, state):
            plan = backend.plan(spec, x_last, params, sequence, compiled, config, state=state)
            return run_core(x_last, state, params, xp=xp, plan=plan, config=config)

        if sequence:
            self._check_input(x)
            y, states = run(
                self._error_name(), spec, self._slots, self.dim, self.num_neurons, self._to_compute(x), self._states,
                core, xp, time_dim,
            )
        else:
            y, states = run_step(self._checked_step(x), spec, self._slots, self._to_compute(x), self._states, core, xp)
        y = y if y.dtype == x.dtype else xp.astype(y, x.dtype)
        if self.eager:
            self.backend.finish((y, *states.values()))
        self._states = states
        return y


def bind(backend) -> tuple:
    """``(S4, S5, S6, Mamba, from_torch)``: the layer classes on ``backend``, and a converter."""
    classes = []
    for spec in (ssm_core.S4, ssm_core.S5, ssm_core.S6, ssm_core.Mamba):
        doc = (
            f"traceTorch's ``{spec.name}`` on {backend.name}: same constructor arguments, parameter and "
            f"state names as ``tracetorch.ssm.{spec.name}``, plus ``dtype=`` and ``seed=``.\n\n"
            + Layer.__doc__.split("\n", 2)[2]
        )
        cls = type(spec.name, (Layer,), {"spec": spec, "backend": backend, "__doc__": doc})
        cls.__module__ = f"backends.{backend.name}"
        cls.__qualname__ = spec.name
        classes.append(cls)
    by_name = {cls.__name__: cls for cls in classes}

    def from_torch(torch_layer, dtype=None):
        """The layer equivalent to the ``tt.ssm`` layer ``torch_layer``, with its weights.

        Hidden states are not copied (``save_states``/``load_states`` do that).
        """
        config = torch_layer.config
        layer = by_name[torch_layer.spec.name](**vars(config), dtype=dtype)
        layer.load_state_dict(torch_layer.state_dict())
        return layer

    from_torch.__module__ = f"backends.{backend.name}"
    return (*classes, from_torch)
