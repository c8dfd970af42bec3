"""The array backends (``backends.numpy``, ``.mlx``, ``.array_api_strict``, ``.cupy``) and the functional API.

Registry and lazy imports; torch weights into every usable backend; the
strictness and dtype rules of ``load_state_dict``; the state lifecycle
(``save_states``/``load_states``/``zero_states``, batch-shape changes); input
type checks; seeded init; ``ssm_core``'s pure step functions on every array
library; MLX's eager and lazy evaluation.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backends
import numpy_oracle
import ssm_core

ROOT = Path(__file__).resolve().parents[1]

N = 4
D_STATE = 3
# (id, layer, kwargs)
CASES = [
    ("S4", "S4", dict(num_neurons=N, d_state=D_STATE)),
    ("S5", "S5", dict(num_neurons=N, d_state=D_STATE)),
    ("S6", "S6", dict(num_neurons=N, d_state=D_STATE, dt_rank=2)),
    ("Mamba", "Mamba", dict(num_neurons=N, d_state=D_STATE)),
    ("Mamba_k1", "Mamba", dict(num_neurons=N, d_state=D_STATE, conv_kernel=1)),
]
CASE_IDS = [c[0] for c in CASES]
BACKENDS = ["numpy", "mlx", "array_api_strict", "cupy"]
TOL = {"float32": 1e-5, "float64": 1e-10}
# ----------------------------------------------------------------------------- helpers


_AVAILABLE: dict = {}


def usable(name: str):
    """``backends.<name>``, or skip saying what to install."""
    if not _AVAILABLE:
        _AVAILABLE.update(backends.available())
    reason = _AVAILABLE[name]
    if reason is not None:
        pytest.skip(reason)
    return importlib.import_module(f"backends.{name}")


def skip_mlx_float64_on_gpu(name: str, dtype: str) -> None:
    if name == "mlx" and dtype == "float64":
        import mlx.core as mx

        if mx.default_device().type != mx.cpu:
            pytest.skip(f"MLX has no float64 on the GPU (default device {mx.default_device()})")


def host(mod, array) -> np.ndarray:
    """A NumPy copy of a backend array."""
    return np.array(mod.backend.to_numpy(array), copy=True)


def params_host(mod, layer) -> dict:
    return {k: host(mod, v) for k, v in layer.state_dict().items()}


def assert_same_arrays(now: dict, before: dict) -> None:
    assert set(now) == set(before)
    for key, b in before.items():
        a = now[key]
        if b is None:
            assert a is None, key
            continue
        assert a is not None, key
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        assert np.array_equal(a, b), f"{key} changed"


def inputs(shape, steps, dtype="float64", seed=0):
    return np.random.default_rng(seed).standard_normal((steps, *shape)).astype(dtype)


def random_weights(layer: str, kwargs: dict, seed: int = 0, dtype="float64") -> dict:
    """Plausible traceTorch weights (float64 by default): init-like values plus noise."""
    rng = np.random.default_rng(seed)
    shapes = ssm_core.LAYERS[layer].config(**kwargs).param_shapes()
    out = {}
    for key, shape in shapes.items():
        if key == "A_log":
            value = np.log(np.arange(1.0, shape[-1] + 1)) * np.ones(shape)
        elif key == "log_dt":
            value = np.full(shape, np.log(0.1))
        elif key == "dt_proj.bias":
            value = np.full(shape, -2.0)
        else:
            value = 0.5 * rng.standard_normal(shape)
        out[key] = (value + 0.05 * rng.standard_normal(shape)).astype(dtype)
    return out


# ----------------------------------------------------------------------------- registry


def test_available_names_every_backend_with_reasons():
    found = backends.available()
    assert set(found) == set(backends.NAMES) == {"numpy", "cupy", "mlx", "array_api_strict"}
    # Installed with the test extras: usable.
    assert found["numpy"] is None, found["numpy"]
    assert found["array_api_strict"] is None, found["array_api_strict"]
    if importlib.util.find_spec("mlx") is not None:
        assert found["mlx"] is None, found["mlx"]
    else:
        assert "pip install mlx" in found["mlx"]
    if importlib.util.find_spec("cupy") is None:
        reason = found["cupy"]
        assert isinstance(reason, str) and "cupy" in reason and "pip install cupy" in reason, reason
    for name, reason in found.items():
        assert reason is None or (isinstance(reason, str) and reason.strip()), (name, reason)


def test_this_machine_has_numpy_mlx_array_api_strict_and_no_cupy():
    """The environment this suite is developed in: exactly these are usable."""
    if importlib.util.find_spec("cupy") is not None or importlib.util.find_spec("mlx") is None:
        pytest.skip("a machine with cupy installed or without mlx")
    found = backends.available()
    assert {name for name, reason in found.items() if reason is None} == {"numpy", "mlx", "array_api_strict"}
    assert found["cupy"] is not None


def test_load_known_unknown_and_unusable():
    mod = backends.load("numpy")
    assert mod is importlib.import_module("backends.numpy")
    for attr in ("S4", "S5", "S6", "Mamba", "asarray", "backend"):
        assert hasattr(mod, attr), attr
    assert callable(mod.backend.to_numpy) and mod.backend.xp is not None
    with pytest.raises(ValueError, match="unknown backend"):
        backends.load("jax")
    reason = backends.available()["cupy"]
    if reason is not None:
        with pytest.raises(ImportError, match="cupy"):
            backends.load("cupy")


def _imported_after(code: str) -> list:
    probe = (
        f"import sys; {code}; "
        "print(sorted(m for m in ('numpy', 'mlx', 'mlx.core', 'torch', 'cupy', 'array_api_strict') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


def test_import_backends_imports_no_array_library():
    assert _imported_after("import backends; backends.NAMES") == []


def test_import_one_backend_imports_only_its_library():
    imported = _imported_after("import backends.numpy")
    assert "numpy" in imported
    assert not {"mlx", "mlx.core", "torch", "cupy", "array_api_strict"} & set(imported), imported


# ----------------------------------------------------------------------------- torch weights into every backend


# ----------------------------------------------------------------------------- load_state_dict strictness


# ----------------------------------------------------------------------------- dtype


# ----------------------------------------------------------------------------- states


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,layer,kwargs", CASES, ids=CASE_IDS)
def test_same_seed_same_init(case_id, layer, kwargs, backend):
    mod = usable(backend)
    a = params_host(mod, getattr(mod, layer)(**kwargs, seed=7))
    b = params_host(mod, getattr(mod, layer)(**kwargs, seed=7))
    c = params_host(mod, getattr(mod, layer)(**kwargs, seed=8))
    assert_same_arrays(a, b)
    assert any(not np.array_equal(a[k], c[k]) for k in a), "seed has no effect"
    shapes = ssm_core.LAYERS[layer].config(**kwargs).param_shapes()
    assert {k: v.shape for k, v in a.items()} == shapes
    assert all(np.all(np.isfinite(v)) for v in a.values())


# ----------------------------------------------------------------------------- functional API


def _functional_libraries():
    libs = ["numpy", "torch", "array_api_strict"]
    if importlib.util.find_spec("mlx") is not None:
        libs.append("mlx")
    return libs


def _lib(name):
    """``(namespace for zero_state, array from NumPy float64, array to NumPy, array type)``."""
    if name == "numpy":
        return np, lambda a: np.asarray(a, dtype=np.float64), np.asarray, np.ndarray
    if name == "torch":
        return torch, lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)), lambda t: t.numpy(), torch.Tensor
    if name == "array_api_strict":
        import array_api_strict as xps

        return xps, lambda a: xps.asarray(np.asarray(a, dtype=np.float64)), np.from_dlpack, type(xps.asarray(0.0))
    if name == "mlx":
        import mlx.core as mx

        if mx.default_device().type != mx.cpu:
            pytest.skip("MLX has no float64 on the GPU")
        return mx, lambda a: mx.array(np.asarray(a, dtype=np.float64), dtype=mx.float64), np.asarray, mx.array
    raise AssertionError(name)


_STEPS = {"S4": ssm_core.s4_step, "S5": ssm_core.s5_step, "S6": ssm_core.s6_step, "Mamba": ssm_core.mamba_step}


def _functional_run(lib_name, layer, kwargs, weights, xs):
    ns, to_lib, to_np, array_type = _lib(lib_name)
    spec = ssm_core.LAYERS[layer]
    config = spec.config(**kwargs)
    params = spec.params_from_mapping({k: to_lib(v) for k, v in weights.items()})
    state = spec.zero_state(config, xs.shape[1:-1], ns, getattr(ns, "float64"))
    assert isinstance(state, spec.state)
    ys = []
    for x in xs:
        y, state = _STEPS[layer](to_lib(x), state, params)
        assert isinstance(y, array_type) and isinstance(state, spec.state)
        ys.append(np.array(to_np(y)))
    return np.stack(ys), {k: np.array(to_np(v)) for k, v in state._asdict().items() if v is not None}


@pytest.mark.parametrize("case_id,layer,kwargs", CASES, ids=CASE_IDS)
def test_functional_api_same_numbers_on_every_library(case_id, layer, kwargs):
    if importlib.util.find_spec("mlx") is not None:
        importlib.import_module("backends.mlx")  # registers the completed MLX namespace
    weights = random_weights(layer, kwargs, seed=11)
    xs = inputs((2, 3, N), steps=6, dtype="float64", seed=12)
    ref_y, ref_states = numpy_oracle.run(layer, kwargs, weights, xs)
    results = {lib: _functional_run(lib, layer, kwargs, weights, xs) for lib in _functional_libraries()}
    for lib, (ys, states) in results.items():
        assert ys.dtype == np.float64, lib
        assert numpy_oracle.rel_err(ys, ref_y) <= 1e-10, lib
        np_ys, np_states = results["numpy"]
        assert numpy_oracle.rel_err(ys, np_ys) <= 1e-10, lib
        for name, ref in ref_states.items():
            # canonical layout (features last / second to last) is the traceTorch one for dim=-1
            assert numpy_oracle.rel_err(states[name], ref) <= 1e-10, (lib, name)
            assert numpy_oracle.rel_err(states[name], np_states[name]) <= 1e-10, (lib, name)


@pytest.mark.parametrize("import_backend", [False, True], ids=["alone", "with-backends.mlx"])
def test_functional_api_on_mlx_float64(import_backend):
    """``ssm_core`` on MLX arrays: a clear error alone (mlx.core differs from the standard), float64-exact once completed."""
    if importlib.util.find_spec("mlx") is None:
        pytest.skip("pip install 'mlx[cpu]' (Linux) or mlx (macOS)")
    code = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import numpy as np, mlx.core as mx, ssm_core, numpy_oracle
if {import_backend!r}:
    import backends.mlx
kwargs = dict(num_neurons=4, d_state=3, dt_rank=2)
rng = np.random.default_rng(0)
config = ssm_core.S6Config(**kwargs)
w = {{k: 0.5 * rng.standard_normal(s) for k, s in config.param_shapes().items()}}
w["dt_proj.bias"] = w["dt_proj.bias"] - 2.0
xs = rng.standard_normal((6, 2, 4))
ref, _ = numpy_oracle.run("S6", kwargs, w, xs)
params = ssm_core.S6.params_from_mapping({{k: mx.array(v, dtype=mx.float64) for k, v in w.items()}})
state = ssm_core.S6.zero_state(config, (2,), mx, mx.float64)
ys = []
try:
    for x in xs:
        y, state = ssm_core.s6_step(mx.array(x, dtype=mx.float64), state, params)
        ys.append(np.asarray(y))
except TypeError as error:
    print("TypeError:", error)
else:
    print(numpy_oracle.rel_err(np.stack(ys), ref))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    if not import_backend:
        assert last.startswith("TypeError:") and "import backends.mlx" in last, last
        return
    err = float(last)
    assert err <= 1e-10, f"ssm_core.s6_step on MLX float64 with backends.mlx: relative error {err:.2e}"


# ----------------------------------------------------------------------------- MLX evaluation


def _mlx_evaluated(array) -> bool:
    """True when ``array`` has no pending computation (its graph holds no primitive)."""
    import mlx.core as mx

    buffer = io.StringIO()
    mx.export_to_dot(buffer, array)
    return "shape=rectangle" not in buffer.getvalue()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case_id,layer,kwargs", CASES, ids=CASE_IDS)
def test_mlx_eager_outputs_are_evaluated_and_lazy_matches(case_id, layer, kwargs, dtype):
    mod = usable("mlx")
    skip_mlx_float64_on_gpu("mlx", dtype)
    import mlx.core as mx

    weights = random_weights(layer, kwargs, seed=21)
    xs = inputs((2, N), steps=6, dtype=dtype, seed=22)
    eager = getattr(mod, layer)(**kwargs, dtype=dtype)
    lazy = getattr(mod, layer)(**kwargs, dtype=dtype, eager=False)
    eager.load_state_dict(weights)
    lazy.load_state_dict(weights)
    eager_ys, lazy_ys = [], []
    for x in xs:
        y = eager(mod.asarray(x))
        assert isinstance(y, mx.array) and y.dtype == mod.backend.dtype(dtype)
        assert _mlx_evaluated(y)
        for name in numpy_oracle.state_names(layer, kwargs):
            assert _mlx_evaluated(getattr(eager, name)), name
        eager_ys.append(y)
        lazy_ys.append(lazy(mod.asarray(x)))
    assert not _mlx_evaluated(lazy_ys[-1]), "eager=False evaluated the step itself"
    lazy_states = [getattr(lazy, name) for name in numpy_oracle.state_names(layer, kwargs)]
    mx.eval(*lazy_ys, *lazy_states)
    assert all(_mlx_evaluated(a) for a in (*lazy_ys, *lazy_states))
    tol = TOL[dtype] / 10
    assert numpy_oracle.rel_err(np.stack([np.asarray(y) for y in lazy_ys]),
                             np.stack([np.asarray(y) for y in eager_ys])) <= tol
    for name, value in zip(numpy_oracle.state_names(layer, kwargs), lazy_states):
        assert numpy_oracle.rel_err(np.asarray(value), np.asarray(getattr(eager, name))) <= tol, name
    # And both agree with the float64 reference.
    ref_y, _ = numpy_oracle.run(layer, kwargs, weights, xs.astype(np.float64))
    assert numpy_oracle.rel_err(np.stack([np.asarray(y) for y in eager_ys]), ref_y) <= TOL[dtype]


def test_numpy_layer_ignores_eager():
    mod = usable("numpy")
    a = mod.S4(N, d_state=D_STATE, seed=0, eager=False)
    b = mod.S4(N, d_state=D_STATE, seed=0)
    x = inputs((2, N), steps=1, dtype="float32")[0]
    np.testing.assert_array_equal(a(x), b(x))
