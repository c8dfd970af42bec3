"""Markdown tables, PNG plots and the machine summary of a benchmark run."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import sys
from collections import defaultdict

from ._measure import proc_mib

# Timings taken above this 1-minute load average are not published (and are flagged).
QUIET_LOAD = 0.5
# The average number of cores other processes kept busy while a benchmark ran (``_measure.OthersMeter``).
OTHERS = "cores busy with other processes during the run"


def machine_info() -> dict:
    """``{label: value}`` describing this machine and the library versions."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = proc_mib("MemTotal")
    info = {
        "CPU": _cpu_model(),
        "CPU cores": f"{os.cpu_count()} ({usable} usable by this process)",
        "memory": "unknown" if total is None else f"{total / 1024:.1f} GiB",
        "OS": platform.platform(),
        "Python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "CPU vector ISA (torch)": torch.backends.cpu.get_cpu_capability(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "unset"),
        "CUDA": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        **{name: _version(name) for name in ("numpy", "mlx", "cupy", "array-api-compat", "mambapy", "transformers")},
        "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "unset"),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    if info["mlx"] != "not installed":
        info["MLX device"] = _mlx_device()
    if hasattr(os, "getloadavg"):
        info["load average at start (1/5/15 min)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return info


def _mlx_device() -> str:
    """MLX's default device, e.g. ``cpu`` (the Linux CPU build) or ``gpu`` (Apple silicon)."""
    try:
        import mlx.core as mx

        return mx.default_device().type.name
    except Exception as error:
        return f"unusable ({type(error).__name__})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(name: str) -> str:
    """The installed version of ``name``, asking the module where the distribution's name varies (cupy-cuda12x)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown version"))
    except ModuleNotFoundError:
        return "not installed"
    except Exception as error:
        return f"unusable ({type(error).__name__})"


def finish_machine_info(info: dict) -> dict:
    if hasattr(os, "getloadavg"):
        info = {**info, "load average at end (1/5/15 min)": " / ".join(f"{v:.2f}" for v in os.getloadavg())}
    return info


def machine_line(info: dict) -> str:
    """One line naming the machine, for table headers."""
    cuda = "" if info["CUDA"] == "not available" else f", {info['CUDA']}"
    return (f"{info['CPU']}, {info['CPU cores'].split()[0]} cores{cuda}; torch {info['torch']} "
            f"({info['torch threads']} threads), numpy {info['numpy']}, mlx {info['mlx']}")


def busy_warning(info: dict) -> str:
    """A warning when the machine was loaded at start or other work ran beside the benchmark, else ``""``."""
    warnings = []
    load = info.get("load average at start (1/5/15 min)")
    if load is not None and float(load.split("/")[0]) > QUIET_LOAD:
        warnings.append(f"the machine was busy at start (1-minute load average {load.split('/')[0].strip()}, "
                        f"above {QUIET_LOAD})")
    others = info.get(OTHERS)
    if others is not None and _busy_others(others):
        warnings.append(f"other processes kept {others} cores busy during the run (above {QUIET_LOAD})")
    if not warnings:
        return ""
    return f"**Warning: {'; '.join(warnings)}; other work competed for the cores, so times and ratios are noisy.**"


def _busy_others(text: str) -> bool:
    try:
        return float(text) > QUIET_LOAD
    except ValueError:  # "unknown (...)"
        return False


def machine_markdown(info: dict, command: str, banner: str = "") -> str:
    warnings = ([f"**{banner}**"] if banner else []) + ([busy_warning(info)] if busy_warning(info) else [])
    lines = ["# Machine", "", f"Command: `{command}`", "", *[f"{text}\n" for text in warnings], "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    return "\n".join(lines) + "\n"


def _header(title: str, info: dict, command: str, explanation: list) -> list:
    warning = busy_warning(info)
    return [f"# {title}", "", f"- Machine: {machine_line(info)} (details in `machine.md`)", f"- Date: {info['date']}",
            f"- Command: `{command}`", *[f"- {line}" for line in explanation], "", *([warning, ""] if warning else [])]


# ----------------------------------------------------------------------------- tables


def _num(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.{digits + 2}g}"


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows] + [""]


def _sections(rows: list, columns: dict) -> list:
    """One table per ``row.section``, in order; ``columns`` maps a header to a cell function."""
    by_section = defaultdict(list)
    for row in rows:
        by_section[row.section].append(row)
    lines = []
    for section, members in by_section.items():
        lines += [f"## {section}", ""]
        lines += _table(list(columns), [[cell(row) for cell in columns.values()] for row in members])
    return lines


def _skipped(skipped: list) -> list:
    return ["## Skipped", "", *_table(["what", "why"], list(dict.fromkeys(skipped)))] if skipped else []


def _times(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def conditions(info: dict) -> list:
    """Lines saying how loaded the machine was and what torch ran on: the figures depend on both."""
    lines = [f"load average (1/5/15 min): {info.get('load average at start (1/5/15 min)', 'unknown')} at start, "
             f"{info.get('load average at end (1/5/15 min)', 'unknown')} at the end"]
    if OTHERS in info:
        lines.append(f"{OTHERS}: {info[OTHERS]} (quiet: at most {QUIET_LOAD})")
    capability = info.get("CPU vector ISA (torch)", "unknown")
    if info.get("ATEN_CPU_CAPABILITY", "unset") != "unset":
        capability += f" (ATEN_CPU_CAPABILITY={info['ATEN_CPU_CAPABILITY']})"
    lines.append(f"CPU vector ISA: {capability}; torch {info['torch']}, {info['torch threads']} threads"
                 + (f"; MLX {info['mlx']} on its {info['MLX device']} device" if "MLX device" in info else ""))
    return lines


def _cell(ratio, met, _why) -> str:
    if ratio is None:
        return "—"
    return f"{ratio:.2f}" + {True: " ✓", False: " ✗", None: ""}[met]


def _quartiles(row) -> str:
    return "" if row.ratio_quartiles is None else "{:.2f}–{:.2f}".format(*row.ratio_quartiles)


def step_markdown(results, info: dict, command: str) -> str:
    from .step import LAYERS, TABLE_DEVICE, TRAINING, table

    steps = results.settings.training_steps
    lines = _header("Per-step latency", info, command, conditions(info) + [
        "median µs per step over rounds; the contenders of a group take turns within each round, in one process",
        "ratio = median over rounds of (this / vs); **< 1 means this is faster**; the rounds' quartiles: "
        "the middle half of the round-by-round ratios (wide: a noisy run)",
        f"{TRAINING}: zero_states, {steps} steps, sum of outputs, backward(); µs per step = total / {steps}",
        "page faults / step: the median over rounds of the process's minor page faults per step, memory the "
        "allocator took from the system anew (glibc returns freed memory at the top of its heap, and taking it "
        "back costs a fault per page): they depend on the whole process's allocations, and slow the step they land in",
    ])
    cells = table(results)
    lines += [f"## Targets: ours / 0.19.2 on torch {TABLE_DEVICE.upper()}", "",
              "Lower is better; the array backends' lines are their step / our torch eager step. "
              "✓ meets the target, ✗ misses it, — not measured (see the rows below).", ""]
    labels = {target: target.label.format(steps=steps) for target, _ in cells}
    lines += _table(["ours / 0.19.2", "target", *LAYERS],
                    [[labels[target], target.describe(), *[_cell(*by_layer[layer]) for layer in LAYERS]]
                     for target, by_layer in cells])
    verdicts = [met for _, by_layer in cells for _, met, _ in by_layer.values() if met is not None]
    unmeasured = [f"{layer}, {labels[target]}: {why}" for target, by_layer in cells
                  for layer, (ratio, _, why) in by_layer.items() if ratio is None and layer in target.limits]
    lines += [f"Targets met: {sum(verdicts)} of {len(verdicts) + len(unmeasured)}"
              + (f"; not measured: {'; '.join(unmeasured)}" if unmeasured else "") + ".", ""]
    lines += _sections(results.rows, {
        "layer": lambda r: r.layer, "batch × features": lambda r: f"{r.shape[0]} × {r.shape[1]}",
        "contender": lambda r: r.contender, "µs/step": lambda r: _num(r.seconds and r.seconds * 1e6),
        "ratio": lambda r: _times(r.ratio), "rounds' quartiles": _quartiles,
        "vs": lambda r: r.baseline if r.ratio is not None else "",
        "page faults / step": lambda r: "" if r.faults is None else _num(r.faults),
        "rounds": lambda r: r.rounds, "notes": lambda r: "; ".join(r.notes),
    })
    if results.memory:
        batch, features = results.settings.memory_size
        lines += ["## Memory: inference steps must not grow memory", "",
                  f"Resident memory (CUDA: allocated memory) after "
                  f"{results.settings.memory_warmup_steps:,} no_grad steps and after "
                  f"{results.settings.memory_steps:,} more, batch {batch}, {features} features.", ""]
        lines += _table(["layer", "device", "before MiB", "after MiB", "verdict"],
                        [[layer, device, _num(before), _num(after), _growth(before, after, error)]
                         for layer, device, before, after, error in results.memory])
    return "\n".join(lines + _skipped(results.skipped)) + "\n"


def _growth(before, after, error) -> str:
    if error:
        return f"error: {error}"
    if before is None or after is None:
        return "not measurable here (no /proc/self/status)"
    return "no growth" if after - before < 1.0 else f"GREW by {after - before:.1f} MiB"


def _first_call(row) -> str:
    if row.first_s is None or row.seconds is None:
        return "—"
    text = f"{row.first_s - row.seconds:.2f}"
    return text if row.cached_first_s is None else f"{text} (cached: {row.cached_first_s - row.seconds:.2f})"


def scan_markdown(results, info: dict, command: str) -> str:
    from .scan import FEATURES, PSCAN_TARGETS, TARGET_SHAPE, TARGETS

    targets = "; ".join(f"{mode} " + " / ".join(f"{layer} {value}×" for layer, value in by_layer.items())
                        for mode, by_layer in TARGETS.items())
    lines = _header("Sequence mode", info, command, [
        f"{FEATURES} features; median ms per whole sequence of T steps from zero states, the contenders "
        "taking turns within each round; fwd: under no_grad; fwd+bwd: sum of all outputs, backward()",
        "speed-up = median over rounds of (vs / this); **> 1 means this is faster**",
        f"targets for our scan at T × batch = {TARGET_SHAPE[0]} × {TARGET_SHAPE[1]}: {targets}; Mamba over "
        f"mamba.py's pscan: fwd {PSCAN_TARGETS['fwd']}×, fwd+bwd {PSCAN_TARGETS['fwd+bwd']}×",
        "floor: the exp and matmul work alone that the layer must do over the sequence (see benchmarks/scan.py)",
        "Mamba's peers, expand 1, d_state 16, conv 4: mamba.py's MambaBlock with pscan=True; transformers' "
        "MambaMixer on its torch path (sequential loop, no CUDA kernels)",
        "peak MiB: the highest resident memory during one run in a fresh process above that before it "
        "(Linux: the kernel's peak, reset just before the run; elsewhere the rise of ru_maxrss, a lower bound; "
        "CUDA: torch.cuda.max_memory_allocated above setup); compiled contenders: the run on a warm compile cache",
        "first call − steady: that fresh process's run minus the median, in s: what the first call pays "
        "(compiling from an empty cache; cached: in a later process)",
    ])
    lines += _sections(results.rows, {
        "layer": lambda r: r.layer, "T × batch": lambda r: f"{r.shape[0]:,} × {r.shape[1]}",
        "contender": lambda r: r.contender, "ms": lambda r: _num(r.seconds and r.seconds * 1e3),
        "speed-up": lambda r: f"**{_times(r.ratio)}**" if " scan" in r.contender else _times(r.ratio),
        "vs": lambda r: r.baseline if r.ratio is not None else "", "peak MiB": lambda r: _num(r.peak_mib),
        "first call − steady, s": _first_call, "rounds": lambda r: r.rounds, "notes": lambda r: "; ".join(r.notes),
    })
    return "\n".join(lines + _skipped(results.skipped)) + "\n"


# ----------------------------------------------------------------------------- plots


def _grid(rows: int, columns: int, width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, squeeze=False, figsize=(width * columns, height * rows))
    return plt, fig, axes


def _finish(plt, fig, axes, title: str, path) -> None:
    from matplotlib import ticker

    handles = {}
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(ticker.LogFormatter(minor_thresholds=(1, 0.4)))
        ax.grid(axis="y", which="both", alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    columns = min(len(handles), 7)
    header = 0.6 + 0.25 * -(-len(handles) // columns)
    fig.tight_layout(rect=(0, 0, 1, 1 - header / fig.get_figheight()))
    fig.suptitle(title, y=1 - 0.08 / fig.get_figheight(), va="top", fontsize=9)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=columns, frameon=False, fontsize=9,
               bbox_to_anchor=(0.5, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colors(rows: list) -> dict:
    names = list(dict.fromkeys(row.contender for row in rows))
    return {name: f"C{index % 10}" for index, name in enumerate(names)}


def plot_step(results, path, title: str) -> None:
    """Bars of µs per step by layer and contender: a row of panels per device and mode, one per size."""
    from .step import LAYERS

    rows = [r for r in results.rows if r.seconds is not None]
    sections = list(dict.fromkeys(r.section for r in rows))
    sizes = {section: sorted({r.shape for r in rows if r.section == section}, key=lambda s: s[0] * s[1])
             for section in sections}
    if not rows:
        raise ValueError("no timings to plot")
    plt, fig, axes = _grid(len(sections), max(map(len, sizes.values())), 4.6, 3.4)
    colors = _colors(rows)
    for i, section in enumerate(sections):
        for ax in axes[i][len(sizes[section]):]:
            ax.set_visible(False)
        for j, size in enumerate(sizes[section]):
            ax, panel = axes[i][j], [r for r in rows if (r.section, r.shape) == (section, size)]
            names = list(dict.fromkeys(r.contender for r in panel))
            width = 0.8 / max(1, len(names))
            for k, name in enumerate(names):
                times = {r.layer: r.seconds * 1e6 for r in panel if r.contender == name}
                ax.bar([x + (k - (len(names) - 1) / 2) * width for x in range(len(LAYERS))],
                       [times.get(layer, float("nan")) for layer in LAYERS], width, color=colors[name], label=name)
            ax.set_xticks(range(len(LAYERS)), LAYERS)
            ax.set_title(f"{section} · batch {size[0]}, {size[1]} features", fontsize=9)
            if j == 0:
                ax.set_ylabel("µs per step (log)")
    _finish(plt, fig, axes, title, path)


def plot_scan(results, path, title: str) -> None:
    """ms per sequence against T (log-log) at the first shape's batch: a row of panels per device and mode."""
    from .scan import LAYERS

    batch = results.settings.shapes[0][1]
    rows = [r for r in results.rows if r.seconds and r.shape[1] == batch and r.section.startswith("torch")]
    sections = list(dict.fromkeys(r.section for r in rows))
    if not rows:
        raise ValueError("no torch timings to plot")
    plt, fig, axes = _grid(len(sections), len(LAYERS), 4.2, 3.4)
    colors = _colors(rows)
    for i, section in enumerate(sections):
        for j, layer in enumerate(LAYERS):
            ax, panel = axes[i][j], [r for r in rows if (r.section, r.layer) == (section, layer)]
            for name in dict.fromkeys(r.contender for r in panel):
                points = sorted((r.shape[0], r.seconds * 1e3) for r in panel if r.contender == name)
                ax.plot(*zip(*points), "--" if name == "floor" else "-", marker="o", ms=3.5, color=colors[name],
                        label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r.shape[0] for r in rows}), [f"{T:g}" for T in sorted({r.shape[0] for r in rows})])
            ax.set_title(f"{layer} · {section} · batch {batch}", fontsize=9)
            ax.set_xlabel("T (steps)")
            if j == 0:
                ax.set_ylabel("ms per sequence (log)")
    _finish(plt, fig, axes, title, path)
