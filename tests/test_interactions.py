"""The interaction matrix: every execution path crossed with every documented feature.

Paths (``PATHS``): stepping (one call per timestep), the eager ``scan``, the
compiled ``scan`` (``compiled=True``: the block the automatic policy switches
to), a ``TTcompile()``d step, and a ``tt.Model`` in sequence mode (with
``SSM_COMPILE=1``, so its scans run the compiled block too).

Features, one test function each: ``tt.checkpoint``, a double backward,
``torch.func``, CPU autocast, deepcopy/pickle/``torch.save`` in the middle of
use, ``torch.compile(fullgraph=True)``, ``load_states`` with states attached
to a graph, and a weight edit between calls.

Every cell is held to the eager reference (a copy of the layer stepped
eagerly, in float64) or to the documented behaviour where it differs on
purpose: ``TTcompile()`` freezes the weights, so a ``TTcompile``d layer trains
no parameter and ignores a weight edit until ``TTdecompile()``.

Compiling is slow, so the compiled cells share the block key of
``test_fused.py`` (blocks of ``BLOCK`` steps, batch 6, ``N`` features,
``D_STATE``): in one pytest process those blocks are compiled once.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import tracetorch as tt
from ssm_core import fused
from tracetorch.ssm import _fused
from tracetorch.ssm._backend import backend as torch_backend

N, D_STATE, BLOCK, BATCH, T = 8, 4, 4, 6, 10  # T = 10: two whole blocks and a padded one
LAYERS = ["S4", "S5", "S6", "Mamba"]
PATHS = ["step", "eager_scan", "compiled_scan", "ttcompile", "sequence_mode"]
# float64 against float64: the paths differ only in the order of sums and in
# the compiled block's expm1 series (within 2 ulp), over T steps of decaying states.
TOL64 = 1e-12
# bfloat16 matrix products (8 bits of mantissa, eps 2**-8 = 3.9e-3) feed
# every later step under autocast: a few units of bf16 rounding, relative.
TOL_BF16 = 3e-2


@pytest.fixture(autouse=True)
def _shared_block_key(monkeypatch):
    monkeypatch.setattr(torch_backend, "fused_block", BLOCK)
    monkeypatch.delenv(fused.ENV_VAR, raising=False)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = _rel(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def _make(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = getattr(tt.ssm, name)(N, d_state=D_STATE).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():  # no default value hides a bug
            p.add_(0.1 * torch.randn_like(p))
        if name in ("S6", "Mamba"):
            layer.dt_proj.bias.add_(1.0)  # the state carries across blocks
    return layer


def _inputs(dtype=torch.float64, seed=1, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, BATCH, N, generator=gen, dtype=dtype).requires_grad_(requires_grad)


class Runner(tt.Model):
    """A model running one layer along one path; ``forward`` takes a whole sequence ``[T, batch, N]``."""

    def __init__(self, layer, path):
        super().__init__()
        self.layer = layer
        self.path = path
        if path == "ttcompile":
            layer.TTcompile()

    def forward(self, xs):
        if self.path in ("step", "ttcompile"):
            return torch.stack([self.layer(x) for x in xs.unbind(0)])
        if self.path == "eager_scan":
            return self.layer.scan(xs, compiled=False)
        if self.path == "compiled_scan":
            return self.layer.scan(xs, compiled=True)
        return self.layer(xs)  # sequence_mode: call() runs it inside tt.sequence_mode


def _runner(name, path, monkeypatch, dtype=torch.float64):
    """``(runner, reference)``: the layer on ``path``, and an eager copy of it taken before."""
    layer = _make(name, dtype)
    reference = copy.deepcopy(layer)
    if path == "sequence_mode":
        monkeypatch.setenv(fused.ENV_VAR, "1")
    return Runner(layer, path), reference


def call(runner, xs, checkpointed=False):
    """The runner on ``xs``, optionally under ``tt.checkpoint``; sequence mode only around the forward."""
    fn = (lambda chunk: tt.checkpoint(runner, chunk)) if checkpointed else runner
    if runner.path == "sequence_mode":
        with tt.sequence_mode(runner):
            return fn(xs)
    return fn(xs)


def stepped(layer, xs):
    """The eager reference: ``layer`` stepped over ``xs``."""
    return torch.stack([layer(x) for x in xs.unbind(0)])


def _states(layer):
    return {name: getattr(layer, name) for name in layer.state_names}


def _assert_same_states(layer, reference, tol, what=""):
    for name, want in _states(reference).items():
        got = getattr(layer, name)
        assert got.dtype == want.dtype, f"{what}{name}: dtype {got.dtype}, expected {want.dtype}"
        _assert_close(got, want, tol, f"{what}{name}")


def _trained(runner, reference):
    """The parameters a path trains, and the reference's: none for a TTcompile'd layer (its weights are frozen)."""
    if runner.path == "ttcompile":
        return [], []
    return list(runner.layer.parameters()), list(reference.parameters())


def _cotangent(shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)


def _assert_same_gradients(ys, ys_ref, runner, reference, xs, tol):
    """The gradients of a weighted sum of ``ys`` (input and trained parameters) against the reference's."""
    w = _cotangent(xs.shape, torch.float32 if ys.dtype != torch.float64 else torch.float64)
    params, params_ref = _trained(runner, reference)
    grads = torch.autograd.grad((ys.to(w.dtype) * w).sum(), [xs, *params])
    grads_ref = torch.autograd.grad((ys_ref.to(w.dtype) * w).sum(), [xs, *params_ref])
    for got, want in zip(grads, grads_ref, strict=True):
        _assert_close(got, want, tol, "gradient")


