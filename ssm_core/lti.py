"""S4 and S5: time-invariant diagonal state-space layers, one step at a time.

Layout: features last. ``x`` is ``[..., N]``; the S4 state is ``[..., N, d]``
(one ``d_state`` vector per feature), the S5 state ``[..., d]`` (one vector
shared by all features). The dynamics depend on parameters only, so they are
computed by ``*_discretize`` and may be kept across steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ._array import namespace, native_ops
from .checks import check_axis, check_int
from .discretize import zoh
from .scan import causal_conv_fft, decay_powers
from .init import Draws, log_uniform_log_dt, s4d_real_A_log
from .spec import LayerSpec, StateSlot

LTI_SCAN_METHODS = ("auto", "fft", "loop")
# Below this length the FFT's fixed cost is larger than T plain steps (measured on CPU).
FFT_MIN_STEPS = 32

__all__ = [
    "LTI_SCAN_METHODS",
    "S4Config", "S4Params", "S4State", "S4Dynamics", "s4_init", "s4_discretize", "s4_step_discrete", "s4_step", "s4_scan",
    "S5Config", "S5Params", "S5State", "S5Dynamics", "s5_init", "s5_discretize", "s5_step_discrete", "s5_step", "s5_scan",
    "S4", "S5",
]


# ----------------------------------------------------------------------------- S4


@dataclass(frozen=True)
class S4Config:
    """``S4(num_neurons, d_state=64, dim=-1)``, checked."""

    num_neurons: int
    d_state: int = 64
    dim: int = -1

    def __post_init__(self):
        check_int("S4", "num_neurons", self.num_neurons, 1)
        check_int("S4", "d_state", self.d_state, 1)
        check_axis("S4", "dim", self.dim)

    def param_shapes(self) -> dict:
        N, d = self.num_neurons, self.d_state
        return {"A_log": (N, d), "B": (N, d), "C": (N, d), "log_dt": (N,), "D": (N,)}

    def state_slots(self) -> tuple:
        return (StateSlot("state", self.num_neurons, self.d_state),)


class S4Params(NamedTuple):
    """S4 parameters: ``A = -exp(A_log)`` ``[N, d]``, ``B``, ``C`` ``[N, d]``, ``log_dt``, ``D`` ``[N]``."""

    A_log: Any
    B: Any
    C: Any
    log_dt: Any
    D: Any


class S4State(NamedTuple):
    """S4 hidden state: ``state`` ``[..., N, d]``."""

    state: Any


class S4Dynamics(NamedTuple):
    """S4's discretized system: ``A_bar``, ``B_bar``, ``C`` ``[N, d]`` and ``D`` ``[N]``."""

    A_bar: Any
    B_bar: Any
    C: Any
    D: Any


def s4_init(config: S4Config, draws: Draws) -> S4Params:
    """S4D-Real ``A``, ``B = 1``, ``C ~ N(0, 1)``, log-uniform ``dt``, ``D = 1``."""
    N, d = config.num_neurons, config.d_state
    xp, dtype = draws.xp, draws.dtype
    return S4Params(
        A_log=s4d_real_A_log(draws, (N, d)),
        B=xp.ones((N, d), dtype=dtype),
        C=draws.normal((N, d)),
        log_dt=log_uniform_log_dt(draws, (N,)),
        D=xp.ones((N,), dtype=dtype),
    )


def s4_discretize(params: S4Params, xp=None) -> S4Dynamics:
    """Zero-order hold of S4's parameters; depends on no input."""
    xp = namespace(params.A_log, xp=xp)
    dt = xp.exp(params.log_dt)[:, None]  # [N, 1]
    A = -xp.exp(params.A_log)  # [N, d]
    A_bar, gain = zoh(dt, A, xp)  # [N, d], [N, d]
    return S4Dynamics(A_bar, gain * params.B, params.C, params.D)


def s4_step_discrete(x, state: S4State, dynamics: S4Dynamics, xp=None):
    """One S4 step from precomputed dynamics; returns ``(y, new_state)``."""
    xp = namespace(x, xp=xp)
    muladd = native_ops(xp).muladd
    h = muladd(dynamics.A_bar, state.state, dynamics.B_bar * x[..., None], xp)  # [..., N, d]
    y = muladd(dynamics.D, x, xp.sum(h * dynamics.C, axis=-1), xp)  # [..., N]
    return y, S4State(h)


def s4_step(x, state: S4State, params: S4Params, xp=None):
    """One S4 step: ``h = A_bar h + B_bar x``, ``y = sum(C h) + D x``; returns ``(y, new_state)``."""
    xp = namespace(x, xp=xp)
    return s4_step_discrete(x, state, s4_discretize(params, xp), xp)


