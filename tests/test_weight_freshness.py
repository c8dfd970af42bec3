"""A layer computes with its current weights, however they changed.

Each case changes a layer's weights in one way users do, then checks that a
step and a scan give exactly what a fresh layer loaded with the same weights
gives. Only ``TTcompile()`` may keep parameter-derived values across calls,
and then only until ``TTdecompile()``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ALL, BACKENDS, make_layer

BATCH = 3


def _fresh_like(layer):
    """A new layer of the same kind, loaded with ``layer``'s current weights."""
    twin = type(layer)(**vars(layer.config)).to(next(layer.parameters()).dtype)
    twin.load_state_dict({k: v.detach().clone() for k, v in layer.state_dict().items()})
    return twin


def _outputs(layer, xs, grad: bool):
    """Two steps then a scan from zero states: ``[2 + T, ...]``."""
    layer.zero_states()
    with torch.set_grad_enabled(grad):
        ys = [layer(xs[0]), layer(xs[1]), *layer.scan(xs[2:])]
    return torch.stack(ys).detach()


def _sgd_step(layer, xs):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.zero_states()
    layer.scan(xs).square().sum().backward()
    optimizer.step()


def _data_inplace(layer, xs):  # the manual SGD of many tutorials
    for p in layer.parameters():
        p.data.mul_(0.5)


def _data_assign(layer, xs):
    for p in layer.parameters():
        p.data = p.data * 0.5 + 0.01


def _vector_to_parameters(layer, xs):
    vector = torch.nn.utils.parameters_to_vector(layer.parameters())
    torch.nn.utils.vector_to_parameters(vector * 0.5, layer.parameters())


def _load_state_dict(layer, xs):
    layer.load_state_dict({k: v * 0.5 for k, v in layer.state_dict().items()})


def _no_grad_inplace(layer, xs):
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(0.5)


def _one_parameter_inplace(layer, xs):  # only A_log, as an optimizer step on one parameter
    with torch.no_grad():
        layer.A_log.sub_(0.3)


EDITS = {
    "optimizer": _sgd_step,
    "data_inplace": _data_inplace,
    "data_assign": _data_assign,
    "vector_to_parameters": _vector_to_parameters,
    "load_state_dict": _load_state_dict,
    "no_grad_inplace": _no_grad_inplace,
    "one_parameter_inplace": _one_parameter_inplace,
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("case", ALL)
def test_torch_layer_follows_weight_edits(case, edit, grad):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    xs = torch.randn(10, BATCH, kwargs["num_neurons"], dtype=torch.float64)
    before = _outputs(layer, xs, grad)  # whatever a layer may keep, it has seen these weights
    EDITS[edit](layer, xs)
    after = _outputs(layer, xs, grad)
    expected = _outputs(_fresh_like(layer), xs, grad)
    assert not torch.equal(before, expected), "the edit changed nothing: the test would prove nothing"
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


@pytest.mark.parametrize("convert", ["double", "to_float32"])
@pytest.mark.parametrize("case", ALL)
def test_torch_layer_follows_dtype_conversion(case, convert):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs, dtype=torch.float32 if convert == "double" else torch.float64)
    x = torch.randn(BATCH, kwargs["num_neurons"])
    with torch.no_grad():
        layer(x.to(next(layer.parameters()).dtype))
        layer.zero_states()
        layer = layer.double() if convert == "double" else layer.to(torch.float32)
        dtype = next(layer.parameters()).dtype
        got = layer(x.to(dtype))
        expected = _fresh_like(layer)(x.to(dtype))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ALL)
def test_ttcompile_freezes_weights_until_ttdecompile(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    xs = torch.randn(6, BATCH, kwargs["num_neurons"], dtype=torch.float64)
    layer.TTcompile()
    frozen = _outputs(layer, xs, grad=False)
    _data_inplace(layer, xs)
    if cls_name in ("S4", "S5"):  # documented: a compiled layer steps with the weights it was compiled with
        layer.zero_states()
        with torch.no_grad():
            steps = torch.stack([layer(x) for x in xs])
        torch.testing.assert_close(steps[:2], frozen[:2], rtol=0, atol=0)
    layer.TTdecompile()
    torch.testing.assert_close(_outputs(layer, xs, grad=False), _outputs(_fresh_like(layer), xs, False), rtol=0, atol=0)
    layer.TTcompile()  # compiling again takes the current weights
    # Steps then run a torch.compile'd function: eager's numbers to rounding (float64), not to the bit.
    torch.testing.assert_close(_outputs(layer, xs, grad=False), _outputs(_fresh_like(layer), xs, False), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- array backends


def _inplace_scale(array, factor, name):
    """Scale ``array`` in place, as a user editing ``state_dict()`` would."""
    if name == "mlx":
        array[...] = array * factor  # MLX arrays take item assignment
    else:
        array *= factor


@pytest.mark.parametrize("binding", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", ALL)
def test_backend_layer_follows_inplace_state_dict_edits(case, binding):
    _, cls_name, kwargs = case
    module, name = binding.mod, binding.name
    torch_layer = make_layer(cls_name, kwargs)
    layer = module.from_torch(torch_layer)
    xs = np.random.default_rng(0).standard_normal((6, BATCH, kwargs["num_neurons"]))
    xs = [module.asarray(x) for x in xs]
    layer(xs[0])  # whatever a layer may keep, it has seen these weights
    for key, array in layer.state_dict().items():
        _inplace_scale(array, 0.5, name)
    fresh = module.from_torch(torch_layer)
    fresh.load_state_dict({k: np.asarray(module.backend.to_numpy(v)) for k, v in layer.state_dict().items()})
    layer.zero_states()
    got = [module.backend.to_numpy(layer(x)) for x in xs]
    expected = [module.backend.to_numpy(fresh(x)) for x in xs]
    untouched = module.from_torch(torch_layer)
    before = [module.backend.to_numpy(untouched(x)) for x in xs]
    assert not np.array_equal(np.stack(before), np.stack(expected)), "the edit changed nothing"
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
