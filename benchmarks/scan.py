"""Sequence mode: upstream stepping vs our stepping vs our ``scan``, with peak memory.

For T in {64, 256, 1024, 4096} (``--quick``: {64, 256}), batch 8, 256
features, each layer and torch device, two interleaved groups:

- forward (``torch.no_grad``): ``zero_states`` then T upstream steps, T of
  our steps, or one ``scan`` of the ``[T, 8, 256]`` sequence;
- forward+backward: the same, then ``sum`` of all outputs and ``backward()``.

Ratios: upstream stepping / our scan (the speed-up of sequence mode) and
upstream stepping / our stepping; > 1 means ours is faster.

Peak memory comes first: every run once, each in a fresh process
(``benchmarks._peak``). A run that was killed, timed out or peaked near the
free memory is then not timed, since it could take this process down.

Beside torch: our NumPy, MLX (and CuPy) layers, ``scan`` vs their own
stepping, forward only.

Rounds: a group whose first round is long gets fewer rounds, to fit a time
budget per group (never fewer than 2, or 1 when one round takes over twice
the budget); the table says how many ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ._layers import LAYERS, array_backends, build_pair, reference_or_reason, torch_devices, torch_sync
from ._timing import Contender, Plan, error_text, measure, ratio

__all__ = ["ScanSettings", "ScanRow", "ArrayRow", "ScanResults", "run", "sequence_runner", "METHODS", "MODES"]

TS = (64, 256, 1024, 4096)
QUICK_TS = (64, 256)
BATCH, FEATURES = 8, 256
WARMUP_T = 32  # warm-up runs a short sequence (same code paths: S4/S5 take the FFT from 32 steps)
METHODS = ("upstream step", "ours step", "ours scan")
MODES = ("fwd", "fwd+bwd")
# Speed-up targets of upstream stepping / our scan at T = 1024 (the brief gives no mode for S4/S5).
TARGET_T = 1024
TARGETS = {
    ("S4", "fwd"): 20.0, ("S4", "fwd+bwd"): 20.0, ("S5", "fwd"): 20.0, ("S5", "fwd+bwd"): 20.0,
    ("S6", "fwd"): 2.0, ("Mamba", "fwd"): 2.0, ("S6", "fwd+bwd"): 1.5, ("Mamba", "fwd+bwd"): 1.5,
}


@dataclass
class ScanSettings:
    """What the scan benchmark measures and for how long."""

    ts: tuple = TS
    rounds: int = 7
    budget_s: Optional[float] = 25.0  # per group; None: always ``rounds`` rounds
    array_ts: tuple = (64, 256, 1024)  # stepping an array backend at T=4096 would take minutes
    memory: bool = True
    memory_ts: tuple = TS
    memory_timeout_s: float = 300.0  # a run slower than this is killed, and not timed either
    memory_safe_fraction: float = 0.6  # runs peaking above this share of free memory are not timed

    @classmethod
    def make(cls, quick: bool, rounds: Optional[int] = None):
        """The full settings, or the ``--quick`` ones (T in {64, 256}, 2 rounds; memory and array backends at 64)."""
        if quick:
            settings = cls(ts=QUICK_TS, rounds=2, budget_s=None, array_ts=(64,), memory_ts=(64,),
                           memory_timeout_s=120.0)
        else:
            settings = cls()
        if rounds is not None:
            settings.rounds = rounds
        return settings

    def plan(self) -> Plan:
        return Plan(rounds=self.rounds, target_s=0.0, min_calls=1, max_calls=1, warmup_calls=1,
                    budget_s=self.budget_s, min_rounds=2)


@dataclass
class ScanRow:
    """One torch configuration: median seconds per sequence of each method, ratios, peak memory."""

    device: str
    layer: str
    T: int
    mode: str
    seconds: dict = field(default_factory=dict)  # method -> median s (None if failed)
    errors: dict = field(default_factory=dict)  # method -> error text
    speedup_scan: Optional[float] = None  # upstream step / ours scan
    speedup_step: Optional[float] = None  # upstream step / ours step
    rounds: int = 0
    peak_mib: dict = field(default_factory=dict)  # method -> MiB above baseline, or an error string
    notes: list = field(default_factory=list)

    @property
    def target(self) -> Optional[float]:
        return TARGETS.get((self.layer, self.mode)) if self.T == TARGET_T else None


@dataclass
class ArrayRow:
    """An array backend's scan vs its own stepping (forward), one layer and T."""

    backend: str
    layer: str
    T: int
    step_s: Optional[float] = None
    scan_s: Optional[float] = None
    speedup: Optional[float] = None
    rounds: int = 0
    notes: str = ""


