"""Per-step latency of S4, S5, S6 and Mamba on every available backend.

For each torch device (CPU; CUDA when present), size ``(batch, features)``
and layer, two interleaved groups are timed:

- inference (``torch.no_grad``): the upstream 0.19.2 layer, ours, ours after
  ``TTcompile()`` (S4/S5), ours under ``torch.compile``, and our array
  backends (NumPy and MLX beside torch CPU, CuPy beside torch CUDA). Torch
  rows are compared with upstream, array-backend rows with torch (ours).
- autograd: ``zero_states``, 32 steps, ``sum`` of the outputs,
  ``.backward()``; per-step time is the total over 32. Upstream vs ours.

Then a memory check: 2,000 inference steps of each torch layer must not grow
the process RSS (CUDA: allocated device memory).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ._layers import (
    LAYERS, TIME_INVARIANT, array_backends, build_pair, fresh_copy, reference_or_reason,
    torch_devices, torch_sync,
)
from ._timing import Contender, Plan, error_text, measure, ratio, rss_mib

__all__ = ["StepSettings", "StepRow", "MemoryRow", "StepResults", "run"]

SIZES = ((1, 64), (32, 256), (8, 1024))
QUICK_SIZES = ((1, 64), (32, 256))
AUTOGRAD_STEPS = 32
UPSTREAM = "upstream 0.19.2"
NUMPY_TARGET = (32, 256, 1.5)  # NumPy should be within 1.5x of torch CPU at (32, 256)


@dataclass
class StepSettings:
    """What the step benchmark measures and for how long."""

    sizes: tuple = SIZES
    rounds: int = 7
    target_s: float = 0.1
    warmup_calls: int = 3
    budget_s: Optional[float] = 20.0  # per group; None: always ``rounds`` rounds
    torch_compile: bool = True
    torch_compile_skipped: str = "not run (--no-torch-compile)"
    memory_size: tuple = (32, 256)
    memory_steps: int = 2000

    @classmethod
    def make(cls, quick: bool, rounds: Optional[int] = None, torch_compile: Optional[bool] = None):
        """The full settings, or the ``--quick`` ones (2 sizes, 2 rounds, no torch.compile)."""
        if quick:
            settings = cls(sizes=QUICK_SIZES, rounds=2, target_s=0.02, warmup_calls=1, budget_s=None,
                           torch_compile=False, memory_size=(1, 64))
        else:
            settings = cls()
        if rounds is not None:
            settings.rounds = rounds
        if torch_compile is not None:
            settings.torch_compile = torch_compile
        elif quick:
            settings.torch_compile_skipped = (
                "not run with --quick (compiling takes ~2-30 s per layer and size); add --torch-compile")
        return settings

    def plan(self, **overrides) -> Plan:
        fields = dict(rounds=self.rounds, target_s=self.target_s, min_calls=1,
                      warmup_calls=self.warmup_calls, budget_s=self.budget_s)
        fields.update(overrides)
        return Plan(**fields)


@dataclass
class StepRow:
    """One table row: a layer on one backend/mode at one size, and what it is compared with."""

    layer: str
    target: str
    batch: Optional[int]
    features: Optional[int]
    median_us: Optional[float] = None
    reference_us: Optional[float] = None
    ratio: Optional[float] = None
    reference: str = ""
    rounds: int = 0
    notes: str = ""
    mode: str = "no_grad"
    device: str = "cpu"


@dataclass
class MemoryRow:
    """RSS (or CUDA allocated memory) before and after many inference steps."""

    layer: str
    device: str
    batch: int
    features: int
    steps: int
    before_mib: Optional[float]
    after_mib: Optional[float]
    error: Optional[str] = None

    @property
    def growth_mib(self) -> Optional[float]:
        if self.before_mib is None or self.after_mib is None:
            return None
        return self.after_mib - self.before_mib

    @property
    def verdict(self) -> str:
        if self.error:
            return f"error: {self.error}"
        growth = self.growth_mib
        if growth is None:
            return "not measurable here (no /proc/self/status)"
        return "no growth" if growth < 1.0 else f"GREW by {growth:.1f} MiB"


@dataclass
class StepResults:
    settings: StepSettings
    rows: list = field(default_factory=list)
    memory: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (what, why)


# ----------------------------------------------------------------------------- contenders


def _stepper(layer, x) -> Callable[[], object]:
    return lambda: layer(x)


def _forward_backward(layer, x, steps: int = AUTOGRAD_STEPS) -> Callable[[], None]:
    """``zero_states``, ``steps`` steps, sum of the outputs, ``backward()``."""

    def run():
        layer.zero_states()
        layer.zero_grad(set_to_none=True)
        total = 0
        for _ in range(steps):
            total = total + layer(x).sum()
        total.backward()

    return run


def _explain(ours, x) -> str:
    """Graph count and graph breaks of our layer under ``torch._dynamo.explain`` (steady state)."""
    try:
        probe = fresh_copy(ours)
        with torch.no_grad():
            probe(x)  # states exist from here on: the graph every later step runs
            explanation = torch._dynamo.explain(probe)(x)
    except Exception as error:
        return f"dynamo.explain failed: {error_text(error, 120)}"
    finally:
        torch._dynamo.reset()
    note = f"dynamo: {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)"
    if explanation.break_reasons:
        first = explanation.break_reasons[0]
        note += f" — e.g. “{str(first.reason).strip().splitlines()[0][:90]}”{_break_site(first)}"
    return note


def _break_site(break_reason) -> str:
    """`` at path:line`` of the innermost frame of this repository in a graph break's stack, or ``""``."""
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    frames = [f for f in getattr(break_reason, "user_stack", []) or [] if str(f.filename).startswith(root)]
    if not frames:
        return ""
    return f" at {frames[-1].filename[len(root):]}:{frames[-1].lineno}"


