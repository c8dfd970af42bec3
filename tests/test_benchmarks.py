"""The benchmark's command line, its step-targets table and its load guard, without timing anything."""

from __future__ import annotations

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import report, step
from benchmarks._layers import LAYERS, PUBLISHED
from benchmarks._measure import Row


def test_benchmarks_are_named_as_arguments_or_with_only():
    assert cli.parse_args(["step"]).only == ["step"]
    assert cli.parse_args(["--only", "scan"]).only == ["scan"]
    assert cli.parse_args([]).only == list(cli.BENCHMARKS)
    with pytest.raises(SystemExit):
        cli.parse_args(["steps"])
    with pytest.raises(SystemExit):
        cli.parse_args(["step", "--only", "scan"])


def _results(ratios: dict) -> step.Results:
    """Results holding one row per ``(section, size, contender, layer) -> ratio``."""
    results = step.Results(step.Settings())
    for (section, size, contender, layer), value in ratios.items():
        results.rows.append(Row(f"torch cpu · {section}", layer, size, contender, seconds=1e-4, ratio=value,
                                baseline=PUBLISHED, rounds=3))
    return results


def test_the_targets_table_marks_each_ratio_against_its_layers_target():
    eager, ttcompiled, numpy_line = step.TABLE[1], step.TABLE[4], step.TABLE[5]
    results = _results({
        (eager.section, eager.size, eager.contender, "S4"): 0.8,  # at the limit: met
        (eager.section, eager.size, eager.contender, "S5"): 0.81,
        (ttcompiled.section, ttcompiled.size, ttcompiled.contender, "S4"): 0.45,  # S4's limit is 0.5
        (ttcompiled.section, ttcompiled.size, ttcompiled.contender, "S6"): 0.45,  # S6's is 0.4
        (numpy_line.section, numpy_line.size, numpy_line.contender, "S4"): 1.0,  # "< 1": not met
    })
    cells = dict(step.table(results))
    assert cells[eager]["S4"][:2] == (0.8, True) and cells[eager]["S5"][:2] == (0.81, False)
    assert cells[ttcompiled]["S4"][1] is True and cells[ttcompiled]["S6"][1] is False
    assert cells[numpy_line]["S4"][1] is False
    assert cells[eager]["S6"] == (None, None, "not measured")
    assert ttcompiled.describe() == "≤ 0.5 (S4 S5), ≤ 0.4 (S6 Mamba)" and numpy_line.describe() == "< 1.0"


def test_the_step_report_opens_with_the_targets_and_the_conditions():
    line = step.TABLE[0]
    results = _results({(line.section, line.size, line.contender, layer): 1.2 for layer in LAYERS})
    info = {**report.machine_info(), report.OTHERS: "0.90"}
    text = report.step_markdown(results, info, "python -m benchmarks step")
    targets, details = text.index("## Targets"), text.index("## torch cpu · no_grad")
    assert targets < details
    assert f"| {line.label} | ≤ 0.9 | " + " | ".join(["1.20 ✗"] * 4) + " |" in text
    assert "Targets met: 0 of " in text
    assert f"CPU vector ISA: {torch.backends.cpu.get_cpu_capability()}" in text
    assert "load average (1/5/15 min)" in text
    assert "other processes kept 0.90 cores busy" in text  # the noisy-run warning


class _Meter:
    def __init__(self, cores):
        self._cores = cores

    def cores(self):
        return self._cores


@pytest.mark.parametrize("benchmark", ["step", "scan"])
@pytest.mark.parametrize("others, published", [(0.1, True), (0.9, False)])
def test_a_benchmark_beside_other_work_is_not_written_to_the_committed_results(
        tmp_path, monkeypatch, benchmark, others, published):
    # Other processes busy during the run (the benchmark's own threads not counted) send it to results-local.
    from benchmarks import scan

    results, local = tmp_path / "results", tmp_path / "results-local"
    results.mkdir()
    monkeypatch.setattr(cli, "RESULTS", results)
    monkeypatch.setattr(cli, "LOCAL", local)
    monkeypatch.setattr(cli, "_busy_load", lambda: None)  # quiet at the start
    monkeypatch.setattr(cli, "OthersMeter", lambda: _Meter(others))
    module = step if benchmark == "step" else scan
    monkeypatch.setattr(cli, "_run", lambda name, args: module.Results(module.Settings()))
    monkeypatch.setattr(report, f"plot_{benchmark}", lambda results, path, title: path.write_text("plot"))
    assert cli.main([benchmark, "--out", str(results), "--threads", str(torch.get_num_threads())]) == 0
    written, elsewhere = (results, local) if published else (local, results)
    assert (written / f"{benchmark}.md").is_file() and (written / "machine.md").is_file()
    assert not (elsewhere / f"{benchmark}.md").exists() and not (elsewhere / "machine.md").exists()
    if not published:
        assert "NOT PUBLISHED: other processes kept 0.90 cores busy" in (local / "machine.md").read_text()


def test_ratios_are_taken_round_by_round_with_their_spread():
    from benchmarks._measure import Timing, fill

    ours = Timing("ours", per_unit_s=[1.0, 2.0, 3.0, 4.0, 5.0])
    theirs = Timing(PUBLISHED, per_unit_s=[2.0, 2.0, 2.0, 2.0, 100.0])  # a load spike in the last round
    rows = {name: Row("s", "S4", (1, 64), name, baseline=PUBLISHED) for name in ("ours", PUBLISHED)}
    fill(rows, {"ours": ours, PUBLISHED: theirs}, speedup=False)
    # Round ratios 0.5, 1, 1.5, 2, 0.05: median 1.0, where the medians' ratio would be 3/2.
    assert rows["ours"].ratio == 1.0
    assert rows["ours"].ratio_quartiles == pytest.approx((0.275, 1.75))  # statistics.quantiles' exclusive method
    assert rows[PUBLISHED].ratio is None


def test_each_round_counts_the_page_faults_of_its_calls():
    """A call that takes fresh memory from the system and touches it faults; one that takes none does not."""
    import numpy as np

    from benchmarks._measure import Contender, Plan, fill, measure

    size = 64 << 20  # above glibc's largest mmap threshold: each array is mapped anew, and freed to the system

    def fresh():
        np.ones(size, dtype=np.uint8)

    idle = Contender("idle", lambda: None)
    touching = Contender("touching", fresh)
    timings = measure([idle, touching], Plan(rounds=3, target_s=0, warmup_calls=1))
    rows = {name: Row("s", "S4", (1, 64), name) for name in timings}
    fill(rows, timings, speedup=False)
    assert rows["idle"].faults == 0
    # The kernel may map several pages per fault (huge pages, fault-around): 64 MiB took 544 here, one per 120 KiB.
    assert rows["touching"].faults >= size // (2 << 20)
