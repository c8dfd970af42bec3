"""Property-based tests of the layer contract on every binding (hypothesis).

Over layer (S4, S5, S6, Mamba with its ``dt_rank`` and ``conv_kernel``
variants), binding (torch and every backend; MLX with fewer examples),
batch shape (0-3 axes of sizes 1-3), the feature axis ``dim`` (any valid axis,
positive or negative), the sequence's ``time_dim``, its length (1-150) and dtype
(float32, float64):

- outputs have the input's shape and dtype; states have the documented layout;
- moving ``dim`` gives the same numbers, transposed (outputs and states);
- ``zero_states()`` resets exactly: the same outputs as a fresh layer;
- stepping and ``scan`` (outputs and final states) each equal the float64
  NumPy oracle (``numpy_oracle.py``), for every form a scan takes (scan
  against stepping directly: ``test_scan_equals_step.py``);
- a sequence scanned in two parts equals one scan of it, and the oracle.

The scans change form with the length: S4 and S5 step below
``S4_CHUNKED_FROM``/``S5_CHUNKED_FROM`` steps and work in chunks of at most
``S4_CHUNK``/``S5_CHUNK`` steps above, S6 and Mamba in blocks of
``SCAN_BLOCK`` steps. The lengths drawn always include the lengths at those
edges, and the oracle and split tests run once per layer and form
(``FORMS``), so every form is met whatever hypothesis draws.

The examples are derandomized: the suite draws the same ones on every run and
machine, so a failure reproduces and CI never flakes on a new draw; the forms
and edge lengths above are what make the fixed draw cover the boundaries. Set
``SSM_PROPERTY_EXPLORE=1`` to draw new examples on each run.

Layers are small (2-6 features, ``d_state`` 1-3) with ``random_weights`` of a drawn seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numpy_oracle
import ssm_core
import ssm_core.fused
from conftest import TOL, random_weights, rel_err
from ssm_core.layout import expected_state_shape
from ssm_core.lti import S4_CHUNK, S4_CHUNKED_FROM, S5_CHUNK, S5_CHUNKED_FROM
from ssm_core.selective import SCAN_BLOCK

# Examples per test and binding: the general properties, and each (layer, form) of the oracle properties.
EXAMPLES = {"torch": 30, "numpy": 30, "array_api_strict": 20, "mlx": 10, "cupy": 20}
FORM_EXAMPLES = {"torch": 6, "numpy": 6, "array_api_strict": 4, "mlx": 3, "cupy": 4}
DERANDOMIZE = os.environ.get("SSM_PROPERTY_EXPLORE", "") in ("", "0")

LONGEST = 150  # over two S4/S5 chunks and four S6/Mamba blocks
# Lengths at the edges where a scan changes form.
EDGE_LENGTHS = sorted({
    1, S4_CHUNKED_FROM - 1, S4_CHUNKED_FROM, S4_CHUNK, S4_CHUNK + 1, S5_CHUNKED_FROM - 1, S5_CHUNKED_FROM,
    S5_CHUNK, S5_CHUNK + 1, SCAN_BLOCK, SCAN_BLOCK + 1, 2 * SCAN_BLOCK, LONGEST,
})
assert EDGE_LENGTHS[-1] == LONGEST, "a scan's form changes beyond LONGEST: raise it"
# (layer, form, shortest, longest): the lengths at which each layer's eager scan takes each of its forms.
# A chunk or block has at most S4_CHUNK, S5_CHUNK or SCAN_BLOCK steps, so a longer sequence has two or more.
FORMS = [
    ("S4", "stepped", 1, S4_CHUNKED_FROM - 1),
    ("S4", "chunked", S4_CHUNKED_FROM, S4_CHUNK),
    ("S4", "chunks", S4_CHUNK + 1, LONGEST),
    ("S5", "stepped", 1, S5_CHUNKED_FROM - 1),
    ("S5", "chunked", S5_CHUNKED_FROM, S5_CHUNK),
    ("S5", "chunks", S5_CHUNK + 1, LONGEST),
    ("S6", "one-block", 1, SCAN_BLOCK),
    ("S6", "blocks", SCAN_BLOCK + 1, LONGEST),
    ("Mamba", "one-block", 1, SCAN_BLOCK),
    ("Mamba", "blocks", SCAN_BLOCK + 1, LONGEST),
]
FORM_PARAMS = [pytest.param(layer, lo, hi, id=f"{layer}-{form}") for layer, form, lo, hi in FORMS]


def lengths(shortest: int = 1, longest: int = LONGEST):
    """Sequence lengths in ``[shortest, longest]``: the ends and the edge lengths between, or any."""
    edges = sorted({shortest, longest, *(n for n in EDGE_LENGTHS if shortest <= n <= longest)})
    return st.one_of(st.sampled_from(edges), st.integers(shortest, longest))


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
def cases(draw, layers=("S4", "S5", "S6", "Mamba"), steps=None) -> Case:
    name = draw(st.sampled_from(layers))
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
        steps=draw(lengths() if steps is None else steps),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def inputs(case: Case, steps=None, salt=0) -> np.ndarray:
    """``[steps, *step_shape]`` inputs in the case's dtype."""
    rng = np.random.default_rng([case.seed, salt])
    return rng.standard_normal((case.steps if steps is None else steps, *case.step_shape)).astype(case.dtype)


