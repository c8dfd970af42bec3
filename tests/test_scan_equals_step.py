"""A whole-sequence scan gives what stepping gives: the one place this is asserted.

Stepping (one call per timestep) is the definition of every layer; a scan
runs the same recurrence over a whole sequence at once, in whichever form
(method, time blocks, compiled or eager) it takes. Each test here holds a scan
to stepping: the outputs, the final states, for the stateful layers the next
step after the sequence (the layer continues from where the scan left it),
and the gradients where the library has autograd. Both start from the same non-zero states (a few
steps in), and every number is finite. Over:

- the layers: S4, S5, S6 (``dt_rank=2``), Mamba, and Mamba without its
  convolution (``FIVE`` of ``conftest``), and the options of Hugging Face's
  checkpoints: S6 with Euler's rule, Mamba with ``expand=2``, Euler, the
  projection biases, no conv bias and no residual (``OPTIONED``), given to
  ``ssm_core``'s functions as their ``config=``;
- the bindings: the torch layers ``tt.ssm.*`` (CPU, and CUDA where there is
  one) and the stateful layers of every backend (NumPy, MLX,
  array-api-strict, CuPy), each with the scan method its backend's plan picks
  (the log-depth ``"parallel"`` one on CUDA and CuPy)
  (:func:`test_layer_scan_equals_stepping`); ``ssm_core``'s pure functions
  on each library's arrays, with every scan method a layer has, named
  (:func:`test_functional_scan_equals_stepping`), and every form of
  ``expm1`` and of the readout a plan may name
  (:func:`test_functional_scan_equals_stepping_in_every_form`);
- compiled and eager: the S6/Mamba block compiled by ``torch.compile`` and by
  ``mx.compile`` (:func:`test_compiled_scan_equals_stepping`), every other
  cell eager;
- lengths: one step, a length that is not a multiple of the S6/Mamba time
  block and crosses it, the length from which S5 takes chunks, lengths over
  two S4/S5 chunks (a padded last chunk) and over several, and 100,000 steps
  with a large ``dt`` (:func:`test_hundred_thousand_steps_with_large_dt`);
- layouts: the feature axis ``dim`` first, in the middle and last, the time
  axis ``time_dim`` first, in the middle and last;
- float32 and float64, held to ``conftest``'s ``TOL`` and ``GRAD_TOL``.

``dim`` indexes one step's input (the sequence without its time axis), so
``dim`` and ``time_dim`` never clash: ``dim=0, time_dim=0`` on ``xs`` of shape
``[T, N, B]`` has the time on axis 0 of the sequence and the features on
axis 0 of each step ``xs[t]`` of shape ``[N, B]``; likewise ``dim=-1,
time_dim=-1`` on ``[B, N, T]``. Both are among ``SEQUENCES``.

Elsewhere: the scan's other contracts (an empty sequence, ``tt.Model`` and
``tt.sequence_mode``) in ``test_scan.py``; stepping and scanning against the
float64 oracle in ``test_properties.py``; the S4/S5 chunks at every boundary
and extreme decays in ``test_lti_scan.py``; compiled blocks against the eager
block in ``test_fused.py``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import ssm_core
from conftest import (
    BINDINGS, FIVE, GRAD_TOL, OPTIONED, TOL, get_binding, random_weights, rel_err, skip_mlx_float64_on_gpu,
)
from ssm_core import fused
from ssm_core.lti import LTI_SCAN_METHODS, S4_CHUNK, S5_CHUNK, S5_CHUNKED_FROM
from ssm_core.plan import EXPM1_FORMS, READOUT_FORMS, SCAN_BLOCK
from ssm_core.scan import RECURRENCE_METHODS
from tracetorch.ssm._backend import backend as torch_backend

DTYPES = ["float32", "float64"]
# The bindings of the stateful layers: torch on the CPU and on CUDA, and every backend (skipped with the
# reason where this machine cannot run one).
LAYER_BINDINGS = ["torch", "torch-cuda", *BINDINGS[1:]]
WARMUP = 3  # steps before the sequence: it starts from held, non-zero states

# Lengths. Every scan form a length selects is met: S6/Mamba cut time into blocks of SCAN_BLOCK steps;
# S4/S5 step below S4_CHUNKED_FROM/S5_CHUNKED_FROM ("auto") and take chunks of at most S4_CHUNK/S5_CHUNK
# steps, fewer for few batch elements (a padded last chunk where the chunks do not divide T).
ACROSS_A_BLOCK = SCAN_BLOCK + 5  # two S6/Mamba blocks, the second short; "auto": S4 in chunks, S5 steps
OVER_TWO_CHUNKS = max(S4_CHUNK, S5_CHUNK) + 7  # two or more S4/S5 chunks, the last padded; three S6/Mamba blocks
MANY_CHUNKS = 200  # one stream: four S4 chunks, eight S5 chunks, seven S6/Mamba blocks
assert OVER_TWO_CHUNKS > 2 * SCAN_BLOCK and OVER_TWO_CHUNKS % SCAN_BLOCK and ACROSS_A_BLOCK < S5_CHUNKED_FROM

# (id, T, dim, time_dim, one step's input shape with N at dim)
SEQUENCES = [
    ("T1-last-time0", 1, -1, 0, (2, "N")),
    ("T37-first-time0", ACROSS_A_BLOCK, 0, 0, ("N", 3)),
    ("T48-first-time1", S5_CHUNKED_FROM, 0, 1, ("N", 2, 3)),
    ("T71-middle-time2", OVER_TWO_CHUNKS, 1, 2, (2, "N", 3)),
    ("T20-last-time-1", 20, -1, -1, (2, "N")),
]
SEQUENCE_PARAMS = [pytest.param(*s[1:], id=s[0]) for s in SEQUENCES]

# ssm_core's functions (features last): (T, batch shape)
FUNCTIONAL_SEQUENCES = [(1, (2,)), (ACROSS_A_BLOCK, (3, 2)), (OVER_TWO_CHUNKS, ()), (MANY_CHUNKS, (1,))]
FUNCTIONAL_IDS = [f"T{T}-batch{'x'.join(map(str, batch)) or '0'}" for T, batch in FUNCTIONAL_SEQUENCES]
STEP = {"S4": ssm_core.s4_step, "S5": ssm_core.s5_step, "S6": ssm_core.s6_step, "Mamba": ssm_core.mamba_step}
SCAN = {"S4": ssm_core.s4_scan, "S5": ssm_core.s5_scan, "S6": ssm_core.s6_scan, "Mamba": ssm_core.mamba_scan}
CASES = FIVE + OPTIONED


def _config(name: str, kwargs: dict):
    """The case's config: the functions take its options (the discretization, the residual) as ``config=``."""
    return ssm_core.LAYERS[name].config(**kwargs)


