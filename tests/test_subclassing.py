"""Layers of the user's own, written against traceTorch 0.19.2's subclassing helpers.

traceTorch 0.19.2 users built their layers on ``tt.Layer`` and ``tt.ssm.Layer``
with ``_register_parameter``, ``_initialize_state``, ``_ensure_state(s)``,
``_to_working_dim`` and the like; these tests write such layers the way its
documentation shows and hold the helpers to what 0.19.2 did.
"""

import copy
import io

import pytest
import torch
from torch import nn

import tracetorch as tt


class Leaky(tt.Layer):
    """A leaky integrator: ``mem = decay * mem + gain * x``, with a learnable sigmoid decay."""

    def __init__(self, num_neurons, decay=0.8, dim=-1):
        super().__init__(num_neurons, dim)
        self._register_parameter(
            "decay", decay, rank=1, learnable=True,
            init_fn=torch.logit, inverse_fn=torch.logit, activation_fn=torch.sigmoid,
        )
        self._register_parameter(
            "gain", 2.0, rank=0, learnable=False, init_fn=torch.log, inverse_fn=torch.log, activation_fn=torch.exp
        )
        self._initialize_state("mem")

    def forward(self, x):
        self._ensure_states(x)
        x_w = self._to_working_dim(x)
        mem = self.decay * self._to_working_dim(self.mem) + self.gain * x_w
        self.mem = self._from_working_dim(mem)
        return self._from_working_dim(mem)


class Diagonal(tt.ssm.Layer):
    """A diagonal state-space layer on the SSM helpers: a ``d_state`` vector per feature."""

    def __init__(self, num_neurons, d_state=3, dim=-1):
        super().__init__(num_neurons, dim, d_state=d_state)
        self._register_scale("a", 0.5, rank=1, learnable=True)
        self._register_log_scale("b", 0.7, rank=1, learnable=True)
        self._register_state_scale("c", torch.linspace(0.1, 0.8, d_state), rank=1, learnable=False)
        self._register_log_state_scale("e", 1.5, rank=1, learnable=True)
        self._initialize_state("h")

    def forward(self, x):
        self._ensure_states(x)
        x_w = self._to_working_dim(x)
        h = self._state_to_working_dim(self.h)
        h = h * self.c * 0.5 + (self.a * self.b * x_w)[..., None] * self.e
        self.h = self._state_from_working_dim(h)
        return self._from_working_dim(h.sum(-1))


class Net(tt.Model):
    def __init__(self):
        super().__init__()
        self.leaky = Leaky(4, dim=1)
        self.diagonal = Diagonal(4, dim=1)
        self.s6 = tt.ssm.S6(4, dim=1)

    def forward(self, x):
        return self.s6(self.diagonal(self.leaky(x)))


# ----------------------------------------------------------------------------- parameters with an activation


def test_registered_parameter_is_read_through_its_activation():
    layer = Leaky(4, decay=torch.tensor([0.2, 0.4, 0.6, 0.8]))
    raw = layer.raw_decay
    assert isinstance(raw, nn.Parameter) and raw.requires_grad
    torch.testing.assert_close(raw.detach(), torch.logit(torch.tensor([0.2, 0.4, 0.6, 0.8])))
    torch.testing.assert_close(layer.decay, torch.sigmoid(raw))
    assert layer.decay.grad_fn is not None  # the activation is applied on every read: it trains
    assert "raw_gain" in dict(layer.named_buffers()) and "raw_gain" not in dict(layer.named_parameters())
    assert layer.raw_gain.shape == () and layer.gain.item() == pytest.approx(2.0)
    assert sorted(layer.state_dict()) == ["raw_decay", "raw_gain"]


def test_registered_parameter_ranks_and_sizes():
    layer = Leaky(3, decay=0.5)
    assert layer.raw_decay.shape == (3,)  # rank 1 from a scalar: one per neuron
    with pytest.raises(ValueError):
        Leaky(3, decay=torch.full((4,), 0.5))  # a vector of the wrong size
    with pytest.raises(ValueError):
        Leaky(3, decay=torch.full((3, 3), 0.5))  # not a scalar or a vector
    with pytest.raises(ValueError):
        tt.Layer(3)._register_parameter("p", 1.0, rank=2, learnable=True)


def test_unknown_attribute_still_raises():
    with pytest.raises(AttributeError):
        Leaky(3).missing


# ----------------------------------------------------------------------------- states and dims


@pytest.mark.parametrize("dim", [0, 1, -1, -2])
def test_working_dim_helpers_move_dim_last_and_back(dim):
    layer = tt.Layer(5, dim=dim)
    x = torch.randn(5, 5, 5).cumsum(0)
    moved = layer._to_working_dim(x)
    assert torch.equal(moved, x.movedim(dim, -1))
    assert torch.equal(layer._from_working_dim(moved), x)


