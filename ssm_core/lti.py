"""S4 and S5: time-invariant diagonal state-space layers, a step or a sequence at a time.

Layout: features last. ``x`` is ``[..., N]``; the S4 state is ``[..., N, d]``
(one ``d_state`` vector per feature), the S5 state ``[..., d]`` (one vector
shared by all features). The dynamics depend on parameters only, so they are
computed by ``*_discretize`` and may be kept across steps; for the same
reason a whole sequence can be cut into chunks whose work is a few matrix
products (``s4_scan``, ``s5_scan``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ._array import at_least, muladd, namespace, unstack
from .checks import check_sizes
from .discretize import decay_rate_from_log, zoh_terms
from .plan import Plan, with_method
from .scan import contiguous
from .init import Draws, log_uniform_log_dt, s4d_real_A_log
from .spec import LayerSpec, StateSlot, params_to_mapping, params_type

LTI_SCAN_METHODS = ("auto", "chunked", "loop")
_DEFAULT_PLAN = Plan()
# "auto" steps shorter sequences: below these lengths T plain steps take no
# longer than the chunked form's fixed cost (measured on CPU, batch 8, 256 features).
S4_CHUNKED_FROM = 32
S5_CHUNKED_FROM = 48
# Steps per chunk of the chunked scans, at most (see _chunks).
S4_CHUNK = 64
S5_CHUNK = 64
MIN_CHUNK = 16

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
    # The parameters whose axes give the sizes (see from_params), with their number of axes.
    SIZED_BY: ClassVar[dict] = {"A_log": 2}

    def __post_init__(self):
        check_sizes("S4", self)

    @classmethod
    def from_params(cls, params: S4Params) -> S4Config:
        """The config of the layer whose parameters are ``params``: ``A_log`` is ``[num_neurons, d_state]``."""
        num_neurons, d_state = params.A_log.shape
        return cls(num_neurons=num_neurons, d_state=d_state)

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


class LTIDynamics(NamedTuple):
    """A discretized time-invariant system: what S4/S5 steps take as ``prepared``.

    S4: ``A_bar``, ``B_bar``, ``C`` ``[N, d]`` and ``D`` ``[N]``.
    S5: ``A_bar`` ``[d]``, ``B_bar`` ``[N, d]``, ``C`` ``[d, N]``, ``D`` ``[N]``.
    """

    A_bar: Any
    B_bar: Any
    C: Any
    D: Any


S4Dynamics = S5Dynamics = LTIDynamics


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


def s4_discretize(params: S4Params, xp=None, plan: Plan | None = None) -> S4Dynamics:
    """Zero-order hold of S4's parameters (in ``plan``'s form of expm1); depends on no input."""
    xp = namespace(params.A_log, xp=xp)
    A = decay_rate_from_log(params.A_log, xp)  # [N, d]
    A_bar, gain = zoh_terms(xp.exp(params.log_dt)[:, None] * A, None, xp, (plan or _DEFAULT_PLAN).expm1, A)  # [N, d] x2
    return S4Dynamics(A_bar, gain * params.B, params.C, params.D)


def s4_step_discrete(x, state: S4State, dynamics: S4Dynamics, xp=None, overwrite: bool = False):
    """One S4 step from precomputed dynamics; returns ``(y, new_state)``.

    ``overwrite``: a plan's ``inplace``; the new state is then written into
    the drive ``B_bar x`` the step makes, not into a second array of the
    state's size (the same numbers): torch's step at batch 32, 256 features
    took 0.87-0.89 of the time it took with the second array.
    """
    xp = namespace(x, xp=xp)
    h = muladd(dynamics.A_bar, state.state, dynamics.B_bar * x[..., None], xp, overwrite)  # [..., N, d]
    # The output as traceTorch 0.19.2 forms it, a sum and then + D x, not one fused multiply-add:
    # a caller keeping every step's output measured far less heap growth with it under glibc
    # (S4, batch 8: 29 against 420 MiB over 1,024 steps). That growth is the allocator's
    # fragmentation and varies from run to run; for whole sequences, scan allocates little.
    y = xp.sum(h * dynamics.C, axis=-1) + dynamics.D * x  # [..., N]
    return y, S4State(h)


def s4_step(x, state: S4State, params: S4Params, xp=None, prepared: S4Dynamics | None = None, plan=None,
            config=None):
    """One S4 step: ``h = A_bar h + B_bar x``, ``y = sum(C h) + D x``; returns ``(y, new_state)``.

    ``prepared``: ``s4_discretize(params)`` when the caller keeps it across
    steps; ``plan``: how to run it (a :class:`~ssm_core.plan.Plan`);
    ``config``: the layer's config, taken as every layer's step takes it (S4
    and S5 have no options that change the numbers).
    """
    xp = namespace(x, xp=xp)
    dynamics = s4_discretize(params, xp, plan) if prepared is None else prepared
    return s4_step_discrete(x, state, dynamics, xp, plan is not None and plan.inplace)


def _scan_method(method: str, xs, xp, chunked_from: int) -> str:
    if method not in LTI_SCAN_METHODS:
        raise ValueError(f"scan: method must be one of {LTI_SCAN_METHODS}, got {method!r}")
    if method != "auto":
        return method
    # A NaN or Inf times a chunk matrix's zero above its diagonal is NaN, which
    # would reach the chunk's earlier steps: such sequences step, which keeps them causal.
    return "chunked" if xs.shape[0] >= chunked_from and _all_finite(xs, xp) else "loop"


def _all_finite(x, xp) -> bool:
    # The largest and smallest elements are NaN when any element is (the
    # standard's max and min propagate NaN) and infinite when one is: two
    # reductions, where isfinite on every element takes several times as long (torch).
    extremes = xp.stack((xp.max(x), xp.min(x)))  # [2]
    return bool(xp.all(xp.isfinite(extremes)))


def _lti_scan(xs, state, params, xp, plan, prepared, discretize, step_discrete, chunked_scan, chunked_from):
    """The scan of a time-invariant layer: steps, or the chunked form (see ``_scan_method``)."""
    xp = namespace(xs, xp=xp)
    if xs.shape[0] == 0:
        return xs, state
    dynamics = discretize(params, xp, plan) if prepared is None else prepared
    if _scan_method(plan.method or "auto", xs, xp, chunked_from) == "loop":
        return _step_loop(step_discrete, xs, state, dynamics, xp)
    return chunked_scan(xs, state, dynamics, xp)


def _step_loop(step_discrete, xs, state, dynamics, xp):
    ys = []
    for x in unstack(xs, 0, xp):  # not xs[t]: see linear_recurrence
        y, state = step_discrete(x, state, dynamics, xp)
        ys.append(y)
    return xp.stack(ys, axis=0), state


def _chunks(T: int, longest: int) -> tuple:
    """``(count, size)``: ``T`` steps cut into ``count`` chunks of ``size <= longest`` steps, padded by fewer than ``count``."""
    count = -(-T // max(1, longest))
    return count, -(-T // count)


def _batch_size(xs) -> tuple:
    """``(batch shape, its number of elements)`` of ``xs`` ``[T, ..., N]``."""
    batch = tuple(xs.shape[1:-1])
    M = 1
    for size in batch:
        M *= size
    return batch, M


def _device(x) -> dict:
    device = getattr(x, "device", None)  # MLX arrays have none, nor take one
    return {} if device is None else {"device": device}


def _pad_time(x, length: int, xp):
    """``x`` ``[T, ...]`` followed by zeros up to ``length`` steps; inputs after the end change nothing before it."""
    if x.shape[0] == length:
        return x
    zeros = xp.zeros((length - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, **_device(x))
    return xp.concat((x, zeros), axis=0)  # [length, ...]


def _features_first(x, xp):
    """``x`` ``[count, L, M, N]`` laid out row-major as ``[N, count, M, L]``.

    Through ``[count, M, N, L]``: copying straight to the target order reads
    with a stride on both axes and takes about three times as long as the
    two steps together (measured, torch and NumPy on CPU).
    """
    x = contiguous(xp.permute_dims(x, (0, 2, 3, 1)), xp)  # [count, M, N, L]
    return contiguous(xp.permute_dims(x, (2, 0, 1, 3)), xp)  # [N, count, M, L]


def _causal_toeplitz(kernel, xp):
    """``[..., L, L]`` holding ``kernel[..., t - s]`` at ``[..., s, t]`` for ``s <= t``, 0 below.

    A row of ``L`` inputs times it is that row convolved causally with the kernel.
    """
    L = kernel.shape[-1]
    steps = xp.arange(L, **_device(kernel))  # [L]
    lag = steps[None, :] - steps[:, None]  # [L, L]: t - s
    causal = lag >= 0  # [L, L]
    index = xp.reshape(xp.where(causal, lag, xp.zeros_like(lag)), (L * L,))  # [L * L]
    entries = xp.reshape(xp.take(kernel, index, axis=-1), tuple(kernel.shape[:-1]) + (L, L))  # [..., L, L]
    return entries * xp.astype(causal, kernel.dtype)  # [..., L, L]


def _power_floor(dtype, xp) -> float:
    """Where decay powers are clipped: ``2**-42`` in float32, ``2**-341`` in float64.

    Far below any sum's rounding, and a power of two above the cube root of
    the smallest normal number: neither a power nor its product with a
    coefficient above the floor is subnormal, which x86 CPUs multiply up to a
    hundred times slower than normal numbers. A speed floor, on ``A_bar``'s
    powers: not the discretization's floor on ``A`` (``discretize._rate_floor``),
    which keeps ``1 / A`` finite.
    """
    info = xp.finfo(dtype)
    if info.bits < 32:  # too narrow a range for that margin
        return float(info.smallest_normal)
    return 2.0 ** (round(math.log2(float(info.smallest_normal))) // 3)


def _decay_powers(decay, count: int, axis: int, xp):
    """``decay**j`` for ``j = 0..count-1`` along a new axis ``axis``, for ``0 <= decay <= 1``.

    ``exp(j * log(decay))``: non-positive exponents only, nothing grows;
    clipped at :func:`_power_floor`.
    """
    floor = _power_floor(decay.dtype, xp)
    axis = axis % (decay.ndim + 1)
    log_decay = xp.expand_dims(xp.log(at_least(decay, floor, xp)), axis=axis)  # decay's shape with 1 at axis
    j = xp.arange(count, dtype=decay.dtype, **_device(decay))  # [count]
    j = xp.reshape(j, (count,) + (1,) * (decay.ndim - axis))  # count, then 1 for each axis after it
    return xp.exp(at_least(j * log_decay, math.log(floor), xp))  # count at axis


def _decay_power(decay, n: int, xp):
    """``decay**n`` (``n >= 0``) as :func:`_decay_powers` makes it: decay's shape."""
    floor = _power_floor(decay.dtype, xp)
    return xp.exp(at_least(n * xp.log(at_least(decay, floor, xp)), math.log(floor), xp))  # decay's shape


