"""The fused S6/Mamba paths give eager's numbers: compiled scans, TTcompile'd steps, MLX's mx.compile;
and so do the other speed paths: ``torch.compile`` of any layer's step, the prepared dynamics.

Compiling is slow, so every compiled scan here shares one block key: a block
of ``BLOCK`` steps (short: a shorter unroll compiles sooner; the code is the
same at any length), batch shapes of 6 elements, ``N`` features and
``D_STATE``, per dtype; one graph without autograd and one with it.
"""

from __future__ import annotations

import pickle
import warnings

import array_api_compat.torch as xp_torch
import numpy as np
import pytest
import torch
import torch._dynamo as dynamo

import backends
import ssm_core
import tracetorch as tt
from ssm_core import fused
from ssm_core.discretize import _zoh_terms_from_exp
from conftest import random_weights
from tracetorch.ssm import _fused
from tracetorch.ssm._backend import backend as torch_backend

N, D_STATE, BLOCK = 8, 4, 4
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# Hugging Face's options: Euler's rule reaches the compiled block (the rest of them run around it).
HF_OPTIONS = {"expand": 2, "discretization": "euler", "residual": False, "bias": True, "conv_bias": False}
CASES = [("S6", {}), ("Mamba", {}), ("Mamba", {"conv_kernel": 1}), ("Mamba", HF_OPTIONS)]
CASE_IDS = ["S6", "Mamba", "Mamba-k1", "Mamba-hf"]
DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["float64", "float32"]
# (dim, step input shape): 6 batch elements however they are laid out
BATCHES = [(-1, (6, N)), (-1, (2, 3, N)), (0, (N, 3, 2))]
BATCH_IDS = ["batch6", "batch2x3", "features-first"]


@pytest.fixture(autouse=True)
def _short_blocks(monkeypatch):
    monkeypatch.setattr(torch_backend, "fused_block", BLOCK)
    monkeypatch.delenv(fused.ENV_VAR, raising=False)


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _layer(name, kwargs, dtype, dim=-1, seed=0):
    torch.manual_seed(seed)
    layer = getattr(tt.ssm, name)(N, d_state=D_STATE, dim=dim, **kwargs).to(dtype)
    with torch.no_grad():  # dt large enough that the state carries across blocks
        layer.dt_proj.bias.add_(1.0)
    return layer


def _states(layer):
    return {slot.name: getattr(layer, slot.name) for slot in layer._slots}


def _run(layer, warmup, xs, compiled, time_dim=0):
    """Steps over ``warmup``, then ``scan(xs)``: outputs and final states, from held states."""
    layer.zero_states()
    for x in warmup:
        layer(x)
    ys = layer.scan(xs, time_dim=time_dim, compiled=compiled)
    return ys, _states(layer)


# ----------------------------------------------------------------------------- scans