def _methods(layer: str) -> tuple:
    return LTI_SCAN_METHODS if ssm_core.LAYERS[layer].time_invariant else RECURRENCE_METHODS


# (case, method): every scan method of every layer case
METHOD_PARAMS = [
    pytest.param(p.values[0], method, id=f"{p.id}-{method}") for p in CASES for method in _methods(p.values[0][1])
]


def _step_shape(shape: tuple, n: int) -> tuple:
    return tuple(n if size == "N" else size for size in shape)


def _assert_close(got, expected, tol: float, what: str) -> None:
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, stepping gives {expected.shape}"
    assert np.isfinite(expected).all(), f"{what}: stepping gives non-finite values"
    err = rel_err(got, expected)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _assert_states_close(got: dict, expected: dict, tol: float, what: str = "") -> None:
    assert set(got) == set(expected), f"{what}states {sorted(got)}, stepping holds {sorted(expected)}"
    for key, value in expected.items():
        assert (got[key] is None) == (value is None), f"{what}state {key}"
        if value is not None:
            _assert_close(got[key], value, tol, f"{what}state {key}")


# ----------------------------------------------------------------------------- the layers of every binding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "dim", "time_dim", "shape"), SEQUENCE_PARAMS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("binding", LAYER_BINDINGS, indirect=True)
def test_layer_scan_equals_stepping(binding, case, T, dim, time_dim, shape, dtype):
    """``layer.scan(xs, time_dim)`` from held states: stepping's outputs and final states, and the next step."""
    b, (_, name, kwargs) = binding, case
    skip_mlx_float64_on_gpu(b, dtype)
    layer = b.make(name, {**kwargs, "dim": dim}, dtype)
    step_shape = _step_shape(shape, kwargs["num_neurons"])
    rng = np.random.default_rng(T)
    warmup, xs, after = (rng.standard_normal((n, *step_shape)).astype(dtype) for n in (WARMUP, T, 1))

    b.steps(layer, warmup)
    held = b.save_states(layer)
    stepped = b.steps(layer, xs)
    stepped_states = b.host_states(layer)
    stepped_next = b.steps(layer, after)

    b.load_states(layer, held)
    with torch.no_grad():  # compiled=False: eager, whatever SSM_COMPILE says (the compiled cells are below)
        scanned = b.to_numpy(layer.scan(b.asarray(np.moveaxis(xs, 0, time_dim)), time_dim=time_dim, compiled=False))
    _assert_close(np.moveaxis(scanned, time_dim, 0), stepped, TOL[dtype], "outputs")
    _assert_states_close(b.host_states(layer), stepped_states, TOL[dtype])
    _assert_close(b.steps(layer, after), stepped_next, TOL[dtype], "the step after the sequence")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "dim", "time_dim", "shape"), SEQUENCE_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_torch_layer_scan_gradients_equal_stepping(case, T, dim, time_dim, shape, dtype):
    """Gradients of a loss of the outputs and final states, for the inputs and every parameter."""
    _, name, kwargs = case
    b = get_binding("torch")
    layer = b.make(name, {**kwargs, "dim": dim}, dtype, seed=1)
    step_shape = _step_shape(shape, kwargs["num_neurons"])
    rng = np.random.default_rng(T + 1)
    warmup = torch.from_numpy(rng.standard_normal((WARMUP, *step_shape)).astype(dtype))
    xs = torch.from_numpy(rng.standard_normal((T, *step_shape)).astype(dtype)).requires_grad_()
    weights = torch.from_numpy(rng.standard_normal((T, *step_shape)).astype(dtype))

    def run(scan: bool):
        layer.zero_states()
        with torch.no_grad():
            for x in warmup:
                layer(x)
        if scan:
            ys = layer.scan(xs.movedim(0, time_dim), time_dim=time_dim, compiled=False).movedim(time_dim, 0)
        else:
            ys = torch.stack([layer(x) for x in xs])
        states = {n: getattr(layer, n) for n in layer.state_names}
        loss = (ys * weights).sum() + sum((s**2).sum() for s in states.values())
        grads = torch.autograd.grad(loss, [xs, *layer.parameters()])
        return ys.detach(), {k: v.detach() for k, v in states.items()}, grads

    ys_step, states_step, grads_step = run(scan=False)
    ys_scan, states_scan, grads_scan = run(scan=True)
    _assert_close(ys_scan, ys_step, TOL[dtype], "outputs")
    _assert_states_close(states_scan, states_step, TOL[dtype])
    names = ["xs", *(n for n, _ in layer.named_parameters())]
    for what, g_scan, g_step in zip(names, grads_scan, grads_step, strict=True):
        _assert_close(g_scan, g_step, GRAD_TOL[dtype], f"gradient of {what}")


