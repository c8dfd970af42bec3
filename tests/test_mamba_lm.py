"""The Mamba language model (``tt.ssm.MambaLM``, ``backends.<library>.MambaLM``) against ``transformers``.

The checkpoints of ``tests/fixtures/hf/`` were written by ``transformers``' ``save_pretrained``,
with its float32 logits of a fixed prompt and its greedy continuation (see the README
there). Loaded on every binding (torch, NumPy, MLX, array-api-strict; CuPy where a GPU
is), the model gives those logits, stepping gives what a scan gives, a scan continues
from the held states, and generation gives ``transformers``' greedy tokens. No network,
no ``transformers`` needed: the live comparison at the end runs only where it is installed.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import ssm_core
import tracetorch as tt
from conftest import TOL, get_binding, rel_err, skip_mlx_float64_on_gpu
from ssm_core.pretrained import read_config, read_weights
from tracetorch.ssm._backend import backend as torch_backend

pytest.importorskip("safetensors", reason="loading checkpoints needs safetensors: pip install safetensors")

HF_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
TIED, UNTIED = HF_FIXTURES / "tied-convbias", HF_FIXTURES / "untied-bias"
CHECKPOINTS = [pytest.param(TIED, id="tied-convbias"), pytest.param(UNTIED, id="untied-bias")]
BINDINGS = ["torch", "numpy", "mlx", "array_api_strict", "cupy"]
# The bound the model is held to against transformers' float32 logits, normwise relative
# (max|a - b| / max|b|). transformers' own float32 rounding through the two layers is about
# 4e-7 of the largest logit (test_pretrained_loading.py measures it against float64), ours
# the same again: 1e-5 keeps a margin of ten over both and still fails a misread weight or
# a wrong rule at once (errors of order 1e-2 and more).
LOGIT_TOL = 1e-5


def expected(folder: Path) -> dict:
    return json.loads((folder / "expected.json").read_text())


def lm_class(b):
    return tt.ssm.MambaLM if b.name == "torch" else b.mod.MambaLM


def load(b, folder: Path, dtype: str = "float32"):
    """The binding's model of ``folder``, in ``dtype`` (skipped where the binding has none here)."""
    skip_mlx_float64_on_gpu(b, dtype)
    if b.name == "torch":
        return tt.ssm.MambaLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    return b.mod.MambaLM.from_pretrained(folder, dtype=dtype)


def ids_of(b, values):
    return b.asarray(np.asarray(values, dtype=np.int64))


def host(b, array) -> np.ndarray:
    return b.to_numpy(array)


def host_states(b, lm) -> dict:
    return {key: host(b, value) for key, value in lm.save_states().items()}


def assert_logits(ours, theirs, what: str, tol: float = LOGIT_TOL) -> float:
    error = rel_err(ours, np.asarray(theirs, dtype=np.float32))
    assert error <= tol, f"{what}: normwise relative error {error:.3g} > {tol:g}"
    return error


@pytest.fixture(params=BINDINGS)
def lm_binding(request):
    return get_binding(request.param)


# ----------------------------------------------------------------------------- transformers' numbers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_logits_of_the_prompt_are_transformers(lm_binding, folder, dtype):
    """The full-forward logits of the batch prompt and of the single one, by scan and by stepping."""
    b = lm_binding
    lm = load(b, folder, dtype)
    record = expected(folder)
    batch = np.asarray(record["batch"]["input_ids"])  # [2, 12]
    with torch.no_grad():
        scanned = host(b, lm.scan(ids_of(b, batch.T)))  # [12, 2, V]
        assert scanned.dtype == np.dtype(dtype)
        assert_logits(scanned.transpose(1, 0, 2), record["batch"]["logits"], "batch, scan")
        lm.zero_states()
        stepped = np.stack([host(b, lm(ids_of(b, column))) for column in batch.T])  # [12, 2, V]
        assert_logits(stepped.transpose(1, 0, 2), record["batch"]["logits"], "batch, steps")
        lm.zero_states()
        single = host(b, lm.scan(ids_of(b, record["single"]["input_ids"])[:, None]))[:, 0]  # [13, V]
        assert_logits(single, record["single"]["logits"], "single sequence, scan")


