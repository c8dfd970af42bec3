"""Initialisation: seeded and reproducible on every binding; the published S4D and Mamba recipes on torch.

The same seed gives the same parameters (a torch layer from
``torch.manual_seed``, a backend layer from ``seed=``), another seed others,
all finite and shaped as ``state_dict()`` says. The torch layers draw, from
torch's global generator only: S4D-real ``A`` (``A_log = log(1..d)``),
log-uniform ``dt`` in ``[1e-3, 1e-1]``, ``B = D = 1`` and ``C`` standard
normal for S4, ``1/sqrt(fan_in)`` uniform projections and an
inverse-softplus ``dt`` bias for S6 and Mamba.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ssm_core
import tracetorch as tt
from conftest import ALL


def _build(cls_name, kwargs, seed):
    torch.manual_seed(seed)
    return getattr(tt.ssm, cls_name)(**kwargs)


@pytest.mark.parametrize("case", ALL)
def test_same_seed_same_init(binding, case):
    b, (_, name, kwargs) = binding, case

    def init(seed):
        layer = _build(name, kwargs, seed) if b.mod is None else b.cls(name)(**kwargs, seed=seed)
        return b.params(layer)

    first, again, other = init(7), init(7), init(8)
    assert list(first) == list(again)
    for key, value in first.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    assert any(not np.array_equal(first[k], other[k]) for k in first), "a different seed gave the same parameters"
    assert {k: v.shape for k, v in first.items()} == ssm_core.LAYERS[name].config(**kwargs).param_shapes()
    for key, value in first.items():
        assert np.isfinite(value).all(), key


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
