"""S4 and S5: time-invariant diagonal state-space layers, one step at a time.

Layout: features last. ``x`` is ``[..., N]``; the S4 state is ``[..., N, d]``
(one ``d_state`` vector per feature), the S5 state ``[..., d]`` (one vector
shared by all features). The dynamics depend on parameters only, so they are
computed by ``*_discretize`` and may be kept across steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ._array import muladd, namespace
from .checks import check_axis, check_int
from .discretize import zoh
from .scan import _log_decay, causal_conv_fft, contiguous, decay_powers
from .init import Draws, log_uniform_log_dt, s4d_real_A_log
from .spec import LayerSpec, StateSlot, params_to_mapping, params_type

LTI_SCAN_METHODS = ("auto", "fft", "loop")
# Below this length the FFT's fixed cost is larger than T plain steps (measured on CPU).
FFT_MIN_STEPS = 32

__all__ = [
    "LTI_SCAN_METHODS",
    "S4Config", "S4Params", "S4State", "S4Dynamics", "s4_init", "s4_discretize", "s4_step", "s4_scan",
    "S5Config", "S5Params", "S5State", "S5Dynamics", "s5_init", "s5_discretize", "s5_step", "s5_scan",
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
        """``{state_dict key: shape}`` of the layer's parameters."""
        N, d = self.num_neurons, self.d_state
        return params_to_mapping(S4Params(A_log=(N, d), B=(N, d), C=(N, d), log_dt=(N,), D=(N,)))

    def state_slots(self) -> tuple:
        """The layer's hidden states (:class:`~ssm_core.spec.StateSlot` records)."""
        return (StateSlot("state", self.num_neurons, self.d_state),)


S4Params = params_type(
    "S4Params", __name__, ("A_log", "B", "C", "log_dt", "D"),
    """S4 parameters: ``A = -exp(A_log)`` ``[N, d]``, ``B``, ``C`` ``[N, d]``, ``log_dt``, ``D`` ``[N]``.""",
)


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
    h = muladd(dynamics.A_bar, state.state, dynamics.B_bar * x[..., None], xp)  # [..., N, d]
    y = muladd(dynamics.D, x, xp.sum(h * dynamics.C, axis=-1), xp)  # [..., N]
    return y, S4State(h)


def s4_step(x, state: S4State, params: S4Params, xp=None, prepared: S4Dynamics | None = None):
    """One S4 step: ``h = A_bar h + B_bar x``, ``y = sum(C h) + D x``; returns ``(y, new_state)``.

    ``prepared``: ``s4_discretize(params)`` when the caller keeps it across steps.
    """
    xp = namespace(x, xp=xp)
    return s4_step_discrete(x, state, s4_discretize(params, xp) if prepared is None else prepared, xp)


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


def _lti_scan(xs, state, params, xp, method, prepared, discretize, step_discrete, fft_scan):
    """The scan of a time-invariant layer: steps, or the convolution form (see ``_use_fft``)."""
    xp = namespace(xs, xp=xp)
    if xs.shape[0] == 0:
        return xs, state
    dynamics = discretize(params, xp) if prepared is None else prepared
    if not _use_fft(method, xs, xp):
        return _step_loop(step_discrete, xs, state, dynamics, xp)
    return fft_scan(xs, state, dynamics, xp)


def _step_loop(step_discrete, xs, state, dynamics, xp):
    ys = []
    for x in xp.unstack(xs, axis=0):  # not xs[t]: see linear_recurrence
        y, state = step_discrete(x, state, dynamics, xp)
        ys.append(y)
    return xp.stack(ys, axis=0), state


