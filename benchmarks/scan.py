"""Sequence mode: whole sequences every way we have, against stepping the published 0.19.2.

Shapes, 256 features: T = 64, 256, 1024, 4096 at batch 8, and one long single
stream, T = 16,384 at batch 1. Each torch device, layer, shape and mode (fwd:
under ``no_grad``; fwd+bwd: the sum of all outputs, ``backward()``) is one
group of interleaved contenders, each running a whole sequence from zero states:

- ``floor``: the exp and matmul work alone that the layer must do over the
  sequence (``benchmarks._contenders._floor``), a bound no implementation gets below;
- ``0.19.2 step``: the published traceTorch stepped T times, the baseline:
  speed-up = its time / the contender's (> 1: faster);
- ``ours step``; ``ours scan``, or ``ours scan eager`` and ``ours scan
  compiled`` once ``scan`` takes ``compiled=`` (``benchmarks._contenders.scan_variants``);
- for Mamba, its peers at the same sizes (expand 1, d_state 16, conv 4):
  mamba.py's parallel scan (``mambapy``, ``pscan=True``) and the torch path of
  ``transformers``' ``MambaMixer`` (its sequential loop, no CUDA kernels).

Before any timing, each contender runs once in a fresh process
(``benchmarks._peak``) for its peak memory and first-call time, on an empty
compile cache (at the target shape and the long stream; ``--shapes`` picks
the shapes of both). A compiled contender then runs once more, in another fresh
process on the cache the first filled: the first call a later process pays,
and a peak that does not count compiling. A run that was killed, timed out or
peaked near the free memory is not timed: it could take this process down.

Beside torch: our NumPy, MLX (and CuPy) layers, ``scan`` against their own
stepping, forward.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import _peak
from ._contenders import FEATURES, WARMUP_T, build, contenders, scan_variants
from ._layers import LAYERS, PUBLISHED, array_backends, make_layer, published_or_reason, torch_devices, torch_sync
from ._measure import Contender, Plan, Row, error_text, fill, measure, proc_mib, ratio

SHAPES = ((64, 8), (256, 8), (1024, 8), (4096, 8), (16384, 1))  # (T, batch)
MODES = ("fwd", "fwd+bwd")
SAFE_FRACTION = 0.6  # runs peaking above this share of the free memory are not timed
# Speed-ups over stepping 0.19.2 that our scan aims at, at T = 1024, batch 8; and over mamba.py's pscan.
TARGET_SHAPE = (1024, 8)
TARGETS = {"fwd": {"S4": 8, "S5": 4, "S6": 4, "Mamba": 4}, "fwd+bwd": {"S4": 4, "S5": 3, "S6": 3, "Mamba": 3}}
PSCAN_TARGETS = {"fwd": 10, "fwd+bwd": 3}


@dataclass
class Settings:
    shapes: tuple = SHAPES
    rounds: int = 7
    budget_s: Optional[float] = 25.0  # timed seconds per contender and group before it stops
    array_shapes: tuple = ((64, 8), (256, 8), (1024, 8))  # stepping an array backend further takes minutes
    # Each memory run is a fresh process and a whole untimed call: at the target shape and the long stream only.
    memory_shapes: tuple = (TARGET_SHAPE, (16384, 1))
    memory_modes: tuple = MODES
    memory_layers: tuple = LAYERS
    memory_timeout_s: float = 900.0

    @classmethod
    def make(cls, quick: bool, rounds: Optional[int] = None, shapes: Optional[tuple] = None):
        settings = cls()
        if quick:
            settings = cls(shapes=((32, 4), (64, 1)), rounds=2, budget_s=None, array_shapes=((32, 4),),
                           memory_shapes=((32, 4),), memory_modes=("fwd",), memory_layers=("Mamba",),
                           memory_timeout_s=300.0)
        settings.rounds = rounds or settings.rounds
        if shapes is not None:
            settings.shapes = settings.memory_shapes = shapes
            settings.array_shapes = tuple(shape for shape in shapes if shape[0] <= 1024)
        return settings


@dataclass
class Results:
    settings: Settings
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (what, why)


# ----------------------------------------------------------------------------- contenders


def _not_run(contender: str, T: int, mode: str) -> Optional[str]:
    if contender == "transformers MambaMixer" and mode == "fwd+bwd" and T > 1024:
        return "not run above T = 1024: each step's slice zero-fills a full-size gradient (work ∝ T²)"
    return None


# ----------------------------------------------------------------------------- torch groups


def _memory(groups: dict, excluded: dict, settings: Settings, log) -> None:
    """Peak memory and first-call time of every contender, each in a fresh process (see the module doc)."""
    def wanted(key, who):
        _, layer, shape, mode = key
        return (layer in settings.memory_layers and shape in settings.memory_shapes
                and mode in settings.memory_modes and (key, who) not in excluded)

    keys = [(key, who) for key, rows in groups.items() for who in rows if wanted(key, who)]
    free = proc_mib("MemAvailable")
    with tempfile.TemporaryDirectory() as caches:
        for index, (key, who) in enumerate(keys):
            device, layer, (T, batch), mode = key
            job = dict(device=device, layer=layer, T=T, batch=batch, mode=mode, contender=who,
                       threads=torch.get_num_threads())
            cache = os.path.join(caches, str(index))
            result = _peak.run(job, settings.memory_timeout_s, cache)
            if "error" not in result and who.endswith("compiled"):
                result = {**_peak.run(job, settings.memory_timeout_s, cache), "cold_first_s": result["first_s"]}
            row = groups[key][who]
            log(f"scan: memory {index + 1}/{len(keys)}: {device} {layer} T={T}×{batch} {mode} {who}: "
                + (result.get("error") or f"{result['peak_mib']:.0f} MiB, {result['first_s']:.1f} s"))
            if "error" in result:
                row.notes.append(f"memory run: {result['error']}")
                if "killed" in result["error"] or "timed out" in result["error"]:
                    excluded[(key, who)] = "not timed: its memory run was " + result["error"]
                continue
            row.peak_mib = result["peak_mib"]
            if "peak_note" in result:
                row.notes.append(f"peak memory: {result['peak_note']}")
            row.first_s = result.get("cold_first_s", result["first_s"])
            row.cached_first_s = result["first_s"] if "cold_first_s" in result else None
            host = result.get("host_peak_mib", result["peak_mib"])
            if free is not None and host > SAFE_FRACTION * free:
                excluded[(key, who)] = (f"not timed: one run peaks at {host / 1024:.1f} GiB, "
                                        f"over {SAFE_FRACTION:.0%} of the {free / 1024:.1f} GiB free")


def _time_group(key, rows: dict, excluded: dict, settings: Settings) -> None:
    device, layer, (T, batch), mode = key
    racing = []
    for who, row in rows.items():
        if (key, who) in excluded:
            row.notes.append(excluded[(key, who)])
            continue
        try:
            call, warm = build(dict(device=device, layer=layer, T=T, batch=batch, mode=mode, contender=who))
        except Exception as error:  # e.g. a peer not installed: the others go on
            row.notes.append(f"error: {error_text(error)}")
            continue
        racing.append(Contender(who, call, torch_sync(device), warmup=warm))
    timings = measure(racing, Plan(rounds=settings.rounds, target_s=0, warmup_calls=1, budget_s=settings.budget_s))
    fill(rows, timings, speedup=True)
    if (T, batch) != TARGET_SHAPE:
        return
    for who, timing in timings.items():
        if not who.startswith("ours scan") or rows[who].ratio is None:
            continue
        target = TARGETS[mode][layer]
        rows[who].notes.append(f"target ≥ {target}×: {'met' if rows[who].ratio >= target else 'MISSED'}")
        pscan = timings.get("mamba.py pscan")
        over = pscan and ratio(pscan, timing)
        if over:
            target = PSCAN_TARGETS[mode]
            rows[who].notes.append(f"{over:.1f}× over mamba.py pscan (target ≥ {target}×: "
                                   f"{'met' if over >= target else 'MISSED'})")


# ----------------------------------------------------------------------------- array backends


def _array_rows(backend: str, module, layer: str, T: int, batch: int, settings: Settings) -> list:
    import numpy as np

    ours = module.from_torch(make_layer(layer, FEATURES, "cpu"))
    xs = module.asarray(np.random.default_rng(1).standard_normal((T, batch, FEATURES), dtype=np.float32))

    def whole(seq, kwargs):
        def call():
            ours.zero_states()
            if kwargs is None:
                for t in range(seq.shape[0]):
                    ours(seq[t])
            else:
                ours.scan(seq, time_dim=0, **kwargs)
        return call

    variants = {f"{backend} step": None, **scan_variants(ours.scan, backend)}
    racing = [Contender(who, whole(xs, kwargs), module.backend.synchronize,
                        warmup=whole(xs if who.endswith("compiled") else xs[:WARMUP_T], kwargs))
              for who, kwargs in variants.items()]
    rows = {who: Row(f"{backend} · fwd", layer, (T, batch), who, baseline=f"{backend} step") for who in variants}
    fill(rows, measure(racing, Plan(rounds=settings.rounds, target_s=0, warmup_calls=1, budget_s=settings.budget_s)),
         speedup=True)
    return list(rows.values())


# ----------------------------------------------------------------------------- entry point


def run(settings: Settings, log=print) -> Results:
    """Every layer's sequence modes on every available backend: the rows for the report."""
    results = Results(settings)
    _, reason = published_or_reason()
    if reason:
        results.skipped.append((PUBLISHED, reason))
    groups, excluded = {}, {}  # (device, layer, (T, batch), mode) -> {contender: Row}; (key, contender) -> why
    for device, reason in torch_devices().items():
        if reason:
            results.skipped.append((f"torch {device}", reason))
            continue
        for shape in settings.shapes:
            for layer in LAYERS:
                for mode in MODES:
                    key = (device, layer, shape, mode)
                    groups[key] = {who: Row(f"torch {device} · {mode}", layer, shape, who, baseline=PUBLISHED)
                                   for who in contenders(layer)}
                    excluded.update({(key, who): why for who in groups[key] if (why := _not_run(who, shape[0], mode))})
    _memory(groups, excluded, settings, log)
    for key, rows in groups.items():
        log(f"scan: torch {key[0]} {key[1]} T={key[2][0]}×{key[2][1]} {key[3]}")
        _time_group(key, rows, excluded, settings)
        results.rows += rows.values()
    for backend, module in array_backends().items():
        if isinstance(module, str):
            results.skipped.append((backend, module))
            continue
        for T, batch in settings.array_shapes:
            for layer in LAYERS:
                log(f"scan: {backend} {layer} T={T}×{batch}")
                try:
                    results.rows += _array_rows(backend, module, layer, T, batch, settings)
                except Exception as error:
                    results.rows.append(Row(f"{backend} · fwd", layer, (T, batch), f"{backend} scan",
                                            notes=[f"error: {error_text(error)}"]))
    if (settings.memory_shapes, settings.memory_modes, settings.memory_layers) != (settings.shapes, MODES, LAYERS):
        results.skipped.append(("peak memory and first call", "measured only for "
                                + ", ".join(settings.memory_layers) + " at T×batch "
                                + ", ".join(f"{T}×{b}" for T, b in settings.memory_shapes)
                                + ", " + " and ".join(settings.memory_modes) + ", to keep the run short"))
    return results