# ----------------------------------------------------------------------------- ssm_core's functions, every method


def _functional_case(b, name: str, kwargs: dict, T: int, batch: tuple, dtype: str, seed: int):
    """``(params, initial state, xs)`` on ``b``'s arrays: the case's weights, a random non-zero state, inputs."""
    spec = ssm_core.LAYERS[name]
    config = spec.config(**kwargs)
    rng = np.random.default_rng(seed)
    params = spec.params_from_mapping(
        {k: b.asarray(v.astype(dtype)) for k, v in random_weights(name, kwargs, seed).items()}
    )
    state = spec.state(**{
        slot.name: b.asarray(rng.standard_normal(
            batch + (slot.size,) + (() if slot.trailing is None else (slot.trailing,))
        ).astype(dtype))
        for slot in config.state_slots()
    })
    xs = b.asarray(rng.standard_normal((T, *batch, config.num_neurons)).astype(dtype))
    return params, state, xs


def _host_state(b, state) -> dict:
    return {k: None if v is None else b.to_numpy(v) for k, v in state._asdict().items()}


@functools.lru_cache(maxsize=None)
def _functional_stepped(binding_name: str, case_id: str, T: int, batch: tuple, dtype: str):
    """``ssm_core``'s step over the case's sequence on one library: outputs and final states, in NumPy.

    Cached: every scan method of a case is held to the same steps."""
    b = get_binding(binding_name)
    (_, name, kwargs), = (p.values[0] for p in CASES if p.id == case_id)
    params, state, xs = _functional_case(b, name, kwargs, T, batch, dtype, seed=T)
    ys = []
    for t in range(T):
        y, state = STEP[name](xs[t, ...], state, params, config=_config(name, kwargs))
        ys.append(b.to_numpy(y))
    return np.stack(ys), _host_state(b, state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "batch"), FUNCTIONAL_SEQUENCES, ids=FUNCTIONAL_IDS)
