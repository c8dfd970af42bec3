"""Hidden states in and out: zero, detach, save, load and copy, on every binding and across ``tt.Model`` trees.

- ``save_states()`` returns copies (later steps, scans and writes into the held
  states leave them alone, and writing into them leaves the layer alone);
  ``load_states()`` copies what it is given, restores exactly, replaces held
  states of any batch shape, and is all or nothing (a bad entry after valid
  ones loads none of them);
- ``tt.Model`` reaches every layer of a module tree (``nn.Sequential``, lists,
  dicts, tuples, plain objects, nested models) under traceTorch 0.19.2's keys
  and its aliases; ``detach_states`` cuts the graph without copying;
- ``copy.deepcopy`` and ``pickle`` of layers and models with live states.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import tracetorch as tt
from conftest import (
    ALL, D_STATE, FIVE, LTI, N, ONE_OF_EACH, OneLayerModel, assert_states_equal, cloned_states, held_states, make_layer,
    perturb_, rel_err, run_steps, state_names,
)

DT = torch.float64
T = 6


def _steps(b, layer, steps, shape=(2, N), seed=0):
    return b.steps(layer, np.random.default_rng(seed).standard_normal((steps, *shape)).astype(np.float32))


# ----------------------------------------------------------------------------- one layer, every binding


@pytest.mark.parametrize("case", FIVE)
def test_save_states_returns_copies(binding, case):
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs)
    assert b.save_states(layer) == {}  # no state exists before the first step
    _steps(b, layer, 3)
    saved = b.save_states(layer)
    expected = {k: b.to_numpy(v) for k, v in saved.items()}
    assert set(saved) == set(b.state_names(layer)) == set(state_names(name, kwargs))
    _steps(b, layer, 2, seed=1)  # a later step,
    b.scan(layer, b.asarray(np.ones((4, 2, N), np.float32)))  # a later sequence,
    for value in b.states(layer).values():  # and writes into the held states
        b.fill(value, 7.0)
    for k, v in saved.items():
        np.testing.assert_array_equal(b.to_numpy(v), expected[k], err_msg=k)
    # And writing into the saved copies leaves the layer alone.
    held = b.host_states(layer)
    for value in saved.values():
        b.fill(value, -3.0)
    for k, v in b.states(layer).items():
        np.testing.assert_array_equal(b.to_numpy(v), held[k], err_msg=k)


@pytest.mark.parametrize("case", FIVE)
def test_load_states_round_trip(binding, case):
    """Loaded states continue exactly as the saved ones did, in the same layer or a fresh one."""
    b, (_, name, kwargs) = binding, case
    xs = np.random.default_rng(0).standard_normal((8, 2, N, 3)).astype(np.float32)
    layer = b.make(name, {**kwargs, "dim": 1})
    b.steps(layer, xs[:4])
    saved = b.save_states(layer)
    first = b.steps(layer, xs[4:])
    b.load_states(layer, saved)
    np.testing.assert_array_equal(b.steps(layer, xs[4:]), first)
    fresh = b.make(name, {**kwargs, "dim": 1})
    b.load_states(fresh, saved)
    np.testing.assert_array_equal(b.steps(fresh, xs[4:]), first)


@pytest.mark.parametrize("case", FIVE)
def test_load_states_copies_the_given_arrays(binding, case):
    """Writing into the arrays after ``load_states`` leaves the layer's states alone."""
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs)
    _steps(b, layer, 1)
    given = b.save_states(layer)
    expected = {k: b.to_numpy(v) for k, v in given.items()}
    fresh = b.make(name, kwargs)
    b.load_states(fresh, given)
    for value in given.values():
        b.fill(value, 0.0)
    assert b.host_states(fresh).keys() == expected.keys()
    for k, v in b.host_states(fresh).items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)


def _resize(shape, axis, by=1):
    shape = list(shape)
    shape[axis] += by
    return tuple(shape)