def test_states_are_created_from_the_input_and_stepped():
    torch.manual_seed(0)
    layer = Leaky(4, decay=torch.tensor([0.2, 0.4, 0.6, 0.8]), dim=1).double()
    assert layer.mem is None and layer._state_names == {"mem"}
    xs = torch.randn(6, 2, 4, 3, dtype=torch.float64)
    ys = torch.stack([layer(x) for x in xs])
    assert layer.mem.shape == (2, 4, 3) and layer.mem.dtype == torch.float64
    # The layer was built in float32: its raw parameters hold logit(decay) and log(gain) rounded to float32 (by
    # float32 kernels whose last bit depends on the CPU's vector unit), and .double() widens those. So the decay
    # it reads is 0.2 ... 0.8 to float32 precision only: sigmoid(raw) moves by decay * (1 - decay) * d_raw, a
    # relative (1 - decay) * |logit(decay)| <= 1.11 times raw's relative error, which is within 2 float32 ulp
    # (a kernel's error and the rounding), plus the input's rounding to float32: 3 eps32 in all, 4 with margin.
    eps32 = torch.finfo(torch.float32).eps
    decay = layer.decay.detach()
    gain = layer.gain.detach()
    torch.testing.assert_close(decay, torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64), rtol=4 * eps32, atol=0)
    torch.testing.assert_close(gain, torch.tensor(2.0, dtype=torch.float64), rtol=4 * eps32, atol=0)
    # The recurrence itself runs in float64 on those values: the same two operations per step as the layer's,
    # so the outputs agree to float64 rounding (a few eps64 per step over the six steps; 1e-14 holds them).
    mem, expected = torch.zeros(2, 4, 3, dtype=torch.float64), []
    for x in xs:
        mem = decay[:, None] * mem + gain * x
        expected.append(mem)
    torch.testing.assert_close(ys, torch.stack(expected), rtol=1e-14, atol=1e-14)


def test_ensure_state_keeps_an_existing_state():
    layer = Leaky(4)
    held = torch.ones(2, 4)
    layer.mem = held
    layer._ensure_states(torch.zeros(7, 4))
    assert layer.mem is held
    layer.zero_states()
    layer._ensure_state("mem", torch.zeros(7, 4, dtype=torch.float64))
    assert layer.mem.shape == (7, 4) and layer.mem.dtype == torch.float64 and not layer.mem.any()


def test_zero_and_detach_states_go_through_the_per_state_helpers():
    calls = []

    class Recording(Leaky):
        def _zero_state(self, state_name):
            calls.append(("zero", state_name))
            super()._zero_state(state_name)

        def _detach_state(self, state_name):
            calls.append(("detach", state_name))
            super()._detach_state(state_name)

    layer = Recording(4)
    layer(torch.randn(2, 4))
    assert layer.mem.grad_fn is not None
    layer.detach_states()
    assert layer.mem.grad_fn is None and not layer.mem.requires_grad
    layer.zero_states()
    assert layer.mem is None
    assert calls == [("detach", "mem"), ("zero", "mem")]


# ----------------------------------------------------------------------------- compilation


