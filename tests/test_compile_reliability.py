"""The compiled S6/Mamba paths where they meet other features: never less correct than eager.

Checkpointing, double backward, ``torch.func``, extreme parameters, a
compiler or cache that gives wrong numbers, where the fallback warning
points, and the accuracy the compiled path owes where ``dt * A`` is small.

Compiling is slow: the compiled scans here share ``test_fused.py``'s block
key (blocks of ``BLOCK`` steps, 6 batch elements, ``N`` features,
``D_STATE``), so one process compiles each dtype once. Every test that uses
the real compiler also asserts that the compiled block ran (no
:class:`~ssm_core.fused.CompileFallbackWarning`, its key among the
compiler's checked keys): a fallback to eager would pass any comparison.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import ssm_core
import tracetorch as tt
from ssm_core import fused
from tracetorch.ssm import _fused
from tracetorch.ssm._backend import backend as torch_backend

N, D_STATE, BLOCK, BATCH = 8, 4, 4, 6
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}
# Compiled against eager in float64: the two differ by reassociation, some
# ulp per operation over a few dozen operations per step and up to 20
# steps; 1e-12 is ~5000 ulp, far below any bug's size.
TOL64 = 1e-12

pytestmark = pytest.mark.filterwarnings("error::ssm_core.fused.CompileFallbackWarning")


@pytest.fixture(autouse=True)
def _short_blocks(monkeypatch):
    monkeypatch.setattr(torch_backend, "fused_block", BLOCK)
    monkeypatch.delenv(fused.ENV_VAR, raising=False)


def _key(dtype):
    return (BLOCK, BATCH, N, D_STATE, dtype, torch.device("cpu"), None, "zoh")  # None: autocast off; the rule


def _assert_ran_compiled(dtype, compiler=None):
    compiler = compiler or _fused.block_compiler
    assert _key(dtype) in compiler.compiled_keys(), (compiler.failed_keys, compiler.compiled_keys())


def _layer(name, dtype, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = getattr(tt.ssm, name)(N, d_state=D_STATE, **kwargs).to(dtype)
    with torch.no_grad():  # dt large enough that the state carries across blocks
        layer.dt_proj.bias.add_(1.0)
    return layer


def _state_of(layer):
    return layer.state if isinstance(layer, tt.ssm.S6) else layer.ssm_state


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _fresh_compiler(monkeypatch, compile_block=None, **kwargs):
    """A block compiler of its own (work counts, checks and failures start afresh), the real one by default."""
    compiler = fused.BlockCompiler(
        "the S6/Mamba scan block", "torch.compile", compile_block or _fused._compile_block,
        is_failure=_fused._is_compiler_failure, check=_fused._check_first_call, **kwargs,
    )
    monkeypatch.setattr(_fused, "block_compiler", compiler)
    return compiler


# ----------------------------------------------------------------------------- checkpointing


def _checkpointed_grads(layer, xs, chunk, checkpointed, compiled):
    """Gradients of a loss over chunked scans (checkpointed or not): the input's and the parameters'."""
    layer.zero_states()
    layer.zero_grad()
    x_leaf = xs.clone().requires_grad_()
    ys = [
        tt.checkpoint(layer.scan, part) if checkpointed else layer.scan(part, compiled=compiled)
        for part in x_leaf.split(chunk)
    ]
    loss = torch.cat(ys).square().sum() + _state_of(layer).square().sum()
    loss.backward()
    return {"xs": x_leaf.grad, **{k: p.grad.clone() for k, p in layer.named_parameters()}}


@pytest.mark.parametrize("name", ["S6", "Mamba"])
def test_checkpoint_over_compiled_scans_gives_eager_gradients(monkeypatch, name):
    """tt.checkpoint's recomputation ends early with an exception of torch's own: no fallback may catch it."""
    dtype = torch.float64
    layer = _layer(name, dtype)
    xs = torch.randn(20, BATCH, N, dtype=dtype, generator=torch.Generator().manual_seed(1))
    eager = _checkpointed_grads(layer, xs, 9, checkpointed=False, compiled=False)
    monkeypatch.setenv(fused.ENV_VAR, "1")  # tt.checkpoint(layer.scan, chunk) passes no compiled=
    got = _checkpointed_grads(layer, xs, 9, checkpointed=True, compiled=None)  # chunks: 2 compiled blocks + 1 step
    _assert_ran_compiled(dtype)
    for key, value in eager.items():
        assert _rel(got[key], value) <= TOL64, key


def test_checkpoint_replays_the_choice_of_its_forward_pass(monkeypatch):
    """The automatic policy switching between a chunk's forward pass and its recomputation changes nothing."""
    dtype = torch.float64
    compiler = _fresh_compiler(monkeypatch)
    layer = _layer("S6", dtype)
    xs = torch.randn(24, BATCH, N, dtype=dtype, generator=torch.Generator().manual_seed(2))
    eager = _checkpointed_grads(layer, xs, 8, checkpointed=False, compiled=False)
    chunk_work = 8 * BATCH * N * D_STATE * fused.TRAINING_WEIGHT
    monkeypatch.setattr(fused, "AUTO_WORK", 1.5 * chunk_work)  # the second chunk's forward pass compiles
    got = _checkpointed_grads(layer, xs, 8, checkpointed=True, compiled=None)
    _assert_ran_compiled(dtype, compiler)
    for key, value in eager.items():
        assert _rel(got[key], value) <= TOL64, key


