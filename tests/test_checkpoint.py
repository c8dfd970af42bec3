"""Activation checkpointing over sequence chunks: gradients equal the unchecked run."""

from __future__ import annotations

import pytest
import torch

import tracetorch as tt
from conftest import ALL, ONE_OF_EACH, make_layer

T, CHUNK, BATCH = 12, 5, 2


def _chunked(run, xs, checkpointed: bool):
    outputs = [tt.checkpoint(run, chunk) if checkpointed else run(chunk) for chunk in xs.split(CHUNK)]
    return torch.cat(outputs)


def _grads(module, xs, run, checkpointed):
    module.zero_grad()
    xs = xs.clone().requires_grad_(True)
    ys = _chunked(run, xs, checkpointed)
    (ys.square().sum() + ys[-1].sum()).backward()
    return ys.detach(), [p.grad.clone() for p in module.parameters()], xs.grad.clone()


def _assert_same_run(module, run, xs, states):
    ys_plain, grads_plain, xgrad_plain = _grads(module, xs, run, False)
    final_plain = states()
    module.zero_states()
    ys_ckpt, grads_ckpt, xgrad_ckpt = _grads(module, xs, run, True)
    torch.testing.assert_close(ys_ckpt, ys_plain, rtol=0, atol=0)
    for got, expected in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xgrad_ckpt, xgrad_plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(states(), final_plain):  # the layers end where the unchecked run ends
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ALL)
def test_checkpointed_layer_scan_chunks(case):
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    xs = torch.randn(T, BATCH, kwargs["num_neurons"], dtype=torch.float64)
    states = lambda: [getattr(layer, n).detach().clone() for n in sorted(layer._state_names)]  # noqa: E731
    _assert_same_run(layer, layer.scan, xs, states)


class _Net(tt.Model):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 4), tt.ssm.Mamba(4, d_state=3), torch.nn.GELU(), tt.ssm.S4(4, d_state=3),
            tt.ssm.S6(4, d_state=2), tt.ssm.S5(4, d_state=3), torch.nn.Linear(4, 2),
        )

    def forward(self, x):
        return self.net(x)


def test_checkpointed_model_in_sequence_mode():
    torch.manual_seed(0)
    model = _Net().double()
    xs = torch.randn(T, BATCH, 3, dtype=torch.float64)
    states = lambda: [v.clone() for v in model.save_states().values()]  # noqa: E731
    _assert_same_run(model, model.scan, xs, states)
    model.zero_states()
    with tt.sequence_mode(model):  # the module itself under sequence mode
        _assert_same_run(model, model, xs, states)


def test_checkpoint_rejects_what_holds_no_module():
    with pytest.raises(TypeError, match="tt.checkpoint: expected a module"):
        tt.checkpoint(lambda x: x, torch.ones(2, requires_grad=True))


class _OneLayerNet(tt.Model):
    def __init__(self, cls_name):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 4), getattr(tt.ssm, cls_name)(4, d_state=3), torch.nn.Linear(4, 2)
        )

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("cls_name", ["S4", "S5", "S6", "Mamba"])
def test_checkpoint_in_sequence_mode_with_backward_after_the_block(cls_name, monkeypatch):
    """The recomputation runs during backward, after ``tt.sequence_mode`` has ended: it still takes sequences."""
    monkeypatch.setenv("SSM_COMPILE", "0")  # the eager scan in both runs, whatever the automatic policy learned
    torch.manual_seed(0)
    model = _OneLayerNet(cls_name).double()
    xs = torch.randn(T, BATCH, 3, dtype=torch.float64)

    def run(checkpointed):
        model.zero_states()
        model.zero_grad()
        with tt.sequence_mode(model):
            ys = torch.cat([tt.checkpoint(model, chunk) if checkpointed else model(chunk) for chunk in xs.split(CHUNK)])
        (ys.square().sum() + ys[-1].sum()).backward()  # out of the block
        return ys.detach(), [p.grad.clone() for p in model.parameters()], model.save_states()

    ys_plain, grads_plain, states_plain = run(False)
    ys_ckpt, grads_ckpt, states_ckpt = run(True)
    torch.testing.assert_close(ys_ckpt, ys_plain, rtol=0, atol=0)
    # The recomputation repeats the forward's float64 operations: equal to far below any rounding of the sum.
    for got, expected in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert states_ckpt.keys() == states_plain.keys()
    for key in states_plain:
        torch.testing.assert_close(states_ckpt[key], states_plain[key], rtol=0, atol=0)
    assert model.net[1].__dict__.get("_sequence_time_dim") is None  # the layer steps again after backward


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("held", ["no states", "states with a graph"])
@pytest.mark.parametrize("case", ONE_OF_EACH)
def test_plain_torch_checkpoint_of_a_stateful_layer_names_tt_checkpoint(case, held, use_reentrant, monkeypatch):
    """Plain checkpointing recomputes from the states of a later time: an error naming tt.checkpoint, never wrong
    gradients.

    With states that carry a graph and chunks of one length the recomputed
    tensors have the forward's metadata, so torch's own check passes and only
    the gradients would be wrong.
    """
    monkeypatch.setenv("SSM_COMPILE", "0")
    _, cls_name, kwargs = case
    layer = make_layer(cls_name, kwargs)
    if held == "states with a graph":
        layer.scan(torch.randn(3, BATCH, kwargs["num_neurons"], dtype=torch.float64))
    xs = torch.randn(12, BATCH, kwargs["num_neurons"], dtype=torch.float64, requires_grad=True)
    ys = [torch.utils.checkpoint.checkpoint(layer.scan, chunk, use_reentrant=use_reentrant) for chunk in xs.split(4)]
    with pytest.raises(RuntimeError, match=rf"{cls_name}: .*tt\.checkpoint"):
        torch.cat(ys).sum().backward()
