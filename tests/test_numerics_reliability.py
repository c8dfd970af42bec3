"""Numbers where two documented features meet: autocast and long sequences, ``torch.compile``
and every layer, bfloat16 weights and MLX, ``dt`` in softplus's curved range.

Each test compares with the float64 ``numpy_oracle`` (or the eager float64
layer for gradients) at a tolerance the computation can justify, tight enough
that the defect it guards against would fail it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import numpy_oracle
import tracetorch as tt
from conftest import BINDINGS, random_weights, rel_err

# ----------------------------------------------------------------------------- S4/S5 under autocast

LONG_T = 2000
AUTOCAST_KWARGS = dict(num_neurons=16, d_state=8)
# float32's rounding over 2000 steps (a few dozen chunk carries, dot products of
# at most 64 terms) stays within a few hundred float32 eps (measured: 15-30 eps,
# 2e-6 to 4e-6); bfloat16's unit rounding alone is 2**-8 = 3.9e-3 (measured with the
# recurrence in bfloat16: 3e-3 to 6e-3). 3e-5 (250 float32 eps) separates them.
FLOAT32_LONG_TOL = 3e-5
# The outputs come back in bfloat16: its rounding, 2**-8 of the largest output, on top.
BFLOAT16_OUTPUT_TOL = 2.0**-8 + FLOAT32_LONG_TOL


def _autocast_case(name):
    weights = random_weights(name, AUTOCAST_KWARGS, seed=11)
    layer = getattr(tt.ssm, name)(**AUTOCAST_KWARGS)
    layer.load_state_dict({k: torch.from_numpy(v).float() for k, v in weights.items()})
    # The oracle gets the float32-rounded weights the layer holds.
    weights32 = {k: v.detach().double().numpy() for k, v in layer.state_dict().items()}
    xs = torch.from_numpy(np.random.default_rng(12).standard_normal((LONG_T, 2, AUTOCAST_KWARGS["num_neurons"])))
    return layer, weights32, xs.float()


def _run(layer, xs, sequence):
    layer.zero_states()
    if sequence:
        return layer.scan(xs)
    return torch.stack([layer(x) for x in xs])


@pytest.mark.parametrize("sequence", [False, True], ids=["step", "scan"])
@pytest.mark.parametrize("name", ["S4", "S5"])
def test_bfloat16_autocast_keeps_the_s4_s5_recurrence_in_float32(name, sequence):
    """Under CPU bfloat16 autocast S4/S5 compute everything in float32 (they have no projections
    autocast may lower): after 2000 steps the state, and the gradients of a loss linear in the
    outputs, are float32-accurate; only the outputs are rounded, to bfloat16."""
    layer, weights32, xs = _autocast_case(name)
    ref, ref_states = numpy_oracle.run(name, AUTOCAST_KWARGS, weights32, xs.double().numpy())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ys = _run(layer, xs, sequence)
    assert ys.dtype == torch.bfloat16
    assert rel_err(ys, ref) <= BFLOAT16_OUTPUT_TOL
    for key, value in ref_states.items():
        state = getattr(layer, key)
        assert state.dtype == torch.float32, key
        assert rel_err(state, value) <= FLOAT32_LONG_TOL, f"state {key} off the float64 oracle"

    # Gradients of sum(w * y), w exact in bfloat16: the gradient reaching the layer is w exactly.
    w = torch.from_numpy(np.random.default_rng(13).standard_normal(tuple(xs.shape))).bfloat16().float()
    wide = getattr(tt.ssm, name)(**AUTOCAST_KWARGS).double()
    wide.load_state_dict({k: torch.from_numpy(v) for k, v in weights32.items()})
    xs64 = xs.double().requires_grad_()
    (_run(wide, xs64, sequence) * w.double()).sum().backward()
    xs32 = xs.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = _run(layer, xs32, sequence)
    (ys.float() * w).sum().backward()
    assert rel_err(xs32.grad, xs64.grad) <= FLOAT32_LONG_TOL, "input gradient"
    for (key, p), p64 in zip(layer.named_parameters(), wide.parameters()):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, p64.grad) <= FLOAT32_LONG_TOL, f"gradient of {key}"


# ----------------------------------------------------------------------------- torch.compile(fullgraph=True)

# Per layer the sequence length the scan needs: S4/S5 cut 80 steps into two chunks
# (a chunk carry is traced); S6/Mamba unroll their steps, so 3 keep the compile short.
FULLGRAPH_T = {"S4": 80, "S5": 80, "S6": 3, "Mamba": 3}


@pytest.mark.parametrize("mode", ["step", "scan"])
@pytest.mark.parametrize("name", ["S4", "S5", "S6", "Mamba"])
def test_torch_compile_fullgraph_gives_the_eager_numbers(name, mode):
    """``torch.compile(..., fullgraph=True)`` (inductor) traces a step and a scan of every layer
    whole, and gives eager's outputs and states to float32 rounding."""
    kwargs = dict(num_neurons=4, d_state=3)
    layer = getattr(tt.ssm, name)(**kwargs)
    layer.load_state_dict({k: torch.from_numpy(v).float() for k, v in random_weights(name, kwargs).items()})
    xs = torch.from_numpy(np.random.default_rng(3).standard_normal((FULLGRAPH_T[name], 2, 4))).float()
    run = (lambda f: f(xs[0])) if mode == "step" else (lambda f: f(xs))
    with torch.no_grad():
        layer.zero_states()
        expected = run(layer if mode == "step" else layer.scan)
        expected_states = {n: getattr(layer, n) for n in layer._state_names}
        layer.zero_states()
        torch._dynamo.reset()
        ys = run(torch.compile(layer if mode == "step" else layer.scan, fullgraph=True))
    # Another order of float32 sums (a fused chain, the chunk's products): a few eps of the largest value.
    tol = 16 * torch.finfo(torch.float32).eps
    assert rel_err(ys, expected) <= tol
    for key, value in expected_states.items():
        assert rel_err(getattr(layer, key), value) <= tol, key


