"""``ssm-anywhere generate``: the command line streams a checkpoint's greedy continuation, and says mistakes in one line."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from backends import cli
from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
TIED, UNTIED = FIXTURES / "tied-convbias", FIXTURES / "untied-bias"

pytest.importorskip("safetensors", reason="reading checkpoints needs safetensors: pip install safetensors")


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_prompt_ids_stream_the_greedy_continuation(backend, capsys):
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "mlx": "mlx.core"}[backend], reason=f"{backend} is not installed")
    expected = json.loads((UNTIED / "expected.json").read_text())["single"]
    n = len(expected["greedy_ids"])
    ids = ",".join(str(i) for i in expected["input_ids"])
    code, out, err = _run(
        ["generate", "--model", str(UNTIED), "--prompt-ids", ids, "--backend", backend, "--max-new-tokens", str(n)], capsys
    )
    assert code == 0, err
    tokens, rates = out.strip().split("\n")
    assert [int(t) for t in tokens.split()] == expected["greedy_ids"]  # transformers' greedy tokens
    assert rates.startswith(f"[{backend}] prefill: {len(expected['input_ids'])} tokens in ") and "tokens/s" in rates


def test_a_prompt_is_tokenized_with_the_checkpoints_tokenizer(capsys):
    tokenizers = pytest.importorskip("tokenizers", reason="the prompt's tokenizer needs tokenizers: pip install tokenizers")
    expected = json.loads((TIED / "expected.json").read_text())["single"]
    tokenizer = tokenizers.Tokenizer.from_file(str(TIED / "tokenizer.json"))
    assert tokenizer.encode(expected["text"]).ids == expected["input_ids"]
    n = len(expected["greedy_ids"])
    code, out, err = _run(["generate", "--model", str(TIED), "--prompt", expected["text"], "--max-new-tokens", str(n)], capsys)
    assert code == 0, err
    text = out.rsplit("\n", 2)[0]  # the streamed text, before the rates
    assert text == tokenizer.decode(expected["greedy_ids"])


def _error(argv, capsys) -> str:
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssm-anywhere: error: "), err
    return lines[0]


def test_mistakes_are_one_line(tmp_path, capsys):
    assert "no checkpoint directory" in _error(["generate", "--model", str(tmp_path / "absent"), "--prompt-ids", "1"], capsys)
    other = tmp_path / "other"
    shutil.copytree(UNTIED, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "model_type" in _error(["generate", "--model", str(other), "--prompt-ids", "1"], capsys)
    assert "no tokenizer.json" in _error(["generate", "--model", str(UNTIED), "--prompt", "hi"], capsys)
    assert "--prompt-ids must be" in _error(["generate", "--model", str(UNTIED), "--prompt-ids", "1,x"], capsys)


def test_a_backend_that_is_not_installed_is_one_line(capsys):
    import backends

    reason = backends.available()["cupy"]
    if reason is None:
        pytest.skip("cupy is usable here: nothing to refuse")
    assert "cupy" in _error(["generate", "--model", str(UNTIED), "--prompt-ids", "1", "--backend", "cupy"], capsys)