def _torch_compile_contender(ours, x, sync) -> Contender:
    """Ours under ``torch.compile`` (compiled in warm-up, on a fresh dynamo cache)."""
    torch._dynamo.reset()  # every layer shares Layer.forward: keep earlier compiles off its cache limit
    compiled = torch.compile(fresh_copy(ours))
    return Contender("torch.compile", _stepper(compiled, x), sync, torch.no_grad)


def _array_contender(name, module, ours, x) -> Contender:
    """Our layer on an array backend, weights from the torch layer, input converted once."""
    layer = module.from_torch(ours)
    xa = module.asarray(x)
    return Contender(name, _stepper(layer, xa), module.backend.synchronize)


# ----------------------------------------------------------------------------- groups


def _row(spec, timings, layer, device, batch, features, mode, notes) -> StepRow:
    """A table row from ``(name, label, baseline name, baseline label)`` and the timings."""
    name, label, base_name, base_label = spec
    timing, base = timings.get(name), timings.get(base_name)
    row = StepRow(layer, label, batch, features, reference=base_label, mode=mode, device=device)
    row.notes = notes.get(name, "")
    if timing is None:  # its setup failed: the notes say why
        row.notes = row.notes or "not run"
        return row
    if timing.error:
        row.notes = "; ".join(filter(None, [f"error: {timing.error}", row.notes]))
        return row
    row.median_us = timing.median_s * 1e6
    row.rounds = timing.rounds
    if base is not None and base.median_s is not None:
        row.reference_us = base.median_s * 1e6
        row.ratio = ratio(timing, base)
    elif base is not None and base.error:
        row.notes = "; ".join(filter(None, [f"baseline error: {base.error}", row.notes]))
    return row


def _inference_rows(name, device, batch, features, reference, arrays, settings, explain_notes):
    """The no_grad group of one layer and size: upstream, ours, TTcompile, torch.compile, array backends."""
    ours, upstream = build_pair(name, features, device, reference)
    x = torch.randn(batch, features, device=device)
    sync = torch_sync(device)
    torch_label = f"torch {device}"
    contenders, specs, notes = [], [], {}
    if upstream is not None:
        contenders.append(Contender("upstream", _stepper(upstream, x), sync, torch.no_grad))
    contenders.append(Contender("ours", _stepper(fresh_copy(ours), x), sync, torch.no_grad))
    specs.append(("ours", torch_label, "upstream", UPSTREAM))
    if name in TIME_INVARIANT:
        specs.append(("TTcompile", f"{torch_label} · TTcompile", "upstream", UPSTREAM))
        try:
            compiled = fresh_copy(ours)
            compiled.TTcompile()
            contenders.append(Contender("TTcompile", _stepper(compiled, x), sync, torch.no_grad))
        except Exception as error:
            notes["TTcompile"] = f"setup error: {error_text(error)}"
    if settings.torch_compile:
        specs.append(("torch.compile", f"{torch_label} · torch.compile", "upstream", UPSTREAM))
        key = (device, name)
        if key not in explain_notes:
            explain_notes[key] = _explain(ours, x)
        notes["torch.compile"] = explain_notes[key]
        try:
            contenders.append(_torch_compile_contender(ours, x, sync))
        except Exception as error:
            notes["torch.compile"] += f"; setup error: {error_text(error)}"
    for backend, module in arrays.items():
        if isinstance(module, str):
            continue  # listed once under "skipped"
        try:
            contenders.append(_array_contender(backend, module, ours, x))
        except Exception as error:
            notes[backend] = f"setup error: {error_text(error)}"
        specs.append((backend, backend, "ours", f"{torch_label} (ours)"))
    timings = measure(contenders, settings.plan())
    warm = timings.get("torch.compile")
    if warm is not None and warm.warmup_s is not None:
        notes["torch.compile"] += f"; compile + warm-up {warm.warmup_s:.1f} s"
    return [_row(s, timings, name, device, batch, features, "no_grad", notes) for s in specs]


