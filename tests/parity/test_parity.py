"""The parity matrix: every layer x backend x dtype x feature axis against tests/numpy_oracle.py.

One random float64 traceTorch ``state_dict`` per layer configuration (drawn
with NumPy, the init recipes plus noise) is loaded into every binding
(``tracetorch.ssm`` on CPU and CUDA, ``backends.numpy``, ``backends.mlx``,
``backends.array_api_strict``, ``backends.cupy``) in float32 and float64; each
steps the same 32 inputs with the feature axis first, in the middle or last,
and its outputs (all steps) and final states must match the independent NumPy
float64 oracle to a normwise relative error ``max|a - b| / max|b|`` of ``TOL``
in ``tests/conftest.py`` (float64 1e-12, float32 5e-6; derived there).
Unusable backends are skipped with what to install; the conftest prints a
backend x dtype summary at the end of the session.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

import numpy_oracle
from conftest import FIXTURE_DIR, RECORDING_TOL, TORCH_CUDA_REASON, get_binding, random_weights, unusable

from .conftest import TOLERANCE

T = 32
BATCH = (2, 3)

# (id, layer, constructor kwargs without dim)
LAYER_CASES = [
    ("S4", "S4", dict(num_neurons=6, d_state=4)),
    ("S5", "S5", dict(num_neurons=6, d_state=5)),
    ("S6", "S6", dict(num_neurons=8, d_state=4, dt_rank=2)),
    ("Mamba", "Mamba", dict(num_neurons=8, d_state=4)),
    ("Mamba_k1", "Mamba", dict(num_neurons=8, d_state=4, conv_kernel=1)),
    # The options of Hugging Face's checkpoints, each away from its default.
    ("S6_euler", "S6", dict(num_neurons=8, d_state=4, dt_rank=2, discretization="euler")),
    ("Mamba_hf", "Mamba", dict(
        num_neurons=8, d_state=4, dt_rank=2, expand=2, discretization="euler", residual=False, bias=True,
        conv_bias=False,
    )),
    ("Mamba_x3", "Mamba", dict(num_neurons=6, d_state=3, conv_kernel=3, expand=3, bias=True)),
]
CASES = {case_id: (layer, kwargs) for case_id, layer, kwargs in LAYER_CASES}
# (id, position of the feature axis in the 3-d input, the layer's dim)
AXES = {"first": (0, 0), "middle": (1, 1), "last": (2, -1)}
BACKENDS = ["numpy", "torch", "mlx", "array_api_strict", "cupy", "torch-cuda"]
DTYPES = ["float32", "float64"]


@functools.lru_cache(maxsize=None)
def case_data(case_id: str, axis_id: str):
    """``(layer, kwargs with dim, params, inputs [T, 3-d], oracle outputs, oracle states)``, computed once.

    The weights are ``random_weights``, the same for every axis and binding.
    """
    layer, kwargs = CASES[case_id]
    position, dim = AXES[axis_id]
    seed = [c[0] for c in LAYER_CASES].index(case_id)
    params = random_weights(layer, kwargs, seed=100 + seed)
    canonical = np.random.default_rng(200 + seed).standard_normal((T, *BATCH, kwargs["num_neurons"]))
    inputs = np.ascontiguousarray(np.moveaxis(canonical, -1, 1 + position))  # same numbers for every axis
    kw = {**kwargs, "dim": dim}
    ref_out, ref_states = numpy_oracle.run(layer, kw, params, inputs)
    return layer, kw, params, inputs, ref_out, ref_states


# ----------------------------------------------------------------------------- bindings


def unusable_reason(backend: str, dtype: str):
    """Why ``backend`` cannot run ``dtype`` here, or None."""
    if backend in ("torch", "torch-cuda"):
        import torch

        return TORCH_CUDA_REASON if backend == "torch-cuda" and not torch.cuda.is_available() else None
    reason = unusable()[backend]
    if reason is None and backend == "mlx" and dtype == "float64":
        import mlx.core as mx

        device = mx.default_device()
        if device.type != mx.cpu:
            return f"MLX has no float64 on the GPU (default device {device}); float64 runs on mx.cpu only"
    return reason


def run_binding(backend: str, dtype: str, layer: str, kwargs: dict, params: dict, inputs) -> tuple:
    """Step ``backend``'s layer over ``inputs``: outputs and final states, in NumPy, each checked for type and dtype."""
    b = get_binding(backend)
    obj = b.make(layer, kwargs, dtype, weights=params)
    outs = []
    for x in inputs:
        y = b.step(obj, b.asarray(x.astype(dtype)))
        assert isinstance(y, b.array_types), type(y)
        assert b.dtype_name(y) == dtype and tuple(y.shape) == x.shape, (y.dtype, y.shape)
        if b.mod is None:
            assert y.device.type == b.device, y.device
        outs.append(b.to_numpy(y))
    states = {}
    for name in numpy_oracle.state_names(layer, kwargs):
        s = getattr(obj, name)
        assert isinstance(s, b.array_types), (name, type(s))
        assert b.dtype_name(s) == dtype, (name, s.dtype)
        states[name] = b.to_numpy(s)
    out = np.stack(outs)
    assert out.dtype == np.dtype(dtype), out.dtype
    return out, states


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("axis_id", list(AXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", list(CASES))
def test_parity(case_id, backend, dtype, axis_id, parity_record):
    reason = unusable_reason(backend, dtype)
    if reason is not None:
        parity_record.skip(backend, dtype, reason)
        pytest.skip(reason)
    layer, kwargs, params, inputs, ref_out, ref_states = case_data(case_id, axis_id)
    out, states = run_binding(backend, dtype, layer, kwargs, params, inputs)

    errors = {"outputs": numpy_oracle.rel_err(out, ref_out)}
    assert set(states) == set(ref_states)
    for name, ref in ref_states.items():
        assert states[name].shape == ref.shape, (name, states[name].shape, ref.shape)
        errors[name] = numpy_oracle.rel_err(states[name], ref)
    worst = max(errors.values())
    parity_record.error(backend, dtype, f"{case_id}-{axis_id}", worst)
    assert worst <= TOLERANCE[dtype], f"{backend} {dtype} {case_id} dim={kwargs['dim']}: errors {errors}"


# ----------------------------------------------------------------------------- the oracle itself


FIXTURES = sorted(FIXTURE_DIR.glob("*.npz")) if FIXTURE_DIR.is_dir() else []


@pytest.mark.parametrize("path", FIXTURES or [None], ids=[p.stem for p in FIXTURES] or ["no-fixtures"])
def test_oracle_matches_tracetorch_fixtures(path):
    assert path is not None, f"no tracetorch fixtures in {FIXTURE_DIR}"
    with np.load(path) as data:
        data = {k: data[k] for k in data.files}
    layer = str(data["layer"])
    kwargs = json.loads(str(data["kwargs"]))
    params = {k[len("param."):]: v for k, v in data.items() if k.startswith("param.")}
    outputs, states = numpy_oracle.run(layer, kwargs, params, data["inputs"])
    assert numpy_oracle.rel_err(outputs, data["outputs"]) <= RECORDING_TOL
    finals = {k[len("final."):] for k in data if k.startswith("final.")}
    assert finals == set(states) == set(numpy_oracle.state_names(layer, kwargs))
    for name in finals:
        assert numpy_oracle.rel_err(states[name], data[f"final.{name}"]) <= RECORDING_TOL, name


@pytest.mark.parametrize("case_id", list(CASES))
def test_oracle_is_independent_of_feature_axis(case_id):
    """Same numbers with the features first, middle or last: the oracle moves axes correctly."""
    _, _, _, _, ref_last, states_last = case_data(case_id, "last")
    for axis_id in ("first", "middle"):
        position = AXES[axis_id][0]
        _, _, _, _, ref, states = case_data(case_id, axis_id)
        np.testing.assert_allclose(np.moveaxis(ref, 1 + position, -1), ref_last, rtol=1e-13, atol=1e-13)
        for name, s in states.items():
            # traceTorch layout: feature axis at ``position``, trailing axis (if any) last
            trailing = s.ndim == ref.ndim  # [*shape, trailing] has as many axes as [T, *shape]
            moved = np.moveaxis(s, position, -2 if trailing else -1)
            np.testing.assert_allclose(moved, states_last[name], rtol=1e-13, atol=1e-13)


def test_oracle_random_weights_exercise_the_dynamics():
    """The drawn weights make the states move and the outputs differ from the plain skip ``D * x``."""
    for case_id in CASES:
        layer, kwargs, params, inputs, ref_out, ref_states = case_data(case_id, "last")
        assert np.all(np.isfinite(ref_out))
        for name, s in ref_states.items():
            assert np.max(np.abs(s)) > 1e-2, (case_id, name)
        if layer != "Mamba":
            skip = inputs * params["D"]
            assert numpy_oracle.rel_err(ref_out, skip) > 1e-2, case_id