@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_greedy_decoding_is_transformers(lm_binding, folder):
    """generate's tokens, and the logits of each decoding step, from the held states."""
    b = lm_binding
    lm = load(b, folder)
    record = expected(folder)
    steps = record["max_new_tokens"]
    batch = record["batch"]
    new_ids = lm.generate(ids_of(b, batch["input_ids"]), steps)
    assert type(new_ids) is type(ids_of(b, [0])) and host(b, new_ids).tolist() == batch["greedy_ids"]
    # A flat list is one sequence.
    assert host(b, lm.generate(record["single"]["input_ids"], steps)).tolist() == [record["single"]["greedy_ids"]]
    # Each decoding step's logits: the prompt's last, then one step per greedy token.
    lm.zero_states()
    with torch.no_grad():
        logits = [host(b, lm.scan(ids_of(b, np.asarray(batch["input_ids"]).T)))[-1]]
        for column in np.asarray(batch["greedy_ids"]).T[:-1]:
            logits.append(host(b, lm(ids_of(b, column))))
    assert_logits(np.stack(logits), batch["greedy_step_logits"], "decoding steps")


# ----------------------------------------------------------------------------- scan and steps


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_scan_equals_stepping_and_continues_from_held_states(lm_binding, folder, dtype):
    """From held states (a prompt before), one scan, two scans and 20 steps give the same logits and states."""
    b = lm_binding
    lm = load(b, folder, dtype)
    rng = np.random.default_rng(3)
    before, ids = rng.integers(0, 100, (5, 3)), rng.integers(0, 100, (20, 3))
    runs = {}
    with torch.no_grad():
        for how in ("steps", "one scan", "two scans", "time last"):
            lm.zero_states()
            lm.scan(ids_of(b, before))
            if how == "steps":
                logits = np.stack([host(b, lm(ids_of(b, row))) for row in ids])
            elif how == "one scan":
                logits = host(b, lm.scan(ids_of(b, ids)))
            elif how == "two scans":
                logits = np.concatenate([host(b, lm.scan(ids_of(b, ids[:7]))), host(b, lm.scan(ids_of(b, ids[7:])))])
            else:
                logits = host(b, lm.scan(ids_of(b, ids.T), time_dim=1)).transpose(1, 0, 2)
            runs[how] = logits, host_states(b, lm)
    logits, states = runs.pop("steps")
    for how, (other, other_states) in runs.items():
        assert rel_err(other, logits) <= TOL[dtype], how
        assert other_states.keys() == states.keys()
        for key, value in states.items():
            assert rel_err(other_states[key], value) <= TOL[dtype], (how, key)


def test_pure_functions_are_the_bindings(lm_binding):
    """ssm_core.mamba_lm_scan / mamba_lm_step with the states as arguments give the binding's numbers."""
    b, dtype = lm_binding, "float64"
    lm = load(b, UNTIED, dtype)
    config = read_config(UNTIED)
    weights = read_weights(UNTIED, config, torch_backend if b.name == "torch" else b.mod.backend)
    flat = {k: b.asarray(host(b, v).astype(dtype)) for k, v in ssm_core.lm.flat_weights(weights).items()}
    mixer_keys = ssm_core.lm.mixer_config(config).param_shapes()
    params = ssm_core.MambaLMParams(
        flat["embedding"], flat["norm_f"], flat["lm_head"],
        tuple(flat[f"norms.{i}"] for i in range(config.num_hidden_layers)),
        tuple(ssm_core.Mamba.params_from_mapping({k: flat[f"layers.{i}.{k}"] for k in mixer_keys})
              for i in range(config.num_hidden_layers)),
    )
    ids = np.random.default_rng(4).integers(0, 100, (9, 2))
    xp = ssm_core.namespace(params.embedding)
    states = ssm_core.mamba_lm_zero_states(config, 2, xp, params.embedding.dtype, getattr(params.embedding, "device", None))
    logits, states = ssm_core.mamba_lm_scan(ids_of(b, ids[:6]), states, params, config)
    step_logits, states = ssm_core.mamba_lm_step(ids_of(b, ids[6]), states, params, config)
    with torch.no_grad():
        assert rel_err(host(b, logits), host(b, lm.scan(ids_of(b, ids[:6])))) <= TOL[dtype]
        assert rel_err(host(b, step_logits), host(b, lm(ids_of(b, ids[6])))) <= TOL[dtype]
    for index, state in enumerate(states):
        assert rel_err(host(b, state.ssm_state), host_states(b, lm)[f"layers.{index}.ssm_state"]) <= TOL[dtype]