def s4_scan(xs, state: S4State, params: S4Params, xp=None, method=None, prepared: S4Dynamics | None = None, plan=None,
            config=None):
    """S4 over a whole sequence ``xs`` ``[T, ..., N]`` from ``state``; returns ``(ys, final_state)``.

    The same numbers as ``T`` calls of :func:`s4_step`, to rounding. The
    system is time-invariant, so ``method="chunked"`` cuts time into chunks
    and does each chunk's work as matrix products batched over features (see
    :func:`_s4_chunked_scan`), with a loop over chunks, not steps; ``"loop"``
    steps; ``"auto"`` takes the chunks from ``S4_CHUNKED_FROM`` steps on, for
    finite inputs (a NaN or Inf would reach its chunk's earlier outputs: such
    sequences step); ``method`` is short for ``plan=Plan(method=...)``.
    ``prepared``, ``plan`` and ``config`` as in :func:`s4_step`.
    """
    return _lti_scan(
        xs, state, params, xp, with_method(plan, method), prepared, s4_discretize, s4_step_discrete, _s4_chunked_scan,
        S4_CHUNKED_FROM,
    )


def _s4_chunked_scan(xs, state: S4State, dynamics: S4Dynamics, xp):
    """S4 over ``xs`` ``[T, ..., N]`` from ``state``, ``L`` steps at a time.

    Within a chunk each feature's outputs are its inputs times a causal
    Toeplitz matrix of the kernel ``K_j = sum_d C B_bar A_bar**j`` (``D`` on
    its diagonal), plus ``C A_bar**(t+1) h`` from the state ``h`` entering the
    chunk. Those states come from a loop over chunks, each adding its inputs'
    ``sum_j A_bar**(L-1-j) B_bar x_j``. Every product is a matrix product
    batched over features: ``L + 2 d`` multiply-adds per step, feature and
    batch element, and nothing of size ``[T, ..., N, d]`` is made (the chunk
    states are ``d / L`` times the input's size).
    """
    A_bar, B_bar, C, D = dynamics  # [N, d] x3, [N]
    T, N, d = xs.shape[0], xs.shape[-1], A_bar.shape[-1]
    batch, M = _batch_size(xs)
    # The chunk's matrices ([N, L, d]) are made once per call: for a small
    # batch and few steps, shorter chunks keep them near the input's size.
    count, L = _chunks(T, min(S4_CHUNK, max(MIN_CHUNK, 4 * T * M // d)))
    # One table, no overlapping slices of it: under autograd each slice's
    # gradient is a zero-filled array of the whole table.
    powers = _decay_powers(A_bar, L, 1, xp)  # [N, L, d]: A_bar**j
    kernel = (powers @ (C * B_bar)[:, :, None])[..., 0]  # [N, L]
    kernel = xp.concat((kernel[:, :1] + D[:, None], kernel[:, 1:]), axis=1)  # [N, L]: D x joins lag 0
    within = _causal_toeplitz(kernel, xp)  # [N, L, L]
    to_end = xp.flip(powers, axis=1) * B_bar[:, None, :]  # [N, L, d]: A_bar**(L-1-j) B_bar
    step_readout = at_least(A_bar, _power_floor(A_bar.dtype, xp), xp) * C  # [N, d]: C A_bar
    readout = xp.permute_dims(powers * step_readout[:, None, :], (0, 2, 1))  # [N, d, L]: C A_bar**(t+1)

    x = _pad_time(xp.reshape(xs, (T, M, N)), count * L, xp)  # [count * L, M, N]
    x = _features_first(xp.reshape(x, (count, L, M, N)), xp)  # [N, count, M, L]
    h = xp.permute_dims(xp.reshape(state.state, (M, N, d)), (1, 0, 2))  # [N, M, d]
    x_rows = xp.reshape(x, (N, count * M, L))  # [N, count * M, L]
    # Every chunk's end, the last one's too: under autograd a slice of x
    # would cost a zero-filled gradient of all of x.
    ends = unstack(xp.reshape(x_rows @ to_end, (N, count, M, d)), 1, xp)  # count x [N, M, d]
    chunk_decay = _decay_power(A_bar, L, xp)[:, None, :]  # [N, 1, d]: A_bar**L
    starts = [h]
    for end in ends[:-1]:
        h = chunk_decay * h + end  # [N, M, d]
        starts.append(h)
    starts = xp.reshape(xp.stack(starts, axis=1), (N, count * M, d))  # [N, count * M, d]
    ys = x_rows @ within + starts @ readout  # [N, count * M, L]
    ys = xp.permute_dims(xp.reshape(ys, (N, count, M, L)), (1, 3, 2, 0))  # [count, L, M, N]
    ys = xp.reshape(xp.reshape(ys, (count * L, M, N))[:T, ...], (T,) + batch + (N,))  # [T, ..., N]
    r = T - (count - 1) * L  # real steps in the last chunk
    last = ends[-1]  # [N, M, d]
    if r < L:  # the state after the r real steps, not after the padding
        last = x[:, -1, :, :r] @ to_end[:, L - r :, :]  # [N, M, d]
    h = _decay_power(A_bar, r, xp)[:, None, :] * h + last  # [N, M, d]
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
    # The parameters whose axes give the sizes (see from_params), with their number of axes.
    SIZED_BY: ClassVar[dict] = {"B": 2, "A_log": 1}

    def __post_init__(self):
        check_sizes("S5", self)

    @classmethod
    def from_params(cls, params: S5Params) -> S5Config:
        """The config of the layer whose parameters are ``params``: ``B`` is ``[num_neurons, .]``,
        ``A_log`` ``[d_state]``."""
        return cls(num_neurons=params.B.shape[0], d_state=params.A_log.shape[0])

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


def s5_discretize(params: S5Params, xp=None, plan: Plan | None = None) -> S5Dynamics:
    """Zero-order hold of S5's parameters (in ``plan``'s form of expm1); depends on no input."""
    xp = namespace(params.A_log, xp=xp)
    A = decay_rate_from_log(params.A_log, xp)  # [d]
    A_bar, gain = zoh_terms(xp.exp(params.log_dt) * A, None, xp, (plan or _DEFAULT_PLAN).expm1, A)  # [d] x2
    return S5Dynamics(A_bar, params.B * gain, params.C, params.D)


def s5_step_discrete(x, state: S5State, dynamics: S5Dynamics, xp=None):
    """One S5 step from precomputed dynamics; returns ``(y, new_state)``."""
    xp = namespace(x, xp=xp)
    g = muladd(dynamics.A_bar, state.global_state, x @ dynamics.B_bar, xp)  # [..., d]
    y = g @ dynamics.C + dynamics.D * x  # [..., N]; two operations, as in s4_step_discrete
    return y, S5State(g)


def s5_step(x, state: S5State, params: S5Params, xp=None, prepared: S5Dynamics | None = None, plan=None,
            config=None):
    """One S5 step: ``g = A_bar g + B_bar^T x``, ``y = C^T g + D x``; returns ``(y, new_state)``.

    ``prepared``, ``plan`` and ``config`` as in :func:`s4_step`.
    """
    xp = namespace(x, xp=xp)
    return s5_step_discrete(x, state, s5_discretize(params, xp, plan) if prepared is None else prepared, xp)


def s5_scan(xs, state: S5State, params: S5Params, xp=None, method=None, prepared: S5Dynamics | None = None, plan=None,
            config=None):
    """S5 over a whole sequence ``xs`` ``[T, ..., N]`` from ``state``; returns ``(ys, final_state)``.

    The same numbers as ``T`` calls of :func:`s5_step`, to rounding.
    ``method="chunked"`` projects all inputs at once and runs the recurrence
    a chunk at a time (see :func:`_s5_chunked_scan`); ``"loop"`` steps;
    ``"auto"`` chooses as :func:`s4_scan` does, from ``S5_CHUNKED_FROM`` steps
    on. ``method``, ``prepared``, ``plan`` and ``config`` as in :func:`s4_scan`.
    """
    return _lti_scan(
        xs, state, params, xp, with_method(plan, method), prepared, s5_discretize, s5_step_discrete, _s5_chunked_scan,
        S5_CHUNKED_FROM,
    )


def _s5_chunked_scan(xs, state: S5State, dynamics: S5Dynamics, xp):
    """S5 over ``xs`` ``[T, ..., N]`` from ``state``, ``L`` steps at a time.

    The inputs are projected at once (``u = x @ B_bar``); within a chunk each
    state channel's states are its ``u`` times the causal Toeplitz matrix of
    ``A_bar**j``, plus ``A_bar**(t+1) g`` from the state ``g`` entering the
    chunk, which a loop over chunks carries; one readout ``g @ C`` ends it.
    The two projections are the bulk of the work; the recurrence costs ``L``
    multiply-adds per step, state channel and batch element.
    """
    A_bar, B_bar, C, D = dynamics  # [d], [N, d], [d, N], [N]
    T, N, d = xs.shape[0], xs.shape[-1], A_bar.shape[-1]
    batch, M = _batch_size(xs)
    # The chunk's matrix ([d, L, L]) is made once per call: for a small
    # batch and few steps, shorter chunks keep it near the states' size.
    count, L = _chunks(T, min(S5_CHUNK, max(MIN_CHUNK, math.isqrt(4 * T * M))))
    powers = _decay_powers(A_bar, L, 1, xp)  # [d, L]: A_bar**j
    within = _causal_toeplitz(powers, xp)  # [d, L, L]
    from_start = powers * at_least(A_bar, _power_floor(A_bar.dtype, xp), xp)[:, None]  # [d, L]: A_bar**(t+1)

    x = xp.reshape(xs, (T * M, N))  # [T * M, N]: one product, not T small ones
    u = _pad_time(xp.reshape(x @ B_bar, (T, M, d)), count * L, xp)  # [count * L, M, d]
    u = _features_first(xp.reshape(u, (count, L, M, d)), xp)  # [d, count, M, L]
    g = xp.reshape(xp.reshape(u, (d, count * M, L)) @ within, (d, count, M, L))  # [d, count, M, L]
    h = xp.permute_dims(xp.reshape(state.global_state, (M, d)), (1, 0))  # [d, M]
    starts = [h]
    chunk_decay = _decay_power(A_bar, L, xp)[:, None]  # [d, 1]: A_bar**L
    for end in unstack(g[:, :-1, :, L - 1], 1, xp):  # [d, M]: the chunk's own part of its last state
        h = chunk_decay * h + end  # [d, M]
        starts.append(h)
    starts = xp.stack(starts, axis=1)  # [d, count, M]
    g = g + starts[..., None] * from_start[:, None, None, :]  # [d, count, M, L]
    g = xp.reshape(xp.permute_dims(g, (1, 3, 2, 0)), (count * L * M, d))[: T * M, ...]  # [T * M, d]
    ys = xp.reshape(muladd(D, x, g @ C, xp), (T,) + batch + (N,))  # [T, ..., N]
    return ys, S5State(xp.reshape(g[(T - 1) * M :, ...], batch + (d,)))


S5 = LayerSpec(
    "S5", S5Config, S5Params, S5State, init=s5_init, step=s5_step, scan=s5_scan,
    prepare=s5_discretize, time_invariant=True, dynamics=S5Dynamics,
)
