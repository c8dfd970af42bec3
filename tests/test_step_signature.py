"""A step's checks run once per input signature: any input or held state that differs is checked again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import backends.numpy as bnp
import tracetorch as tt


def _torch_layer(name):
    torch.manual_seed(0)
    return getattr(tt.ssm, name)(8)


def _numpy_layer(name):
    return getattr(bnp, name)(8, seed=0)


BINDINGS = {
    "torch": (_torch_layer, lambda shape, dtype=torch.float32: torch.randn(*shape, dtype=dtype), torch.float64),
    "numpy": (_numpy_layer, lambda shape, dtype=np.float32: np.random.default_rng(0).standard_normal(shape).astype(dtype),
              np.float64),
}


def _save(layer):
    if isinstance(layer, torch.nn.Module):
        return {name: getattr(layer, name).clone() for name in layer.state_names}
    return layer.save_states()


def _load(layer, states):
    if isinstance(layer, torch.nn.Module):
        for name, value in states.items():
            setattr(layer, name, value.clone())  # as traceTorch 0.19.2's users set them
    else:
        layer.load_states(states)


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("name", ["S4", "S5", "S6", "Mamba"])
def test_a_step_after_a_checked_one_is_checked_again_where_anything_differs(binding, name):
    make, data, other_dtype = BINDINGS[binding]
    layer = make(name)
    with torch.no_grad():
        for _ in range(3):  # the signature is kept after the first
            layer(data((4, 8)))
        held = _save(layer)
        with pytest.raises(ValueError, match="batch shape changed"):
            layer(data((5, 8)))  # another batch with states held
        with pytest.raises(ValueError, match="expected 8 features"):
            layer(data((4, 7)))
        with pytest.raises(TypeError, match="dtype"):
            layer(data((4, 8), other_dtype))
        with pytest.raises(ValueError, match="0-d array"):
            layer(torch.zeros(()) if binding == "torch" else np.zeros((), np.float32))
        after_errors = _save(layer)
        for key in held:  # errors left the states as they were
            np.testing.assert_array_equal(np.asarray(after_errors[key]), np.asarray(held[key]))
        layer.zero_states()
        layer(data((5, 8)))  # a new batch after zero_states: a new signature, accepted
        _load(layer, held)  # states of the old batch: the next step of the new batch must fail
        with pytest.raises(ValueError, match="batch shape changed"):
            layer(data((5, 8)))


def test_a_torch_layer_moved_to_another_dtype_checks_its_input_again():
    layer = _torch_layer("S6")
    x = torch.randn(2, 8)
    with torch.no_grad():
        layer(x)
        layer.zero_states()
        layer.double()
        with pytest.raises(TypeError, match="expected input of dtype torch.float64"):
            layer(x)
        assert layer(x.double()).dtype == torch.float64


def test_a_torch_layer_whose_dim_changes_checks_its_square_input_again():
    """A square input fits either feature axis: a step after ``dim`` changes must use the new one."""
    layer = _torch_layer("S6")
    x = torch.randn(8, 8)
    with torch.no_grad():
        layer(x)
        layer.zero_states()
        layer.dim = 0
        got = layer(x)
        reference = _torch_layer("S6")
        reference.dim = 0
        expected = reference(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the steady steps of a loop
# From a loop's second step on, forward compares the step's key with the last checked one and runs the step
# directly. What the key cannot see (a backward pass recomputing the call, autocast's state on the device,
# an export tracing it) must still send the call through the full checks.


@pytest.mark.parametrize("name", ["S4", "S5", "S6", "Mamba"])
def test_plain_checkpointing_of_steady_steps_names_tt_checkpoint(name):
    """Recomputed during backward from the states of a later time, a step would give wrong gradients silently."""
    layer = _torch_layer(name)
    x = torch.randn(4, 8, requires_grad=True)
    for _ in range(2):
        layer(x)  # the key of this input is checked and kept
    ys = [torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) for _ in range(3)]
    with pytest.raises(RuntimeError, match=rf"{name}: .*tt\.checkpoint"):
        torch.stack(ys).sum().backward()


@pytest.mark.parametrize("name", ["S4", "S5", "S6", "Mamba"])
def test_a_steady_step_under_autocast_answers_as_a_first_step_there(name):
    """Autocast turned on between two steps of one input: the output dtype and values of a layer's first step there."""
    layer, fresh = _torch_layer(name), _torch_layer(name)
    x = torch.randn(4, 8)
    with torch.no_grad():
        for _ in range(2):
            layer(x)
            fresh(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
            fresh.__dict__.pop("_step_signature")  # the full checks, as at a first step
            expected = fresh(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_exporting_a_layer_after_steady_steps_points_to_the_stateless_form():
    layer = _torch_layer("S6")
    x = torch.randn(4, 8)
    with torch.no_grad():
        for _ in range(2):
            layer(x)
    with pytest.raises(RuntimeError, match=r"S6: torch.export .*layer.stateless\(\)"):
        torch.export.export(layer, (x,), strict=False)