def s4_scan(xs, state: S4State, params: S4Params, xp=None, method: str = "auto", prepared: S4Dynamics | None = None):
    """S4 over a whole sequence ``xs`` ``[T, ..., N]`` from ``state``; returns ``(ys, final_state)``.

    The same numbers as ``T`` calls of :func:`s4_step`. The system is
    time-invariant, so ``method="fft"`` computes the outputs as a causal
    convolution with the kernel ``K_j = sum(C * A_bar**j * B_bar)`` (FFT, no
    batch factor in the state work, the convolution in float64) plus the
    initial state's decay, and the final state as one contraction over time;
    ``"loop"`` steps; ``"auto"`` takes the FFT from
    ``FFT_MIN_STEPS`` steps on, for finite inputs (the transform would carry a
    NaN or Inf to earlier steps too). ``prepared`` as in :func:`s4_step`.
    """
    return _lti_scan(xs, state, params, xp, method, prepared, s4_discretize, s4_step_discrete, _s4_fft_scan)


# Decay powers are made this many steps at a time: [chunk, N, d] at once, never [T, N, d].
POWER_CHUNK = 128


def _s4_fft_scan(xs, state: S4State, dynamics: S4Dynamics, xp):
    """S4 over ``xs`` ``[T, ..., N]`` from ``state`` through the convolution form.

    The system is the one steps run (discretized in the input's dtype). The
    decays ``A_bar**j`` are made a chunk at a time, and every contraction is a
    matrix product batched over features; only the convolution is widened to
    float64 (see :func:`causal_conv_fft`).
    """
    A_bar, B_bar, C, D = dynamics  # [N, d] x3, [N]
    T, N, d = xs.shape[0], xs.shape[-1], A_bar.shape[-1]
    batch = tuple(xs.shape[1:-1])
    M = 1
    for size in batch:
        M *= size
    x_by_feature = contiguous(xp.permute_dims(xp.reshape(xs, (T, M, N)), (1, 2, 0)), xp)  # [M, N, T]
    h0 = xp.permute_dims(xp.reshape(state.state, (M, N, d)), (1, 0, 2))  # [N, M, d]
    x_nmt = contiguous(xp.permute_dims(x_by_feature, (1, 0, 2)), xp)  # [N, M, T]
    with_h0 = bool(xp.any(h0 != 0))  # from zero states the initial decay adds nothing
    log_decay = _log_decay(A_bar, xp)  # [N, d]
    chunk = min(POWER_CHUNK, T)
    steps = decay_powers(A_bar, chunk - 1, xp)  # [chunk, N, d]: A_bar**k
    readout = (C * B_bar)[..., None]  # [N, d, 1]
    kernel, from_h0 = [], []
    driven = xp.zeros((N, M, d), dtype=xs.dtype, device=getattr(xs, "device", None))
    for start in range(0, T, chunk):
        size = min(chunk, T - start)
        powers = xp.permute_dims(steps[:size, ...] * xp.exp(start * log_decay), (1, 0, 2))  # [N, size, d]: j = start..
        kernel.append((powers @ readout)[..., 0])  # [N, size]: K_j = sum_d C B_bar A_bar**j
        if with_h0:  # y_t gets sum_d C A_bar**(t+1) h0: powers j serve t = j - 1
            from_h0.append(((C[:, None, :] * h0) @ xp.permute_dims(powers * A_bar[:, None, :], (0, 2, 1))))
        # h_T = A_bar**T h0 + sum_j A_bar**j B_bar x_{T-1-j}
        inputs = xp.flip(x_nmt[..., T - start - size : T - start], axis=-1)  # [N, M, size]: x_{T-1-j}
        driven = driven + inputs @ (powers * B_bar[:, None, :])  # [N, M, d]
    kernel = xp.concat(kernel, axis=1)  # [N, T]
    wide = xp.float64
    conv = causal_conv_fft(xp.astype(x_by_feature, wide), xp.astype(kernel, wide), xp, axis=-1)  # [M, N, T]
    conv = xp.reshape(xp.permute_dims(xp.astype(conv, xs.dtype), (2, 0, 1)), (T,) + batch + (N,))  # [T, ..., N]
    ys = muladd(D, xs, conv, xp)  # [T, ..., N]
    h = driven
    if with_h0:
        y0 = xp.permute_dims(xp.concat(from_h0, axis=-1), (2, 1, 0))  # [T, M, N]
        ys = ys + xp.reshape(y0, (T,) + batch + (N,))
        h = h + xp.exp(T * log_decay)[:, None, :] * h0  # [N, M, d]
    h = xp.reshape(xp.permute_dims(h, (1, 0, 2)), batch + (N, d))  # [..., N, d]
    return ys, S4State(h)


