"""Loading hidden states: checked together at load time, replacing what is held, alike on every binding."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

import backends
import tracetorch as tt
from conftest import D_STATE, N, assert_states_equal, snapshot


class _Net(tt.Model):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(tt.ssm.Mamba(N, d_state=D_STATE), tt.ssm.S5(N, d_state=D_STATE))

    def forward(self, x):
        return self.net(x)


def _states_of(batch):
    model = _Net()
    model(torch.randn(batch, N))
    return model.save_states()


def test_states_of_one_layer_must_agree_on_the_batch_shape():
    model = _Net()
    model(torch.randn(4, N))
    before = snapshot(model.net[0])
    states = _states_of(4)
    states["net.0.conv_buffer"] = _states_of(2)["net.0.conv_buffer"]  # batch 2 beside a batch-4 ssm_state
    with pytest.raises(ValueError, match=r"Mamba: the loaded states belong to different input shapes"):
        model.load_states(states)
    assert_states_equal(model.net[0], before)


def test_a_partial_load_must_agree_with_the_states_kept():
    model = _Net()
    model(torch.randn(4, N))
    states = {"net.0.ssm_state": _states_of(2)["net.0.ssm_state"]}
    with pytest.raises(ValueError, match=r"held conv_buffer"):
        model.load_states(states, strict=False)


def test_loading_replaces_held_states_of_another_batch_shape():
    model = _Net()
    model(torch.randn(4, N))
    saved = _states_of(2)
    model.load_states(saved)
    for key, value in model.save_states().items():
        assert torch.equal(value, saved[key]), key
    assert model(torch.randn(2, N)).shape == (2, N)  # steps on from the batch-2 states


def test_a_state_given_under_both_key_forms_is_an_error():
    model = _Net()
    states = _states_of(3)
    states["net._modules[1].global_state"] = states["net.1.global_state"] * 2
    with pytest.raises(ValueError, match=r"'net.1.global_state' and 'net._modules\[1\].global_state' name the same"):
        model.load_states(states)
    assert all(getattr(layer, name) is None for layer in model.net for name in layer._state_names)
    states["net._modules[1].global_state"] = states["net.1.global_state"].clone()  # as 0.19.2 writes them: equal
    model.load_states(states)
    assert torch.equal(model.net[1].global_state, states["net.1.global_state"])


@pytest.mark.parametrize("name", ["numpy", "mlx", "array_api_strict", "cupy"])
def test_backend_layers_replace_held_states_and_check_them_together(name):
    reason = backends.available()[name]
    if reason is not None:
        pytest.skip(reason)
    module = importlib.import_module(f"backends.{name}")
    torch_layer = _Net().net[0].double()
    layer = module.from_torch(torch_layer)
    layer(module.asarray(np.ones((4, N))))
    other = module.from_torch(torch_layer)
    other(module.asarray(np.ones((2, N))))
    layer.load_states(other.save_states())  # batch 2 replaces batch 4
    assert tuple(layer.ssm_state.shape) == (2, N, D_STATE)
    mixed = {**layer.save_states(), "conv_buffer": np.zeros((5, N, 4))}
    before = {k: module.backend.to_numpy(v) for k, v in layer.save_states().items()}
    with pytest.raises(ValueError, match=r"Mamba \(\w+\): the loaded states belong to different input shapes"):
        layer.load_states(mixed)
    for key, value in layer.save_states().items():
        np.testing.assert_array_equal(module.backend.to_numpy(value), before[key])
