"""State-space layer math written once against the Python array API standard.

Pure functions of ``(x, state, params)`` returning ``(y, new_state)``, on any
array-API array (NumPy, CuPy, torch, MLX, array-api-strict). Features are the
last axis of ``x``. No array library is imported here: the namespace comes from
the arguments, or from ``xp=`` when the caller already knows it.

Functional API, uniform over the four layers::

    y, state = ssm_core.s4_step(x, state, params)      # S4State(state)
    y, state = ssm_core.s5_step(x, state, params)      # S5State(global_state)
    y, state = ssm_core.s6_step(x, state, params)      # S6State(state)
    y, state = ssm_core.mamba_step(x, state, params)   # MambaState(ssm_state, conv_buffer)

    ys, state = ssm_core.s6_scan(xs, state, params)    # a whole sequence xs [T, ..., N]:
                                                       # the same numbers as T steps

These check their arguments first (shapes and dtypes, no array work; see
:mod:`ssm_core.functional`) and raise an error naming the function.

Each also takes ``prepared=``: what it needs of the parameters alone
(``S6.prepare(params, xp)``; for S4/S5 the discretized system), for a caller
that keeps it while the weights do not change; and ``plan=``, a :class:`Plan`
of how to run it (scan method, time blocks, the forms of operations whose
best form depends on the library), which a binding's backend makes
(:mod:`ssm_core.backend`). A scan's ``method=`` is short for ``plan=Plan(method=...)``.

``ssm_core.S4`` ... ``ssm_core.Mamba`` are :class:`LayerSpec` records tying each
layer's config, parameter and state containers and functions together, e.g.
``ssm_core.S6.params_from_mapping(torch_layer.state_dict())`` and
``ssm_core.S6.zero_state(config, batch_shape, xp)``. Their ``step`` and ``scan``
are the unchecked functions, for bindings that check their inputs themselves.

Layer options beyond traceTorch 0.19.2's (keyword-only, defaults 0.19.2's):
``S6(..., discretization="zoh")`` and ``Mamba(..., expand=1,
discretization="zoh", residual=True, bias=False, conv_bias=True)``, fields of
their configs; the functions take them as ``config=`` (see :mod:`ssm_core.functional`).

The Mamba language model of Hugging Face's checkpoints (``lm``): ``logits,
states = ssm_core.mamba_lm_step(ids, states, params, config)`` and
``mamba_lm_scan``, with ``pretrained.read_config``/``read_weights`` to load them.

Modules: ``lti`` (S4, S5), ``selective`` (S6, Mamba), ``functional`` (their
steps and scans behind the argument checks), ``discretize`` (``A`` from
``A_log``, the zero-order hold and Euler's rule), ``scan`` (sequence primitives), ``plan``
(how one call runs), ``backend`` (the base of the bindings' backends, which
make the plans), ``fused`` (when a compiled block runs), ``init``
(initialisation formulas), ``spec`` (the per-layer records), ``layout``
(between the user's feature axis and the features-last layout used here),
``checks`` (argument errors), ``pretrained`` (reading checkpoints), ``lm``
(the language model), ``generation`` (its ``generate`` and ``stream``),
``_array`` (namespaces and the operations with a native fast path).
"""

from ._array import namespace, register_namespace, silu, softplus
from .discretize import decay_rates, decay_rates_from_log, phi1, zoh
from .init import Draws
from .plan import Plan
from .lti import (
    S4, S5,
    S4Config, S4Dynamics, S4Params, S4State, s4_discretize, s4_init,
    S5Config, S5Dynamics, S5Params, S5State, s5_discretize, s5_init,
)
from .selective import (
    S6, Mamba,
    MambaConfig, MambaParams, MambaState, mamba_init,
    S6Config, S6Params, S6State, s6_init,
    BlockInputs, causal_conv_scan, causal_conv_step, selective_block, selective_decay, selective_scan, selective_step,
)
from .functional import mamba_scan, mamba_step, s4_scan, s4_step, s5_scan, s5_step, s6_scan, s6_step
from .scan import linear_recurrence, time_blocks
from .pretrained import MambaLMConfig
from .lm import MambaLMParams, mamba_lm_scan, mamba_lm_step, mamba_lm_zero_states
from .spec import LayerSpec, StateSlot

LAYERS = {spec.name: spec for spec in (S4, S5, S6, Mamba)}

__all__ = [
    "LAYERS", "LayerSpec", "StateSlot", "Draws", "Plan", "BlockInputs",
    "namespace", "phi1", "softplus", "silu", "zoh", "decay_rates", "decay_rates_from_log", "register_namespace",
    "S4", "S4Config", "S4Params", "S4State", "S4Dynamics",
    "s4_init", "s4_discretize", "s4_step", "s4_scan",
    "S5", "S5Config", "S5Params", "S5State", "S5Dynamics",
    "s5_init", "s5_discretize", "s5_step", "s5_scan",
    "S6", "S6Config", "S6Params", "S6State", "s6_init", "s6_step", "s6_scan",
    "Mamba", "MambaConfig", "MambaParams", "MambaState", "mamba_init", "mamba_step", "mamba_scan",
    "selective_decay", "selective_step", "selective_block", "selective_scan", "causal_conv_step", "causal_conv_scan",
    "linear_recurrence", "time_blocks",
    "MambaLMConfig", "MambaLMParams", "mamba_lm_step", "mamba_lm_scan", "mamba_lm_zero_states",
]
