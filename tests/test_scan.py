"""Sequence mode: ``scan`` gives exactly what stepping gives, on every backend and at model level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import backends
import ssm_core
import tracetorch as tt
from numpy_oracle import rel_err

TOL = {"float32": 1e-5, "float64": 1e-10}
LAYERS = [
    ("S4", {"d_state": 5}),
    ("S5", {"d_state": 6}),
    ("S6", {"d_state": 4}),
    ("Mamba", {"d_state": 4}),
    ("Mamba", {"d_state": 4, "conv_kernel": 1}),
]
LAYER_IDS = ["S4", "S5", "S6", "Mamba", "Mamba-k1"]
N = 8
# (dim of one step's input, time_dim of the sequence, step input shape)
AXES = [(-1, 0, (3, N)), (0, 0, (N, 3)), (1, 2, (2, N, 3)), (-1, -1, (2, N)), (0, 1, (N, 2, 3))]
AXIS_IDS = ["last-time0", "first-time0", "middle-time2", "last-time-1", "first-time1"]


def _sequence(rng, step_shape, time_dim, T, dtype):
    xs = rng.standard_normal((T,) + step_shape).astype(dtype)
    return xs, np.moveaxis(xs, 0, time_dim)


def _random_weights(name, kwargs, rng):
    config = ssm_core.LAYERS[name].config(N, **kwargs)
    weights = {key: 0.5 * rng.standard_normal(shape) for key, shape in config.param_shapes().items()}
    if name in ("S4", "S5"):
        weights["log_dt"] = rng.uniform(np.log(1e-3), np.log(0.5), config.param_shapes()["log_dt"])
    else:
        weights["dt_proj.bias"] = weights["dt_proj.bias"] - 1.0
    return weights


# ----------------------------------------------------------------------------- NumPy / MLX / strict layers


def _backend(name):
    reason = backends.available()[name]
    if reason is not None:
        pytest.skip(reason)
    return backends.load(name)


@pytest.mark.parametrize("backend_name", ["numpy", "mlx", "array_api_strict", "cupy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("dim", "time_dim", "step_shape"), AXES, ids=AXIS_IDS)
@pytest.mark.parametrize(("name", "kwargs"), LAYERS, ids=LAYER_IDS)
def test_backend_scan_equals_stepping(backend_name, dtype, dim, time_dim, step_shape, name, kwargs):
    lib = _backend(backend_name)
    rng = np.random.default_rng(0)
    weights = _random_weights(name, kwargs, rng)
    layer = getattr(lib, name)(N, dim=dim, dtype=dtype, **kwargs)
    layer.load_state_dict(weights)
    to_np = lib.backend.to_numpy
    warmup, steps_xs = _sequence(rng, step_shape, 0, 3, dtype)[0], 40
    xs, xs_time = _sequence(rng, step_shape, time_dim, steps_xs, dtype)
    after = rng.standard_normal(step_shape).astype(dtype)

    for x in warmup:  # scan starts from held, non-zero states
        layer(lib.asarray(x))
    held = layer.save_states()
    stepped = np.stack([to_np(layer(lib.asarray(x))) for x in xs])
    stepped_states = {k: to_np(v) for k, v in layer.save_states().items()}
    stepped_next = to_np(layer(lib.asarray(after)))

    layer.load_states(held)
    scanned = np.moveaxis(to_np(layer.scan(lib.asarray(xs_time), time_dim=time_dim)), time_dim, 0)
    assert scanned.shape == stepped.shape
    assert rel_err(scanned, stepped) <= TOL[dtype]
    for key, value in layer.save_states().items():
        assert rel_err(to_np(value), stepped_states[key]) <= TOL[dtype], key
    continued = to_np(layer(lib.asarray(after)))  # the layer continues from the state after the sequence
    assert rel_err(continued, stepped_next) <= TOL[dtype]


# ----------------------------------------------------------------------------- torch layers


def _torch_layer(name, kwargs, dim, dtype, rng):
    layer = getattr(tt.ssm, name)(N, dim=dim, **kwargs).to(getattr(torch, dtype))
    weights = _random_weights(name, kwargs, rng)
    layer.load_state_dict({k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in weights.items()})
    return layer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("dim", "time_dim", "step_shape"), AXES, ids=AXIS_IDS)
@pytest.mark.parametrize(("name", "kwargs"), LAYERS, ids=LAYER_IDS)
def test_torch_scan_equals_stepping_outputs_states_and_gradients(dtype, dim, time_dim, step_shape, name, kwargs):
    rng = np.random.default_rng(1)
    layer = _torch_layer(name, kwargs, dim, dtype, rng)
    tdtype = getattr(torch, dtype)
    warmup = torch.from_numpy(_sequence(rng, step_shape, 0, 2, dtype)[0])
    xs = torch.from_numpy(_sequence(rng, step_shape, 0, 37, dtype)[0]).requires_grad_()

    def run(scan: bool):
        layer.zero_states()
        with torch.no_grad():
            for x in warmup:
                layer(x)
        if scan:
            ys = layer.scan(xs.movedim(0, time_dim), time_dim=time_dim).movedim(time_dim, 0)
        else:
            ys = torch.stack([layer(x) for x in xs])
        loss = (ys * torch.linspace(-1, 1, ys.numel(), dtype=tdtype).reshape(ys.shape)).sum()
        loss = loss + sum((getattr(layer, n) ** 2).sum() for n in layer._state_names)
        grads = torch.autograd.grad(loss, [xs, *layer.parameters()])
        states = {n: getattr(layer, n).detach() for n in layer._state_names}
        return ys.detach(), states, grads

    ys_step, states_step, grads_step = run(scan=False)
    ys_scan, states_scan, grads_scan = run(scan=True)
    tol = TOL[dtype]
    assert rel_err(ys_scan.numpy(), ys_step.numpy()) <= tol
    for key in states_step:
        assert rel_err(states_scan[key].numpy(), states_step[key].numpy()) <= tol, key
    for g_scan, g_step in zip(grads_scan, grads_step):
        assert rel_err(g_scan.numpy(), g_step.numpy()) <= (1e-9 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize(("name", "kwargs"), LAYERS, ids=LAYER_IDS)
def test_torch_scan_then_step_continues(name, kwargs):
    rng = np.random.default_rng(2)
    layer = _torch_layer(name, kwargs, -1, "float64", rng)
    xs = torch.from_numpy(rng.standard_normal((21, 2, N)))
    layer.zero_states()
    with torch.no_grad():
        expected = torch.stack([layer(x) for x in xs])
        layer.zero_states()
        first = layer.scan(xs[:13])
        rest = torch.stack([layer(x) for x in xs[13:]])
    assert rel_err(torch.cat([first, rest]).numpy(), expected.numpy()) <= 1e-10


def test_scan_of_an_empty_sequence_changes_nothing():
    layer = tt.ssm.Mamba(N).double()
    x = torch.randn(2, N, dtype=torch.float64)
    layer(x)
    held = {n: getattr(layer, n).clone() for n in layer._state_names}
    ys = layer.scan(torch.zeros(0, 2, N, dtype=torch.float64))
    assert ys.shape == (0, 2, N)
    for n, value in held.items():
        assert torch.equal(getattr(layer, n), value)


# ----------------------------------------------------------------------------- model level


class _Net(tt.Model):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, N), tt.ssm.Mamba(N, d_state=4), nn.GELU(), tt.ssm.S4(N, d_state=3),
            tt.ssm.S5(N, d_state=3), tt.ssm.S6(N, d_state=3), nn.Linear(N, 2),
        )
        self.extra = [tt.ssm.S6(2, d_state=2)]  # a layer outside the registered modules

    def forward(self, x):
        return self.extra[0](self.net(x))


def test_model_scan_and_sequence_mode_equal_stepping_with_gradients():
    torch.manual_seed(0)
    model = _Net().double()
    model.extra[0].double()
    xs = torch.randn(30, 3, 5, dtype=torch.float64, requires_grad=True)

    def run(mode):
        model.zero_states()
        if mode == "step":
            ys = torch.stack([model(x) for x in xs])
        elif mode == "scan":
            ys = model.scan(xs)
        else:
            with tt.sequence_mode(model):
                ys = model(xs)
        grads = torch.autograd.grad(ys.pow(2).sum(), [xs, *model.parameters()])
        return ys.detach(), model.save_states(), grads

    ys_step, states_step, grads_step = run("step")
    for mode in ("scan", "context"):
        ys, states, grads = run(mode)
        assert rel_err(ys.numpy(), ys_step.numpy()) <= 1e-10
        assert states.keys() == states_step.keys()
        for key in states:
            assert rel_err(states[key].numpy(), states_step[key].numpy()) <= 1e-10, key
        for g, g_step in zip(grads, grads_step):
            assert rel_err(g.numpy(), g_step.numpy()) <= 1e-9
    # sequence mode ends with the block: the model steps again
    model.zero_states()
    assert model(xs[0]).shape == (3, 2)


def test_sequence_mode_time_dim_and_restores_previous_mode():
    torch.manual_seed(1)
    model = _Net().double()
    model.extra[0].double()
    xs = torch.randn(12, 3, 5, dtype=torch.float64)
    model.zero_states()
    expected = torch.stack([model(x) for x in xs]).detach()
    model.zero_states()
    with torch.no_grad(), tt.sequence_mode(model, time_dim=1):
        ys = model(xs.movedim(0, 1)).movedim(1, 0)
    assert rel_err(ys.numpy(), expected.numpy()) <= 1e-10
    assert all(layer.__dict__.get("_sequence_time_dim") is None for _, layer in model._layers())


def test_sequence_mode_rejects_a_layer_without_scan():
    class Plain(tt.Layer):
        def forward(self, x):
            return x

    model = nn.Sequential(Plain(4), tt.ssm.S4(4))
    with pytest.raises(TypeError, match="Plain"):
        with tt.sequence_mode(model):
            pass


# ----------------------------------------------------------------------------- long sequences, extreme steps


@pytest.mark.parametrize(("name", "kwargs"), LAYERS[:4], ids=LAYER_IDS[:4])
def test_hundred_thousand_steps_with_large_dt_stay_finite_and_match_stepping(name, kwargs):
    """100,000 steps with large dt: stepping and scan stay finite and agree (float64, NumPy)."""
    lib = backends.load("numpy")
    rng = np.random.default_rng(3)
    weights = _random_weights(name, kwargs, rng)
    if name in ("S4", "S5"):
        weights["log_dt"] = np.full_like(weights["log_dt"], np.log(50.0))  # dt * A far below exp's range
    else:
        weights["dt_proj.bias"] = np.full_like(weights["dt_proj.bias"], 60.0)
    T = 100_000
    config = ssm_core.LAYERS[name].config(N, **kwargs)
    layer = getattr(lib, name)(**vars(config), dtype="float64")
    layer.load_state_dict(weights)
    xs = rng.standard_normal((T, 1, N))
    stepped = np.empty_like(xs)
    for t in range(T):
        stepped[t] = layer(xs[t])
    final = layer.save_states()
    layer.zero_states()
    scanned = layer.scan(xs)
    assert np.isfinite(stepped).all() and np.isfinite(scanned).all()
    assert rel_err(scanned, stepped) <= 1e-10
    for key, value in layer.save_states().items():
        assert np.isfinite(value).all()
        assert rel_err(value, final[key]) <= 1e-10


@pytest.mark.parametrize(("name", "kwargs"), LAYERS[:4], ids=LAYER_IDS[:4])
def test_long_float32_scan_stays_within_float32_drift_of_float64(name, kwargs):
    rng = np.random.default_rng(4)
    layer64 = _torch_layer(name, kwargs, -1, "float64", rng)
    layer32 = getattr(tt.ssm, name)(N, **kwargs)
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    xs = torch.from_numpy(rng.standard_normal((100_000, 1, N)))
    with torch.no_grad():
        ys64 = layer64.scan(xs)
        ys32 = layer32.scan(xs.float())
    assert torch.isfinite(ys32).all()
    assert rel_err(ys32.double().numpy(), ys64.numpy()) <= 1e-4


# ----------------------------------------------------------------------------- the functional forms


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


@pytest.mark.parametrize(("name", "kwargs"), LAYERS, ids=LAYER_IDS)
def test_every_scan_method_equals_stepping_on_array_api_strict(name, kwargs):
    import array_api_strict as xp

    rng = np.random.default_rng(6)
    spec = ssm_core.LAYERS[name]
    config = spec.config(N, **kwargs)
    params = spec.params_from_mapping({k: xp.asarray(v) for k, v in _random_weights(name, kwargs, rng).items()})
    xs = xp.asarray(rng.standard_normal((70, 2, N)))
    state = spec.zero_state(config, (2,), xp, xp.float64)
    ys, stepped_state = [], state
    for t in range(xs.shape[0]):
        y, stepped_state = spec.step(xs[t, ...], stepped_state, params)
        ys.append(np.from_dlpack(y))
    methods = ("loop", "chunked", "auto") if name in ("S4", "S5") else ("loop", "parallel")
    for method in methods:
        scanned, final = spec.scan(xs, state, params, method=method)
        assert rel_err(np.from_dlpack(scanned), np.stack(ys)) <= 1e-10, method
        for a, b in zip(final, stepped_state):
            if a is not None:
                assert rel_err(np.from_dlpack(a), np.from_dlpack(b)) <= 1e-10, method


def test_decay_powers_handle_zero_and_one():
    import array_api_strict as xp

    powers = np.from_dlpack(ssm_core.decay_powers(xp.asarray([0.0, 0.5, 1.0]), 3, xp))
    assert np.allclose(powers, [[1, 1, 1], [0, 0.5, 1], [0, 0.25, 1], [0, 0.125, 1]], rtol=1e-15, atol=0)
    assert np.isfinite(powers).all()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["S4", "Mamba"])
def test_scan_errors_name_the_layer_and_leave_states(name):
    layer = getattr(tt.ssm, name)(N)
    layer(torch.randn(2, N))
    held = {n: getattr(layer, n).clone() for n in layer._state_names}
    bad = [
        (torch.randn(5, 2, N), {"time_dim": 3}, ValueError, "time_dim"),
        (torch.randn(5, 2, N + 1), {}, ValueError, f"{N} features"),
        (torch.randn(5, 3, N), {}, ValueError, "zero_states"),
        (torch.randint(0, 3, (5, 2, N)), {}, TypeError, "floating"),
        (torch.randn(5, 2, N, dtype=torch.float64), {}, TypeError, "dtype"),
        (torch.randn(N), {}, ValueError, "sequence"),
    ]
    for xs, kw, error, words in bad:
        with pytest.raises(error, match=words) as info:
            layer.scan(xs, **kw)
        assert name in str(info.value)
        for n, value in held.items():
            assert torch.equal(getattr(layer, n), value)
