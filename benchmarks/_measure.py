"""Interleaved timing, the rows a report prints, and the memory figures.

:func:`measure` warms each contender up, then runs rounds in which every
contender runs its timed loop once, in an order that rotates from round to
round, so a load spike on a shared machine hits all sides alike. Ratios are
taken round by round, then the median. A contender that raises is dropped
with its error text; the others go on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Contender:
    """One way of doing a unit of work (``units`` steps per ``call``).

    ``sync`` waits for queued device work; ``context`` wraps each timed loop
    (e.g. ``torch.no_grad``); ``warmup`` is a cheaper call on the same code
    paths, used instead of ``call`` to warm up.
    """

    name: str
    call: Callable[[], object]
    sync: Callable[[], None] = lambda: None
    context: Callable = contextlib.nullcontext
    units: int = 1
    warmup: Optional[Callable[[], object]] = None


@dataclass
class Plan:
    """``rounds`` rounds of timed loops lasting about ``target_s`` each (0: one call).

    A contender stops early, after at least one round, once its timed loops
    add up to ``budget_s``.
    """

    rounds: int = 7
    target_s: float = 0.1
    warmup_calls: int = 3
    budget_s: Optional[float] = None


@dataclass
class Timing:
    name: str
    per_unit_s: list = field(default_factory=list)  # one entry per round, in round order
    faults_per_unit: list = field(default_factory=list)  # minor page faults, one entry per round
    warmup_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.per_unit_s) if self.per_unit_s else None

    @property
    def median_faults(self) -> Optional[float]:
        return statistics.median(self.faults_per_unit) if self.faults_per_unit else None


def error_text(error: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def minor_faults() -> int:
    """This process's minor page faults so far: memory the allocator took from the system and touched anew."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed_loop(contender: Contender, calls: int) -> tuple:
    """``(seconds, minor page faults)`` of ``calls`` calls."""
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one contender's loop would be charged to it alone
    try:
        with contender.context():
            contender.sync()
            faults = minor_faults()
            start = time.perf_counter()
            for _ in range(calls):
                contender.call()
            contender.sync()
            return time.perf_counter() - start, minor_faults() - faults
    finally:
        if gc_was_enabled:
            gc.enable()


def measure(contenders: list, plan: Plan) -> dict:
    """``{name: Timing}`` for every contender, in interleaved rounds (see the module doc)."""
    timings = {c.name: Timing(c.name) for c in contenders}
    live = []  # (contender, calls per loop, seconds spent in timed loops)
    for contender in contenders:
        timing = timings[contender.name]
        start = time.perf_counter()
        try:
            last_s = None  # the last warm-up call, which sizes the timed loops when it ran the timed call
            with contender.context():
                for _ in range(plan.warmup_calls):
                    contender.sync()
                    began = time.perf_counter()
                    (contender.warmup or contender.call)()
                    contender.sync()
                    last_s = time.perf_counter() - began
            calls = 1
            if plan.target_s > 0:
                if last_s is None or contender.warmup is not None:
                    last_s, _ = _timed_loop(contender, 1)
                calls = min(100_000, math.ceil(plan.target_s / max(last_s, 1e-9)))
        except Exception as error:  # a failing contender is recorded, not fatal
            timing.error = error_text(error)
            continue
        timing.warmup_s = time.perf_counter() - start
        live.append([contender, calls, 0.0])
    for index in range(plan.rounds):
        live = [entry for entry in live if index == 0 or plan.budget_s is None or entry[2] < plan.budget_s]
        if not live:
            break
        shift = index % len(live)
        for entry in live[shift:] + live[:shift]:
            contender, calls, _ = entry
            timing = timings[contender.name]
            if timing.error is not None:
                continue
            try:
                seconds, faults = _timed_loop(contender, calls)
            except Exception as error:
                timing.error = error_text(error)
                continue
            entry[2] += seconds
            timing.per_unit_s.append(seconds / (calls * contender.units))
            timing.faults_per_unit.append(faults / (calls * contender.units))
    return timings


