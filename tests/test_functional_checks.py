"""``ssm_core``'s public steps and scans check their arguments, cheaply, and say which function complained.

Shapes, dtypes and libraries only: a non-floating input, input/state/parameter
dtypes that differ, arrays of two libraries, a parameter of another shape than
the layer's (even one that would broadcast), a convolution bias without its
kernel, a state whose batch shape is not the input's, a wrong feature size, a
sequence without a time axis; and a layer's options given as ``config=``,
which the parameters must then fit.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

import ssm_core
from backends.numpy import Mamba, S4, S5, S6

N, D_STATE, BATCH = 8, 3, 5
LAYERS = {
    "s4": (S4, ssm_core.S4, dict(d_state=D_STATE)),
    "s5": (S5, ssm_core.S5, dict(d_state=D_STATE)),
    "s6": (S6, ssm_core.S6, dict(d_state=D_STATE)),
    "mamba": (Mamba, ssm_core.Mamba, dict(d_state=D_STATE)),
    "mamba_noconv": (Mamba, ssm_core.Mamba, dict(d_state=D_STATE, conv_kernel=1)),
    # expand, the projection biases and no conv bias: sizes and presence the parameters show
    "mamba_wide": (Mamba, ssm_core.Mamba, dict(d_state=D_STATE, expand=2, bias=True, conv_bias=False)),
}


def _setup(key, dtype=np.float64, batch=(BATCH,)):
    cls, spec, kwargs = LAYERS[key]
    layer = cls(N, dtype=dtype, seed=0, **kwargs)
    params = spec.params_from_mapping(layer.state_dict())
    state = spec.zero_state(layer.config, batch, ssm_core.namespace(params.A_log), dtype)
    name = key.split("_")[0]
    return spec, params, state, name


def _call(spec, name, mode, x, state, params, **options):
    function = getattr(ssm_core, f"{name}_{mode}")
    return function(x, state, params, **options)


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


def _wrong_shapes(value):
    """Shapes a parameter must not take: one that broadcasts (size 1 on the last axis), 0-d, an extra axis."""
    if value.shape[-1] > 1:
        yield value[..., :1]
    yield np.asarray(value.reshape(-1)[0])
    yield value[None, ...]


@pytest.mark.parametrize("mode", ["step", "scan"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_every_parameter_has_exactly_the_layers_shape(key, mode):
    """``B (8, 1)``, ``C (1, 4)``, ``log_dt (1,)``, ``D ()`` ... would broadcast: each is refused,
    naming the parameter, the shape expected and the shape got."""
    spec, params, state, name = _setup(key)
    shapes = {field: shape for field, shape in zip(params._fields, params) if shape is not None}
    expected = {field: tuple(value.shape) for field, value in shapes.items()}
    for field, value in shapes.items():
        for bad in _wrong_shapes(value):
            wrong = params._replace(**{field: bad})
            with pytest.raises(ValueError) as caught:
                _call(spec, name, mode, _input(mode, (BATCH, N)), state, wrong)
            message = str(caught.value)
            assert message.startswith(f"{name}_{mode}: parameter "), message
            got = str(tuple(bad.shape))
            own = re.fullmatch(rf"{name}_{mode}: parameter {field} must have shape (\(.*?\)) \(.*\), got (\(.*\))", message)
            if own is not None:
                assert own.groups() == (str(expected[field]), got), message
            elif field == "conv_weights" and bad.ndim == 2:  # a kernel of 1: Mamba has no such convolution
                assert f"parameter conv_weights is given (shape {got}), but the layer of" in message, message
            elif f"parameter {field} must have" in message:  # A_log & co: the sizes are read from their axes
                assert message.endswith(f"got shape {got}"), message
            else:  # the sizes read from it make another parameter's shape wrong: the message shows both
                assert f" from " in message and f"{field} {got}" in message, message
                assert re.fullmatch(rf"{name}_{mode}: parameter \w+ must have shape \(.*?\) \(.*\), got \(.*\)", message)


@pytest.mark.parametrize("mode", ["step", "scan"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_arrays_of_two_libraries_are_named(key, mode):
    """A torch input with NumPy parameters (or states) names both libraries, not their dtypes."""
    spec, params, state, name = _setup(key, dtype=np.float32)
    x = torch.ones(_input(mode, (BATCH, N)).shape)
    with pytest.raises(TypeError, match=rf"{name}_{mode}: the input is a torch array \(torch.Tensor\), "
                                        r"parameter A_log a numpy array \(numpy.ndarray\)"):
        _call(spec, name, mode, x, state, params)
    torch_params = type(params)(*(None if p is None else torch.from_numpy(p) for p in params))
    field = state._fields[0]
    with pytest.raises(TypeError, match=rf"{name}_{mode}: the input is a torch array .*, state {field} a numpy array"):
        _call(spec, name, mode, x, state, torch_params)
    with pytest.raises(TypeError, match=rf"{name}_{mode}: the input is a numpy array .*, parameter D a builtins object"):
        _call(spec, name, mode, _input(mode, (BATCH, N), np.float32), state, params._replace(D=1.0))


@pytest.mark.parametrize("mode", ["step", "scan"])
def test_mamba_convolution_bias_needs_its_kernel(mode):
    spec, params, state, name = _setup("mamba")
    with pytest.raises(TypeError, match=rf"mamba_{mode}: parameter conv_bias is given but conv_weights is None"):
        _call(spec, name, mode, _input(mode, (BATCH, N)), state, params._replace(conv_weights=None))
    # A kernel without its bias is a convolution without bias (conv_bias=False), as the layer makes it.
    layer = Mamba(N, d_state=D_STATE, conv_bias=False, dtype=np.float64, seed=0)
    layer.load_state_dict({k: v for k, v in spec.params_to_mapping(params).items() if k != "conv_bias"})
    x = np.random.default_rng(0).standard_normal(_input(mode, (BATCH, N)).shape)
    y, _ = _call(spec, name, mode, x, state, params._replace(conv_bias=None))
    assert np.array_equal(y, layer.scan(x) if mode == "scan" else layer(x))


@pytest.mark.parametrize("mode", ["step", "scan"])
def test_mamba_without_convolution_takes_no_conv_buffer(mode):
    spec, params, state, name = _setup("mamba_noconv")
    buffer = np.zeros((BATCH, N, 4))
    with pytest.raises(ValueError, match=rf"mamba_{mode}: state conv_buffer is given \(shape \(5, 8, 4\)\), but the layer"):
        _call(spec, name, mode, _input(mode, (BATCH, N)), state._replace(conv_buffer=buffer), params)


@pytest.mark.parametrize("key", list(LAYERS))
def test_config_from_params_gives_back_the_layers_config(key):
    # Sizes other than the defaults, so that each is read from the parameters and not defaulted.
    cls, spec, kwargs = LAYERS[key]
    extra = {"s6": dict(dt_rank=2), "mamba": dict(dt_rank=3, conv_kernel=3)}.get(key, {})
    layer = cls(N, dtype=np.float32, seed=0, **kwargs, **extra)
    params = spec.params_from_mapping(layer.state_dict())
    assert spec.config.from_params(params) == dataclasses.replace(layer.config, dim=-1)


# ----------------------------------------------------------------------------- options: config=

OPTIONS = dict(expand=2, discretization="euler", residual=False, bias=True, conv_bias=False)


@pytest.mark.parametrize("mode", ["step", "scan"])
def test_config_gives_the_options_the_parameters_cannot_show(mode):
    """``config=`` carries the discretization and the residual: the numbers of the layer with those options."""
    layer = Mamba(N, d_state=D_STATE, dtype=np.float64, seed=0, **OPTIONS)
    spec = ssm_core.Mamba
    params = spec.params_from_mapping(layer.state_dict())
    state = spec.zero_state(layer.config, (BATCH,), ssm_core.namespace(params.A_log), np.float64)
    x = np.random.default_rng(1).standard_normal(_input(mode, (BATCH, N)).shape)
    y, new_state = _call(spec, "mamba", mode, x, state, params, config=layer.config)
    assert np.array_equal(y, layer.scan(x) if mode == "scan" else layer(x))
    assert new_state.ssm_state.shape == (BATCH, 2 * N, D_STATE)
    # Without it the parameters give the sizes, and the options are the defaults: other numbers.
    y_default, _ = _call(spec, "mamba", mode, x, state, params)
    assert np.abs(y_default - y).max() > 1e-3
    s6 = S6(N, d_state=D_STATE, discretization="euler", dtype=np.float64, seed=0)
    s6_params = ssm_core.S6.params_from_mapping(s6.state_dict())
    s6_state = ssm_core.S6.zero_state(s6.config, (BATCH,), np, np.float64)
    y, _ = _call(ssm_core.S6, "s6", mode, x, s6_state, s6_params, config=s6.config)
    assert np.array_equal(y, s6.scan(x) if mode == "scan" else s6(x))


@pytest.mark.parametrize("mode", ["step", "scan"])
def test_parameters_must_fit_the_config_given(mode):
    spec, params, state, name = _setup("mamba_wide")
    x = _input(mode, (BATCH, N))
    config = ssm_core.MambaConfig(N, d_state=D_STATE, **OPTIONS)
    _call(spec, name, mode, x, state, params, config=config)  # fits
    with pytest.raises(ValueError, match=rf"mamba_{mode}: parameter A_log must have shape \(24, 3\) "
                                        r"\(num_neurons=8, .*expand=3.* of the config given\), got \(16, 3\)"):
        _call(spec, name, mode, x, state, params, config=dataclasses.replace(config, expand=3))
    with pytest.raises(ValueError, match=rf"mamba_{mode}: parameter conv_bias is given .* but the layer of .*"
                                        r"conv_bias=False of the config given has none"):
        _call(spec, name, mode, x, state, params._replace(conv_bias=np.zeros(2 * N)), config=config)
    with pytest.raises(TypeError, match=rf"mamba_{mode}: parameter out_proj_bias is missing \(None\); expected shape \(8,\)"):
        _call(spec, name, mode, x, state, params._replace(out_proj_bias=None), config=config)
    with pytest.raises(TypeError, match=rf"mamba_{mode}: config must be a MambaConfig, got S6Config"):
        _call(spec, name, mode, x, state, params, config=ssm_core.S6Config(N))


@pytest.mark.parametrize("mode", ["step", "scan"])
def test_half_the_projection_biases_is_refused(mode):
    spec, params, state, name = _setup("mamba_wide")
    with pytest.raises(TypeError, match=rf"mamba_{mode}: parameter out_proj_bias is missing \(None\); "
                                        r"expected shape \(8,\) \(.*bias=True.* from "):
        _call(spec, name, mode, _input(mode, (BATCH, N)), state, params._replace(out_proj_bias=None))


@pytest.mark.parametrize("mode", ["step", "scan"])
def test_an_inner_width_that_is_no_multiple_of_the_features_is_refused(mode):
    spec, params, state, name = _setup("mamba_wide")
    narrow = params._replace(in_proj_weight=np.zeros((4 * N, N - 3)))
    with pytest.raises(ValueError, match=rf"mamba_{mode}: the parameters give no layer .*A_log's 16 rows .* "
                                        r"not a whole multiple of the 5 features"):
        _call(spec, name, mode, _input(mode, (BATCH, N)), state, narrow)


def test_config_options_are_checked():
    with pytest.raises(ValueError, match=r"Mamba: discretization must be one of 'zoh', 'euler', got 'forward'"):
        ssm_core.MambaConfig(N, discretization="forward")
    with pytest.raises(ValueError, match=r"S6: discretization must be one of 'zoh', 'euler', got 'ZOH'"):
        ssm_core.S6Config(N, discretization="ZOH")
    with pytest.raises(ValueError, match=r"Mamba: expand must be an int >= 1, got 0"):
        ssm_core.MambaConfig(N, expand=0)
    with pytest.raises(TypeError, match=r"Mamba: expand must be an int, got float 2.0"):
        ssm_core.MambaConfig(N, expand=2.0)
    for name in ("residual", "bias", "conv_bias"):
        with pytest.raises(TypeError, match=rf"Mamba: {name} must be True or False, got int 1"):
            ssm_core.MambaConfig(N, **{name: 1})
    with pytest.raises(TypeError, match="positional"):
        ssm_core.MambaConfig(N, 16, -1, -1, 4, 2)  # the options are keyword-only
