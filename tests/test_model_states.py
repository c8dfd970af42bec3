"""``tt.Model``: zero/detach/save/load states across a whole module tree."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import tracetorch as tt
from conftest import D_STATE, N, perturb_, rel_err

DT = torch.float64
T = 6


class Net(tt.Model):
    """Layers in nn.Sequential, nn.ModuleList, a plain list and a plain dict."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            tt.ssm.S5(N, d_state=D_STATE),
            tt.ssm.S4(N, d_state=D_STATE),
            tt.ssm.Mamba(N, d_state=D_STATE),
        )
        self.blocks = nn.ModuleList([tt.ssm.S6(N, d_state=D_STATE), tt.ssm.Mamba(N, d_state=D_STATE, conv_kernel=1)])
        self.extra = [tt.ssm.S5(N, d_state=D_STATE, dim=0)]  # plain list: not a registered submodule
        self.named = {"a": tt.ssm.S4(N, d_state=D_STATE), "b": tt.ssm.Mamba(N, d_state=D_STATE, conv_kernel=2)}
        for i, layer in enumerate(self.all_layers()):
            layer.to(DT)
            perturb_(layer, seed=100 * seed + i)

    def all_layers(self):
        return [*self.net, *self.blocks, *self.extra, *self.named.values()]

    def forward(self, x):
        x = self.net(x)
        for block in self.blocks:
            x = block(x)
        x = self.extra[0](x.T).T
        x = self.named["a"](x)
        return self.named["b"](x)


EXPECTED_KEYS = {
    "net.0.global_state",
    "net.1.state",
    "net.2.ssm_state",
    "net.2.conv_buffer",
    "blocks.0.state",
    "blocks.1.ssm_state",
    "extra[0].global_state",
    "named[a].state",
    "named[b].ssm_state",
    "named[b].conv_buffer",
}

# The keys the published tracetorch 0.19.2 writes for the same tree (recorded from it):
# registered modules appear under their path and through ``_modules[...]``.
UPSTREAM_ALIASES = {
    "net.0.global_state": ["net._modules[0].global_state", "._modules[net].0.global_state",
                           "._modules[net]._modules[0].global_state"],
    "net.1.state": ["net._modules[1].state", "._modules[net].1.state", "._modules[net]._modules[1].state"],
    "net.2.ssm_state": ["net._modules[2].ssm_state", "._modules[net].2.ssm_state",
                        "._modules[net]._modules[2].ssm_state"],
    "net.2.conv_buffer": ["net._modules[2].conv_buffer", "._modules[net].2.conv_buffer",
                          "._modules[net]._modules[2].conv_buffer"],
    "blocks.0.state": ["blocks._modules[0].state", "._modules[blocks].0.state", "._modules[blocks]._modules[0].state"],
    "blocks.1.ssm_state": ["blocks._modules[1].ssm_state", "._modules[blocks]._modules[1].ssm_state"],
    "extra[0].global_state": [".extra[0].global_state"],
    "named[a].state": [".named[a].state"],
    "named[b].ssm_state": [".named[b].ssm_state"],
    "named[b].conv_buffer": [".named[b].conv_buffer"],
}


def _xs(seed=0, steps=T):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(steps, 2, N, generator=gen, dtype=DT)


def _all_states(model):
    """``{(layer index, state name): tensor or None}`` (references)."""
    return {
        (i, name): getattr(layer, name)
        for i, layer in enumerate(model.all_layers())
        for name in sorted(layer._state_names)
    }


def _snapshot(model):
    return {k: (None if v is None else v.detach().clone()) for k, v in _all_states(model).items()}


def _assert_unchanged(model, refs, snap):
    now = _all_states(model)
    assert set(now) == set(snap)
    for key, before in snap.items():
        if before is None:
            assert now[key] is None, key
        else:
            assert now[key] is refs[key], f"{key} was replaced"
            assert torch.equal(now[key], before), f"{key} changed"


def _run(model, xs):
    with torch.no_grad():
        return torch.stack([model(x) for x in xs])


