"""Robustness: bad input, state safety and numerics on every backend.

Every binding of the four layers (the torch layers ``tt.ssm.*``, and the
``backends.numpy``, ``backends.mlx`` and ``backends.array_api_strict`` layers)
is held to the same contract:

- a mistake (wrong feature size, batch shape changed while states are held,
  non-floating or complex input, ``dim``/``time_dim`` out of range, an array of
  another library or device, invalid constructor arguments) raises
  ``ValueError`` or ``TypeError`` naming the layer class, never a raw library
  error, and leaves parameters and states exactly as they were, for one step
  and for a whole sequence (``scan``);
- loading states or weights is all or nothing;
- the zero-order hold has no cancellation for tiny ``dt * A``, stays finite when
  ``A`` underflows to zero, and the layers match a float64 reference at
  extreme ``dt`` and ``A_log``, in half precision too.

Long runs (100,000 steps) live in ``tests/test_scan.py``.
"""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import pytest
import torch

import backends
import numpy_oracle
import ssm_core
import tracetorch as tt

N = 4
D_STATE = 3
T = 3
LAYER_KWARGS = {
    "S4": dict(num_neurons=N, d_state=D_STATE),
    "S5": dict(num_neurons=N, d_state=D_STATE),
    "S6": dict(num_neurons=N, d_state=D_STATE, dt_rank=2),
    "Mamba": dict(num_neurons=N, d_state=D_STATE),  # conv_kernel=4: two states
}
LAYERS = list(LAYER_KWARGS)
BINDINGS = ["torch", "numpy", "mlx", "array_api_strict"]
TORCH_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}

_AVAILABLE: dict = {}


# ----------------------------------------------------------------------------- bindings


def weights_for(name: str, kwargs: dict, seed: int = 0) -> dict:
    """Plausible float64 weights, keyed like ``state_dict()``, that exercise the dynamics."""
    rng = np.random.default_rng(seed)
    shapes = ssm_core.LAYERS[name].config(**kwargs).param_shapes()
    out = {}
    for key, shape in shapes.items():
        if key == "A_log":
            value = np.log(np.arange(1.0, shape[-1] + 1)) + 0.1 * rng.standard_normal(shape)
        elif key == "log_dt":
            value = rng.uniform(np.log(1e-2), np.log(0.5), shape)
        elif key == "dt_proj.bias":
            value = -1.0 + 0.5 * rng.standard_normal(shape)
        else:
            value = 0.5 * rng.standard_normal(shape)
        out[key] = value
    return out


class _Binding:
    """What the torch layers and the array backends share of the small test interface."""

    def raw_states(self, layer) -> dict:
        return {n: getattr(layer, n) for n in self.state_names(layer)}

    def params(self, layer) -> dict:
        return {k: self.host(v) for k, v in layer.state_dict().items()}

    def zero_states(self, layer):
        layer.zero_states()


class TorchBinding(_Binding):
    """The torch layers behind the same small interface as the array backends."""

    name = "torch"

    def make(self, name, kwargs, dtype="float32", weights=None):
        torch.manual_seed(0)
        layer = getattr(tt.ssm, name)(**kwargs).to(TORCH_DTYPES[dtype])
        weights = weights_for(name, kwargs) if weights is None else weights
        layer.load_state_dict({k: torch.from_numpy(np.asarray(v)).to(TORCH_DTYPES[dtype]) for k, v in weights.items()})
        return layer

    def arr(self, value):
        return torch.from_numpy(np.array(value))  # a copy: never shares memory with the caller

    def host(self, array) -> np.ndarray:
        array = array.detach()
        if array.dtype == torch.bfloat16:
            array = array.to(torch.float32)
        return array.numpy().copy()

    def step(self, layer, x):
        with torch.no_grad():
            return layer(x)

    def scan(self, layer, xs, time_dim=0):
        with torch.no_grad():
            return layer.scan(xs, time_dim=time_dim)

    def state_names(self, layer):
        return sorted(layer._state_names)


class ArrayBinding(_Binding):
    """A ``backends.<name>`` module."""

    def __init__(self, name):
        self.name = name
        self.mod = importlib.import_module(f"backends.{name}")

    def make(self, name, kwargs, dtype="float32", weights=None):
        layer = getattr(self.mod, name)(**kwargs, dtype=dtype)
        layer.load_state_dict(weights_for(name, kwargs) if weights is None else weights)
        return layer

    def arr(self, value):
        return self.mod.asarray(np.array(value))

    def host(self, array) -> np.ndarray:
        if self.name == "mlx":
            import mlx.core as mx

            if array.dtype == mx.bfloat16:
                array = array.astype(mx.float32)
        return np.array(self.mod.backend.to_numpy(array), copy=True)

    def step(self, layer, x):
        return layer(x)

    def scan(self, layer, xs, time_dim=0):
        return layer.scan(xs, time_dim=time_dim)

    def state_names(self, layer):
        return sorted(layer._states)


def binding(name: str):
    """The binding ``name``, or skip saying what to install."""
    if name == "torch":
        return TorchBinding()
    if not _AVAILABLE:
        _AVAILABLE.update(backends.available())
    reason = _AVAILABLE[name]
    if reason is not None:
        pytest.skip(reason)
    return ArrayBinding(name)


def has_mlx() -> bool:
    if not _AVAILABLE:
        _AVAILABLE.update(backends.available())
    return _AVAILABLE["mlx"] is None


def snapshot(b, layer):
    """Host copies of the parameters and the states (None stays None)."""
    states = {n: (None if v is None else b.host(v)) for n, v in b.raw_states(layer).items()}
    return b.params(layer), states


def _diff(now: dict, before: dict, what: str) -> list:
    problems = []
    if set(now) != set(before):
        return [f"{what} keys changed: {sorted(before)} -> {sorted(now)}"]
    for key, b in before.items():
        a = now[key]
        if b is None or a is None:
            if (a is None) != (b is None):
                problems.append(f"{what} {key}: {'None' if b is None else 'array'} -> {'None' if a is None else 'array'}")
            continue
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
            problems.append(f"{what} {key} changed ({b.dtype}{b.shape} -> {a.dtype}{a.shape})")
    return problems