# ----------------------------------------------------------------------------- driving a binding


def make(b, case: Case, dim=None):
    """The case's layer on binding ``b``, features at ``dim`` (by default the case's)."""
    kwargs = {**case.kwargs, "dim": case.dim if dim is None else dim}
    return b.make(case.name, kwargs, case.dtype, random_weights(case.name, case.kwargs, case.seed))


def scan(b, layer, xs: np.ndarray, time_dim: int) -> np.ndarray:
    return b.to_numpy(b.scan(layer, b.asarray(xs), time_dim=time_dim))


def check(b, prop, data: bool = False, strategy=None, examples=None) -> None:
    """Run ``prop(b, case)`` (with ``data``: ``prop(b, case, data)``) on hypothesis-drawn cases.

    ``strategy`` draws the cases (by default :func:`cases`), ``examples`` how
    many (by default ``EXAMPLES`` of the binding).
    """

    @settings(
        max_examples=EXAMPLES[b.name] if examples is None else examples,
        deadline=None,
        derandomize=DERANDOMIZE,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases() if strategy is None else strategy, data=st.data() if data else st.none())
    def run(case, data):
        if data is None:
            prop(b, case)
        else:
            prop(b, case, data)

    run()


@pytest.fixture(autouse=True)
def eager_scans(monkeypatch):
    """Eager scans only: these properties hold the eager path to the oracle (``test_fused.py`` holds the
    compiled blocks to it), and a compiled block per drawn shape would take minutes."""
    monkeypatch.setenv(ssm_core.fused.ENV_VAR, "0")


def oracle(case: Case, xs: np.ndarray) -> tuple:
    """The float64 oracle over ``xs`` ``[T, *step_shape]`` from zero states: ``(outputs, final states)``.

    It gets the weights the binding holds, rounded to the case's dtype, so
    that only the binding's arithmetic separates the two.
    """
    weights = random_weights(case.name, case.kwargs, case.seed)
    weights = {k: v.astype(case.dtype).astype(np.float64) for k, v in weights.items()}
    return numpy_oracle.run(case.name, {**case.kwargs, "dim": case.dim}, weights, xs.astype(np.float64))


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


def _shape_contract(b, case: Case) -> None:
    layer = make(b, case)
    xs = inputs(case)
    y = b.step(layer, b.asarray(xs[0]))
    assert tuple(y.shape) == case.step_shape
    assert b.dtype_name(y) == case.dtype
    config = ssm_core.LAYERS[case.name].config(**case.kwargs)
    slots = {slot.name: slot for slot in config.state_slots()}
    states = b.host_states(layer)
    assert set(states) == set(slots)
    for name, value in states.items():
        slot = slots[name]
        assert value.shape == expected_state_shape(case.step_shape, case.axis, slot.size, slot.trailing), name
        assert value.dtype == np.dtype(case.dtype), name
    seq = to_time_dim(xs, case)
    ys = scan(b, layer, seq, case.time_dim)
    assert ys.shape == seq.shape == case.xs_shape
    assert ys.dtype == np.dtype(case.dtype)
    for name, value in b.host_states(layer).items():  # the same layout after a sequence
        assert value.shape == states[name].shape, name


def test_output_shape_equals_input_shape(binding):
    check(binding, _shape_contract)


def _state_to_last(value: np.ndarray, axis: int, trailing: bool) -> np.ndarray:
    """A state with its feature axis at ``axis`` moved to the features-last layout."""
    return np.moveaxis(value, axis, -2 if trailing else -1)


