"""Gradients of the torch layers: ``gradcheck`` against finite differences, for inputs and parameters.

Through every step (any feature axis, a ``TTcompile``d layer too), and every
parameter gets a finite, non-zero gradient. Gradients through ``scan`` equal
those through the steps (``test_scan_equals_step.py``); through checkpointed chunks
(``test_checkpoint.py``); under autocast (``test_autocast.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from conftest import ALL, LTI, N, make_layer

# Central differences with step 1e-6 on float64: rounding gives eps64 * |f| / 1e-6, about 2e-9 for the
# |f| <= 10 of these runs, truncation 1e-12 times f's third derivative; measured at most 1e-9 (inputs) and
# 1e-8 (parameters, a summed loss) on every case. atol 1e-7 holds that with a margin of ten; no rtol on top.
GRADCHECK = dict(eps=1e-6, atol=1e-7, rtol=0)


def _grad_setup(cls_name, kwargs):
    layer = make_layer(cls_name, kwargs)
    gen = torch.Generator().manual_seed(7)
    xs = torch.randn(3, 2, N, generator=gen, dtype=torch.float64)
    return layer, xs


@pytest.mark.parametrize("case", ALL)
def test_gradcheck_inputs(case):
    _, cls_name, kwargs = case
    layer, xs = _grad_setup(cls_name, kwargs)
    for p in layer.parameters():
        p.requires_grad_(True)

    def f(seq):
        layer.zero_states()
        return torch.stack([layer(x) for x in seq])

    assert torch.autograd.gradcheck(f, (xs.clone().requires_grad_(True),), **GRADCHECK)


@pytest.mark.parametrize("case", ALL)
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

    assert torch.autograd.gradcheck(f, values, **GRADCHECK)


@pytest.mark.parametrize("case", ALL)
def test_every_parameter_gets_a_gradient(case):
    _, cls_name, kwargs = case
    layer, xs = _grad_setup(cls_name, kwargs)
    loss = torch.stack([layer(x) for x in xs]).pow(2).sum()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", ALL)
def test_gradcheck_feature_axis_first(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs, dim=0)
    xs = torch.randn(3, N, 2, dtype=torch.float64, requires_grad=True)

    def f(seq):
        layer.zero_states()
        return torch.stack([layer(x) for x in seq])

    assert torch.autograd.gradcheck(f, (xs,), **GRADCHECK)


@pytest.mark.parametrize("case", LTI)
def test_gradcheck_compiled_layer_inputs(case):
    _, cls_name, kwargs = case
    layer, xs = _grad_setup(cls_name, kwargs)
    layer.TTcompile()

    def f(seq):
        layer.zero_states()
        return torch.stack([layer(x) for x in seq])

    assert torch.autograd.gradcheck(f, (xs.clone().requires_grad_(True),), **GRADCHECK)
