"""The oldest versions the package claims, and what stands in for newer torch features before them.

``pyproject.toml``'s floors must be the versions ``.ci/oldest`` tests (its pins
in ``.ci/oldest.txt``), and ``tracetorch._compat`` must name the same torch.
Its stand-ins for features of newer torch releases are checked here on the
installed torch, with the newer feature hidden.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import tracetorch as tt
from tracetorch import _compat

ROOT = Path(__file__).resolve().parents[1]
FLOORED = ("torch", "numpy", "array-api-compat", "mlx", "safetensors")


def _version(text: str) -> tuple:
    """``"1.16.0"`` -> ``(1, 16)``, ``"0.32.1"`` -> ``(0, 32, 1)``: trailing zeros past the minor dropped."""
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 2 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _floors() -> dict:
    """Each requirement's ``>=`` versions in pyproject.toml, by distribution name (extras and markers aside)."""
    floors: dict = {}
    text = (ROOT / "pyproject.toml").read_text()
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)', text):
        floors.setdefault(name, set()).add(version)
    return floors


def _pins() -> dict:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


def test_ci_tests_the_floor_of_each_requirement():
    floors, pins = _floors(), _pins()
    for name in FLOORED:
        assert len(floors[name]) == 1, (name, floors[name])  # mlx: the same floor on Linux and macOS
        (floor,) = floors[name]
        pin = _version(pins[name])
        # torch's floor names a release series, tested on its last patch.
        assert (pin[:2] if name == "torch" else pin) == _version(floor), (name, floor, pins[name])
    assert pins["mlx-cpu"] == pins["mlx"]  # Linux's CPU build of MLX comes in a package of its own
    assert "bash .ci/oldest" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_tracetorch_names_the_torch_floor_of_pyproject():
    (floor,) = _floors()["torch"]
    assert _compat.MIN_TORCH == _version(floor)


def test_importing_tracetorch_on_an_older_torch_says_which_torch_it_needs(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.3.1+cu121")
    try:
        with pytest.raises(ImportError, match=r"tracetorch needs torch >= 2\.4, found torch 2\.3\.1\+cu121"):
            importlib.reload(_compat)
    finally:
        monkeypatch.undo()
        importlib.reload(_compat)
    assert _compat.TORCH_VERSION >= _compat.MIN_TORCH


def test_without_torch_compiler_is_exporting_export_of_the_stateful_layer_is_still_refused(monkeypatch):
    # torch before 2.7 has no torch.compiler.is_exporting: the stand-in reads the flag
    # that torch.export sets while it runs the layer's Python code (its non-strict mode).
    monkeypatch.setattr(_compat, "_is_exporting", None)
    layer = tt.ssm.S6(4, d_state=3)
    x = torch.randn(3, 4)
    assert not _compat.is_exporting()
    layer(x)  # outside torch.export the layer steps
    held = {name: getattr(layer, name).clone() for name in layer.state_names}
    with pytest.raises(RuntimeError, match=r"S6: torch\.export .*layer\.stateless\(\)"):
        torch.export.export(layer, (x,), strict=False)
    for name, value in held.items():
        assert torch.equal(getattr(layer, name), value), name
    assert not _compat.is_exporting()
