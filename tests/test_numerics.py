"""Numerics: the zero-order hold, extreme weights, half precision, non-finite input, long runs.

- ``ssm_core.zoh``/``phi1`` on every array library: the gain ``expm1(dt A) / A``
  to a few ulp for ``|dt A|`` from 1e-12 to 1e2 (no cancellation), finite and
  equal to ``dt`` where ``A`` underflows to zero, ``A`` kept in float16;
- the layers of every binding against the float64 ``numpy_oracle`` at extreme
  ``dt`` and ``A_log``, with ``A`` underflowed, and in half precision (states
  in float32), stepping and scanning;
- NaN/Inf inputs propagate forward in time within their batch element, never
  hidden, never backwards (also through the chunked scan);
- a long float32 scan stays within float32 drift of float64 (100,000 steps
  with a large ``dt``, finite and equal to stepping: ``test_scan_equals_step.py``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import numpy_oracle
import ssm_core
from ssm_core.discretize import zoh_terms
from conftest import D_STATE, N, ONE_OF_EACH, make_layer, random_weights, rel_err

# ----------------------------------------------------------------------------- the zero-order hold


def _zoh_truth(dt: np.ndarray, A: np.ndarray):
    """``(exp(dt A), expm1(dt A) / A)`` of the exact float values, to well below a float64 ulp."""
    if dt.dtype == np.float32:  # a float32 product is exact in float64
        z = dt.astype(np.float64) * A.astype(np.float64)
        return np.exp(z), np.array([math.expm1(v) for v in z]) / A.astype(np.float64)
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    gains, decays = [], []
    for d, a in zip(dt.tolist(), A.tolist()):
        z = mpmath.mpf(d) * mpmath.mpf(a)
        gains.append(float(mpmath.expm1(z) / mpmath.mpf(a)))
        decays.append(float(mpmath.exp(z)))
    return np.array(decays), np.array(gains)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zoh_gain_has_no_cancellation_for_tiny_dt_A(binding, dtype):
    """``gain = expm1(dt A) / A`` to a few ulp for ``|dt A|`` from 1e-12 to 1e2 (``(exp(dt A) - 1) / A`` is not)."""
    b, eps = binding, np.finfo(dtype).eps
    rng = np.random.default_rng(0)
    mags = np.logspace(-12, 2, 71)
    A = -np.exp(rng.uniform(-3.0, 3.0, mags.size)).astype(dtype)
    dt = (mags / -A.astype(np.float64)).astype(dtype)
    decay_true, gain_true = _zoh_truth(dt, A)
    A_bar, gain = ssm_core.zoh(b.asarray(dt), b.asarray(A))
    gain, A_bar = b.to_numpy(gain).astype(np.float64), b.to_numpy(A_bar).astype(np.float64)
    ulps = np.abs(gain - gain_true) / np.abs(gain_true) / eps
    assert ulps.max() <= 4.0, f"gain off by {ulps.max():.1f} ulp at dt*A = {-mags[ulps.argmax()]:.1e}"
    assert np.abs(A_bar - decay_true).max() <= 2 * eps  # A_bar in (0, 1]
    # The test tells the cancelling formula apart.
    naive = (np.exp(dt * A) - 1) / A
    assert (np.abs(naive - gain_true) / np.abs(gain_true) / eps).max() > 1e3


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("binding", ["numpy", "torch", "array_api_strict"], indirect=True)
def test_phi1_accuracy_and_limits(binding, dtype):
    b, eps = binding, np.finfo(dtype).eps
    z = np.concatenate([-np.logspace(-12, 2, 57), np.logspace(-12, 1, 27)]).astype(dtype)
    truth = _zoh_truth(z, np.ones_like(z))[1] / z.astype(np.float64)  # expm1(z) / z
    got = b.to_numpy(ssm_core.phi1(b.asarray(z))).astype(np.float64)
    assert (np.abs(got - truth) / truth / eps).max() <= 4.0
    limits = b.to_numpy(ssm_core.phi1(b.asarray(np.array([0.0, -0.0, -np.inf], dtype))))
    np.testing.assert_array_equal(limits, [1.0, 1.0, 0.0])


@pytest.mark.parametrize("binding", ["numpy", "torch"], indirect=True)
def test_zoh_float16_keeps_A(binding):
    """``zoh`` on float16 arrays: the gain to a few float16 ulp, and ``A_bar == 1`` where ``A`` underflowed.

    ``decay_rates`` moves ``A`` ``sqrt(smallest normal)`` away from zero so
    ``1/A`` stays finite; that is about 1e-19 in float32 but 7.8e-3 in float16,
    which changes an ``A`` of -0.01 to -0.018.
    """
    b, eps = binding, float(np.finfo(np.float16).eps)
    A = np.array([-0.01, -0.05, -0.1, -0.5, -1.0, -4.0] * 3, np.float16)
    dt = np.array([1.0] * 6 + [10.0] * 6 + [100.0] * 6, np.float16)
    gain_true = np.array([math.expm1(float(d) * float(a)) / float(a) for d, a in zip(dt, A)])
    A_bar, gain = ssm_core.zoh(b.asarray(dt), b.asarray(A))
    err = np.abs(b.to_numpy(gain).astype(np.float64) - gain_true) / np.abs(gain_true) / eps
    problems = [f"gain off by {err.max():.0f} float16 ulp (dt={float(dt[err.argmax()])}, A={float(A[err.argmax()])})"] \
        if err.max() > 4 else []
    A_bar0, gain0 = ssm_core.zoh(b.asarray(np.array([0.5, 2.0], np.float16)), b.asarray(np.array([-0.0, -0.0], np.float16)))
    if not np.array_equal(b.to_numpy(A_bar0).astype(np.float64), [1.0, 1.0]):
        problems.append(f"A = -0 decays: A_bar = {b.to_numpy(A_bar0)}")
    if np.abs(b.to_numpy(gain0).astype(np.float64) - [0.5, 2.0]).max() > 2 * eps * 2.0:
        problems.append(f"A = -0: gain {b.to_numpy(gain0)} != dt [0.5, 2.0]")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zoh_with_A_underflowed_to_zero_is_an_integrator(binding, dtype):
    """``A = -exp(-1000) == -0``: ``A_bar == 1`` and ``gain == dt`` (the cancelling formula gives 0/0)."""
    b, eps = binding, np.finfo(dtype).eps
    dt = np.array([1e-6, 1e-3, 0.5, 1.0, 7.0, 1e3], dtype)
    A = -np.exp(np.full(dt.shape, -1000.0)).astype(dtype)
    assert (A == 0).all()
    with np.errstate(invalid="ignore"):
        assert np.isnan(numpy_oracle.zoh(dt.astype(np.float64), A.astype(np.float64))[1]).all()  # naive: 0/0
    A_bar, gain = ssm_core.zoh(b.asarray(dt), b.asarray(A))
    A_bar, gain = b.to_numpy(A_bar).astype(np.float64), b.to_numpy(gain).astype(np.float64)
    np.testing.assert_array_equal(A_bar, 1.0)
    assert np.isfinite(gain).all()
    assert (np.abs(gain - dt) / dt).max() <= 2 * eps


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_layer_takes_A_from_A_log_by_one_rule(binding, dtype):
    """S4, S5 and S6/Mamba make ``(A, 1/A)`` from ``A_log`` alike: ``-exp(A_log)``, kept off zero.

    Where ``exp(A_log)`` underflows, ``A`` is a tiny negative floor and ``1/A``
    finite; elsewhere ``A == -exp(A_log)``. S4's and S5's dynamics are the
    zero-order hold of that ``A``, bit for bit.
    """
    b = binding
    A_log = b.asarray(np.array([[-1000.0, -20.0, 0.0, 1.0, 3.0, 5.0]] * 2, dtype))
    xp = ssm_core.namespace(A_log)
    A, inv_A = ssm_core.decay_rates_from_log(A_log)
    A_np, inv_np = b.to_numpy(A), b.to_numpy(inv_A)
    assert (A_np < 0).all() and np.isfinite(inv_np).all()
    np.testing.assert_array_equal(A_np[:, 1:], b.to_numpy(-xp.exp(A_log))[:, 1:])
    A6, inv6 = ssm_core.selective_decay(A_log)  # S6 and Mamba
    np.testing.assert_array_equal(b.to_numpy(A6), A_np)
    np.testing.assert_array_equal(b.to_numpy(inv6), inv_np)
    B = np.random.default_rng(0).standard_normal((2, 6)).astype(dtype)
    log_dt, ones = b.asarray(np.array([-3.0, -1.0], dtype)), b.asarray(np.ones(2, dtype))
    s4 = ssm_core.s4_discretize(ssm_core.S4Params(A_log, b.asarray(B), b.asarray(B), log_dt, ones))
    # S4 and S5 use A once per call: their gain divides by it, where S6/Mamba keep 1/A for every step of a block.
    A_bar, gain = zoh_terms(xp.exp(log_dt)[:, None] * A, None, xp, A=A)
    np.testing.assert_array_equal(b.to_numpy(s4.A_bar), b.to_numpy(A_bar))
    np.testing.assert_array_equal(b.to_numpy(s4.B_bar), b.to_numpy(gain) * B)
    s5 = ssm_core.s5_discretize(ssm_core.S5Params(A_log[0, ...], b.asarray(B), b.asarray(B.T), ones, log_dt[:1]))
    A_bar, gain = zoh_terms(xp.exp(log_dt[:1]) * A[0, ...], None, xp, A=A[0, ...])
    np.testing.assert_array_equal(b.to_numpy(s5.A_bar), b.to_numpy(A_bar))
    np.testing.assert_array_equal(b.to_numpy(s5.B_bar), B * b.to_numpy(gain))


@pytest.mark.parametrize("binding", ["numpy", "torch"], indirect=True)
def test_in_compute_dtype_lifts_half_precision_parameters_only(binding):
    """Half-precision parameters come back in float32; others as they are (the same arrays); absent ones None."""
    b = binding
    xp = ssm_core.namespace(b.asarray(np.zeros(1)))
    half = ssm_core.S6Params(*(b.asarray(np.full((2, 3), 0.1, np.float16)) for _ in range(4)), None)
    params, dtype = ssm_core.layout.in_compute_dtype(half, xp)
    assert dtype == xp.float32
    assert all(p.dtype == xp.float32 for p in params[:4]) and params[4] is None
    np.testing.assert_array_equal(b.to_numpy(params[0]), np.full((2, 3), 0.1, np.float16).astype(np.float32))
    single = ssm_core.S6Params(*(b.asarray(np.zeros((2, 3), np.float32)) for _ in range(5)))
    params, dtype = ssm_core.layout.in_compute_dtype(single, xp)
    assert dtype == xp.float32 and all(p is q for p, q in zip(params, single))


# ----------------------------------------------------------------------------- the layers against the oracle


# Half precision: the layer computes in float32 from the same rounded weights and inputs as the
# oracle, so its outputs differ by their rounding to the half dtype, half an ulp (eps / 2): the
# bound is twice that, one eps (measured: 3.6e-4 float16, 3.2e-3 bfloat16).
TOL = {"float64": 1e-12, "float32": 2e-6, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def _compare_to_oracle(b, layer, name, kwargs, dtype, xs64, oracle_weights=None, state_dtype=None):
    """Problems of ``layer``'s outputs and states (stepped and scanned) against the float64 oracle.

    The oracle gets the layer's own (rounded) weights unless ``oracle_weights``,
    and ``xs64`` rounded to ``dtype``.
    """
    if dtype == "bfloat16":
        xs = torch.from_numpy(xs64).to(torch.bfloat16).double().numpy()
    else:
        xs = xs64.astype(dtype).astype(np.float64)
    weights = {k: v.astype(np.float64) for k, v in b.params(layer).items()} if oracle_weights is None else oracle_weights
    ref, ref_states = numpy_oracle.run(name, kwargs, weights, xs)
    problems = []
    stepped = np.stack([b.to_numpy(b.step(layer, b.asarray(x, dtype))) for x in xs])
    runs = {"step": (stepped, b.states(layer))}
    b.zero_states(layer)
    runs["scan"] = (b.to_numpy(b.scan(layer, b.asarray(xs, dtype))), b.states(layer))
    for how, (ys, states) in runs.items():
        if not np.isfinite(ys).all():
            problems.append(f"{how}: non-finite outputs")
        err = rel_err(ys, ref)
        if not err <= TOL[dtype]:
            problems.append(f"{how}: outputs off the float64 oracle by {err:.2e}")
        for key, value in states.items():
            if state_dtype is not None and b.dtype_name(value) != state_dtype:
                problems.append(f"{how}: state {key} has dtype {value.dtype}, expected {state_dtype}")
            host = b.to_numpy(value)
            if not np.isfinite(host).all():
                problems.append(f"{how}: non-finite state {key}")
            err = rel_err(host, ref_states[key])
            if not err <= TOL[dtype]:
                problems.append(f"{how}: state {key} off the float64 oracle by {err:.2e}")
    return problems


UNDERFLOW_CASES = [
    ("torch", "float64"), ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
    ("numpy", "float64"), ("numpy", "float32"), ("numpy", "float16"),
    ("mlx", "float32"), ("array_api_strict", "float32"),
]


@pytest.mark.parametrize("case", ONE_OF_EACH)
@pytest.mark.parametrize("binding,dtype", UNDERFLOW_CASES, ids=[f"{b}-{d}" for b, d in UNDERFLOW_CASES],
                         indirect=["binding"])
def test_A_underflowing_to_zero_gives_gain_dt_in_the_layers(binding, dtype, case):
    """``A_log = -1000`` (``A == -0`` in every dtype): finite outputs and states equal to the limit ``gain = dt``.

    The float64 oracle computes ``expm1(dt A) / A``, 0/0 at ``A == 0``; its
    ``A_log = -700`` (``A`` about 1e-304, not underflowed) is the same system
    to rounding, ``A_bar = 1`` and ``gain = dt``.
    """
    b, (_, name, kwargs) = binding, case
    weights = random_weights(name, kwargs, seed=4)
    weights["A_log"] = np.full_like(weights["A_log"], -1000.0)
    layer = b.make(name, kwargs, dtype, weights)
    limit = {k: v.astype(np.float64) for k, v in b.params(layer).items()}
    limit["A_log"] = np.full_like(limit["A_log"], -700.0)
    xs = np.random.default_rng(5).standard_normal((5, 2, N))
    state_dtype = "float64" if dtype == "float64" else "float32"
    problems = _compare_to_oracle(b, layer, name, kwargs, dtype, xs, oracle_weights=limit, state_dtype=state_dtype)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["S4", "S5"])
def test_integrator_states_when_A_underflows(binding, name):
    """``A = -exp(-800) == -0``: the hold is an integrator, the state ``dt B`` times the sum of the inputs."""
    b = binding
    kwargs = dict(num_neurons=N, d_state=D_STATE)
    weights = random_weights(name, kwargs)
    weights["A_log"] = np.full_like(weights["A_log"], -800.0)
    layer = b.make(name, kwargs, "float64", weights)
    xs = np.random.default_rng(0).standard_normal((3, 2, N))
    assert np.isfinite(b.steps(layer, xs)).all()
    dt = np.exp(weights["log_dt"])
    if name == "S4":
        assert rel_err(b.to_numpy(layer.state), dt[:, None] * weights["B"] * xs.sum(0)[..., None]) <= 1e-13
    else:
        assert rel_err(b.to_numpy(layer.global_state), dt * (xs.sum(0) @ weights["B"])) <= 1e-13


@pytest.mark.parametrize("log_dt", [-30.0, 40.0], ids=["tiny-dt", "huge-dt"])
def test_zoh_accuracy_at_extreme_dt(binding, log_dt):
    """S4's state after one step: ``gain B x`` with the gain from a series (tiny ``dt``) or ``-1/A`` (huge)."""
    b = binding
    kwargs = dict(num_neurons=N, d_state=D_STATE)
    weights = random_weights("S4", kwargs)
    weights["log_dt"] = np.full_like(weights["log_dt"], log_dt)
    layer = b.make("S4", kwargs, "float64", weights)
    x = np.random.default_rng(0).standard_normal((2, N))
    b.step(layer, b.asarray(x))
    A = -np.exp(weights["A_log"])
    dt = math.exp(log_dt)
    z = dt * A
    gain = dt * (1 + z / 2 + z * z / 6) if log_dt < 0 else -1.0 / A  # expm1(z)/z exact to rounding; exp(dt*A) == 0
    state = b.to_numpy(layer.state)
    assert np.isfinite(state).all()
    assert rel_err(state, gain * weights["B"] * x[..., None]) <= 1e-14


