"""Property-based tests of the layer contract on every binding (hypothesis).

Over layer (S4, S5, S6, Mamba with its ``dt_rank`` and ``conv_kernel``
variants), binding (torch, NumPy, array-api-strict; MLX with fewer examples),
batch shape (0-3 axes of sizes 1-3), the feature axis ``dim`` (any valid axis,
positive or negative), the sequence's ``time_dim``, its length (1-12) and dtype
(float32, float64):

- outputs have the input's shape and dtype; states have the documented layout;
- moving ``dim`` gives the same numbers, transposed (outputs and states);
- ``zero_states()`` resets exactly: the same outputs as a fresh layer;
- stepping equals ``scan`` (outputs and final states);
- a sequence scanned in two parts equals one scan of it.

Layers are small (2-6 features, ``d_state`` 1-3) with weights drawn from a seed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backends
import ssm_core
import tracetorch as tt
from numpy_oracle import rel_err
from ssm_core.checks import expected_state_shape

BINDINGS = ["torch", "numpy", "array_api_strict", "mlx"]
EXAMPLES = {"torch": 60, "numpy": 60, "array_api_strict": 40, "mlx": 15}
TOL = {"float32": 1e-5, "float64": 1e-10}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}

_AVAILABLE: dict = {}


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict  # constructor arguments without dim
    step_shape: tuple  # one step's input
    axis: int  # the feature axis of the step input, in [0, ndim)
    dim: int  # the same axis, as given to the layer (maybe negative)
    time_dim: int  # the time axis of the sequence (maybe negative)
    steps: int
    dtype: str
    seed: int

    @property
    def xs_shape(self) -> tuple:
        """The sequence's shape: the step shape with the time axis inserted at ``time_dim``."""
        shape = list(self.step_shape)
        time = self.time_dim % (len(shape) + 1)
        shape.insert(time, self.steps)
        return tuple(shape)


