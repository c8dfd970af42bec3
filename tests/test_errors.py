"""Mistakes get clear errors and change nothing, on every binding, for one step and for a sequence.

A wrong feature size, a batch shape changed while states are held, a
non-floating, complex or other-dtype input, ``dim``/``time_dim`` out of range,
an array of another library or device, invalid constructor arguments, or an
exception inside the math itself: ``ValueError`` or ``TypeError`` (the
exception itself for the last) naming the layer class and what was wrong,
and the layer's parameters and states exactly as they were, held states not
even replaced, whether states were held or not. The layer then carries on
as if the mistake had not happened.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ssm_core
from conftest import ALL, D_STATE, N, unusable

T = 3
MODES = ["step", "scan"]
HELD = [False, True]


def held_layer(b, case, held, dim=-1, shape=(2, N), dtype="float32"):
    """A layer whose states are None, or held after two steps on inputs of ``shape``."""
    _, name, kwargs = case
    layer = b.make(name, {**kwargs, "dim": dim}, dtype=dtype)
    if held:
        rng = np.random.default_rng(1)
        for i in range(2):
            x = b.asarray(rng.standard_normal(shape).astype(dtype))
            if b.mod is None and i == 0:  # torch: states attached to a graph, as in training
                layer(x.requires_grad_(True))
            else:
                b.step(layer, x)
        assert all(v is not None for v in b.states(layer).values())
    return layer


def run_modes(b, layer, step_input, mode, exc, label, raw=False, words=()):
    """``layer`` given ``step_input`` as one step, or ``T`` of them as a sequence; the problems.

    ``step_input`` is a NumPy array converted to the binding's arrays, or with
    ``raw`` an object given as it is (then the whole sequence for ``scan``).
    """
    if mode == "step":
        x = step_input if raw else b.asarray(step_input)
        return b.expect_error(layer, f"step {label}", lambda: b.step(layer, x), exc, words=words)
    xs = step_input if raw else b.asarray(np.stack([step_input] * T))
    return b.expect_error(layer, f"scan {label}", lambda: b.scan(layer, xs), exc, words=words)


def each_layer(b, case, make=held_layer, **kwargs):
    """``(held, mode, layer)`` for states none and held, step and scan: a fresh layer each."""
    for held in HELD:
        for mode in MODES:
            yield f"{'held' if held else 'none'} {mode}", mode, make(b, case, held, **kwargs)


def report(problems):
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- input


@pytest.mark.parametrize("case", ALL)
def test_wrong_feature_size(binding, case):
    b, problems = binding, []
    for where, mode, layer in each_layer(b, case):
        for shape in [(2, N + 1), (2, N - 1), (N, 2), (2, 1)]:  # (N, 2): the features on the wrong axis
            problems += run_modes(b, layer, np.ones(shape, np.float32), mode, ValueError, f"{where} {shape}",
                                  words=(f"{N} features",))
    for where, mode, layer in each_layer(b, case, dim=0, shape=(N, 3)):  # the features first
        problems += run_modes(b, layer, np.ones((3, N), np.float32), mode, ValueError, f"dim=0 {where} (3, N)",
                              words=(f"{N} features",))
    report(problems)


@pytest.mark.parametrize("case", ALL)
def test_batch_shape_changed_while_states_are_held(binding, case):
    """The error says how to recover (``zero_states``), and after it each shape steps as from a fresh layer."""
    b, problems = binding, []
    shapes = [(3, N), (1, N), (N,), (1, 2, N), (2, 1, N)]
    for mode in MODES:
        layer = held_layer(b, case, held=True)
        for shape in shapes:
            problems += run_modes(b, layer, np.ones(shape, np.float32), mode, ValueError, f"{shape}",
                                  words=("zero_states",))
        middle = held_layer(b, case, held=True, dim=1, shape=(2, N, 3))
        problems += run_modes(b, middle, np.ones((2, N, 4), np.float32), mode, ValueError, "dim=1 (2, N, 4)",
                              words=("zero_states",))
    report(problems)
    for shape in shapes:
        b.zero_states(layer)
        assert all(v is None for v in b.states(layer).values())
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        y = b.step(layer, b.asarray(x))
        assert tuple(y.shape) == shape
        fresh = held_layer(b, case, held=False)
        np.testing.assert_array_equal(b.to_numpy(y), b.to_numpy(b.step(fresh, b.asarray(x))))


NON_FLOATING = ["int32", "int64", "bool", "complex64", "complex128"]


@pytest.mark.parametrize("case", ALL)
def test_non_floating_and_complex_input(binding, case):
    """Integer, bool and complex inputs are a TypeError: never cast to float, stepped, and cast back."""
    b, problems = binding, []
    dtypes = [d for d in NON_FLOATING if not (b.name == "mlx" and d == "complex128")]  # MLX has no complex128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy's ComplexWarning when a binding casts complex to real
        for where, mode, layer in each_layer(b, case):
            for dtype in dtypes:
                x = (np.arange(2 * N).reshape(2, N) % 3).astype(dtype)
                problems += run_modes(b, layer, x, mode, TypeError, f"{where} {dtype}", words=("floating",))
    report(problems)


@pytest.mark.parametrize("case", ALL)
def test_floating_input_of_another_dtype(binding, case):
    b, problems = binding, []
    for dtype, other in [("float32", np.float64), ("float64", np.float32)]:
        for where, mode, layer in each_layer(b, case, dtype=dtype):
            problems += run_modes(b, layer, np.ones((2, N), other), mode, TypeError, f"{dtype} layer {where}",
                                  words=("dtype",))
    report(problems)


@pytest.mark.parametrize("case", ALL)
def test_dim_and_time_dim_out_of_range(binding, case):
    b, problems = binding, []
    # dim=2 needs a step input of >= 3 axes, dim=-3 too.
    for dim, good_shape in [(2, (2, 3, N)), (-3, (N, 2, 3))]:
        for where, mode, layer in each_layer(b, case, dim=dim, shape=good_shape):
            for bad in [np.ones((2, N) if dim == 2 else (N, 2), np.float32), np.ones((N,), np.float32)]:
                # scan: the step input is xs without its time axis
                problems += run_modes(b, layer, bad, mode, ValueError, f"dim={dim} {where} {bad.shape}",
                                      words=("dim",))
    for held in HELD:
        layer = held_layer(b, case, held)
        xs = b.asarray(np.ones((T, 2, N), np.float32))
        for time_dim in (3, -4, 10):
            problems += b.expect_error(layer, f"time_dim={time_dim}", lambda: b.scan(layer, xs, time_dim=time_dim),
                                       ValueError, words=("time_dim",))
        for time_dim in (1.0, None, True, "0"):
            problems += b.expect_error(layer, f"time_dim={time_dim!r}",
                                       lambda: b.scan(layer, xs, time_dim=time_dim), TypeError)
        scalar = b.asarray(np.ones((), np.float32))
        problems += b.expect_error(layer, "0-d step input", lambda: b.step(layer, scalar), ValueError)
        one_axis = b.asarray(np.ones((N,), np.float32))  # a sequence without a feature axis left
        problems += b.expect_error(layer, "1-d sequence", lambda: b.scan(layer, one_axis), ValueError,
                                   words=("sequence",))
    report(problems)


def _foreign(bname: str, x: np.ndarray) -> dict:
    """``x`` as arrays of every library other than ``bname``'s, and as a list."""
    import array_api_strict

    out = {}
    if bname != "torch":
        out["torch.Tensor"] = torch.from_numpy(x.copy())
    if bname != "numpy":
        out["numpy.ndarray"] = x.copy()
    if bname != "array_api_strict":
        out["array_api_strict"] = array_api_strict.asarray(x.copy())
    if bname != "mlx" and unusable()["mlx"] is None:
        import mlx.core as mx

        out["mlx.core.array"] = mx.array(x)
    out["list"] = x.tolist()
    return out