EXTREMES = {
    "huge-dt": {"log_dt": 50.0, "dt_proj.bias": 1e4},
    "tiny-dt": {"log_dt": -50.0, "dt_proj.bias": -1e4},
    "A_log+50": {"A_log": 50.0},
    "A_log-50": {"A_log": -50.0},
    "huge-dt-and-A": {"log_dt": 50.0, "dt_proj.bias": 1e4, "A_log": 50.0},
}


def _extreme_weights(name, kwargs, case):
    weights = random_weights(name, kwargs, seed=7)
    weights.update({k: np.full_like(weights[k], v) for k, v in EXTREMES[case].items() if k in weights})
    return weights


def test_oracle_is_sound_at_the_extremes():
    """What the float64 oracle does at the extremes the layers are compared at: finite, no 0/0."""
    xs = np.random.default_rng(6).standard_normal((5, 2, N))
    for _, name, kwargs in (p.values[0] for p in ONE_OF_EACH):
        for case in EXTREMES:
            ys, states = numpy_oracle.run(name, kwargs, _extreme_weights(name, kwargs, case), xs)
            assert np.isfinite(ys).all(), (name, case)
            assert all(np.isfinite(s).all() for s in states.values()), (name, case)
    # S6's tiny dt is softplus(-1e4) == 0: the state stays zero and y = D x.
    kwargs = dict(num_neurons=N, d_state=D_STATE, dt_rank=2)
    weights = _extreme_weights("S6", kwargs, "tiny-dt")
    ys, states = numpy_oracle.run("S6", kwargs, weights, xs)
    assert not states["state"].any()
    np.testing.assert_allclose(ys, xs * weights["D"], rtol=1e-15)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # float32 dt*A -> -inf, as it should
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("extreme", list(EXTREMES))
@pytest.mark.parametrize("case", ONE_OF_EACH)
def test_extreme_dt_and_A_log_match_the_float64_oracle(binding, case, extreme, dtype):
    """Outputs and states (which a cancelling gain gets wrong for tiny ``dt``) equal the float64 oracle."""
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs, dtype, _extreme_weights(name, kwargs, extreme))
    xs = np.random.default_rng(6).standard_normal((5, 2, N))
    problems = _compare_to_oracle(b, layer, name, kwargs, dtype, xs, state_dtype=dtype)
    assert not problems, "\n".join(problems)


