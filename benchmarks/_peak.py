"""Peak memory and first-call time of one sequence run, in a fresh process.

``python -m benchmarks._peak JOB`` (``JOB``: JSON naming a device, layer,
``T``, batch, mode and contender, see ``benchmarks._contenders.build``) builds the
contender, runs the sequence once and prints one JSON line: ``peak_mib``,
the highest resident memory during the run above the resident memory before
it (on CUDA: ``torch.cuda.max_memory_allocated`` above what setup left
allocated, the host figure kept as ``host_peak_mib``), and ``first_s``, the
run's seconds: all that a first call pays, compiling included.

On Linux the kernel's peak (``VmHWM``) is reset to the current size just
before the run (``/proc/self/clear_refs``), so a run that needs less than the
imports once did still shows its own peak. Elsewhere the figure is the rise
of ``ru_maxrss``, which never goes down: a lower bound, said so in
``peak_note``. A fresh process per run keeps both figures honest: nothing is warm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ._measure import error_text, maxrss_mib, proc_mib

_ROOT = Path(__file__).resolve().parents[1]


def run(job: dict, timeout_s: float, cache_dir: str) -> dict:
    """``job`` in a process of its own with ``cache_dir`` as torch's compile cache: its result, or ``{"error"}``."""
    command = [sys.executable, "-m", "benchmarks._peak", json.dumps(job)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=_ROOT, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode < 0:
        number = -done.returncode
        return {"error": f"killed by signal {number}" + (" (out of memory?)" if number == signal.SIGKILL else "")}
    results = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if results:
        return json.loads(results[-1])
    return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}


def _run_here(job: dict) -> dict:
    import torch

    from ._contenders import build

    torch.set_num_threads(job["threads"])
    cuda = job["device"] == "cuda"
    call, _ = build(job)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        device_base = torch.cuda.memory_allocated()
    exact = _reset_peak_rss()
    baseline = proc_mib("VmRSS") if exact else maxrss_mib()
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
    result = {"first_s": time.perf_counter() - start}
    if exact:
        result["peak_mib"] = proc_mib("VmHWM") - baseline
    else:
        result["peak_mib"] = maxrss_mib() - baseline
        result["peak_note"] = "a lower bound: the rise of ru_maxrss over the process's earlier peak"
    if cuda:
        result["host_peak_mib"] = result["peak_mib"]
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - device_base) / 2**20
    return result


def _reset_peak_rss() -> bool:
    """Set this process's peak resident memory (``VmHWM``) to its current size; False where the OS cannot."""
    if proc_mib("VmRSS") is None or proc_mib("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as control:
            control.write("5")  # Linux >= 4.0: reset the peak resident set size
    except OSError:
        return False
    return True


if __name__ == "__main__":
    try:
        outcome = _run_here(json.loads(sys.argv[1]))
    except BaseException as error:  # report anything, MemoryError included
        outcome = {"error": error_text(error)}
    print(json.dumps(outcome), flush=True)
