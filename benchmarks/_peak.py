"""Peak memory of one sequence run, each in a fresh process.

``python -m benchmarks._peak`` reads a JSON list of jobs on stdin and prints
one JSON result per line, in order. A job names a torch device, layer,
sequence length ``T``, batch, features, method (``benchmarks.scan.METHODS``)
and mode (``"fwd"`` or ``"fwd+bwd"``).

Each job runs in a process of its own. On Linux this server imports torch,
tracetorch and the reference once, does no tensor work, and forks one child
per job (a forked child's ``ru_maxrss`` starts from the RSS it has at the
fork, the server's post-import RSS, so nothing of an earlier job shows). The
child builds the layers and the input, reads ``ru_maxrss`` (its baseline),
runs the sequence once, and reports the rise of ``ru_maxrss`` over that
baseline in MiB; on CUDA it reports ``torch.cuda.max_memory_allocated``
above the allocated memory after setup instead (host rise kept as
``host_peak_mib``). Elsewhere (macOS, Windows), :func:`run_jobs` starts one
server per job and the job runs in it directly.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_jobs", "run_job"]

_ROOT = Path(__file__).resolve().parents[1]
_USE_FORK = sys.platform.startswith("linux")


def _maxrss_mib() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 2**20 if sys.platform == "darwin" else value / 1024


def run_job(job: dict, reference) -> dict:
    """Build, read the baseline, run one sequence, read the peak: ``{"peak_mib", "baseline_mib", ...}``."""
    import torch

    from ._layers import build_pair
    from .scan import sequence_runner

    torch.set_num_threads(job.get("threads", 2))
    device = job["device"]
    ours, upstream = build_pair(job["layer"], job["features"], device, reference)
    if job["method"] == "upstream step" and upstream is None:
        raise RuntimeError("the reference is not available")
    torch.manual_seed(1)
    xs = torch.randn(job["T"], job["batch"], job["features"], device=device)
    run = sequence_runner(job["method"], job["mode"], ours, upstream, xs)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        device_base = torch.cuda.memory_allocated()
    baseline = _maxrss_mib()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    host_peak = _maxrss_mib() - baseline
    result = {"peak_mib": host_peak, "baseline_mib": baseline, "run_s": seconds}
    if device == "cuda":
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - device_base) / 2**20
        result["host_peak_mib"] = host_peak
    return result


def _safe_run(job, reference) -> dict:
    from ._timing import error_text

    try:
        return run_job(job, reference)
    except BaseException as error:  # report anything, MemoryError included
        return {"error": error_text(error)}


def _in_child(job: dict, reference, timeout_s: float) -> dict:
    """``run_job`` in a forked child, killed after ``timeout_s``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        payload = json.dumps(_safe_run(job, reference)).encode()
        os.write(write_end, payload)
        os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout_s
    status = None
    chunks = []
    os.set_blocking(read_end, False)
    while status is None:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = code
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return {"error": f"timed out after {timeout_s:.0f} s"}
        _drain(read_end, chunks)
        time.sleep(0.02)
    _drain(read_end, chunks)
    os.close(read_end)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        why = " (out of memory?)" if number == signal.SIGKILL else ""
        return {"error": f"killed by signal {number}{why}"}
    try:
        return json.loads(b"".join(chunks).decode())
    except ValueError:
        return {"error": f"no result (exit status {os.WEXITSTATUS(status)})"}


def _drain(fd: int, chunks: list) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        chunks.append(chunk)


def _serve(jobs: list, timeout_s: float) -> None:
    """The server: load the reference once, then one fresh process per job (see module doc)."""
    # Imports only (no tensor work before forking): the children share them.
    import torch  # noqa: F401

    import tracetorch  # noqa: F401

    from . import _layers, _published, scan  # noqa: F401

    try:
        reference = _published.load(install=False)
    except Exception:
        reference = None
    for job in jobs:
        result = _in_child(job, reference, timeout_s) if _USE_FORK else _safe_run(job, reference)
        print(json.dumps(result), flush=True)


def _one_server(job: dict, timeout_s: float) -> dict:
    """``job`` in a server process of its own (platforms without ``fork``)."""
    command = [sys.executable, "-m", "benchmarks._peak", "--timeout", str(timeout_s)]
    try:
        done = subprocess.run(command, input=json.dumps([job]), capture_output=True, text=True, cwd=_ROOT,
                              timeout=timeout_s + 120)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[0])
    failure = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return {"error": f"peak-memory process failed: {failure}"}


def _forking_server(jobs: list, timeout_s: float, on_result) -> list:
    """All ``jobs`` through one forking server, results streamed to ``on_result`` as they come."""
    import select
    import tempfile

    command = [sys.executable, "-m", "benchmarks._peak", "--timeout", str(timeout_s)]
    results = []
    with tempfile.TemporaryFile("w+") as errors:
        server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                  text=True, cwd=_ROOT)
        server.stdin.write(json.dumps(jobs))
        server.stdin.close()
        failure = None
        while len(results) < len(jobs):
            # The server kills a job after timeout_s; allow for its start-up and the fork on top.
            ready, _, _ = select.select([server.stdout], [], [], timeout_s + 120)
            line = server.stdout.readline() if ready else None
            if not line:
                failure = "server stopped" if ready else "server stopped answering"
                break
            if line.startswith("{"):
                results.append(json.loads(line))
                on_result(len(results) - 1, jobs[len(results) - 1], results[-1])
        if server.poll() is None:
            server.kill()
        server.wait()
        if failure:
            errors.seek(0)
            tail = (errors.read().strip().splitlines() or [f"exit status {server.returncode}"])[-1]
            results += [{"error": f"peak-memory {failure}: {tail}"}] * (len(jobs) - len(results))
    return results


def run_jobs(jobs: list, timeout_s: float = 600.0, on_result=None) -> list:
    """Peak memory of every job, each in a fresh process; one result dict per job, in order.

    ``on_result(index, job, result)``, if given, is called as each result arrives.
    """
    on_result = on_result or (lambda index, job, result: None)
    if not jobs:
        return []
    if _USE_FORK:
        return _forking_server(jobs, timeout_s, on_result)
    results = []
    for index, job in enumerate(jobs):
        results.append(_one_server(job, timeout_s))
        on_result(index, job, results[-1])
    return results


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per job before it is killed")
    args = parser.parse_args(argv)
    _serve(json.load(sys.stdin), args.timeout)


if __name__ == "__main__":
    main()
