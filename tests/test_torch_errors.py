"""Errors of the torch layers: clear messages naming the layer, and states left untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ssm_core
import tracetorch as tt
from conftest import LAYER_CASES, LAYER_IDS, N, assert_states_equal, make_layer, snapshot

DT = torch.float64
CLASSES = ["S4", "S5", "S6", "Mamba"]


def _fresh(case, dim=-1):
    _, cls_name, kwargs = case
    return make_layer(cls_name, kwargs, dim=dim), cls_name


def _held(case, dim=-1, shape=(2, N)):
    layer, cls_name = _fresh(case, dim)
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    layer(x)
    layer(torch.randn(*shape, dtype=DT))
    return layer, cls_name


def _expect(layer, cls_name, exc, x, match=None):
    """``layer(x)`` raises ``exc`` naming the layer, and leaves every state exactly as it was."""
    refs = {n: getattr(layer, n) for n in layer._state_names}
    snap = snapshot(layer)
    with pytest.raises(exc) as info:
        layer(x)
    message = str(info.value)
    assert cls_name in message, f"message does not name {cls_name}: {message!r}"
    if match is not None:
        assert match in message, message
    assert_states_equal(layer, snap)
    for name, ref in refs.items():
        assert getattr(layer, name) is ref, f"{name} was replaced"
    return message


# --------------------------------------------------------------------------- forward errors


@pytest.mark.parametrize("held", [False, True], ids=["states-none", "states-held"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_wrong_feature_size(case, held):
    layer, cls_name = _held(case) if held else _fresh(case)
    _expect(layer, cls_name, ValueError, torch.randn(2, N + 1, dtype=DT))
    _expect(layer, cls_name, ValueError, torch.randn(2, N - 1, dtype=DT))
    _expect(layer, cls_name, ValueError, torch.randn(N, 2, dtype=DT))  # features on the wrong axis


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_wrong_feature_size_with_dim_first(case):
    layer, cls_name = _held(case, dim=0, shape=(N, 3))
    _expect(layer, cls_name, ValueError, torch.randn(3, N, dtype=DT))


@pytest.mark.parametrize(
    "new_shape", [(3, N), (N,), (1, 2, N), (2, 1, N)], ids=["batch3", "unbatched", "extra-axis", "extra-axis-2"]
)
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_batch_shape_change_while_states_held(case, new_shape):
    layer, cls_name = _held(case, shape=(2, N))
    message = _expect(layer, cls_name, ValueError, torch.randn(*new_shape, dtype=DT))
    assert "zero_states" in message
    layer.zero_states()
    y = layer(torch.randn(*new_shape, dtype=DT))  # fine after a reset
    assert y.shape == new_shape


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_batch_shape_change_dim_middle(case):
    layer, cls_name = _held(case, dim=1, shape=(2, N, 3))
    message = _expect(layer, cls_name, ValueError, torch.randn(2, N, 4, dtype=DT))
    assert "zero_states" in message


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.bool, torch.complex128, torch.complex64],
    ids=["int64", "int32", "bool", "complex128", "complex64"],
)
@pytest.mark.parametrize("held", [False, True], ids=["states-none", "states-held"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_non_real_float_input(case, held, dtype):
    layer, cls_name = _held(case) if held else _fresh(case)
    if dtype.is_complex:
        x = torch.randn(2, N, dtype=dtype)
    elif dtype == torch.bool:
        x = torch.ones(2, N, dtype=torch.bool)
    else:
        x = torch.ones(2, N, dtype=dtype)
    _expect(layer, cls_name, TypeError, x)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_non_tensor_input(case):
    layer, cls_name = _held(case)
    _expect(layer, cls_name, TypeError, np.zeros((2, N)))
    _expect(layer, cls_name, TypeError, [[0.0] * N] * 2)


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_input_dtype_differs_from_layer(case):
    layer, cls_name = _held(case)
    _expect(layer, cls_name, TypeError, torch.randn(2, N, dtype=torch.float32))
    layer32, _ = _fresh(case)
    layer32.to(torch.float32)
    _expect(layer32, cls_name, TypeError, torch.randn(2, N, dtype=torch.float64))


@pytest.mark.parametrize("held", [False, True], ids=["states-none", "states-held"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_dim_out_of_range(case, held):
    # dim=2 needs >= 3 axes; dim=-3 too
    for dim in (2, -3):
        shape = (2, 3, N) if dim == 2 else (N, 2, 3)
        layer, cls_name = _held(case, dim=dim, shape=shape) if held else _fresh(case, dim=dim)
        x = torch.randn(2, N, dtype=DT) if dim == 2 else torch.randn(N, 2, dtype=DT)
        message = _expect(layer, cls_name, ValueError, x)
        assert "dim" in message
        _expect(layer, cls_name, ValueError, torch.randn(N, dtype=DT))


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_zero_dim_input(case):
    layer, cls_name = _fresh(case)
    _expect(layer, cls_name, ValueError, torch.tensor(1.0, dtype=DT))
    layer, cls_name = _held(case)
    _expect(layer, cls_name, ValueError, torch.tensor(1.0, dtype=DT))


@pytest.mark.parametrize("held", [False, True], ids=["states-none", "states-held"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_failure_inside_the_step_stores_nothing(case, held, monkeypatch):
    """An exception raised by the math itself, mid-step, leaves the states as they were."""
    layer, cls_name = _held(case) if held else _fresh(case)

    class Boom(RuntimeError):
        pass

    def boom(*args, **kwargs):
        raise Boom(f"{cls_name}: boom")

    # The zero-order hold runs mid-step (for Mamba after its conv buffer was shifted).
    monkeypatch.setattr(ssm_core.lti, "zoh", boom)
    monkeypatch.setattr(ssm_core.selective, "zoh", boom)
    _expect(layer, cls_name, Boom, torch.randn(2, N, dtype=DT))


def test_error_after_error_then_recovery():
    layer = make_layer("Mamba", dict(num_neurons=N, d_state=3))
    xs = torch.randn(4, 2, N, dtype=DT)
    with torch.no_grad():
        ref = torch.stack([layer(x) for x in xs])
        layer.zero_states()
        out = []
        for t, x in enumerate(xs):
            bads = [torch.randn(2, N + 1, dtype=DT), x.to(torch.float32), x.to(torch.int64)]
            if t > 0:  # states held: a new batch shape is an error too
                bads.append(torch.randn(3, N, dtype=DT))
            for bad in bads:
                with pytest.raises((ValueError, TypeError)):
                    layer(bad)
            out.append(layer(x))
    assert torch.equal(torch.stack(out), ref)


# --------------------------------------------------------------------------- constructor errors


def _ctor(cls_name, **kwargs):
    base = dict(num_neurons=N)
    base.update(kwargs)
    return getattr(tt.ssm, cls_name)(**base)


BAD_NUM_NEURONS = [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)]


@pytest.mark.parametrize("value,exc", BAD_NUM_NEURONS, ids=[repr(v) for v, _ in BAD_NUM_NEURONS])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_bad_num_neurons(cls_name, value, exc):
    with pytest.raises(exc) as info:
        _ctor(cls_name, num_neurons=value)
    assert cls_name in str(info.value)
    assert "num_neurons" in str(info.value)


BAD_D_STATE = [(0, ValueError), (-3, ValueError), (1.5, TypeError), (True, TypeError)]


@pytest.mark.parametrize("value,exc", BAD_D_STATE, ids=[repr(v) for v, _ in BAD_D_STATE])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_bad_d_state(cls_name, value, exc):
    with pytest.raises(exc) as info:
        _ctor(cls_name, d_state=value)
    assert cls_name in str(info.value)
    assert "d_state" in str(info.value)


BAD_DT_RANK = [(0, ValueError), (-2, ValueError), (1.0, TypeError), (True, TypeError)]


@pytest.mark.parametrize("value,exc", BAD_DT_RANK, ids=[repr(v) for v, _ in BAD_DT_RANK])
@pytest.mark.parametrize("cls_name", ["S6", "Mamba"])
def test_bad_dt_rank(cls_name, value, exc):
    with pytest.raises(exc) as info:
        _ctor(cls_name, dt_rank=value)
    assert cls_name in str(info.value)
    assert "dt_rank" in str(info.value)


BAD_CONV = [(-1, ValueError), (2.0, TypeError), (False, TypeError)]


@pytest.mark.parametrize("value,exc", BAD_CONV, ids=[repr(v) for v, _ in BAD_CONV])
def test_bad_conv_kernel(value, exc):
    with pytest.raises(exc) as info:
        _ctor("Mamba", conv_kernel=value)
    assert "Mamba" in str(info.value)
    assert "conv_kernel" in str(info.value)


BAD_DIM = [("a", TypeError), (1.0, TypeError), (None, TypeError), (True, TypeError)]


@pytest.mark.parametrize("value,exc", BAD_DIM, ids=[repr(v) for v, _ in BAD_DIM])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_bad_dim(cls_name, value, exc):
    with pytest.raises(exc) as info:
        _ctor(cls_name, dim=value)
    assert cls_name in str(info.value)
    assert "dim" in str(info.value)


@pytest.mark.parametrize("kernel", [0, 1])
def test_conv_kernel_zero_or_one_disables_conv(kernel):
    layer = _ctor("Mamba", d_state=3, conv_kernel=kernel)
    assert "conv_buffer" not in layer._state_names
    assert not hasattr(layer, "conv_weights")
    y = layer(torch.randn(2, N))
    assert y.shape == (2, N)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_valid_edge_arguments(cls_name):
    """The smallest valid sizes build and step."""
    layer = _ctor(cls_name, num_neurons=1, d_state=1)
    assert layer(torch.randn(3, 1)).shape == (3, 1)
    if cls_name in ("S6", "Mamba"):
        assert _ctor(cls_name, dt_rank=-1).dt_rank == 1
        assert _ctor(cls_name, dt_rank=5).dt_proj.in_features == 5
