"""Per-step latency of S4, S5, S6 and Mamba: ours against the published 0.19.2, stepping the traceTorch way.

First, the targets table (:data:`TABLE`), on torch's CPU, each ratio taken
in one group of contenders that take turns round by round in this process:

- eager step under ``no_grad`` at batch × features 1 × 64 and 32 × 256:
  ours / 0.19.2;
- training by stepping: ``zero_states``, :data:`TRAINING_STEPS` steps, the
  sum of the outputs, ``backward()``, at 1 × 64 and 16 × 128; time per step
  is the total over the steps. Ours / 0.19.2;
- our ``TTcompile()``d step at 32 × 256 against 0.19.2's eager step;
- our NumPy and MLX layers' step at 1 × 64 against our torch eager step,
  in a group of their own with our torch step (see :func:`_no_grad_rows`).

Beside them, in the same groups: ours under ``torch.compile`` (with dynamo's
graph count and breaks), ``TTcompile`` and the array backends at every
size, a larger size (8 × 1024), and on CUDA, when present, the torch rows
again with CuPy beside them. Then a memory check: 2,000 inference steps of
each torch layer must not grow the process's resident memory (CUDA:
allocated device memory).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ._layers import LAYERS, PUBLISHED, array_backends, make_layer, published_or_reason, torch_devices, torch_sync
from ._measure import Contender, Plan, Row, error_text, fill, measure, proc_mib

OURS, TT_COMPILED, TORCH_COMPILED = "ours", "ours · TTcompile", "ours · torch.compile"
NO_GRAD, TRAINING = "no_grad", "training by stepping"
TRAINING_STEPS = 64
# TTcompile() of these compiles the step with torch.compile (S4/S5 only precompute the discretization):
# 3-12 s a layer on a warm inductor cache, about 25 s on an empty one, so --quick leaves them out.
TT_COMPILES = ("S6", "Mamba")


@dataclass(frozen=True, eq=False)  # hashed by identity: its limits are a dict
class Target:
    """One line of the targets table: the ratio of ``contender`` to its row's baseline, per layer."""

    label: str  # "{steps}": the number of steps of training by stepping
    section: str  # NO_GRAD or TRAINING
    size: tuple  # (batch, features)
    contender: str
    limits: dict  # layer -> the ratio to stay at or under (under, with ``strict``); empty: reported, no target
    strict: bool = False

    def met(self, layer: str, value: float) -> Optional[bool]:
        limit = self.limits.get(layer)
        return None if limit is None else (value < limit if self.strict else value <= limit)

    def describe(self) -> str:
        if not self.limits:
            return "reported"
        sign = "<" if self.strict else "≤"
        by_limit = {}
        for layer, limit in self.limits.items():
            by_limit.setdefault(limit, []).append(layer)
        if len(by_limit) == 1:
            return f"{sign} {next(iter(by_limit))}"
        return ", ".join(f"{sign} {limit} ({' '.join(layers)})" for limit, layers in by_limit.items())


def _all(limit):
    return dict.fromkeys(LAYERS, limit)


# The table the project's step targets are stated in: ours / 0.19.2 (array backends: / our torch step), on CPU.
TABLE = (
    Target("step, no_grad, batch 1 × 64 features", NO_GRAD, (1, 64), OURS, _all(0.9)),
    Target("step, no_grad, 32 × 256", NO_GRAD, (32, 256), OURS, _all(0.8)),
    Target("training by stepping (T = {steps}, then backward), 1 × 64", TRAINING, (1, 64), OURS, _all(0.9)),
    Target("training by stepping, 16 × 128", TRAINING, (16, 128), OURS, _all(0.9)),
    Target("`TTcompile()`d step, 32 × 256 (vs 0.19.2's eager step)", NO_GRAD, (32, 256), TT_COMPILED,
           {"S4": 0.5, "S5": 0.5, "S6": 0.4, "Mamba": 0.4}),
    Target("NumPy step / our torch step, 1 × 64", NO_GRAD, (1, 64), "numpy", _all(1.0), strict=True),
    Target("MLX step / our torch step, 1 × 64", NO_GRAD, (1, 64), "mlx", {}),
)
TABLE_DEVICE = "cpu"


