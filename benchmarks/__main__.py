"""``python -m benchmarks [step] [scan] [--quick] [--rounds N] [--out DIR] [--threads N] [--torch-compile] [--shapes 1024x8,...]``.

Runs the benchmarks named (``--only step,scan`` says the same; default:
both), writes ``step.md``, ``scan.md``, ``step.png``, ``scan.png`` and
``machine.md`` and prints the tables. A full run writes to
``benchmarks/results/``, the figures the README quotes, but only on a quiet
machine: when the 1-minute load average is above 0.5 it waits up to 10
minutes, then writes to the ignored ``benchmarks/results-local/`` and says
so; and a benchmark during which other processes kept more than 0.5 cores
busy on average (its own threads do not count) goes there too. ``--quick``
runs always write there (or to ``--out``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from ._measure import OthersMeter
from .report import OTHERS, QUIET_LOAD

BENCHMARKS = ("step", "scan")
RESULTS = Path(__file__).resolve().parent / "results"
LOCAL = RESULTS.with_name("results-local")  # ignored by git
QUIET_WAIT_S = 600


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Benchmarks of tracetorch's SSM layers against traceTorch 0.19.2.")
    parser.add_argument("--quick", action="store_true",
                        help="a short run that checks that everything works (its figures are not published)")
    parser.add_argument("names", nargs="*", metavar="BENCHMARK",
                        help="step and/or scan (default: both; the same as --only)")
    parser.add_argument("--only", default=None, help="comma-separated: step, scan (default: both)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: step 15, scan 7; 2 with --quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/ for a full run on a quiet machine, "
                             "else benchmarks/results-local/)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--torch-compile", action="store_true", help="time torch.compile per step even with --quick")
    parser.add_argument("--shapes", default=None,
                        help="sequence shapes of the scan benchmark as TxBATCH, comma-separated "
                             "(default 64x8,256x8,1024x8,4096x8,16384x1)")
    args = parser.parse_args(argv)
    if args.shapes is not None:
        try:
            args.shapes = tuple(tuple(int(n) for n in item.split("x")) for item in args.shapes.split(","))
        except ValueError:
            parser.error(f"--shapes: expected TxBATCH items like 1024x8, got {args.shapes!r}")
        if any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes):
            parser.error(f"--shapes: expected TxBATCH items like 1024x8, got {args.shapes!r}")
    if args.names and args.only is not None:
        parser.error("name the benchmarks either as arguments or with --only, not both")
    named = args.names or (args.only or ",".join(BENCHMARKS)).split(",")
    args.only = list(dict.fromkeys(name.strip() for name in named if name.strip()))
    if set(args.only) - set(BENCHMARKS):
        parser.error(f"--only: unknown benchmark(s) {sorted(set(args.only) - set(BENCHMARKS))}; "
                     f"choose from {list(BENCHMARKS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


_STARTED = time.perf_counter()


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def _shout(message: str) -> None:
    print(f"\n{'!' * 78}\n{message}\n{'!' * 78}\n", file=sys.stderr, flush=True)


def _busy_load():
    """``None`` once the 1-minute load average is at most ``QUIET_LOAD`` (waiting up to ``QUIET_WAIT_S``), else it."""
    if not hasattr(os, "getloadavg"):
        return "unknown (no os.getloadavg)"
    deadline = time.monotonic() + QUIET_WAIT_S
    while (load := os.getloadavg()[0]) > QUIET_LOAD:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"{load:.2f}"
        _log(f"1-minute load average {load:.2f} > {QUIET_LOAD}: waiting for a quiet machine before a run "
             f"whose figures are published ({left / 60:.1f} min left)")
        time.sleep(min(15.0, left))
    return None


def output_folder(args) -> tuple:
    """``(folder, why it is not the committed results)``; the reason is ``""`` when it is."""
    if args.out is not None and args.out.resolve() != RESULTS:
        return args.out, ""
    if args.quick:
        return LOCAL, "--quick: writing to benchmarks/results-local/, not to the committed benchmarks/results/"
    load = _busy_load()
    if load is None:
        return RESULTS, ""
    return LOCAL, (f"NOT PUBLISHED: the 1-minute load average was still {load} (above {QUIET_LOAD}) after "
                   f"{QUIET_WAIT_S // 60} min of waiting, so these timings went to benchmarks/results-local/, "
                   "not to the committed benchmarks/results/. Rerun on a quiet machine.")


def main(argv=None) -> int:
    args = parse_args(argv)
    out, diverted = output_folder(args)
    if diverted:
        _shout(diverted)
    import torch

    torch.set_num_threads(args.threads)
    from . import report

    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    info = report.machine_info()
    if out != RESULTS:  # the committed summary is replaced only once a benchmark's figures land beside it
        _write(out / "machine.md", report.machine_markdown(info, command, diverted))
    title = f"{report.machine_line(info)}\n{command}"
    failed, folders = [], {}  # the folders written to -> why they are not the committed results ("" when they are)
    for name in args.only:
        meter = OthersMeter()
        try:
            results = _run(name, args)
        except Exception:  # keep going with the other benchmark; the error lands in its .md
            failed.append(name)
            error = traceback.format_exc()
            _log(f"{name} failed:\n{error}")
            text = f"# {name} benchmark failed\n\nCommand: `{command}`\n\n```\n{error}```\n"
            _write(out / f"{name}.md", text)
            folders.setdefault(out, diverted)
            print(text)
            continue
        others = meter.cores()
        during = {**report.finish_machine_info(info),
                  OTHERS: "unknown (no /proc/stat for this process's CPUs)" if others is None else f"{others:.2f}"}
        folder, why = out, diverted
        if out == RESULTS and others is not None and others > QUIET_LOAD:
            folder, why = LOCAL, (f"NOT PUBLISHED: other processes kept {others:.2f} cores busy on average during "
                                  f"the {name} benchmark (above {QUIET_LOAD}), so its timings went to "
                                  "benchmarks/results-local/, not to the committed benchmarks/results/. "
                                  "Rerun on a quiet machine.")
            _shout(why)
            folder.mkdir(parents=True, exist_ok=True)
        folders[folder] = "\n\n".join(dict.fromkeys(filter(None, (*folders.get(folder, "").split("\n\n"), why))))
        text = _report(name, results, folder, during, command, title, failed)
        print(text)
    for folder, banner in (folders or {out: diverted}).items():
        _write(folder / "machine.md", report.machine_markdown(report.finish_machine_info(info), command, banner))
        if banner:
            _shout(banner)
    return 1 if failed else 0


def _run(name: str, args):
    from . import scan, step

    if name == "step":
        return step.run(step.Settings.make(args.quick, args.rounds, args.torch_compile), log=_log)
    return scan.run(scan.Settings.make(args.quick, args.rounds, args.shapes), log=_log)


def _report(name: str, results, out: Path, info: dict, command: str, title: str, failed: list) -> str:
    """Write benchmark ``name``'s table and plot into ``out``; returns the table."""
    from . import report

    if name == "step":
        text, plot, heading = report.step_markdown(results, info, command), report.plot_step, "Per-step latency"
    else:
        text, plot, heading = report.scan_markdown(results, info, command), report.plot_scan, "Sequence mode"
    _write(out / f"{name}.md", text)
    try:
        plot(results, out / f"{name}.png", f"{heading} · {title}")
        _log(f"wrote {out / f'{name}.png'}")
    except Exception as error:  # e.g. matplotlib missing: the table stands, the run reports failure
        failed.append(f"{name}.png")
        _log(f"could not plot {name}.png ({type(error).__name__}: {error}); pip install matplotlib")
    return text


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    _log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