def changes(b, layer, snap) -> list:
    params, states = snapshot(b, layer)
    return _diff(params, snap[0], "parameter") + _diff(states, snap[1], "state")


def expect_error(b, layer, cls_name, label, fn, exc) -> list:
    """Run ``fn``; return the problems: no error, the wrong kind, no layer name, or anything changed."""
    snap = snapshot(b, layer)
    problems = []
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - every kind is judged below
        if not isinstance(error, exc):
            problems.append(f"{label}: expected {exc}, got {type(error).__module__}.{type(error).__name__}: {error}")
        elif not any(n in str(error) for n in ((cls_name,) if isinstance(cls_name, str) else cls_name)):
            problems.append(f"{label}: message does not name {cls_name}: {error}")
    else:
        problems.append(f"{label}: no error raised")
    problems.extend(f"{label}: {p}" for p in changes(b, layer, snap))
    return problems


def held_layer(b, name, held, dim=-1, shape=(2, N), dtype="float32", kwargs=None):
    """A layer whose states are None, or held after two steps on inputs of ``shape``."""
    layer = b.make(name, {**LAYER_KWARGS[name], "dim": dim, **(kwargs or {})}, dtype=dtype)
    if held:
        rng = np.random.default_rng(1)
        for _ in range(2):
            b.step(layer, b.arr(rng.standard_normal(shape).astype(dtype)))
        assert all(v is not None for v in b.raw_states(layer).values())
    return layer


def seq(shape, dtype="float32", steps=T, seed=2):
    return np.random.default_rng(seed).standard_normal((steps, *shape)).astype(dtype)


def run_modes(b, layer, name, step_input, mode, exc, label, raw=False):
    """``layer`` given ``step_input`` as one step, or 3 of them as a sequence; problems as :func:`expect_error`.

    ``step_input`` is a NumPy array converted to the binding's arrays, or with
    ``raw`` an object given as it is (then the whole sequence for ``scan``).
    """
    if mode == "step":
        x = step_input if raw else b.arr(step_input)
        return expect_error(b, layer, name, f"step {label}", lambda: b.step(layer, x), exc)
    xs = step_input if raw else b.arr(np.stack([step_input] * T))
    return expect_error(b, layer, name, f"scan {label}", lambda: b.scan(layer, xs), exc)


MODES = ["step", "scan"]
HELD = pytest.mark.parametrize("held", [False, True], ids=["states-none", "states-held"])


# ----------------------------------------------------------------------------- 1. bad input