# ----------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("name", ["S6", "Mamba"])
def test_double_backward_through_compiled_scans_equals_eager(name):
    """Gradient penalties and Hessian-vector products: a graph of the gradients is built (create_graph=True)."""
    dtype = torch.float64
    layer = _layer(name, dtype)
    params = list(layer.parameters())
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(10, BATCH, N, dtype=dtype, generator=gen)
    directions = [torch.randn(p.shape, dtype=dtype, generator=gen) for p in params]
    results = {}
    for compiled in (False, True):
        layer.zero_states()
        x_leaf = xs.clone().requires_grad_()
        ys = layer.scan(x_leaf, compiled=compiled)
        loss = ys.square().mean() + _state_of(layer).square().mean()
        grad_x, *grads = torch.autograd.grad(loss, [x_leaf, *params], create_graph=True)
        penalty = grad_x.square().sum()  # a gradient penalty, differentiated again
        penalty_grads = torch.autograd.grad(penalty, params, retain_graph=True, allow_unused=True)
        hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, directions)), params, allow_unused=True)
        results[compiled] = (grad_x, *grads, *penalty_grads, *hvp)
    _assert_ran_compiled(dtype)
    for index, (got, expected) in enumerate(zip(results[True], results[False])):
        if expected is None:
            assert got is None or not got.abs().max(), index
        else:
            assert _rel(got, expected) <= TOL64, index


def test_second_backward_and_saved_tensor_hooks_give_eager_gradients():
    """retain_graph=True backwards twice (the block's graph is made again); save_on_cpu puts hooks on every save."""
    dtype = torch.float64
    layer = _layer("S6", dtype)
    xs = torch.randn(10, BATCH, N, dtype=dtype, generator=torch.Generator().manual_seed(13))

    def grads_of(compiled, twice=False, hooks=False):
        layer.zero_states()
        layer.zero_grad()
        x_leaf = xs.clone().requires_grad_()
        with torch.autograd.graph.save_on_cpu() if hooks else torch.enable_grad():
            loss = layer.scan(x_leaf, compiled=compiled).square().sum()
            loss.backward(retain_graph=twice)
            if twice:
                loss.backward()
        return [x_leaf.grad, *(p.grad.clone() for p in layer.parameters())]

    eager = grads_of(False)
    for twice, hooks in ((True, False), (False, True)):
        got = grads_of(True, twice, hooks)
        for a, b in zip(got, eager):
            assert _rel(a, (2 if twice else 1) * b) <= TOL64, (twice, hooks)
    _assert_ran_compiled(dtype)


# ----------------------------------------------------------------------------- torch.func


def test_torch_func_transforms_run_eagerly_and_leave_compiling_on(monkeypatch):
    dtype = torch.float64
    monkeypatch.setenv(fused.ENV_VAR, "1")  # the stateless form passes no compiled=
    layer = _layer("S6", dtype)
    stateless = layer.stateless(time_dim=0)
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(9, BATCH, N, dtype=dtype, generator=gen)
    tangent = torch.randn(xs.shape, dtype=dtype, generator=gen)
    states = layer.initial_states(xs, time_dim=0)

    def ys_of(x):
        return stateless(x, *states)[0]

    with torch.no_grad():
        ys_of(xs)  # compiles the key
    _assert_ran_compiled(dtype)
    _, jvp = torch.func.jvp(ys_of, (xs,), (tangent,))
    grad = torch.func.grad(lambda x: ys_of(x).square().sum())(xs)
    # The references, with autograd on the compiled path.
    x_leaf = xs.clone().requires_grad_()
    ys = ys_of(x_leaf)
    ys.square().sum().backward()
    jvp_reference = torch.autograd.functional.jvp(ys_of, xs, tangent)[1]
    assert _rel(jvp, jvp_reference) <= TOL64
    assert _rel(grad, x_leaf.grad) <= TOL64
    assert _fused.block_compiler.failed_keys == {}
    _assert_ran_compiled(dtype)  # still compiled, for later scans too


