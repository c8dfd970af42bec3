"""``ssm_core``'s public steps and scans check their arguments, cheaply, and say which function complained.

Shapes and dtypes only: a non-floating input, input/state/parameter dtypes
that differ, a state whose batch shape is not the input's, a wrong feature
size, a sequence without a time axis.
"""

from __future__ import annotations

import numpy as np
import pytest

import ssm_core
from backends.numpy import Mamba, S4, S5, S6

N, D_STATE, BATCH = 8, 3, 5
LAYERS = {
    "s4": (S4, ssm_core.S4, dict(d_state=D_STATE)),
    "s5": (S5, ssm_core.S5, dict(d_state=D_STATE)),
    "s6": (S6, ssm_core.S6, dict(d_state=D_STATE)),
    "mamba": (Mamba, ssm_core.Mamba, dict(d_state=D_STATE)),
    "mamba_noconv": (Mamba, ssm_core.Mamba, dict(d_state=D_STATE, conv_kernel=1)),
}


def _setup(key, dtype=np.float64, batch=(BATCH,)):
    cls, spec, kwargs = LAYERS[key]
    layer = cls(N, dtype=dtype, seed=0, **kwargs)
    params = spec.params_from_mapping(layer.state_dict())
    state = spec.zero_state(layer.config, batch, ssm_core.namespace(params.A_log), dtype)
    name = key.split("_")[0]
    return spec, params, state, name


def _call(spec, name, mode, x, state, params):
    function = getattr(ssm_core, f"{name}_{mode}")
    return function(x, state, params)


def _input(mode, shape, dtype=np.float64):
    return np.ones(((4,) if mode == "scan" else ()) + shape, dtype)


@pytest.mark.parametrize("mode", ["step", "scan"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_good_arguments_pass(key, mode):
    spec, params, state, name = _setup(key)
    y, new_state = _call(spec, name, mode, _input(mode, (BATCH, N)), state, params)
    assert y.shape == _input(mode, (BATCH, N)).shape and type(new_state) is type(state)


@pytest.mark.parametrize("mode", ["step", "scan"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_non_floating_input(key, mode):
    spec, params, state, name = _setup(key)
    with pytest.raises(TypeError, match=rf"{name}_{mode}: expected a real floating-point input, got dtype int64"):
        _call(spec, name, mode, _input(mode, (BATCH, N), np.int64), state, params)


@pytest.mark.parametrize("mode", ["step", "scan"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_input_state_and_parameters_share_a_dtype(key, mode):
    spec, params, state, name = _setup(key, dtype=np.float32)
    with pytest.raises(TypeError, match=rf"{name}_{mode}: .*float64.*float32"):
        _call(spec, name, mode, _input(mode, (BATCH, N), np.float64), state, params)
    wide_state = type(state)(*(None if s is None else s.astype(np.float64) for s in state))
    with pytest.raises(TypeError, match=rf"{name}_{mode}: .*float32.*float64"):
        _call(spec, name, mode, _input(mode, (BATCH, N), np.float32), wide_state, params)


@pytest.mark.parametrize("mode", ["step", "scan"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_state_batch_shape_equals_the_input_batch_shape(key, mode):
    spec, params, state, name = _setup(key, batch=(1,))  # would broadcast silently against batch 5
    with pytest.raises(ValueError, match=rf"{name}_{mode}: .*batch shape \(5,\).*\(1,\)"):
        _call(spec, name, mode, _input(mode, (BATCH, N)), state, params)


@pytest.mark.parametrize("mode", ["step", "scan"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_feature_size_matches_the_parameters(key, mode):
    spec, params, state, name = _setup(key)
    with pytest.raises(ValueError, match=rf"{name}_{mode}: expected {N} features on the last axis, got 7"):
        _call(spec, name, mode, _input(mode, (BATCH, 7)), state, params)


@pytest.mark.parametrize("key", list(LAYERS))
def test_scan_needs_a_time_axis(key):
    spec, params, state, name = _setup(key, batch=())
    with pytest.raises(ValueError, match=rf"{name}_scan: expected a sequence \[T, \.\.\., {N}\]"):
        _call(spec, name, "scan", np.ones((N,)), state, params)


@pytest.mark.parametrize("key", list(LAYERS))
def test_state_of_the_wrong_kind(key):
    spec, params, state, name = _setup(key)
    with pytest.raises(TypeError, match=rf"{name}_step: expected state of type {type(state).__name__}"):
        _call(spec, name, "step", _input("step", (BATCH, N)), tuple(state) + (None,), params)