@pytest.mark.parametrize("held", [False, True], ids=["states-none", "states-held"])
@pytest.mark.parametrize("case", FIVE)
def test_load_states_is_all_or_nothing(binding, case, held):
    """A bad entry placed after valid ones (with other values) loads nothing; the valid states then load, as copies.

    A backend says ``TypeError`` for a wrong dtype and ``ValueError`` for the
    rest; the torch layers (through ``tt.Model.load_states``, as its docstring
    says) ``ValueError`` for a floating entry of another dtype and ``TypeError``
    for a non-floating one.
    """
    b, (_, name, kwargs) = binding, case
    layer = b.make(name, kwargs)
    if held:
        _steps(b, layer, 2)
    donor = b.make(name, kwargs)
    _steps(b, donor, 2)
    good = {k: b.to_numpy(v) + 1.0 for k, v in b.save_states(donor).items()}  # visibly other values, valid
    first, last = list(good)[0], list(good)[-1]
    feature_axis = -1 if name == "S5" else -2
    other_layer_state = "state" if "state" not in good else "global_state"
    defects = {  # label: (mapping, load_states keywords, the kind a backend raises)
        "missing": ({k: v for k, v in good.items() if k != last}, {}, ValueError),
        "extra": ({**good, "not_a_state": good[first]}, {}, ValueError),
        "another layer's state": ({**good, other_layer_state: good[first]}, {}, ValueError),
        "feature size": ({**good, last: np.zeros(_resize(good[last].shape, feature_axis), np.float32)}, {}, ValueError),
        "trailing size": ({**good, last: np.zeros(_resize(good[last].shape, -1), np.float32)}, {}, ValueError),
        "0-d": ({**good, last: np.ones((), np.float32)}, {}, ValueError),
        "float64": ({**good, last: good[last].astype(np.float64)}, {}, TypeError),
        "int32": ({**good, last: good[last].astype(np.int32)}, {}, TypeError),
        "bool": ({**good, last: good[last] > 0}, {}, TypeError),
        "feature size, non-strict": (
            {**good, last: np.zeros(_resize(good[last].shape, feature_axis), np.float32)}, {"strict": False}, ValueError,
        ),
    }
    problems = []
    for label, (mapping, kw, kind) in defects.items():
        given = {k: b.asarray(v) for k, v in mapping.items()}  # the bad entry comes last, after every valid one
        if b.mod is None and label == "float64":
            kind = ValueError
        problems += b.expect_error(layer, f"load_states {label}", lambda: b.load_states(layer, given, **kw), kind,
                                   names=(name, "OneLayerModel"))
    assert not problems, "\n".join(problems)
    b.load_states(layer, {k: b.asarray(v) for k, v in good.items()})
    for k, v in b.states(layer).items():
        np.testing.assert_array_equal(b.to_numpy(v), good[k])


def test_load_states_meta_entry_is_a_clear_error(binding):
    """A torch 'meta' tensor (no data) as a state entry: ValueError/TypeError, nothing loaded."""
    b = binding
    layer = b.make("Mamba", dict(num_neurons=N, d_state=D_STATE))
    _steps(b, layer, 2)
    states = {k: torch.from_numpy(b.to_numpy(v) + 1.0) for k, v in b.save_states(layer).items()}
    last = list(states)[-1]
    states[last] = states[last].to("meta")
    problems = b.expect_error(layer, "load_states meta", lambda: b.load_states(layer, states), (ValueError, TypeError),
                              names=("Mamba", "OneLayerModel"))
    assert not problems, "\n".join(problems)


def test_loaded_states_replace_held_ones_of_another_batch_shape(binding):
    """Batch 2 replaces batch 4; states of one layer that disagree on the batch shape are refused together."""
    b = binding
    kwargs = dict(num_neurons=N, d_state=D_STATE)
    layer, other = b.make("Mamba", kwargs, dtype="float64"), b.make("Mamba", kwargs, dtype="float64")
    b.step(layer, b.asarray(np.ones((4, N))))
    b.step(other, b.asarray(np.ones((2, N))))
    saved = b.save_states(other)
    b.load_states(layer, saved)
    for key, value in b.save_states(layer).items():
        np.testing.assert_array_equal(b.to_numpy(value), b.to_numpy(saved[key]), err_msg=key)
    assert tuple(layer.ssm_state.shape) == (2, N, D_STATE)
    assert tuple(b.step(layer, b.asarray(np.ones((2, N)))).shape) == (2, N)  # steps on from the batch-2 states
    mixed = {**b.save_states(layer), "conv_buffer": b.asarray(np.zeros((5, N, 4)))}
    who = "Mamba" if b.mod is None else f"Mamba ({b.name})"
    problems = b.expect_error(layer, "mixed batch shapes", lambda: b.load_states(layer, mixed), ValueError,
                              words=(f"{who}: the loaded states belong to different input shapes",))
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- torch layers: detach, copies


