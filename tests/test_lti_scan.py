"""S4/S5 chunked scans: every chunk boundary, extreme decays, the choice of form, what autograd keeps.

``ssm_core``'s S4 and S5 scans cut time into chunks and do each chunk's work
as matrix products (see ``ssm_core/lti.py``). These tests hold the chunked
form to ``T`` plain steps at every boundary of chunks made short (4 steps)
for the purpose, over batch shapes and from non-zero states, and at decays
of exactly 0 and 1; they check when ``"auto"`` steps, the decay powers'
floor, the sizes autograd keeps for the backward pass, and the exported form.

The chunks the scans choose themselves, on every library, with gradients,
against stepping: ``test_scan_equals_step.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ssm_core
from ssm_core import lti
from conftest import TOL
from numpy_oracle import rel_err

N, D_STATE = 5, 6
LAYERS = ["S4", "S5"]
BATCHES = [(), (3,), (2, 3)]
BATCH_IDS = ["scalar", "batch3", "batch2x3"]


def _weights(name, rng, d_state=D_STATE, num_neurons=N):
    config = ssm_core.LAYERS[name].config(num_neurons, d_state=d_state)
    weights = {key: 0.5 * rng.standard_normal(shape) for key, shape in config.param_shapes().items()}
    weights["log_dt"] = rng.uniform(np.log(1e-3), np.log(0.5), config.param_shapes()["log_dt"])
    return config, weights


def _host(a):
    if isinstance(a, torch.Tensor):
        return a.detach().numpy()
    try:
        return np.from_dlpack(a)
    except (TypeError, AttributeError, BufferError):
        return np.asarray(a)


def _run(name, xs, state, params, method):
    spec = ssm_core.LAYERS[name]
    return spec.scan(xs, state, params, method=method)


def _state(name, config, batch, rng, convert, dtype):
    spec = ssm_core.LAYERS[name]
    shapes = {slot.name: batch + (slot.size,) + (() if slot.trailing is None else (slot.trailing,))
              for slot in config.state_slots()}
    return spec.state(**{k: convert(rng.standard_normal(s).astype(dtype)) for k, s in shapes.items()})


def _check_chunked_equals_loop(name, T, batch, seed=0):
    """The chunked scan equals the loop of steps (float64, array-api-strict), outputs and final states."""
    import array_api_strict as xp

    rng = np.random.default_rng(seed)
    config, weights = _weights(name, rng)
    spec = ssm_core.LAYERS[name]
    params = spec.params_from_mapping({k: xp.asarray(v) for k, v in weights.items()})
    state = _state(name, config, batch, rng, xp.asarray, "float64")
    xs = xp.asarray(rng.standard_normal((T,) + batch + (N,)))
    ys_loop, final_loop = _run(name, xs, state, params, "loop")
    ys, final = _run(name, xs, state, params, "chunked")
    assert tuple(ys.shape) == (T,) + batch + (N,)
    assert rel_err(_host(ys), _host(ys_loop)) <= TOL["float64"]
    for a, b in zip(final, final_loop):
        assert tuple(a.shape) == tuple(b.shape)
        assert rel_err(_host(a), _host(b)) <= TOL["float64"]


# ----------------------------------------------------------------------------- chunk boundaries


@pytest.fixture
def chunk_of_four(monkeypatch):
    """Chunks of 4 steps, so that short sequences cross several boundaries."""
    monkeypatch.setattr(lti, "S4_CHUNK", 4)
    monkeypatch.setattr(lti, "S5_CHUNK", 4)
    return 4


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 11, 23])
@pytest.mark.parametrize("name", LAYERS)
def test_chunk_boundaries_equal_stepping(chunk_of_four, name, T, batch):
    """T = L - 1, L, L + 1, multiples of L and not, from non-zero states."""
    _check_chunked_equals_loop(name, T, batch, seed=T)


# ----------------------------------------------------------------------------- extreme decays


@pytest.mark.parametrize("decay", ["zero", "one"])
@pytest.mark.parametrize("name", LAYERS)
def test_decays_of_zero_and_one_equal_stepping(chunk_of_four, name, decay):
    """A huge ``dt`` makes ``A_bar`` 0; an ``A`` that underflows makes it 1 (a pure sum)."""
    import array_api_strict as xp

    rng = np.random.default_rng(7)
    config, weights = _weights(name, rng)
    if decay == "zero":
        weights["log_dt"] = np.full_like(weights["log_dt"], np.log(1e4))
    else:
        weights["A_log"] = np.full_like(weights["A_log"], -800.0)
    spec = ssm_core.LAYERS[name]
    params = spec.params_from_mapping({k: xp.asarray(v) for k, v in weights.items()})
    state = _state(name, config, (2,), rng, xp.asarray, "float64")
    xs = xp.asarray(rng.standard_normal((13, 2, N)))
    ys_loop, final_loop = _run(name, xs, state, params, "loop")
    ys, final = _run(name, xs, state, params, "chunked")
    assert np.isfinite(_host(ys)).all()
    assert rel_err(_host(ys), _host(ys_loop)) <= TOL["float64"]
    for a, b in zip(final, final_loop):
        assert rel_err(_host(a), _host(b)) <= TOL["float64"]


def test_decay_powers_are_kept_above_the_floor():
    import array_api_strict as xp

    decay = np.array([[0.0, 0.5, 0.9, 1.0], [0.99, 1e-30, 0.3, 0.7]])
    floor = 2.0**-341  # float64
    for count in (1, 2, 3, 17, 65, 129):
        for axis in (0, 1, -1):
            powers = np.moveaxis(np.asarray(lti._decay_powers(xp.asarray(decay), count, axis, xp)), axis, 1)
            exact = decay[:, None, :] ** np.arange(count)[None, :, None]
            assert powers.shape == (2, count, 4)
            above = exact >= floor
            assert np.max(np.abs(powers - exact)[above] / exact[above]) <= 1e-12
            assert np.all(np.abs(powers[~above] / floor - 1) <= 1e-12)  # the floor, never subnormal
    for n in (0, 1, 7, 100):
        power = np.asarray(lti._decay_power(xp.asarray(decay), n, xp))
        exact = np.maximum(decay**n, floor)
        assert np.max(np.abs(power - exact) / exact) <= 1e-12


# ----------------------------------------------------------------------------- choosing the form


@pytest.mark.parametrize("name", LAYERS)
def test_auto_steps_non_finite_sequences_and_rejects_unknown_methods(name):
    import array_api_strict as xp

    rng = np.random.default_rng(8)
    config, weights = _weights(name, rng)
    spec = ssm_core.LAYERS[name]
    params = spec.params_from_mapping({k: xp.asarray(v) for k, v in weights.items()})
    state = spec.zero_state(config, (2,), xp, xp.float64)
    raw = rng.standard_normal((70, 2, N))
    raw[62, 1, 3] = np.nan
    ys, _ = _run(name, xp.asarray(raw), state, params, "auto")
    ys = _host(ys)
    assert np.isfinite(ys[:62]).all() and np.isfinite(ys[:, 0]).all()  # earlier steps, other batch element
    with pytest.raises(ValueError, match="chunked"):
        _run(name, xp.asarray(raw), state, params, "fft")
    chunked_from = getattr(lti, f"{name}_CHUNKED_FROM")
    finite = xp.asarray(rng.standard_normal((chunked_from, 2, N)))
    assert lti._scan_method("auto", finite, xp, chunked_from) == "chunked"
    assert lti._scan_method("auto", finite[1:, ...], xp, chunked_from) == "loop"
    assert lti._scan_method("auto", xp.asarray(raw), xp, chunked_from) == "loop"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_check_finds_one_non_finite_element_among_huge_ones(bad):
    import array_api_strict as xp

    big = np.full((4, 3), np.finfo(np.float64).max / 2)
    assert lti._all_finite(xp.asarray(big), xp)
    big[2, 1] = bad
    assert not lti._all_finite(xp.asarray(big), xp)


# ----------------------------------------------------------------------------- torch: what autograd keeps, export


def _torch_case(name, T, batch, seed, d_state=D_STATE, num_neurons=N):
    rng = np.random.default_rng(seed)
    config, weights = _weights(name, rng, d_state=d_state, num_neurons=num_neurons)
    spec = ssm_core.LAYERS[name]
    params = spec.params_from_mapping({k: torch.from_numpy(v).requires_grad_() for k, v in weights.items()})
    shapes = {slot.name: batch + (slot.size,) + (() if slot.trailing is None else (slot.trailing,))
              for slot in config.state_slots()}
    state = spec.state(**{k: torch.from_numpy(rng.standard_normal(s)).requires_grad_() for k, s in shapes.items()})
    xs = torch.from_numpy(rng.standard_normal((T,) + batch + (num_neurons,))).requires_grad_()
    return spec, params, state, xs


@pytest.mark.parametrize("name", LAYERS)
def test_autograd_keeps_nothing_near_one_state_per_step(name):
    """What autograd keeps for the backward pass stays far below ``[T, ..., N, d]``."""
    import array_api_compat.torch as xp

    T, batch, d_state, features = 1024, (4,), 16, 8
    spec, params, state, xs = _torch_case(name, T, batch, seed=9, d_state=d_state, num_neurons=features)
    every_state = T * batch[0] * features * d_state
    kept = []

    def pack(t):
        kept.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys, final = spec.scan(xs, state, params, xp=xp, method="chunked")
    assert kept and max(kept) <= every_state // 4
    ys.sum().backward()
    assert xs.grad is not None and torch.isfinite(xs.grad).all()


@pytest.mark.parametrize("name", LAYERS)
def test_exported_sequence_form_takes_the_chunks(name):
    """torch.export captures the chunked scan (no branch on the data) and gives the eager numbers."""
    import tracetorch as tt

    torch.manual_seed(0)
    layer = getattr(tt.ssm, name)(N, d_state=D_STATE).double()
    xs = torch.randn(70, 2, N, dtype=torch.float64)
    states = layer.initial_states(xs, time_dim=0)
    program = torch.export.export(layer.stateless(time_dim=0), (xs, *states))
    ys, *finals = program.module()(xs, *states)
    layer.zero_states()
    expected = layer.scan(xs)
    assert rel_err(ys.detach().numpy(), expected.detach().numpy()) <= TOL["float64"]
    for final, name_ in zip(finals, layer.state_names):
        assert rel_err(final.detach().numpy(), getattr(layer, name_).detach().numpy()) <= TOL["float64"]
