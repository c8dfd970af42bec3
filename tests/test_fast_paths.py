"""The speed paths change no numbers: native kernels, the prepared dynamics, torch.compile."""

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo

import ssm_core
import tracetorch as tt
from conftest import random_weights

LAYERS = [tt.ssm.S4, tt.ssm.S5, tt.ssm.S6, tt.ssm.Mamba]


@pytest.mark.parametrize("layer_type", LAYERS, ids=lambda c: c.__name__)
def test_torch_compile_traces_every_layer_whole(layer_type):
    layer = layer_type(8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer(x)
        explanation = dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    layer.zero_states()
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad():
        compiled_ys = [compiled(x) for _ in range(3)]
        layer.zero_states()
        eager_ys = [layer(x) for _ in range(3)]
    for a, b in zip(compiled_ys, eager_ys):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["S4", "S5", "S6", "Mamba"])
def test_prepared_parameters_change_no_numbers(name):
    spec = ssm_core.LAYERS[name]
    config = spec.config(6)
    params = spec.params_from_mapping(random_weights(name, vars(config)))
    state = spec.zero_state(config, (2,), np, np.float64)
    xs = np.random.default_rng(0).standard_normal((5, 2, 6))
    prepared = spec.prepare(params, np)
    for run, inputs in ((spec.step, xs[0]), (spec.scan, xs)):
        (y, new_state), (y_kept, kept_state) = run(inputs, state, params), run(inputs, state, params, prepared=prepared)
        np.testing.assert_array_equal(y, y_kept)
        for a, b in zip(new_state, kept_state):
            np.testing.assert_array_equal(a, b)