@dataclass
class Settings:
    no_grad_sizes: tuple = ((1, 64), (32, 256), (8, 1024))
    training_sizes: tuple = ((1, 64), (16, 128))
    training_steps: int = TRAINING_STEPS
    rounds: int = 15
    target_s: float = 0.05  # length of one timed loop
    warmup_calls: int = 3
    budget_s: Optional[float] = 20.0  # timed seconds per contender and group before it stops
    torch_compile: bool = True  # ours under torch.compile, and TTcompile of the layers it compiles
    memory_size: tuple = (32, 256)
    memory_warmup_steps: int = 100
    memory_steps: int = 2000

    @classmethod
    def make(cls, quick: bool, rounds: Optional[int] = None, torch_compile: bool = False):
        settings = cls()
        if quick:  # the table's sizes, few short rounds, 16 training steps; compiling (3-30 s a layer) only
            # with --torch-compile. Its figures are a smoke check, not the published ones.
            settings = cls(no_grad_sizes=((1, 64), (32, 256)), training_steps=16, rounds=2, target_s=0.01,
                           warmup_calls=1, budget_s=None, torch_compile=torch_compile, memory_size=(1, 64),
                           memory_warmup_steps=20, memory_steps=50)
        settings.rounds = rounds or settings.rounds
        return settings


@dataclass
class Results:
    settings: Settings
    rows: list = field(default_factory=list)
    memory: list = field(default_factory=list)  # (layer, device, before MiB, after MiB, error)
    skipped: list = field(default_factory=list)  # (what, why)

    def row(self, device: str, section: str, layer: str, size: tuple, contender: str) -> Optional[Row]:
        wanted = (f"torch {device} · {section}", layer, tuple(size), contender)
        return next((r for r in self.rows if (r.section, r.layer, r.shape, r.contender) == wanted), None)


def _explain(layer, x) -> str:
    """Dynamo's graph count and breaks for the steps after the first (states exist from then on)."""
    try:
        with torch.no_grad():
            layer(x)
            explanation = torch._dynamo.explain(layer)(x)
    except Exception as error:
        return f"dynamo.explain failed: {error_text(error, 120)}"
    finally:
        torch._dynamo.reset()
    note = f"dynamo: {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)"
    if explanation.break_reasons:
        first = explanation.break_reasons[0]
        stack = getattr(first, "user_stack", None) or []
        where = f" at {Path(stack[-1].filename).name}:{stack[-1].lineno}" if stack else ""
        note += f", e.g. “{str(first.reason).strip().splitlines()[0][:90]}”{where}"
    return note


def _stepper(layer, x):
    return lambda: layer(x)


def _tt_compiled(layer):
    layer.TTcompile()
    return layer


def _plan(settings: Settings) -> Plan:
    return Plan(rounds=settings.rounds, target_s=settings.target_s, warmup_calls=settings.warmup_calls,
                budget_s=settings.budget_s)


def _no_grad_rows(name, device, size, arrays, settings, explained) -> list:
    batch, features = size
    x = torch.randn(batch, features, device=device)
    sync, section = torch_sync(device), f"torch {device} · {NO_GRAD}"
    rows, racing, array_racing = {}, [], []

    def add(who, setup, baseline=PUBLISHED, sync=sync, context=torch.no_grad, group=racing):
        rows[who] = Row(section, name, size, who, baseline=baseline)
        try:
            step = setup()
            group.append(Contender(who, step, sync, context))
        except Exception as error:
            rows[who].notes.append(f"setup error: {error_text(error)}")

    add(PUBLISHED, lambda: _stepper(make_layer(name, features, device, published=True), x))
    add(OURS, lambda: _stepper(make_layer(name, features, device), x))
    if settings.torch_compile or name not in TT_COMPILES:
        add(TT_COMPILED, lambda: _stepper(_tt_compiled(make_layer(name, features, device)), x))
    else:
        rows[TT_COMPILED] = Row(section, name, size, TT_COMPILED, baseline=PUBLISHED,
                                notes=["not run: compiles (--quick; add --torch-compile)"])
    if settings.torch_compile:
        if (device, name) not in explained:
            explained[device, name] = _explain(make_layer(name, features, device), x)
        torch._dynamo.reset()  # every layer shares one forward: keep earlier compiles off its cache limit
        add(TORCH_COMPILED, lambda: _stepper(torch.compile(make_layer(name, features, device)), x))
        rows[TORCH_COMPILED].notes.append(explained[device, name])
    for backend, module in arrays.items():
        add(backend, lambda: _stepper(module.from_torch(make_layer(name, features, device)), module.asarray(x)),
            baseline=OURS, sync=module.backend.synchronize, context=contextlib.nullcontext, group=array_racing)
    timings = measure(racing, _plan(settings))
    fill(rows, timings, speedup=False)
    if array_racing:
        # The array backends race our torch step in a group of their own: a BLAS's threads, left spinning
        # after NumPy's call, slowed whichever contender came next (0.19.2's Mamba step at 32 x 256 took
        # 2.2 ms after NumPy's against 1.0 ms alone), which would skew the torch rows' ratios.
        array_racing.insert(0, Contender(OURS, _stepper(make_layer(name, features, device), x), sync, torch.no_grad))
        array_timings = measure(array_racing, _plan(settings))
        fill({**rows, OURS: Row(section, name, size, OURS)}, array_timings, speedup=False)  # ours' row: the torch group's
    for who in (TT_COMPILED, TORCH_COMPILED):
        compiled = timings.get(who)
        if compiled is not None and compiled.warmup_s is not None and (who == TORCH_COMPILED or name in TT_COMPILES):
            rows[who].notes.append(f"compile + warm-up {compiled.warmup_s:.1f} s")
    return list(rows.values())