def _moving_dim(b, case: Case) -> None:
    at_dim, last = make(b, case), make(b, case, dim=-1)
    xs = inputs(case)
    ys_dim = b.steps(at_dim, xs)
    ys_last = b.steps(last, np.moveaxis(xs, 1 + case.axis, -1))
    assert_close(ys_dim, np.moveaxis(ys_last, -1, 1 + case.axis), case.dtype, "outputs")
    config = ssm_core.LAYERS[case.name].config(**case.kwargs)
    trailing = {slot.name: slot.trailing is not None for slot in config.state_slots()}
    s_dim, s_last = b.host_states(at_dim), b.host_states(last)
    for name in trailing:
        assert_close(_state_to_last(s_dim[name], case.axis, trailing[name]), s_last[name], case.dtype, f"state {name}")


def test_moving_dim_gives_the_same_numbers_transposed(binding):
    check(binding, _moving_dim)


def _zero_states(b, case: Case) -> None:
    used = make(b, case)
    b.steps(used, inputs(case, steps=3, salt=1))  # some history
    scan(b, used, to_time_dim(inputs(case, steps=2, salt=2), case), case.time_dim)
    used.zero_states()
    assert all(v is None for v in b.states(used).values())
    fresh = make(b, case)
    xs = inputs(case)
    np.testing.assert_array_equal(b.steps(used, xs), b.steps(fresh, xs))
    used.zero_states()
    fresh = make(b, case)
    seq = to_time_dim(xs, case)
    np.testing.assert_array_equal(scan(b, used, seq, case.time_dim), scan(b, fresh, seq, case.time_dim))
    for name, value in b.host_states(fresh).items():
        np.testing.assert_array_equal(b.host_states(used)[name], value)


def test_zero_states_resets_exactly(binding):
    check(binding, _zero_states)


def _step_and_scan_equal_the_oracle(b, case: Case) -> None:
    """From held, non-zero states (two steps in), stepping and one scan each give the oracle's numbers."""
    stepper, scanner = make(b, case), make(b, case)
    warmup = inputs(case, steps=2, salt=3)
    b.steps(stepper, warmup)  # both start from the same held, non-zero states
    b.steps(scanner, warmup)
    xs = inputs(case)
    stepped = b.steps(stepper, xs)
    scanned = scan(b, scanner, to_time_dim(xs, case), case.time_dim)
    assert scanned.shape == case.xs_shape
    expected, expected_states = oracle(case, np.concatenate([warmup, xs]))
    assert_close(stepped, expected[2:], case.dtype, "stepped outputs vs the oracle")
    assert_states_close(b.host_states(stepper), expected_states, case.dtype)
    assert_close(from_time_dim(scanned, case), expected[2:], case.dtype, "scanned outputs vs the oracle")
    assert_states_close(b.host_states(scanner), expected_states, case.dtype)


@pytest.mark.parametrize("layer, shortest, longest", FORM_PARAMS)
def test_step_and_scan_equal_the_oracle_in_every_scan_form(binding, layer, shortest, longest):
    check(binding, _step_and_scan_equal_the_oracle, strategy=cases(layers=(layer,), steps=lengths(shortest, longest)),
          examples=FORM_EXAMPLES[binding.name])


def _split_scan(b, case: Case, split: int) -> None:
    whole, parts = make(b, case), make(b, case)
    xs = inputs(case)
    one = scan(b, whole, to_time_dim(xs, case), case.time_dim)
    first = scan(b, parts, to_time_dim(xs[:split], case), case.time_dim)
    second = scan(b, parts, to_time_dim(xs[split:], case), case.time_dim)
    time = case.time_dim % one.ndim
    assert first.shape[time] == split and second.shape[time] == case.steps - split
    both = np.concatenate([first, second], axis=time)
    assert_close(both, one, case.dtype, f"split at {split}")
    assert_states_close(b.host_states(parts), b.host_states(whole), case.dtype)
    expected, expected_states = oracle(case, xs)
    assert_close(from_time_dim(both, case), expected, case.dtype, f"split at {split} vs the oracle")
    assert_states_close(b.host_states(parts), expected_states, case.dtype)


@pytest.mark.parametrize("layer, shortest, longest", FORM_PARAMS)
def test_scan_split_at_any_point_equals_one_scan_and_the_oracle(binding, layer, shortest, longest):
    check(binding, lambda b, case, data: _split_scan(b, case, data.draw(st.integers(0, case.steps), label="split")),
          data=True, strategy=cases(layers=(layer,), steps=lengths(shortest, longest)),
          examples=FORM_EXAMPLES[binding.name])