HALF_CASES = [("torch", "float16"), ("torch", "bfloat16"), ("numpy", "float16"), ("mlx", "float16"), ("mlx", "bfloat16")]


@pytest.mark.parametrize("case", ONE_OF_EACH)
@pytest.mark.parametrize("binding,dtype", HALF_CASES, ids=[f"{b}-{d}" for b, d in HALF_CASES], indirect=["binding"])
def test_half_precision_layers_match_float64_with_the_same_rounded_weights(binding, dtype, case):
    """Outputs in the input's half dtype within one half-precision eps of float64; states kept in float32."""
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs, dtype, random_weights(name, kwargs, seed=8))
    xs = np.random.default_rng(9).standard_normal((6, 2, N))
    assert b.dtype_name(b.step(layer, b.asarray(xs[0], dtype))) == dtype
    b.zero_states(layer)
    problems = _compare_to_oracle(b, layer, name, kwargs, dtype, xs, state_dtype="float32")
    assert not problems, "\n".join(problems)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy's silu: exp(-x) -> inf, y -> -0
@pytest.mark.parametrize("name", ["S6", "Mamba"])
def test_selective_layers_finite_for_large_inputs(binding, name):
    b = binding
    layer = b.make(name, dict(num_neurons=N, d_state=D_STATE), "float64")
    assert np.isfinite(b.steps(layer, 1e3 * np.random.default_rng(0).standard_normal((5, 2, N)))).all()
    for value in b.states(layer).values():
        assert np.isfinite(b.to_numpy(value)).all()