# ----------------------------------------------------------------------------- the cells


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAYERS)
def test_checkpoint(name, path, monkeypatch):
    runner, reference = _runner(name, path, monkeypatch)
    xs = _inputs(requires_grad=True)
    ys = torch.cat([call(runner, chunk, checkpointed=True) for chunk in xs.split(4)])  # 3 chunks
    ys_ref = stepped(reference, xs)
    _assert_close(ys, ys_ref, TOL64, "outputs")
    _assert_same_states(runner.layer, reference, TOL64)
    _assert_same_gradients(ys, ys_ref, runner, reference, xs, TOL64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAYERS)
def test_double_backward(name, path, monkeypatch):
    runner, reference = _runner(name, path, monkeypatch)
    xs = _inputs(requires_grad=True)
    w = _cotangent(xs.shape, xs.dtype)

    def penalty_grads(fn, params):
        ys = fn(xs)
        (g,) = torch.autograd.grad((ys * w).sum(), xs, create_graph=True)  # a gradient penalty
        # S4/S5 are linear in xs: their penalty does not depend on xs, whose gradient is then zero
        # (and on nothing at all with TTcompile's frozen dynamics).
        penalty = g.pow(2).sum()
        if not penalty.requires_grad:
            return [torch.zeros_like(t) for t in (xs, *params)]
        grads = torch.autograd.grad(penalty, [xs, *params], allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip([xs, *params], grads)]

    params, params_ref = _trained(runner, reference)
    grads = penalty_grads(lambda x: call(runner, x), params)
    grads_ref = penalty_grads(lambda x: stepped(reference, x), params_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        _assert_close(got, want, TOL64, "second-order gradient")


@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAYERS)
def test_torch_func(name, path, transform, monkeypatch):
    runner, reference = _runner(name, path, monkeypatch)
    xs = _inputs()
    v = _cotangent(xs.shape, xs.dtype)

    def fresh(fn, layer):
        def f(x):
            layer.zero_states()  # a transform's states must not leak into a later call
            try:
                return fn(x)
            finally:
                layer.zero_states()

        return f

    f = fresh(lambda x: call(runner, x), runner.layer)
    f_ref = fresh(lambda x: stepped(reference, x), reference)
    if transform == "grad":
        got = torch.func.grad(lambda x: (f(x) * v).sum())(xs)
        want = torch.func.grad(lambda x: (f_ref(x) * v).sum())(xs)
    elif transform == "jvp":
        got = torch.func.jvp(f, (xs,), (v,))[1]
        want = torch.func.jvp(f_ref, (xs,), (v,))[1]
    else:  # two independent sequences, mapped over a leading axis
        pair = torch.stack((xs, v))  # [2, T, batch, N]
        got = torch.func.vmap(f)(pair)
        want = torch.stack((f_ref(xs), f_ref(v)))
    _assert_close(got, want, TOL64, transform)
    if path == "compiled_scan" and name in ("S6", "Mamba"):
        assert _fused.block_compiler.failed is None, "a torch.func call switched compiling off"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAYERS)
def test_cpu_autocast(name, path, monkeypatch):
    runner, reference = _runner(name, path, monkeypatch, dtype=torch.float32)
    xs = _inputs(torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        # A compiled graph traced under autocast agrees with the eager one under autocast: no fallback.
        warnings.simplefilter("error", fused.CompileFallbackWarning)
        ys = call(runner, xs)
        ys_ref = stepped(reference, xs)
    assert ys.dtype == ys_ref.dtype
    _assert_close(ys, ys_ref, TOL_BF16, "outputs")
    for name_, value in _states(runner.layer).items():
        assert value.dtype == torch.float32, f"{name_} is {value.dtype}: states stay float32 under autocast"
    _assert_same_states(runner.layer, reference, TOL_BF16)
    _assert_same_gradients(ys, ys_ref, runner, reference, xs, TOL_BF16)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAYERS)
