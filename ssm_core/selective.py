"""S6 and the Mamba block: input-dependent (selective) state-space layers.

Layout: features last. ``x`` is ``[..., N]``; the selective state is
``[..., N, d]``, Mamba's conv buffer ``[..., N, K]`` (the last ``K`` inputs of
the main branch, oldest first). Linear weights are stored as ``torch.nn.Linear``
stores them, ``[out, in]``, and applied as ``x @ W.T``.

Options (config fields, keyword-only; the defaults are traceTorch 0.19.2's
layers): ``discretization`` (S6, Mamba) is ``"zoh"`` or ``"euler"``, the rule
of :func:`~ssm_core.discretize.discretized`; Mamba's ``expand`` makes the
inner width ``expand * N`` (its selective core, states and conv run on
``inner`` features: ``[..., inner, d]``, ``[..., inner, K]``), ``bias`` gives
``in_proj`` and ``out_proj`` biases, ``conv_bias=False`` drops the conv's,
and ``residual=False`` drops the ``+ x`` (a model that adds its residual
around the block, as Hugging Face's Mamba checkpoints do). The step and scan
functions take the options as ``config=`` (None: the defaults).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, NamedTuple

from ._array import linear, moveaxis, muladd, namespace, readout, scaled, silu, softplus, unstack
from .checks import check_bool, check_choice, check_int, check_sizes
from .discretize import DISCRETIZATIONS, decay_rates_from_log, discretized
from .init import Draws, inverse_softplus, log_uniform_log_dt, s4d_real_A_log, uniform_fan_in
from .plan import SCAN_BLOCK, Plan, with_method
from .scan import linear_recurrence, time_blocks
from .spec import LayerSpec, StateSlot, params_to_mapping, params_type

__all__ = [
    "S6Config", "S6Params", "S6State", "s6_init", "s6_step", "s6_scan",
    "MambaConfig", "MambaParams", "MambaState", "mamba_init", "mamba_step", "mamba_scan",
    "selective_decay", "selective_step", "BlockInputs", "selective_block", "selective_scan",
    "causal_conv_step", "causal_conv_scan", "SCAN_BLOCK",
    "S6", "Mamba",
]


def _resolve_dt_rank(layer: str, dt_rank: int, num_neurons: int) -> int:
    check_int(layer, "dt_rank", dt_rank, 1, also=(-1,))
    return max(1, num_neurons // 16) if dt_rank == -1 else dt_rank


def _selective_inputs(u, proj_weight, dt_proj_weight, dt_proj_bias, d, xp):
    """``(dt, B, C)`` from ``u`` ``[..., N]``: ``[..., N]``, ``[..., d]``, ``[..., d]``."""
    rank = dt_proj_weight.shape[1]
    proj = linear(u, proj_weight, None, xp)  # [..., R + 2d]
    dt = softplus(linear(proj[..., :rank], dt_proj_weight, dt_proj_bias, xp), xp)  # [..., N]
    return dt, proj[..., rank : rank + d], proj[..., rank + d :]


_DEFAULT_PLAN = Plan()


class BlockInputs(NamedTuple):
    """What one time block of the S6 recurrence takes (:func:`selective_block`).

    ``u``, ``dt`` ``[L, ..., N]`` and ``B``, ``C`` ``[L, ..., d]``: the
    block's inputs (the projections are made for the whole sequence before);
    ``h`` ``[..., N, d]``: the state before it; ``A``, ``inv_A`` ``[N, d]``
    from :func:`selective_decay`; ``D`` ``[N]``: the skip weights;
    ``discretization``: the rule (a string, :data:`~ssm_core.discretize.DISCRETIZATIONS`).
    A compiled block takes the rule with the arrays, so it computes the rule
    it is given (compilers specialise on such a constant), and a backend keys
    its compiled blocks by it.
    """

    u: Any
    dt: Any
    B: Any
    C: Any
    h: Any
    A: Any
    inv_A: Any
    D: Any
    discretization: str = "zoh"


def _selective_update(u, dt, B, C, h, A, inv_A, xp, plan, rule):
    """One step of the S6 recurrence; returns ``(sum(h * C, -1), h)`` (no skip term).

    ``u``, ``dt`` ``[..., N]``; ``B``, ``C`` ``[..., d]``; ``h`` ``[..., N, d]``;
    ``A``, ``inv_A`` ``[N, d]``; ``rule``: the discretization.
    """
    own = plan.inplace  # overwrite the temporaries made here (never u, dt, B, C, h)
    decay, gain = discretized(rule, dt[..., None], A, xp, inv_A, plan.expm1, own)  # [..., N, d], [..., N, d or 1]
    # Euler's gain is dt itself, of fewer elements: its product with B is a new array.
    drive = scaled(gain, B[..., None, :], xp, own and rule == "zoh")  # [..., N, d]
    drive = scaled(drive, u[..., None], xp, own)  # [..., N, d]
    h = muladd(decay, h, drive, xp, own)  # [..., N, d]
    return readout(h, C, xp, plan.readout), h  # [..., N], [..., N, d]


# ``(A, 1/A)`` for ``A = -exp(A_log)`` ``[N, d]``: what the selective layers need of ``A_log``.
selective_decay = decay_rates_from_log


def selective_step(
    u, h, proj_weight, dt_proj_weight, dt_proj_bias, decay, D, xp, plan=_DEFAULT_PLAN, discretization="zoh"
):
    """The S6 core on ``u`` ``[..., N]`` and state ``h`` ``[..., N, d]``; returns ``(y, h)``.

    ``proj_weight`` ``[R + 2d, N]`` maps ``u`` to the low-rank ``dt`` features,
    ``B`` and ``C``; ``dt = softplus(dt_proj(dt_low))`` is one step per
    feature; ``decay`` is ``selective_decay(A_log)``; ``plan`` a :class:`~ssm_core.plan.Plan`;
    ``discretization`` the rule (:data:`~ssm_core.discretize.DISCRETIZATIONS`).
    """
    A, inv_A = decay  # [N, d] x2
    dt, B, C = _selective_inputs(u, proj_weight, dt_proj_weight, dt_proj_bias, A.shape[-1], xp)
    y, h = _selective_update(u, dt, B, C, h, A, inv_A, xp, plan, discretization)  # [..., N], [..., N, d]
    # Two operations, not muladd (see s4_step_discrete): keeping every step's output of S6 at
    # batch 8, 256 features, the heap grew 11-16 MiB over 1,024 steps with them, against 8-129
    # MiB with one multiply-add (three runs each; 8 MiB of outputs).
    return y + D * u, h  # [..., N], [..., N, d]


def selective_block(inputs: BlockInputs, xp, plan=_DEFAULT_PLAN):
    """The S6 recurrence over one time block of :class:`BlockInputs`; returns ``(ys [L, ..., N], h_L [..., N, d])``.

    This is the unit a compiler fuses (``torch.compile``, ``mx.compile``), so
    ``method="loop"`` is written in the form they fuse: per step, elementwise
    chains on ``[..., N, d]`` and a sum over ``d`` (:func:`~ssm_core._array.readout`
    is a multiply and a sum when torch compiles); over the block, nothing
    ``[L, ..., N, d]`` is kept, only the ``[L, ..., N]`` outputs. Compiled, the
    block becomes one pass over the state; its backward keeps the block's
    inputs and recomputes the rest. Eager libraries run the same code, with
    the arithmetic of ``L`` calls of :func:`selective_step`.

    ``plan.method="parallel"`` discretizes the whole block at once and combines
    the steps in ``log2(L)`` rounds (:func:`~ssm_core.scan.linear_recurrence`):
    fewer, larger operations, which pays on a GPU without a compiler.
    """
    u, dt, B, C, h, A, inv_A, D, rule = inputs
    method = plan.method or "loop"
    if method == "loop":
        ys = []
        for u_t, dt_t, B_t, C_t in zip(*(unstack(a, 0, xp) for a in (u, dt, B, C))):
            y_t, h = _selective_update(u_t, dt_t, B_t, C_t, h, A, inv_A, xp, plan, rule)  # [..., N], [..., N, d]
            ys.append(y_t)
        ys = xp.stack(ys, axis=0)  # [L, ..., N]
    else:
        decay, gain = discretized(rule, dt[..., None], A, xp, inv_A, plan.expm1)  # [L, ..., N, d], [L, ..., N, d or 1]
        hs = linear_recurrence(decay, (gain * B[..., None, :]) * u[..., None], h, xp, method)  # [L, ..., N, d]
        h = hs[-1, ...]  # [..., N, d]
        ys = readout(hs, C, xp, plan.readout)  # [L, ..., N]
    return muladd(D, u, ys, xp), h  # [L, ..., N], [..., N, d]


def selective_scan(
    u, h0, proj_weight, dt_proj_weight, dt_proj_bias, decay, D, xp, plan=_DEFAULT_PLAN, discretization="zoh"
):
    """The S6 core over ``u`` ``[T, ..., N]`` from ``h0`` ``[..., N, d]``; returns ``(ys, h_T)``.

    The same arithmetic as ``T`` calls of :func:`selective_step`: all
    projections in one matrix product over time, then :func:`selective_block`
    block by block, ``plan.block`` steps each (``plan.method`` as there), by
    the rule ``discretization``, which each block takes in its :class:`BlockInputs`.

    ``plan.block_fn(inputs)``, when given, runs each block of ``plan.block``
    steps instead: a compiled :func:`selective_block`, so it always sees one shape. A shorter last block runs the eager block: padding
    it to ``block`` steps with ``dt = 0`` would meet ``A = -inf`` (an
    ``A_log`` whose ``exp`` overflows) as ``0 * -inf``, a NaN state where
    the steps themselves are finite.
    """
    T = u.shape[0]
    if T == 0:
        return D * u, h0
    A, inv_A = decay  # [N, d] x2
    dt, B, C = _selective_inputs(u, proj_weight, dt_proj_weight, dt_proj_bias, A.shape[-1], xp)
    block, block_fn = plan.block, plan.block_fn
    h = h0
    ys = []
    for u_t, dt_t, B_t, C_t in zip(*(time_blocks(a, block, xp) for a in (u, dt, B, C))):
        inputs = BlockInputs(u_t, dt_t, B_t, C_t, h, A, inv_A, D, discretization)
        if block_fn is not None and u_t.shape[0] == block:
            y, h = block_fn(inputs)  # [L, ..., N], [..., N, d]
        else:
            y, h = selective_block(inputs, xp, plan)  # [L, ..., N], [..., N, d]
        ys.append(y)
    return (ys[0] if len(ys) == 1 else xp.concat(ys, axis=0)), h  # [T, ..., N], [..., N, d]


def causal_conv_scan(u, buffer, weights, bias, xp):
    """The causal conv over ``u`` ``[T, ..., N]`` with ``buffer`` ``[..., N, K]`` as left context.

    Returns ``(out [T, ..., N], final_buffer [..., N, K])``, as ``T`` calls of
    :func:`causal_conv_step`.
    """
    T, K = u.shape[0], buffer.shape[-1]
    if T == 0:
        return u, buffer
    inputs = xp.concat((moveaxis(buffer[..., 1:], -1, 0, xp), u), axis=0)  # [K-1+T, ..., N]
    # K shifted multiply-adds over time: the [T, ..., N, K] windows would cost a copy and a reduction.
    out = inputs[:T, ...] * weights[:, 0]  # [T, ..., N]
    for k in range(1, K):
        out = muladd(inputs[k : k + T, ...], weights[:, k], out, xp)  # [T, ..., N]
    return _plus(out, bias), moveaxis(inputs[-K:, ...], 0, -1, xp)  # [T, ..., N], [..., N, K]


def causal_conv_step(u, buffer, weights, bias, xp):
    """Shift ``u`` ``[..., N]`` into ``buffer`` ``[..., N, K]``; depthwise dot with ``weights`` ``[N, K]``.

    Returns ``(out, new_buffer)``, ``out = sum(new_buffer * weights, -1) + bias`` (``bias`` None: no bias).
    """
    buffer = xp.concat((buffer[..., 1:], u[..., None]), axis=-1)  # [..., N, K]
    return _plus(xp.sum(buffer * weights, axis=-1), bias), buffer  # [..., N]; not vecdot, which autocast lowers


def _plus(x, bias):
    return x if bias is None else x + bias


# ----------------------------------------------------------------------------- S6


def _rule(config) -> str:
    """The discretization ``config`` names (None: the zero-order hold, the default)."""
    return "zoh" if config is None else config.discretization


@dataclass(frozen=True)
class S6Config:
    """``S6(num_neurons, d_state=16, dt_rank=-1, dim=-1, *, discretization="zoh")``, checked.

    ``dt_rank=-1`` is ``max(1, N // 16)``; ``discretization`` is ``"zoh"`` or ``"euler"``.
    """

    num_neurons: int
    d_state: int = 16
    dt_rank: int = -1
    dim: int = -1
    _: KW_ONLY
    discretization: str = "zoh"
    # The parameters whose axes give the sizes (see from_params), with their number of axes.
    SIZED_BY: ClassVar[dict] = {"A_log": 2, "dt_proj_weight": 2}
    # The options no parameter shows: from_params takes them as keywords.
    OPTIONS: ClassVar[tuple] = ("discretization",)

    def __post_init__(self):
        check_sizes("S6", self)
        check_choice("S6", "discretization", self.discretization, DISCRETIZATIONS)
        object.__setattr__(self, "dt_rank", _resolve_dt_rank("S6", self.dt_rank, self.num_neurons))

    @classmethod
    def from_params(cls, params: S6Params, **options) -> S6Config:
        """The config of the layer whose parameters are ``params``: ``A_log`` is ``[num_neurons, d_state]``,
        ``dt_proj_weight`` ``[., dt_rank]``; ``options`` (``discretization``) as given."""
        num_neurons, d_state = params.A_log.shape
        return cls(num_neurons=num_neurons, d_state=d_state, dt_rank=params.dt_proj_weight.shape[1], **options)

    def param_shapes(self) -> dict:
        """``{state_dict key: shape}`` of the layer's parameters."""
        N, d, R = self.num_neurons, self.d_state, self.dt_rank
        return params_to_mapping(
            S6Params(A_log=(N, d), D=(N,), x_proj_weight=(R + 2 * d, N), dt_proj_weight=(N, R), dt_proj_bias=(N,))
        )

    def state_slots(self) -> tuple:
        """The layer's hidden states (:class:`~ssm_core.spec.StateSlot` records)."""
        return (StateSlot("state", self.num_neurons, self.d_state),)


S6Params = params_type(
    "S6Params", __name__, ("A_log", "D", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"),
    """S6 parameters: ``A_log`` ``[N, d]``, ``D`` ``[N]``, ``x_proj_weight`` ``[R + 2d, N]``,
    ``dt_proj_weight`` ``[N, R]``, ``dt_proj_bias`` ``[N]``.""",
)


class S6State(NamedTuple):
    """S6 hidden state: ``state`` ``[..., N, d]``."""

    state: Any


def _dt_proj_init(draws: Draws, N: int, rank: int):
    """Mamba's ``dt_proj``: ``U(+-rank**-0.5)`` weight, bias the inverse softplus of a log-uniform ``dt``."""
    weight = uniform_fan_in(draws, (N, rank), rank)
    dt = draws.xp.exp(log_uniform_log_dt(draws, (N,)))
    return weight, inverse_softplus(dt, draws.xp)


def s6_init(config: S6Config, draws: Draws) -> S6Params:
    """S4D-Real ``A``, ``nn.Linear``-default ``x_proj``, Mamba's ``dt_proj``, ``D = 1``."""
    N, d, R = config.num_neurons, config.d_state, config.dt_rank
    dt_weight, dt_bias = _dt_proj_init(draws, N, R)
    return S6Params(
        A_log=s4d_real_A_log(draws, (N, d)),
        D=draws.xp.ones((N,), dtype=draws.dtype),
        x_proj_weight=uniform_fan_in(draws, (R + 2 * d, N), N),
        dt_proj_weight=dt_weight,
        dt_proj_bias=dt_bias,
    )


def s6_step(x, state: S6State, params: S6Params, xp=None, prepared=None, plan=None, config=None):
    """One S6 step on ``x`` ``[..., N]``; returns ``(y, new_state)``.

    ``prepared``: ``selective_decay(params.A_log)`` when the caller keeps it
    across steps; ``plan``: how to run it (a :class:`~ssm_core.plan.Plan`);
    ``config``: the layer's :class:`S6Config`, for its ``discretization``
    (None: the zero-order hold).
    """
    xp = namespace(x, xp=xp)
    p = params
    decay = selective_decay(p.A_log, xp) if prepared is None else prepared
    y, h = selective_step(
        x, state.state, p.x_proj_weight, p.dt_proj_weight, p.dt_proj_bias, decay, p.D, xp, plan or _DEFAULT_PLAN,
        _rule(config),
    )
    return y, S6State(h)


def s6_scan(xs, state: S6State, params: S6Params, xp=None, method=None, prepared=None, plan=None, config=None):
    """S6 over a whole sequence ``xs`` ``[T, ..., N]`` from ``state``; returns ``(ys, final_state)``.

    The same numbers as ``T`` calls of :func:`s6_step`; ``method`` is
    ``"loop"`` (the default, fastest on CPUs) or ``"parallel"`` (log-depth,
    for GPUs), short for ``plan=Plan(method=...)``; ``prepared`` and
    ``config`` as in :func:`s6_step`; ``plan``'s block and compiled block as
    in :func:`selective_scan` (a compiled block made for this config's rule).
    """
    xp = namespace(xs, xp=xp)
    p = params
    decay = selective_decay(p.A_log, xp) if prepared is None else prepared
    ys, h = selective_scan(
        xs, state.state, p.x_proj_weight, p.dt_proj_weight, p.dt_proj_bias, decay, p.D, xp, with_method(plan, method),
        _rule(config),
    )
    return ys, S6State(h)


def _prepare_decay(params, xp=None, plan=None):
    return selective_decay(params.A_log, xp)


S6 = LayerSpec(
    "S6", S6Config, S6Params, S6State, init=s6_init, step=s6_step, scan=s6_scan,
    prepare=_prepare_decay, time_invariant=False,
)


# ----------------------------------------------------------------------------- Mamba


@dataclass(frozen=True)
class MambaConfig:
    """``Mamba(num_neurons, d_state=16, dim=-1, dt_rank=-1, conv_kernel=4, *, expand=1, discretization="zoh",
    residual=True, bias=False, conv_bias=True)``, checked.

    ``conv_kernel <= 1`` disables the causal convolution (no ``conv_buffer``,
    and ``conv_bias`` means nothing). The block runs on ``d_inner = expand *
    num_neurons`` features inside; ``dt_rank=-1`` is ``max(1, num_neurons // 16)``.
    """

    num_neurons: int
    d_state: int = 16
    dim: int = -1
    dt_rank: int = -1
    conv_kernel: int = 4
    _: KW_ONLY
    expand: int = 1
    discretization: str = "zoh"
    residual: bool = True
    bias: bool = False
    conv_bias: bool = True
    # The parameters whose axes give the sizes (see from_params), with their number of axes;
    # conv_weights may be None: no convolution.
    SIZED_BY: ClassVar[dict] = {"A_log": 2, "in_proj_weight": 2, "dt_proj_weight": 2, "conv_weights": 2}
    # The options no parameter shows: from_params takes them as keywords.
    OPTIONS: ClassVar[tuple] = ("discretization", "residual")

    def __post_init__(self):
        check_sizes("Mamba", self)
        check_int("Mamba", "conv_kernel", self.conv_kernel, 0)
        check_int("Mamba", "expand", self.expand, 1)
        check_choice("Mamba", "discretization", self.discretization, DISCRETIZATIONS)
        for name in ("residual", "bias", "conv_bias"):
            check_bool("Mamba", name, getattr(self, name))
        object.__setattr__(self, "dt_rank", _resolve_dt_rank("Mamba", self.dt_rank, self.num_neurons))

    @classmethod
    def from_params(cls, params: MambaParams, **options) -> MambaConfig:
        """The config of the layer whose parameters are ``params``; ``options`` (``discretization``,
        ``residual``) as given.

        ``A_log`` is ``[d_inner, d_state]``, ``in_proj_weight`` ``[2 d_inner, num_neurons]`` (``expand`` is
        ``d_inner / num_neurons``), ``dt_proj_weight`` ``[., dt_rank]``, ``conv_weights`` ``[., conv_kernel]``
        (None: a kernel of 1, no convolution); ``bias`` and ``conv_bias`` say whether those biases are there.
        """
        inner, d_state = params.A_log.shape
        num_neurons = params.in_proj_weight.shape[1]
        expand, remainder = divmod(inner, max(num_neurons, 1))
        if remainder:
            raise ValueError(
                f"Mamba: A_log's {inner} rows (the inner width) are not a whole multiple of the {num_neurons} "
                "features in_proj_weight takes: no expand factor gives them"
            )
        return cls(
            num_neurons, d_state,
            dt_rank=params.dt_proj_weight.shape[1],
            conv_kernel=1 if params.conv_weights is None else params.conv_weights.shape[1],
            expand=expand,
            bias=params.in_proj_bias is not None or params.out_proj_bias is not None,
            conv_bias=params.conv_weights is None or params.conv_bias is not None,
            **options,
        )

    @property
    def has_conv(self) -> bool:
        return self.conv_kernel > 1

    @property
    def d_inner(self) -> int:
        """The block's inner width, ``expand * num_neurons``: the size of its states' feature axis."""
        return self.expand * self.num_neurons

    def param_shapes(self) -> dict:
        """``{state_dict key: shape}`` of the layer's parameters."""
        N, inner, d, R, K = self.num_neurons, self.d_inner, self.d_state, self.dt_rank, self.conv_kernel
        return params_to_mapping(MambaParams(
            A_log=(inner, d),
            D=(inner,),
            in_proj_weight=(2 * inner, N),
            out_proj_weight=(N, inner),
            ssm_proj_weight=(R + 2 * d, inner),
            dt_proj_weight=(inner, R),
            dt_proj_bias=(inner,),
            conv_weights=(inner, K) if self.has_conv else None,
            conv_bias=(inner,) if self.has_conv and self.conv_bias else None,
            in_proj_bias=(2 * inner,) if self.bias else None,
            out_proj_bias=(N,) if self.bias else None,
        ))

    def state_slots(self) -> tuple:
        """The layer's hidden states (:class:`~ssm_core.spec.StateSlot` records)."""
        ssm = StateSlot("ssm_state", self.d_inner, self.d_state)
        if not self.has_conv:
            return (ssm,)
        return (ssm, StateSlot("conv_buffer", self.d_inner, self.conv_kernel))


MambaParams = params_type(
    "MambaParams", __name__,
    (
        "A_log", "D", "in_proj.weight", "out_proj.weight", "ssm_proj.weight",
        "dt_proj.weight", "dt_proj.bias", "conv_weights", "conv_bias", "in_proj.bias", "out_proj.bias",
    ),
    """Mamba parameters, with ``I = expand * N``: ``A_log`` ``[I, d]``, ``D`` ``[I]``, ``in_proj_weight``
    ``[2I, N]``, ``out_proj_weight`` ``[N, I]``, ``ssm_proj_weight`` ``[R + 2d, I]``, ``dt_proj_weight``
    ``[I, R]``, ``dt_proj_bias`` ``[I]``, ``conv_weights`` ``[I, K]``, ``conv_bias`` ``[I]`` (None without a
    conv, or with ``conv_bias=False``), ``in_proj_bias`` ``[2I]`` and ``out_proj_bias`` ``[N]`` (None unless
    ``bias=True``).""",
    optional=4,
)


class MambaState(NamedTuple):
    """Mamba hidden states: ``ssm_state`` ``[..., I, d]`` and ``conv_buffer`` ``[..., I, K]`` (or None), ``I = expand * N``."""

    ssm_state: Any
    conv_buffer: Any = None


def mamba_init(config: MambaConfig, draws: Draws) -> MambaParams:
    """Mamba's recipe: default ``nn.Linear``/``nn.Conv1d`` inits, S4D-Real ``A``, ``dt_proj`` as S6, ``D = 1``."""
    N, inner, d, R, K = config.num_neurons, config.d_inner, config.d_state, config.dt_rank, config.conv_kernel
    dt_weight, dt_bias = _dt_proj_init(draws, inner, R)
    conv_weights = uniform_fan_in(draws, (inner, K), K) if config.has_conv else None
    conv_bias = uniform_fan_in(draws, (inner,), K) if config.has_conv and config.conv_bias else None
    params = MambaParams(
        A_log=s4d_real_A_log(draws, (inner, d)),
        D=draws.xp.ones((inner,), dtype=draws.dtype),
        in_proj_weight=uniform_fan_in(draws, (2 * inner, N), N),
        out_proj_weight=uniform_fan_in(draws, (N, inner), inner),
        ssm_proj_weight=uniform_fan_in(draws, (R + 2 * d, inner), inner),
        dt_proj_weight=dt_weight,
        dt_proj_bias=dt_bias,
        conv_weights=conv_weights,
        conv_bias=conv_bias,
    )
    if not config.bias:
        return params
    return params._replace(
        in_proj_bias=uniform_fan_in(draws, (2 * inner,), N), out_proj_bias=uniform_fan_in(draws, (N,), inner)
    )


def _mamba(x, state: MambaState, params: MambaParams, xp, prepared, plan, config, conv, selective):
    """The Mamba block on one step ``x`` ``[..., N]`` or a sequence ``[T, ..., N]`` (``conv``, ``selective``: their scans)."""
    p = params
    inner = p.A_log.shape[0]
    xz = linear(x, p.in_proj_weight, p.in_proj_bias, xp)  # [..., 2 inner]
    u, gate = xz[..., :inner], xz[..., inner:]  # [..., inner] x2
    buffer = state.conv_buffer
    if buffer is not None:
        u, buffer = conv(u, buffer, p.conv_weights, p.conv_bias, xp)  # [..., inner], [..., inner, K]
    u = silu(u, xp)  # [..., inner]
    decay = selective_decay(p.A_log, xp) if prepared is None else prepared
    y, h = selective(
        u, state.ssm_state, p.ssm_proj_weight, p.dt_proj_weight, p.dt_proj_bias, decay, p.D, xp, plan, _rule(config)
    )
    y = linear(y * silu(gate, xp), p.out_proj_weight, p.out_proj_bias, xp)  # [..., N]
    residual = config is None or config.residual
    return (y + x if residual else y), MambaState(h, buffer)


def mamba_step(x, state: MambaState, params: MambaParams, xp=None, prepared=None, plan=None, config=None):
    """One Mamba block step on ``x`` ``[..., N]``; returns ``(y, new_state)``.

    ``in_proj`` splits into a main and a gate branch (``expand * N`` features
    each); the main branch goes through the causal conv (when present), SiLU
    and the selective core, is gated by ``silu(gate)``, projected by
    ``out_proj`` and added to ``x`` (unless ``config.residual`` is False).
    ``prepared`` and ``plan`` as in :func:`s6_step`; ``config``: the layer's
    :class:`MambaConfig`, for the options no parameter shows
    (``discretization``, ``residual``; None: the defaults). ``expand`` and
    the biases follow from the parameters' shapes and presence.
    """
    xp = namespace(x, xp=xp)
    return _mamba(x, state, params, xp, prepared, plan or _DEFAULT_PLAN, config, causal_conv_step, selective_step)


def mamba_scan(xs, state: MambaState, params: MambaParams, xp=None, method=None, prepared=None, plan=None, config=None):
    """The Mamba block over a whole sequence ``xs`` ``[T, ..., N]``; returns ``(ys, final_state)``.

    The same numbers as ``T`` calls of :func:`mamba_step`: the projections run
    over all of ``xs`` at once, the causal conv takes the held buffer as left
    context, and the selective core scans as :func:`s6_scan` (``method``,
    ``prepared``, ``plan`` and ``config`` as there and in :func:`mamba_step`).
    """
    xp = namespace(xs, xp=xp)
    return _mamba(xs, state, params, xp, prepared, with_method(plan, method), config, causal_conv_scan, selective_scan)


Mamba = LayerSpec(
    "Mamba", MambaConfig, MambaParams, MambaState, init=mamba_init, step=mamba_step, scan=mamba_scan,
    prepare=_prepare_decay, time_invariant=False,
)
