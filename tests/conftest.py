"""What the test files share: the bindings, the layer configurations, the weights.

- :class:`Binding` drives one binding of the four layers from NumPy arrays:
  the torch layers (:class:`TorchBinding`) or one ``backends.<name>`` module
  (:class:`ArrayBinding`). The ``binding`` fixture runs a test once per entry
  of ``BINDINGS``; a backend this machine cannot run is skipped with the
  reason ``backends.available()`` gives (what to install). A test that holds
  for some bindings only narrows it with
  ``@pytest.mark.parametrize("binding", [...], indirect=True)``.
- ``LAYER_CASES``: small configurations of the four layers; ``ALL``,
  ``ONE_OF_EACH``, ``FIVE`` and ``LTI`` are subsets of them as ``pytest.param``s.
- :func:`random_weights`: the weights a test loads into any binding (float64,
  keyed like ``state_dict()``): the init recipes plus noise, so no default
  value hides a bug.
- for the torch-only tests: :func:`make_layer` (a layer's own init, perturbed by
  :func:`perturb_`), :func:`run_steps`, :func:`cloned_states`, :func:`assert_states_equal`.
- ``rel_err``, ``state_names`` and ``FIXTURE_DIR`` come from ``numpy_oracle``.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not necessarily installed
    sys.path.insert(0, str(ROOT))

import backends  # noqa: E402
import ssm_core  # noqa: E402
import tracetorch as tt  # noqa: E402
from numpy_oracle import FIXTURE_DIR, rel_err, state_names  # noqa: E402,F401

# Two threads (or one on a one-core machine), unless OMP_NUM_THREADS says how many: the suite must pass with
# one thread and with two alike (a reduction split over threads sums in another order).
_THREADS = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_THREADS) if _THREADS.isdigit() and int(_THREADS) > 0 else min(2, os.cpu_count() or 1))

# ----------------------------------------------------------------------------- layer configurations

N = 4
D_STATE = 3
# (id, class name, constructor kwargs)
LAYER_CASES = [
    ("S4", "S4", dict(num_neurons=N, d_state=D_STATE)),
    ("S5", "S5", dict(num_neurons=N, d_state=D_STATE)),
    ("S6", "S6", dict(num_neurons=N, d_state=D_STATE)),
    ("S6_rank2", "S6", dict(num_neurons=N, d_state=D_STATE, dt_rank=2)),
    ("Mamba", "Mamba", dict(num_neurons=N, d_state=D_STATE)),
    ("Mamba_k2", "Mamba", dict(num_neurons=N, d_state=D_STATE, conv_kernel=2)),
    ("Mamba_noconv", "Mamba", dict(num_neurons=N, d_state=D_STATE, conv_kernel=1)),
    # The options Hugging Face's checkpoints need, each away from its default: Euler's rule, the inner
    # width, the projection biases, no conv bias, no residual.
    ("S6_euler", "S6", dict(num_neurons=N, d_state=D_STATE, discretization="euler")),
    ("Mamba_hf", "Mamba", dict(
        num_neurons=N, d_state=D_STATE, expand=2, discretization="euler", residual=False, bias=True, conv_bias=False,
    )),
]
LAYER_IDS = [case[0] for case in LAYER_CASES]
CASES = {case[0]: case for case in LAYER_CASES}


def cases(*ids) -> list:
    """The ``LAYER_CASES`` named ``ids``, as ``pytest.param``s with those ids."""
    return [pytest.param(CASES[i], id=i) for i in ids]


ALL = cases(*LAYER_IDS)
ONE_OF_EACH = cases("S4", "S5", "S6_rank2", "Mamba")  # each layer once (Mamba with its two states)
FIVE = cases("S4", "S5", "S6_rank2", "Mamba", "Mamba_noconv")  # and Mamba without its convolution
LTI = cases("S4", "S5")  # the time-invariant layers (TTcompile freezes their dynamics)
OPTIONED = cases("S6_euler", "Mamba_hf")  # the layers with options other than 0.19.2's
# Normwise relative error (``rel_err``) allowed between two computations of the same layers in one dtype, or
# between one and the float64 oracle, over the suite's runs (at most 150 steps, 2-8 features, d_state <= 6).
# Measured worst, on an AVX-512 CPU with ATEN_CPU_CAPABILITY native, avx2 and default, 1 and 2 threads, torch,
# NumPy, array-api-strict and MLX: float32 1.3e-6 (11 eps32; the property tests at 150 steps against the
# oracle), float64 1.3e-15 (6 eps64). float32: 5e-6 (42 eps32), four times the worst. float64: 1e-12, near a
# thousand times the worst (room for another BLAS's or a GPU's summation order, not measured here), and still
# fails a formula that is off by 5e-11, which 1e-10 let through.
TOL = {"float32": 5e-6, "float64": 1e-12}
# Gradients through a scan against stepping's: a sum over every step and batch element, in reverse, so a
# larger error than the outputs'. Measured worst over the same configurations: float32 1.9e-6
# (ATEN_CPU_CAPABILITY=default), float64 1.2e-14. float32 1e-5 is five times that, float64 1e-12 eighty times.
GRAD_TOL = {"float32": 1e-5, "float64": 1e-12}
# traceTorch 0.19.2's float64 recordings against exact math: it divides the S6/Mamba gain by A + 1e-12 (a
# relative change of 1e-12 / |A| <= 1.3e-12 for the recorded |A| >= 0.77) and forms exp(dt A) - 1 with
# cancellation (eps64 / |dt A| relative, <= 3e-14 for the recorded |dt A| >= 0.008); measured 1.03e-12.
# 1e-11 holds that bound with a margin of seven.
RECORDING_TOL = 1e-11

# ----------------------------------------------------------------------------- weights


def _inverse_softplus(y):
    return y + np.log(-np.expm1(-y))


def random_weights(layer: str, kwargs: dict, seed: int = 0) -> dict:
    """A float64 traceTorch ``state_dict`` for ``layer(**kwargs)``: the init recipes plus 0.1 noise.

    ``dt`` is drawn log-uniform in ``[0.01, 0.3]`` (a bit larger than the
    init's ``[1e-3, 1e-1]`` so that the states move within a few steps).
    """
    rng = np.random.default_rng(seed)
    config = ssm_core.LAYERS[layer].config(**kwargs)
    shapes = config.param_shapes()
    N, d = config.num_neurons, config.d_state

    def noise(shape):
        return 0.1 * rng.standard_normal(shape)

    def log_dt(shape):
        return rng.uniform(np.log(0.01), np.log(0.3), shape)

    out = {}
    for key, shape in shapes.items():
        if key == "A_log":
            value = np.log(np.arange(1, shape[-1] + 1, dtype=np.float64)) * np.ones(shape) + noise(shape)
        elif key == "log_dt":
            value = log_dt(shape)
        elif key == "dt_proj.bias":
            value = _inverse_softplus(np.exp(log_dt(shape)))
        elif key == "D":
            value = 1.0 + noise(shape)
        elif layer == "S4" and key == "B":
            value = 1.0 + noise(shape)
        elif layer == "S4" and key == "C":
            value = rng.standard_normal(shape)
        elif layer == "S5" and key == "B":
            value = rng.standard_normal(shape) / np.sqrt(N)
        elif layer == "S5" and key == "C":
            value = rng.standard_normal(shape) / np.sqrt(d)
        elif key in ("in_proj.bias", "out_proj.bias"):  # Mamba's bias=True
            value = rng.uniform(-0.5, 0.5, shape)
        elif key.endswith(".weight") or key in ("conv_weights", "conv_bias"):
            fan_in = shapes["conv_weights"][-1] if key.startswith("conv_") else shape[-1]
            bound = 1.0 / np.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape) + noise(shape)
        else:  # pragma: no cover - a new parameter needs a recipe here
            raise AssertionError(f"no recipe for {layer}.{key}")
        assert value.shape == shape and value.dtype == np.float64, key
        out[key] = value
    return out


# ----------------------------------------------------------------------------- bindings

BINDINGS = ["torch", "numpy", "mlx", "array_api_strict", "cupy"]
BACKENDS = BINDINGS[1:]
TORCH_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
TORCH_CUDA_REASON = "needs an NVIDIA GPU with a CUDA build of torch"


@functools.lru_cache(maxsize=None)
def unusable() -> dict:
    """``backends.available()``, asked once: ``{backend: None or why it cannot run here}``."""
    return backends.available()


class OneLayerModel(tt.Model):
    """A model around one torch layer: torch layers save and load states through ``tt.Model``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _diff(now: dict, before: dict, what: str) -> list:
    if set(now) != set(before):
        return [f"{what} keys changed: {sorted(before)} -> {sorted(now)}"]
    problems = []
    for key, b in before.items():
        a = now[key]
        if a is None or b is None:
            if (a is None) != (b is None):
                problems.append(f"{what} {key}: {'None' if b is None else 'array'} -> {'None' if a is None else 'array'}")
        elif a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
            problems.append(f"{what} {key} changed ({b.dtype}{b.shape} -> {a.dtype}{a.shape})")
    return problems


class Binding:
    """One binding of the layers, driven from NumPy arrays.

    ``make`` builds a layer with weights loaded; ``asarray``/``to_numpy`` cross
    between NumPy and the binding's arrays (copies); ``step``/``scan`` run it
    (torch without autograd); ``states`` are the held states (not copies),
    ``params`` host copies of the weights; ``save_states``/``load_states``
    move states as the binding's user does.
    """

    name: str
    mod = None  # the backends module; None for torch
    library = None  # the array library's own module (torch, numpy, mlx.core, ...)
    array_types: tuple  # the library's array classes

    def cls(self, layer: str):
        return getattr(self.mod, layer)

    def make(self, layer: str, kwargs: dict, dtype: str = "float32", weights=None, seed: int = 0):
        """``layer(**kwargs)`` in ``dtype`` with ``weights`` (by default :func:`random_weights` of ``seed``)."""
        obj = self.cls(layer)(**kwargs, dtype=dtype)
        obj.load_state_dict(random_weights(layer, kwargs, seed) if weights is None else weights)
        return obj

    def asarray(self, value, dtype=None):
        value = np.array(value, order="C")
        if dtype == "bfloat16":  # NumPy has none: through float32
            import mlx.core as mx

            return mx.array(value.astype(np.float32)).astype(mx.bfloat16)
        return self.mod.asarray(value if dtype is None else value.astype(dtype))

    def to_numpy(self, array) -> np.ndarray:
        if self.name == "mlx":
            import mlx.core as mx

            if array.dtype == mx.bfloat16:
                array = array.astype(mx.float32)
        return np.array(self.mod.backend.to_numpy(array), copy=True)

    def step(self, layer, x):
        return layer(x)

    def scan(self, layer, xs, time_dim=0):
        return layer.scan(xs, time_dim=time_dim)

    def steps(self, layer, xs) -> np.ndarray:
        """Step over the NumPy inputs ``xs[t]``; the outputs stacked, in NumPy."""
        if not len(xs):
            return np.zeros(xs.shape, xs.dtype)
        return np.stack([self.to_numpy(self.step(layer, self.asarray(x))) for x in xs])

    def state_names(self, layer) -> list:
        return sorted(layer._states)

    def states(self, layer) -> dict:
        """``{name: array or None}``: the held states themselves."""
        return {n: getattr(layer, n) for n in self.state_names(layer)}

    def host_states(self, layer) -> dict:
        return {n: (None if v is None else self.to_numpy(v)) for n, v in self.states(layer).items()}

    def params(self, layer) -> dict:
        return {k: self.to_numpy(v) for k, v in layer.state_dict().items()}

    def zero_states(self, layer) -> None:
        layer.zero_states()

    def save_states(self, layer) -> dict:
        return layer.save_states()

    def load_states(self, layer, states: dict, strict: bool = True):
        return layer.load_states(states, strict=strict)

    def fill(self, array, value) -> None:
        """Write ``value`` into every element of ``array``, in place."""
        array[...] = value  # every backend's arrays take item assignment

    def dtype_name(self, array) -> str:
        return str(array.dtype).rsplit(".", 1)[-1]

    def snapshot(self, layer) -> tuple:
        """Host copies of the weights and states, and the held states themselves (to see them replaced)."""
        return self.params(layer), self.host_states(layer), self.states(layer)

    def changes(self, layer, snap) -> list:
        """What changed since :meth:`snapshot`: weights or states (values, dtypes, shapes), or a state replaced."""
        params, states, held = snap
        problems = _diff(self.params(layer), params, "parameter") + _diff(self.host_states(layer), states, "state")
        now = self.states(layer)
        problems += [f"state {k} was replaced" for k, v in held.items() if v is not None and now.get(k) is not v]
        return problems

    def expect_error(self, layer, label, fn, exc, names=None, words=()) -> list:
        """Run ``fn``; the problems: no error, another kind, a message that names none of ``names``
        (by default the layer's class) or lacks one of ``words``, or anything changed in the layer."""
        names = (type(layer).__name__,) if names is None else names
        snap = self.snapshot(layer)
        problems = []
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - every kind is judged below
            message = str(error)
            if not isinstance(error, exc):
                problems.append(f"expected {exc}, got {type(error).__module__}.{type(error).__name__}: {message}")
            elif not any(n in message for n in names):
                problems.append(f"message does not name {names}: {message}")
            else:
                problems += [f"message lacks {w!r}: {message}" for w in words if w not in message]
        else:
            problems.append("no error raised")
        problems += self.changes(layer, snap)
        return [f"{label}: {p}" for p in problems]

    def __repr__(self):
        return self.name


class TorchBinding(Binding):
    """The torch layers ``tt.ssm.*`` on ``device``."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.name = "torch" if device == "cpu" else f"torch-{device}"
        self.array_types = (torch.Tensor,)
        self.library = torch

    def cls(self, layer: str):
        return getattr(tt.ssm, layer)

    def make(self, layer, kwargs, dtype="float32", weights=None, seed=0):
        tdtype = TORCH_DTYPES[dtype]
        weights = random_weights(layer, kwargs, seed) if weights is None else weights
        obj = self.cls(layer)(**kwargs).to(device=self.device, dtype=tdtype)
        obj.load_state_dict({k: torch.as_tensor(np.asarray(v)).to(tdtype) for k, v in weights.items()})
        return obj

    def asarray(self, value, dtype=None):
        tensor = torch.from_numpy(np.array(value, order="C"))  # a copy: never shares memory with the caller
        return tensor.to(device=self.device, dtype=None if dtype is None else TORCH_DTYPES[dtype])

    def to_numpy(self, array) -> np.ndarray:
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.to(torch.float32)
        return array.numpy().copy()

    def step(self, layer, x):
        with torch.no_grad():
            return layer(x)

    def scan(self, layer, xs, time_dim=0):
        with torch.no_grad():
            return layer.scan(xs, time_dim=time_dim)

    def state_names(self, layer) -> list:
        return sorted(layer._state_names)

    def save_states(self, layer) -> dict:
        return {k.split(".", 1)[1]: v for k, v in OneLayerModel(layer).save_states().items()}

    def load_states(self, layer, states: dict, strict: bool = True):
        return OneLayerModel(layer).load_states({f"layer.{k}": v for k, v in states.items()}, strict=strict)

    def fill(self, array, value) -> None:
        array.fill_(value)


class ArrayBinding(Binding):
    """The layers of one ``backends.<name>`` module."""

    def __init__(self, name: str):
        self.name = name
        self.mod = importlib.import_module(f"backends.{name}")
        self.array_types = self.mod.backend.array_types
        self.library = importlib.import_module("mlx.core" if name == "mlx" else name)


def get_binding(name: str) -> Binding:
    """The binding ``name`` ("torch", "torch-cuda" or a backend), or skip saying what is missing."""
    if name == "torch":
        return TorchBinding()
    if name == "torch-cuda":
        if not torch.cuda.is_available():
            pytest.skip(TORCH_CUDA_REASON)
        return TorchBinding("cuda")
    reason = unusable()[name]
    if reason is not None:
        pytest.skip(reason)
    return ArrayBinding(name)


@pytest.fixture(params=BINDINGS)
def binding(request) -> Binding:
    """Each binding of the layers in turn: torch, then every array backend (skipped with why where unusable)."""
    return get_binding(request.param)


def skip_mlx_float64_on_gpu(b: Binding, dtype: str) -> None:
    if b.name == "mlx" and dtype == "float64":
        import mlx.core as mx

        if mx.default_device().type != mx.cpu:
            pytest.skip(f"MLX has no float64 on the GPU (default device {mx.default_device()}); it runs on mx.cpu")


# ----------------------------------------------------------------------------- the torch-only tests


def perturb_(layer: torch.nn.Module, scale: float = 0.1, seed: int = 1234) -> torch.nn.Module:
    """Shift every parameter by ``scale * randn`` (so default values like B=1, D=1 hide nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return layer


def make_layer(cls_name: str, kwargs: dict, *, dim=None, dtype=torch.float64, seed: int = 0, perturb=True):
    """A torch layer built under ``torch.manual_seed(seed)`` (its own init), cast to ``dtype``, parameters perturbed.

    The torch-only tests use these; weights given to several bindings come from :func:`random_weights`.
    """
    kw = dict(kwargs)
    if dim is not None:
        kw["dim"] = dim
    torch.manual_seed(seed)
    layer = getattr(tt.ssm, cls_name)(**kw).to(dtype)
    if perturb:
        perturb_(layer, seed=seed + 1000)
    return layer


def copy_params(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    dst.load_state_dict(src.state_dict(), strict=True)


def held_states(layer) -> dict:
    """``{name: tensor or None}`` of a torch layer's hidden states (references, not copies)."""
    return {name: getattr(layer, name) for name in sorted(layer._state_names)}


def cloned_states(layer) -> dict:
    """Detached clones of a torch layer's hidden states (None stays None)."""
    return {k: (None if v is None else v.detach().clone()) for k, v in held_states(layer).items()}


def assert_states_equal(layer, snap: dict) -> None:
    now = held_states(layer)
    assert set(now) == set(snap)
    for name, before in snap.items():
        after = now[name]
        if before is None:
            assert after is None, f"{name} was None, is now a tensor"
        else:
            assert after is not None, f"{name} was a tensor, is now None"
            assert after.shape == before.shape and after.dtype == before.dtype, name
            assert torch.equal(after, before), f"{name} changed"


def run_steps(layer, xs):
    """Step ``layer`` over ``xs[t]`` and stack the outputs."""
    return torch.stack([layer(x) for x in xs])
