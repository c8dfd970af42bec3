"""Initialisation: seeded and reproducible, and the published S4D and Mamba recipes, on every binding.

The same seed gives the same parameters (a torch layer from
``torch.manual_seed``, a backend layer from ``seed=``), another seed others,
all finite and shaped as ``state_dict()`` says. Every binding draws, each from
its own generator (torch from its global one only): S4D-real ``A``
(``A_log = log(1..d)``), log-uniform ``dt`` in ``[1e-3, 1e-1]``, ``B = D = 1``
and ``C`` standard normal for S4, normal ``B``, ``C`` of variance ``1/N`` and
``1/d`` for S5, ``1/sqrt(fan_in)`` uniform projections and an
inverse-softplus ``dt`` bias for S6 and Mamba. The checks tell a uniform draw
from a normal one (signs, spread, bounds), so a backend drawing one for the other fails.
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


def _init_params(b, name, kwargs, seed=0) -> dict:
    """A freshly initialised layer's parameters, as float64 NumPy arrays (exact: every init dtype widens exactly)."""
    layer = _build(name, kwargs, seed) if b.mod is None else b.cls(name)(**kwargs, seed=seed)
    return {k: v.astype(np.float64) for k, v in b.params(layer).items()}


def _check_a_log(a_log, n, d):
    """S4D-real: ``A_log = log(1..d)`` in every row, to the rounding of the layer's float32."""
    expected = np.log(np.arange(1, d + 1, dtype=np.float64)) * np.ones((n, d))
    np.testing.assert_allclose(a_log.reshape(n, d), expected, rtol=2.0**-23, atol=0)


LOG_DT_LO, LOG_DT_HI = math.log(1e-3), math.log(1e-1)


def _check_log_uniform(log_dt):
    log_dt = np.asarray(log_dt, dtype=np.float64)
    assert (log_dt >= LOG_DT_LO - 1e-6).all() and (log_dt <= LOG_DT_HI + 1e-6).all(), log_dt
    if log_dt.size >= 100:  # spread over the whole range (log-uniform)
        assert log_dt.min() < LOG_DT_LO + 0.5 and log_dt.max() > LOG_DT_HI - 0.5
        mid = (LOG_DT_LO + LOG_DT_HI) / 2
        assert abs(log_dt.mean() - mid) < 0.3


def _check_normal(value, std):
    """A normal draw of standard deviation ``std``: both signs, mean 0 and that spread (a few thousand samples)."""
    assert (value < 0).any() and (value > 0).any()
    assert abs(value.std() / std - 1.0) < 0.1 and abs(value.mean()) < 0.1 * std


def _check_fan_in(weight, fan_in):
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: within the bound, reaching near it, centred."""
    bound = 1.0 / math.sqrt(fan_in)
    assert np.abs(weight).max() <= bound * (1 + 2.0**-23)
    assert np.abs(weight).max() > 0.8 * bound
    assert abs(weight.mean()) < 0.2 * bound


def test_init_s4(binding):
    n, d = 256, 8
    p = _init_params(binding, "S4", dict(num_neurons=n, d_state=d))
    _check_a_log(p["A_log"], n, d)
    np.testing.assert_array_equal(p["B"], np.ones((n, d)))
    np.testing.assert_array_equal(p["D"], np.ones(n))
    dt = np.exp(p["log_dt"])
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    _check_log_uniform(p["log_dt"])
    _check_normal(p["C"], 1.0)


def test_init_s5(binding):
    n, d = 128, 96
    p = _init_params(binding, "S5", dict(num_neurons=n, d_state=d))
    _check_a_log(p["A_log"], 1, d)
    assert p["log_dt"].shape == (1,)
    dt = np.exp(p["log_dt"])
    assert 1e-3 * (1 - 1e-5) <= dt.item() <= 1e-1 * (1 + 1e-5)
    np.testing.assert_array_equal(p["D"], np.ones(n))
    _check_normal(p["B"], 1 / math.sqrt(n))
    _check_normal(p["C"], 1 / math.sqrt(d))
    dts = np.stack([_init_params(binding, "S5", dict(num_neurons=2, d_state=2), s)["log_dt"] for s in range(150)])
    _check_log_uniform(dts)


def _check_dt_proj(p, n, rank):
    assert p["dt_proj.weight"].shape == (n, rank)
    _check_fan_in(p["dt_proj.weight"], rank)
    dt = np.logaddexp(p["dt_proj.bias"], 0.0)  # softplus
    assert (dt >= 1e-3 * (1 - 1e-4)).all() and (dt <= 1e-1 * (1 + 1e-4)).all(), dt
    _check_log_uniform(np.log(dt))


@pytest.mark.parametrize("rank", [-1, 3])
def test_init_s6(binding, rank):
    n, d = 160, 8
    p = _init_params(binding, "S6", dict(num_neurons=n, d_state=d, dt_rank=rank))
    r = max(1, n // 16) if rank == -1 else rank
    _check_a_log(p["A_log"], n, d)
    np.testing.assert_array_equal(p["D"], np.ones(n))
    assert p["x_proj.weight"].shape == (r + 2 * d, n) and "x_proj.bias" not in p
    _check_fan_in(p["x_proj.weight"], n)
    _check_dt_proj(p, n, r)


@pytest.mark.parametrize("kernel", [4, 1])
def test_init_mamba(binding, kernel):
    n, d = 160, 8
    p = _init_params(binding, "Mamba", dict(num_neurons=n, d_state=d, conv_kernel=kernel))
    r = max(1, n // 16)
    _check_a_log(p["A_log"], n, d)
    np.testing.assert_array_equal(p["D"], np.ones(n))
    _check_fan_in(p["in_proj.weight"], n)
    _check_fan_in(p["out_proj.weight"], n)
    _check_fan_in(p["ssm_proj.weight"], n)
    assert p["in_proj.weight"].shape == (2 * n, n)
    assert not {"in_proj.bias", "out_proj.bias", "ssm_proj.bias"} & set(p)
    _check_dt_proj(p, n, r)
    if kernel > 1:
        assert p["conv_weights"].shape == (n, kernel) and p["conv_bias"].shape == (n,)
        _check_fan_in(p["conv_weights"], kernel)
        _check_fan_in(p["conv_bias"], kernel)
    else:
        assert "conv_weights" not in p and "conv_bias" not in p


@pytest.mark.parametrize("kernel", [4, 1])
def test_mamba_has_a_conv_buffer_where_it_has_a_convolution(kernel):
    layer = _build("Mamba", dict(num_neurons=16, d_state=4, conv_kernel=kernel), 0)
    assert ("conv_buffer" in layer._state_names) == (kernel > 1)
    assert ("conv_weights" in dict(layer.named_parameters())) == (kernel > 1)


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
