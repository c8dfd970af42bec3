"""A compiled block (and a TTcompile'd step) loaded from inductor's on-disk cache under another vector ISA.

Inductor compiles for the vector instructions it picks from the CPU and
``ATEN_CPU_CAPABILITY``; its cache did not tell them apart, so a block cached
under AVX-512 and loaded under ``ATEN_CPU_CAPABILITY=avx2`` (as where a home
directory is shared by machines of both kinds) crashed the process or gave
NaN. Two processes share one cache directory here: the native capability, then avx2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = """
import sys, torch
import tracetorch as tt
from tracetorch.ssm import _backend, _fused
_backend.backend.fused_block = 4
torch.manual_seed(0)
layer = tt.ssm.S6(8, d_state=4).double()
with torch.no_grad():
    layer.dt_proj.bias.add_(1.0)
xs = torch.randn(13, 6, 8, dtype=torch.float64, requires_grad=True)
ys = layer.scan(xs, compiled=True)
(g,) = torch.autograd.grad(ys.sum(), xs)
assert _fused.block_compiler.compiled_keys(), _fused.block_compiler.failed_keys
layer.zero_states()
ys_eager = layer.scan(xs, compiled=False)
(g_eager,) = torch.autograd.grad(ys_eager.sum(), xs)
# The TTcompile'd step (on CPUs a graph compiled without dynamo) goes through the same cache.
layer.zero_states()
with torch.no_grad():
    ys_step = torch.stack([layer(x) for x in xs])
    layer.TTcompile()
    layer.zero_states()
    ys_compiled = torch.stack([layer(x) for x in xs])
assert _fused.step_compiler.compiled_keys(), _fused.step_compiler.failed_keys
print(float((ys - ys_eager).abs().max()), float((g - g_eager).abs().max()), float((ys_compiled - ys_step).abs().max()))
"""


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT"),
    reason="needs a CPU above AVX2 (AVX-512), so that ATEN_CPU_CAPABILITY=avx2 changes inductor's vector ISA",
)
def test_a_block_cached_under_another_vector_isa_is_not_reused(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    for capability in (None, "avx2"):
        if capability is not None:
            env["ATEN_CPU_CAPABILITY"] = capability
        run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"capability {capability}: exit {run.returncode}\n{run.stderr[-2000:]}"
        output_error, gradient_error, step_error = map(float, run.stdout.split())
        assert output_error <= 1e-12 and gradient_error <= 1e-12 and step_error <= 1e-12, (capability, run.stdout)
