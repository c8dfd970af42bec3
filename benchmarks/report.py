"""Markdown tables, PNG plots and the machine summary of a benchmark run."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

__all__ = [
    "machine_info", "machine_markdown", "step_markdown", "scan_markdown", "plot_step", "plot_scan",
]

LAYER_ORDER = ("S4", "S5", "S6", "Mamba")


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _module_version(module_name: str) -> str:
    """``module.__version__``, or why there is none (CuPy's distribution name varies: cupy-cuda12x ...)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        return "not installed" if isinstance(error, ModuleNotFoundError) else f"unusable ({type(error).__name__})"
    return str(getattr(module, "__version__", "unknown version"))


def _memory_total() -> str:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def machine_info() -> dict:
    """``{label: value}`` describing this machine and the library versions."""
    import numpy
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "CPU": _cpu_model(),
        "CPU cores": f"{os.cpu_count()} ({usable} usable by this process)",
        "memory": _memory_total(),
        "OS": platform.platform(),
        "Python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "CUDA": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "numpy": numpy.__version__,
        "mlx": _module_version("mlx.core"),
        "cupy": _module_version("cupy"),
        "array-api-compat": _version("array-api-compat"),
        "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "unset"),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    if hasattr(os, "getloadavg"):
        info["load average at start (1/5/15 min)"] = _load_average()
    return info


def _load_average() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def finish_machine_info(info: dict) -> dict:
    """``info`` with the load average at the end of the run added."""
    if hasattr(os, "getloadavg"):
        info = {**info, "load average at end (1/5/15 min)": _load_average()}
    return info


def machine_line(info: dict) -> str:
    """One line naming the machine, for table headers."""
    cuda = "" if info["CUDA"] == "not available" else f", {info['CUDA']}"
    return (f"{info['CPU']}, {info['CPU cores'].split()[0]} cores{cuda}; "
            f"torch {info['torch']} ({info['torch threads']} threads), numpy {info['numpy']}, mlx {info['mlx']}")


def machine_markdown(info: dict, command: str) -> str:
    warning = busy_warning(info)
    lines = ["# Machine", "", f"Command: `{command}`", "", *([warning, ""] if warning else []),
             "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    return "\n".join(lines) + "\n"


def busy_warning(info: dict) -> str:
    """A warning when the machine was already loaded at start (other work skews timings), else ``""``."""
    load = info.get("load average at start (1/5/15 min)")
    if load is None:
        return ""
    one_minute = float(load.split("/")[0])
    cores = int(info["CPU cores"].split()[0])
    if one_minute < 0.5 * cores:
        return ""
    return (f"**Warning: the machine was busy at start (load average {one_minute:.2f} on {cores} cores); "
            "other work competes for the cores, so absolute times and ratios are noisy.**")


def _header(title: str, info: dict, command: str, explanation: list) -> list:
    warning = busy_warning(info)
    return [
        f"# {title}", "",
        f"- Machine: {machine_line(info)} (details in `machine.md`)",
        f"- Date: {info['date']}",
        f"- Command: `{command}`",
        *[f"- {line}" for line in explanation], "",
        *([warning, ""] if warning else []),
    ]


# ----------------------------------------------------------------------------- formatting


def _num(value: Optional[float], digits: int = 1) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if value >= 1 else f"{value:.{digits + 2}g}"


def _times(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return lines


def _skipped(skipped: list) -> list:
    if not skipped:
        return []
    seen = list(dict.fromkeys(skipped))
    return ["## Skipped", "", *_table(["what", "why"], seen), ""]


# ----------------------------------------------------------------------------- step


def _numpy_target_note(row) -> str:
    from .step import NUMPY_TARGET

    batch, features, limit = NUMPY_TARGET
    if row.target != "numpy" or (row.batch, row.features) != (batch, features) or row.ratio is None:
        return ""
    return f"target ≤ {limit}×: {'met' if row.ratio <= limit else 'MISSED'}"


def step_markdown(results, info: dict, command: str) -> str:
    """The step benchmark as Markdown: one table per device and mode, the memory check, skips."""
    lines = _header("Per-step latency", info, command, [
        "median µs per step over rounds; the compared sides take turns within each round",
        "ratio = median over rounds of (this row / reference); **< 1 means this row is faster**",
        "torch rows are compared with upstream traceTorch 0.19.2 (same weights); "
        "array-backend rows with our torch layer on the same device",
        "autograd: zero_states, 32 steps, sum of outputs, backward(); µs per step = total / 32",
    ])
    groups = defaultdict(list)
    for row in results.rows:
        groups[(row.device, row.mode)].append(row)
    for (device, mode), rows in groups.items():
        lines += [f"## torch {device} · {mode}", ""]
        table = []
        for r in rows:
            notes = "; ".join(filter(None, [_numpy_target_note(r), r.notes]))
            table.append([r.layer, r.target, r.batch, r.features, _num(r.median_us), _num(r.reference_us),
                          _times(r.ratio), r.reference, r.rounds, notes])
        lines += _table(["layer", "backend/mode", "batch", "features", "median µs/step", "reference µs/step",
                         "ratio", "reference", "rounds", "notes"], table)
        lines.append("")
    if results.memory:
        lines += ["## Memory: inference steps must not grow memory", "",
                  "RSS from /proc/self/status (CUDA: torch.cuda.memory_allocated), "
                  "after 100 warm-up steps and after the steps below, under no_grad.", ""]
        lines += _table(["layer", "device", "batch", "features", "steps", "before MiB", "after MiB",
                         "growth MiB", "verdict"],
                        [[m.layer, m.device, m.batch, m.features, m.steps, _num(m.before_mib),
                          _num(m.after_mib), "—" if m.growth_mib is None else f"{m.growth_mib:+.2f}",
                          m.verdict] for m in results.memory])
        lines.append("")
    lines += _skipped(results.skipped)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- scan


def _target_cell(row) -> str:
    target = row.target
    if target is None:
        return ""
    if row.speedup_scan is None:
        return f"≥ {target:g}×: —"
    return f"≥ {target:g}×: {'met' if row.speedup_scan >= target else 'MISSED'}"


def _peak_cell(row) -> str:
    from .scan import METHODS

    cells = []
    for method in METHODS:
        value = row.peak_mib.get(method)
        cells.append("—" if value is None else value if isinstance(value, str) else _num(value))
    short = [c if len(c) < 24 else "n/a" for c in cells]
    return " / ".join(short)


def _peak_notes(row) -> list:
    return [f"peak {method}: {value}" for method, value in row.peak_mib.items()
            if isinstance(value, str) and len(value) >= 24]


def scan_markdown(results, info: dict, command: str) -> str:
    """The scan benchmark as Markdown: torch table(s), array-backend table, skips."""
    from .scan import BATCH, FEATURES, TARGET_T

    lines = _header("Sequence mode: stepping vs scan", info, command, [
        f"batch {BATCH}, {FEATURES} features; median ms per whole sequence of T steps, from zero states",
        "fwd: under no_grad; fwd+bwd: sum of all outputs, backward()",
        "speed-up = median over rounds of (upstream stepping / ours); **> 1 means ours is faster**",
        f"targets (upstream step / ours scan at T={TARGET_T}): ≥20× S4/S5 (applied to both modes), "
        "≥2× S6/Mamba fwd, ≥1.5× S6/Mamba fwd+bwd",
        "peak MiB: rise of ru_maxrss over the post-setup baseline, one fresh process per run "
        "(CUDA rows: torch.cuda.max_memory_allocated above the allocated memory after setup)",
    ])
    by_device = defaultdict(list)
    for row in results.rows:
        by_device[row.device].append(row)
    for device, rows in by_device.items():
        lines += [f"## torch {device}", ""]
        table = []
        for r in rows:
            notes = [f"{m} error: {e}" for m, e in r.errors.items()] + r.notes + _peak_notes(r)
            table.append([
                r.layer, r.T, r.mode, *[_num(r.seconds.get(m) and r.seconds[m] * 1e3) for m in
                                        ("upstream step", "ours step", "ours scan")],
                f"**{_times(r.speedup_scan)}**", _times(r.speedup_step), _target_cell(r), _peak_cell(r),
                r.rounds, "; ".join(notes),
            ])
        lines += _table(["layer", "T", "mode", "upstream step ms", "ours step ms", "ours scan ms",
                         "speed-up: upstream step / ours scan", "upstream step / ours step",
                         f"target (T={TARGET_T})", "peak MiB: upstream step / ours step / ours scan",
                         "rounds", "notes"], table)
        lines.append("")
    if results.arrays:
        torch_scan = {(r.layer, r.T): r.seconds.get("ours scan") for r in results.rows
                      if r.device == "cpu" and r.mode == "fwd"}
        lines += ["## Array backends: scan vs their own stepping (fwd)", "",
                  "speed-up = median over rounds of (stepping / scan); > 1 means scan is faster. "
                  "The last time column is our torch CPU scan of the same sequence, for comparison.", ""]
        lines += _table(
            ["backend", "layer", "T", "step ms", "scan ms", "speed-up: step / scan", "torch CPU ours scan ms",
             "rounds", "notes"],
            [[a.backend, a.layer, a.T, _num(a.step_s and a.step_s * 1e3), _num(a.scan_s and a.scan_s * 1e3),
              _times(a.speedup), _num((torch_scan.get((a.layer, a.T)) or 0) * 1e3 or None), a.rounds, a.notes]
             for a in results.arrays])
        lines.append("")
    lines += _skipped(results.skipped)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers at 1, 2 and 5 times each power of ten (``20``, not ``2×10¹``)."""
    import math

    from matplotlib import ticker

    def plain(value, _position):
        return f"{value:g}"

    def minor(value, position):
        if value <= 0:
            return ""
        mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
        return plain(value, position) if round(mantissa, 6) in (2.0, 5.0) else ""

    axis.set_major_formatter(ticker.FuncFormatter(plain))
    axis.set_minor_formatter(ticker.FuncFormatter(minor))


def _finish(fig, title: str, handles: list, labels: list, ncol: int, path: Path) -> None:
    """Title on top, the legend under it, then the panels; saved as PNG."""
    height = fig.get_figheight()
    rows_of_legend = -(-len(labels) // ncol)
    header_in = 0.55 + 0.25 * rows_of_legend
    fig.tight_layout(rect=(0, 0, 1, 1 - header_in / height))
    fig.suptitle(title, y=1 - 0.08 / height, va="top", fontsize=9)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.5 / height), ncol=ncol,
               frameon=False, fontsize=9)
    fig.savefig(path, dpi=110)


def _series(row) -> str:
    """The bar a step row belongs to: ours, TTcompile, torch.compile, numpy, mlx, cupy."""
    if not row.target.startswith("torch "):
        return row.target
    return row.target.split(" · ")[1] if " · " in row.target and "autograd" not in row.target else "ours"


def plot_step(results, path: Path, title: str) -> None:
    """Grouped bars of µs/step per layer, one panel per (device, mode) and size, log scale."""
    plt = _pyplot()
    values = {}  # (device, mode, size) -> {series: {layer: µs}}
    for row in results.rows:
        panel = values.setdefault((row.device, row.mode, (row.batch, row.features)), defaultdict(dict))
        if row.median_us is not None:
            panel[_series(row)][row.layer] = row.median_us
        if row.target.startswith("torch ") and _series(row) == "ours" and row.reference_us is not None:
            panel["upstream 0.19.2"][row.layer] = row.reference_us
    if not values:
        return
    panels_by_row = sorted({(d, m) for d, m, _ in values}, key=lambda k: (k[0], k[1] != "no_grad"))
    sizes = sorted({s for _, _, s in values}, key=lambda s: s[0] * s[1])
    order = ["upstream 0.19.2", "ours", "TTcompile", "torch.compile", "numpy", "mlx", "cupy"]
    colors = dict(zip(order, ["#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#d62728", "#8c564b"]))
    fig, axes = plt.subplots(len(panels_by_row), len(sizes), squeeze=False,
                             figsize=(4.6 * len(sizes), 3.4 * len(panels_by_row)))
    handles = {}
    for i, (device, mode) in enumerate(panels_by_row):
        for j, size in enumerate(sizes):
            ax = axes[i][j]
            panel = values.get((device, mode, size), {})
            present = [s for s in order if s in panel]
            width = 0.8 / max(1, len(present))
            for k, series in enumerate(present):
                xs = [li + (k - (len(present) - 1) / 2) * width for li in range(len(LAYER_ORDER))]
                ys = [panel[series].get(layer, float("nan")) for layer in LAYER_ORDER]
                handles[series] = ax.bar(xs, ys, width, color=colors[series], label=series)
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            ax.set_xticks(range(len(LAYER_ORDER)), LAYER_ORDER)
            ax.set_title(f"torch {device} · {mode} · batch {size[0]}, {size[1]} features", fontsize=9)
            ax.grid(axis="y", which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("µs per step (log)")
    labels = [s for s in order if s in handles]
    _finish(fig, title, [handles[s] for s in labels], labels, len(labels), path)
    plt.close(fig)


def plot_scan(results, path: Path, title: str) -> None:
    """Seconds per sequence vs T (log-log) per layer: upstream stepping, ours stepping, ours scan."""
    from .scan import METHODS

    plt = _pyplot()
    from matplotlib import ticker

    devices = list(dict.fromkeys(r.device for r in results.rows))
    if not devices:
        return
    colors = dict(zip(METHODS, ["#7f7f7f", "#1f77b4", "#d62728"]))
    styles = {"fwd": "-", "fwd+bwd": "--"}
    panels = [(device, layer) for device in devices for layer in LAYER_ORDER]
    ncols = 2 if len(devices) == 1 else len(LAYER_ORDER)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(5.2 * ncols, 3.8 * nrows))
    for index, (device, layer) in enumerate(panels):
        ax = axes[index // ncols][index % ncols]
        for mode, style in styles.items():
            rows = sorted((r for r in results.rows if (r.device, r.layer, r.mode) == (device, layer, mode)),
                          key=lambda r: r.T)
            for method in METHODS:
                points = [(r.T, r.seconds[method]) for r in rows if r.seconds.get(method)]
                if points:
                    ax.plot(*zip(*points), style, marker="o", ms=3.5, color=colors[method],
                            label=f"{method} ({mode})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.set_xticks(sorted({r.T for r in results.rows}))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"{layer} · torch {device}", fontsize=10)
        ax.set_xlabel("T (steps)")
        ax.grid(which="both", alpha=0.3)
        if index % ncols == 0:
            ax.set_ylabel("seconds per sequence (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    _finish(fig, title, handles, labels, 3, path)
    plt.close(fig)