@pytest.fixture
def model():
    m = Net()
    _run(m, _xs()[:3])
    return m


def test_save_states_keys(model):
    states = model.save_states()
    assert set(states) == EXPECTED_KEYS
    assert set(Net().save_states()) == set()  # no state exists before the first step
    assert states["net.1.state"].shape == (2, N, D_STATE)
    assert states["net.0.global_state"].shape == (2, D_STATE)
    assert states["extra[0].global_state"].shape == (D_STATE, 2)
    assert states["named[b].conv_buffer"].shape == (2, N, 2)
    assert states["net.2.conv_buffer"].shape == (2, N, 4)


def test_zero_states_reaches_every_layer(model):
    assert all(v is not None for v in _all_states(model).values())
    model.zero_states()
    assert all(v is None for v in _all_states(model).values())
    assert model.save_states() == {}
    y = model(_xs()[0])  # recreated as zeros
    assert y.shape == (2, N)
    fresh = Net()  # same autograd mode as y: the kernels, and so the last bits, match
    assert torch.equal(y.detach(), fresh(_xs()[0]).detach())


def test_detach_states(model):
    model.zero_states()
    x = _xs()[0].clone().requires_grad_(True)
    model(x)
    before = _all_states(model)
    assert all(v.requires_grad for v in before.values())
    model.detach_states()
    after = _all_states(model)
    for key, state in after.items():
        assert not state.requires_grad, key
        assert state.grad_fn is None, key
        assert state.data_ptr() == before[key].data_ptr(), f"{key} was copied"
        assert torch.equal(state, before[key].detach()), key
    # training continues on the detached states
    loss = model(_xs()[1]).sum()
    loss.backward()
    assert x.grad is None  # the graph was cut


def test_save_states_returns_clones(model):
    saved = model.save_states()
    reference = {k: v.clone() for k, v in saved.items()}
    for key, value in saved.items():
        assert not value.requires_grad
    layer_states = {s.data_ptr() for s in _all_states(model).values()}
    assert not any(v.data_ptr() in layer_states for v in saved.values())
    _run(model, _xs(1)[:2])  # later steps
    for layer in model.all_layers():  # in-place changes of the held states
        for name in layer._state_names:
            getattr(layer, name).add_(1.0)
    for key in saved:
        assert torch.equal(saved[key], reference[key]), key


def test_load_states_restores_exactly(model):
    xs = _xs(2)
    saved = model.save_states()
    first = _run(model, xs)
    model.load_states(saved)
    second = _run(model, xs)
    assert torch.equal(first, second)

    # into another instance with the same parameters, through torch.save / torch.load
    other = Net()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    other.load_states(torch.load(buffer))
    assert torch.equal(_run(other, xs), first)


def test_load_states_copies_the_tensors(model):
    saved = model.save_states()
    model.load_states(saved)
    for key, value in saved.items():
        value.add_(5.0)
    restored = model.save_states()
    for key in saved:
        assert torch.equal(restored[key] + 5.0, saved[key]), key


def test_load_states_into_fresh_model_with_no_states():
    source = Net()
    _run(source, _xs()[:2])
    saved = source.save_states()
    target = Net()
    assert all(v is None for v in _all_states(target).values())
    target.load_states(saved)
    for key, value in target.save_states().items():
        assert torch.equal(value, saved[key])
    xs = _xs(3)
    assert torch.equal(_run(target, xs), _run(source, xs))


def _bad_shape(value, axis):
    # Only an axis the layer fixes (d_state, the kernel, the state size at dim) makes a bad shape:
    # a batch axis may change, since loaded states replace the held ones.
    shape = list(value.shape)
    shape[axis] += 1
    return torch.zeros(shape, dtype=value.dtype)