def _use_fft(method: str, xs, xp) -> bool:
    if method not in LTI_SCAN_METHODS:
        raise ValueError(f"scan: method must be one of {LTI_SCAN_METHODS}, got {method!r}")
    if method != "auto":
        return method == "fft"
    # A NaN or Inf would reach every output of its feature through the
    # transform, earlier steps too: such sequences step, which keeps them causal.
    return xs.shape[0] >= FFT_MIN_STEPS and bool(xp.all(xp.isfinite(xs)))


def _widen(xp, *arrays):
    """``arrays`` in float64."""
    return tuple(xp.astype(a, xp.float64, copy=False) for a in arrays)


def _step_loop(step_discrete, xs, state, dynamics, xp):
    ys = []
    for x in xp.unstack(xs, axis=0):  # not xs[t]: see linear_recurrence
        y, state = step_discrete(x, state, dynamics, xp)
        ys.append(y)
    return xp.stack(ys, axis=0), state


def s4_scan(xs, state: S4State, params: S4Params, xp=None, method: str = "auto"):
    """S4 over a whole sequence ``xs`` ``[T, ..., N]`` from ``state``; returns ``(ys, final_state)``.

    The same numbers as ``T`` calls of :func:`s4_step`. The system is
    time-invariant, so ``method="fft"`` computes the outputs as a causal
    convolution with the kernel ``K_j = sum(C * A_bar**j * B_bar)`` (FFT, no
    batch factor in the state work) plus the initial state's decay, and the
    final state as one contraction over time, all in float64 and rounded once
    to the input's dtype; ``"loop"`` steps; ``"auto"`` takes the FFT from
    ``FFT_MIN_STEPS`` steps on, for finite inputs (the transform would carry a
    NaN or Inf to earlier steps too).
    """
    xp = namespace(xs, xp=xp)
    T = xs.shape[0]
    if T == 0:
        return xs, state
    if not _use_fft(method, xs, xp):
        return _step_loop(s4_step_discrete, xs, state, s4_discretize(params, xp), xp)
    # The system that steps run (discretized in the input's dtype), computed
    # exactly in float64 (see causal_conv_fft) and rounded once at the end.
    dtype = xs.dtype
    A_bar, B_bar, C, D = _widen(xp, *s4_discretize(params, xp))  # [N, d] x3, [N]
    xs, h0 = _widen(xp, xs, state.state)  # [T, ..., N], [..., N, d]
    batch_ones = (1,) * (xs.ndim - 2)
    powers = decay_powers(A_bar, T, xp)  # [T+1, N, d]
    kernel = xp.sum(powers[:T, ...] * (C * B_bar), axis=-1)  # [T, N]
    kernel = xp.reshape(kernel, (T,) + batch_ones + (kernel.shape[-1],))  # [T, 1.., N]
    ys = causal_conv_fft(xs, kernel, xp) + D * xs  # [T, ..., N]
    # The initial state decays through the readout: sum_d C * A_bar**(t+1) * h0.
    from_h0 = (C * h0)[..., None, :] @ xp.permute_dims(powers[1:, ...], (1, 2, 0))  # [..., N, 1, T]
    ys = ys + xp.moveaxis(from_h0[..., 0, :], -1, 0)  # [T, ..., N]
    # h_T = A_bar**T h0 + sum_s A_bar**(T-1-s) B_bar x_s: one contraction over time.
    weights = xp.permute_dims(xp.flip(powers[:T, ...], axis=0) * B_bar, (1, 0, 2))  # [N, T, d]
    driven = xp.moveaxis(xs, 0, -1)[..., None, :] @ weights  # [..., N, 1, d]
    h = powers[T, ...] * h0 + driven[..., 0, :]  # [..., N, d]
    return xp.astype(ys, dtype), S4State(xp.astype(h, dtype))


def _s4_step_prepared(x, state, params, dynamics, xp):
    return s4_step_discrete(x, state, dynamics, xp)


S4 = LayerSpec(
    name="S4",
    config=S4Config,
    params=S4Params,
    state=S4State,
    param_keys=("A_log", "B", "C", "log_dt", "D"),
    init=s4_init,
    step=s4_step,
    scan=s4_scan,
    prepare=s4_discretize,
    step_prepared=_s4_step_prepared,
    dynamics=S4Dynamics,
)


# ----------------------------------------------------------------------------- S5


@dataclass(frozen=True)
class S5Config:
    """``S5(num_neurons, d_state=64, dim=-1)``, checked."""

    num_neurons: int
    d_state: int = 64
    dim: int = -1

    def __post_init__(self):
        check_int("S5", "num_neurons", self.num_neurons, 1)
        check_int("S5", "d_state", self.d_state, 1)
        check_axis("S5", "dim", self.dim)

    def param_shapes(self) -> dict:
        N, d = self.num_neurons, self.d_state
        return {"A_log": (d,), "B": (N, d), "C": (d, N), "D": (N,), "log_dt": (1,)}

    def state_slots(self) -> tuple:
        return (StateSlot("global_state", self.d_state, None),)


