"""S4, S5, S6 and Mamba as traceTorch layers: parameters and states here, math in ``ssm_core``."""

from __future__ import annotations

import ssm_core

from ._ssmlayer import SelectiveLayer, TimeInvariantLayer, _linear

__all__ = ["S4", "S5", "S6", "Mamba"]


class S4(TimeInvariantLayer):
    r"""A diagonal S4-style state-space layer: one timestep per call, state kept inside.

    Each of the ``num_neurons`` features has its own latent state of size
    ``d_state``, updated by a zero-order-hold discretization of
    ``h' = A h + B x``, read out as ``y = sum(C * h) + D * x``.

    Parameters
    ----------
    num_neurons : int
        Number of features on axis ``dim``.
    d_state : int, default 64
        Latent state size per feature.
    dim : int, default -1
        Input axis the layer operates along.

    Variables
    ---------
    state : Tensor or None
        Per-feature latent state: the input's shape with ``num_neurons`` at
        ``dim`` and ``d_state`` appended.
    A_log : Parameter ``[num_neurons, d_state]``
        Diagonal dynamics ``A = -exp(A_log)``; initialised S4D-Real,
        ``A_n = -(n + 1)``.
    B : Parameter ``[num_neurons, d_state]``
        Input projection into the state; initialised to ones (S4D).
    C : Parameter ``[num_neurons, d_state]``
        Output projection from the state; initialised ``N(0, 1)`` (S4D).
    D : Parameter ``[num_neurons]``
        Skip connection; initialised to ones.
    log_dt : Parameter ``[num_neurons]``
        Log timestep; ``dt`` initialised log-uniform in ``[1e-3, 1e-1]``.

    Notes
    -----
    - **Input**: tensor of shape ``[*, num_neurons, *]`` with ``num_neurons``
      at index ``dim``.
    - **Output**: tensor of the same shape as the input.
    - ``TTcompile()`` precomputes the discretized dynamics (they do not depend
      on the input) for faster inference steps; ``TTdecompile()`` restores
      training. Outputs are the same either way.
    - Parameter and state names and shapes are those of traceTorch 0.19.2, so
      its checkpoints load with ``strict=True`` and give the same outputs.
    """

    spec = ssm_core.S4

    def __init__(self, num_neurons: int, d_state: int = 64, dim: int = -1):
        config = ssm_core.S4Config(num_neurons, d_state, dim)
        super().__init__(config.num_neurons, config.dim, d_state=config.d_state)
        self._init_parameters(config)
        self._initialize_state("state")


class S5(TimeInvariantLayer):
    r"""An S5-style state-space layer: all features share one latent state.

    The input features are projected into a shared latent state of size
    ``d_state`` (``g = A_bar * g + B_bar^T x``) and read back out to
    ``num_neurons`` features (``y = C^T g + D * x``), one timestep per call.

    Parameters
    ----------
    num_neurons : int
        Number of features on axis ``dim``.
    d_state : int, default 64
        Size of the shared latent state.
    dim : int, default -1
        Input axis the layer operates along.

    Variables
    ---------
    global_state : Tensor or None
        Shared latent state: the input's shape with ``d_state`` at ``dim``.
    A_log : Parameter ``[d_state]``
        Diagonal dynamics ``A = -exp(A_log)``; initialised S4D-Real.
    B : Parameter ``[num_neurons, d_state]``
        Input projection; initialised ``N(0, 1/num_neurons)``.
    C : Parameter ``[d_state, num_neurons]``
        Output projection; initialised ``N(0, 1/d_state)``.
    D : Parameter ``[num_neurons]``
        Skip connection; initialised to ones.
    log_dt : Parameter ``[1]``
        Log timestep shared by the state; ``dt`` log-uniform in ``[1e-3, 1e-1]``.

    Notes
    -----
    - **Input**: tensor of shape ``[*, num_neurons, *]`` with ``num_neurons``
      at index ``dim``.
    - **Output**: tensor of the same shape as the input.
    - ``TTcompile()`` precomputes the discretized dynamics; ``TTdecompile()``
      restores training.
    """

    spec = ssm_core.S5
    _fuses_step = False  # see TimeInvariantLayer

    def __init__(self, num_neurons: int, d_state: int = 64, dim: int = -1):
        config = ssm_core.S5Config(num_neurons, d_state, dim)
        super().__init__(config.num_neurons, config.dim, d_state=config.d_state)
        self._init_parameters(config)
        self._initialize_state("global_state")

    def _ensure_state(self, state_name, reference_tensor):
        r"""Create ``global_state`` as zeros: the input's shape with ``d_state`` at ``dim``."""
        if getattr(self, state_name) is None:
            shape = list(reference_tensor.shape)
            shape[self.dim] = self.d_state
            setattr(self, state_name, reference_tensor.new_zeros(shape))


