"""Replay the outputs recorded from the published tracetorch==0.19.2 (float64 and float32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tracetorch as tt
from conftest import FIXTURE_DIR, RECORDING_TOL, TOL, rel_err

FILES = sorted(FIXTURE_DIR.glob("*.npz")) if FIXTURE_DIR.is_dir() else []
# With no fixture files the replay tests must fail, not be skipped: one sentinel case.
FILE_PARAMS = FILES or [None]
FILE_IDS = [f.stem for f in FILES] or ["no-fixture-files"]

# float64: the recordings' own error (see RECORDING_TOL); float32: the float32 computation's (TOL).
TOLERANCE = {torch.float64: RECORDING_TOL, torch.float32: TOL["float32"]}


def _load(path):
    assert path is not None, f"no .npz fixture files in {FIXTURE_DIR}"
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _build(data, dtype=torch.float64):
    cls = getattr(tt.ssm, str(data["layer"]))
    kwargs = json.loads(str(data["kwargs"]))
    return cls(**kwargs).to(dtype), kwargs


def _params(data):
    return {k[len("param."):]: torch.from_numpy(v) for k, v in data.items() if k.startswith("param.")}


def test_fixture_directory_exists_and_has_files():
    assert FIXTURE_DIR.is_dir(), f"fixture directory missing: {FIXTURE_DIR}"
    files = sorted(FIXTURE_DIR.glob("*.npz"))
    assert files, f"no .npz files in {FIXTURE_DIR}"
    layers = {str(np.load(f)["layer"]) for f in files}
    assert layers == {"S4", "S5", "S6", "Mamba"}, layers


@pytest.mark.parametrize("path", FILE_PARAMS, ids=FILE_IDS)
def test_fixture_is_well_formed(path):
    data = _load(path)
    for key in ("layer", "kwargs", "inputs", "outputs"):
        assert key in data, key
    assert data["inputs"].shape == data["outputs"].shape
    assert data["inputs"].dtype == np.float64
    assert any(k.startswith("final.") for k in data)
    assert any(k.startswith("param.") for k in data)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("path", FILE_PARAMS, ids=FILE_IDS)
def test_fixture_replay(path, dtype):
    data = _load(path)
    layer, _ = _build(data, dtype)
    layer.load_state_dict(_params(data), strict=True)
    for p in layer.parameters():
        assert p.dtype == dtype
    inputs = torch.from_numpy(data["inputs"]).to(dtype)
    outputs = []
    for x in inputs:
        y = layer(x)
        assert y.shape == x.shape and y.dtype == dtype
        outputs.append(y.detach())
    outputs = torch.stack(outputs)
    tol = TOLERANCE[dtype]
    err = rel_err(outputs, torch.from_numpy(data["outputs"]))
    assert err <= tol, f"outputs: rel err {err:.3e} > {tol:.0e}"

    finals = {k[len("final."):]: v for k, v in data.items() if k.startswith("final.")}
    assert finals
    assert set(finals) == set(layer._state_names)
    for name, ref in finals.items():
        state = getattr(layer, name)
        assert state is not None, name
        assert tuple(state.shape) == ref.shape, name
        assert state.dtype == dtype, name
        err = rel_err(state, torch.from_numpy(ref))
        assert err <= tol, f"final.{name}: rel err {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("path", FILE_PARAMS, ids=FILE_IDS)
def test_state_dict_keys_and_shapes_match_fixture(path):
    data = _load(path)
    layer, _ = _build(data)
    expected = {k: tuple(v.shape) for k, v in _params(data).items()}
    got = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("path", FILE_PARAMS, ids=FILE_IDS)
def test_fixture_replay_after_zero_states_repeats(path):
    """Replaying twice, with zero_states() in between, gives the same numbers bit for bit."""
    data = _load(path)
    layer, _ = _build(data)
    layer.load_state_dict(_params(data), strict=True)
    inputs = torch.from_numpy(data["inputs"])
    with torch.no_grad():
        first = torch.stack([layer(x) for x in inputs])
        layer.zero_states()
        for name in layer._state_names:
            assert getattr(layer, name) is None
        second = torch.stack([layer(x) for x in inputs])
    assert torch.equal(first, second)