class S5Params(NamedTuple):
    """S5 parameters: ``A_log`` ``[d]``, ``B`` ``[N, d]``, ``C`` ``[d, N]``, ``D`` ``[N]``, ``log_dt`` ``[1]``."""

    A_log: Any
    B: Any
    C: Any
    D: Any
    log_dt: Any


class S5State(NamedTuple):
    """S5 hidden state: ``global_state`` ``[..., d]``, shared by all features."""

    global_state: Any


class S5Dynamics(NamedTuple):
    """S5's discretized system: ``A_bar`` ``[d]``, ``B_bar`` ``[N, d]``, ``C`` ``[d, N]``, ``D`` ``[N]``."""

    A_bar: Any
    B_bar: Any
    C: Any
    D: Any


def s5_init(config: S5Config, draws: Draws) -> S5Params:
    """S4D-Real ``A``, ``B ~ N(0, 1/N)``, ``C ~ N(0, 1/d)``, ``D = 1``, one log-uniform ``dt``."""
    N, d = config.num_neurons, config.d_state
    return S5Params(
        A_log=s4d_real_A_log(draws, (d,)),
        B=draws.normal((N, d)) * (1.0 / N) ** 0.5,
        C=draws.normal((d, N)) * (1.0 / d) ** 0.5,
        D=draws.xp.ones((N,), dtype=draws.dtype),
        log_dt=log_uniform_log_dt(draws, (1,)),
    )


def s5_discretize(params: S5Params, xp=None) -> S5Dynamics:
    """Zero-order hold of S5's parameters; depends on no input."""
    xp = namespace(params.A_log, xp=xp)
    dt = xp.exp(params.log_dt)  # [1]
    A = -xp.exp(params.A_log)  # [d]
    A_bar, gain = zoh(dt, A, xp)  # [d], [d]
    return S5Dynamics(A_bar, params.B * gain, params.C, params.D)


def s5_step_discrete(x, state: S5State, dynamics: S5Dynamics, xp=None):
    """One S5 step from precomputed dynamics; returns ``(y, new_state)``."""
    xp = namespace(x, xp=xp)
    muladd = native_ops(xp).muladd
    g = muladd(dynamics.A_bar, state.global_state, x @ dynamics.B_bar, xp)  # [..., d]
    y = muladd(dynamics.D, x, g @ dynamics.C, xp)  # [..., N]
    return y, S5State(g)


def s5_step(x, state: S5State, params: S5Params, xp=None):
    """One S5 step: ``g = A_bar g + B_bar^T x``, ``y = C^T g + D x``; returns ``(y, new_state)``."""
    xp = namespace(x, xp=xp)
    return s5_step_discrete(x, state, s5_discretize(params, xp), xp)


def s5_scan(xs, state: S5State, params: S5Params, xp=None, method: str = "auto"):
    """S5 over a whole sequence ``xs`` ``[T, ..., N]`` from ``state``; returns ``(ys, final_state)``.

    The same numbers as ``T`` calls of :func:`s5_step`. ``method="fft"``
    projects all inputs at once (``u = xs @ B_bar``), gets every state as the
    causal convolution of ``u`` with the decays ``A_bar**j`` plus the initial
    state's decay, and reads out with one matrix product (in float64, rounded
    once to the input's dtype); ``"loop"`` steps.
    """
    xp = namespace(xs, xp=xp)
    T = xs.shape[0]
    if T == 0:
        return xs, state
    if not _use_fft(method, xs, xp):
        return _step_loop(s5_step_discrete, xs, state, s5_discretize(params, xp), xp)
    dtype = xs.dtype
    A_bar, B_bar, C, D = _widen(xp, *s5_discretize(params, xp))  # [d], [N, d], [d, N], [N]
    xs, g0 = _widen(xp, xs, state.global_state)  # [T, ..., N], [..., d]
    batch_ones = (1,) * (xs.ndim - 2)
    powers = decay_powers(A_bar, T, xp)  # [T+1, d]
    powers = xp.reshape(powers, (T + 1,) + batch_ones + (powers.shape[-1],))  # [T+1, 1.., d]
    u = xs @ B_bar  # [T, ..., d]
    g = causal_conv_fft(u, powers[:T, ...], xp) + powers[1:, ...] * g0  # [T, ..., d]
    ys = g @ C + D * xs  # [T, ..., N]
    return xp.astype(ys, dtype), S5State(xp.astype(g[-1, ...], dtype))


def _s5_step_prepared(x, state, params, dynamics, xp):
    return s5_step_discrete(x, state, dynamics, xp)


S5 = LayerSpec(
    name="S5",
    config=S5Config,
    params=S5Params,
    state=S5State,
    param_keys=("A_log", "B", "C", "D", "log_dt"),
    init=s5_init,
    step=s5_step,
    scan=s5_scan,
    prepare=s5_discretize,
    step_prepared=_s5_step_prepared,
    dynamics=S5Dynamics,
)