@pytest.mark.parametrize(("case", "method"), METHOD_PARAMS)
def test_functional_scan_equals_stepping(binding, case, method, T, batch, dtype):
    """``ssm_core.<layer>_scan(xs, state, params, method=...)``: the outputs and final state of its steps."""
    b, (case_id, name, kwargs) = binding, case
    skip_mlx_float64_on_gpu(b, dtype)
    params, state, xs = _functional_case(b, name, kwargs, T, batch, dtype, seed=T)
    ys, final = SCAN[name](xs, state, params, method=method, config=_config(name, kwargs))
    assert isinstance(ys, b.array_types)
    stepped, stepped_state = _functional_stepped(b.name, case_id, T, batch, dtype)
    _assert_close(b.to_numpy(ys), stepped, TOL[dtype], f"{method} outputs")
    _assert_states_close(_host_state(b, final), stepped_state, TOL[dtype], f"{method} ")


SELECTIVE_METHOD_PARAMS = [p for p in METHOD_PARAMS if not ssm_core.LAYERS[p.values[0][1]].time_invariant]


@pytest.mark.parametrize("readout", READOUT_FORMS)
@pytest.mark.parametrize("expm1", EXPM1_FORMS)
@pytest.mark.parametrize(("case", "method"), SELECTIVE_METHOD_PARAMS)
@pytest.mark.parametrize("binding", ["numpy", "torch", "mlx"], indirect=True)
def test_functional_scan_equals_stepping_in_every_form(binding, case, method, expm1, readout):
    """S6/Mamba under a plan naming the forms of ``expm1`` and of the readout (the bindings pick them per
    library, device and autograd): the scan equals the steps run with the same forms, float64."""
    b, (_, name, kwargs) = binding, case
    T, batch = ACROSS_A_BLOCK, (3, 2)
    forms = ssm_core.Plan(expm1=expm1, readout=readout)
    params, state, xs = _functional_case(b, name, kwargs, T, batch, "float64", seed=T + 4)
    config = _config(name, kwargs)
    ys, final = SCAN[name](xs, state, params, plan=forms._replace(method=method), config=config)
    stepped = []
    for t in range(T):
        y, state = STEP[name](xs[t, ...], state, params, plan=forms, config=config)
        stepped.append(b.to_numpy(y))
    _assert_close(b.to_numpy(ys), np.stack(stepped), TOL["float64"], f"{method} outputs")
    _assert_states_close(_host_state(b, final), _host_state(b, state), TOL["float64"], f"{method} ")


def _torch_gradients(loss_fn, leaves):
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    return [g.numpy() for g in torch.autograd.grad(loss_fn(*leaves), leaves)]


def _mlx_gradients(loss_fn, leaves):
    import mlx.core as mx

    grads = mx.grad(loss_fn, argnums=list(range(len(leaves))))(*leaves)
    return [np.array(g) for g in grads]


AUTOGRAD = {"torch": _torch_gradients, "mlx": _mlx_gradients}


