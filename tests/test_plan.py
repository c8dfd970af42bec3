"""One plan per call: each backend decides how a call runs, and ``ssm_core`` decides nothing from a library or device."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import ssm_core
import tracetorch as tt
from conftest import ALL, ROOT, random_weights
from ssm_core.backend import Backend
from tracetorch.ssm._backend import backend as torch_backend


def test_ssm_core_asks_no_device_autograd_or_library_name_outside_the_native_ops():
    """Only ``_array.py`` (the namespaces and the native fast paths) may name a library; nothing in ``ssm_core``
    asks a device, autograd or a compiler."""
    library = r"[\"'](torch|mlx|cupy|mlx\.core)[\"']"
    names_library = re.compile(rf"{library}\s+in\b|==\s*{library}|sys\.modules(\.get\(|\[){library}")
    asks_device = re.compile(r"is_cuda|requires_grad|is_grad_enabled|is_compiling|metal|\.device\.type")
    found = []
    for path in sorted((ROOT / "ssm_core").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if asks_device.search(code) or (path.name != "_array.py" and names_library.search(code)):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert found == []


def _plan_of(layer, x, sequence=False, compiled=False):
    params, _ = ssm_core.layout.in_compute_dtype(layer._core_params(), torch_backend.xp)
    return torch_backend.plan(layer.spec, x, params, sequence, compiled)


def test_torch_plans_the_forms_of_expm1_by_size_autograd_and_compiler():
    layer = tt.ssm.S6(8)
    x = torch.randn(3, 8)
    large = torch.randn(64, 8)  # a state of 64 * 8 * 16 elements, above _fused._SMALL_DISCRETIZATION
    with torch.no_grad():
        assert _plan_of(layer, large).expm1 == "tanh"  # expm1 is not vectorised on CPUs: see _fused.forms
        assert _plan_of(layer, x).expm1 == "expm1"  # a small state: the tanh form's two more kernels cost more
    assert _plan_of(layer, large).expm1 == "expm1"  # the parameters require grad: the tanh form's backward costs more
    traced = torch.compile(lambda x: _plan_of(layer, x).expm1 == "exp", fullgraph=True, backend="eager")
    assert traced(x)  # inductor's C++ lowers expm1 to exp(z) - 1: the series form inside a trace


def test_torch_plans_the_scan_method_and_block():
    s6, s4 = tt.ssm.S6(8), tt.ssm.S4(8)
    xs = torch.randn(40, 2, 8)
    with torch.no_grad():
        plan = _plan_of(s6, xs, sequence=True)
        assert (plan.method, plan.block, plan.block_fn) == ("loop", ssm_core.plan.SCAN_BLOCK, None)
        assert _plan_of(s4, xs, sequence=True).method == "auto"
    traced = torch.compile(lambda x: _plan_of(s4, x, sequence=True).method == "chunked", fullgraph=True, backend="eager")
    assert traced(xs)  # a traced graph cannot branch on the data


def test_the_default_backend_plans_the_standards_forms():
    backend = Backend()
    backend.name, backend.xp = "numpy", np
    params = ssm_core.S6Params(*(np.zeros(2) for _ in ssm_core.S6Params._fields))
    xs = np.zeros((5, 2, 8))
    assert backend.plan(ssm_core.S6, xs[0], params, sequence=False) == ssm_core.Plan()
    assert backend.plan(ssm_core.S4, xs, params, sequence=True).method == "auto"


def test_mlx_cpu_build_steps_s4_s5_scans():
    mlx_backend = pytest.importorskip("backends.mlx", reason="mlx is not installed").backend
    mx = pytest.importorskip("mlx.core")
    expected = "auto" if mx.metal.is_available() else "loop"  # the CPU build links the reference BLAS
    assert mlx_backend.scan_method(True, None) == expected
    assert mlx_backend.scan_method(False, None) == "loop"


def test_a_plan_reaches_the_functional_api():
    """``method=`` is short for a plan's method, and an unknown form is an error naming it."""
    rng = np.random.default_rng(0)
    config = ssm_core.S6Config(8, d_state=4)
    params = ssm_core.s6_init(config, ssm_core.Draws(np, np.float64, lambda s: rng.random(s), lambda s: rng.standard_normal(s)))
    xs = rng.standard_normal((9, 2, 8))
    state = ssm_core.S6.zero_state(config, (2,), np, np.float64)
    loop, _ = ssm_core.s6_scan(xs, state, params)
    parallel, _ = ssm_core.s6_scan(xs, state, params, method="parallel")
    planned, _ = ssm_core.s6_scan(xs, state, params, plan=ssm_core.Plan(method="parallel", expm1="tanh"))
    np.testing.assert_allclose(parallel, loop, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(planned, loop, rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="expm1 must be one of"):
        ssm_core.s6_step(xs[0], state, params, plan=ssm_core.Plan(expm1="exp1m"))


# ----------------------------------------------------------------------------- overwriting a call's own temporaries

_OVERWRITING_LIBRARIES = {
    "torch": lambda: __import__("array_api_compat.torch", fromlist=["torch"]),
    "numpy": lambda: __import__("array_api_compat.numpy", fromlist=["numpy"]),
    "array_api_strict": lambda: pytest.importorskip("array_api_strict", reason="array-api-strict is not installed"),
}


def _copies(arrays, xp):
    return [None if a is None else xp.asarray(a, copy=True) for a in arrays]


def _equal(got, expected):
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("library", sorted(_OVERWRITING_LIBRARIES))
@pytest.mark.parametrize("expm1", ["expm1", "tanh"])
@pytest.mark.parametrize("case", ALL)
def test_overwriting_temporaries_changes_no_number_and_no_input(case, expm1, library):
    """A plan's ``inplace`` writes into the call's own temporaries: the same numbers to the bit, and the
    inputs, states and parameters it was given as they were."""
    _, layer, kwargs = case
    xp = _OVERWRITING_LIBRARIES[library]()
    spec = ssm_core.LAYERS[layer]
    config = spec.config(**kwargs)
    params = spec.params_from_mapping({k: xp.asarray(v) for k, v in random_weights(layer, kwargs).items()})
    xs = xp.asarray(np.random.default_rng(1).standard_normal((6, 2, kwargs["num_neurons"])))
    state = spec.zero_state(config, (2,), xp, xp.float64)
    for t in range(3):  # states away from zero
        _, state = spec.step(xs[t, ...], state, params, xp=xp, config=config)
    x = xs[3, ...]
    given = _copies([x, *state, *params], xp)
    plain = spec.step(x, state, params, xp=xp, plan=ssm_core.Plan(expm1=expm1), config=config)
    overwriting = spec.step(x, state, params, xp=xp, plan=ssm_core.Plan(expm1=expm1, inplace=True), config=config)
    _equal([overwriting[0], *overwriting[1]], [plain[0], *plain[1]])
    scanned = spec.scan(xs, state, params, xp=xp, plan=ssm_core.Plan(method="loop", expm1=expm1), config=config)
    overwriting_scan = spec.scan(
        xs, state, params, xp=xp, plan=ssm_core.Plan(method="loop", expm1=expm1, inplace=True), config=config
    )
    _equal([overwriting_scan[0], *overwriting_scan[1]], [scanned[0], *scanned[1]])
    _equal([x, *state, *params], given)


@pytest.mark.parametrize("library", sorted(_OVERWRITING_LIBRARIES))
@pytest.mark.parametrize("layer", ["S4", "S5", "S6"])  # Mamba's conv buffer joins the input: one batch shape
def test_overwriting_with_a_state_that_broadcasts_the_input(layer, library):
    """A state with a batch axis the input lacks makes a batched step, overwriting or not: the temporaries
    made from the input are then smaller than the new state, which is a new array, with the plain numbers."""
    xp = _OVERWRITING_LIBRARIES[library]()
    spec = ssm_core.LAYERS[layer]
    config = spec.config(4, d_state=3)
    params = spec.params_from_mapping({k: xp.asarray(v) for k, v in random_weights(layer, vars(config)).items()})
    x = xp.asarray(np.random.default_rng(1).standard_normal(4))
    state = spec.state(*(xp.asarray(np.random.default_rng(2).standard_normal(s.shape))
                         for s in spec.zero_state(config, (2,), xp, xp.float64)))
    plain = spec.step(x, state, params, xp=xp, config=config)
    overwriting = spec.step(x, state, params, xp=xp, plan=ssm_core.Plan(inplace=True), config=config)
    assert tuple(plain[0].shape) == (2, 4)
    _equal([overwriting[0], *overwriting[1]], [plain[0], *plain[1]])


def test_torch_overwrites_temporaries_only_where_nothing_records_them():
    layer = tt.ssm.S6(8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert _plan_of(layer, x).inplace
        assert torch.func.vmap(lambda x: torch.tensor(_plan_of(layer, x).inplace))(x).logical_not().all()
    assert not _plan_of(layer, x).inplace  # the parameters require grad
    traced = torch.compile(lambda x: not _plan_of(layer, x).inplace, fullgraph=True, backend="eager")
    assert traced(x)  # a trace makes its own buffers


@pytest.mark.parametrize("library", ["numpy", "array_api_strict"])  # torch's products take no mixed dtypes
@pytest.mark.parametrize("layer", ["S4", "S5", "S6", "Mamba"])
def test_overwriting_keeps_a_wider_states_dtype(layer, library):
    """A state wider than the temporaries written into (float64 against float32 parameters) makes the new
    state as the plain operations do, in the promoted dtype: written in place, it would be rounded to float32.
    (In the torch layers, autocast's lower precision is the case: see test_interactions' autocast tests.)"""
    xp = _OVERWRITING_LIBRARIES[library]()
    spec = ssm_core.LAYERS[layer]
    config = spec.config(4, d_state=3)
    weights = random_weights(layer, vars(config))
    params = spec.params_from_mapping({k: xp.asarray(v, dtype=xp.float32) for k, v in weights.items()})
    x = xp.asarray(np.random.default_rng(1).standard_normal((2, 4)), dtype=xp.float32)
    state = spec.state(*(xp.asarray(np.random.default_rng(2).standard_normal(s.shape), dtype=xp.float64)
                         for s in spec.zero_state(config, (2,), xp, xp.float64)))
    plain = spec.step(x, state, params, xp=xp, config=config)
    overwriting = spec.step(x, state, params, xp=xp, plan=ssm_core.Plan(inplace=True), config=config)
    for got, expected in zip(overwriting[1], plain[1]):
        assert got.dtype == expected.dtype == xp.float64
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(overwriting[0]), np.asarray(plain[0]))


@pytest.mark.parametrize("layer", ["S4", "S5", "S6", "Mamba"])
def test_states_that_require_grad_make_a_recorded_call(layer):
    """Frozen parameters and an input without grad, but states that require grad: autograd records the step
    (Mamba's conv buffer puts all of it in the graph), which then overwrites nothing, and the states get
    their gradients, held or given to the stateless form (gradcheck against finite differences, float64)."""
    module = getattr(tt.ssm, layer)(4, d_state=3).double().requires_grad_(False)
    x = torch.randn(2, 4, dtype=torch.float64)
    states = [s.normal_().requires_grad_() for s in module.initial_states(x)]
    params, _ = ssm_core.layout.in_compute_dtype(module._core_params(), torch_backend.xp)
    assert not torch_backend.plan(module.spec, x, params, False, state=states).inplace
    assert torch_backend.plan(module.spec, x, params, False, state=[s.detach() for s in states]).inplace
    stateless = module.stateless()

    def held(*values):
        for name, value in zip(module.state_names, values):
            setattr(module, name, value)  # held states that require grad, as a learned initial state is
        return module(x), *(getattr(module, name) for name in module.state_names)

    for step in (lambda *values: stateless(x, *values), held):
        assert torch.autograd.gradcheck(step, tuple(states))