@pytest.mark.parametrize(
    "bad_key, axis", [("named[b].conv_buffer", -1), ("net.0.global_state", -1), ("extra[0].global_state", 0)]
)
def test_load_states_wrong_shape_changes_nothing(model, bad_key, axis):
    refs = _all_states(model)
    snap = _snapshot(model)
    states = {k: v + 1.0 for k, v in model.save_states().items()}  # visibly different values
    # the bad entry last, so every good one comes before it
    bad = states.pop(bad_key)
    states[bad_key] = _bad_shape(bad, axis)
    with pytest.raises(ValueError):
        model.load_states(states)
    _assert_unchanged(model, refs, snap)
    with pytest.raises(ValueError):
        model.load_states(states, strict=False)
    _assert_unchanged(model, refs, snap)


def test_load_states_wrong_feature_size_when_states_are_none():
    source = Net()
    _run(source, _xs()[:1])
    states = source.save_states()
    value = states.pop("net.1.state")
    states["net.1.state"] = torch.zeros(value.shape[0], N + 1, D_STATE, dtype=DT)  # N+1 features
    target = Net()
    with pytest.raises(ValueError):
        target.load_states(states)
    assert all(v is None for v in _all_states(target).values())

    states["net.1.state"] = torch.zeros(value.shape[0], N, D_STATE + 1, dtype=DT)  # wrong d_state
    with pytest.raises(ValueError):
        target.load_states(states)
    assert all(v is None for v in _all_states(target).values())


def test_load_states_wrong_dtype_changes_nothing(model):
    refs = _all_states(model)
    snap = _snapshot(model)
    states = {k: v + 1.0 for k, v in model.save_states().items()}
    states["named[a].state"] = states.pop("named[a].state").to(torch.float32)
    with pytest.raises((ValueError, TypeError)):
        model.load_states(states)
    _assert_unchanged(model, refs, snap)
    states["named[a].state"] = torch.zeros(2, N, D_STATE, dtype=torch.int64)
    with pytest.raises((ValueError, TypeError)):
        model.load_states(states)
    _assert_unchanged(model, refs, snap)


def test_load_states_strict_missing_and_unexpected(model):
    refs = _all_states(model)
    snap = _snapshot(model)
    full = {k: v + 1.0 for k, v in model.save_states().items()}

    missing = dict(full)
    del missing["blocks.0.state"]
    with pytest.raises(ValueError, match="blocks.0.state"):
        model.load_states(missing)
    _assert_unchanged(model, refs, snap)

    unexpected = dict(full)
    unexpected["net.7.state"] = torch.zeros(2, N, D_STATE, dtype=DT)
    with pytest.raises(ValueError, match=r"net\.7\.state"):
        model.load_states(unexpected)
    _assert_unchanged(model, refs, snap)

    # non-strict: the present entries load, the unknown one is ignored, the missing one kept
    kept = model.blocks[0].state
    model.load_states({**missing, "net.7.state": torch.zeros(1)}, strict=False)
    assert model.blocks[0].state is kept
    for key, value in model.save_states().items():
        if key != "blocks.0.state":
            assert torch.equal(value, full[key]), key


def test_load_states_upstream_alias_keys(model):
    saved = model.save_states()
    xs = _xs(4)
    expected = _run(model, xs)

    # one alias per state, e.g. "net._modules[1].state", ".extra[0].global_state"
    aliased = {UPSTREAM_ALIASES[k][0]: v for k, v in saved.items()}
    assert "net._modules[1].state" in aliased and ".extra[0].global_state" in aliased
    model.zero_states()
    model.load_states(aliased)
    assert torch.equal(_run(model, xs), expected)

    # the dict 0.19.2's save_states writes: every form of every key at once
    upstream = {}
    for key, value in saved.items():
        if not key.startswith(("extra", "named")):
            upstream[key] = value
        for alias in UPSTREAM_ALIASES[key]:
            upstream[alias] = value
    model.zero_states()
    model.load_states(upstream, strict=True)
    assert torch.equal(_run(model, xs), expected)


def test_load_states_device_argument(model):
    saved = model.save_states()
    model.load_states(saved, device="cpu")
    for key, value in model.save_states().items():
        assert value.device.type == "cpu"
        assert torch.equal(value, saved[key])