# ----------------------------------------------------------------------------- generation


def test_sampling_is_seeded_the_same_on_every_backend(lm_binding):
    b = lm_binding
    lm = load(b, TIED)
    prompt = expected(TIED)["batch"]["input_ids"]
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=30, seed=5)
    first = host(b, lm.generate(prompt, **kwargs))
    assert first.shape == (2, 12)
    assert np.array_equal(host(b, lm.generate(prompt, **kwargs)), first)  # the seed, not the states, decides
    assert not np.array_equal(host(b, lm.generate(prompt, **{**kwargs, "seed": 6})), first)
    assert not np.array_equal(first[:, :10], expected(TIED)["batch"]["greedy_ids"])  # sampled, not greedy
    numpy_lm = load(get_binding("numpy"), TIED)
    assert np.array_equal(numpy_lm.generate(prompt, **kwargs), first)  # host uniforms: the same tokens everywhere
    top1 = host(b, lm.generate(prompt, max_new_tokens=10, temperature=2.0, top_k=1, seed=0))
    assert top1.tolist() == expected(TIED)["batch"]["greedy_ids"]  # top_k=1 is greedy at any temperature


def test_stream_yields_what_generate_returns(lm_binding):
    b = lm_binding
    lm = load(b, UNTIED)
    prompt = ids_of(b, expected(UNTIED)["batch"]["input_ids"])
    for kwargs in (dict(), dict(temperature=0.7, seed=1)):
        whole = host(b, lm.generate(prompt, 8, **kwargs))
        stream = lm.stream(prompt, 8, **kwargs)
        steps = [host(b, ids) for ids in stream]
        assert [s.shape for s in steps] == [(2,)] * 8
        assert np.array_equal(np.stack(steps, axis=1), whole)


def test_end_of_text_stops_a_sequence_and_then_generation():
    """eos_token_id given: a finished sequence continues with the pad id; generation ends once all are finished."""
    b = get_binding("numpy")
    lm = load(b, TIED)
    record = expected(TIED)["batch"]
    greedy = record["greedy_ids"]  # [[3, 66, 54, 54, 16, ...], [16, 16, ...]]
    eos = 16
    assert greedy[0].index(eos) == 4 and greedy[1][0] == eos
    out = lm.generate(record["input_ids"], 10, eos_token_id=eos)
    pad = read_config(TIED).pad_token_id
    assert out.tolist() == [greedy[0][:5], [eos] + [pad] * 4]
    assert lm.generate(record["input_ids"], 10, eos_token_id=[99, eos], pad_token_id=7).tolist() == [
        greedy[0][:5], [eos, 7, 7, 7, 7]]
    assert lm.generate(record["input_ids"], 10).tolist() == greedy  # None: no stopping
    assert lm.generate(record["input_ids"], 0).shape == (2, 0)


def test_generate_starts_from_zero_states_and_leaves_the_cache_of_its_tokens():
    b = get_binding("numpy")
    lm = load(b, TIED)
    prompt = np.asarray(expected(TIED)["batch"]["input_ids"])
    lm.scan(np.zeros((3, 2), np.int64))  # states that generate must not start from
    new = lm.generate(prompt, 5)
    held = host_states(b, lm)
    lm.zero_states()
    lm.scan(np.concatenate([prompt, new[:, :-1]], axis=1).T)  # the prompt and every new token but the last
    for key, value in host_states(b, lm).items():
        assert rel_err(held[key], value) <= TOL["float32"], key


