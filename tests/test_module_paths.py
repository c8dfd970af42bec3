"""The module paths traceTorch 0.19.2 pickled its classes under still resolve.

``torch.save(model)`` pickles classes by module path and name; a model saved
with traceTorch 0.19.2 names ``tracetorch.ssm._s_series.S4``,
``tracetorch.ssm._ssmlayer.Layer``, ``tracetorch.core._layer.Layer`` and
``tracetorch.core._model.Model``.
"""

import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tracetorch as tt

ROOT = Path(__file__).resolve().parent.parent

PUBLISHED_PATHS = [
    ("tracetorch.ssm._s_series", "S4", tt.ssm.S4),
    ("tracetorch.ssm._s_series", "S5", tt.ssm.S5),
    ("tracetorch.ssm._s_series", "S6", tt.ssm.S6),
    ("tracetorch.ssm._s_series", "Mamba", tt.ssm.Mamba),
    ("tracetorch.ssm._ssmlayer", "Layer", tt.ssm.Layer),
    ("tracetorch.core._layer", "Layer", tt.Layer),
    ("tracetorch.core._model", "Model", tt.Model),
]


@pytest.mark.parametrize("module, name, cls", PUBLISHED_PATHS, ids=lambda v: v if isinstance(v, str) else "")
def test_published_module_path_resolves(module, name, cls):
    assert getattr(importlib.import_module(module), name) is cls


def _pickled_under_published_path():
    """A model pickled as traceTorch 0.19.2 names its layers: classes in ``tracetorch.ssm._s_series``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(tt.ssm.S4(4, d_state=3), tt.ssm.Mamba(4, d_state=3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    # Protocols up to 3 write each class as "module\nname\n": the module can be renamed in place.
    data = pickle.dumps(model, protocol=2)
    assert b"tracetorch.ssm._layers\n" in data
    return model, x, data.replace(b"tracetorch.ssm._layers\n", b"tracetorch.ssm._s_series\n")


def test_model_pickled_under_the_published_path_loads_and_steps():
    model, x, data = _pickled_under_published_path()
    clone = pickle.loads(data)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_published_path_loads_in_a_fresh_interpreter(tmp_path):
    _, _, data = _pickled_under_published_path()
    path = tmp_path / "model.pkl"
    path.write_bytes(data)
    code = f"import pickle; m = pickle.loads(open({str(path)!r}, 'rb').read()); print(type(m[0]).__module__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "tracetorch.ssm._layers"


@pytest.mark.parametrize("cls, kwargs", [
    (tt.ssm.S4, dict(d_state=3, dim=0)), (tt.ssm.S5, dict(d_state=3)), (tt.ssm.S6, dict(d_state=3, dt_rank=2)),
    (tt.ssm.Mamba, dict(d_state=3, dt_rank=3, conv_kernel=3)), (tt.ssm.Mamba, dict(d_state=3, conv_kernel=1)),
])
def test_layer_keeps_its_config_and_a_published_pickle_finds_it(cls, kwargs):
    torch.manual_seed(0)
    layer = cls(4, **kwargs).double()
    assert layer.config is layer.config  # built once, in __init__, and kept
    x = torch.randn(4, 2, dtype=torch.float64) if kwargs.get("dim") == 0 else torch.randn(2, 4, dtype=torch.float64)
    # A layer pickled by traceTorch 0.19.2 holds its attributes and parameters, not the config nor the slots.
    old = pickle.loads(pickle.dumps(layer))
    for name in ("_ssm_config", "_state_slots"):
        old.__dict__.pop(name, None)
    assert old.config == layer.config
    with torch.no_grad():
        assert torch.equal(old(x), layer(x))