@pytest.mark.parametrize(("T", "batch"), FUNCTIONAL_SEQUENCES[:3], ids=FUNCTIONAL_IDS[:3])
@pytest.mark.parametrize(("case", "method"), METHOD_PARAMS)
@pytest.mark.parametrize("binding", list(AUTOGRAD), indirect=True)
def test_functional_scan_gradients_equal_stepping(binding, case, method, T, batch):
    """Gradients (torch.autograd, mx.grad) for the inputs, every parameter and the initial state, float64."""
    b, (_, name, kwargs) = binding, case
    skip_mlx_float64_on_gpu(b, "float64")
    spec, config = ssm_core.LAYERS[name], _config(name, kwargs)
    params, state, xs = _functional_case(b, name, kwargs, T, batch, "float64", seed=T + 2)
    present = [k for k, v in params._asdict().items() if v is not None]
    state_names = [k for k, v in state._asdict().items() if v is not None]
    weights = b.asarray(np.random.default_rng(T + 3).standard_normal(tuple(xs.shape)))

    def loss(scan: bool):
        def fn(xs, *leaves):
            p = spec.params(**dict(zip(present, leaves[: len(present)])))
            s = spec.state(**dict(zip(state_names, leaves[len(present):])))
            if scan:
                ys, final = SCAN[name](xs, s, p, method=method, config=config)
            else:
                ys = []
                for t in range(xs.shape[0]):
                    y, s = STEP[name](xs[t, ...], s, p, config=config)
                    ys.append(y)
                ys, final = b.library.stack(ys), s
            return (ys * weights).sum() + sum((f**2).sum() for f in final if f is not None)

        return fn

    leaves = [xs, *(getattr(params, k) for k in present), *(getattr(state, k) for k in state_names)]
    grads_step = AUTOGRAD[b.name](loss(False), leaves)
    grads_scan = AUTOGRAD[b.name](loss(True), leaves)
    for what, g_scan, g_step in zip(["xs", *present, *state_names], grads_scan, grads_step, strict=True):
        _assert_close(g_scan, g_step, GRAD_TOL["float64"], f"{method}: gradient of {what}")


# ----------------------------------------------------------------------------- compiled blocks

# The block key test_fused.py compiles (blocks of FUSED_BLOCK steps, 6 batch elements, N features, D_STATE,
# per dtype, with and without autograd): in one pytest process, and through inductor's cache across runs, these
# cells compile nothing new. T = 13 is whole compiled blocks and a shorter last block, which runs eagerly.
FUSED_N, FUSED_D_STATE, FUSED_BLOCK, FUSED_T = 8, 4, 4, 13
# (id, layer, options): Hugging Face's options compile the Euler block of width 2 N, as test_fused.py does.
COMPILED_LAYERS = [
    ("S6", "S6", {}), ("Mamba", "Mamba", {}),
    ("Mamba-hf", "Mamba", dict(expand=2, discretization="euler", residual=False, bias=True, conv_bias=False)),
]


@pytest.fixture
def fused_block_key(monkeypatch):
    monkeypatch.setattr(torch_backend, "fused_block", FUSED_BLOCK)
    monkeypatch.delenv(fused.ENV_VAR, raising=False)


def _ran_compiled(b, dtype: str, config) -> bool:
    """Whether ``b``'s compiled block of the fused key (6 batch elements, the config's width and rule) is
    compiled, checked and in use."""
    backend = torch_backend if b.name == "torch" else b.mod.backend
    array_dtype = getattr(torch, dtype) if b.name == "torch" else backend.dtype(dtype)
    width = getattr(config, "d_inner", config.num_neurons)
    key = (backend.fused_block, 6, width, FUSED_D_STATE, array_dtype)
    return any(tuple(k[:5]) == key and k[-1] == config.discretization for k in backend.block_compiler.compiled_keys())