@pytest.mark.parametrize("mode", MODES)
@HELD
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_wrong_feature_size(bname, name, held, mode):
    b = binding(bname)
    layer = held_layer(b, name, held)
    problems = []
    for shape in [(2, N + 1), (2, N - 1), (N, 2), (2, 1)]:  # (N, 2): the features on the wrong axis
        problems += run_modes(b, layer, name, np.ones(shape, np.float32), mode, ValueError, f"shape {shape}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_batch_shape_changed_while_states_are_held(bname, name, mode):
    b = binding(bname)
    layer = held_layer(b, name, held=True, shape=(2, N))
    problems = []
    for shape in [(3, N), (1, N), (N,), (1, 2, N), (2, 1, N)]:
        problems += run_modes(b, layer, name, np.ones(shape, np.float32), mode, ValueError, f"shape {shape}")
    assert not problems, "\n".join(problems)
    # The error says how to recover, and recovering works.
    with pytest.raises(ValueError, match="zero_states"):
        b.step(layer, b.arr(np.ones((3, N), np.float32)))
    b.zero_states(layer)
    assert tuple(b.step(layer, b.arr(np.ones((3, N), np.float32))).shape) == (3, N)


NON_FLOATING = {
    "torch": ["int32", "int64", "bool", "complex64", "complex128"],
    "numpy": ["int32", "int64", "bool", "complex64", "complex128"],
    "mlx": ["int32", "int64", "bool", "complex64"],
    "array_api_strict": ["int32", "int64", "bool", "complex64", "complex128"],
}


@pytest.mark.parametrize("mode", MODES)
@HELD
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_non_floating_and_complex_input(bname, name, held, mode):
    """Integer, bool and complex inputs are a TypeError: never cast to float, stepped, and cast back."""
    b = binding(bname)
    layer = held_layer(b, name, held)
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy's ComplexWarning when a binding casts complex to real
        for dtype in NON_FLOATING[bname]:
            x = (np.arange(2 * N).reshape(2, N) % 3).astype(dtype)
            problems += run_modes(b, layer, name, x, mode, TypeError, f"dtype {dtype}")
    assert not problems, "\n".join(problems)


@HELD
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_floating_input_of_another_dtype(bname, name, held):
    b = binding(bname)
    layer = held_layer(b, name, held, dtype="float32")
    problems = []
    for mode in MODES:
        problems += run_modes(b, layer, name, np.ones((2, N), np.float64), mode, TypeError, "float64")
    assert not problems, "\n".join(problems)


@HELD
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_dim_and_time_dim_out_of_range(bname, name, held):
    b = binding(bname)
    problems = []
    # dim=2 needs a step input of >= 3 axes, dim=-3 too.
    for dim, good_shape in [(2, (2, 3, N)), (-3, (N, 2, 3))]:
        layer = held_layer(b, name, held, dim=dim, shape=good_shape)
        bad = np.ones((2, N) if dim == 2 else (N, 2), np.float32)
        for mode in MODES:  # scan: the step input is xs without its time axis, here 2-d
            problems += run_modes(b, layer, name, bad, mode, ValueError, f"dim={dim} on {bad.shape}")
    layer = held_layer(b, name, held)
    xs = b.arr(seq((2, N)))
    for time_dim in (3, -4, 10):
        problems += expect_error(
            b, layer, name, f"time_dim={time_dim}", lambda: b.scan(layer, xs, time_dim=time_dim), ValueError
        )
    for time_dim in (1.0, None, True, "0"):
        problems += expect_error(
            b, layer, name, f"time_dim={time_dim!r}", lambda: b.scan(layer, xs, time_dim=time_dim), TypeError
        )
    scalar = b.arr(np.ones((), np.float32))
    problems += expect_error(b, layer, name, "0-d step input", lambda: b.step(layer, scalar), ValueError)
    one_axis = b.arr(np.ones((N,), np.float32))  # a sequence without a feature axis left
    problems += expect_error(b, layer, name, "1-d sequence", lambda: b.scan(layer, one_axis), ValueError)
    assert not problems, "\n".join(problems)


def _foreign(bname: str, x: np.ndarray) -> dict:
    """``x`` as arrays of every library other than ``bname``'s."""
    import array_api_strict

    out = {}
    if bname != "torch":
        out["torch.Tensor"] = torch.from_numpy(x.copy())
    if bname != "numpy":
        out["numpy.ndarray"] = x.copy()
    if bname != "array_api_strict":
        out["array_api_strict"] = array_api_strict.asarray(x.copy())
    if bname != "mlx" and has_mlx():
        import mlx.core as mx

        out["mlx.core.array"] = mx.array(x)
    out["list"] = x.tolist()
    return out


@pytest.mark.parametrize("mode", MODES)
@HELD
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_array_of_another_library(bname, name, held, mode):
    b = binding(bname)
    layer = held_layer(b, name, held)
    x = np.ones((2, N), np.float32) if mode == "step" else np.ones((T, 2, N), np.float32)
    problems = []
    for kind, foreign in _foreign(bname, x).items():
        problems += run_modes(b, layer, name, foreign, mode, TypeError, f"a {kind}", raw=True)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mode", MODES)
@HELD
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", ["torch", "array_api_strict"])
def test_array_on_another_device(bname, name, held, mode):
    """torch: a 'meta' tensor into a CPU layer; array_api_strict: an array on its 'device1'."""
    b = binding(bname)
    layer = held_layer(b, name, held)
    shape = (2, N) if mode == "step" else (T, 2, N)
    if bname == "torch":
        x = torch.ones(shape, device="meta")
    else:
        import array_api_strict as xp

        x = xp.ones(shape, dtype=xp.float32, device=xp.Device("device1"))
    problems = run_modes(b, layer, name, x, mode, ValueError, "another device", raw=True)
    assert not problems, "\n".join(problems)


BAD_ARGUMENTS = {
    "num_neurons": [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError),
                    (None, TypeError)],
    "d_state": [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError),
                (None, TypeError)],
    "dt_rank": [(0, ValueError), (-2, ValueError), (2.5, TypeError), (False, TypeError), ("4", TypeError),
                (None, TypeError)],
    "conv_kernel": [(-1, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError),
                    (None, TypeError)],
    "dim": [(2.5, TypeError), (True, TypeError), ("0", TypeError), (None, TypeError)],
}
ARGUMENTS_OF = {
    "S4": ["num_neurons", "d_state", "dim"],
    "S5": ["num_neurons", "d_state", "dim"],
    "S6": ["num_neurons", "d_state", "dt_rank", "dim"],
    "Mamba": ["num_neurons", "d_state", "dt_rank", "conv_kernel", "dim"],
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_invalid_constructor_arguments(bname, name):
    b = binding(bname)
    cls = getattr(tt.ssm, name) if bname == "torch" else getattr(b.mod, name)
    problems = []
    for arg in ARGUMENTS_OF[name]:
        for value, exc in BAD_ARGUMENTS[arg]:
            kwargs = {"num_neurons": N, "d_state": D_STATE, arg: value}
            label = f"{name}({arg}={value!r})"
            try:
                cls(**kwargs)
            except Exception as error:  # noqa: BLE001
                message = str(error)
                if not isinstance(error, exc):
                    problems.append(f"{label}: expected {exc.__name__}, got {type(error).__name__}: {message}")
                elif name not in message or arg not in message:
                    problems.append(f"{label}: message names neither the layer nor {arg}: {message}")
            else:
                problems.append(f"{label}: accepted")
    if bname != "torch":
        for dtype in ("int32", "complex64", "bool", "not-a-dtype"):
            try:
                cls(N, d_state=D_STATE, dtype=dtype)
            except TypeError as error:
                if name not in str(error):
                    problems.append(f"dtype={dtype!r}: message does not name {name}: {error}")
            except Exception as error:  # noqa: BLE001
                problems.append(f"dtype={dtype!r}: expected TypeError, got {type(error).__name__}: {error}")
            else:
                problems.append(f"dtype={dtype!r}: accepted")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_dim_indexes_the_step_input_not_the_sequence(bname, name):
    """``dim`` indexes one step's input (``xs`` without its time axis), so ``dim`` and ``time_dim`` never clash.

    ``dim=0, time_dim=0`` on ``xs`` of shape ``[T, N, B]`` is valid: the time
    axis is axis 0 of the sequence, the features are axis 0 of each step
    ``xs[t]`` of shape ``[N, B]`` (axis 1 of the sequence). Likewise
    ``dim=-1, time_dim=-1`` on ``[B, N, T]``: the features are the last axis of
    each step ``xs[..., t]`` of shape ``[B, N]``.
    """
    b = binding(bname)
    kwargs = {**LAYER_KWARGS[name]}
    for dim, time_dim, xs_shape in [(0, 0, (5, N, 2)), (-1, -1, (2, N, 5)), (1, 0, (5, 2, N))]:
        xs = np.random.default_rng(3).standard_normal(xs_shape)
        stepper = b.make(name, {**kwargs, "dim": dim}, dtype="float64")
        scanner = b.make(name, {**kwargs, "dim": dim}, dtype="float64")
        steps = np.moveaxis(xs, time_dim, 0)
        stepped = np.stack([b.host(b.step(stepper, b.arr(x))) for x in steps])
        scanned = b.host(b.scan(scanner, b.arr(xs), time_dim=time_dim))
        assert scanned.shape == xs.shape
        assert numpy_oracle.rel_err(np.moveaxis(scanned, time_dim, 0), stepped) <= 1e-12, (dim, time_dim)
        for key, value in b.raw_states(scanner).items():
            assert numpy_oracle.rel_err(b.host(value), b.host(b.raw_states(stepper)[key])) <= 1e-12, key


# ----------------------------------------------------------------------------- 2. state safety


class _Wrap(tt.Model):
    """A model around torch layers (torch layers save and load states through ``tt.Model``)."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _save(b, layer) -> dict:
    if b.name == "torch":
        return {k.split(".", 2)[-1]: v for k, v in _Wrap(layer).save_states().items()}
    return layer.save_states()


def _load(b, layer, states: dict, strict=True):
    if b.name == "torch":
        return _Wrap(layer).load_states({f"layers.0.{k}": v for k, v in states.items()}, strict=strict)
    return layer.load_states(states, strict=strict)


def _make_state(b, value: np.ndarray):
    return torch.from_numpy(value.copy()) if b.name == "torch" else b.arr(value)


@HELD
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_load_states_is_all_or_nothing(bname, name, held):
    b = binding(bname)
    layer = held_layer(b, name, held)
    donor = held_layer(b, name, held=True)
    good = {k: b.host(v) + 1.0 for k, v in _save(b, donor).items()}  # visibly other values, valid
    names = list(good)
    first, last = names[0], names[-1]
    defects = {
        "missing": ({k: v for k, v in good.items() if k != last}, {}),
        "extra": ({**good, "not_a_state": good[first]}, {}),
        "feature size": ({**good, last: np.zeros(_resize(good[last].shape, -1 if name == "S5" else -2), np.float32)},
                         {}),
        "trailing size": ({**good, last: np.zeros(good[last].shape[:-1] + (good[last].shape[-1] + 1,), np.float32)},
                          {}),
        "0-d": ({**good, last: np.ones((), np.float32)}, {}),
        "float64": ({**good, last: good[last].astype(np.float64)}, {}),
        "int32": ({**good, last: good[last].astype(np.int32)}, {}),
        "bool": ({**good, last: good[last] > 0}, {}),
        "feature size, non-strict": (
            {**good, last: np.zeros(_resize(good[last].shape, -1 if name == "S5" else -2), np.float32)},
            {"strict": False},
        ),
    }
    problems = []
    for label, (mapping, kw) in defects.items():
        # The bad entry comes last, after every valid one.
        given = {k: _make_state(b, v) for k, v in mapping.items()}
        problems += expect_error(b, layer, (name, "_Wrap"), f"load_states {label}",
                                 lambda: _load(b, layer, given, **kw), (ValueError, TypeError))
    assert not problems, "\n".join(problems)
    # And the valid states load, as copies.
    given = {k: _make_state(b, v) for k, v in good.items()}
    _load(b, layer, given)
    for k, v in b.raw_states(layer).items():
        np.testing.assert_array_equal(b.host(v), good[k])


def _resize(shape, axis):
    shape = list(shape)
    shape[axis] += 1
    return tuple(shape)


@HELD
@pytest.mark.parametrize("bname", ["numpy", "mlx", "array_api_strict"])
def test_backend_load_state_dict_is_all_or_nothing(bname, held):
    b = binding(bname)
    problems = []
    for name in LAYERS:
        layer = held_layer(b, name, held)
        dtype_before = layer.dtype
        good = {k: v + 1.0 for k, v in weights_for(name, LAYER_KWARGS[name], seed=9).items()}  # float64
        last = list(good)[-1]
        defects = {
            "missing": {k: v for k, v in good.items() if k != last},
            "extra": {**good, "extra.weight": np.zeros(2)},
            "mis-shaped": {**good, last: np.zeros(good[last].shape + (1,))},
            "transposed torch": {**good, last: torch.zeros(tuple(reversed(good[last].shape)) + (2,))},
            "int64": {**good, last: np.ones(good[last].shape, np.int64)},
            "int32 torch": {**good, last: torch.ones(good[last].shape, dtype=torch.int32)},
            "complex": {**good, last: np.ones(good[last].shape, np.complex128)},
            "bool": {**good, last: np.ones(good[last].shape, bool)},
        }
        for label, mapping in defects.items():
            problems += expect_error(b, layer, name, f"{name} load_state_dict {label}",
                                     lambda: layer.load_state_dict(mapping), (ValueError, TypeError))
        if layer.dtype != dtype_before:
            problems.append(f"{name}: dtype changed to {layer.dtype}")
    assert not problems, "\n".join(problems)


def _torch_target(target: str, name: str):
    torch.manual_seed(0)
    if target == "layer":
        module = getattr(tt.ssm, name)(**LAYER_KWARGS[name]).double()
    else:
        module = _Wrap(*(getattr(tt.ssm, n)(**LAYER_KWARGS[n]) for n in LAYERS)).double()
    with torch.no_grad():
        module(torch.randn(2, N, dtype=torch.float64))  # states held
    return module


def _torch_snapshot(module):
    params = {k: v.detach().clone() for k, v in module.state_dict().items()}
    layers = list(module.layers) if isinstance(module, tt.Model) else [module]
    states = [(layer, n, getattr(layer, n), getattr(layer, n).clone()) for layer in layers for n in layer._state_names]
    return params, states


def _torch_changes(module, snap) -> list:
    params, states = snap
    now = module.state_dict()
    problems = [f"parameter {k} changed" for k, v in params.items()
                if now[k].dtype != v.dtype or not torch.equal(now[k], v)]
    for layer, n, ref, copy in states:
        current = getattr(layer, n)
        if current is not ref or not torch.equal(current, copy):
            problems.append(f"state {type(layer).__name__}.{n} changed")
    return problems


TORCH_DEFECTS = ["mis-shaped", "integer", "bool", "complex", "numpy array", "missing", "extra", "mis-shaped non-strict"]


@pytest.mark.parametrize("defect", TORCH_DEFECTS)
@pytest.mark.parametrize("target,name", [("layer", n) for n in LAYERS] + [("model", "all")])
def test_torch_load_state_dict_is_all_or_nothing(target, name, defect):
    """A bad entry placed after valid ones (whose new values differ) leaves every parameter as it was."""
    module = _torch_target(target, name)
    good = {k: v.detach() + 1.0 for k, v in module.state_dict().items()}
    last = list(good)[-1]
    bad = dict(good)
    strict = True
    if defect == "mis-shaped":
        bad[last] = torch.zeros(good[last].shape + (2,), dtype=torch.float64)
    elif defect == "integer":
        bad[last] = torch.ones(good[last].shape, dtype=torch.int64)
    elif defect == "bool":
        bad[last] = torch.ones(good[last].shape, dtype=torch.bool)
    elif defect == "complex":
        bad[last] = torch.ones(good[last].shape, dtype=torch.complex128)
    elif defect == "numpy array":
        bad[last] = good[last].numpy()
    elif defect == "missing":
        del bad[last]
    elif defect == "extra":
        bad["zzz.weight"] = torch.zeros(3, dtype=torch.float64)
    elif defect == "mis-shaped non-strict":
        bad[last] = torch.zeros(good[last].shape + (2,), dtype=torch.float64)
        strict = False
    assert list(bad)[: len(good) - 1] == list(good)[: len(good) - 1]  # the valid entries come first
    snap = _torch_snapshot(module)
    with pytest.raises((ValueError, TypeError)) as info:
        module.load_state_dict(bad, strict=strict)
    assert type(module).__name__ in str(info.value)
    assert not _torch_changes(module, snap), _torch_changes(module, snap)
    module.load_state_dict(good)  # the valid dict still loads
    for k, v in module.state_dict().items():
        assert torch.equal(v, good[k]), k


@pytest.mark.parametrize("target,name", [("layer", "Mamba"), ("model", "all")])
def test_torch_load_state_dict_meta_entry_after_valid_ones_loads_nothing(target, name):
    """A 'meta' tensor (no data) after valid entries: a clear error, and nothing half-loaded."""
    module = _torch_target(target, name)
    good = {k: v.detach() + 1.0 for k, v in module.state_dict().items()}
    last = list(good)[-1]
    bad = {**good, last: good[last].to("meta")}
    snap = _torch_snapshot(module)
    error = None
    try:
        module.load_state_dict(bad)
    except Exception as caught:  # noqa: BLE001
        error = caught
    problems = _torch_changes(module, snap)
    assert not problems, f"half-loaded after {type(error).__name__}: {problems}"
    assert isinstance(error, (ValueError, TypeError)), f"expected ValueError/TypeError, got {error!r}"


@pytest.mark.parametrize("bname", BINDINGS)
def test_load_states_meta_entry_is_a_clear_error(bname):
    """A torch 'meta' tensor as a state (or weight) entry: ValueError/TypeError, nothing loaded."""
    b = binding(bname)
    layer = held_layer(b, "Mamba", held=True)
    good = {k: b.host(v) + 1.0 for k, v in _save(b, layer).items()}
    states = {k: torch.from_numpy(v) for k, v in good.items()}
    last = list(states)[-1]
    states[last] = states[last].to("meta")
    problems = expect_error(b, layer, ("Mamba", "_Wrap"), "load_states meta", lambda: _load(b, layer, states),
                            (ValueError, TypeError))
    if bname != "torch":
        weights = {k: torch.from_numpy(v) for k, v in weights_for("Mamba", LAYER_KWARGS["Mamba"]).items()}
        weights["dt_proj.bias"] = weights["dt_proj.bias"].to("meta")
        problems += expect_error(b, layer, "Mamba", "load_state_dict meta", lambda: layer.load_state_dict(weights),
                                 (ValueError, TypeError))
    assert not problems, "\n".join(problems)


def _write_into(b, array, value):
    if b.name == "torch":
        array.fill_(value)
    else:
        array[...] = value  # every backend's arrays take item assignment


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_save_states_returns_copies_that_later_steps_do_not_mutate(bname, name):
    b = binding(bname)
    layer = held_layer(b, name, held=True)
    saved = _save(b, layer)
    expected = {k: b.host(v) for k, v in saved.items()}
    assert set(saved) == set(b.state_names(layer))
    b.step(layer, b.arr(seq((2, N))[0]))  # a later step,
    b.scan(layer, b.arr(seq((2, N), steps=4)))  # a later sequence,
    for value in b.raw_states(layer).values():  # and writes into the held states
        _write_into(b, value, 7.0)
    for k, v in saved.items():
        np.testing.assert_array_equal(b.host(v), expected[k], err_msg=k)
    # And writing into the saved copies leaves the layer alone.
    held = {k: b.host(v) for k, v in b.raw_states(layer).items()}
    for value in saved.values():
        _write_into(b, value, -3.0)
    for k, v in b.raw_states(layer).items():
        np.testing.assert_array_equal(b.host(v), held[k], err_msg=k)


@pytest.mark.parametrize("how", ["step", "scan"])
@pytest.mark.parametrize("name", LAYERS)
def test_torch_detach_states_cuts_the_graph_without_copying(name, how):
    torch.manual_seed(0)
    layer = getattr(tt.ssm, name)(**LAYER_KWARGS[name]).double()
    x = torch.randn(T, 2, N, dtype=torch.float64, requires_grad=True)
    if how == "step":
        for x_t in x:
            layer(x_t)
    else:
        layer.scan(x)
    before = {n: getattr(layer, n) for n in layer._state_names}
    assert all(v.requires_grad and v.grad_fn is not None for v in before.values())
    layer.detach_states()
    for n, old in before.items():
        new = getattr(layer, n)
        assert new.data_ptr() == old.data_ptr(), f"{n} was copied"
        assert not new.requires_grad and new.grad_fn is None, n
        assert torch.equal(new, old.detach()), n
    # The next step's graph stops at the detached states.
    layer(torch.randn(2, N, dtype=torch.float64)).sum().backward()
    assert x.grad is None


# ----------------------------------------------------------------------------- 3. numerics


def _zoh_libs():
    libs = {"numpy": (np.asarray, np.asarray), "torch": (torch.from_numpy, lambda t: t.numpy())}
    import array_api_strict

    libs["array_api_strict"] = (array_api_strict.asarray, np.from_dlpack)
    if has_mlx():
        mod = importlib.import_module("backends.mlx")
        libs["mlx"] = (mod.asarray, np.asarray)
    return libs


ZOH_LIBS = ["numpy", "torch", "array_api_strict", "mlx"]


def _lib(name):
    libs = _zoh_libs()
    if name not in libs:
        pytest.skip(f"{name} is not usable here")
    return libs[name]


def _zoh_truth(dt: np.ndarray, A: np.ndarray):
    """``(exp(dt A), expm1(dt A) / A)`` of the exact float values, to well below a float64 ulp."""
    if dt.dtype == np.float32:  # a float32 product is exact in float64
        z = dt.astype(np.float64) * A.astype(np.float64)
        return np.exp(z), np.array([math.expm1(v) for v in z]) / A.astype(np.float64)
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    gains, decays = [], []
    for d, a in zip(dt.tolist(), A.tolist()):
        z = mpmath.mpf(d) * mpmath.mpf(a)
        gains.append(float(mpmath.expm1(z) / mpmath.mpf(a)))
        decays.append(float(mpmath.exp(z)))
    return np.array(decays), np.array(gains)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lib", ZOH_LIBS)
def test_zoh_gain_has_no_cancellation_for_tiny_dt_A(lib, dtype):
    """``gain = expm1(dt A) / A`` to a few ulp for ``|dt A|`` from 1e-12 to 1e2 (``(exp(dt A) - 1) / A`` is not)."""
    to_lib, to_np = _lib(lib)
    eps = np.finfo(dtype).eps
    rng = np.random.default_rng(0)
    mags = np.logspace(-12, 2, 71)
    A = -np.exp(rng.uniform(-3.0, 3.0, mags.size)).astype(dtype)
    dt = (mags / -A.astype(np.float64)).astype(dtype)
    decay_true, gain_true = _zoh_truth(dt, A)
    A_bar, gain = ssm_core.zoh(to_lib(dt), to_lib(A))
    gain, A_bar = to_np(gain).astype(np.float64), to_np(A_bar).astype(np.float64)
    ulps = np.abs(gain - gain_true) / np.abs(gain_true) / eps
    assert ulps.max() <= 4.0, f"gain off by {ulps.max():.1f} ulp at dt*A = {-mags[ulps.argmax()]:.1e}"
    assert np.abs(A_bar - decay_true).max() <= 2 * eps  # A_bar in (0, 1]
    # The test tells the cancelling formula apart.
    naive = (np.exp(dt * A) - 1) / A
    assert (np.abs(naive - gain_true) / np.abs(gain_true) / eps).max() > 1e3


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lib", ["numpy", "torch", "array_api_strict"])
def test_phi1_accuracy_and_limits(lib, dtype):
    to_lib, to_np = _lib(lib)
    eps = np.finfo(dtype).eps
    z = np.concatenate([-np.logspace(-12, 2, 57), np.logspace(-12, 1, 27)]).astype(dtype)
    truth = _zoh_truth(z, np.ones_like(z))[1] / z.astype(np.float64)  # expm1(z) / z
    got = to_np(ssm_core.phi1(to_lib(z))).astype(np.float64)
    assert (np.abs(got - truth) / truth / eps).max() <= 4.0
    limits = to_np(ssm_core.phi1(to_lib(np.array([0.0, -0.0, -np.inf], dtype))))
    np.testing.assert_array_equal(limits, [1.0, 1.0, 0.0])


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_zoh_float16_keeps_A(lib):
    """``zoh`` on float16 arrays: the gain to a few float16 ulp, and ``A_bar == 1`` where ``A`` underflowed.

    ``decay_rates`` moves ``A`` ``sqrt(smallest normal)`` away from zero so
    ``1/A`` stays finite; that is about 1e-19 in float32 but 7.8e-3 in float16,
    which changes an ``A`` of -0.01 to -0.018.
    """
    to_lib, to_np = _lib(lib)
    eps = float(np.finfo(np.float16).eps)
    A = np.array([-0.01, -0.05, -0.1, -0.5, -1.0, -4.0] * 3, np.float16)
    dt = np.array([1.0] * 6 + [10.0] * 6 + [100.0] * 6, np.float16)
    gain_true = np.array([math.expm1(float(d) * float(a)) / float(a) for d, a in zip(dt, A)])
    A_bar, gain = ssm_core.zoh(to_lib(dt), to_lib(A))
    err = np.abs(to_np(gain).astype(np.float64) - gain_true) / np.abs(gain_true) / eps
    problems = [f"gain off by {err.max():.0f} float16 ulp (dt={float(dt[err.argmax()])}, A={float(A[err.argmax()])})"] \
        if err.max() > 4 else []
    A_bar0, gain0 = ssm_core.zoh(to_lib(np.array([0.5, 2.0], np.float16)), to_lib(np.array([-0.0, -0.0], np.float16)))
    if not np.array_equal(to_np(A_bar0).astype(np.float64), [1.0, 1.0]):
        problems.append(f"A = -0 decays: A_bar = {to_np(A_bar0)}")
    if np.abs(to_np(gain0).astype(np.float64) - [0.5, 2.0]).max() > 2 * eps * 2.0:
        problems.append(f"A = -0: gain {to_np(gain0)} != dt [0.5, 2.0]")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lib", ZOH_LIBS)
def test_zoh_with_A_underflowed_to_zero_is_an_integrator(lib, dtype):
    """``A = -exp(-1000) == -0``: ``A_bar == 1`` and ``gain == dt`` (the cancelling formula gives 0/0)."""
    to_lib, to_np = _lib(lib)
    eps = np.finfo(dtype).eps
    dt = np.array([1e-6, 1e-3, 0.5, 1.0, 7.0, 1e3], dtype)
    A = -np.exp(np.full(dt.shape, -1000.0)).astype(dtype)
    assert (A == 0).all()
    with np.errstate(invalid="ignore"):
        assert np.isnan(numpy_oracle.zoh(dt.astype(np.float64), A.astype(np.float64))[1]).all()  # naive: 0/0
    A_bar, gain = ssm_core.zoh(to_lib(dt), to_lib(A))
    A_bar, gain = to_np(A_bar).astype(np.float64), to_np(gain).astype(np.float64)
    np.testing.assert_array_equal(A_bar, 1.0)
    assert np.isfinite(gain).all()
    assert (np.abs(gain - dt) / dt).max() <= 2 * eps


UNDERFLOW_CASES = [
    ("torch", "float64"), ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
    ("numpy", "float64"), ("numpy", "float32"), ("numpy", "float16"),
    ("mlx", "float32"), ("array_api_strict", "float32"),
]
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 1e-2, "bfloat16": 1e-2}


def _rounded_weights(b, layer) -> dict:
    """The layer's own (rounded) weights in float64, for the reference."""
    return {k: v.astype(np.float64) for k, v in b.params(layer).items()}


def _rounded(dtype, xs64):
    """``xs64`` rounded to ``dtype``, in float64."""
    if dtype == "bfloat16":
        return torch.from_numpy(xs64).to(torch.bfloat16).double().numpy()
    return xs64.astype(dtype).astype(np.float64)


def _arr_of(b, dtype, xs):
    """The binding's array of ``dtype`` holding ``xs`` (already rounded to ``dtype``)."""
    if b.name == "torch":
        return torch.from_numpy(xs).to(TORCH_DTYPES[dtype])
    if dtype == "bfloat16":  # MLX: NumPy has no bfloat16
        import mlx.core as mx

        return mx.array(xs.astype(np.float32)).astype(mx.bfloat16)
    return b.arr(xs.astype(dtype))


def _compare_to_reference(b, layer, name, kwargs, dtype, xs64, ref_weights=None, state_dtype=None):
    """Problems of ``layer``'s outputs and states (stepped and scanned) against the float64 reference."""
    xs = _rounded(dtype, xs64)
    weights = _rounded_weights(b, layer) if ref_weights is None else ref_weights
    ref, ref_states = numpy_oracle.run(name, kwargs, weights, xs)
    problems = []
    stepped = np.stack([b.host(b.step(layer, _arr_of(b, dtype, x))) for x in xs])
    runs = {"step": (stepped, {k: v for k, v in b.raw_states(layer).items()})}
    b.zero_states(layer)
    scanned = b.host(b.scan(layer, _arr_of(b, dtype, xs)))
    runs["scan"] = (scanned, {k: v for k, v in b.raw_states(layer).items()})
    for how, (ys, states) in runs.items():
        if not np.isfinite(ys).all():
            problems.append(f"{how}: non-finite outputs")
        err = numpy_oracle.rel_err(ys, ref)
        if not err <= TOL[dtype]:
            problems.append(f"{how}: outputs off the float64 reference by {err:.2e}")
        for key, value in states.items():
            if state_dtype is not None and str(value.dtype).rsplit(".", 1)[-1] != state_dtype:
                problems.append(f"{how}: state {key} has dtype {value.dtype}, expected {state_dtype}")
            host = b.host(value)
            if not np.isfinite(host).all():
                problems.append(f"{how}: non-finite state {key}")
            err = numpy_oracle.rel_err(host, ref_states[key])
            if not err <= TOL[dtype]:
                problems.append(f"{how}: state {key} off the float64 reference by {err:.2e}")
    return problems


def _make_with(b, name, kwargs, dtype, weights):
    if b.name == "torch":
        torch.manual_seed(0)
        layer = getattr(tt.ssm, name)(**kwargs).to(TORCH_DTYPES[dtype])
        layer.load_state_dict({k: torch.from_numpy(v).to(TORCH_DTYPES[dtype]) for k, v in weights.items()})
        return layer
    return b.make(name, kwargs, dtype=dtype, weights=weights)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname,dtype", UNDERFLOW_CASES, ids=[f"{b}-{d}" for b, d in UNDERFLOW_CASES])
def test_A_underflowing_to_zero_gives_gain_dt_in_the_layers(bname, dtype, name):
    """``A_log = -1000`` (``A == -0`` in every dtype): finite outputs and states equal to the limit ``gain = dt``.

    The float64 reference computes ``expm1(dt A) / A``, 0/0 at ``A == 0``; its
    ``A_log = -700`` (``A`` about 1e-304, not underflowed) is the same system
    to rounding, ``A_bar = 1`` and ``gain = dt``.
    """
    b = binding(bname)
    kwargs = LAYER_KWARGS[name]
    weights = weights_for(name, kwargs, seed=4)
    weights["A_log"] = np.full_like(weights["A_log"], -1000.0)
    layer = _make_with(b, name, kwargs, dtype, weights)
    limit = _rounded_weights(b, layer)
    limit["A_log"] = np.full_like(limit["A_log"], -700.0)
    xs = np.random.default_rng(5).standard_normal((5, 2, N))
    state_dtype = "float64" if dtype == "float64" else "float32"
    problems = _compare_to_reference(b, layer, name, kwargs, dtype, xs, ref_weights=limit, state_dtype=state_dtype)
    assert not problems, "\n".join(problems)


EXTREMES = {
    "huge-dt": {"log_dt": 50.0, "dt_proj.bias": 1e4},
    "tiny-dt": {"log_dt": -50.0, "dt_proj.bias": -1e4},
    "A_log+50": {"A_log": 50.0},
    "A_log-50": {"A_log": -50.0},
    "huge-dt-and-A": {"log_dt": 50.0, "dt_proj.bias": 1e4, "A_log": 50.0},
}


def test_reference_is_sound_at_the_extremes():
    """What the float64 reference does at the extremes the layers are compared at: finite, no 0/0."""
    xs = np.random.default_rng(6).standard_normal((5, 2, N))
    for name, kwargs in LAYER_KWARGS.items():
        for case, values in EXTREMES.items():
            weights = weights_for(name, kwargs, seed=7)
            weights.update({k: np.full_like(weights[k], v) for k, v in values.items() if k in weights})
            ys, states = numpy_oracle.run(name, kwargs, weights, xs)
            assert np.isfinite(ys).all(), (name, case)
            assert all(np.isfinite(s).all() for s in states.values()), (name, case)
    # S6's tiny dt is softplus(-1e4) == 0: the state stays zero and y = D x.
    weights = weights_for("S6", LAYER_KWARGS["S6"], seed=7)
    weights["dt_proj.bias"][:] = -1e4
    ys, states = numpy_oracle.run("S6", LAYER_KWARGS["S6"], weights, xs)
    assert not states["state"].any()
    np.testing.assert_allclose(ys, xs * weights["D"], rtol=1e-15)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # float32 dt*A -> -inf, as it should
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(EXTREMES))
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_extreme_dt_and_A_log_match_the_float64_reference(bname, name, case, dtype):
    """Outputs and states (which a cancelling gain gets wrong for tiny ``dt``) equal the float64 reference."""
    b = binding(bname)
    kwargs = LAYER_KWARGS[name]
    weights = weights_for(name, kwargs, seed=7)
    weights.update({k: np.full_like(weights[k], v) for k, v in EXTREMES[case].items() if k in weights})
    layer = _make_with(b, name, kwargs, dtype, weights)
    xs = np.random.default_rng(6).standard_normal((5, 2, N))
    problems = _compare_to_reference(b, layer, name, kwargs, dtype, xs, state_dtype=dtype)
    assert not problems, "\n".join(problems)


