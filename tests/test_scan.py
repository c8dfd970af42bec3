"""Sequence mode: ``scan`` gives what stepping gives, on every binding and at model level.

For every layer, binding, dtype and placement of the feature and time axes:
outputs and final states of a scan from held states equal stepping's, and the
layer steps on from where the scan left it; a sequence may be scanned in parts
and after steps, an empty one changes nothing; ``dim`` indexes one step's
input so it never clashes with ``time_dim``. The torch layers' gradients
through a scan equal those through the steps, for one layer and for a
``tt.Model`` in ``scan`` or ``tt.sequence_mode``.

Long runs are in ``test_numerics.py``; the hypothesis-driven forms of these
properties in ``test_properties.py``; ``ssm_core``'s scan functions in
``test_ssm_core.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracetorch as tt
from conftest import FIVE, GRAD_TOL, N as SMALL_N, TOL, random_weights, rel_err

N = 8
LAYERS = [
    ("S4", {"d_state": 5}),
    ("S5", {"d_state": 6}),
    ("S6", {"d_state": 4}),
    ("Mamba", {"d_state": 4}),
    ("Mamba", {"d_state": 4, "conv_kernel": 1}),
    ("S6", {"d_state": 4, "discretization": "euler"}),
    ("Mamba", {"d_state": 4, "expand": 2, "discretization": "euler", "residual": False, "bias": True, "conv_bias": False}),
]
LAYER_IDS = ["S4", "S5", "S6", "Mamba", "Mamba-k1", "S6-euler", "Mamba-hf"]
# (dim of one step's input, time_dim of the sequence, step input shape)
AXES = [(-1, 0, (3, N)), (0, 0, (N, 3)), (1, 2, (2, N, 3)), (-1, -1, (2, N)), (0, 1, (N, 2, 3))]
AXIS_IDS = ["last-time0", "first-time0", "middle-time2", "last-time-1", "first-time1"]


def _make(b, name, kwargs, dim=-1, dtype="float64", seed=0):
    return b.make(name, {"num_neurons": N, "dim": dim, **kwargs}, dtype, seed=seed)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("dim", "time_dim", "step_shape"), AXES, ids=AXIS_IDS)
@pytest.mark.parametrize(("name", "kwargs"), LAYERS, ids=LAYER_IDS)
def test_scan_equals_stepping(binding, dtype, dim, time_dim, step_shape, name, kwargs):
    """From held, non-zero states; the layer then continues from the state after the sequence."""
    b = binding
    layer = _make(b, name, kwargs, dim, dtype)
    rng = np.random.default_rng(0)
    warmup = rng.standard_normal((3, *step_shape)).astype(dtype)
    xs = rng.standard_normal((40, *step_shape)).astype(dtype)
    after = rng.standard_normal(step_shape).astype(dtype)

    b.steps(layer, warmup)
    held = b.save_states(layer)
    stepped = b.steps(layer, xs)
    stepped_states = b.host_states(layer)
    stepped_next = b.to_numpy(b.step(layer, b.asarray(after)))

    b.load_states(layer, held)
    scanned = b.to_numpy(b.scan(layer, b.asarray(np.moveaxis(xs, 0, time_dim)), time_dim=time_dim))
    scanned = np.moveaxis(scanned, time_dim, 0)
    assert scanned.shape == stepped.shape
    assert rel_err(scanned, stepped) <= TOL[dtype]
    for key, value in b.host_states(layer).items():
        assert rel_err(value, stepped_states[key]) <= TOL[dtype], key
    assert rel_err(b.to_numpy(b.step(layer, b.asarray(after))), stepped_next) <= TOL[dtype]


@pytest.mark.parametrize(("name", "kwargs"), LAYERS, ids=LAYER_IDS)
def test_scan_then_step_continues(binding, name, kwargs):
    b = binding
    layer = _make(b, name, kwargs)
    xs = np.random.default_rng(2).standard_normal((21, 2, N))
    expected = b.steps(layer, xs)
    b.zero_states(layer)
    first = b.to_numpy(b.scan(layer, b.asarray(xs[:13])))
    assert rel_err(np.concatenate([first, b.steps(layer, xs[13:])]), expected) <= TOL["float64"]


def test_scan_of_an_empty_sequence_changes_nothing(binding):
    b = binding
    layer = _make(b, "Mamba", {})
    b.step(layer, b.asarray(np.ones((2, N))))
    held = b.host_states(layer)
    ys = b.scan(layer, b.asarray(np.zeros((0, 2, N))))
    assert tuple(ys.shape) == (0, 2, N)
    for key, value in b.host_states(layer).items():
        np.testing.assert_array_equal(value, held[key], err_msg=key)


@pytest.mark.parametrize("case", FIVE)
def test_dim_indexes_the_step_input_not_the_sequence(binding, case):
    """``dim`` indexes one step's input (``xs`` without its time axis), so ``dim`` and ``time_dim`` never clash.

    ``dim=0, time_dim=0`` on ``xs`` of shape ``[T, N, B]`` is valid: the time
    axis is axis 0 of the sequence, the features are axis 0 of each step
    ``xs[t]`` of shape ``[N, B]`` (axis 1 of the sequence). Likewise
    ``dim=-1, time_dim=-1`` on ``[B, N, T]``: the features are the last axis of
    each step ``xs[..., t]`` of shape ``[B, N]``.
    """
    b, (_, name, kwargs) = binding, case
    for dim, time_dim, xs_shape in [(0, 0, (5, SMALL_N, 2)), (-1, -1, (2, SMALL_N, 5)), (1, 0, (5, 2, SMALL_N))]:
        xs = np.random.default_rng(3).standard_normal(xs_shape)
        stepper = b.make(name, {**kwargs, "dim": dim}, dtype="float64")
        scanner = b.make(name, {**kwargs, "dim": dim}, dtype="float64")
        stepped = b.steps(stepper, np.moveaxis(xs, time_dim, 0))
        scanned = b.to_numpy(b.scan(scanner, b.asarray(xs), time_dim=time_dim))
        assert scanned.shape == xs.shape
        assert rel_err(np.moveaxis(scanned, time_dim, 0), stepped) <= TOL["float64"], (dim, time_dim)
        for key, value in b.host_states(scanner).items():
            assert rel_err(value, b.host_states(stepper)[key]) <= TOL["float64"], key


# ----------------------------------------------------------------------------- gradients (torch)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("dim", "time_dim", "step_shape"), AXES, ids=AXIS_IDS)
@pytest.mark.parametrize(("name", "kwargs"), LAYERS, ids=LAYER_IDS)
def test_torch_scan_equals_stepping_outputs_states_and_gradients(dtype, dim, time_dim, step_shape, name, kwargs):
    layer = getattr(tt.ssm, name)(N, dim=dim, **kwargs).to(getattr(torch, dtype))
    weights = random_weights(name, {"num_neurons": N, **kwargs}, seed=1)
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    tdtype = getattr(torch, dtype)
    rng = np.random.default_rng(1)
    warmup = torch.from_numpy(rng.standard_normal((2, *step_shape)).astype(dtype))
    xs = torch.from_numpy(rng.standard_normal((37, *step_shape)).astype(dtype)).requires_grad_()

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
    assert rel_err(ys_scan, ys_step) <= tol
    for key in states_step:
        assert rel_err(states_scan[key], states_step[key]) <= tol, key
    for g_scan, g_step in zip(grads_scan, grads_step):
        assert rel_err(g_scan, g_step) <= GRAD_TOL[dtype]


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
        assert rel_err(ys, ys_step) <= TOL["float64"]
        assert states.keys() == states_step.keys()
        for key in states:
            assert rel_err(states[key], states_step[key]) <= TOL["float64"], key
        for g, g_step in zip(grads, grads_step):
            assert rel_err(g, g_step) <= GRAD_TOL["float64"]
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
    assert rel_err(ys, expected) <= TOL["float64"]
    assert all(layer.__dict__.get("_sequence_time_dim") is None for _, layer in model._layers())


def test_sequence_mode_rejects_a_layer_without_scan():
    class Plain(tt.Layer):
        def forward(self, x):
            return x

    model = nn.Sequential(Plain(4), tt.ssm.S4(4))
    with pytest.raises(TypeError, match="Plain"):
        with tt.sequence_mode(model):
            pass