@pytest.mark.parametrize(("dim", "step_shape"), BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_compiled_scan_equals_eager(name, kwargs, dtype, dim, step_shape):
    layer = _layer(name, kwargs, dtype, dim)
    gen = torch.Generator().manual_seed(1)
    warmup = torch.randn((3,) + step_shape, generator=gen, dtype=dtype)
    for T in (13, 8):  # a padded last block, and whole blocks only
        xs = torch.randn((T,) + step_shape, generator=gen, dtype=dtype)
        with torch.no_grad():
            eager_ys, eager_states = _run(layer, warmup, xs, compiled=False)
            fused_ys, fused_states = _run(layer, warmup, xs, compiled=True)
        assert fused_ys.shape == eager_ys.shape
        assert _rel(fused_ys, eager_ys) <= TOL[dtype]
        for key in eager_states:
            assert _rel(fused_states[key], eager_states[key]) <= TOL[dtype], key


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_compiled_scan_gradients_equal_eager(name, kwargs, dtype):
    layer = _layer(name, kwargs, dtype)
    gen = torch.Generator().manual_seed(2)
    warmup = torch.randn(2, 6, N, generator=gen, dtype=dtype)
    xs = torch.randn(13, 6, N, generator=gen, dtype=dtype)
    grads = {}
    for compiled in (False, True):
        layer.zero_grad()
        x_leaf = xs.clone().requires_grad_()
        ys, states = _run(layer, warmup, x_leaf, compiled)  # the held states carry the warm-up's graph
        loss = ys.square().mean() + sum(s.square().mean() for s in states.values())
        loss.backward()
        grads[compiled] = {"xs": x_leaf.grad, **{k: p.grad.clone() for k, p in layer.named_parameters()}}
    for key, eager in grads[False].items():
        assert _rel(grads[True][key], eager) <= TOL[dtype], key


def test_no_graph_breaks_in_the_block_and_the_step():
    gen = torch.Generator().manual_seed(3)
    u, dt = torch.randn(BLOCK, 6, N, generator=gen), torch.rand(BLOCK, 6, N, generator=gen)
    B, C = torch.randn(BLOCK, 6, D_STATE, generator=gen), torch.randn(BLOCK, 6, D_STATE, generator=gen)
    h = torch.randn(6, N, D_STATE, generator=gen)
    A, inv_A = ssm_core.selective_decay(torch.randn(N, D_STATE, generator=gen))
    for rule in ssm_core.discretize.DISCRETIZATIONS:
        explanation = dynamo.explain(_fused._flat_block)(u, dt, B, C, h, A, inv_A, torch.ones(N), rule)
        assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    for name, kwargs in CASES:
        layer = _layer(name, kwargs, torch.float32)
        spec, params = layer.spec, layer._core_params()
        state = spec.zero_state(layer.config, (6,), xp_torch)
        with torch.no_grad():  # the step TTcompile compiles
            explanation = dynamo.explain(lambda x, s, p, d: spec.step(x, s, p, xp_torch, d))(
                u[0], state, params, spec.prepare(params, xp_torch)
            )
        assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]


def test_one_compile_per_key_reused_without_recompiles(monkeypatch):
    made = []
    compiler = fused.BlockCompiler("the S6/Mamba scan block", "torch.compile", lambda key: made.append(key) or
                                   _fused._compile_block(key))
    monkeypatch.setattr(_fused, "block_compiler", compiler)
    layer = _layer("S6", {}, torch.float32)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.scan(torch.randn(5, 6, N, generator=gen), compiled=True)  # compiles (or loads) the key
        frames = dynamo.utils.counters["frames"]["ok"]
        layer.scan(torch.randn(13, 6, N, generator=gen), compiled=True)  # held states, a padded block
        for shape in ((8, 2, 3, N), (3, 3, 2, N)):  # whole blocks, other batch layouts, fresh states
            layer.zero_states()
            layer.scan(torch.randn(shape, generator=gen), compiled=True)
    assert len(made) == 1
    assert dynamo.utils.counters["frames"]["ok"] == frames, "a compiled block was recompiled"


def test_compiled_backward_keeps_no_per_step_states():
    """Under autograd the compiled blocks keep their inputs and one state per block, not every step's state."""
    layer = _layer("S6", {}, torch.float32)
    xs = torch.randn(64, 6, N, requires_grad=True)
    saved = {}
    for compiled in (False, True):
        storages = {}

        def pack(t, storages=storages):
            storage = t.untyped_storage()  # blocks of one array share a storage: count it once
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        layer.zero_states()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward pass keeps
            ys = layer.scan(xs, compiled=compiled)
        ys.sum().backward()  # (the backward recomputes one block at a time)
        saved[compiled] = sum(storages.values())
    states = xs.shape[0] * 6 * N * D_STATE * 4  # bytes of every step's state
    inputs = xs.shape[0] * 6 * (2 * N + 2 * D_STATE) * 4  # bytes of every step's u, dt, B, C
    assert saved[False] > 2 * states
    assert saved[True] < 2 * inputs + 2 * states / BLOCK, (saved, states, inputs)


# ----------------------------------------------------------------------------- policy, switch, fallback


def test_compile_mode_switch_and_environment(monkeypatch):
    assert fused.compile_mode(None) == "auto"
    for value, mode in (("0", "eager"), ("1", "always"), ("auto", "auto"), ("OFF", "eager"), ("true", "always")):
        monkeypatch.setenv(fused.ENV_VAR, value)
        assert fused.compile_mode(None) == mode
        assert fused.compile_mode(True) == "always" and fused.compile_mode(False) == "eager"  # the argument wins
    monkeypatch.setenv(fused.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="SSM_COMPILE"):
        fused.compile_mode(None)
    with pytest.raises(TypeError):
        fused.compile_mode("yes")


