"""The first call of a layer under ``torch.compile`` prints no warning.

Dynamo warns once per process and message (an ``lru_cache`` it traces
through, a fallback, ...), so an earlier test in the same process could have
used the warning up: each check runs in a fresh interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("S4", "S5", "S6", "Mamba")

SCRIPT = r"""
import json, logging, sys, warnings
import torch
import tracetorch as tt

class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage()[:500])

report = {}
for name in sys.argv[1:]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = getattr(tt.ssm, name)(8)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(3, 8)
    handler = Collect()
    logging.getLogger("torch").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            compiled(x)  # the first call: inference
        compiled(x).sum().backward()  # and the first one with autograd
    logging.getLogger("torch").removeHandler(handler)
    report[name] = [str(w.message)[:500] for w in caught] + handler.messages
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def compile_warnings():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *LAYERS], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", LAYERS)
def test_first_compiled_call_prints_no_warning(compile_warnings, name):
    assert compile_warnings[name] == []
