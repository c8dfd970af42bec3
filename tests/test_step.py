"""One step: what a layer returns and keeps, for any feature axis and dtype.

Outputs have the input's shape and dtype; states have the traceTorch layout
(the input's shape with the feature size, or ``d_state`` for S5, at ``dim``,
and ``d_state`` or the kernel appended) and give the same numbers as the
features-last layer, transposed; the same input gives other outputs at
other times (a state is kept) and the same ones after ``zero_states``; batch
elements never mix; a torch layer converted to another dtype steps in it, and
refuses an input or held states of another dtype with a TypeError.
The hypothesis-driven forms are in ``test_properties.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tracetorch as tt
from conftest import ALL, N, TOL, assert_states_equal, cloned_states, copy_params, make_layer, rel_err, state_names

T = 4
BATCH_SHAPES = [(), (2,), (2, 3, 5)]


def _dim_cases():
    """(batch shape, dim) with the feature axis first, in the middle and last, as +/- indices."""
    cases = []
    for batch in BATCH_SHAPES:
        ndim = len(batch) + 1
        axes = sorted({0, ndim // 2, ndim - 1} | ({1, 2} if ndim == 4 else set()))
        for axis in axes:
            for dim in (axis, axis - ndim):
                cases.append(pytest.param(batch, dim, id=f"batch{len(batch)}-dim{dim}"))
    return cases


DIM_CASES = _dim_cases()


def _inputs(batch, dim, n=N, steps=T, dtype=torch.float64, seed=0):
    """``steps`` inputs of the batch shape with ``n`` features inserted at axis ``dim``."""
    gen = torch.Generator().manual_seed(seed)
    ndim = len(batch) + 1
    axis = dim % ndim
    shape = list(batch)
    shape.insert(axis, n)
    return torch.randn((steps, *shape), generator=gen, dtype=torch.float64).to(dtype), axis


def _expected_state_shape(cls_name, kwargs, name, x_shape, axis):
    shape = list(x_shape)
    if name == "global_state":
        shape[axis] = kwargs["d_state"]
        return tuple(shape)
    shape[axis] = kwargs["num_neurons"] * kwargs.get("expand", 1)  # Mamba's states have its inner width
    trailing = kwargs.get("conv_kernel", 4) if name == "conv_buffer" else kwargs["d_state"]
    return tuple(shape) + (trailing,)


@pytest.mark.parametrize("batch,dim", DIM_CASES)
@pytest.mark.parametrize("case", ALL)
def test_feature_axis_anywhere(case, batch, dim):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs, dim=dim)
    ref = make_layer(cls_name, kwargs, dim=-1, seed=99)
    copy_params(ref, layer)  # same parameters, features last
    xs, axis = _inputs(batch, dim)

    with torch.no_grad():
        for t in range(T):
            x = xs[t]
            y = layer(x)
            y_ref = ref(x.movedim(axis, -1))
            assert y.shape == x.shape
            assert y.dtype == x.dtype
            err = rel_err(y, y_ref.movedim(-1, axis))
            assert err <= TOL["float64"], f"step {t}: output rel err {err:.3e}"

            for name in state_names(cls_name, kwargs):
                state = getattr(layer, name)
                assert state is not None, name
                assert tuple(state.shape) == _expected_state_shape(cls_name, kwargs, name, x.shape, axis), name
                assert state.dtype == x.dtype
                ref_state = getattr(ref, name)
                # ref layout: [..., size] or [..., size, trailing] with the other axes in order.
                moved = ref_state.movedim(-1, axis) if name == "global_state" else ref_state.movedim(-2, axis)
                err = rel_err(state, moved)
                assert err <= TOL["float64"], f"step {t}: {name} rel err {err:.3e}"
    assert set(layer._state_names) == set(state_names(cls_name, kwargs))


@pytest.mark.parametrize("case", ALL)
def test_outputs_depend_on_history(binding, case):
    """A stateful layer: the same input gives different outputs at different times, and again after a reset."""
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs, dtype="float64")
    x = b.asarray(np.random.default_rng(0).standard_normal((2, N)))
    y1 = b.to_numpy(b.step(layer, x))
    y2 = b.to_numpy(b.step(layer, x))
    b.zero_states(layer)
    y3 = b.to_numpy(b.step(layer, x))
    assert not np.allclose(y1, y2)
    np.testing.assert_array_equal(y1, y3)


@pytest.mark.parametrize("case", ALL)
def test_batch_elements_are_independent(binding, case):
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs, dtype="float64")
    xs = np.random.default_rng(0).standard_normal((T, 3, N))
    full = b.steps(layer, xs)
    for i in range(3):
        b.zero_states(layer)
        assert rel_err(full[:, i], b.steps(layer, xs[:, i])) <= TOL["float64"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", ALL)
def test_states_follow_input_dtype(case, dtype):
    _, cls_name, kwargs = case
    torch.manual_seed(0)
    layer = getattr(tt.ssm, cls_name)(**kwargs)
    assert all(p.dtype == torch.float32 for p in layer.parameters())  # default dtype
    layer.to(dtype)
    x = torch.randn(2, N, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    for name in state_names(cls_name, kwargs):
        assert getattr(layer, name).dtype == dtype, name
    # and back: convert, reset, run again
    other = torch.float64 if dtype == torch.float32 else torch.float32
    layer.to(other)
    layer.zero_states()
    y2 = layer(x.to(other))
    assert y2.dtype == other
    for name in state_names(cls_name, kwargs):
        assert getattr(layer, name).dtype == other, name
    assert rel_err(y2, y) <= TOL["float32"]  # the same (float32-valued) weights: float32 rounding apart


@pytest.mark.parametrize("case", ALL)
def test_dtype_conversion_while_states_are_held(case):
    """A layer converted to float32 while it holds float64 states, then stepped on float32 input.

    Documented: outside autocast the dtypes must match; a held state of another
    dtype than the input is a TypeError naming the layer and both dtypes, saying
    to call ``zero_states()``, with the states left as they were. An input of
    another dtype than the layer's parameters is the same kind of error.
    """
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    layer(torch.randn(2, N, dtype=torch.float64))
    layer.to(torch.float32)
    snap = cloned_states(layer)
    with pytest.raises(TypeError) as error:
        layer(torch.randn(2, N, dtype=torch.float32))
    message = str(error.value)
    for word in (f"{cls_name}:", "torch.float64", "torch.float32", "zero_states()"):
        assert word in message, message
    assert_states_equal(layer, snap)
    layer.zero_states()
    assert layer(torch.randn(2, N, dtype=torch.float32)).dtype == torch.float32  # after the reset it steps
    snap = cloned_states(layer)
    with pytest.raises(TypeError, match=rf"^{cls_name}: expected input of dtype torch\.float32 .* got torch\.float64"):
        layer(torch.randn(2, N, dtype=torch.float64))
    assert_states_equal(layer, snap)
