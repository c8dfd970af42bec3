"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    if "mlx" in code:
        pytest.importorskip("mlx.core", reason="pip install 'mlx[cpu]' (Linux) or mlx (macOS)")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