@dataclass
class ScanResults:
    settings: ScanSettings
    rows: list = field(default_factory=list)
    arrays: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (what, why)


# ----------------------------------------------------------------------------- workloads


def sequence_runner(method: str, mode: str, ours, upstream, xs) -> Callable[[], None]:
    """One whole sequence ``xs`` ``[T, batch, features]`` by ``method``, in ``mode``, from zero states."""
    layer = upstream if method == "upstream step" else ours

    def forward():
        layer.zero_states()
        if method == "ours scan":
            return layer.scan(xs, time_dim=0)
        return torch.stack([layer(xs[t]) for t in range(xs.shape[0])])

    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
    else:
        def run():
            layer.zero_grad(set_to_none=True)
            forward().sum().backward()
    return run


def _time_row(row: "ScanRow", reference, settings) -> None:
    """Time the row's methods (those the memory runs did not rule out) in interleaved rounds."""
    ours, upstream = build_pair(row.layer, FEATURES, row.device, reference)
    torch.manual_seed(1)
    xs = torch.randn(row.T, BATCH, FEATURES, device=row.device)
    short = xs[: min(row.T, WARMUP_T)]
    sync = torch_sync(row.device)
    contenders = []
    for method in METHODS:
        if method == "upstream step" and upstream is None:
            row.errors[method] = "reference unavailable"
            continue
        if method in row.errors:  # ruled out by its memory run
            continue
        contenders.append(Contender(
            method, sequence_runner(method, row.mode, ours, upstream, xs), sync,
            warmup=sequence_runner(method, row.mode, ours, upstream, short),
        ))
    timings = measure(contenders, settings.plan())
    for method, timing in timings.items():
        row.seconds[method] = timing.median_s
        if timing.error:
            row.errors[method] = timing.error
    row.rounds = max((t.rounds for t in timings.values()), default=0)
    upstream_timing = timings.get("upstream step")
    if upstream_timing is not None:
        if "ours scan" in timings:
            row.speedup_scan = ratio(upstream_timing, timings["ours scan"])
        if "ours step" in timings:
            row.speedup_step = ratio(upstream_timing, timings["ours step"])
    if row.rounds < settings.rounds and settings.budget_s is not None:
        row.notes.append(f"{row.rounds} of {settings.rounds} rounds (time budget {settings.budget_s:.0f} s per group)")


def _array_group(backend, module, name, T, settings) -> ArrayRow:
    import numpy as np

    torch.manual_seed(0)
    from tracetorch import ssm

    layer = module.from_torch(getattr(ssm, name)(FEATURES))
    xs = module.asarray(np.random.default_rng(1).standard_normal((T, BATCH, FEATURES), dtype=np.float32))
    short = xs[: min(T, WARMUP_T)]
    sync = module.backend.synchronize

    def stepper(seq):
        def run():
            layer.zero_states()
            for t in range(seq.shape[0]):
                layer(seq[t])
        return run

    def scanner(seq):
        def run():
            layer.zero_states()
            layer.scan(seq, time_dim=0)
        return run

    timings = measure([
        Contender("step", stepper(xs), sync, warmup=stepper(short)),
        Contender("scan", scanner(xs), sync, warmup=scanner(short)),
    ], settings.plan())
    row = ArrayRow(backend, name, T)
    step, scan = timings["step"], timings["scan"]
    row.step_s, row.scan_s = step.median_s, scan.median_s
    row.speedup = ratio(step, scan)
    row.rounds = max(step.rounds, scan.rounds)
    errors = [f"{k} error: {t.error}" for k, t in timings.items() if t.error]
    if row.rounds < settings.rounds:
        errors.append(f"{row.rounds} of {settings.rounds} rounds (time budget)")
    row.notes = "; ".join(errors)
    return row


# ----------------------------------------------------------------------------- memory


def _memory_jobs(rows, settings) -> list:
    """One peak-memory job per row (T in ``settings.memory_ts``) and method."""
    return [
        {"row": index, "device": row.device, "layer": row.layer, "T": row.T, "mode": row.mode,
         "method": method, "batch": BATCH, "features": FEATURES, "threads": torch.get_num_threads()}
        for index, row in enumerate(rows) if row.T in settings.memory_ts
        for method in METHODS
    ]