def test_copy_in_the_middle_of_use(name, path, how, monkeypatch):
    runner, reference = _runner(name, path, monkeypatch)
    xs = _inputs()
    first, second = xs[:5], xs[5:]

    def duplicate(obj):
        if how == "deepcopy":
            return copy.deepcopy(obj)
        if how == "pickle":
            return pickle.loads(pickle.dumps(obj))
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    with torch.no_grad():
        if path == "sequence_mode":
            with tt.sequence_mode(runner):
                runner(first)
                clone = duplicate(runner)  # a snapshot taken inside the block
        else:
            call(runner, first)
            clone = duplicate(runner)
        stepped(reference, first)
        want = stepped(reference, second)
        # The copy runs on along its own path, and steps as a plain layer outside sequence mode.
        got = call(clone, second)
        _assert_close(got, want, TOL64, "the copy's outputs")
        _assert_same_states(clone.layer, reference, TOL64, "the copy's ")
        got_original = call(runner, second)
        _assert_close(got_original, want, TOL64, "the original's outputs")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", LAYERS)
def test_copy_made_in_sequence_mode_steps_outside_it(name, how):
    # A snapshot (best model, EMA) taken inside tt.sequence_mode is a plain layer afterwards.
    layer = _make(name)
    reference = copy.deepcopy(layer)
    xs = _inputs()
    with torch.no_grad():
        with tt.sequence_mode(layer):
            layer(xs[:5])
            clone = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
        stepped(reference, xs[:5])
        got = stepped(clone, xs[5:])
        want = stepped(reference, xs[5:])
    _assert_close(got, want, TOL64, "outputs")
    _assert_same_states(clone, reference, TOL64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAYERS)
def test_torch_compile_fullgraph(name, path, monkeypatch):
    runner, reference = _runner(name, path, monkeypatch)
    xs = _inputs()
    # aot_eager traces the whole graph and its autograd, as inductor would, without generating code.
    # A code object of its own: dynamo's recompile limit counts per code object, and every cell is a new model.
    compiled = torch.compile(_fused._own_code(lambda x: runner(x)), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        if path == "sequence_mode":
            with tt.sequence_mode(runner):
                ys = compiled(xs)
        else:
            ys = compiled(xs)
        ys_ref = stepped(reference, xs)
    _assert_close(ys, ys_ref, TOL64, "outputs")
    _assert_same_states(runner.layer, reference, TOL64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAYERS)
def test_load_states_attached_to_a_graph(name, path, monkeypatch):
    runner, reference = _runner(name, path, monkeypatch)
    xs = _inputs()
    with torch.no_grad():
        call(runner, xs[:1])  # the held states' shapes
    initial = {key: torch.nn.Parameter(0.1 * torch.randn_like(value)) for key, value in runner.save_states().items()}
    reference_model = tt.Model()
    reference_model.layer = reference
    runner.load_states(initial)  # a learned initial state: gradients reach it
    reference_model.load_states(initial)
    w = _cotangent(xs.shape, xs.dtype)
    ys = call(runner, xs)
    ys_ref = stepped(reference, xs)
    _assert_close(ys, ys_ref, TOL64, "outputs")
    grads = torch.autograd.grad((ys * w).sum(), list(initial.values()))
    grads_ref = torch.autograd.grad((ys_ref * w).sum(), list(initial.values()))
    for key, got, want in zip(initial, grads, grads_ref, strict=True):
        assert got.abs().max() > 0, f"no gradient reached the loaded {key}"
        _assert_close(got, want, TOL64, f"gradient of the loaded {key}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAYERS)
def test_weight_edit_between_calls(name, path, monkeypatch):
    runner, reference = _runner(name, path, monkeypatch)
    xs = _inputs()
    gen = torch.Generator().manual_seed(3)

    def edit(layer):
        gen.manual_seed(3)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))  # an optimizer's step
            first = next(layer.parameters())
        first.data = first.data * 1.01  # and a write through .data, which bumps no version

    with torch.no_grad():
        call(runner, xs[:5])
        stepped(reference, xs[:5])
        edit(runner.layer)
        if path != "ttcompile":  # TTcompile() froze the weights: the edit takes effect at TTdecompile()
            edit(reference)
        _assert_close(call(runner, xs[5:]), stepped(reference, xs[5:]), TOL64, "outputs after the edit")
        _assert_same_states(runner.layer, reference, TOL64)
        if path == "ttcompile":
            runner.layer.TTdecompile()  # now the steps follow the edited weights
            edit(reference)
            _assert_close(stepped(runner.layer, xs[:3]), stepped(reference, xs[:3]), TOL64, "after TTdecompile")