HALF_CASES = [("torch", "float16"), ("torch", "bfloat16"), ("numpy", "float16"), ("mlx", "float16"), ("mlx", "bfloat16")]


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname,dtype", HALF_CASES, ids=[f"{b}-{d}" for b, d in HALF_CASES])
def test_half_precision_layers_match_float64_with_the_same_rounded_weights(bname, dtype, name):
    """Outputs in the input's half dtype within ~1e-2 of float64; states kept in float32."""
    b = binding(bname)
    kwargs = LAYER_KWARGS[name]
    layer = _make_with(b, name, kwargs, dtype, weights_for(name, kwargs, seed=8))
    xs = np.random.default_rng(9).standard_normal((6, 2, N))
    y = b.step(layer, _arr_of(b, dtype, xs[0]))
    assert str(y.dtype).rsplit(".", 1)[-1] == dtype
    b.zero_states(layer)
    problems = _compare_to_reference(b, layer, name, kwargs, dtype, xs, state_dtype="float32")
    assert not problems, "\n".join(problems)


NON_FINITE = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def _non_finite_problems(ys, t0, bad, label):
    """Problems with how a non-finite input at ``[t0, 1, 2]`` shows in outputs ``ys`` ``[T, 3, N]``."""
    problems = []
    fin = np.isfinite(ys)
    if not fin[:t0].all():
        problems.append(f"{label}: outputs before step {t0} (before the bad input) are not finite")
    if np.isfinite(ys[t0, 1, 2]):
        problems.append(f"{label}: the output at the bad input is finite ({ys[t0, 1, 2]})")
    if np.isnan(bad) and not np.isnan(ys[t0, 1, 2]):
        problems.append(f"{label}: a NaN input gives {ys[t0, 1, 2]}, not NaN")
    if not (~fin[t0:, 1]).any(axis=-1).all():
        problems.append(f"{label}: the non-finite value vanished from later outputs (hidden in the state)")
    if not fin[:, [0, 2]].all():
        problems.append(f"{label}: the non-finite value reached another batch element")
    return problems