def _spy_compiler(monkeypatch):
    made = []

    def compile_block(key):
        made.append(key)
        def block(inputs):  # stands in for a compiled block: the policy is under test
            return ssm_core.selective_block(inputs, xp_torch)

        return block

    monkeypatch.setattr(_fused, "block_compiler", fused.BlockCompiler("block", "spy", compile_block))
    return made


def test_environment_variable_and_automatic_policy_pick_the_block(monkeypatch):
    made = _spy_compiler(monkeypatch)
    layer = _layer("Mamba", {}, torch.float32)
    xs = torch.randn(20, 6, N)
    with torch.no_grad():
        monkeypatch.setenv(fused.ENV_VAR, "0")
        layer.scan(xs)
        assert made == []
        layer.scan(xs, compiled=True)  # the argument overrides the variable
        assert len(made) == 1
        monkeypatch.setattr(torch_backend, "fused_block", BLOCK + 1)  # a new key
        monkeypatch.setenv(fused.ENV_VAR, "1")
        layer.scan(xs)
        assert len(made) == 2
        monkeypatch.setattr(torch_backend, "fused_block", BLOCK + 2)
        monkeypatch.delenv(fused.ENV_VAR)
        work = 20 * 6 * N * D_STATE
        monkeypatch.setattr(fused, "AUTO_WORK", 2.5 * work)
        layer.scan(xs)
        layer.scan(xs)
        assert len(made) == 2, "auto compiled before the eager work paid for it"
        layer.scan(xs)
        assert len(made) == 3


def _raising_compile(key):
    def block(*args):
        from torch._inductor.exc import InvalidCxxCompiler

        raise InvalidCxxCompiler()  # what inductor raises where no C++ compiler works

    return block


def _torch_compiler(compile_block):
    return fused.BlockCompiler("block", "torch.compile", compile_block, is_failure=_fused._is_compiler_failure)