@pytest.mark.parametrize("how", ["step", "scan"])
@pytest.mark.parametrize("case", ALL)
def test_detach_states_cuts_the_graph_without_copying(case, how):
    _, name, kwargs = case
    layer = make_layer(name, kwargs)
    x = torch.randn(3, 2, N, dtype=DT, requires_grad=True)
    if how == "step":
        for x_t in x:
            layer(x_t)
    else:
        layer.scan(x)
    before = held_states(layer)
    assert all(v.requires_grad and v.grad_fn is not None for v in before.values())
    layer.detach_states()
    for n, old in before.items():
        new = getattr(layer, n)
        assert new.data_ptr() == old.data_ptr(), f"{n} was copied"
        assert not new.requires_grad and new.grad_fn is None, n
        assert torch.equal(new, old.detach()), n
    # The next step's graph stops at the detached states.
    layer(torch.randn(2, N, dtype=DT)).sum().backward()
    assert x.grad is None


def _live_layer(cls_name, kwargs):
    layer = make_layer(cls_name, kwargs)
    xs = torch.randn(2 * T, 2, N, dtype=DT)
    layer(xs[0].clone().requires_grad_(True))
    layer(xs[1])
    for name in state_names(cls_name, kwargs):
        assert getattr(layer, name).requires_grad, name  # live: attached to a graph
    return layer, xs


def _continue_equal(original, clone, xs, cls_name, kwargs):
    with torch.no_grad():
        assert torch.equal(run_steps(original, xs[2:]), run_steps(clone, xs[2:]))
    for name in state_names(cls_name, kwargs):
        assert torch.equal(getattr(original, name), getattr(clone, name)), name