# ----------------------------------------------------------------------------- non-finite input


NON_FINITE = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def _non_finite_problems(ys, t0, bad, label):
    """Problems with how a non-finite input at ``[t0, 1, 2]`` shows in outputs ``ys`` ``[T, 3, N]``."""
    problems = []
    fin = np.isfinite(ys)
    if not fin[:t0].all():
        problems.append(f"{label}: outputs before step {t0} (before the bad input) are not finite")
    if np.isfinite(ys[t0, 1, 2]):
        problems.append(f"{label}: the output at the bad input is finite ({ys[t0, 1, 2]})")
    if np.isnan(bad) and not np.isnan(ys[t0, 1, 2]):
        problems.append(f"{label}: a NaN input gives {ys[t0, 1, 2]}, not NaN")
    if not (~fin[t0:, 1]).any(axis=-1).all():
        problems.append(f"{label}: the non-finite value vanished from later outputs (hidden in the state)")
    if not fin[:, [0, 2]].all():
        problems.append(f"{label}: the non-finite value reached another batch element")
    return problems


def _with_non_finite(steps, t0, bad, dtype, seed):
    xs = np.random.default_rng(seed).standard_normal((steps, 3, N)).astype(dtype)
    xs[t0, 1, 2] = NON_FINITE[bad]
    return xs