# ----------------------------------------------------------------------------- dt in softplus's curved range

# dt_proj.bias per feature: the pre-activation of dt = softplus(.) lies near these, from just
# above 5 (where softplus(x) - x = log1p(exp(-x)) is 4e-3) through 20 (torch's switch to x
# in float32) to 45 (past float64's: log1p(exp(-x)) below half an ulp of x from about 34 on).
DT_PRE_ACTIVATIONS = [5.5, 7.0, 10.0, 14.0, 19.0, 22.0, 30.0, 45.0]
SOFTPLUS_KWARGS = dict(num_neurons=len(DT_PRE_ACTIVATIONS), d_state=3, dt_rank=2)
# Outputs of a few steps, each a short sum of products: rounding within 8 ulp of the
# largest output (measured: 1-3 ulp). softplus switching to x at 5 is off by 4e-3 at x = 5.5
# (7e-4 of dt, of the outputs too, since |dt * A| <= 0.05 keeps B_bar about dt * B).
SOFTPLUS_TOL = {"float32": 8 * 2.0**-23, "float64": 8 * 2.0**-52}


def _large_dt_weights(name):
    weights = random_weights(name, SOFTPLUS_KWARGS, seed=21)
    weights["dt_proj.bias"] = np.array(DT_PRE_ACTIVATIONS)
    weights["dt_proj.weight"] = 0.1 * weights["dt_proj.weight"]  # keeps the pre-activation within 0.3 of the bias
    # A = -1e-3: dt * A stays small, so the outputs follow dt (and a wrong softplus) in proportion.
    weights["A_log"] = np.full_like(weights["A_log"], np.log(1e-3))
    return weights


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["S6", "Mamba"])
@pytest.mark.parametrize("binding", BINDINGS, indirect=True)
def test_dt_softplus_between_5_and_45_matches_the_float64_oracle(binding, name, dtype):
    """``dt = softplus(dt_proj(.))`` for pre-activations from 5.5 to 45, stepped and scanned."""
    b = binding
    if b.name == "mlx" and dtype == "float64":
        import mlx.core as mx

        if mx.default_device().type != mx.cpu:
            pytest.skip("MLX has no float64 on the GPU")
    kwargs = SOFTPLUS_KWARGS
    layer = b.make(name, kwargs, dtype, _large_dt_weights(name))
    weights = {k: v.astype(np.float64) for k, v in b.params(layer).items()}
    xs = np.random.default_rng(22).standard_normal((6, 2, kwargs["num_neurons"])).astype(dtype)
    if name == "S6":  # the pre-activations are where the test means them to be
        low = (xs.astype(np.float64) @ weights["x_proj.weight"].T)[..., : kwargs["dt_rank"]]
        pre = low @ weights["dt_proj.weight"].T + weights["dt_proj.bias"]
        assert np.all(np.abs(pre - DT_PRE_ACTIVATIONS) < 0.3)
    ref, ref_states = numpy_oracle.run(name, kwargs, weights, xs.astype(np.float64))
    stepped = b.steps(layer, xs)
    step_states = b.host_states(layer)
    b.zero_states(layer)
    scanned = b.to_numpy(b.scan(layer, b.asarray(xs)))
    tol = SOFTPLUS_TOL[dtype]
    assert rel_err(stepped, ref) <= tol, "step"
    assert rel_err(scanned, ref) <= tol, "scan"
    for key, value in ref_states.items():
        assert rel_err(step_states[key], value) <= tol, key
        assert rel_err(b.to_numpy(getattr(layer, key)), value) <= tol, key
