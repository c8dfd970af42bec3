"""An independent plain-NumPy float64 oracle of the four traceTorch SSM layers.

Written straight from traceTorch 0.19.2's ``tracetorch/ssm/_s_series.py``
(``S4``, ``S5``, ``S6``, ``Mamba``), without importing ``ssm_core``, torch or
any backend, so that every binding can be checked against math that shares no
code with it. Two deliberate differences from the published code, both exact
rewrites of the same formula:

- the zero-order-hold input gain ``(exp(dt*A) - 1) / A`` is computed as
  ``expm1(dt*A) / A`` (no cancellation for small ``dt*A``; upstream S6/Mamba
  divide by ``A + 1e-12``, a ~1e-12 relative change for ``|A| >= ~1``);
- ``softplus`` is the exact ``log(1 + exp(x))`` (torch switches to ``x`` above 20).

The options of this project's S6 and Mamba beyond 0.19.2 (keyword arguments
in ``kwargs``, defaults 0.19.2's) are written from the Mamba reference code
(``transformers``' ``MambaMixer``, ``mamba-ssm``): ``discretization="euler"``
holds the input as ``B_bar = dt * B`` (``A_bar = exp(dt A)`` either way);
Mamba's ``expand`` widens the inner branch to ``expand * N`` features,
``in_proj.bias``/``out_proj.bias`` are added where the parameters have them,
a missing ``conv_bias`` adds nothing, and ``residual=False`` drops ``+ x``.

Parameters are a dict keyed like the layer's ``state_dict()``; every value is
converted to float64. Step functions are features-last; :func:`run` takes a
``[T, *shape]`` input with the feature axis at ``kwargs["dim"]`` and returns
outputs and final states in the traceTorch layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# traceTorch 0.19.2's recorded outputs (see tests/fixtures/README.md), kept inside the repository.
FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "tracetorch-0.19.2"

__all__ = [
    "FIXTURE_DIR", "rel_err",
    "softplus", "silu", "zoh",
    "s4_step", "s5_step", "s6_step", "mamba_step",
    "state_names", "run",
]


def _f64(params: dict) -> dict:
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}


# ----------------------------------------------------------------------------- elementwise helpers


def softplus(x):
    """``log(1 + exp(x))`` without overflow."""
    return np.logaddexp(x, 0.0)


def sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))  # in (0, 1]: never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu(x):
    return x * sigmoid(x)


def zoh(dt, A):
    """``(A_bar, gain)`` with ``A_bar = exp(dt A)`` and ``gain = expm1(dt A) / A`` (``B_bar = gain * B``)."""
    dtA = dt * A
    return np.exp(dtA), np.expm1(dtA) / A


def euler(dt, A):
    """``(A_bar, gain)`` with ``A_bar = exp(dt A)`` and ``gain = dt`` (``B_bar = dt * B``)."""
    return np.exp(dt * A), dt


# ----------------------------------------------------------------------------- one step, features last


def s4_step(p: dict, x, state):
    """S4: ``x`` ``[..., N]``, ``state`` ``[..., N, d]`` -> ``(y [..., N], state)``."""
    dt = np.exp(p["log_dt"])[:, None]  # [N, 1]
    A = -np.exp(p["A_log"])  # [N, d]
    A_bar, gain = zoh(dt, A)
    B_bar = gain * p["B"]
    state = state * A_bar + B_bar * x[..., None]
    y = np.sum(state * p["C"], axis=-1) + x * p["D"]
    return y, state


def s5_step(p: dict, x, g):
    """S5: ``x`` ``[..., N]``, ``g`` ``[..., d]`` -> ``(y [..., N], g)``."""
    dt = np.exp(p["log_dt"])  # [1]
    A = -np.exp(p["A_log"])  # [d]
    A_bar, gain = zoh(dt, A)
    g = g * A_bar + gain * (x @ p["B"])  # [..., d]
    y = g @ p["C"] + x * p["D"]
    return y, g


def _selective(u, h, proj_w, dt_w, dt_b, A_log, D, discretization="zoh"):
    """The S6 core: ``u`` ``[..., N]``, ``h`` ``[..., N, d]``."""
    rank = dt_w.shape[1]
    d = A_log.shape[1]
    proj = u @ proj_w.T
    dt_raw, B, C = proj[..., :rank], proj[..., rank:rank + d], proj[..., rank + d:rank + 2 * d]
    assert proj.shape[-1] == rank + 2 * d
    dt = softplus(dt_raw @ dt_w.T + dt_b)[..., None]  # [..., N, 1]
    A = -np.exp(A_log)  # [N, d]
    A_bar, gain = {"zoh": zoh, "euler": euler}[discretization](dt, A)  # [..., N, d], [..., N, d or 1]
    B_bar = gain * B[..., None, :]
    h = h * A_bar + B_bar * u[..., None]
    y = np.sum(h * C[..., None, :], axis=-1) + u * D
    return y, h


def s6_step(p: dict, x, state, discretization="zoh"):
    """S6: ``x`` ``[..., N]``, ``state`` ``[..., N, d]``."""
    return _selective(
        x, state, p["x_proj.weight"], p["dt_proj.weight"], p["dt_proj.bias"], p["A_log"], p["D"], discretization
    )


def mamba_step(p: dict, x, ssm_state, conv_buffer=None, discretization="zoh", residual=True):
    """Mamba block: ``x`` ``[..., N]``, ``ssm_state`` ``[..., I, d]``, ``conv_buffer`` ``[..., I, K]`` or None.

    ``I`` is the inner width, ``in_proj.weight``'s rows halved. Returns ``(y, ssm_state, conv_buffer)``.
    """
    inner = p["in_proj.weight"].shape[0] // 2
    xz = x @ p["in_proj.weight"].T + p.get("in_proj.bias", 0.0)
    main, gate = xz[..., :inner], xz[..., inner:]
    if conv_buffer is not None:
        conv_buffer = np.concatenate([conv_buffer[..., 1:], main[..., None]], axis=-1)
        main = np.sum(conv_buffer * p["conv_weights"], axis=-1) + p.get("conv_bias", 0.0)
    u = silu(main)
    y, ssm_state = _selective(
        u, ssm_state, p["ssm_proj.weight"], p["dt_proj.weight"], p["dt_proj.bias"], p["A_log"], p["D"], discretization
    )
    y = (y * silu(gate)) @ p["out_proj.weight"].T + p.get("out_proj.bias", 0.0)
    return (y + x if residual else y), ssm_state, conv_buffer


# ----------------------------------------------------------------------------- whole sequences, any feature axis


def state_names(layer: str, kwargs: dict) -> list:
    """The hidden states ``layer`` keeps, as traceTorch names them."""
    if layer in ("S4", "S6"):
        return ["state"]
    if layer == "S5":
        return ["global_state"]
    if layer == "Mamba":
        return ["ssm_state", "conv_buffer"] if kwargs.get("conv_kernel", 4) > 1 else ["ssm_state"]
    raise ValueError(f"unknown layer {layer!r}")


_DEFAULT_D_STATE = {"S4": 64, "S5": 64, "S6": 16, "Mamba": 16}


def run(layer: str, kwargs: dict, params: dict, inputs):
    """Step ``layer`` over ``inputs`` ``[T, *shape]`` (features at ``kwargs.get("dim", -1)`` of ``shape``).

    Returns ``(outputs [T, *shape], {state name: final state})``, in float64,
    states in the traceTorch layout: the input's shape with the feature size
    (``d_state`` for S5's ``global_state``, the inner width for Mamba's) at the feature axis and, except for
    S5, ``d_state`` (``conv_kernel`` for ``conv_buffer``) appended.
    """
    p = _f64(params)
    xs = np.asarray(inputs, dtype=np.float64)
    ndim = xs.ndim - 1
    dim = kwargs.get("dim", -1)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} out of range for {ndim}-d inputs")
    axis = dim % ndim
    N = kwargs["num_neurons"]
    if xs.shape[1 + axis] != N:
        raise ValueError(f"inputs {xs.shape} have no {N} features on axis {axis}")
    d = kwargs.get("d_state", _DEFAULT_D_STATE[layer])
    xw = np.moveaxis(xs, 1 + axis, -1)  # [T, *batch, N]
    batch = xw.shape[1:-1]

    outs = []
    if layer == "S4":
        h = np.zeros(batch + (N, d))
        for x in xw:
            y, h = s4_step(p, x, h)
            outs.append(y)
        states = {"state": np.moveaxis(h, -2, axis)}
    elif layer == "S5":
        g = np.zeros(batch + (d,))
        for x in xw:
            y, g = s5_step(p, x, g)
            outs.append(y)
        states = {"global_state": np.moveaxis(g, -1, axis)}
    elif layer == "S6":
        h = np.zeros(batch + (N, d))
        for x in xw:
            y, h = s6_step(p, x, h, kwargs.get("discretization", "zoh"))
            outs.append(y)
        states = {"state": np.moveaxis(h, -2, axis)}
    elif layer == "Mamba":
        K = kwargs.get("conv_kernel", 4)
        inner = kwargs.get("expand", 1) * N
        h = np.zeros(batch + (inner, d))
        buf = np.zeros(batch + (inner, K)) if K > 1 else None
        options = {"discretization": kwargs.get("discretization", "zoh"), "residual": kwargs.get("residual", True)}
        for x in xw:
            y, h, buf = mamba_step(p, x, h, buf, **options)
            outs.append(y)
        states = {"ssm_state": np.moveaxis(h, -2, axis)}
        if buf is not None:
            states["conv_buffer"] = np.moveaxis(buf, -2, axis)
    else:
        raise ValueError(f"unknown layer {layer!r}")
    outputs = np.moveaxis(np.stack(outs), -1, 1 + axis)
    assert outputs.shape == xs.shape
    return outputs, states


def _float64(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor (any dtype, device, autograd), without importing torch
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def rel_err(a, b) -> float:
    """Normwise relative error ``max|a - b| / max|b|`` in float64 (``b`` is the reference).

    Takes NumPy arrays, anything ``np.asarray`` converts, and torch tensors.
    """
    a = _float64(a)
    b = _float64(b)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {b.shape}")
    if b.size == 0:
        return 0.0
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    if not np.isfinite(diff):
        return float("inf")
    return diff if scale == 0.0 else diff / scale