@pytest.mark.filterwarnings("error::ssm_core.fused.CompileFallbackWarning")  # a silent eager fallback is no pass
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "options"), [pytest.param(*c[1:], id=c[0]) for c in COMPILED_LAYERS])
@pytest.mark.parametrize("binding", ["torch", "mlx"], indirect=True)
def test_compiled_scan_equals_stepping(fused_block_key, binding, name, options, dtype):
    """``scan(compiled=True)``: stepping's outputs, final states and next step; torch's gradients too.

    Features first (``dim=0``) on steps of shape ``[N, 3, 2]``: the compiled block sees 6 batch elements
    in a row, whatever their layout."""
    b = binding
    skip_mlx_float64_on_gpu(b, dtype)
    kwargs = dict(num_neurons=FUSED_N, d_state=FUSED_D_STATE, dim=0, **options)
    weights = random_weights(name, {k: v for k, v in kwargs.items() if k != "dim"}, seed=5)
    weights["dt_proj.bias"] = weights["dt_proj.bias"] + 1.0  # a larger dt: the state carries across blocks
    stepper, scanner = b.make(name, kwargs, dtype, weights), b.make(name, kwargs, dtype, weights)
    rng = np.random.default_rng(6)
    warmup, xs, after = (rng.standard_normal((n, FUSED_N, 3, 2)).astype(dtype) for n in (WARMUP, FUSED_T, 1))
    b.steps(stepper, warmup)
    b.steps(scanner, warmup)
    stepped = b.steps(stepper, xs)
    with torch.no_grad():
        scanned = b.to_numpy(scanner.scan(b.asarray(xs), compiled=True))
    assert _ran_compiled(b, dtype, scanner.config), "the scan ran no compiled block"
    _assert_close(scanned, stepped, TOL[dtype], "outputs")
    _assert_states_close(b.host_states(scanner), b.host_states(stepper), TOL[dtype])
    _assert_close(b.steps(scanner, after), b.steps(stepper, after), TOL[dtype], "the step after the sequence")
    if b.name != "torch":
        return  # the MLX layers hold their states outside any autograd: no gradients to compare

    def grads(layer, scan: bool):
        layer.zero_states()
        for x in warmup:  # the held states carry the warm-up's graph
            layer(torch.from_numpy(x))
        x_leaf = torch.from_numpy(xs).requires_grad_()
        ys = layer.scan(x_leaf, compiled=True) if scan else torch.stack([layer(x) for x in x_leaf])
        loss = ys.square().mean() + sum(getattr(layer, n).square().mean() for n in layer.state_names)
        return torch.autograd.grad(loss, [x_leaf, *layer.parameters()])

    names = ["xs", *(n for n, _ in scanner.named_parameters())]
    for what, g_scan, g_step in zip(names, grads(scanner, True), grads(stepper, False), strict=True):
        _assert_close(g_scan, g_step, GRAD_TOL[dtype], f"gradient of {what}")


# ----------------------------------------------------------------------------- a long run


LONG_T = 100_000
LONG_LAYERS = [("S4", {"d_state": 5}), ("S5", {"d_state": 6}), ("S6", {"d_state": 4}), ("Mamba", {"d_state": 4})]


@pytest.mark.parametrize(("name", "kwargs"), LONG_LAYERS, ids=[n for n, _ in LONG_LAYERS])
def test_hundred_thousand_steps_with_large_dt(name, kwargs):
    """100,000 steps with a large ``dt`` (decays of ``exp(-50 A)``, far below exp's range): the NumPy layer's
    scan stays finite and equal to stepping, float64.

    The steps are ``ssm_core``'s, with the parameters prepared once: the layer's own step is that step
    (``test_ssm_core.py``) behind per-call checks that would triple this test's time."""
    b = get_binding("numpy")
    kwargs = {"num_neurons": 8, **kwargs}
    weights = random_weights(name, kwargs, seed=3)
    if name in ("S4", "S5"):
        weights["log_dt"] = np.full_like(weights["log_dt"], np.log(50.0))
    else:
        weights["dt_proj.bias"] = np.full_like(weights["dt_proj.bias"], 60.0)
    xs = np.random.default_rng(3).standard_normal((LONG_T, 1, 8))
    spec = ssm_core.LAYERS[name]
    params = spec.params_from_mapping(weights)
    prepared = spec.prepare(params, np)
    state = spec.zero_state(spec.config(**kwargs), (1,), np, np.float64)
    stepped = np.empty_like(xs)
    for t in range(LONG_T):
        stepped[t], state = spec.step(xs[t], state, params, prepared=prepared)
    layer = b.make(name, kwargs, "float64", weights)
    _assert_close(b.scan(layer, xs), stepped, TOL["float64"], "outputs")
    _assert_states_close(b.host_states(layer), _host_state(b, state), TOL["float64"])