def _autograd_rows(name, device, batch, features, reference, settings):
    """The autograd group of one layer and size: upstream vs ours, 32 steps and backward per call."""
    ours, upstream = build_pair(name, features, device, reference)
    x = torch.randn(batch, features, device=device)
    sync = torch_sync(device)
    contenders = []
    if upstream is not None:
        contenders.append(Contender("upstream", _forward_backward(upstream, x), sync, units=AUTOGRAD_STEPS))
    contenders.append(Contender("ours", _forward_backward(ours, x), sync, units=AUTOGRAD_STEPS))
    timings = measure(contenders, settings.plan())
    spec = ("ours", f"torch {device} · autograd", "upstream", UPSTREAM)
    return [_row(spec, timings, name, device, batch, features, "autograd", {})]


# ----------------------------------------------------------------------------- memory


def _memory_row(name, device, settings) -> MemoryRow:
    """Allocated memory before/after ``settings.memory_steps`` inference steps (after 100 warm-up steps)."""
    batch, features = settings.memory_size
    steps = settings.memory_steps
    try:
        layer, _ = build_pair(name, features, device, None)
        x = torch.randn(batch, features, device=device)
        read = (lambda: torch.cuda.memory_allocated() / 2**20) if device == "cuda" else rss_mib
        with torch.no_grad():
            for _ in range(100):
                layer(x)
            torch_sync(device)()
            gc.collect()
            before = read()
            for _ in range(steps):
                layer(x)
            torch_sync(device)()
            gc.collect()
            after = read()
    except Exception as error:
        return MemoryRow(name, device, batch, features, steps, None, None, error_text(error))
    return MemoryRow(name, device, batch, features, steps, before, after)


# ----------------------------------------------------------------------------- entry point


def _guarded(make_rows, error_row: StepRow) -> list:
    """``make_rows()``, or ``[error_row]`` with the error in its notes if setting up the group failed."""
    try:
        return make_rows()
    except Exception as error:
        error_row.notes = f"error: {error_text(error)}"
        return [error_row]


def _array_backends_by_device(devices) -> dict:
    """Which array backends sit beside which torch device: NumPy/MLX by CPU, CuPy by CUDA (else CPU)."""
    arrays = array_backends()
    cuda_ok = devices.get("cuda") is None
    return {
        "cpu": {k: v for k, v in arrays.items() if k != "cupy" or not cuda_ok},
        "cuda": {k: v for k, v in arrays.items() if k == "cupy"} if cuda_ok else {},
    }


def run(settings: StepSettings, log=print) -> StepResults:
    """Time every layer on every available backend and mode; returns the rows for the report."""
    results = StepResults(settings)
    reference, reference_reason = reference_or_reason()
    if reference_reason:
        results.skipped.append((UPSTREAM, reference_reason))
    devices = torch_devices()
    by_device = _array_backends_by_device(devices)
    for device, reason in devices.items():
        if reason:
            results.skipped.append((f"torch {device}", reason))
    for arrays in by_device.values():
        results.skipped += [(name, why) for name, why in arrays.items() if isinstance(why, str)]
    if not settings.torch_compile:
        results.skipped.append(("torch.compile", settings.torch_compile_skipped))
    explain_notes = {}
    for device in [d for d, reason in devices.items() if reason is None]:
        for batch, features in settings.sizes:
            for name in LAYERS:
                log(f"step: torch {device} {name} ({batch}, {features})")
                results.rows += _guarded(
                    lambda: _inference_rows(name, device, batch, features, reference, by_device[device],
                                            settings, explain_notes),
                    StepRow(name, f"torch {device}", batch, features, device=device),
                )
                results.rows += _guarded(
                    lambda: _autograd_rows(name, device, batch, features, reference, settings),
                    StepRow(name, f"torch {device} · autograd", batch, features, mode="autograd", device=device),
                )
        for name in LAYERS:
            log(f"step: memory check torch {device} {name}")
            results.memory.append(_memory_row(name, device, settings))
    return results