# ----------------------------------------------------------------------------- extreme parameters


@pytest.mark.parametrize("name", ["S6", "Mamba"])
def test_huge_dt_gives_finite_gradients_like_eager(name):
    """dt * |A| ~ 1e8: the series' powers overflow in the lane `where` drops; 0 * inf must not reach a gradient."""
    dtype = torch.float32
    layer = _layer(name, dtype)
    with torch.no_grad():
        layer.dt_proj.bias.fill_(1e8)
    xs = torch.randn(13, BATCH, N, dtype=dtype, generator=torch.Generator().manual_seed(5))
    grads = {}
    for compiled in (False, True):
        layer.zero_states()
        layer.zero_grad()
        x_leaf = xs.clone().requires_grad_()
        ys = layer.scan(x_leaf, compiled=compiled)
        (ys.square().mean() + _state_of(layer).square().mean()).backward()
        grads[compiled] = {"xs": x_leaf.grad, **{k: p.grad.clone() for k, p in layer.named_parameters()}}
    _assert_ran_compiled(dtype)
    for key, expected in grads[False].items():
        assert torch.isfinite(expected).all(), key
        assert torch.isfinite(grads[True][key]).all(), key
        # float32, 13 steps of a few dozen reassociated operations each.
        assert _rel(grads[True][key], expected) <= 1e-4, key


