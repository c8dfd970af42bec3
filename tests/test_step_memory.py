"""Stepping a long sequence and keeping every output costs the outputs, not a state per step.

Each step allocates state-sized temporaries and frees them, and returns a
small output that the caller keeps. With glibc's allocator, an output carved
out of a freed state-sized block leaves a remainder too small for the next
step's temporaries, and the heap grows by a state per step: S4 at batch 8
once took 1 GiB over 2,048 steps whose outputs were 16 MiB. Each layer is
stepped in a fresh process (the allocator's history is part of the outcome),
with the kernel's peak resident memory reset just before the loop.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, FEATURES = 1024, 8, 256

_PROBE = """
import json, sys, torch
import tracetorch as tt

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) / 1024 for line in lines if line.startswith(key + ":"))

torch.manual_seed(0)
steps, batch, features = {steps}, {batch}, {features}
layer = getattr(tt.ssm, sys.argv[1])(features)
xs = torch.randn(steps, batch, features)
with torch.no_grad():
    layer(xs[0])
    layer.zero_states()
    with open("/proc/self/clear_refs", "w") as control:
        control.write("5")  # the peak resident memory starts again from now
    before = status("VmRSS")
    ys = [layer(x) for x in xs]
    print(json.dumps({{"rise_mib": status("VmHWM") - before}}))
""".format(steps=STEPS, batch=BATCH, features=FEATURES)


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as control:
            control.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux's /proc/self/clear_refs to measure a peak")
@pytest.mark.parametrize("layer", ["S4", "S5", "S6", "Mamba"])
def test_kept_step_outputs_cost_about_their_own_size(layer):
    done = subprocess.run([sys.executable, "-c", _PROBE, layer], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rise = json.loads(done.stdout.strip().splitlines()[-1])["rise_mib"]
    outputs = STEPS * BATCH * FEATURES * 4 / 2**20  # 8 MiB of float32
    # A state per step would be STEPS * BATCH * FEATURES * d_state * 4 bytes: 16x-64x the outputs.
    assert rise < 3 * outputs + 16, f"{layer}: {rise:.0f} MiB for {outputs:.0f} MiB of kept outputs"
