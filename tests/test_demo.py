"""The demo runs end to end (a few training steps), and every backend reproduces torch."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("tqdm", reason="the demo needs the demo extra: pip install -e '.[demo]'")
pytest.importorskip("matplotlib", reason="the demo needs the demo extra: pip install -e '.[demo]'")

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("ssm_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_and_every_backend_matches_torch(tmp_path, capsys):
    demo = _load_demo()
    results = demo.main(["--steps", "3", "--test", "16", "--out", str(tmp_path)])
    assert (tmp_path / "training.png").stat().st_size > 0
    assert (tmp_path / "copier.pt").stat().st_size > 0
    assert results["chance"] == pytest.approx(1 / 8)
    rows = results["backends"]
    assert "numpy" in rows and any(name.startswith("torch") for name in rows)
    for name, row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["worst_difference"] <= 1e-5, name  # float32 stepping vs sequence mode
        assert row["step_seconds"] > 0
    printed = capsys.readouterr().out
    assert "held-out recall accuracy" in printed and "numpy" in printed


def test_demo_help_lists_its_options(capsys):
    demo = _load_demo()
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--seed", "--device", "--backends"):
        assert option in text


def test_demo_rejects_an_unknown_backend():
    demo = _load_demo()
    with pytest.raises(SystemExit, match="unknown backend"):
        demo.chosen_backends("numpy,fortran")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "20", "--length", "16"], "--tokens (20) must not exceed --length (16)"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--device", "nonsense"], "--device nonsense:"),
        (["--lr", "-1"], "--lr must be positive"),
    ],
)
def test_demo_rejects_bad_arguments_in_one_line(argv, message, capsys):
    demo = _load_demo()
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_rejects_a_device_this_torch_lacks(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA: --device cuda is valid here")
    demo = _load_demo()
    with pytest.raises(SystemExit):
        demo.parse_args(["--device", "cuda"])
    assert "has no usable cuda device" in capsys.readouterr().err