def test_infinite_decay_rates_leave_compiled_states_finite():
    """A_log = 100 in float32 makes A = -inf: steps of dt = 0 would give 0 * -inf, a NaN state for good."""
    dtype = torch.float32
    layer = _layer("S6", dtype)
    with torch.no_grad():
        layer.A_log[: N // 2].fill_(100.0)  # half the features, so the state is not all zeros
    gen = torch.Generator().manual_seed(6)
    first, second = torch.randn(13, BATCH, N, generator=gen), torch.randn(5, BATCH, N, generator=gen)
    results = {}
    with torch.no_grad():
        for compiled in (False, True):
            layer.zero_states()
            ys = [layer.scan(first, compiled=compiled)]
            states = [layer.state.clone()]
            ys.append(layer.scan(second, compiled=compiled))  # a later call from the held state
            states.append(layer.state.clone())
            results[compiled] = ys + states
    _assert_ran_compiled(dtype)
    for got, expected in zip(results[True], results[False]):
        assert torch.isfinite(expected).all()
        assert torch.isfinite(got).all()
        assert _rel(got, expected) <= 64 * EPS[dtype]  # 18 float32 steps, reassociated


# ----------------------------------------------------------------------------- a wrong compiled block


def _wrong_block(kind):
    """A 'compiled' block that gives the eager results spoiled: NaN in a few places, or 1% off."""

    def compile_block(key):
        def block(inputs):
            ys, h = _fused._flat_block(*inputs)
            if kind == "nan":
                ys = ys.clone()
                ys[0, 0, :3] = math.nan
            else:
                h = h * 1.01
            return ys, h

        return block

    return compile_block


@pytest.mark.filterwarnings("default::ssm_core.fused.CompileFallbackWarning")
@pytest.mark.parametrize("kind", ["nan", "one-percent"])
def test_a_wrong_compiled_block_is_caught_at_its_first_call(monkeypatch, kind):
    """A compiler or its disk cache can be wrong without raising: the first call is checked against eager."""
    dtype = torch.float64
    compiler = _fresh_compiler(monkeypatch, _wrong_block(kind))
    layer = _layer("Mamba", dtype)
    xs = torch.randn(13, BATCH, N, dtype=dtype, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        layer.zero_states()
        eager = layer.scan(xs, compiled=False), layer.ssm_state
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = []
            for _ in range(2):
                layer.zero_states()
                outs.append((layer.scan(xs, compiled=True), layer.ssm_state))
    fallbacks = [w for w in caught if issubclass(w.category, fused.CompileFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert "differ from the eager block's" in message and ("NaN" in message if kind == "nan" else "state" in message)
    assert fallbacks[0].filename == __file__  # the user's scan() call, not the library's line
    for ys, state in outs:
        assert torch.equal(ys, eager[0]) and torch.equal(state, eager[1])
    assert list(compiler.failed_keys) == [_key(dtype)]


@pytest.mark.filterwarnings("default::ssm_core.fused.CompileFallbackWarning")
def test_a_wrong_compiled_backward_is_caught_at_its_first_backward(monkeypatch):
    dtype = torch.float64
    compiler = _fresh_compiler(monkeypatch)
    layer = _layer("S6", dtype)
    xs = torch.randn(13, BATCH, N, dtype=dtype, generator=torch.Generator().manual_seed(8))

    def grads_of(compiled):
        layer.zero_states()
        layer.zero_grad()
        x_leaf = xs.clone().requires_grad_()
        layer.scan(x_leaf, compiled=compiled).square().sum().backward()
        return [x_leaf.grad, *(p.grad.clone() for p in layer.parameters())]

    eager = grads_of(False)
    right = _fused._CompiledPair._compiled_gradients
    monkeypatch.setattr(
        _fused._CompiledPair, "_compiled_gradients",
        lambda self, *args: [None if g is None else 1.01 * g for g in right(self, *args)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [grads_of(True), grads_of(True)]
    fallbacks = [w for w in caught if issubclass(w.category, fused.CompileFallbackWarning)]
    assert len(fallbacks) == 1 and "gradients differ" in str(fallbacks[0].message), [str(w.message) for w in caught]
    assert fallbacks[0].filename == __file__  # the user's backward() call
    for grads in got:
        for a, b in zip(grads, eager):
            assert _rel(a, b) <= TOL64
    assert list(compiler.failed_keys) == [_key(dtype)]


@pytest.mark.filterwarnings("default::ssm_core.fused.CompileFallbackWarning")
def test_a_failure_turns_off_its_own_key_only(monkeypatch):
    def compile_block(key):
        if key[1] == BATCH:  # the first key's compile is wrong, the other's right
            return _wrong_block("nan")(key)
        return lambda inputs: _fused._flat_block(*inputs)

    compiler = _fresh_compiler(monkeypatch, compile_block)
    layer = _layer("S6", torch.float64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (BATCH, BATCH + 1):
            layer.zero_states()
            layer.scan(torch.randn(8, batch, N, dtype=torch.float64), compiled=True)
    assert len([w for w in caught if issubclass(w.category, fused.CompileFallbackWarning)]) == 1
    assert list(compiler.failed_keys) == [_key(torch.float64)]
    assert compiler.compiled_keys() == [(BLOCK, BATCH + 1, N, D_STATE, torch.float64, torch.device("cpu"), None, "zoh")]


# ----------------------------------------------------------------------------- accuracy where dt * A is small


def _small_dt_layer(name, dtype, dt):
    layer = _layer(name, dtype)
    with torch.no_grad():
        layer.dt_proj.bias.fill_(math.log(math.expm1(dt)))  # softplus(bias) = dt, so dt * |A| is about 1e-4..1e-3
        layer.dt_proj.weight.mul_(1e-3)
        layer.D.zero_()  # the outputs are the recurrence's alone
    return layer


@pytest.mark.parametrize("name", ["S6", "Mamba"])
def test_compiled_float32_is_accurate_where_dt_times_A_is_small(name):
    """expm1(dt*A) as exp(dt*A) - 1 loses ~eps/|dt*A| of the gain (1e-3 here): the float64 reference sees it.

    The state barely decays at this dt, so each of the T steps adds its few
    float32 roundings to it: its error stays within about T * eps of its
    largest value (measured: about 3 eps); exp(z) - 1 gives about 100 eps.
    """
    dtype, T = torch.float32, 16
    layer = _small_dt_layer(name, dtype, 2e-4)
    reference = _small_dt_layer(name, torch.float64, 2e-4)
    reference.load_state_dict(layer.state_dict())
    xs = torch.randn(T, BATCH, N, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        layer.zero_states()
        ys = layer.scan(xs, compiled=True)
        reference_ys = torch.stack([reference(x.double()) for x in xs])  # float64 stepping
    _assert_ran_compiled(dtype)
    assert _rel(_state_of(layer), _state_of(reference)) <= T * EPS[dtype]
    if name == "S6":  # Mamba's outputs add its input: they cannot see the recurrence's rounding
        assert _rel(ys, reference_ys) <= T * EPS[dtype]


@pytest.mark.parametrize("name", ["S6", "Mamba"])
def test_ttcompiled_float32_steps_are_accurate_where_dt_times_A_is_small(name):
    """The TTcompile'd step runs the compiled discretization too (see the scan's test for the bound)."""
    dtype, T = torch.float32, 16
    layer = _small_dt_layer(name, dtype, 2e-4)
    reference = _small_dt_layer(name, torch.float64, 2e-4)
    reference.load_state_dict(layer.state_dict())
    xs = torch.randn(T, BATCH, N, generator=torch.Generator().manual_seed(10))
    layer.TTcompile()
    with torch.no_grad():
        ys = torch.stack([layer(x) for x in xs])
        reference_ys = torch.stack([reference(x.double()) for x in xs])
    key = (name, layer.config, (BATCH, N), dtype, torch.device("cpu"), None)  # None: autocast off
    assert key in _fused.step_compiler.compiled_keys(), _fused.step_compiler.failed_keys
    assert _rel(_state_of(layer), _state_of(reference)) <= T * EPS[dtype]
    if name == "S6":
        assert _rel(ys, reference_ys) <= T * EPS[dtype]


# ----------------------------------------------------------------------------- TTcompile of a half-precision S4/S5


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["S4", "S5"])
def test_ttcompile_of_a_half_precision_layer_discretizes_in_float32(name, half):
    """Its states are float32 and its dynamics must be too: in half precision A_bar is off by ~1e-3."""
    torch.manual_seed(11)
    layer = getattr(tt.ssm, name)(N, d_state=D_STATE).to(half)
    plain = getattr(tt.ssm, name)(N, d_state=D_STATE).to(half)
    plain.load_state_dict(layer.state_dict())
    layer.TTcompile()
    xs = torch.randn(12, BATCH, N, generator=torch.Generator().manual_seed(12)).to(half)
    with torch.no_grad():
        for x in xs:
            y, y_plain = layer(x), plain(x)
    state_name = "state" if name == "S4" else "global_state"
    state, plain_state = getattr(layer, state_name), getattr(plain, state_name)
    assert state.dtype == plain_state.dtype == torch.float32
    # The same float32 arithmetic on the same half-precision weights: equal to a few float32 ulp per step.
    assert _rel(state, plain_state) <= 12 * 4 * EPS[torch.float32]
    assert torch.equal(y, y_plain) or _rel(y, y_plain) <= torch.finfo(half).eps


# ----------------------------------------------------------------------------- where the fallback warning points


class _Net(tt.Model):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(N, N), tt.ssm.S6(N, d_state=D_STATE))

    def forward(self, x):
        return self.net(x)


@pytest.mark.filterwarnings("default::ssm_core.fused.CompileFallbackWarning")
def test_the_fallback_warning_names_the_callers_line(monkeypatch):
    """Through nn.Module's call, tt.sequence_mode and tt.checkpoint alike: the user's code, not the library's.

    The nearest frame of the user's is ``_Net.forward``'s call of the layer.
    """
    from torch._inductor.exc import InvalidCxxCompiler

    def compile_block(key):
        def block(*arrays):
            raise InvalidCxxCompiler()

        return block

    model = _Net().double()
    xs = torch.randn(8, BATCH, N, dtype=torch.float64)
    with open(__file__) as source:
        lines = source.read().splitlines()
    for call in ("scan", "sequence_mode", "checkpoint"):
        _fresh_compiler(monkeypatch, compile_block)
        monkeypatch.setenv(fused.ENV_VAR, "1")
        model.zero_states()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if call == "scan":
                model.net[1].scan(xs)
            elif call == "sequence_mode":
                with tt.sequence_mode(model):
                    model(xs)
            else:
                tt.checkpoint(model.scan, xs.requires_grad_())
        fallbacks = [w for w in caught if issubclass(w.category, fused.CompileFallbackWarning)]
        assert len(fallbacks) == 1, call
        assert fallbacks[0].filename == __file__, call
        expected = "model.net[1].scan(xs)" if call == "scan" else "return self.net(x)"
        assert lines[fallbacks[0].lineno - 1].strip() == expected, call