def _free_mib() -> Optional[float]:
    """``MemAvailable`` from ``/proc/meminfo`` in MiB, or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _measure_memory(rows, settings, reference_ok: bool, log) -> None:
    """Peak memory of every run, each in a fresh process, before any timing.

    Runs that were killed, timed out, or peaked above ``memory_safe_fraction``
    of the free memory are then not timed: a run that big in this process
    could get the whole benchmark killed.
    """
    from . import _peak

    jobs = [job for job in _memory_jobs(rows, settings) if reference_ok or job["method"] != "upstream step"]
    log(f"scan: peak memory, {len(jobs)} runs, each in a fresh process")

    def progress(index, job, result):
        outcome = result.get("error") or f"{result['peak_mib']:.0f} MiB in {result['run_s']:.1f} s"
        log(f"scan: peak memory {index + 1}/{len(jobs)}: {job['device']} {job['layer']} T={job['T']} "
            f"{job['mode']} {job['method']}: {outcome}")

    free = _free_mib()
    for job, result in zip(jobs, _peak.run_jobs(jobs, settings.memory_timeout_s, progress)):
        row, method = rows[job["row"]], job["method"]
        if "error" in result:
            row.peak_mib[method] = f"error: {result['error']}"
            if "killed" in result["error"] or "timed out" in result["error"]:
                row.errors[method] = f"not timed: its memory run was {result['error']}"
            continue
        row.peak_mib[method] = result["peak_mib"]
        host_peak = result.get("host_peak_mib", result["peak_mib"])
        if free is not None and host_peak > settings.memory_safe_fraction * free:
            row.errors[method] = (f"not timed: one run peaks at {host_peak / 1024:.1f} GiB, "
                                  f"over {settings.memory_safe_fraction:.0%} of the {free / 1024:.1f} GiB free")


# ----------------------------------------------------------------------------- entry point


def run(settings: ScanSettings, log=print) -> ScanResults:
    """Time every layer's sequence modes on every available backend; returns the rows for the report."""
    results = ScanResults(settings)
    reference, reference_reason = reference_or_reason()
    if reference_reason:
        results.skipped.append(("upstream 0.19.2", reference_reason))
    devices = torch_devices()
    for device, reason in devices.items():
        if reason:
            results.skipped.append((f"torch {device}", reason))
    results.rows = [
        ScanRow(device, name, T, mode)
        for device in [d for d, reason in devices.items() if reason is None]
        for T in settings.ts for name in LAYERS for mode in MODES
    ]
    if settings.memory and results.rows:
        try:
            _measure_memory(results.rows, settings, reference is not None, log)
        except Exception as error:
            results.skipped.append(("peak memory", f"failed: {error_text(error)}"))
    for row in results.rows:
        log(f"scan: torch {row.device} {row.layer} T={row.T} {row.mode}")
        try:
            _time_row(row, reference, settings)
        except Exception as error:  # e.g. building the layers failed: record it, go on
            row.notes.append(f"error: {error_text(error)}")
    for backend, module in array_backends().items():
        if isinstance(module, str):
            results.skipped.append((backend, module))
            continue
        for T in [t for t in settings.ts if t in settings.array_ts]:
            for name in LAYERS:
                log(f"scan: {backend} {name} T={T}")
                try:
                    results.arrays.append(_array_group(backend, module, name, T, settings))
                except Exception as error:
                    results.arrays.append(ArrayRow(backend, name, T, notes=f"error: {error_text(error)}"))
    skipped_ts = [t for t in settings.ts if t not in settings.array_ts]
    if skipped_ts:
        results.skipped.append((
            "array backends at T=" + ", ".join(map(str, skipped_ts)),
            "not timed, to keep the run short" + ("" if 4096 not in skipped_ts else
                                                  " (stepping MLX Mamba 4096 times takes ~15 s per round)"),
        ))
    skipped_ts = [t for t in settings.ts if t not in settings.memory_ts]
    if settings.memory and skipped_ts:
        results.skipped.append(("peak memory at T=" + ", ".join(map(str, skipped_ts)), "not measured, to keep the run short"))
    if not settings.memory:
        results.skipped.append(("peak memory", "not measured (--no-memory)"))
    return results
