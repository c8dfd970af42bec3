"""What is particular to the array backends: the registry, lazy imports, MLX's evaluation.

``backends.available()`` names every backend with a reason where one cannot
run; ``backends.load`` loads a usable one; importing ``backends`` imports no
array library and a backend only its own; MLX layers evaluate each step
(``eager=False`` leaves it to the caller, with the same numbers); NumPy
ignores ``eager``. What every backend shares with the torch layers is tested
through the ``binding`` fixture in the files by property.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import subprocess
import sys

import numpy as np
import pytest

import backends
import numpy_oracle
from conftest import D_STATE, FIVE, N, ROOT, TOL, random_weights, rel_err, skip_mlx_float64_on_gpu, state_names


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


# ----------------------------------------------------------------------------- functional API


# ----------------------------------------------------------------------------- MLX evaluation


def _mlx_evaluated(array) -> bool:
    """True when ``array`` has no pending computation (its graph holds no primitive)."""
    import mlx.core as mx

    buffer = io.StringIO()
    mx.export_to_dot(buffer, array)
    return "shape=rectangle" not in buffer.getvalue()


@pytest.mark.parametrize("binding", ["mlx"], indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", FIVE)
def test_mlx_eager_outputs_are_evaluated_and_lazy_matches(binding, case, dtype):
    b, (_, name, kwargs) = binding, case
    skip_mlx_float64_on_gpu(b, dtype)
    import mlx.core as mx

    weights = random_weights(name, kwargs, seed=21)
    xs = np.random.default_rng(22).standard_normal((6, 2, N)).astype(dtype)
    eager = b.cls(name)(**kwargs, dtype=dtype)
    lazy = b.cls(name)(**kwargs, dtype=dtype, eager=False)
    eager.load_state_dict(weights)
    lazy.load_state_dict(weights)
    eager_ys, lazy_ys = [], []
    for x in xs:
        y = eager(b.asarray(x))
        assert isinstance(y, mx.array) and y.dtype == b.mod.backend.dtype(dtype)
        assert _mlx_evaluated(y)
        for state in state_names(name, kwargs):
            assert _mlx_evaluated(getattr(eager, state)), state
        eager_ys.append(y)
        lazy_ys.append(lazy(b.asarray(x)))
    assert not _mlx_evaluated(lazy_ys[-1]), "eager=False evaluated the step itself"
    lazy_states = [getattr(lazy, state) for state in state_names(name, kwargs)]
    mx.eval(*lazy_ys, *lazy_states)
    assert all(_mlx_evaluated(a) for a in (*lazy_ys, *lazy_states))
    tol = TOL[dtype] / 10
    assert rel_err(np.stack([np.asarray(y) for y in lazy_ys]), np.stack([np.asarray(y) for y in eager_ys])) <= tol
    for state, value in zip(state_names(name, kwargs), lazy_states):
        assert rel_err(np.asarray(value), np.asarray(getattr(eager, state))) <= tol, state
    # And both agree with the float64 oracle.
    ref_y, _ = numpy_oracle.run(name, kwargs, weights, xs.astype(np.float64))
    assert rel_err(np.stack([np.asarray(y) for y in eager_ys]), ref_y) <= TOL[dtype]


@pytest.mark.parametrize("binding", ["numpy"], indirect=True)
def test_numpy_layer_ignores_eager(binding):
    lazy = binding.mod.S4(N, d_state=D_STATE, seed=0, eager=False)
    plain = binding.mod.S4(N, d_state=D_STATE, seed=0)
    x = np.random.default_rng(0).standard_normal((2, N)).astype(np.float32)
    np.testing.assert_array_equal(lazy(x), plain(x))
