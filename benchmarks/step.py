"""Per-step latency of S4, S5, S6 and Mamba on every available backend.

For each torch device (CPU; CUDA when present), size ``(batch, features)`` and
layer, two groups of interleaved contenders:

- no_grad: the published 0.19.2 layer, ours, ours after ``TTcompile()``, ours
  under ``torch.compile`` (with dynamo's graph count and breaks), and our array
  backends (NumPy and MLX beside torch CPU, CuPy beside torch CUDA). Ratio =
  this / 0.19.2 (< 1: faster); array backends against our torch layer.
- autograd: ``zero_states``, 32 steps, the sum of the outputs, ``backward()``;
  time per step is the total over 32. Ours / 0.19.2.

Then a memory check: 2,000 inference steps of each torch layer must not grow
the process's resident memory (CUDA: allocated device memory).
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

SIZES = ((1, 64), (32, 256), (8, 1024))
AUTOGRAD_STEPS = 32
# Ratios to stay under at batch 32, 256 features, no_grad, each against its row's "vs": by contender, or
# by contender and layer.
TARGET_SIZE = (32, 256)
TARGETS = {"ours": 1.0, "ours · TTcompile S6": 0.5, "ours · TTcompile Mamba": 0.5, "numpy": 1.5}


@dataclass
class Settings:
    sizes: tuple = SIZES
    rounds: int = 7
    target_s: float = 0.1  # length of one timed loop
    warmup_calls: int = 3
    budget_s: Optional[float] = 20.0  # timed seconds per contender and group before it stops
    torch_compile: bool = True
    memory_size: tuple = (32, 256)
    memory_steps: int = 2000

    @classmethod
    def make(cls, quick: bool, rounds: Optional[int] = None, torch_compile: bool = False):
        settings = cls()
        if quick:  # compiling takes 2-30 s per layer and size: --torch-compile asks for it
            settings = cls(sizes=((1, 64), (8, 128)), rounds=2, target_s=0.02, warmup_calls=1, budget_s=None,
                           torch_compile=torch_compile, memory_size=(1, 64), memory_steps=200)
        settings.rounds = rounds or settings.rounds
        return settings


@dataclass
class Results:
    settings: Settings
    rows: list = field(default_factory=list)
    memory: list = field(default_factory=list)  # (layer, device, before MiB, after MiB, error)
    skipped: list = field(default_factory=list)  # (what, why)


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


def _no_grad_rows(name, device, size, arrays, settings, explained) -> list:
    batch, features = size
    x = torch.randn(batch, features, device=device)
    sync, section = torch_sync(device), f"torch {device} · no_grad"
    rows, racing = {}, []

    def add(who, setup, baseline=PUBLISHED, sync=sync, context=torch.no_grad):
        rows[who] = Row(section, name, size, who, baseline=baseline)
        try:
            step = setup()
            racing.append(Contender(who, step, sync, context))
        except Exception as error:
            rows[who].notes.append(f"setup error: {error_text(error)}")

    add(PUBLISHED, lambda: _stepper(make_layer(name, features, device, published=True), x))
    add("ours", lambda: _stepper(make_layer(name, features, device), x))
    add("ours · TTcompile", lambda: _stepper(_tt_compiled(make_layer(name, features, device)), x))
    if settings.torch_compile:
        if (device, name) not in explained:
            explained[device, name] = _explain(make_layer(name, features, device), x)
        torch._dynamo.reset()  # every layer shares one forward: keep earlier compiles off its cache limit
        add("ours · torch.compile", lambda: _stepper(torch.compile(make_layer(name, features, device)), x))
        rows["ours · torch.compile"].notes.append(explained[device, name])
    for backend, module in arrays.items():
        add(backend, lambda: _stepper(module.from_torch(make_layer(name, features, device)), module.asarray(x)),
            baseline="ours", sync=module.backend.synchronize, context=contextlib.nullcontext)
    timings = measure(racing, Plan(rounds=settings.rounds, target_s=settings.target_s,
                                   warmup_calls=settings.warmup_calls, budget_s=settings.budget_s))
    fill(rows, timings, speedup=False)
    compiled = timings.get("ours · torch.compile")
    if compiled is not None and compiled.warmup_s is not None:
        rows["ours · torch.compile"].notes.append(f"compile + warm-up {compiled.warmup_s:.1f} s")
    for row in rows.values():
        limit = TARGETS.get(f"{row.contender} {name}", TARGETS.get(row.contender))
        if size == TARGET_SIZE and limit and row.ratio is not None:
            row.notes.append(f"target ≤ {limit}×: {'met' if row.ratio <= limit else 'MISSED'}")
    return list(rows.values())


def _autograd_rows(name, device, size, settings) -> list:
    batch, features = size
    x = torch.randn(batch, features, device=device)

    def steps_and_backward(layer):
        def call():
            layer.zero_states()
            layer.zero_grad(set_to_none=True)
            total = 0
            for _ in range(AUTOGRAD_STEPS):
                total = total + layer(x).sum()
            total.backward()
        return call

    section, rows, racing = f"torch {device} · autograd", {}, []
    for who, published in ((PUBLISHED, True), ("ours", False)):
        rows[who] = Row(section, name, size, who, baseline=PUBLISHED)
        try:
            layer = make_layer(name, features, device, published)
            racing.append(Contender(who, steps_and_backward(layer), torch_sync(device), units=AUTOGRAD_STEPS))
        except Exception as error:
            rows[who].notes.append(f"setup error: {error_text(error)}")
    fill(rows, measure(racing, Plan(rounds=settings.rounds, target_s=settings.target_s,
                                    warmup_calls=settings.warmup_calls, budget_s=settings.budget_s)), speedup=False)
    return list(rows.values())


def _memory_check(name, device, settings) -> tuple:
    """``(layer, device, before MiB, after MiB, error)`` around ``memory_steps`` no_grad steps, after 100."""
    batch, features = settings.memory_size
    read = (lambda: torch.cuda.memory_allocated() / 2**20) if device == "cuda" else (lambda: proc_mib("VmRSS"))
    try:
        layer = make_layer(name, features, device)
        x = torch.randn(batch, features, device=device)
        figures = []
        with torch.no_grad():
            for steps in (100, settings.memory_steps):
                for _ in range(steps):
                    layer(x)
                torch_sync(device)()
                gc.collect()
                figures.append(read())
    except Exception as error:
        return name, device, None, None, error_text(error)
    return name, device, figures[0], figures[1], None


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
        results.skipped.append(("torch.compile", "not run with --quick (add --torch-compile)"))
    explained = {}
    for device, reason in devices.items():
        if reason:
            results.skipped.append((f"torch {device}", reason))
            continue
        for size in settings.sizes:
            for name in LAYERS:
                log(f"step: torch {device} {name} {size}")
                results.rows += _no_grad_rows(name, device, size, beside[device], settings, explained)
                results.rows += _autograd_rows(name, device, size, settings)
        for name in LAYERS:
            log(f"step: memory check, torch {device} {name}")
            results.memory.append(_memory_check(name, device, settings))
    return results