@pytest.mark.parametrize("failure", ["at-first-call", "at-compile"])
def test_fallback_warns_once_and_gives_eager_numbers(monkeypatch, failure):
    def at_compile(key):
        raise RuntimeError("simulated: inductor unavailable")

    compile_block = _raising_compile if failure == "at-first-call" else at_compile
    monkeypatch.setattr(_fused, "block_compiler", _torch_compiler(compile_block))
    layer = _layer("Mamba", {}, torch.float64)
    xs = torch.randn(13, 6, N, dtype=torch.float64)
    with torch.no_grad():
        layer.zero_states()
        eager = layer.scan(xs, compiled=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = []
            for _ in range(3):
                layer.zero_states()
                outs.append(layer.scan(xs, compiled=True))
            layer.zero_states()
            outs.append(layer.scan(xs))  # auto stays eager too
    fallbacks = [w for w in caught if issubclass(w.category, fused.CompileFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert "runs eagerly" in str(fallbacks[0].message) and "SSM_COMPILE=0" in str(fallbacks[0].message)
    assert fallbacks[0].filename == __file__  # the line that called scan(), not the library's
    for out in outs:
        assert torch.equal(out, eager)


def test_errors_of_the_caller_are_not_taken_for_compiler_failures(monkeypatch):
    monkeypatch.setattr(_fused, "block_compiler", _torch_compiler(_raising_compile))
    block = _fused.block_compiler.select("key", 0, True, lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        block()
    assert _fused.block_compiler.failed_keys == {}


@pytest.mark.parametrize("error", [torch.utils.checkpoint._StopRecomputationError, MemoryError, RuntimeError])
def test_exceptions_that_are_not_the_compilers_pass_through(monkeypatch, error):
    """A checkpoint ends its recomputation with an exception raised inside the block: control flow, not a failure."""
    ran_eager = []

    def compile_block(key):
        def block(*args):
            raise error()

        return block

    compiler = fused.BlockCompiler(
        "block", "torch.compile", compile_block, is_failure=_fused._is_compiler_failure,
        check=lambda compiled, eager, args: None,  # the first call's check passed: a later call raises
    )
    monkeypatch.setattr(_fused, "block_compiler", compiler)
    block = _fused.block_compiler.select("key", 0, True, lambda *args: ran_eager.append(args))
    with pytest.raises(error):
        block(1)
    assert ran_eager == [] and _fused.block_compiler.failed_keys == {}


def test_numpy_has_no_compiler_and_says_so_once(monkeypatch):
    from backends import numpy as bnp

    monkeypatch.setattr(bnp.backend, "_compiler", None, raising=False)
    layer = bnp.S6(N, d_state=D_STATE, dtype="float64", seed=0)
    xs = np.random.default_rng(5).standard_normal((13, 6, N))
    eager = layer.scan(xs, compiled=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = []
        for _ in range(2):
            layer.zero_states()
            outs.append(layer.scan(xs, compiled=True))
    assert len([w for w in caught if issubclass(w.category, fused.CompileFallbackWarning)]) == 1
    layer.zero_states()
    np.testing.assert_array_equal(outs[0], layer.scan(xs, compiled=False))
    assert outs[0].shape == eager.shape


def test_compiled_blocks_are_keyed_by_their_discretization():
    """Layers alike but for the rule: each compiled scan runs its own rule (eager's numbers), under its own key."""
    dtype = torch.float64
    euler = _layer("Mamba", HF_OPTIONS, dtype)
    zoh = tt.ssm.Mamba(N, d_state=D_STATE, **{**HF_OPTIONS, "discretization": "zoh"}).to(dtype)
    zoh.load_state_dict(euler.state_dict())
    gen = torch.Generator().manual_seed(5)
    warmup, xs = torch.randn(2, 6, N, generator=gen, dtype=dtype), torch.randn(8, 6, N, generator=gen, dtype=dtype)
    results = {}
    with torch.no_grad():
        for layer in (euler, zoh):
            eager_ys, _ = _run(layer, warmup, xs, compiled=False)
            fused_ys, _ = _run(layer, warmup, xs, compiled=True)
            assert _rel(fused_ys, eager_ys) <= TOL[dtype], layer.config.discretization
            results[layer.config.discretization] = fused_ys
    # The rules differ far beyond the tolerance: a block of one rule would have failed the other's check.
    assert _rel(results["euler"], results["zoh"]) > 1e3 * TOL[dtype]
    keys = [key for key in _fused.block_compiler.compiled_keys() if key[2] == 2 * N and key[4] == dtype]
    assert sorted(key[-1] for key in keys) == ["euler", "zoh"], keys  # the width is the inner one, 2 N
    assert len({key[:-1] for key in keys}) == 1  # one shape, told apart by the rule alone


# ----------------------------------------------------------------------------- TTcompile's step


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_ttcompiled_steps_equal_eager_steps_and_freeze_the_weights(name, kwargs):
    dtype = torch.float64
    layer = _layer(name, kwargs, dtype)
    xs = torch.randn(6, 6, N, dtype=dtype)
    with torch.no_grad():
        layer.zero_states()
        eager = [layer(x) for x in xs]
        eager_states = _states(layer)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.TTcompile()
        assert layer.state_dict().keys() == before.keys()
        layer.zero_states()
        compiled = [layer(x) for x in xs]
        for a, b in zip(compiled, eager):
            assert _rel(a, b) <= TOL[dtype]
        for key, value in _states(layer).items():
            assert _rel(value, eager_states[key]) <= TOL[dtype], key
        layer.D.add_(1.0)  # frozen: no effect until TTdecompile
        layer.zero_states()
        assert _rel(layer(xs[0]), eager[0]) <= TOL[dtype]
        copy = pickle.loads(pickle.dumps(layer))  # the compiled step is found again, the weights stay frozen
        copy.zero_states()
        assert _rel(copy(xs[0]), eager[0]) <= TOL[dtype]
        layer.TTdecompile()
        layer.zero_states()
        assert _rel(layer(xs[0]), eager[0]) > 1e-6  # follows the parameters again


def _graph_compiler_or_skip():
    if _fused._graph_compiler() is None:
        pytest.skip(f"torch {torch.__version__} has no torch._inductor.standalone_compile: the step is dynamo's")


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_ttcompiled_cpu_steps_run_one_graph_without_dynamo(name, kwargs):
    """On CPUs the step is an inductor graph called directly: dynamo traces no frame of it, at any call."""
    _graph_compiler_or_skip()
    layer = _layer(name, kwargs, torch.float32)
    layer.TTcompile()
    xs = torch.randn(4, 5, N)  # a batch of 5: a key of its own among the tests
    dynamo.utils.counters.clear()
    with torch.no_grad():
        ys = [layer(x) for x in xs]
    assert not dynamo.utils.counters["stats"], dict(dynamo.utils.counters["stats"])  # dynamo captured no graph
    key = (name, layer.config, (5, N), torch.float32, torch.device("cpu"), None)
    assert key in _fused.step_compiler.compiled_keys(), _fused.step_compiler.failed_keys
    layer.TTdecompile()
    layer.zero_states()
    with torch.no_grad():
        for x, y in zip(xs, ys):
            assert _rel(y, layer(x)) <= TOL[torch.float32]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_ttcompiled_steps_of_strided_inputs_equal_eager_steps(name, kwargs):
    """The graph assumes its first call's strides: inputs laid out otherwise (time slices of a
    batch-first sequence, a transposed state) are made contiguous first, not read wrongly."""
    dtype = torch.float64
    layer = _layer(name, kwargs, dtype)
    xs = torch.randn(6, 7, N, dtype=dtype)  # [batch, time, N]: xs[:, t] strides over time
    with torch.no_grad():
        layer.zero_states()
        eager = [layer(xs[:, t]) for t in range(7)]
        eager_states = _states(layer)
        layer.TTcompile()
        layer.zero_states()
        layer(xs[:, 0].contiguous())  # the graph is made for contiguous arrays
        layer.zero_states()
        compiled = [layer(xs[:, t]) for t in range(7)]
    for a, b in zip(compiled, eager):
        assert _rel(a, b) <= TOL[dtype]
    for key, value in _states(layer).items():
        assert _rel(value, eager_states[key]) <= TOL[dtype], key


@pytest.mark.parametrize(("name", "kwargs"), CASES[:2], ids=CASE_IDS[:2])
def test_a_ttcompiled_layer_stepped_then_traced_by_torch_compile(name, kwargs):
    """Stepped eagerly first (its graph made and kept), then inside the caller's torch.compile: traced whole."""
    dtype = torch.float64
    layer = _layer(name, kwargs, dtype)
    reference = _layer(name, kwargs, dtype)
    layer.TTcompile()
    xs = torch.randn(4, 6, N, dtype=dtype)
    compiled = torch.compile(_fused._own_code(lambda x: layer(x)), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        layer(xs[0]), reference(xs[0])
        ys = [compiled(x) for x in xs[1:]]
        expected = [reference(x) for x in xs[1:]]
    for a, b in zip(ys, expected):
        assert _rel(a, b) <= TOL[dtype]


def test_a_ttcompiled_layer_traced_by_torch_compile_first_compiles_its_own_steps_after():
    """Its first step inside the caller's compile runs eagerly there; its steps outside it then compile."""
    layer = _layer("S6", {}, torch.float64)
    layer.TTcompile()
    xs = torch.randn(3, 7, N, dtype=torch.float64)  # a batch of 7: a key of its own among the tests
    compiled = torch.compile(_fused._own_code(lambda x: layer(x)), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(xs[0])
        layer(xs[1])
    key = ("S6", layer.config, (7, N), torch.float64, torch.device("cpu"), None)
    assert key in _fused.step_compiler.compiled_keys(), _fused.step_compiler.failed_keys


def test_a_graph_step_runs_eagerly_for_arrays_unlike_its_first_calls():
    """Another dtype, another shape, or an absent field where the first call had one, is not fed to the graph.

    Inductor's own size assertions are off in the graph: a state of fewer elements than the traced one
    (one that broadcasts against the input, as eager steps allow) would be read past its end.
    """
    standalone = _fused._graph_compiler()
    if standalone is None:
        pytest.skip(f"torch {torch.__version__} has no torch._inductor.standalone_compile")
    spec, config = ssm_core.S6, ssm_core.S6Config(N, D_STATE)
    eager = _fused._step_of(spec, config)
    step = _fused._graph_step(spec, config, eager, standalone)
    torch.manual_seed(3)
    params = spec.init(config, torch_backend.draws(torch.float64))
    decay = spec.prepare(params, xp_torch)
    x, state = torch.randn(2, N, dtype=torch.float64), spec.state(torch.randn(2, N, D_STATE, dtype=torch.float64))
    with torch.no_grad():
        step(x, state, params, decay)  # traced for float64
        as32 = lambda record: type(record)(*(None if a is None else a.float() for a in record))
        args32 = (x.float(), as32(state), as32(params), tuple(a.float() for a in decay))
        y, new_state = step(*args32)
        y_eager, state_eager = eager(*args32)
    assert y.dtype == torch.float32
    assert torch.equal(y, y_eager) and torch.equal(new_state.state, state_eager.state)
    for x_other, state_other in (
        (torch.randn(3, N, dtype=torch.float64), torch.randn(3, N, D_STATE, dtype=torch.float64)),  # another batch
        (x, torch.randn(1, N, D_STATE, dtype=torch.float64)),  # a state that broadcasts
    ):
        with torch.no_grad():
            y, new_state = step(x_other, spec.state(state_other), params, decay)
            y_eager, state_eager = eager(x_other, spec.state(state_other), params, decay)
        assert torch.equal(y, y_eager) and torch.equal(new_state.state, state_eager.state)


# ----------------------------------------------------------------------------- MLX and the series


def test_mlx_compiled_scan_equals_eager():
    reason = backends.available()["mlx"]
    if reason is not None:
        pytest.skip(reason)
    from backends import mlx as bmx

    rng = np.random.default_rng(6)
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-10)):
        for name, kwargs in CASES:
            layer = getattr(bmx, name)(N, d_state=D_STATE, dtype=dtype, seed=0, **kwargs)
            warmup = rng.standard_normal((2, 6, N)).astype(dtype)
            xs = bmx.asarray(rng.standard_normal((13, 6, N)).astype(dtype))
            results = {}
            for compiled in (False, True):
                layer.zero_states()
                for x in warmup:
                    layer(bmx.asarray(x))
                ys = np.asarray(layer.scan(xs, compiled=compiled))
                results[compiled] = (ys, {k: np.asarray(v) for k, v in layer.save_states().items()})
            assert _rel(results[True][0], results[False][0]) <= tol
            for key, value in results[False][1].items():
                assert _rel(results[True][1][key], value) <= tol, key


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_expm1_from_exp_and_a_series_is_accurate(dtype):
    import array_api_compat.numpy as xnp

    magnitudes = np.geomspace(1e-30, 40.0, 20001)
    z = np.concatenate([-magnitudes, magnitudes[magnitudes < 20], [0.0]]).astype(dtype)
    decay, gain = _zoh_terms_from_exp(z, np.ones_like(z), xnp)
    exact = np.expm1(z.astype(np.longdouble))
    scale = np.where(exact == 0, 1, np.abs(exact))
    assert np.max(np.abs(gain - exact) / scale) <= 8 * np.finfo(dtype).eps
    np.testing.assert_array_equal(decay, np.exp(z))


# ----------------------------------------------------------------------------- the other speed paths: torch.compile of a step, the prepared dynamics


@pytest.mark.parametrize("layer_type", [tt.ssm.S4, tt.ssm.S5, tt.ssm.S6, tt.ssm.Mamba], ids=lambda c: c.__name__)
def test_torch_compile_traces_every_layer_whole(layer_type):
    layer = layer_type(8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer(x)
        explanation = dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    layer.zero_states()
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad():
        compiled_ys = [compiled(x) for _ in range(3)]
        layer.zero_states()
        eager_ys = [layer(x) for _ in range(3)]
    for a, b in zip(compiled_ys, eager_ys):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["S4", "S5", "S6", "Mamba"])
def test_prepared_parameters_change_no_numbers(name):
    spec = ssm_core.LAYERS[name]
    config = spec.config(6)
    params = spec.params_from_mapping(random_weights(name, vars(config)))
    state = spec.zero_state(config, (2,), np, np.float64)
    xs = np.random.default_rng(0).standard_normal((5, 2, 6))
    prepared = spec.prepare(params, np)
    for run, inputs in ((spec.step, xs[0]), (spec.scan, xs)):
        (y, new_state), (y_kept, kept_state) = run(inputs, state, params), run(inputs, state, params, prepared=prepared)
        np.testing.assert_array_equal(y, y_kept)
        for a, b in zip(new_state, kept_state):
            np.testing.assert_array_equal(a, b)