@st.composite
def cases(draw) -> Case:
    name = draw(st.sampled_from(["S4", "S5", "S6", "Mamba"]))
    n = draw(st.integers(2, 6))
    kwargs = dict(num_neurons=n, d_state=draw(st.integers(1, 3)))
    if name in ("S6", "Mamba"):
        kwargs["dt_rank"] = draw(st.sampled_from([-1, 1, 2]))
    if name == "Mamba":
        kwargs["conv_kernel"] = draw(st.sampled_from([0, 1, 2, 4]))
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    axis = draw(st.integers(0, len(batch)))
    step_shape = tuple(batch[:axis]) + (n,) + tuple(batch[axis:])
    ndim = len(step_shape)
    dim = axis - ndim if draw(st.booleans()) else axis
    time_dim = draw(st.integers(-(ndim + 1), ndim))  # any axis of the (ndim + 1)-d sequence
    return Case(
        name=name,
        kwargs=kwargs,
        step_shape=step_shape,
        axis=axis,
        dim=dim,
        time_dim=time_dim,
        steps=draw(st.integers(1, 12)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def weights_for(case: Case) -> dict:
    """Float64 weights from the case's seed that exercise the dynamics (decays well inside (0, 1))."""
    rng = np.random.default_rng(case.seed)
    shapes = ssm_core.LAYERS[case.name].config(**case.kwargs).param_shapes()
    out = {}
    for key, shape in shapes.items():
        if key == "A_log":
            value = rng.uniform(-1.0, 1.5, shape)
        elif key == "log_dt":
            value = rng.uniform(np.log(1e-2), np.log(1.0), shape)
        elif key == "dt_proj.bias":
            value = rng.uniform(-3.0, 0.5, shape)
        else:
            value = 0.6 * rng.standard_normal(shape)
        out[key] = value
    return out


def inputs(case: Case, steps=None, salt=0) -> np.ndarray:
    """``[steps, *step_shape]`` inputs in the case's dtype."""
    rng = np.random.default_rng([case.seed, salt])
    return rng.standard_normal((case.steps if steps is None else steps, *case.step_shape)).astype(case.dtype)


# ----------------------------------------------------------------------------- bindings


class Binding:
    """Make, feed and read a layer of one binding from NumPy arrays."""

    def __init__(self, name: str):
        self.name = name
        self.mod = None if name == "torch" else importlib.import_module(f"backends.{name}")

    def make(self, case: Case, dim=None, weights=None):
        kwargs = {**case.kwargs, "dim": case.dim if dim is None else dim}
        weights = weights_for(case) if weights is None else weights
        if self.mod is None:
            torch.manual_seed(0)
            layer = getattr(tt.ssm, case.name)(**kwargs).to(TORCH_DTYPES[case.dtype])
            layer.load_state_dict({k: torch.from_numpy(v).to(TORCH_DTYPES[case.dtype]) for k, v in weights.items()})
            return layer
        layer = getattr(self.mod, case.name)(**kwargs, dtype=case.dtype)
        layer.load_state_dict(weights)
        return layer

    def arr(self, value: np.ndarray):
        value = np.ascontiguousarray(value)
        return torch.from_numpy(value.copy()) if self.mod is None else self.mod.asarray(value.copy())

    def host(self, array) -> np.ndarray:
        if self.mod is None:
            return array.detach().numpy().copy()
        return np.array(self.mod.backend.to_numpy(array), copy=True)

    def step(self, layer, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.host(layer(self.arr(x)))

    def steps(self, layer, xs: np.ndarray) -> np.ndarray:
        """Step over ``xs`` ``[T, ...]``; the outputs stacked on axis 0."""
        return np.stack([self.step(layer, x) for x in xs]) if len(xs) else np.zeros(xs.shape, xs.dtype)

    def scan(self, layer, xs: np.ndarray, time_dim: int):
        with torch.no_grad():
            return self.host(layer.scan(self.arr(xs), time_dim=time_dim))

    def states(self, layer) -> dict:
        names = layer._state_names if self.mod is None else layer._states
        return {n: (None if getattr(layer, n) is None else self.host(getattr(layer, n))) for n in sorted(names)}

    def dtype_name(self, array) -> str:
        return str(array.dtype).rsplit(".", 1)[-1]


def binding(name: str) -> Binding:
    if name != "torch":
        if not _AVAILABLE:
            _AVAILABLE.update(backends.available())
        if _AVAILABLE[name] is not None:
            pytest.skip(_AVAILABLE[name])
    return Binding(name)


def check(bname: str, prop) -> None:
    """Run ``prop(binding, case)`` on hypothesis-drawn cases."""
    b = binding(bname)

    @settings(
        max_examples=EXAMPLES[bname],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases())
    def run(case):
        prop(b, case)

    run()


def to_time_dim(xs: np.ndarray, case: Case) -> np.ndarray:
    """``[T, *step_shape]`` -> the sequence layout with time at ``case.time_dim``."""
    return np.moveaxis(xs, 0, case.time_dim % xs.ndim)


def from_time_dim(ys: np.ndarray, case: Case) -> np.ndarray:
    return np.moveaxis(ys, case.time_dim % ys.ndim, 0)


def assert_close(got: np.ndarray, expected: np.ndarray, dtype: str, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    err = rel_err(got, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def assert_states_close(got: dict, expected: dict, dtype: str) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert (got[key] is None) == (value is None), key
        if value is not None:
            assert_close(got[key], value, dtype, f"state {key}")


# ----------------------------------------------------------------------------- properties


def _shape_contract(b: Binding, case: Case) -> None:
    layer = b.make(case)
    xs = inputs(case)
    with torch.no_grad():
        y = layer(b.arr(xs[0]))
    assert tuple(y.shape) == case.step_shape
    assert b.dtype_name(y) == case.dtype
    config = ssm_core.LAYERS[case.name].config(**case.kwargs)
    slots = {slot.name: slot for slot in config.state_slots()}
    states = b.states(layer)
    assert set(states) == set(slots)
    for name, value in states.items():
        slot = slots[name]
        assert value.shape == expected_state_shape(case.step_shape, case.axis, slot.size, slot.trailing), name
        assert value.dtype == np.dtype(case.dtype), name
    seq = to_time_dim(xs, case)
    ys = b.scan(layer, seq, case.time_dim)
    assert ys.shape == seq.shape == case.xs_shape
    assert ys.dtype == np.dtype(case.dtype)
    for name, value in b.states(layer).items():  # the same layout after a sequence
        assert value.shape == states[name].shape, name


@pytest.mark.parametrize("bname", BINDINGS)
def test_output_shape_equals_input_shape(bname):
    check(bname, _shape_contract)


def _state_to_last(value: np.ndarray, axis: int, trailing: bool) -> np.ndarray:
    """A state with its feature axis at ``axis`` moved to the features-last layout."""
    return np.moveaxis(value, axis, -2 if trailing else -1)


def _moving_dim(b: Binding, case: Case) -> None:
    weights = weights_for(case)
    at_dim = b.make(case, weights=weights)
    last = b.make(case, dim=-1, weights=weights)
    xs = inputs(case)
    ys_dim = b.steps(at_dim, xs)
    ys_last = b.steps(last, np.moveaxis(xs, 1 + case.axis, -1))
    assert_close(ys_dim, np.moveaxis(ys_last, -1, 1 + case.axis), case.dtype, "outputs")
    config = ssm_core.LAYERS[case.name].config(**case.kwargs)
    trailing = {slot.name: slot.trailing is not None for slot in config.state_slots()}
    s_dim, s_last = b.states(at_dim), b.states(last)
    for name in trailing:
        assert_close(_state_to_last(s_dim[name], case.axis, trailing[name]), s_last[name], case.dtype, f"state {name}")


@pytest.mark.parametrize("bname", BINDINGS)
def test_moving_dim_gives_the_same_numbers_transposed(bname):
    check(bname, _moving_dim)


def _zero_states(b: Binding, case: Case) -> None:
    weights = weights_for(case)
    used = b.make(case, weights=weights)
    b.steps(used, inputs(case, steps=3, salt=1))  # some history
    b.scan(used, to_time_dim(inputs(case, steps=2, salt=2), case), case.time_dim)
    used.zero_states()
    assert all(v is None for v in b.states(used).values())
    fresh = b.make(case, weights=weights)
    xs = inputs(case)
    np.testing.assert_array_equal(b.steps(used, xs), b.steps(fresh, xs))
    used.zero_states()
    fresh = b.make(case, weights=weights)
    seq = to_time_dim(xs, case)
    np.testing.assert_array_equal(b.scan(used, seq, case.time_dim), b.scan(fresh, seq, case.time_dim))
    for name, value in b.states(fresh).items():
        np.testing.assert_array_equal(b.states(used)[name], value)


@pytest.mark.parametrize("bname", BINDINGS)
def test_zero_states_resets_exactly(bname):
    check(bname, _zero_states)


def _step_equals_scan(b: Binding, case: Case) -> None:
    weights = weights_for(case)
    stepper, scanner = b.make(case, weights=weights), b.make(case, weights=weights)
    warmup = inputs(case, steps=2, salt=3)
    b.steps(stepper, warmup)  # both start from the same held, non-zero states
    b.steps(scanner, warmup)
    xs = inputs(case)
    stepped = b.steps(stepper, xs)
    scanned = b.scan(scanner, to_time_dim(xs, case), case.time_dim)
    assert scanned.shape == case.xs_shape
    assert_close(from_time_dim(scanned, case), stepped, case.dtype, "outputs")
    assert_states_close(b.states(scanner), b.states(stepper), case.dtype)


@pytest.mark.parametrize("bname", BINDINGS)
def test_step_equals_scan(bname):
    check(bname, _step_equals_scan)


def _split_scan(b: Binding, case: Case, split: int) -> None:
    weights = weights_for(case)
    whole, parts = b.make(case, weights=weights), b.make(case, weights=weights)
    xs = inputs(case)
    one = b.scan(whole, to_time_dim(xs, case), case.time_dim)
    first = b.scan(parts, to_time_dim(xs[:split], case), case.time_dim)
    second = b.scan(parts, to_time_dim(xs[split:], case), case.time_dim)
    time = case.time_dim % one.ndim
    assert first.shape[time] == split and second.shape[time] == case.steps - split
    assert_close(np.concatenate([first, second], axis=time), one, case.dtype, f"split at {split}")
    assert_states_close(b.states(parts), b.states(whole), case.dtype)


@pytest.mark.parametrize("bname", BINDINGS)
def test_scan_split_at_any_point_equals_one_scan(bname):
    b = binding(bname)

    @settings(
        max_examples=EXAMPLES[bname],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases(), data=st.data())
    def run(case, data):
        _split_scan(b, case, data.draw(st.integers(0, case.steps), label="split"))

    run()