@pytest.mark.parametrize("bad", list(NON_FINITE))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ONE_OF_EACH)
def test_nan_and_inf_inputs_propagate(binding, case, dtype, bad):
    """NaN/Inf inputs are not hidden: they propagate as NaN/Inf, forward in time, within their batch element.

    Documented behaviour: the layers do not check values. A NaN input gives a
    NaN output at that step; an Inf input a non-finite output (Inf, or NaN
    where Inf meets Inf of the other sign or a zero). The value enters the
    state, so every later output of that batch element stays non-finite until
    ``zero_states()`` (or ``load_states``); earlier steps and the other batch
    elements are untouched. Stepping and ``scan`` agree.
    """
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs, dtype=dtype)
    t0 = 2
    xs = _with_non_finite(6, t0, bad, dtype, seed=10)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        stepped = b.steps(layer, xs)
        states = b.host_states(layer)
        b.zero_states(layer)
        scanned = b.to_numpy(b.scan(layer, b.asarray(xs)))
    problems = _non_finite_problems(stepped, t0, NON_FINITE[bad], "step")
    problems += _non_finite_problems(scanned, t0, NON_FINITE[bad], "scan")
    problems += [f"state {key} is finite after a non-finite input" for key, v in states.items() if np.isfinite(v).all()]
    np.testing.assert_array_equal(np.isfinite(stepped), np.isfinite(scanned))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("case", ONE_OF_EACH)
