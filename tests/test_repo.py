"""Repository contracts: the README's commands, CI, and ssm_core's independence."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_gives_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "examples/" in demo and "pytest" in tests
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines, "the README's test command must appear verbatim in .ci/run"


def test_ssm_core_imports_no_array_library():
    code = (
        "import sys, ssm_core, backends; "
        "print(sorted(m for m in ('torch', 'numpy', 'mlx', 'cupy', 'array_api_strict') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_ssm_core_sources_have_no_module_level_array_imports():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|numpy|cupy|mlx|array_api_strict)\b", re.M)
    offenders = [p.name for p in (ROOT / "ssm_core").glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_tests_read_nothing_outside_the_repository():
    # A bare clone, with nothing beside it, must pass: the published recordings live in tests/fixtures/.
    from numpy_oracle import FIXTURE_DIR

    assert FIXTURE_DIR.resolve().is_relative_to(ROOT), FIXTURE_DIR
    assert len(list(FIXTURE_DIR.glob("*.npz"))) >= 8, FIXTURE_DIR
    # The folder beside the repository, spelled in two parts so this line does not match itself.
    pattern = re.compile(r"parents\[[2-9]\]|\.\./|" + "shared" + "/fixtures")
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert offenders == [], offenders