@pytest.mark.parametrize("case", ALL)
def test_array_of_another_library(binding, case):
    """A TypeError; a backend's says how to convert (``backends.<name>.asarray``)."""
    b, problems = binding, []
    words = () if b.mod is None else ("asarray",)
    for where, mode, layer in each_layer(b, case):
        x = np.ones((2, N) if mode == "step" else (T, 2, N), np.float32)
        for kind, foreign in _foreign(b.name, x).items():
            problems += run_modes(b, layer, foreign, mode, TypeError, f"{where} a {kind}", raw=True, words=words)
    report(problems)


@pytest.mark.parametrize("binding", ["torch", "array_api_strict"], indirect=True)
@pytest.mark.parametrize("case", ALL)
def test_array_on_another_device(binding, case):
    """torch: a 'meta' tensor into a CPU layer; array_api_strict: an array on its 'device1'."""
    b, problems = binding, []
    for where, mode, layer in each_layer(b, case):
        shape = (2, N) if mode == "step" else (T, 2, N)
        if b.name == "torch":
            x = torch.ones(shape, device="meta")
        else:
            import array_api_strict as xp

            x = xp.ones(shape, dtype=xp.float32, device=xp.Device("device1"))
        problems += run_modes(b, layer, x, mode, ValueError, f"{where} another device", raw=True)
    report(problems)