S4 = LayerSpec(
    "S4", S4Config, S4Params, S4State, init=s4_init, step=s4_step, scan=s4_scan,
    prepare=s4_discretize, time_invariant=True, dynamics=S4Dynamics,
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
        """``{state_dict key: shape}`` of the layer's parameters."""
        N, d = self.num_neurons, self.d_state
        return params_to_mapping(S5Params(A_log=(d,), B=(N, d), C=(d, N), D=(N,), log_dt=(1,)))

    def state_slots(self) -> tuple:
        """The layer's hidden states (:class:`~ssm_core.spec.StateSlot` records)."""
        return (StateSlot("global_state", self.d_state, None),)


S5Params = params_type(
    "S5Params", __name__, ("A_log", "B", "C", "D", "log_dt"),
    """S5 parameters: ``A_log`` ``[d]``, ``B`` ``[N, d]``, ``C`` ``[d, N]``, ``D`` ``[N]``, ``log_dt`` ``[1]``.""",
)


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
    g = muladd(dynamics.A_bar, state.global_state, x @ dynamics.B_bar, xp)  # [..., d]
    y = muladd(dynamics.D, x, g @ dynamics.C, xp)  # [..., N]
    return y, S5State(g)


def s5_step(x, state: S5State, params: S5Params, xp=None, prepared: S5Dynamics | None = None):
    """One S5 step: ``g = A_bar g + B_bar^T x``, ``y = C^T g + D x``; returns ``(y, new_state)``.

    ``prepared``: ``s5_discretize(params)`` when the caller keeps it across steps.
    """
    xp = namespace(x, xp=xp)
    return s5_step_discrete(x, state, s5_discretize(params, xp) if prepared is None else prepared, xp)


def s5_scan(xs, state: S5State, params: S5Params, xp=None, method: str = "auto", prepared: S5Dynamics | None = None):
    """S5 over a whole sequence ``xs`` ``[T, ..., N]`` from ``state``; returns ``(ys, final_state)``.

    The same numbers as ``T`` calls of :func:`s5_step`. ``method="fft"``
    projects all inputs at once (``u = xs @ B_bar``), gets every state as the
    causal convolution of ``u`` with the decays ``A_bar**j`` plus the initial
    state's decay, and reads out with one matrix product (in float64, rounded
    once to the input's dtype); ``"loop"`` steps. ``prepared`` as in :func:`s5_step`.
    """
    return _lti_scan(xs, state, params, xp, method, prepared, s5_discretize, s5_step_discrete, _s5_fft_scan)


def _s5_fft_scan(xs, state: S5State, dynamics: S5Dynamics, xp):
    """S5 over ``xs`` ``[T, ..., N]`` from ``state`` through the convolution form, in float64."""
    T, dtype = xs.shape[0], xs.dtype
    A_bar, B_bar, C, D = _widen(xp, *dynamics)  # [d], [N, d], [d, N], [N]
    xs, g0 = _widen(xp, xs, state.global_state)  # [T, ..., N], [..., d]
    batch_ones = (1,) * (xs.ndim - 2)
    powers = decay_powers(A_bar, T, xp)  # [T+1, d]
    powers = xp.reshape(powers, (T + 1,) + batch_ones + (powers.shape[-1],))  # [T+1, 1.., d]
    u = xs @ B_bar  # [T, ..., d]
    g = causal_conv_fft(u, powers[:T, ...], xp) + powers[1:, ...] * g0  # [T, ..., d]
    ys = g @ C + D * xs  # [T, ..., N]
    return xp.astype(ys, dtype), S5State(xp.astype(g[-1, ...], dtype))


S5 = LayerSpec(
    "S5", S5Config, S5Params, S5State, init=s5_init, step=s5_step, scan=s5_scan,
    prepare=s5_discretize, time_invariant=True, dynamics=S5Dynamics,
)