@pytest.mark.parametrize("case", ALL)
def test_deepcopy_with_live_states(case):
    _, cls_name, kwargs = case
    layer, xs = _live_layer(cls_name, kwargs)
    before = held_states(layer)
    clone = copy.deepcopy(layer)
    for name, state in before.items():
        assert getattr(layer, name) is state, "deepcopy changed the original's state"
        assert state.requires_grad
        copied = getattr(clone, name)
        assert torch.equal(copied, state)
        assert copied.data_ptr() != state.data_ptr()
        assert not copied.requires_grad
    for (n1, p1), (n2, p2) in zip(layer.named_parameters(), clone.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    _continue_equal(layer, clone, xs, cls_name, kwargs)


@pytest.mark.parametrize("case", ALL)
def test_pickle_with_live_states(case):
    _, cls_name, kwargs = case
    layer, xs = _live_layer(cls_name, kwargs)
    clone = pickle.loads(pickle.dumps(layer))
    assert type(clone) is type(layer)
    for name in state_names(cls_name, kwargs):
        assert getattr(layer, name).requires_grad
        assert torch.equal(getattr(clone, name), getattr(layer, name))
    _continue_equal(layer, clone, xs, cls_name, kwargs)
    clone.zero_states()  # the clone trains
    run_steps(clone, xs[:2]).sum().backward()
    assert clone.A_log.grad is not None


@pytest.mark.parametrize("case", LTI)
def test_deepcopy_compiled_layer(case):
    _, cls_name, kwargs = case
    layer, xs = _live_layer(cls_name, kwargs)
    layer.TTcompile()
    clone = copy.deepcopy(layer)
    _continue_equal(layer, clone, xs, cls_name, kwargs)
    clone.TTdecompile()
    assert list(clone.state_dict()) == list(layer.state_dict())


# ----------------------------------------------------------------------------- tt.Model trees


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
    return {(i, name): getattr(layer, name) for i, layer in enumerate(model.all_layers())
            for name in sorted(layer._state_names)}


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
    for key, state in _all_states(model).items():
        assert not state.requires_grad, key
        assert state.grad_fn is None, key
        assert state.data_ptr() == before[key].data_ptr(), f"{key} was copied"
        assert torch.equal(state, before[key].detach()), key
    model(_xs()[1]).sum().backward()  # training continues on the detached states
    assert x.grad is None  # the graph was cut


def test_save_states_returns_clones(model):
    saved = model.save_states()
    expected = {k: v.clone() for k, v in saved.items()}
    assert not any(value.requires_grad for value in saved.values())
    layer_states = {s.data_ptr() for s in _all_states(model).values()}
    assert not any(v.data_ptr() in layer_states for v in saved.values())
    _run(model, _xs(1)[:2])  # later steps
    for layer in model.all_layers():  # in-place changes of the held states
        for name in layer._state_names:
            getattr(layer, name).add_(1.0)
    for key in saved:
        assert torch.equal(saved[key], expected[key]), key


def test_load_states_restores_exactly(model):
    xs = _xs(2)
    saved = model.save_states()
    first = _run(model, xs)
    model.load_states(saved)
    assert torch.equal(first, _run(model, xs))
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
    for value in saved.values():
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


@pytest.mark.parametrize(
    "bad_key, axis", [("named[b].conv_buffer", -1), ("net.0.global_state", -1), ("extra[0].global_state", 0)]
)
def test_load_states_wrong_shape_changes_nothing(model, bad_key, axis):
    """Only an axis the layer fixes (d_state, the kernel, the size at dim) makes a bad shape: a batch axis may change."""
    refs = _all_states(model)
    snap = _snapshot(model)
    states = {k: v + 1.0 for k, v in model.save_states().items()}  # visibly different values
    bad = states.pop(bad_key)  # the bad entry last, so every good one comes before it
    states[bad_key] = torch.zeros(_resize(bad.shape, axis), dtype=bad.dtype)
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
    target = Net()
    for bad in [(value.shape[0], N + 1, D_STATE), (value.shape[0], N, D_STATE + 1)]:  # features, d_state
        states["net.1.state"] = torch.zeros(bad, dtype=DT)
        with pytest.raises(ValueError):
            target.load_states(states)
        assert all(v is None for v in _all_states(target).values())


def test_load_states_wrong_dtype_changes_nothing(model):
    """As documented: a floating entry of another dtype is a ValueError, a non-floating one a TypeError."""
    refs = _all_states(model)
    snap = _snapshot(model)
    states = {k: v + 1.0 for k, v in model.save_states().items()}
    float32 = states.pop("named[a].state").to(torch.float32)
    integer = torch.zeros(2, N, D_STATE, dtype=torch.int64)
    for bad, kind, words in [(float32, ValueError, "must have dtype torch.float64"),
                             (integer, TypeError, "must be a floating-point tensor")]:
        states["named[a].state"] = bad
        with pytest.raises(kind, match=rf"S4: state named\[a\]\.state {words}"):
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

    unexpected = {**full, "net.7.state": torch.zeros(2, N, D_STATE, dtype=DT)}
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


class _Pair(tt.Model):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(tt.ssm.Mamba(N, d_state=D_STATE), tt.ssm.S5(N, d_state=D_STATE))

    def forward(self, x):
        return self.net(x)


def _pair_states(batch):
    model = _Pair()
    model(torch.randn(batch, N))
    return model.save_states()


def test_a_partial_load_must_agree_with_the_states_kept():
    model = _Pair()
    model(torch.randn(4, N))
    before = cloned_states(model.net[0])
    states = {"net.0.ssm_state": _pair_states(2)["net.0.ssm_state"]}
    with pytest.raises(ValueError, match=r"held conv_buffer"):
        model.load_states(states, strict=False)
    assert_states_equal(model.net[0], before)


def test_a_state_given_under_both_key_forms_is_an_error():
    model = _Pair()
    states = _pair_states(3)
    states["net._modules[1].global_state"] = states["net.1.global_state"] * 2
    with pytest.raises(ValueError, match=r"'net.1.global_state' and 'net._modules\[1\].global_state' name the same"):
        model.load_states(states)
    assert all(getattr(layer, name) is None for layer in model.net for name in layer._state_names)
    states["net._modules[1].global_state"] = states["net.1.global_state"].clone()  # as 0.19.2 writes them: equal
    model.load_states(states)
    assert torch.equal(model.net[1].global_state, states["net.1.global_state"])


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
    assert set(outer.save_states()) == {f"inner.{k}" for k in EXPECTED_KEYS} | {"helpers[0].state"}
    saved = outer.save_states()
    first = _run(outer, xs[1:])
    outer.zero_states()
    assert outer.helpers[0].state is None
    assert all(v is None for v in _all_states(outer.inner).values())
    outer.load_states(saved)
    assert torch.equal(_run(outer, xs[1:]), first)


def test_model_deepcopy_and_pickle_with_live_states(model):
    model(_xs(6)[0].clone().requires_grad_(True))
    xs = _xs(7)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert set(clone.save_states()) == EXPECTED_KEYS
        saved = model.save_states()
        for key, value in clone.save_states().items():
            assert torch.equal(value, saved[key]), key
        assert rel_err(_run(clone, xs), _run(model, xs)) == 0.0
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


@pytest.mark.parametrize("cls_name", ["S4", "S5", "S6", "Mamba"])
def test_load_states_of_another_dtype_into_fresh_model(cls_name):
    """float64 states into a float32 model (no state held yet): ValueError naming the layer, nothing loaded.

    ``load_states`` documents it: an entry whose dtype does not fit its layer
    raises ``ValueError`` and nothing is loaded; the model then steps from zeros in float32.
    """
    torch.manual_seed(0)
    source = OneLayerModel(getattr(tt.ssm, cls_name)(N, d_state=D_STATE)).double()
    source(torch.randn(2, N, dtype=DT))
    saved = source.save_states()
    torch.manual_seed(0)
    target = OneLayerModel(getattr(tt.ssm, cls_name)(N, d_state=D_STATE))  # float32
    with pytest.raises(ValueError, match=rf"{cls_name}: state layer\.\w+ must have dtype torch.float32 "
                                         r"\(for parameters of torch.float32\), got torch.float64"):
        target.load_states(saved)
    assert all(getattr(target.layer, n) is None for n in target.layer._state_names)
    y = target(torch.randn(2, N))
    assert y.dtype == torch.float32
    for key, value in target.save_states().items():
        assert value.dtype == torch.float32, key


# ----------------------------------------------------------------------------- graph-attached states, copies


@pytest.mark.parametrize("case", ONE_OF_EACH)
def test_load_states_keeps_the_graph_of_a_learned_initial_state(case):
    """A parameter loaded as the initial state gets the gradient the same math through the stateless form gives."""
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    model = OneLayerModel(layer)
    x = torch.randn(3, N, dtype=DT)
    gen = torch.Generator().manual_seed(7)
    initial = [nn.Parameter(0.5 * torch.randn(z.shape, generator=gen, dtype=DT)) for z in layer.initial_states(x)]
    model.load_states({f"layer.{name}": p for name, p in zip(layer.state_names, initial)})
    for name, p in zip(layer.state_names, initial):
        assert getattr(layer, name) is not p and name not in layer._parameters  # a copy, kept as a state
    layer(x).square().sum().backward()
    assert all(torch.equal(v, v.detach()) and not v.requires_grad for v in model.save_states().values())

    by_hand = [p.detach().clone().requires_grad_(True) for p in initial]
    y, *_ = layer.stateless()(x, *by_hand)
    y.square().sum().backward()
    for name, p, reference in zip(layer.state_names, initial, by_hand):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"{name}: no gradient reached the initial state"
        # The same operations on the same values: the copy load_states makes passes the gradient on unchanged.
        torch.testing.assert_close(p.grad, reference.grad, rtol=0, atol=0)


_COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": lambda m: torch.load(io.BytesIO(_saved(m)), weights_only=False),
}


