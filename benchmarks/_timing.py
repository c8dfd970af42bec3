"""Interleaved timing: contenders take turns within every round, medians over rounds.

A *contender* is one way of doing a unit of work (one step of a layer, one
whole sequence, ...). :func:`measure` warms each contender up, calibrates how
many calls make one timed loop, then runs rounds in which every contender
runs its loop once, in an order that rotates from round to round, so a load
spike on a shared machine hits all sides alike. GPU work is synchronised
before each clock reading. Ratios are taken per round, then the median.

A contender that raises (in warm-up or in a round) is dropped with its
error text; the others go on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

__all__ = [
    "Contender", "Plan", "Timing", "measure", "ratio", "error_text", "rss_mib",
]


def _noop() -> None:
    pass


@dataclass
class Contender:
    """One side of a comparison.

    ``call`` does one unit of work (``units`` steps); ``sync`` waits for
    queued device work; ``context`` wraps each timed loop (e.g.
    ``torch.no_grad``); ``warmup`` replaces ``call`` during warm-up (e.g. a
    shorter sequence).
    """

    name: str
    call: Callable[[], object]
    sync: Callable[[], None] = _noop
    context: Callable[[], ContextManager] = contextlib.nullcontext
    units: int = 1
    warmup: Optional[Callable[[], object]] = None


@dataclass
class Plan:
    """How long to measure.

    ``rounds`` rounds, each contender's loop lasting about ``target_s``
    (between ``min_calls`` and ``max_calls`` calls) after ``warmup_calls``
    untimed calls. With ``budget_s``, the first round's duration decides how
    many rounds fit in the budget, never fewer than ``min_rounds`` unless a
    single round takes over twice the budget (then one).
    """

    rounds: int = 7
    target_s: float = 0.1
    min_calls: int = 3
    max_calls: int = 100_000
    warmup_calls: int = 3
    budget_s: Optional[float] = None
    min_rounds: int = 2


@dataclass
class Timing:
    """Per-round seconds per unit of one contender, or the error that stopped it."""

    name: str
    per_unit_s: list = field(default_factory=list)
    calls: int = 0
    warmup_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.per_unit_s) if self.per_unit_s else None

    @property
    def rounds(self) -> int:
        return len(self.per_unit_s)


def error_text(error: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, shortened to ``limit`` characters."""
    message = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _timed_loop(contender: Contender, calls: int) -> float:
    """Seconds for ``calls`` calls of ``contender``, device work included, with GC paused."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with contender.context():
            contender.sync()
            start = time.perf_counter()
            for _ in range(calls):
                contender.call()
            contender.sync()
            return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def _warm_up(contender: Contender, plan: Plan) -> int:
    """Run the warm-up calls, then return how many calls make one timed loop."""
    warm = contender.warmup or contender.call
    with contender.context():
        for _ in range(plan.warmup_calls):
            warm()
    contender.sync()
    if plan.min_calls >= plan.max_calls:  # nothing to calibrate
        return plan.max_calls
    estimate = _timed_loop(contender, 1)
    calls = math.ceil(plan.target_s / max(estimate, 1e-9))
    return max(plan.min_calls, min(plan.max_calls, calls))


def _rounds_within_budget(plan: Plan, first_round_s: float) -> int:
    if plan.budget_s is None or first_round_s <= 0:
        return plan.rounds
    fitting = int(plan.budget_s // first_round_s)
    floor = 1 if first_round_s > 2 * plan.budget_s else min(plan.min_rounds, plan.rounds)
    return max(floor, min(plan.rounds, fitting))


def measure(contenders: list, plan: Plan) -> dict:
    """``{name: Timing}`` for every contender, measured in interleaved rounds (see module doc)."""
    results = {c.name: Timing(c.name) for c in contenders}
    live = []
    for contender in contenders:
        start = time.perf_counter()
        try:
            calls = _warm_up(contender, plan)
        except Exception as error:  # a failing configuration is recorded, not fatal
            results[contender.name].error = error_text(error)
            continue
        results[contender.name].warmup_s = time.perf_counter() - start
        results[contender.name].calls = calls
        live.append((contender, calls))

    rounds = plan.rounds
    index = 0
    while index < rounds and live:
        shift = index % len(live)
        order = live[shift:] + live[:shift]
        round_start = time.perf_counter()
        for contender, calls in order:
            timing = results[contender.name]
            if timing.error is not None:
                continue
            try:
                seconds = _timed_loop(contender, calls)
            except Exception as error:
                timing.error = error_text(error)
                continue
            timing.per_unit_s.append(seconds / (calls * contender.units))
        if index == 0:
            rounds = _rounds_within_budget(plan, time.perf_counter() - round_start)
        index += 1
    return results


def ratio(numerator: Timing, denominator: Timing) -> Optional[float]:
    """Median over rounds of ``numerator / denominator`` (round by round), or None."""
    pairs = [(a, b) for a, b in zip(numerator.per_unit_s, denominator.per_unit_s) if b > 0]
    if not pairs:
        return None
    return statistics.median(a / b for a, b in pairs)


def rss_mib() -> Optional[float]:
    """This process's resident set size (``VmRSS`` in ``/proc/self/status``) in MiB, or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None
