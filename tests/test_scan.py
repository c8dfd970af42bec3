"""Sequence mode beyond one layer's scan: an empty sequence, ``tt.Model.scan`` and ``tt.sequence_mode``.

An empty sequence changes nothing, on every binding. A ``tt.Model`` in
``scan`` or ``tt.sequence_mode`` gives stepping's outputs, states and
gradients; the mode takes a ``time_dim``, restores the previous mode, and
names a layer that has no scan.

One layer's scan against stepping (every layer, binding, method, length,
layout, compiled and eager) is ``test_scan_equals_step.py``; the
hypothesis-driven properties are in ``test_properties.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracetorch as tt
from conftest import GRAD_TOL, TOL, rel_err

N = 8


def test_scan_of_an_empty_sequence_changes_nothing(binding):
    b = binding
    layer = b.make("Mamba", {"num_neurons": N}, "float64")
    b.step(layer, b.asarray(np.ones((2, N))))
    held = b.host_states(layer)
    ys = b.scan(layer, b.asarray(np.zeros((0, 2, N))))
    assert tuple(ys.shape) == (0, 2, N)
    for key, value in b.host_states(layer).items():
        np.testing.assert_array_equal(value, held[key], err_msg=key)


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