def _saved(module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("how", list(_COPIES))
@pytest.mark.parametrize("case", ONE_OF_EACH)
def test_a_copy_made_in_sequence_mode_steps(case, how):
    """Sequence mode belongs to the ``with`` block, not to the layers: a copy made inside it (a best-model or EMA
    snapshot) steps, inside the block and after it, as the original steps after it."""
    _, cls_name, kwargs = case
    model = OneLayerModel(make_layer(cls_name, kwargs))
    xs = torch.randn(5, 3, N, dtype=DT)
    step_inputs = torch.randn(2, 3, N, dtype=DT)  # [3, N]: a batch of 3, which a sequence would read as time
    with torch.no_grad():
        with tt.sequence_mode(model):
            model(xs)
            clone = _COPIES[how](model)
            copied = [clone(step_inputs[0])]  # not the block's module: it steps
        original = [model(step_inputs[0])]
        copied.append(clone(step_inputs[1]))
        original.append(model(step_inputs[1]))
    for got, expected in zip(copied, original):
        assert torch.equal(got, expected)
    for name in model.layer.state_names:
        state = getattr(clone.layer, name)
        assert state.shape == getattr(model.layer, name).shape and state.shape[0] == 3, (name, tuple(state.shape))
        assert torch.equal(state, getattr(model.layer, name)), name


def test_a_layer_pickled_in_sequence_mode_by_an_earlier_version_steps():
    """Pickles written inside a sequence_mode block before the mode left copies still load as stepping layers."""
    layer = make_layer("S4", dict(num_neurons=N, d_state=D_STATE))
    layer.__dict__["_sequence_time_dim"] = 0  # what such a pickle holds
    data = pickle.dumps(layer)
    del layer.__dict__["_sequence_time_dim"]
    clone = pickle.loads(data)
    x = torch.randn(3, N, dtype=DT)
    with torch.no_grad():
        assert torch.equal(clone(x), layer(x))
    assert clone.state.shape == (3, N, D_STATE)


# ----------------------------------------------------------------------------- the cost of finding the layers


class _CountingList(list):
    """A list that counts how often it is iterated."""

    iterations = 0

    def __iter__(self):
        type(self).iterations += 1
        return super().__iter__()


class _CountingDict(dict):
    """A dict that counts how often its contents are read as a whole."""

    reads = 0

    def _read(self, method):
        type(self).reads += 1
        return getattr(super(), method)()

    def __iter__(self):
        return self._read("__iter__")

    def items(self):
        return self._read("items")

    def values(self):
        return self._read("values")

    def keys(self):
        return self._read("keys")


class _WithVocabulary(tt.Model):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(N, N), tt.ssm.S4(N, d_state=D_STATE))
        self.extra = [tt.ssm.S6(N, d_state=D_STATE)]  # a layer in a plain list: found
        self.vocabulary = _CountingList(["token"] * 1_000_000)  # plain data: nothing to look for in it
        self.index = _CountingDict((f"token{i}", i) for i in range(200_000))
        self.counts = {f"token{i}": i for i in range(200_000)}

    def forward(self, x):
        return self.extra[0](self.net(x))