class S6(SelectiveLayer):
    r"""The selective (data-dependent) S6 state-space layer of Mamba, one timestep per call.

    The timestep ``dt``, input matrix ``B`` and output matrix ``C`` are
    computed from the current input, then applied to a per-feature latent state.
    This is the selective core of Mamba without its convolution and gate.

    Parameters
    ----------
    num_neurons : int
        Number of features on axis ``dim``.
    d_state : int, default 16
        Latent state size per feature.
    dt_rank : int, default -1
        Rank of the timestep projection; ``-1`` uses ``max(1, num_neurons // 16)``.
    dim : int, default -1
        Input axis the layer operates along.
    discretization : {"zoh", "euler"}, default "zoh", keyword-only
        How the state's input is held over a step: ``"zoh"`` (zero-order
        hold, ``B_bar = expm1(dt A) / A * B``, traceTorch's) or ``"euler"``
        (``B_bar = dt * B``, the Mamba reference code's); ``A_bar = exp(dt A)`` for both.

    Variables
    ---------
    state : Tensor or None
        Per-feature latent state: the input's shape with ``num_neurons`` at
        ``dim`` and ``d_state`` appended.
    x_proj : nn.Linear ``num_neurons -> dt_rank + 2 * d_state``, no bias
        Input-dependent projection to the low-rank timestep features, ``B`` and
        ``C``; ``nn.Linear``'s default init.
    dt_proj : nn.Linear ``dt_rank -> num_neurons``
        Low-rank timestep features to per-feature timesteps,
        ``dt = softplus(dt_proj(.))``; Mamba's init: weight
        ``U(+-dt_rank**-0.5)``, bias the inverse softplus of a ``dt``
        log-uniform in ``[1e-3, 1e-1]``.
    A_log : Parameter ``[num_neurons, d_state]``
        Diagonal dynamics ``A = -exp(A_log)``; initialised S4D-Real.
    D : Parameter ``[num_neurons]``
        Skip connection; initialised to ones.

    Notes
    -----
    - **Input**: tensor of shape ``[*, num_neurons, *]`` with ``num_neurons``
      at index ``dim``.
    - **Output**: tensor of the same shape as the input.
    """

    spec = ssm_core.S6

    def __init__(self, num_neurons: int, d_state: int = 16, dt_rank: int = -1, dim: int = -1, *,
                 discretization: str = "zoh"):
        config = ssm_core.S6Config(num_neurons, d_state, dt_rank, dim, discretization=discretization)
        super().__init__(config.num_neurons, config.dim, d_state=config.d_state)
        self.dt_rank = config.dt_rank
        self.x_proj = _linear(config.num_neurons, config.dt_rank + 2 * config.d_state, bias=False)
        self.dt_proj = _linear(config.dt_rank, config.num_neurons, bias=True)
        self._init_parameters(config)
        self._initialize_state("state")