# ----------------------------------------------------------------------------- states and weights


def test_states_save_and_load(lm_binding):
    b = lm_binding
    lm = load(b, TIED)
    rng = np.random.default_rng(8)
    with torch.no_grad():
        lm.scan(ids_of(b, rng.integers(0, 100, (6, 2))))
        saved = lm.save_states()
        assert sorted(saved) == [f"layers.{i}.{n}" for i in range(2) for n in ("conv_buffer", "ssm_state")]
        assert saved["layers.0.ssm_state"].shape == (2, 64, 16) and saved["layers.0.conv_buffer"].shape == (2, 64, 4)
        step = ids_of(b, rng.integers(0, 100, 2))
        after = host(b, lm(step))
        lm.scan(ids_of(b, rng.integers(0, 100, (4, 2))))
        lm.load_states(saved)
        assert np.array_equal(host(b, lm(step)), after)
        lm.zero_states()
        assert lm.save_states() == {}
        bad = dict(saved)
        bad["layers.1.ssm_state"] = bad["layers.1.ssm_state"][:1, ...]  # another batch than its layer's other state
        lm.load_states(saved)
        before = host_states(b, lm)
        with pytest.raises(ValueError):
            lm.load_states(bad)
        assert all(np.array_equal(v, before[k]) for k, v in host_states(b, lm).items())  # all or nothing
        with pytest.raises(ValueError, match="missing states"):
            lm.load_states({k: v for k, v in saved.items() if k != "layers.1.ssm_state"})


def test_weights_move_between_bindings(lm_binding):
    """A binding's model loads another's state_dict (torch's, here) and gives its logits."""
    b = lm_binding
    source = tt.ssm.MambaLM.from_pretrained(UNTIED)
    lm = lm_class(b)(read_config(UNTIED)) if b.name == "torch" else lm_class(b)(read_config(UNTIED), seed=0)
    lm.load_state_dict(source.state_dict())
    ids = np.random.default_rng(9).integers(0, 100, (5, 2))
    with torch.no_grad():
        assert rel_err(host(b, lm.scan(ids_of(b, ids))), source.scan(torch.from_numpy(ids))) <= TOL["float32"]


def test_a_fresh_model_has_the_checkpoints_shapes(lm_binding):
    b = lm_binding
    config = read_config(UNTIED)
    lm = lm_class(b)(config) if b.name == "torch" else lm_class(b)(config, seed=0)
    loaded = load(b, UNTIED)
    assert {k: tuple(v.shape) for k, v in lm.state_dict().items()} == {
        k: tuple(v.shape) for k, v in loaded.state_dict().items()} == ssm_core.lm.param_shapes(config)
    with torch.no_grad():
        assert host(b, lm(ids_of(b, [1, 2]))).shape == (2, 100)


def test_bfloat16_checkpoint(tmp_path):
    """bfloat16 weights: torch keeps them (computing in float32), NumPy widens them exactly; same logits."""
    from test_pretrained_loading import write_bfloat16_safetensors
    from safetensors.numpy import load_file

    (tmp_path / "config.json").write_text((TIED / "config.json").read_text())
    write_bfloat16_safetensors(tmp_path / "model.safetensors", load_file(TIED / "model.safetensors"))
    torch_lm = tt.ssm.MambaLM.from_pretrained(tmp_path)
    assert torch_lm.embedding.dtype == torch.bfloat16 and torch_lm.layers[0].A_log.dtype == torch.bfloat16
    numpy_lm = get_binding("numpy").mod.MambaLM.from_pretrained(tmp_path)
    assert numpy_lm.dtype == np.float32
    ids = np.asarray(expected(TIED)["batch"]["input_ids"]).T
    with torch.no_grad():
        theirs = torch_lm.scan(torch.from_numpy(ids))
    assert theirs.dtype == torch.float32  # half-precision models answer in float32
    # bfloat16 rounds each layer's input and output (eps 2**-8): a few of its units, relative.
    assert rel_err(numpy_lm.scan(ids), theirs) <= 4 * 2.0**-8


