"""The torch layers: feature axis anywhere, gradients, compilation, dtypes, copies, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import ssm_core
import tracetorch as tt
from conftest import (
    D_STATE,
    LAYER_CASES,
    LAYER_IDS,
    N,
    copy_params,
    make_layer,
    rel_err,
    run_steps,
    state_names,
)

T = 4
BATCH_SHAPES = [(), (2,), (2, 3, 5)]


def _dim_cases():
    """(batch shape, dim) with the feature axis first, in the middle and last, as +/- indices."""
    cases = []
    for batch in BATCH_SHAPES:
        ndim = len(batch) + 1
        axes = sorted({0, ndim // 2, ndim - 1} | ({1, 2} if ndim == 4 else set()))
        for axis in axes:
            for dim in (axis, axis - ndim):
                cases.append(pytest.param(batch, dim, id=f"batch{len(batch)}-dim{dim}"))
    return cases


DIM_CASES = _dim_cases()


def _inputs(batch, dim, n=N, steps=T, dtype=torch.float64, seed=0):
    """``steps`` inputs of the batch shape with ``n`` features inserted at axis ``dim``."""
    gen = torch.Generator().manual_seed(seed)
    ndim = len(batch) + 1
    axis = dim % ndim
    shape = list(batch)
    shape.insert(axis, n)
    return torch.randn((steps, *shape), generator=gen, dtype=torch.float64).to(dtype), axis


def _expected_state_shape(cls_name, kwargs, name, x_shape, axis):
    shape = list(x_shape)
    if name == "global_state":
        shape[axis] = kwargs["d_state"]
        return tuple(shape)
    shape[axis] = kwargs["num_neurons"]
    trailing = kwargs.get("conv_kernel", 4) if name == "conv_buffer" else kwargs["d_state"]
    return tuple(shape) + (trailing,)


# --------------------------------------------------------------------------- feature axis anywhere


@pytest.mark.parametrize("batch,dim", DIM_CASES)
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_feature_axis_anywhere(case, batch, dim):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs, dim=dim)
    ref = make_layer(cls_name, kwargs, dim=-1, seed=99)
    copy_params(ref, layer)  # same parameters, features last
    xs, axis = _inputs(batch, dim)

    with torch.no_grad():
        for t in range(T):
            x = xs[t]
            y = layer(x)
            y_ref = ref(x.movedim(axis, -1))
            assert y.shape == x.shape
            assert y.dtype == x.dtype
            err = rel_err(y, y_ref.movedim(-1, axis))
            assert err <= 1e-12, f"step {t}: output rel err {err:.3e}"

            for name in state_names(cls_name, kwargs):
                state = getattr(layer, name)
                assert state is not None, name
                assert tuple(state.shape) == _expected_state_shape(cls_name, kwargs, name, x.shape, axis), name
                assert state.dtype == x.dtype
                ref_state = getattr(ref, name)
                # ref layout: [..., size] or [..., size, trailing] with the other axes in order.
                moved = ref_state.movedim(-1, axis) if name == "global_state" else ref_state.movedim(-2, axis)
                err = rel_err(state, moved)
                assert err <= 1e-12, f"step {t}: {name} rel err {err:.3e}"
    assert set(layer._state_names) == set(state_names(cls_name, kwargs))


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_outputs_depend_on_history(case):
    """A stateful layer: the same input gives different outputs at different times."""
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    x = torch.randn(2, N, dtype=torch.float64)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
        layer.zero_states()
        y3 = layer(x)
    assert not torch.allclose(y1, y2)
    assert torch.equal(y1, y3)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_batch_elements_are_independent(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    xs = torch.randn(T, 3, N, dtype=torch.float64)
    with torch.no_grad():
        full = run_steps(layer, xs)
        for b in range(3):
            layer.zero_states()
            single = run_steps(layer, xs[:, b])
            assert rel_err(full[:, b], single) <= 1e-12


def _core_params(layer):
    spec = ssm_core.LAYERS[type(layer).__name__]
    return spec, spec.params_from_mapping(layer.state_dict())


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_layer_matches_ssm_core_functional_step(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    spec, params = _core_params(layer)
    config = spec.config(**kwargs)
    state = spec.zero_state(config, (2,), torch, dtype=torch.float64)
    xs = torch.randn(T, 2, N, dtype=torch.float64)
    with torch.no_grad():
        for x in xs:
            y_core, state = spec.step(x, state, params)
            y = layer(x)
            assert rel_err(y, y_core) <= 1e-12
    for name in state_names(cls_name, kwargs):
        assert rel_err(getattr(layer, name), getattr(state, name)) <= 1e-12


# --------------------------------------------------------------------------- gradients


def _grad_setup(cls_name, kwargs):
    layer = make_layer(cls_name, kwargs)
    gen = torch.Generator().manual_seed(7)
    xs = torch.randn(3, 2, N, generator=gen, dtype=torch.float64)
    return layer, xs


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_gradcheck_inputs(case):
    _, cls_name, kwargs = case
    layer, xs = _grad_setup(cls_name, kwargs)
    for p in layer.parameters():
        p.requires_grad_(True)

    def f(seq):
        layer.zero_states()
        return torch.stack([layer(x) for x in seq])

    assert torch.autograd.gradcheck(f, (xs.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_gradcheck_parameters(case):
    _, cls_name, kwargs = case
    layer, xs = _grad_setup(cls_name, kwargs)
    names = [n for n, _ in layer.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters())
    assert names, "layer has no parameters"

    def f(*params):
        layer.zero_states()
        mapping = dict(zip(names, params))
        return torch.stack([functional_call(layer, mapping, (x,)) for x in xs]).sum()

    assert torch.autograd.gradcheck(f, values, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_every_parameter_gets_a_gradient(case):
    _, cls_name, kwargs = case
    layer, xs = _grad_setup(cls_name, kwargs)
    loss = torch.stack([layer(x) for x in xs]).pow(2).sum()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_gradcheck_feature_axis_first(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs, dim=0)
    xs = torch.randn(3, N, 2, dtype=torch.float64, requires_grad=True)

    def f(seq):
        layer.zero_states()
        return torch.stack([layer(x) for x in seq])

    assert torch.autograd.gradcheck(f, (xs,), eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- TTcompile


LTI_CASES = [c for c in LAYER_CASES if c[1] in ("S4", "S5")]
LTI_IDS = [c[0] for c in LTI_CASES]


@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("case", LTI_CASES, ids=LTI_IDS)
def test_ttcompile_same_outputs_and_state_dict(case, dim):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs, dim=dim)
    plain = make_layer(cls_name, kwargs, dim=dim, seed=5)
    copy_params(plain, layer)
    sd_before = {k: v.clone() for k, v in layer.state_dict().items()}

    layer.TTcompile()
    sd_after = layer.state_dict()
    assert list(sd_after) == list(sd_before)
    for k in sd_before:
        assert torch.equal(sd_after[k], sd_before[k]), k

    xs = torch.randn(T, N, 3, dtype=torch.float64) if dim == 0 else torch.randn(T, 3, N, dtype=torch.float64)
    with torch.no_grad():
        y_c = run_steps(layer, xs)
        y_p = run_steps(plain, xs)
    assert rel_err(y_c, y_p) <= 1e-12
    for name in state_names(cls_name, kwargs):
        assert rel_err(getattr(layer, name), getattr(plain, name)) <= 1e-12

    # A compiled layer's state_dict still loads into a fresh layer, strictly.
    fresh = make_layer(cls_name, kwargs, dim=dim, seed=6)
    fresh.load_state_dict(layer.state_dict(), strict=True)


@pytest.mark.parametrize("case", LTI_CASES, ids=LTI_IDS)
def test_ttdecompile_trains_again(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    xs = torch.randn(T, 2, N, dtype=torch.float64)
    with torch.no_grad():
        y0 = run_steps(layer, xs)
    layer.zero_states()
    layer.TTcompile()
    layer.TTcompile()  # idempotent
    with torch.no_grad():
        y1 = run_steps(layer, xs)
    assert rel_err(y1, y0) <= 1e-12

    layer.TTdecompile()
    layer.zero_states()
    assert list(layer.state_dict()) == list(make_layer(cls_name, kwargs).state_dict())
    assert not [n for n, _ in layer.named_buffers()], "compiled buffers left after TTdecompile"
    loss = run_steps(layer, xs).pow(2).sum()
    loss.backward()
    for name in ("A_log", "B", "log_dt", "C", "D"):
        grad = getattr(layer, name).grad
        assert grad is not None, name
        assert grad.abs().sum() > 0, name
    layer.zero_states()
    with torch.no_grad():
        assert rel_err(run_steps(layer, xs), y0) <= 1e-12


@pytest.mark.parametrize("case", LTI_CASES, ids=LTI_IDS)
def test_ttcompile_again_picks_up_new_parameters(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    x = torch.randn(2, N, dtype=torch.float64)
    layer.TTcompile()
    with torch.no_grad():
        layer.B.mul_(2.0)
        layer.log_dt.add_(0.3)
    layer.TTcompile()
    with torch.no_grad():
        y = layer(x)
    plain = make_layer(cls_name, kwargs, seed=3)
    copy_params(plain, layer)
    with torch.no_grad():
        assert rel_err(y, plain(x)) <= 1e-12


@pytest.mark.parametrize("case", LTI_CASES, ids=LTI_IDS)
def test_ttcompile_then_dtype_conversion(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    plain = make_layer(cls_name, kwargs, seed=4)
    copy_params(plain, layer)
    layer.TTcompile()
    layer.to(torch.float32)
    plain.to(torch.float32)
    xs = torch.randn(T, 2, N, dtype=torch.float32)
    with torch.no_grad():
        y_c = run_steps(layer, xs)
        y_p = run_steps(plain, xs)
    assert y_c.dtype == torch.float32
    assert rel_err(y_c, y_p) <= 1e-5


class _AllLayers(tt.Model):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            tt.ssm.S4(N, d_state=D_STATE),
            tt.ssm.S5(N, d_state=D_STATE),
            tt.ssm.S6(N, d_state=D_STATE),
            tt.ssm.Mamba(N, d_state=D_STATE),
        )
        self.extra = [tt.ssm.S4(N, d_state=D_STATE)]

    def forward(self, x):
        return self.extra[0](self.net(x))


def test_model_ttcompile_same_outputs():
    torch.manual_seed(0)
    model = _AllLayers().double()
    model.extra[0].double()
    other = _AllLayers().double()
    other.extra[0].double()
    other.load_state_dict(model.state_dict(), strict=True)
    other.extra[0].load_state_dict(model.extra[0].state_dict(), strict=True)
    keys = list(model.state_dict())

    model.TTcompile()
    assert list(model.state_dict()) == keys
    assert "_compiled_dynamics_A_bar" in model.extra[0]._buffers  # the plain-list layer was compiled too
    xs = torch.randn(T, 2, N, dtype=torch.float64)
    with torch.no_grad():
        y_c = run_steps(model, xs)
        y_p = run_steps(other, xs)
    assert rel_err(y_c, y_p) <= 1e-12

    model.TTdecompile()
    model.zero_states()
    assert "_compiled_dynamics_A_bar" not in model.extra[0]._buffers
    loss = run_steps(model, xs).sum()
    loss.backward()
    for layer in (model.net[0], model.net[1], model.extra[0]):
        for name in ("A_log", "B", "log_dt"):
            assert getattr(layer, name).grad is not None


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_states_follow_input_dtype(case, dtype):
    _, cls_name, kwargs = case
    torch.manual_seed(0)
    layer = getattr(tt.ssm, cls_name)(**kwargs)
    assert all(p.dtype == torch.float32 for p in layer.parameters())  # default dtype
    layer.to(dtype)
    x = torch.randn(2, N, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    for name in state_names(cls_name, kwargs):
        assert getattr(layer, name).dtype == dtype, name
    # and back: convert, reset, run again
    other = torch.float64 if dtype == torch.float32 else torch.float32
    layer.to(other)
    layer.zero_states()
    y2 = layer(x.to(other))
    assert y2.dtype == other
    for name in state_names(cls_name, kwargs):
        assert getattr(layer, name).dtype == other, name
    tol = 1e-5
    assert rel_err(y2, y) <= tol


# --------------------------------------------------------------------------- copies


# --------------------------------------------------------------------------- init


def _build(cls_name, kwargs, seed):
    torch.manual_seed(seed)
    return getattr(tt.ssm, cls_name)(**kwargs)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_same_seed_same_state_dict(case):
    _, cls_name, kwargs = case
    a = _build(cls_name, kwargs, 123).state_dict()
    b = _build(cls_name, kwargs, 123).state_dict()
    c = _build(cls_name, kwargs, 124).state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a), "a different seed gave the same parameters"
    for k, v in a.items():
        assert torch.isfinite(v).all(), k


def _a_log(n, d):
    return torch.log(torch.arange(1, d + 1, dtype=torch.float64)).expand(n, d)


LOG_DT_LO, LOG_DT_HI = math.log(1e-3), math.log(1e-1)


def _check_log_uniform(log_dt):
    log_dt = log_dt.detach().double()
    assert (log_dt >= LOG_DT_LO - 1e-6).all() and (log_dt <= LOG_DT_HI + 1e-6).all(), log_dt
    if log_dt.numel() >= 100:  # spread over the whole range (log-uniform)
        assert log_dt.min() < LOG_DT_LO + 0.5 and log_dt.max() > LOG_DT_HI - 0.5
        mid = (LOG_DT_LO + LOG_DT_HI) / 2
        assert abs(log_dt.mean().item() - mid) < 0.3


def test_init_s4():
    n, d = 256, 8
    layer = _build("S4", dict(num_neurons=n, d_state=d), 0)
    assert torch.allclose(layer.A_log.double(), _a_log(n, d), atol=1e-6)
    assert torch.equal(layer.B, torch.ones(n, d))
    assert torch.equal(layer.D, torch.ones(n))
    dt = torch.exp(layer.log_dt.double())
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    _check_log_uniform(layer.log_dt)
    assert abs(layer.C.std().item() - 1.0) < 0.1 and abs(layer.C.mean().item()) < 0.1


def test_init_s5():
    n, d = 128, 96
    layer = _build("S5", dict(num_neurons=n, d_state=d), 0)
    assert torch.allclose(layer.A_log.double(), _a_log(1, d)[0], atol=1e-6)
    assert layer.log_dt.shape == (1,)
    dt = torch.exp(layer.log_dt.double())
    assert 1e-3 * (1 - 1e-5) <= dt.item() <= 1e-1 * (1 + 1e-5)
    assert torch.equal(layer.D, torch.ones(n))
    assert abs(layer.B.std().item() * math.sqrt(n) - 1.0) < 0.1
    assert abs(layer.C.std().item() * math.sqrt(d) - 1.0) < 0.1
    dts = torch.stack([_build("S5", dict(num_neurons=2, d_state=2), s).log_dt for s in range(150)])
    _check_log_uniform(dts)


def _check_dt_proj(layer, n, rank):
    assert layer.dt_proj.weight.shape == (n, rank)
    assert layer.dt_proj.weight.abs().max() <= rank ** -0.5 + 1e-7
    assert layer.dt_proj.weight.abs().max() > 0.5 * rank ** -0.5
    dt = torch.nn.functional.softplus(layer.dt_proj.bias.double())
    assert (dt >= 1e-3 * (1 - 1e-4)).all() and (dt <= 1e-1 * (1 + 1e-4)).all(), dt
    _check_log_uniform(torch.log(dt))


def _check_fan_in(weight, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    assert weight.abs().max() <= bound + 1e-7
    assert weight.abs().max() > 0.8 * bound
    assert abs(weight.mean().item()) < 0.2 * bound


@pytest.mark.parametrize("rank", [-1, 3])
def test_init_s6(rank):
    n, d = 160, 8
    layer = _build("S6", dict(num_neurons=n, d_state=d, dt_rank=rank), 0)
    r = max(1, n // 16) if rank == -1 else rank
    assert layer.dt_rank == r
    assert torch.allclose(layer.A_log.double(), _a_log(n, d), atol=1e-6)
    assert torch.equal(layer.D, torch.ones(n))
    assert layer.x_proj.weight.shape == (r + 2 * d, n) and layer.x_proj.bias is None
    _check_fan_in(layer.x_proj.weight, n)
    _check_dt_proj(layer, n, r)


@pytest.mark.parametrize("kernel", [4, 1])
def test_init_mamba(kernel):
    n, d = 160, 8
    layer = _build("Mamba", dict(num_neurons=n, d_state=d, conv_kernel=kernel), 0)
    r = max(1, n // 16)
    assert torch.allclose(layer.A_log.double(), _a_log(n, d), atol=1e-6)
    assert torch.equal(layer.D, torch.ones(n))
    _check_fan_in(layer.in_proj.weight, n)
    _check_fan_in(layer.out_proj.weight, n)
    _check_fan_in(layer.ssm_proj.weight, n)
    assert layer.in_proj.weight.shape == (2 * n, n) and layer.in_proj.bias is None
    assert layer.out_proj.bias is None and layer.ssm_proj.bias is None
    _check_dt_proj(layer, n, r)
    if kernel > 1:
        assert layer.conv_weights.shape == (n, kernel) and layer.conv_bias.shape == (n,)
        _check_fan_in(layer.conv_weights, kernel)
        assert layer.conv_bias.abs().max() <= kernel ** -0.5 + 1e-7
        assert "conv_buffer" in layer._state_names
    else:
        assert "conv_weights" not in dict(layer.named_parameters())
        assert "conv_buffer" not in layer._state_names


def test_init_uses_torch_global_generator_only():
    """Constructing a layer draws from torch's global RNG: the next draw depends on it."""
    torch.manual_seed(0)
    tt.ssm.S6(8, d_state=4)
    after_a = torch.rand(3)
    torch.manual_seed(0)
    tt.ssm.S6(8, d_state=4)
    after_b = torch.rand(3)
    torch.manual_seed(0)
    plain = torch.rand(3)
    assert torch.equal(after_a, after_b)
    assert not torch.equal(after_a, plain)