class Mamba(SelectiveLayer):
    r"""A compact Mamba block, one timestep per call, with its states kept inside.

    An input projection splits into a main and a gate branch (``d_inner =
    expand * num_neurons`` features each); the main branch passes a causal
    depthwise convolution over the last ``conv_kernel`` inputs (kept in
    ``conv_buffer``), a SiLU and the S6 selective core; the result is gated by
    ``silu(gate)``, projected back and added to the input (residual).

    The keyword options default to traceTorch 0.19.2's block; Hugging Face's
    Mamba checkpoints use ``expand=2, discretization="euler", residual=False``
    (their model adds the residual around the block, after an RMSNorm), some
    with ``bias=True`` or ``conv_bias=False``.

    Parameters
    ----------
    num_neurons : int
        Number of features on axis ``dim``.
    d_state : int, default 16
        Latent SSM state size per feature.
    dim : int, default -1
        Input axis the layer operates along.
    dt_rank : int, default -1
        Rank of the timestep projection; ``-1`` uses ``max(1, num_neurons // 16)``.
    conv_kernel : int, default 4
        Causal convolution length; values ``<= 1`` disable the convolution.
    expand : int, default 1, keyword-only
        The inner width is ``d_inner = expand * num_neurons``.
    discretization : {"zoh", "euler"}, default "zoh", keyword-only
        As in :class:`S6`.
    residual : bool, default True, keyword-only
        Add the input to the output; False returns the block's output alone.
    bias : bool, default False, keyword-only
        Give ``in_proj`` and ``out_proj`` biases.
    conv_bias : bool, default True, keyword-only
        Give the convolution a bias.

    Variables
    ---------
    ssm_state : Tensor or None
        Per-feature selective SSM state: the input's shape with
        ``d_inner`` at ``dim`` and ``d_state`` appended.
    conv_buffer : Tensor or None
        The last ``conv_kernel`` main-branch inputs, oldest first: the input's
        shape with ``d_inner`` at ``dim`` and ``conv_kernel`` appended.
        Present when ``conv_kernel > 1``.
    in_proj : nn.Linear ``num_neurons -> 2 * d_inner``, bias when ``bias``
    out_proj : nn.Linear ``d_inner -> num_neurons``, bias when ``bias``
    ssm_proj : nn.Linear ``d_inner -> dt_rank + 2 * d_state``, no bias
    dt_proj : nn.Linear ``dt_rank -> d_inner``
        As in :class:`S6` (Mamba's ``dt`` init).
    conv_weights : Parameter ``[d_inner, conv_kernel]``
    conv_bias : Parameter ``[d_inner]``
        Depthwise causal convolution, ``nn.Conv1d``'s default init
        ``U(+-conv_kernel**-0.5)``; present when ``conv_kernel > 1`` (the
        bias when ``conv_bias`` too).
    A_log : Parameter ``[d_inner, d_state]``
        S4D-Real init.
    D : Parameter ``[d_inner]``
        SSM skip connection; ones.

    Notes
    -----
    - **Input**: tensor of shape ``[*, num_neurons, *]`` with ``num_neurons``
      at index ``dim``.
    - **Output**: tensor of the same shape as the input.
    - Linear layers use ``nn.Linear``'s default init, as the Mamba reference.
    """

    spec = ssm_core.Mamba

    def __init__(
        self, num_neurons: int, d_state: int = 16, dim: int = -1, dt_rank: int = -1, conv_kernel: int = 4, *,
        expand: int = 1, discretization: str = "zoh", residual: bool = True, bias: bool = False,
        conv_bias: bool = True,
    ):
        config = ssm_core.MambaConfig(
            num_neurons, d_state, dim, dt_rank, conv_kernel,
            expand=expand, discretization=discretization, residual=residual, bias=bias, conv_bias=conv_bias,
        )
        super().__init__(config.num_neurons, config.dim, d_state=config.d_state)
        self.conv_kernel = config.conv_kernel
        self.dt_rank = config.dt_rank
        self.d_inner = config.d_inner
        N, inner, R, d = config.num_neurons, config.d_inner, config.dt_rank, config.d_state
        self.in_proj = _linear(N, 2 * inner, bias=config.bias)
        self.out_proj = _linear(inner, N, bias=config.bias)
        self.ssm_proj = _linear(inner, R + 2 * d, bias=False)
        self.dt_proj = _linear(R, inner, bias=True)
        self._init_parameters(config)
        if config.has_conv:
            self._initialize_state("conv_buffer")
        self._initialize_state("ssm_state")

    def _ensure_state(self, state_name, reference_tensor):
        r"""Create a state as zeros: ``d_inner`` at ``dim``, and ``conv_kernel`` (``conv_buffer``) or ``d_state`` appended."""
        if getattr(self, state_name) is None:
            shape = list(reference_tensor.shape)
            shape[self.dim] = self.config.d_inner
            shape.append(self.conv_kernel if state_name == "conv_buffer" else self.d_state)
            setattr(self, state_name, reference_tensor.new_zeros(shape))