def test_ttcompile_bakes_activations_and_ttdecompile_restores_them():
    torch.manual_seed(0)
    layer = Leaky(4, decay=torch.tensor([0.2, 0.4, 0.6, 0.8])).double()
    xs = torch.randn(5, 2, 4, dtype=torch.float64)
    raw_before = layer.raw_decay.detach().clone()
    with torch.no_grad():
        eager = torch.stack([layer(x) for x in xs])

    layer.TTcompile()
    assert sorted(layer.state_dict()) == ["decay", "gain"]
    assert dict(layer.named_parameters()) == {}
    torch.testing.assert_close(layer.decay, torch.sigmoid(raw_before))
    layer.TTcompile()  # compiling twice changes nothing
    layer.zero_states()
    with torch.no_grad():
        compiled = torch.stack([layer(x) for x in xs])
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)

    layer.TTdecompile()
    assert sorted(layer.state_dict()) == ["raw_decay", "raw_gain"]
    assert isinstance(layer.raw_decay, nn.Parameter) and layer.raw_decay.requires_grad
    assert "raw_gain" in dict(layer.named_buffers())
    torch.testing.assert_close(layer.raw_decay.detach(), raw_before, rtol=1e-12, atol=1e-12)
    layer.zero_states()
    out = torch.stack([layer(x) for x in xs])
    torch.testing.assert_close(out.detach(), eager, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert layer.raw_decay.grad is not None and layer.raw_decay.grad.abs().sum() > 0


def test_model_compiles_custom_layers_with_its_own():
    torch.manual_seed(0)
    model = Net().double()
    xs = torch.randn(4, 2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        eager = torch.stack([model(x) for x in xs])
    model.TTcompile()
    assert "leaky.decay" in model.state_dict() and "diagonal.a" in model.state_dict()
    model.zero_states()
    with torch.no_grad():
        compiled = torch.stack([model(x) for x in xs])
    model.TTdecompile()
    assert "leaky.raw_decay" in model.state_dict() and "diagonal.raw_a" in model.state_dict()
    model.zero_states()
    with torch.no_grad():
        decompiled = torch.stack([model(x) for x in xs])
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(decompiled, eager, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- states through tt.Model


def test_model_saves_and_loads_the_states_of_custom_layers():
    torch.manual_seed(0)
    model = Net().double()
    xs = torch.randn(6, 2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        for x in xs[:3]:
            model(x)
        saved = model.save_states()
        assert {"leaky.mem", "diagonal.h", "s6.state"} <= set(saved)
        assert saved["leaky.mem"].shape == (2, 4, 3) and saved["diagonal.h"].shape == (2, 4, 3, 3)
        after = torch.stack([model(x) for x in xs[3:]])

        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        model.zero_states()
        model.load_states(torch.load(buffer))
        assert torch.equal(torch.stack([model(x) for x in xs[3:]]), after)

        # traceTorch 0.19.2 wrote the same states under "._modules[name]" keys too
        model.zero_states()
        model.load_states({f"._modules[{k.split('.')[0]}].{k.split('.')[1]}": v for k, v in saved.items()})
        assert torch.equal(torch.stack([model(x) for x in xs[3:]]), after)


def test_copies_of_custom_layers_carry_detached_states():
    layer = Leaky(4)
    layer(torch.randn(2, 4))
    twin = copy.deepcopy(layer)
    assert torch.equal(twin.mem, layer.mem) and twin.mem.grad_fn is None
    torch.testing.assert_close(twin.decay, layer.decay)


# ----------------------------------------------------------------------------- tt.ssm.Layer helpers


@pytest.mark.parametrize("dim", [0, 1, -1, -2])
def test_ssm_state_helpers_add_a_trailing_axis_and_move_the_feature_axis(dim):
    layer = Diagonal(4, d_state=3, dim=dim)
    shape = [2, 2, 2]
    shape[dim] = 4
    x = torch.zeros(shape)
    layer._ensure_states(x)
    expected = list(shape) + [3]
    assert list(layer.h.shape) == expected
    h = torch.randn(expected)
    moved = layer._state_to_working_dim(h)
    axis = dim if dim >= 0 else dim - 1  # the state's feature axis: the trailing axis shifts negative dims
    assert torch.equal(moved, h.movedim(axis, -2)) and moved.shape[-2:] == (4, 3)
    assert torch.equal(layer._state_from_working_dim(moved), h)


def test_ssm_scale_helpers_register_as_tracetorch_0_19_2():
    layer = Diagonal(4, d_state=3)
    # _register_scale stores log(-log2(value)) and reads exp(raw): -log2(0.5) = 1
    torch.testing.assert_close(layer.raw_a.detach(), torch.zeros(4))
    torch.testing.assert_close(layer.a, torch.ones(4))
    torch.testing.assert_close(layer.b, torch.full((4,), 0.7))  # log-scale: read back as given
    assert layer.raw_c.shape == (3,) and "raw_c" in dict(layer.named_buffers())  # sized d_state
    torch.testing.assert_close(layer.c, -torch.log2(torch.linspace(0.1, 0.8, 3)))
    assert layer.raw_e.shape == (3,) and isinstance(layer.raw_e, nn.Parameter)
    torch.testing.assert_close(layer.e, torch.full((3,), 1.5))
    assert layer.num_neurons == 4  # restored after registering a d_state-sized parameter
    with pytest.raises(ValueError):
        layer._register_scale("bad", 1.5, rank=0, learnable=True)


def test_ssm_custom_layer_steps_as_written():
    torch.manual_seed(0)
    layer = Diagonal(4, d_state=3, dim=1).double()
    xs = torch.randn(5, 2, 4, 6, dtype=torch.float64)
    ys = torch.stack([layer(x) for x in xs])
    a, b = layer.a.detach(), layer.b.detach()
    c, e = layer.c.detach(), layer.e.detach()
    h = torch.zeros(2, 6, 4, 3, dtype=torch.float64)
    expected = []
    for x in xs:
        h = h * c * 0.5 + (a * b * x.movedim(1, -1))[..., None] * e
        expected.append(h.sum(-1).movedim(-1, 1))
    torch.testing.assert_close(ys.detach(), torch.stack(expected))
    assert layer.h.shape == (2, 4, 6, 3)


def test_s5_and_mamba_ensure_state_give_their_own_shapes():
    x = torch.zeros(2, 6, 5)
    s5 = tt.ssm.S5(6, d_state=3, dim=1)
    s5._ensure_state("global_state", x)
    assert s5.global_state.shape == (2, 3, 5)  # d_state at dim, no trailing axis
    mamba = tt.ssm.Mamba(6, d_state=3, dim=1, conv_kernel=4)
    mamba._ensure_states(x)
    assert mamba.conv_buffer.shape == (2, 6, 5, 4) and mamba.ssm_state.shape == (2, 6, 5, 3)
    assert not mamba.ssm_state.any()