def _training_rows(name, device, size, settings) -> list:
    """``zero_states``, ``training_steps`` steps on fresh inputs, the sum of the outputs, ``backward()``."""
    batch, features = size
    xs = torch.randn(settings.training_steps, batch, features, device=device).unbind(0)

    def steps_and_backward(layer):
        def call():
            layer.zero_states()
            layer.zero_grad(set_to_none=True)
            total = 0
            for x in xs:
                total = total + layer(x).sum()
            total.backward()
        return call

    section, rows, racing = f"torch {device} · {TRAINING}", {}, []
    for who, published in ((PUBLISHED, True), (OURS, False)):
        rows[who] = Row(section, name, size, who, baseline=PUBLISHED)
        try:
            layer = make_layer(name, features, device, published)
            racing.append(Contender(who, steps_and_backward(layer), torch_sync(device), units=settings.training_steps))
        except Exception as error:
            rows[who].notes.append(f"setup error: {error_text(error)}")
    fill(rows, measure(racing, _plan(settings)), speedup=False)
    return list(rows.values())


def _memory_check(name, device, settings) -> tuple:
    """``(layer, device, before MiB, after MiB, error)`` around ``memory_steps`` no_grad steps, after a warm-up."""
    batch, features = settings.memory_size
    read = (lambda: torch.cuda.memory_allocated() / 2**20) if device == "cuda" else (lambda: proc_mib("VmRSS"))
    try:
        layer = make_layer(name, features, device)
        x = torch.randn(batch, features, device=device)
        figures = []
        with torch.no_grad():
            for steps in (settings.memory_warmup_steps, settings.memory_steps):
                for _ in range(steps):
                    layer(x)
                torch_sync(device)()
                gc.collect()
                figures.append(read())
    except Exception as error:
        return name, device, None, None, error_text(error)
    return name, device, figures[0], figures[1], None


def table(results: Results, device: str = TABLE_DEVICE) -> list:
    """``[(target, {layer: (ratio or None, met: True/False/None, why missing)})]``: the targets table's cells."""
    lines = []
    for target in TABLE:
        cells = {}
        for layer in LAYERS:
            row = results.row(device, target.section, layer, target.size, target.contender)
            if row is None or row.ratio is None:
                why = "not measured" if row is None else "; ".join(row.notes) or "no ratio"
                cells[layer] = (None, None, why)
            else:
                cells[layer] = (row.ratio, target.met(layer, row.ratio), "")
        lines.append((target, cells))
    return lines


def run(settings: Settings, log=print) -> Results:
    """Every layer on every available backend and mode: the rows for the report."""
    results = Results(settings)
    _, reason = published_or_reason()
    if reason:
        results.skipped.append((PUBLISHED, reason))
    devices = torch_devices()
    arrays = array_backends()
    results.skipped += [(name, why) for name, why in arrays.items() if isinstance(why, str)]
    usable = {name: module for name, module in arrays.items() if not isinstance(module, str)}
    # CuPy sits beside torch CUDA, the others beside torch CPU (CuPy too when torch has no CUDA).
    beside = {"cpu": {k: v for k, v in usable.items() if k != "cupy" or devices["cuda"]},
              "cuda": {k: v for k, v in usable.items() if k == "cupy"}}
    if not settings.torch_compile:
        results.skipped.append(("torch.compile; TTcompile of " + " and ".join(TT_COMPILES),
                                "they compile: not run with --quick (add --torch-compile)"))
    explained = {}
    for device, reason in devices.items():
        if reason:
            results.skipped.append((f"torch {device}", reason))
            continue
        for size in settings.no_grad_sizes:
            for name in LAYERS:
                log(f"step: torch {device} {NO_GRAD} {name} {size[0]}×{size[1]}")
                results.rows += _no_grad_rows(name, device, size, beside[device], settings, explained)
        for size in settings.training_sizes:
            for name in LAYERS:
                log(f"step: torch {device} {TRAINING} {name} {size[0]}×{size[1]}")
                results.rows += _training_rows(name, device, size, settings)
        for name in LAYERS:
            log(f"step: memory check, torch {device} {name}")
            results.memory.append(_memory_check(name, device, settings))
    return results