class Outer(tt.Model):
    def __init__(self):
        super().__init__()
        self.inner = Net(seed=1)
        self.helpers = [tt.ssm.S6(N, d_state=D_STATE).to(DT)]

    def forward(self, x):
        return self.helpers[0](self.inner(x))


def test_nested_models():
    outer = Outer()
    xs = _xs(5)
    with torch.no_grad():
        outer(xs[0])
    keys = set(outer.save_states())
    assert keys == {f"inner.{k}" for k in EXPECTED_KEYS} | {"helpers[0].state"}
    saved = outer.save_states()
    first = _run(outer, xs[1:])
    outer.zero_states()
    assert outer.helpers[0].state is None
    assert all(v is None for v in _all_states(outer.inner).values())
    outer.load_states(saved)
    assert torch.equal(_run(outer, xs[1:]), first)


def test_model_deepcopy_and_pickle_with_live_states(model):
    x = _xs(6)[0].clone().requires_grad_(True)
    model(x)
    xs = _xs(7)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert set(clone.save_states()) == EXPECTED_KEYS
        saved = model.save_states()
        for key, value in clone.save_states().items():
            assert torch.equal(value, saved[key]), key
        a = _run(model, xs)
        b = _run(clone, xs)
        assert rel_err(b, a) == 0.0
        model.load_states(saved)


class _Holder:
    """A plain helper object (not a module) holding a layer."""

    def __init__(self, layer):
        self.layer = layer


class Odd(tt.Model):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.helper = _Holder(tt.ssm.S4(N, d_state=D_STATE).to(DT))
        self.pair = (tt.ssm.S5(N, d_state=D_STATE).to(DT), tt.ssm.S6(N, d_state=D_STATE).to(DT))
        self.same = self.pair[0]  # a module attribute: registered as "same", found once

    def forward(self, x):
        return self.pair[1](self.pair[0](self.helper.layer(x)))


def test_layers_in_helper_objects_and_tuples():
    model = Odd()
    xs = _xs(8)
    with torch.no_grad():
        model(xs[0])
    saved = model.save_states()
    # a layer reachable twice is reported once, under its registered-module path
    assert set(saved) == {"helper.layer.state", "same.global_state", "pair[1].state"}
    first = _run(model, xs[1:])
    model.zero_states()
    assert model.helper.layer.state is None and model.pair[0].global_state is None and model.pair[1].state is None
    # upstream 0.19.2 spelling for plain attributes: a leading dot
    model.load_states({"." + k: v for k, v in saved.items()})
    assert torch.equal(_run(model, xs[1:]), first)


class _One(tt.Model):
    def __init__(self, cls_name):
        super().__init__()
        torch.manual_seed(0)
        self.layer = getattr(tt.ssm, cls_name)(N, d_state=D_STATE)

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("cls_name", ["S4", "S5", "S6", "Mamba"])
def test_load_states_of_another_dtype_into_fresh_model(cls_name):
    """float64 states into a float32 model (no state held yet).

    Either load_states refuses them (ValueError/TypeError), or the model keeps
    working in its own dtype: a float32 step gives float32 outputs and states.
    A float64 output, or a bare torch RuntimeError from a matmul, is a bug.
    """
    source = _One(cls_name).double()
    source(torch.randn(2, N, dtype=torch.float64))
    saved = source.save_states()
    target = _One(cls_name)  # float32
    try:
        target.load_states(saved)
    except (ValueError, TypeError) as error:
        assert cls_name in str(error) or "load_states" in str(error)
        assert all(getattr(target.layer, n) is None for n in target.layer._state_names)
        return
    try:
        y = target(torch.randn(2, N))
    except (ValueError, TypeError) as error:
        assert cls_name in str(error)
        return
    assert y.dtype == torch.float32, f"{cls_name}: float32 input gave a {y.dtype} output"
    for key, value in target.save_states().items():
        assert value.dtype == torch.float32, key