@pytest.mark.parametrize("case", LTI_CASES, ids=LTI_IDS)
def test_gradcheck_compiled_layer_inputs(case):
    _, cls_name, kwargs = case
    layer, xs = _grad_setup(cls_name, kwargs)
    layer.TTcompile()

    def f(seq):
        layer.zero_states()
        return torch.stack([layer(x) for x in seq])

    assert torch.autograd.gradcheck(f, (xs.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_dtype_conversion_while_states_are_held(case):
    """Converting a layer with held float64 states to float32 and stepping on float32 input.

    Acceptable: a clear ValueError/TypeError naming the layer (states untouched), or a
    float32 step (output and states in the input's dtype). Not acceptable: silently
    returning float64 for a float32 input, or an anonymous torch RuntimeError.
    """
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    layer(torch.randn(2, N, dtype=torch.float64))
    layer.to(torch.float32)
    snap = {n: getattr(layer, n).clone() for n in layer._state_names}
    x = torch.randn(2, N, dtype=torch.float32)
    try:
        y = layer(x)
    except (ValueError, TypeError) as error:
        assert cls_name in str(error)
        for name, before in snap.items():
            assert torch.equal(getattr(layer, name), before), name
    else:
        assert y.dtype == torch.float32, f"{cls_name}: float32 input gave a {y.dtype} output"
        for name in layer._state_names:
            assert getattr(layer, name).dtype == torch.float32, name


# --------------------------------------------------------------------------- numerical edge cases


@pytest.mark.parametrize("cls_name", ["S4", "S5"])
def test_zoh_when_A_underflows_to_zero(cls_name):
    """A = -exp(A_log) == -0: the hold degenerates to an integrator, gain = dt (no 0/0)."""
    layer = make_layer(cls_name, dict(num_neurons=N, d_state=D_STATE))
    with torch.no_grad():
        layer.A_log.fill_(-800.0)
    xs = torch.randn(3, 2, N, dtype=torch.float64)
    with torch.no_grad():
        ys = run_steps(layer, xs)
    assert torch.isfinite(ys).all()
    dt = torch.exp(layer.log_dt.detach())
    if cls_name == "S4":
        expected_state = dt[:, None] * layer.B.detach() * xs.sum(0)[..., None]
        assert rel_err(layer.state, expected_state) <= 1e-13
    else:
        expected_state = dt * (xs.sum(0) @ layer.B.detach())
        assert rel_err(layer.global_state, expected_state) <= 1e-13


@pytest.mark.parametrize("log_dt", [-30.0, 40.0], ids=["tiny-dt", "huge-dt"])
def test_zoh_accuracy_at_extreme_dt(log_dt):
    layer = make_layer("S4", dict(num_neurons=N, d_state=D_STATE))
    with torch.no_grad():
        layer.log_dt.fill_(log_dt)
    x = torch.randn(2, N, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
    A = -torch.exp(layer.A_log.detach())
    dt = math.exp(log_dt)
    z = dt * A
    if log_dt < 0:
        gain = dt * (1 + z / 2 + z * z / 6)  # series of expm1(z)/z, exact to rounding here
    else:
        gain = -1.0 / A  # exp(dt*A) == 0
    expected = gain * layer.B.detach() * x[..., None]
    assert torch.isfinite(layer.state).all()
    assert rel_err(layer.state, expected) <= 1e-14


@pytest.mark.parametrize("cls_name", ["S6", "Mamba"])
def test_selective_layers_finite_for_large_inputs(cls_name):
    layer = make_layer(cls_name, dict(num_neurons=N, d_state=D_STATE))
    xs = 1e3 * torch.randn(5, 2, N, dtype=torch.float64)
    with torch.no_grad():
        ys = run_steps(layer, xs)
    assert torch.isfinite(ys).all()
    for name in layer._state_names:
        assert torch.isfinite(getattr(layer, name)).all()