def test_non_finite_input_in_a_long_scan_does_not_reach_earlier_steps(binding, case, bad):
    """A sequence long enough for S4/S5's chunked scan: still causal, as stepping is."""
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs, dtype="float64")
    t0 = 50
    xs = _with_non_finite(64, t0, bad, "float64", seed=11)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        scanned = b.to_numpy(b.scan(layer, b.asarray(xs)))
    problems = _non_finite_problems(scanned, t0, NON_FINITE[bad], "scan")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- long runs


LONG = [("S4", {"d_state": 5}), ("S5", {"d_state": 6}), ("S6", {"d_state": 4}), ("Mamba", {"d_state": 4})]
LONG_N = 8


@pytest.mark.parametrize(("name", "kwargs"), LONG, ids=[n for n, _ in LONG])
def test_long_float32_scan_stays_within_float32_drift_of_float64(name, kwargs):
    kwargs = {"num_neurons": LONG_N, **kwargs}
    weights = random_weights(name, kwargs, seed=4)
    layer64 = make_layer(name, kwargs, perturb=False)
    layer64.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    layer32 = make_layer(name, kwargs, dtype=torch.float32, perturb=False)
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    xs = torch.from_numpy(np.random.default_rng(4).standard_normal((100_000, 1, LONG_N)))
    with torch.no_grad():
        ys64 = layer64.scan(xs)
        ys32 = layer32.scan(xs.float())
    assert torch.isfinite(ys32).all()
    assert rel_err(ys32, ys64) <= 1e-4

