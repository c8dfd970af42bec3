"""``TTcompile()``/``TTdecompile()``: traceTorch's freezing of the S4/S5 dynamics changes no numbers.

A compiled layer or model gives the plain layer's outputs and states, keeps
its ``state_dict`` keys (so its checkpoints load anywhere), compiles again
from new parameters, survives a dtype conversion, and trains again once
decompiled. That a compiled layer keeps the weights it was compiled with is
``test_weight_freshness.py``; ``torch.compile`` of a step is ``test_fused.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tracetorch as tt
from conftest import D_STATE, LTI, N, copy_params, make_layer, rel_err, run_steps, state_names

T = 4


@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("case", LTI)
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


@pytest.mark.parametrize("case", LTI)
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


@pytest.mark.parametrize("case", LTI)
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


@pytest.mark.parametrize("case", LTI)
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


@pytest.mark.parametrize("name", ["S4", "S5", "S6", "Mamba"])
def test_a_conversion_after_ttcompile_reaches_the_steps(name):
    """The step keeps the frozen weights as it takes them; converting the layer (here to half
    precision and back: the same dtype, other values) makes it take them anew, as a copy does."""
    torch.manual_seed(6)
    layer = getattr(tt.ssm, name)(N, d_state=D_STATE)
    layer.TTcompile()
    xs = torch.randn(T, 2, N)
    with torch.no_grad():
        before = run_steps(layer, xs)
        layer.half().float()  # the frozen copies are rounded to float16's precision
        fresh = copy.deepcopy(layer)  # takes the frozen weights from its buffers at its first step
        layer.zero_states()
        fresh.zero_states()
        after, expected = run_steps(layer, xs), run_steps(fresh, xs)
    assert torch.equal(after, expected)
    assert not torch.equal(after, before)  # the rounding shows


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
