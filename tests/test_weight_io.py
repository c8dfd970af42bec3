"""Weights in: ``load_state_dict`` on every binding, and torch weights in every backend.

- strict loading rejects missing, unexpected, mis-shaped, non-floating and
  data-less entries with a clear error and loads nothing (all or nothing, for
  a layer and for a ``tt.Model``); ``strict=False`` loads what is there;
- the given arrays are copied;
- a backend layer's dtype follows the loaded weights unless one was given;
- a torch layer's ``state_dict()`` (parameters with gradients, any dtype)
  loads into every backend (also through ``from_torch``) and gives the torch
  outputs and states; bfloat16 weights load exactly (into a float32 layer
  where the library has no bfloat16, and only when asked for by ``dtype=``).

That a layer computes with its current weights however they changed is
``test_weight_freshness.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ssm_core
import tracetorch as tt
from conftest import (
    BACKENDS, D_STATE, FIVE, N, ONE_OF_EACH, TOL, random_weights, rel_err, skip_mlx_float64_on_gpu, state_names,
)


def _defects(b, good: dict) -> dict:
    """``{label: (mapping, load_state_dict keywords, the kind a backend raises)}``, the defective entry last."""
    last = list(good)[-1]
    shape = good[last].shape
    defects = {
        "missing": ({k: v for k, v in good.items() if k != last}, {}, ValueError),
        "extra": ({**good, "extra.weight": np.zeros(2)}, {}, ValueError),
        "mis-shaped": ({**good, last: np.zeros(shape + (1,))}, {}, ValueError),
        "mis-shaped, non-strict": ({**good, last: np.zeros(shape + (2,))}, {"strict": False}, ValueError),
        "int64": ({**good, last: np.arange(np.prod(shape)).reshape(shape)}, {}, TypeError),
        "bool": ({**good, last: np.ones(shape, bool)}, {}, TypeError),
        "complex": ({**good, last: np.ones(shape, np.complex128)}, {}, TypeError),
        "meta tensor": ({**good, last: torch.ones(shape, dtype=torch.float64, device="meta")}, {}, None),
    }
    if b.mod is None:  # the torch layers take tensors: a NumPy array is a defect there
        defects["numpy array"] = (dict(good), {}, None)
        return {label: ({k: v if torch.is_tensor(v) or (label, k) == ("numpy array", last) else torch.from_numpy(v)
                         for k, v in m.items()}, kw, kind) for label, (m, kw, kind) in defects.items()}
    defects["transposed torch"] = ({**good, last: torch.zeros(tuple(reversed(shape)) + (2,))}, {}, ValueError)
    defects["int32 torch"] = ({**good, last: torch.ones(shape, dtype=torch.int32)}, {}, TypeError)
    return defects


@pytest.mark.parametrize("held", [False, True], ids=["states-none", "states-held"])
@pytest.mark.parametrize("case", FIVE)
def test_load_state_dict_is_all_or_nothing(binding, case, held):
    """A bad entry after valid ones (float64, other values: loading any would change values and dtype) loads nothing.

    The error names the layer (a backend: ``ValueError`` for keys and shapes,
    ``TypeError`` for a non-floating or unconvertible entry; torch either);
    the layer keeps its dtype and steps exactly as an untouched twin; the
    valid weights then load.
    """
    b, (_, name, kwargs) = binding, case
    if b.mod is None:
        layer, twin = b.make(name, kwargs), b.make(name, kwargs)  # float32
    else:  # float32 weights, the dtype not fixed: loading any float64 entry would change it
        weights = {k: v.astype(np.float32) for k, v in random_weights(name, kwargs).items()}
        layer, twin = b.cls(name)(**kwargs), b.cls(name)(**kwargs)
        layer.load_state_dict(weights)
        twin.load_state_dict(weights)
    x = b.asarray(np.random.default_rng(0).standard_normal((2, N)).astype(np.float32))
    if held:
        b.step(layer, x)
        b.step(twin, x)
    dtype = layer.dtype if b.mod is not None else layer.A_log.dtype
    good = {k: v + 1.0 for k, v in random_weights(name, kwargs, seed=9).items()}  # float64
    problems = []
    for label, (mapping, kw, kind) in _defects(b, good).items():
        problems += b.expect_error(layer, f"load_state_dict {label}", lambda: layer.load_state_dict(mapping, **kw),
                                   (ValueError, TypeError) if b.mod is None or kind is None else kind)
    assert (layer.dtype if b.mod is not None else layer.A_log.dtype) == dtype
    assert not problems, "\n".join(problems)
    np.testing.assert_array_equal(b.to_numpy(b.step(layer, x)), b.to_numpy(b.step(twin, x)))
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in good.items()} if b.mod is None else good)
    for key, value in b.params(layer).items():
        np.testing.assert_array_equal(value, good[key].astype(value.dtype), err_msg=key)


class _All(tt.Model):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(getattr(tt.ssm, n)(**kw) for _, n, kw in (p.values[0] for p in ONE_OF_EACH))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


TORCH_DEFECTS = ["mis-shaped", "integer", "bool", "complex", "numpy array", "missing", "extra", "mis-shaped non-strict",
                 "meta"]


@pytest.mark.parametrize("defect", TORCH_DEFECTS)
def test_model_load_state_dict_is_all_or_nothing(defect):
    """A ``tt.Model``: a bad entry after the valid ones of every layer leaves every layer as it was."""
    model = _All().double()
    with torch.no_grad():
        model(torch.randn(2, N, dtype=torch.float64))  # states held
    good = {k: v.detach() + 1.0 for k, v in model.state_dict().items()}
    last = list(good)[-1]
    shape = good[last].shape
    bad, strict = dict(good), True
    if defect in ("mis-shaped", "mis-shaped non-strict"):
        bad[last] = torch.zeros(shape + (2,), dtype=torch.float64)
        strict = defect == "mis-shaped"
    elif defect in ("integer", "bool", "complex"):
        bad[last] = torch.ones(shape, dtype={"integer": torch.int64, "bool": torch.bool, "complex": torch.complex128}[defect])
    elif defect == "numpy array":
        bad[last] = good[last].numpy()
    elif defect == "missing":
        del bad[last]
    elif defect == "extra":
        bad["zzz.weight"] = torch.zeros(3, dtype=torch.float64)
    else:
        bad[last] = good[last].to("meta")
    assert list(bad)[: len(good) - 1] == list(good)[: len(good) - 1]  # the valid entries come first
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [(layer, n, getattr(layer, n), getattr(layer, n).clone()) for layer in model.layers
              for n in layer._state_names]
    with pytest.raises((ValueError, TypeError)) as info:
        model.load_state_dict(bad, strict=strict)
    assert "_All" in str(info.value)
    now = model.state_dict()
    assert not [k for k, v in params.items() if now[k].dtype != v.dtype or not torch.equal(now[k], v)]
    for layer, n, ref, copy in states:
        assert getattr(layer, n) is ref and torch.equal(ref, copy), f"state {type(layer).__name__}.{n} changed"
    model.load_state_dict(good)  # the valid dict still loads
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[k]), k


def test_load_state_dict_non_strict_loads_what_is_there(binding):
    b = binding
    kwargs = dict(num_neurons=N, d_state=D_STATE)
    layer = b.make("S4", kwargs, seed=2)
    before = b.params(layer)
    new_c = np.random.default_rng(0).standard_normal((N, D_STATE)).astype(np.float32)
    extra = np.zeros(3, np.float32)
    as_given = torch.from_numpy if b.mod is None else (lambda a: a)
    layer.load_state_dict({"C": as_given(new_c), "not_a_param": as_given(extra)}, strict=False)
    after = b.params(layer)
    np.testing.assert_array_equal(after["C"], new_c)
    for key in ("A_log", "B", "log_dt", "D"):
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    # The time-invariant dynamics follow the new C: outputs equal a layer built from the merged weights.
    twin = b.make("S4", kwargs, weights={**before, "C": new_c})
    x = b.asarray(np.random.default_rng(1).standard_normal((2, N)).astype(np.float32))
    np.testing.assert_array_equal(b.to_numpy(b.step(layer, x)), b.to_numpy(b.step(twin, x)))


def test_load_state_dict_copies_the_given_arrays(binding):
    b = binding
    skip_mlx_float64_on_gpu(b, "float64")
    kwargs = dict(num_neurons=N, d_state=D_STATE, dt_rank=2)
    weights = random_weights("S6", kwargs, seed=3)
    given = {k: b.asarray(v) for k, v in weights.items()}
    layer = b.make("S6", kwargs, dtype="float64")
    layer.load_state_dict(given)
    for value in given.values():
        b.fill(value, 0.0)
    for key, value in b.params(layer).items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)


@pytest.mark.parametrize("binding", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", FIVE)
def test_dtype_follows_loaded_weights_unless_given(binding, case):
    b, (_, name, kwargs) = binding, case
    skip_mlx_float64_on_gpu(b, "float64")
    f32, f64 = b.mod.backend.dtype("float32"), b.mod.backend.dtype("float64")
    weights = random_weights(name, kwargs, seed=4)
    x32 = b.asarray(np.ones((2, N), np.float32))
    x64 = b.asarray(np.ones((2, N), np.float64))

    follows = b.cls(name)(**kwargs)
    assert follows.dtype == f32  # the backend's default
    follows(x32)  # states held in float32
    follows.load_state_dict(weights)
    assert follows.dtype == f64
    assert all(v.dtype == f64 for v in follows.state_dict().values())
    assert all(v is None or v.dtype == f64 for v in b.states(follows).values())
    for key, value in b.params(follows).items():
        np.testing.assert_array_equal(value, weights[key], err_msg=key)
    assert follows(x64).dtype == f64
    with pytest.raises(TypeError, match="dtype"):
        follows(x32)

    fixed = b.cls(name)(**kwargs, dtype="float32")
    fixed.load_state_dict(weights)
    assert fixed.dtype == f32
    for key, value in b.params(fixed).items():
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, weights[key].astype(np.float32), err_msg=key)
    assert fixed(x32).dtype == f32
    with pytest.raises(TypeError, match="dtype"):
        fixed(x64)


# ----------------------------------------------------------------------------- torch weights into every backend


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("binding", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", FIVE)
def test_torch_weights_give_torch_outputs(case, binding, dtype):
    """A torch ``state_dict()`` (``Parameter``s with gradients) loads as it is; outputs and states match torch's."""
    b, (_, name, kwargs) = binding, case
    skip_mlx_float64_on_gpu(b, dtype)
    kw = {**kwargs, "dim": -2}
    torch.manual_seed(0)
    tl = getattr(tt.ssm, name)(**kw).to(getattr(torch, dtype))
    sd = tl.state_dict(keep_vars=True)
    assert all(isinstance(v, torch.nn.Parameter) and v.requires_grad for v in sd.values())
    layer = b.cls(name)(**kw)  # default dtype: follows the weights
    layer.load_state_dict(sd)
    assert layer.dtype == b.mod.backend.dtype(dtype)
    for key, value in layer.state_dict().items():
        assert value.dtype == layer.dtype, key
        np.testing.assert_array_equal(b.to_numpy(value), sd[key].detach().numpy(), err_msg=key)
    xs = np.random.default_rng(0).standard_normal((10, 2, N, 3)).astype(dtype)
    with torch.no_grad():
        ty = np.stack([tl(torch.from_numpy(x)).numpy() for x in xs])
    by = b.steps(layer, xs)
    assert by.dtype == np.dtype(dtype)
    assert rel_err(by, ty) <= TOL[dtype]
    for state in state_names(name, kwargs):
        t_state = getattr(tl, state).numpy()
        b_state = b.to_numpy(getattr(layer, state))
        assert b_state.shape == t_state.shape, state
        assert rel_err(b_state, t_state) <= TOL[dtype], state


