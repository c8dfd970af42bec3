"""The stateless form ``(x, *states) -> (y, *states)``: what torch.export captures.

The stateful module cannot be exported or scripted (the state would be
dropped); doing so fails with a message that names the stateless form.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import ALL, ONE_OF_EACH, assert_states_equal, cases, cloned_states, make_layer

STEPS, BATCH = 5, 3


def _inputs(kwargs, time=None):
    shape = (BATCH, kwargs["num_neurons"]) if time is None else (time, BATCH, kwargs["num_neurons"])
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("case", ALL)
def test_exported_step_stepped_equals_the_layer_stepped(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    xs = _inputs(kwargs, STEPS)
    states = layer.initial_states(xs[0])
    assert len(states) == len(layer.state_names)
    program = torch.export.export(layer.stateless(), (xs[0], *states))
    step = program.module()
    outputs = []
    for x in xs:
        y, *states = step(x, *states)
        outputs.append(y)
    expected = torch.stack([layer(x) for x in xs])
    torch.testing.assert_close(torch.stack(outputs), expected, rtol=1e-12, atol=1e-12)
    for name, value in zip(layer.state_names, states):
        torch.testing.assert_close(value, getattr(layer, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ALL)
def test_exported_sequence_form_continues_from_given_states(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    first, second = _inputs(kwargs, 4), _inputs(kwargs, 4)
    program = torch.export.export(layer.stateless(time_dim=0), (first, *layer.initial_states(first, time_dim=0)))
    ys1, *states = program.module()(first, *layer.initial_states(first, time_dim=0))
    ys2, *states = program.module()(second, *states)
    expected = torch.cat([layer.scan(first), layer.scan(second)])
    torch.testing.assert_close(torch.cat([ys1, ys2]), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ALL)
def test_stateless_form_leaves_the_layer_states_alone(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    x = _inputs(kwargs)
    layer(x)
    before = cloned_states(layer)
    y, *states = layer.stateless()(x, *layer.initial_states(x))
    assert_states_equal(layer, before)
    layer.zero_states()
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match=rf"{cls_name}.stateless\(\): expected {len(states)} state"):
        layer.stateless()(x)


@pytest.mark.parametrize("case", cases("S4", "S6", "Mamba"))
def test_exporting_or_scripting_the_stateful_layer_points_to_the_stateless_form(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    x = _inputs(kwargs)
    with pytest.raises(RuntimeError, match=rf"{cls_name}: torch.export .*layer.stateless\(\)"):
        torch.export.export(layer, (x,))
    with pytest.raises(RuntimeError, match=rf"{cls_name}: torch.jit.script .*layer.stateless\(\)"):
        torch.jit.script(layer)
    with pytest.raises(RuntimeError, match=r"torch.export.export\(layer.stateless\(\)"):
        torch.jit.script(layer.stateless())


@pytest.mark.parametrize("time_dim", [None, 0], ids=["step", "sequence"])
@pytest.mark.parametrize("case", ONE_OF_EACH)
def test_stateless_form_errors_speak_of_state_arguments(case, time_dim):
    """The stateless form holds no state: its errors name the state argument, not a held state or zero_states()."""
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    x = _inputs(kwargs) if time_dim is None else _inputs(kwargs, 4)
    other = _inputs(kwargs)[:2] if time_dim is None else _inputs(kwargs, 4)[:, :2]  # a batch of 2, not 3
    form = layer.stateless(time_dim)
    good = layer.initial_states(x, time_dim)
    for i, (name, wrong) in enumerate(zip(layer.state_names, layer.initial_states(other, time_dim))):
        states = [*good[:i], wrong, *good[i + 1:]]
        words = f"{cls_name}: the state argument {name} has shape {tuple(wrong.shape)}, expected {tuple(good[i].shape)}"
        with pytest.raises(ValueError, match=re.escape(words)) as error:
            form(x, *states)
        assert "zero_states" not in str(error.value) and "held" not in str(error.value)
        states[i] = good[i].float()
        with pytest.raises(TypeError, match=rf"{cls_name}: the state argument {name} has dtype torch.float32, "
                                            r"expected torch.float64") as error:
            form(x, *states)
        assert "zero_states" not in str(error.value) and "held" not in str(error.value)
    assert all(getattr(layer, name) is None for name in layer.state_names)