# ----------------------------------------------------------------------------- errors


def test_bad_ids_are_refused_and_change_nothing(lm_binding):
    b = lm_binding
    lm = load(b, TIED)
    with torch.no_grad():
        lm.scan(ids_of(b, [[1, 2], [3, 4]]))
    before = host_states(b, lm)
    floats = b.asarray(np.ones(2, np.float32))
    cases = [
        (lambda: lm(floats), TypeError, "expected integer token ids, got dtype"),
        (lambda: lm(ids_of(b, [[1, 2]])), ValueError, r"shape \[batch\], got shape \(1, 2\)"),
        (lambda: lm(ids_of(b, [1, 100])), ValueError, r"token ids must lie in \[0, 100\), got ids from 1 to 100"),
        (lambda: lm(ids_of(b, [-1, 3])), ValueError, r"\[0, 100\), got ids from -1 to 3"),
        (lambda: lm(ids_of(b, [1, 2, 3])), ValueError, r"batch 3, the held states of batch 2; call zero_states\(\)"),
        (lambda: lm.scan(ids_of(b, [1, 2])), ValueError, r"shape \[T, batch\] .*got shape \(2,\)"),
        (lambda: lm.scan(ids_of(b, [[1, 2]]), time_dim=2), ValueError, "time_dim=2 is out of range"),
        (lambda: lm.scan(ids_of(b, [[1, 2]]), time_dim=None), TypeError, "time_dim must be an int"),
        (lambda: lm([1, 2]), TypeError, "expected token ids as a"),
    ]
    for call, kind, words in cases:
        with torch.no_grad(), pytest.raises(kind, match=rf"MambaLM.*{words}"):
            call()
        now = host_states(b, lm)
        assert now.keys() == before.keys() and all(np.array_equal(now[k], before[k]) for k in before), words


def test_a_failure_inside_a_later_layer_leaves_every_layer_as_it_was(lm_binding, monkeypatch):
    b = lm_binding
    lm = load(b, TIED)
    with torch.no_grad():
        lm.scan(ids_of(b, [[1, 2], [3, 4]]))
    before = host_states(b, lm)
    discretized = ssm_core.selective.discretized
    calls = []

    def second_layer_fails(*args):  # the first layer's one step runs; the second layer's raises
        calls.append(None)
        if len(calls) % 2 == 0:
            raise RuntimeError("boom")
        return discretized(*args)

    monkeypatch.setattr(ssm_core.selective, "discretized", second_layer_fails)
    for call in (lambda: lm(ids_of(b, [5, 6])), lambda: lm.scan(ids_of(b, [[5, 6]]))):
        with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
            call()
        now = host_states(b, lm)
        assert all(np.array_equal(now[k], before[k]) for k in before)  # the first layer had stepped: put back


