"""``python -m benchmarks [--quick] [--only step,scan] [--rounds N] [--out DIR]``.

Runs the selected benchmarks, writes ``step.md``, ``scan.md``, ``step.png``,
``scan.png`` and ``machine.md`` into ``--out`` (default
``benchmarks/results/``), and prints the tables.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS = ("step", "scan")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
THREADS = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of tracetorch's SSM layers against traceTorch 0.19.2.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration (2 sizes, T in {64, 256}, 2 rounds, no torch.compile)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated benchmarks to run: step, scan (default: both)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per configuration (default 7; 2 with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/results/)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads (default 2)")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--torch-compile", dest="torch_compile", action="store_true", default=None,
                               help="time torch.compile even with --quick")
    compile_group.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                               help="skip torch.compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the scan benchmark's peak-memory runs")
    args = parser.parse_args(argv)
    args.only = list(dict.fromkeys(name.strip() for name in args.only.split(",") if name.strip()))
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def command_line(argv=None) -> str:
    """The command as typed, for the report headers."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m benchmarks", *map(shlex.quote, argv)])


_STARTED = time.perf_counter()


def _log(message: str) -> None:
    """Progress on stderr, with the seconds since start."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    _log(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from . import report

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = command_line(argv)
    info = report.machine_info()
    _write(out / "machine.md", report.machine_markdown(info, command))
    title = f"{report.machine_line(info)}\n{command}"

    failed = []
    for name in args.only:
        try:
            text, plotted = _run_benchmark(name, args, out, info, command, title)
            if not plotted:
                failed.append(f"{name}.png")
        except Exception:  # keep going with the other benchmark; the error lands in its .md
            failed.append(name)
            error = traceback.format_exc()
            _log(f"{name} failed:\n{error}")
            text = f"# {name} benchmark failed\n\nCommand: `{command}`\n\n```\n{error}```\n"
            _write(out / f"{name}.md", text)
        print(text)
    _write(out / "machine.md", report.machine_markdown(report.finish_machine_info(info), command))
    return 1 if failed else 0


def _run_benchmark(name: str, args, out: Path, info: dict, command: str, title: str) -> tuple:
    """Run benchmark ``name`` ("step" or "scan"), write its table and plot; ``(table, plotted)``."""
    from . import report

    if name == "step":
        from . import step

        settings = step.StepSettings.make(args.quick, args.rounds, args.torch_compile)
        results = step.run(settings, log=_log)
        text = report.step_markdown(results, info, command)
        plot, heading = report.plot_step, "Per-step latency · "
    else:
        from . import scan

        settings = scan.ScanSettings.make(args.quick, args.rounds)
        settings.memory = not args.no_memory
        results = scan.run(settings, log=_log)
        text = report.scan_markdown(results, info, command)
        plot, heading = report.plot_scan, "Sequence mode · "
    _write(out / f"{name}.md", text)
    try:
        plot(results, out / f"{name}.png", heading + title)
    except Exception as error:  # e.g. matplotlib missing: the table stands, the run reports failure
        _log(f"could not plot {name}.png ({type(error).__name__}: {error}); pip install matplotlib")
        return text, False
    _log(f"wrote {out / f'{name}.png'}")
    return text, True


if __name__ == "__main__":
    sys.exit(main())
