"""``ssm_core``, the math written once: its pure functions on every array library.

The step functions give the float64 oracle's numbers on the plain arrays of
torch, NumPy, array-api-strict, MLX (once ``backends.mlx`` completed its
namespace; a clear error before) and CuPy, and every binding's layer steps
exactly as they do; the linear recurrence's parallel form equals its loop, and
time is cut into blocks in order. (Every scan method against stepping:
``test_scan_equals_step.py``.)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import numpy_oracle
import ssm_core
from conftest import ALL, FIVE, N, ROOT, TOL, get_binding, random_weights, rel_err, skip_mlx_float64_on_gpu

STEPS = {"S4": ssm_core.s4_step, "S5": ssm_core.s5_step, "S6": ssm_core.s6_step, "Mamba": ssm_core.mamba_step}


def _functional_run(b, layer, kwargs, weights, xs):
    """``ssm_core``'s step of ``layer`` over ``xs`` on the binding's arrays: outputs and final states, in NumPy."""
    spec = ssm_core.LAYERS[layer]
    params = spec.params_from_mapping({k: b.asarray(v) for k, v in weights.items()})
    state = spec.zero_state(spec.config(**kwargs), xs.shape[1:-1], b.library, b.library.float64)
    assert isinstance(state, spec.state)
    ys = []
    for x in xs:
        y, state = STEPS[layer](b.asarray(x), state, params)
        assert isinstance(y, b.array_types) and isinstance(state, spec.state)
        ys.append(b.to_numpy(y))
    return np.stack(ys), {k: b.to_numpy(v) for k, v in state._asdict().items() if v is not None}


@pytest.mark.parametrize("case", FIVE)
def test_functional_api_same_numbers_on_every_library(binding, case):
    b, (_, layer, kwargs) = binding, case
    skip_mlx_float64_on_gpu(b, "float64")
    weights = random_weights(layer, kwargs, seed=11)
    xs = np.random.default_rng(12).standard_normal((6, 2, 3, N))
    ref_y, ref_states = numpy_oracle.run(layer, kwargs, weights, xs)
    ys, states = _functional_run(b, layer, kwargs, weights, xs)
    np_ys, np_states = _functional_run(get_binding("numpy"), layer, kwargs, weights, xs)
    assert ys.dtype == np.float64
    assert rel_err(ys, ref_y) <= TOL["float64"]
    assert rel_err(ys, np_ys) <= TOL["float64"]
    for name, ref in ref_states.items():
        # the features-last layout is the traceTorch one for dim=-1
        assert rel_err(states[name], ref) <= TOL["float64"], name
        assert rel_err(states[name], np_states[name]) <= TOL["float64"], name


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
    assert err <= TOL["float64"], f"ssm_core.s6_step on MLX float64 with backends.mlx: relative error {err:.2e}"


@pytest.mark.parametrize("case", ALL)
def test_layer_steps_as_the_functional_step(binding, case):
    """A binding's layer is ``ssm_core``'s step plus state keeping: the same numbers, the same states."""
    b, (_, name, kwargs) = binding, case
    skip_mlx_float64_on_gpu(b, "float64")
    layer = b.make(name, kwargs, dtype="float64")
    spec = ssm_core.LAYERS[name]
    params = spec.params_from_mapping({k: b.asarray(v) for k, v in random_weights(name, kwargs).items()})
    config = spec.config(**kwargs)  # its options (discretization, residual) are the layer's
    state = spec.zero_state(config, (2,), b.library, b.library.float64)
    for x in np.random.default_rng(0).standard_normal((4, 2, N)):
        y_core, state = spec.step(b.asarray(x), state, params, config=config)
        assert rel_err(b.to_numpy(b.step(layer, b.asarray(x))), b.to_numpy(y_core)) <= TOL["float64"]
    for key, value in b.host_states(layer).items():
        assert rel_err(value, b.to_numpy(getattr(state, key))) <= TOL["float64"], key


# ----------------------------------------------------------------------------- scans


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parallel_recurrence_equals_the_loop(dtype):
    import array_api_strict as xp

    rng = np.random.default_rng(5)
    a = xp.asarray(rng.uniform(0.0, 1.0, (77, 3, 4)).astype(dtype))
    b = xp.asarray(rng.standard_normal((77, 3, 4)).astype(dtype))
    h0 = xp.asarray(rng.standard_normal((3, 4)).astype(dtype))
    loop = np.from_dlpack(ssm_core.linear_recurrence(a, b, h0, xp, "loop"))
    parallel = np.from_dlpack(ssm_core.linear_recurrence(a, b, h0, xp, "parallel"))
    assert rel_err(parallel, loop) <= TOL[dtype]
    with pytest.raises(ValueError, match="method"):
        ssm_core.linear_recurrence(a, b, h0, xp, "blelloch")


@pytest.mark.parametrize("T, block, lengths", [(3, 4, [3]), (4, 4, [4]), (8, 4, [4, 4]), (10, 4, [4, 4, 2]), (9, 1, [1] * 9)])
def test_time_blocks_cut_the_sequence_in_order(T, block, lengths):
    xs = np.arange(T * 2, dtype=np.float64).reshape(T, 2)
    blocks = ssm_core.time_blocks(xs, block, np)
    assert [b.shape[0] for b in blocks] == lengths
    np.testing.assert_array_equal(np.concatenate(blocks), xs)  # every step once, no padding left in