@pytest.mark.parametrize("bad", list(NON_FINITE))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_nan_and_inf_inputs_propagate(bname, name, dtype, bad):
    """NaN/Inf inputs are not hidden: they propagate as NaN/Inf, forward in time, within their batch element.

    Documented behaviour: the layers do not check values. A NaN input gives a
    NaN output at that step; an Inf input a non-finite output (Inf, or NaN
    where Inf meets Inf of the other sign or a zero). The value enters the
    state, so every later output of that batch element stays non-finite until
    ``zero_states()`` (or ``load_states``); earlier steps and the other batch
    elements are untouched. Stepping and ``scan`` agree.
    """
    b = binding(bname)
    layer = b.make(name, LAYER_KWARGS[name], dtype=dtype)
    xs = seq((3, N), dtype=dtype, steps=6, seed=10)
    t0 = 2
    xs[t0, 1, 2] = NON_FINITE[bad]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        stepped = np.stack([b.host(b.step(layer, b.arr(x))) for x in xs])
        states = {k: b.host(v) for k, v in b.raw_states(layer).items()}
        b.zero_states(layer)
        scanned = b.host(b.scan(layer, b.arr(xs)))
    problems = _non_finite_problems(stepped, t0, NON_FINITE[bad], "step")
    problems += _non_finite_problems(scanned, t0, NON_FINITE[bad], "scan")
    for key, value in states.items():
        if np.isfinite(value).all():
            problems.append(f"state {key} is finite after a non-finite input")
    np.testing.assert_array_equal(np.isfinite(stepped), np.isfinite(scanned))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bname", BINDINGS)
def test_non_finite_input_in_a_long_scan_does_not_reach_earlier_steps(bname, name, bad):
    """A sequence long enough for S4/S5's chunked scan: still causal, as stepping is."""
    b = binding(bname)
    layer = b.make(name, LAYER_KWARGS[name], dtype="float64")
    xs = seq((3, N), dtype="float64", steps=64, seed=11)
    t0 = 50
    xs[t0, 1, 2] = NON_FINITE[bad]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        scanned = b.host(b.scan(layer, b.arr(xs)))
    problems = _non_finite_problems(scanned, t0, NON_FINITE[bad], "scan")
    assert not problems, "\n".join(problems)