def test_bad_generation_arguments():
    lm = load(get_binding("numpy"), TIED)
    cases = [
        (dict(prompt_ids=[[1, 2], [3]]), ValueError, "prompt_ids must be"),
        (dict(prompt_ids=[[1.0, 2.0]]), TypeError, "integer token ids in prompt_ids, got dtype float64"),
        (dict(prompt_ids=[[]]), ValueError, r"T >= 1"),
        (dict(prompt_ids=[[1, 100]]), ValueError, r"\[0, 100\), got ids from 1 to 100"),
        (dict(prompt_ids=np.ones((1, 2, 3), np.int64)), ValueError, r"got shape \(1, 2, 3\)"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0"),
        (dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be an int >= 0"),
        (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k must be an int >= 1 or None"),
        (dict(seed=1.5), ValueError, "seed must be"),
        (dict(eos_token_id="x"), ValueError, "eos_token_id must be None, a token id or a list"),
        (dict(eos_token_id=5, pad_token_id=100), ValueError, "pad_token_id must be below the vocabulary size 100"),
        (dict(eos_token_id=[5, 100]), ValueError, "eos_token_id must be below the vocabulary size 100"),
    ]
    for changes, kind, words in cases:
        kwargs = {"prompt_ids": [[1, 2]], "max_new_tokens": 3, **changes}
        with pytest.raises(kind, match=rf"MambaLM.generate: .*{words}"):
            lm.generate(**kwargs)
        with pytest.raises(kind, match=rf"MambaLM.generate: .*{words}"):
            lm.stream(**kwargs)  # checked at once, before the first step


# ----------------------------------------------------------------------------- checkpoints


def test_from_pretrained_needs_a_directory_or_the_hub(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="MambaLM.from_pretrained: no checkpoint directory"):
        tt.ssm.MambaLM.from_pretrained(tmp_path / "absent")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match="state-spaces/mamba-130m-hf.*pip install huggingface_hub"):
        get_binding("numpy").mod.MambaLM.from_pretrained("state-spaces/mamba-130m-hf")
    asked = []

    def snapshot_download(repo_id, allow_patterns):  # stands in for the hub: nothing reaches the network
        asked.append((repo_id, allow_patterns))
        return str(UNTIED)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    lm = tt.ssm.MambaLM.from_pretrained("someone/untied-bias", dtype="float64")
    assert asked == [("someone/untied-bias", ["*.json", "*.safetensors"])]
    assert lm.embedding.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        tt.ssm.MambaLM.from_pretrained(UNTIED, dtype="int64")


def test_layers_are_mamba_with_the_checkpoints_options():
    lm = tt.ssm.MambaLM.from_pretrained(UNTIED)
    config = read_config(UNTIED)
    assert isinstance(lm, tt.Model) and len(lm.layers) == 2
    layer = lm.layers[0]
    assert isinstance(layer, tt.ssm.Mamba)
    assert (layer.config.expand, layer.config.discretization, layer.config.residual) == (2, "euler", False)
    assert (layer.config.bias, layer.config.conv_bias, layer.config.dt_rank) == (True, False, config.time_step_rank)
    assert lm.lm_head is not None and tt.ssm.MambaLM.from_pretrained(TIED).lm_head is None
    with torch.no_grad():  # tt.Model's sequence mode runs the model as a scan
        ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
        lm.zero_states()
        scanned = lm.scan(ids)
        lm.zero_states()
        with tt.sequence_mode(lm):
            in_mode = lm(ids)
    assert torch.equal(scanned, in_mode)


# ----------------------------------------------------------------------------- live, against transformers


@pytest.mark.parametrize("use_bias, use_conv_bias, tied", [(False, True, True), (True, False, False)])
def test_live_against_transformers(tmp_path, monkeypatch, use_bias, use_conv_bias, tied):
    """A random tiny MambaForCausalLM, saved and loaded here: its logits and its greedy tokens."""
    transformers = pytest.importorskip("transformers", reason="the live comparison needs transformers: pip install transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, state_size=8, expand=2, conv_kernel=3,
        time_step_rank="auto", use_bias=use_bias, use_conv_bias=use_conv_bias, tie_word_embeddings=tied,
    )
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # no default value (zero bias, unit norm) hides a misread one
            param.add_(0.1 * torch.randn(param.shape) * (param.std() if param.numel() > 1 else 1.0))
            if name.endswith("out_proj.weight"):
                param.mul_(4.0)  # the mixers' outputs count on the residual path
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(ids, use_cache=False).logits.float().numpy()
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                eos_token_id=[], pad_token_id=0)[:, ids.shape[1]:]
    for name in ("torch", "numpy"):
        b = get_binding(name)
        lm = load(b, tmp_path)
        with torch.no_grad():
            ours = host(b, lm.scan(ids_of(b, ids.numpy().T))).transpose(1, 0, 2)
        assert_logits(ours, theirs, f"{name} live logits")
        assert host(b, lm.generate(ids_of(b, ids.numpy()), 12)).tolist() == greedy.tolist(), name
