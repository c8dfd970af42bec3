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


def _import_graph(packages):
    """Module -> the modules of ``packages`` it imports, at module level or inside a function alike."""
    import ast

    def module_name(path):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    # Hidden folders hold no code of the project's: benchmarks/.published is the published 0.19.2, installed apart.
    sources = {
        module_name(p): p
        for package in packages
        for p in (ROOT / package).rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
    }
    graph = {}
    for name, path in sources.items():
        # the package a relative import starts from: the module's own for __init__.py, its parent's otherwise
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import sub`` imports the submodule sub (pkg's own __init__ may still be running);
                # ``from m import f`` needs m itself
                submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in sources]
                names_only = len(submodules) < len(node.names)
                candidates = submodules + ([base] if names_only else [])
            else:
                continue
            for candidate in candidates:
                if candidate in sources and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def _find_cycle(graph):
    """One cycle of ``graph`` as a list of modules, or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, "white")
    stack = []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for child in sorted(graph[node]):
            if colour[child] == "grey":
                return stack[stack.index(child):] + [child]
            if colour[child] == "white":
                found = visit(child)
                if found:
                    return found
        stack.pop()
        colour[node] = "black"
        return None

    for node in sorted(graph):
        if colour[node] == "white":
            found = visit(node)
            if found:
                return found
    return None


def test_import_graph_finds_a_planted_cycle():
    # The checker itself must see a cycle through a function-level import.
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    # A package's __init__ importing its own submodules is not a cycle unless a submodule imports the package back.
    graph = _import_graph(["ssm_core", "backends", "tracetorch", "benchmarks"])
    assert len(graph) > 30, sorted(graph)  # the sources were found
    assert "tracetorch.core._model" in graph["tracetorch.core"]
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
