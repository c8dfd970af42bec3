"""Parity matrix support: a recorder the tests fill, and a summary table at the end of the session.

Each parity test records its worst normwise relative error (or its skip
reason) under ``(backend, dtype)`` through the ``parity_record`` fixture, and
``pytest_runtest_makereport`` counts its outcome (so a test that raised before
measuring shows as failed); ``pytest_terminal_summary`` prints one row per
backend and dtype. Both hooks live here, in a non-root conftest: pytest calls
``pytest_terminal_summary`` on every registered plugin, and this conftest is
registered as soon as ``tests/parity`` is collected, whether pytest was given
``tests/parity``, ``tests`` or nothing (``testpaths``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[1]
_ROOT = _TESTS.parent
for _path in (_ROOT, _TESTS):  # the repo (ssm_core, backends, tracetorch) and tests/ (numpy_oracle, conftest)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# The matrix's rows and columns, in print order.
BACKENDS = ("numpy", "torch", "mlx", "array_api_strict", "cupy", "torch-cuda")
DTYPES = ("float32", "float64")
from conftest import TOL as TOLERANCE  # noqa: E402  (the suite's tolerances, derived there)


class ParityResults:
    """Per ``(backend, dtype)``: each case's worst error, skip reasons, and the tests' outcomes."""

    def __init__(self):
        self.cells: dict = {}

    def _cell(self, backend: str, dtype: str) -> dict:
        return self.cells.setdefault(
            (backend, dtype), {"errors": {}, "skips": {}, "outcomes": {"passed": 0, "failed": 0, "skipped": 0}}
        )

    def error(self, backend: str, dtype: str, case: str, error: float) -> None:
        """A measured case: its worst normwise relative error over outputs and states."""
        self._cell(backend, dtype)["errors"][case] = error

    def skip(self, backend: str, dtype: str, reason: str) -> None:
        skips = self._cell(backend, dtype)["skips"]
        skips[reason] = skips.get(reason, 0) + 1

    def outcome(self, backend: str, dtype: str, outcome: str) -> None:
        """A test's outcome (from its report, so exceptions raised before measuring count too)."""
        self._cell(backend, dtype)["outcomes"][outcome] += 1

    def rows(self) -> list:
        """``(backend, dtype, worst error or None, outcomes, skip text)`` per cell, in table order."""
        rows = []
        for backend in BACKENDS:
            for dtype in DTYPES:
                cell = self.cells.get((backend, dtype))
                if cell is None:
                    continue
                errors = cell["errors"]
                worst = max(errors.values()) if errors else None
                skip = "; ".join(reason if len(cell["skips"]) == 1 else f"{reason} (x{n})"
                                 for reason, n in cell["skips"].items())
                rows.append((backend, dtype, worst, dict(cell["outcomes"]), skip))
        return rows


RESULTS = ParityResults()


@pytest.fixture(scope="session")
def parity_record() -> ParityResults:
    return RESULTS


def format_summary(results: ParityResults) -> list:
    rows = results.rows()
    if not rows:
        return []
    lines = [
        "worst normwise relative error max|a-b|/max|b| vs tests/numpy_oracle.py (float64), over all",
        f"layers x feature axes, outputs of all steps and final states; tolerance "
        f"float32 {TOLERANCE['float32']:g}, float64 {TOLERANCE['float64']:g}",
        "",
        f"{'backend':<17} {'dtype':<8} {'worst error':>11}  {'pass/fail/skip':>14}  note",
        f"{'-' * 17} {'-' * 8} {'-' * 11}  {'-' * 14}  {'-' * 4}",
    ]
    for backend, dtype, worst, outcomes, skip in rows:
        err = "-" if worst is None else f"{worst:.2e}"
        counts = f"{outcomes['passed']}/{outcomes['failed']}/{outcomes['skipped']}"
        if outcomes["failed"]:
            note = "FAIL" + ("" if worst is None or worst <= TOLERANCE[dtype] else " (error above tolerance)")
        elif outcomes["passed"]:
            note = "ok"
        else:
            note = "SKIPPED: " + (skip or "?")
        if skip and not note.startswith("SKIPPED"):
            note += f"; skipped: {skip}"
        lines.append(f"{backend:<17} {dtype:<8} {err:>11}  {counts:>14}  {note}")
    return lines


@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: works with every pytest >= 7
def pytest_runtest_makereport(item, call):
    result = yield
    report = result.get_result()
    params = getattr(getattr(item, "callspec", None), "params", {})
    if getattr(item, "originalname", None) == "test_parity" and "backend" in params and "dtype" in params:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            RESULTS.outcome(params["backend"], params["dtype"], report.outcome)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = format_summary(RESULTS)
    if not lines:
        return
    terminalreporter.write_sep("=", "parity summary: backend x dtype")
    for line in lines:
        terminalreporter.write_line(line)