@pytest.mark.parametrize("binding", BACKENDS, indirect=True)
def test_from_torch_converts_config_and_weights(binding):
    b = binding
    torch.manual_seed(0)
    tl = tt.ssm.Mamba(N, d_state=D_STATE, conv_kernel=3, dim=0)
    layer = b.mod.from_torch(tl)
    assert type(layer) is b.mod.Mamba
    assert layer.config == ssm_core.MambaConfig(N, D_STATE, 0, -1, 3)
    xs = np.random.default_rng(0).standard_normal((6, N, 2)).astype(np.float32)
    with torch.no_grad():
        ty = np.stack([tl(torch.from_numpy(x)).numpy() for x in xs])
    assert rel_err(b.steps(layer, xs), ty) <= TOL["float32"]


# Two bfloat16 layers computing in float32 in another order round a result near a rounding
# boundary to neighbouring bfloat16 values: one ulp, at most 2**-7 of the largest output.
BFLOAT16_ULP = 2.0**-7
# A float32 output against torch's bfloat16 rounding of it: half an ulp, 2**-8 of the largest output.
BFLOAT16_ROUNDING = 2.0**-8


@pytest.mark.parametrize("binding", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", FIVE)
def test_bfloat16_torch_weights(case, binding):
    """A bfloat16 torch layer's weights load exactly: as bfloat16 where the library has it (MLX),
    into a float32 layer where it has not (NumPy has no bfloat16: without ``dtype=`` a clear error).
    Outputs and states are the torch layer's, to bfloat16's rounding of the outputs."""
    b, (_, name, kwargs) = binding, case
    tl = getattr(tt.ssm, name)(**kwargs)
    tl.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(name, kwargs, seed=5).items()})
    tl = tl.bfloat16()
    try:
        b.mod.backend.dtype("bfloat16")
        native = True
    except (TypeError, KeyError):
        native = False
    if native:
        layer = b.mod.from_torch(tl)
        assert layer.dtype == b.mod.backend.dtype("bfloat16")
        input_dtype, tol = "bfloat16", BFLOAT16_ULP
    else:
        with pytest.raises(TypeError, match=rf"{name} \({b.name}\): A_log is a torch bfloat16 tensor, .*dtype='float32'"):
            b.mod.from_torch(tl)
        layer = b.mod.from_torch(tl, dtype="float32")
        input_dtype, tol = "float32", BFLOAT16_ROUNDING
    for key, value in tl.state_dict().items():
        np.testing.assert_array_equal(b.to_numpy(layer.state_dict()[key]), value.float().numpy(), err_msg=key)
    xs = torch.randn(40, 2, N).bfloat16()  # 40 steps: S4/S5 scans take their chunked form
    with torch.no_grad():
        steps = torch.stack([tl(x) for x in xs]).float().numpy()
        step_states = {k: getattr(tl, k).numpy() for k in state_names(name, kwargs)}
        tl.zero_states()
        scanned = tl.scan(xs).float().numpy()
        scan_states = {k: getattr(tl, k).numpy() for k in state_names(name, kwargs)}
    xs = xs.float().numpy()
    assert rel_err(np.stack([b.to_numpy(b.step(layer, b.asarray(x, input_dtype))) for x in xs]), steps) <= tol
    for key, value in step_states.items():
        assert rel_err(b.to_numpy(getattr(layer, key)), value) <= TOL["float32"], key
    b.zero_states(layer)
    assert rel_err(b.to_numpy(b.scan(layer, b.asarray(xs, input_dtype))), scanned) <= tol
    for key, value in scan_states.items():
        assert rel_err(b.to_numpy(getattr(layer, key)), value) <= TOL["float32"], key