# ----------------------------------------------------------------------------- failures mid-step, recovery


@pytest.mark.parametrize("case", ALL)
def test_failure_inside_the_math_stores_nothing(binding, case, monkeypatch):
    """An exception raised by the math itself, mid-step, leaves the states as they were."""

    class Boom(RuntimeError):
        pass

    def boom(*args, **kwargs):
        raise Boom(f"{case[1]}: boom")

    layers = list(each_layer(binding, case))
    # The zero-order hold runs mid-step (for Mamba after its conv buffer was shifted).
    monkeypatch.setattr(ssm_core.lti, "zoh_terms", boom)
    monkeypatch.setattr(ssm_core.selective, "discretized", boom)
    problems = []
    for where, mode, layer in layers:
        problems += run_modes(binding, layer, np.ones((2, N), np.float32), mode, Boom, where)
    report(problems)


def test_error_after_error_then_recovery(binding):
    b = binding
    layer = b.make("Mamba", dict(num_neurons=N, d_state=D_STATE), dtype="float64")
    xs = np.random.default_rng(3).standard_normal((4, 2, N))
    ref = b.steps(layer, xs)
    b.zero_states(layer)
    out = []
    for t, x in enumerate(xs):
        bads = [np.ones((2, N + 1)), x.astype(np.float32), x.astype(np.int64)]
        if t > 0:  # states held: a new batch shape is an error too
            bads.append(np.ones((3, N)))
        for bad in bads:
            with pytest.raises((ValueError, TypeError)):
                b.step(layer, b.asarray(bad))
        out.append(b.to_numpy(b.step(layer, b.asarray(x))))
    np.testing.assert_array_equal(np.stack(out), ref)


# ----------------------------------------------------------------------------- constructor arguments


BAD_ARGUMENTS = {
    "num_neurons": [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError),
                    (None, TypeError)],
    "d_state": [(0, ValueError), (-3, ValueError), (2.5, TypeError), (1.5, TypeError), (True, TypeError),
                ("4", TypeError), (None, TypeError)],
    "dt_rank": [(0, ValueError), (-2, ValueError), (2.5, TypeError), (1.0, TypeError), (False, TypeError),
                (True, TypeError), ("4", TypeError), (None, TypeError)],
    "conv_kernel": [(-1, ValueError), (-5, ValueError), (2.5, TypeError), (2.0, TypeError), (True, TypeError),
                    (False, TypeError), ("4", TypeError), (None, TypeError)],
    "dim": [(2.5, TypeError), (1.0, TypeError), (True, TypeError), ("0", TypeError), ("a", TypeError),
            (None, TypeError)],
}
ARGUMENTS_OF = {
    "S4": ["num_neurons", "d_state", "dim"],
    "S5": ["num_neurons", "d_state", "dim"],
    "S6": ["num_neurons", "d_state", "dt_rank", "dim"],
    "Mamba": ["num_neurons", "d_state", "dt_rank", "conv_kernel", "dim"],
}


@pytest.mark.parametrize("name", list(ARGUMENTS_OF))
def test_invalid_constructor_arguments(binding, name):
    """The error names the layer and the argument; a backend also rejects a dtype that is not floating."""
    cls = binding.cls(name)
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
                    problems.append(f"{label}: message names not both the layer and {arg}: {message}")
            else:
                problems.append(f"{label}: accepted")
    if binding.mod is not None:
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
    report(problems)


@pytest.mark.parametrize("name", list(ARGUMENTS_OF))
def test_smallest_valid_arguments(binding, name):
    """One feature and a state of one build and step; ``conv_kernel`` 0 or 1 means no convolution."""
    b, cls = binding, binding.cls(name)
    x = b.asarray(np.ones((3, 1), np.float32))
    assert tuple(b.step(cls(num_neurons=1, d_state=1), x).shape) == (3, 1)
    if name in ("S6", "Mamba"):
        default, five = cls(N, dt_rank=-1), cls(N, dt_rank=5)
        assert b.params(default)["dt_proj.weight"].shape == (N, 1)  # max(1, N // 16)
        assert b.params(five)["dt_proj.weight"].shape == (N, 5)
        if b.mod is None:
            assert default.dt_rank == 1 and five.dt_proj.in_features == 5
    if name == "Mamba":
        for kernel in (0, 1):
            layer = cls(N, d_state=3, conv_kernel=kernel)
            assert "conv_buffer" not in b.state_names(layer)
            assert "conv_weights" not in layer.state_dict()
            assert not hasattr(layer, "conv_weights")
            y = b.step(layer, b.asarray(np.ones((2, N), np.float32)))
            assert tuple(y.shape) == (2, N)