def _round_ratios(numerator: Timing, denominator: Timing) -> list:
    return [a / b for a, b in zip(numerator.per_unit_s, denominator.per_unit_s) if b > 0]


def ratio(numerator: Timing, denominator: Timing) -> Optional[float]:
    """Median over the rounds both ran of ``numerator / denominator``, or None."""
    ratios = _round_ratios(numerator, denominator)
    return statistics.median(ratios) if ratios else None


def ratio_quartiles(numerator: Timing, denominator: Timing) -> Optional[tuple]:
    """The first and third quartiles of the round-by-round ratios: how far a noisy machine spread them; or None."""
    ratios = _round_ratios(numerator, denominator)
    if len(ratios) < 4:  # too few rounds for quartiles to say anything
        return None
    quartiles = statistics.quantiles(ratios, n=4)
    return quartiles[0], quartiles[2]


@dataclass
class Row:
    """One contender in one configuration, as the report prints it."""

    section: str  # the table it goes in, e.g. "torch cpu · fwd"
    layer: str
    shape: tuple  # (T, batch) for sequences, (batch, features) for steps
    contender: str
    seconds: Optional[float] = None  # median per unit
    faults: Optional[float] = None  # median minor page faults per unit
    ratio: Optional[float] = None
    ratio_quartiles: Optional[tuple] = None  # (first, third) quartile of the round-by-round ratios
    baseline: str = ""
    rounds: int = 0
    notes: list = field(default_factory=list)
    peak_mib: Optional[float] = None
    first_s: Optional[float] = None  # the first call in a fresh process
    cached_first_s: Optional[float] = None  # the same, with the compile cache the first one filled


def fill(rows: dict, timings: dict, speedup: bool) -> None:
    """Put each timing into ``rows[name]``, with its ratio to the timing its row names as ``baseline``.

    The ratio is ``baseline / this`` with ``speedup`` (> 1: faster), else ``this / baseline``.
    """
    for name, timing in timings.items():
        row, base = rows[name], timings.get(rows[name].baseline)
        row.seconds, row.faults, row.rounds = timing.median_s, timing.median_faults, len(timing.per_unit_s)
        if timing.error:
            row.notes.append(f"error: {timing.error}")
        if base is not None and base is not timing:
            pair = (base, timing) if speedup else (timing, base)
            row.ratio, row.ratio_quartiles = ratio(*pair), ratio_quartiles(*pair)


def maxrss_mib() -> float:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS) in MiB."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 2**20 if sys.platform == "darwin" else value / 1024


def proc_mib(key: str) -> Optional[float]:
    """A memory figure from ``/proc`` in MiB: ``VmRSS`` (this process), ``MemAvailable``, ``MemTotal``; or None."""
    path = "/proc/self/status" if key.startswith("Vm") else "/proc/meminfo"
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cpu_seconds() -> Optional[tuple]:
    """``(busy seconds of every CPU, this process's and its waited-for children's CPU seconds)``, or None.

    None off Linux, and where ``/proc/stat`` counts more CPUs than this
    process may use (a container seeing the host's): the others' share would
    then be the host's.
    """
    try:
        with open("/proc/stat") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    if not lines or not hasattr(os, "sched_getaffinity") or cpus != len(os.sched_getaffinity(0)):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already in user.
    # Steal (a hypervisor running another machine on these cores) counts as busy: it slows us alike.
    ticks = [int(value) for value in lines[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


class OthersMeter:
    """How many cores other processes kept busy, on average, since this was made.

    The load average cannot say it during a benchmark: the benchmark's own
    threads count in it. This subtracts our own CPU time from the machine's.
    """

    def __init__(self):
        self._start, self._wall = _cpu_seconds(), time.monotonic()

    def cores(self) -> Optional[float]:
        """Average cores busy with other work so far, or None where it cannot be measured."""
        end, wall = _cpu_seconds(), time.monotonic() - self._wall
        if self._start is None or end is None or wall <= 0:
            return None
        return max(0.0, ((end[0] - self._start[0]) - (end[1] - self._start[1])) / wall)