def test_finding_the_layers_does_not_go_through_plain_data_again():
    """``model.scan``, ``tt.sequence_mode`` and ``tt.checkpoint`` run per call: large plain containers that hold no
    layer are not read again while they are unchanged, and a change to them is noticed."""
    model = _WithVocabulary().double()
    model.extra[0].double()
    xs = torch.randn(4, 2, N, dtype=DT, requires_grad=True)
    model.scan(xs)  # the first look may read everything
    _CountingList.iterations = _CountingDict.reads = 0
    model.scan(xs)
    with tt.sequence_mode(model):
        model(xs)
    tt.checkpoint(model.scan, xs).sum().backward()
    assert (_CountingList.iterations, _CountingDict.reads) == (0, 0)

    # A layer put into the data is found, whether appended or put in place of an item.
    appended, replacing, keyed = (tt.ssm.S5(N, d_state=D_STATE).double() for _ in range(3))
    model.vocabulary.append(appended)
    model.vocabulary[10] = replacing
    model.index["token5"] = keyed
    for layer in (appended, replacing, keyed):
        layer(xs[0])
    keys = set(model.save_states())
    assert {"vocabulary[1000000].global_state", "vocabulary[10].global_state", "index[token5].global_state"} <= keys
    with torch.no_grad(), tt.sequence_mode(model):
        assert appended(xs).shape == xs.shape and appended.global_state.shape == (2, D_STATE)  # a sequence
    model.zero_states()
    assert appended.global_state is None and replacing.global_state is None and keyed.global_state is None
