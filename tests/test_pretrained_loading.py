"""Reading Mamba checkpoints (ssm_core.pretrained): configs, weights in every layout, and what they mean.

The checkpoints in tests/fixtures/hf/ were written by transformers' save_pretrained, with its float32
outputs beside them (make_fixtures.py there). A float64 NumPy model of transformers' MambaForCausalLM,
fed with what read_weights returns, reproduces those outputs: that pins down the renaming, the
orientation of the conv kernel and the order of the x_proj split (dt, B, C). The pieces of ssm_core's
Mamba (its causal conv and its selective core) are then checked against that model with the same weights.
"""

import importlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ssm_core
from ssm_core.lm import flat_weights
from ssm_core.pretrained import MIXER_KEYS, MambaLMConfig, read_config, read_weights

FRAMEWORKS = ("numpy", "torch", "mlx", "cupy", "array_api_strict")
# The module whose Backend reads each framework's arrays.
_BACKEND_MODULES = {"torch": "tracetorch.ssm._backend"}


def backend_of(framework):
    """The Backend that reads ``framework``'s arrays."""
    return importlib.import_module(_BACKEND_MODULES.get(framework, f"backends.{framework}")).backend

# The reader's own dependency; the config tests need only the standard library.
requires_safetensors = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None, reason="reading weights needs safetensors: pip install safetensors"
)

ROOT = Path(__file__).resolve().parents[1]
HF_FIXTURES = ROOT / "tests" / "fixtures" / "hf"
TIED = HF_FIXTURES / "tied-convbias"
UNTIED = HF_FIXTURES / "untied-bias"
CHECKPOINTS = [pytest.param(TIED, id="tied-convbias"), pytest.param(UNTIED, id="untied-bias")]

# transformers computed the fixtures in float32; the reference below runs in float64. Their gap is
# transformers' own float32 rounding through two layers, measured at most 4e-7 of the largest value
# (about 3.5 float32 ulps); 16 ulps of float32 bounds it with room to spare and still fails at once
# on a misread weight (an error of order 1).
TOLERANCE = 16 * float(np.finfo(np.float32).eps)


def expected(folder: Path) -> dict:
    return json.loads((folder / "expected.json").read_text())


def assert_close(ours, theirs, what: str):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    scale = np.abs(theirs).max()
    error = np.abs(ours - theirs).max()
    assert error <= TOLERANCE * scale, f"{what}: max error {error:.3g}, {error / scale:.3g} of the largest value"


# ----------------------------------------------------------------------------- a NumPy model of transformers'


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight  # [..., N]


def silu(x):
    return x / (1.0 + np.exp(-x))


def linear(x, params, name):
    y = x @ params[f"{name}.weight"].T  # [..., out]
    bias = params.get(f"{name}.bias")
    return y if bias is None else y + bias


def mixer_reference(x, params, config: MambaLMConfig, state=None):
    """transformers' MambaMixer on ``x`` ``[T, B, hidden]``, from ``params`` under our names.

    ``state``: ``(h [B, inner, d], the last K - 1 conv inputs [K - 1, B, inner])``, zeros when None.
    Returns ``(y [T, B, hidden], state after)``. Euler ``B``, no residual: the checkpoint's block.
    """
    inner, R, d, K = config.intermediate_size, config.time_step_rank, config.state_size, config.conv_kernel
    T, B = x.shape[:2]
    h = np.zeros((B, inner, d)) if state is None else state[0]
    past = np.zeros((K - 1, B, inner)) if state is None else state[1]
    xz = linear(x, params, "in_proj")  # [T, B, 2 inner]
    u, gate = xz[..., :inner], xz[..., inner:]  # main branch first, then the gate
    window = np.concatenate([past, u])  # [K - 1 + T, B, inner]
    # Causal conv written out: tap k meets the input K - 1 - k steps back.
    conv = sum(window[k : k + T] * params["conv_weights"][:, k] for k in range(K))  # [T, B, inner]
    u = silu(conv + params.get("conv_bias", 0.0))  # [T, B, inner]
    proj = u @ params["ssm_proj.weight"].T  # [T, B, R + 2d]
    dt_low, B_in, C_out = proj[..., :R], proj[..., R : R + d], proj[..., R + d :]
    dt = np.logaddexp(linear(dt_low, params, "dt_proj"), 0.0)  # softplus: [T, B, inner]
    A = -np.exp(params["A_log"])  # [inner, d]
    ys = []
    for t in range(T):
        h = np.exp(dt[t][..., None] * A) * h + (dt[t] * u[t])[..., None] * B_in[t][:, None, :]  # [B, inner, d]
        ys.append(np.sum(h * C_out[t][:, None, :], axis=-1) + params["D"] * u[t])  # [B, inner]
    y = np.stack(ys) * silu(gate)  # [T, B, inner]
    return linear(y, params, "out_proj"), (h, window[T:])


def lm_reference(weights, config: MambaLMConfig, ids, states=None):
    """Logits ``[T, B, vocab]`` of ``ids`` ``[T, B]`` and the layers' states after them."""
    x = weights["embedding"][ids]  # [T, B, hidden]
    after = []
    for index, layer in enumerate(weights["layers"]):
        normed = rms_norm(x, layer["norm"], config.layer_norm_epsilon)
        y, state = mixer_reference(normed, layer["mixer"], config, None if states is None else states[index])
        x = x + y
        after.append(state)
    head = weights["embedding"] if weights["lm_head"] is None else weights["lm_head"]
    return rms_norm(x, weights["norm_f"], config.layer_norm_epsilon) @ head.T, after


def greedy_reference(weights, config, prompt, steps):
    """Greedy decoding of ``prompt`` ``[T, B]``: ``(new ids [steps, B], logits of each step [steps, B, vocab])``."""
    logits, states = lm_reference(weights, config, prompt)
    step_logits = [logits[-1]]
    for _ in range(steps - 1):
        logits, states = lm_reference(weights, config, step_logits[-1].argmax(-1)[None], states)
        step_logits.append(logits[-1])
    step_logits = np.stack(step_logits)
    return step_logits.argmax(-1), step_logits


def as_float64(weights):
    def cast(a):
        return None if a is None else np.asarray(a, dtype=np.float64)

    return {
        "embedding": cast(weights["embedding"]),
        "norm_f": cast(weights["norm_f"]),
        "lm_head": cast(weights["lm_head"]),
        "layers": [
            {"norm": cast(layer["norm"]), "mixer": {k: cast(v) for k, v in layer["mixer"].items()}}
            for layer in weights["layers"]
        ],
    }


# ----------------------------------------------------------------------------- the fixtures' meaning


@requires_safetensors
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_weights_reproduce_transformers_logits(folder):
    config = read_config(folder)
    weights = as_float64(read_weights(folder, config))
    record = expected(folder)
    batch = np.asarray(record["batch"]["input_ids"]).T  # [T, B]
    logits, _ = lm_reference(weights, config, batch)
    assert_close(logits.transpose(1, 0, 2), record["batch"]["logits"], "batch logits")
    single = np.asarray(record["single"]["input_ids"])[:, None]  # [T, 1]
    logits, _ = lm_reference(weights, config, single)
    assert_close(logits[:, 0], record["single"]["logits"], "single-sequence logits")


@requires_safetensors
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_weights_reproduce_transformers_greedy_decoding(folder):
    """Prefill, then one token at a time from the held states: transformers' cached generate."""
    config = read_config(folder)
    weights = as_float64(read_weights(folder, config))
    record = expected(folder)
    steps = record["max_new_tokens"]
    new_ids, step_logits = greedy_reference(weights, config, np.asarray(record["batch"]["input_ids"]).T, steps)
    assert new_ids.T.tolist() == record["batch"]["greedy_ids"]
    assert_close(step_logits, record["batch"]["greedy_step_logits"], "batch step logits")
    new_ids, step_logits = greedy_reference(weights, config, np.asarray(record["single"]["input_ids"])[:, None], steps)
    assert new_ids[:, 0].tolist() == record["single"]["greedy_ids"]
    assert_close(step_logits[:, 0], record["single"]["greedy_step_logits"], "single-sequence step logits")


@requires_safetensors
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_mixer_pieces_match_transformers(folder):
    """Layer 0's mixer, piece by piece: in_proj, the conv (after SiLU), x_proj and the output."""
    config = read_config(folder)
    params = as_float64(read_weights(folder, config))["layers"][0]["mixer"]
    record = expected(folder)["mixer"]
    x = np.asarray(record["input"], dtype=np.float64)[0]  # [T, hidden]
    inner = config.intermediate_size
    xz = linear(x, params, "in_proj")
    assert_close(xz, record["in_proj_out"][0], "in_proj")
    u = np.asarray(record["in_proj_out"][0], dtype=np.float64)[:, None, :inner]  # [T, 1, inner], theirs
    conv, _ = ssm_core.causal_conv_scan(
        u, np.zeros((1, inner, config.conv_kernel)), params["conv_weights"], params.get("conv_bias", 0.0), np
    )
    assert_close(silu(conv[:, 0]), record["x_proj_in"][0], "causal conv (ssm_core.causal_conv_scan) + SiLU")
    buffer = np.zeros((1, inner, config.conv_kernel))
    for t in range(u.shape[0]):
        out, buffer = ssm_core.causal_conv_step(u[t], buffer, params["conv_weights"], params.get("conv_bias", 0.0), np)
        assert_close(silu(out[0]), record["x_proj_in"][0][t], f"causal conv step {t} (ssm_core.causal_conv_step)")
    proj = np.asarray(record["x_proj_in"][0], dtype=np.float64) @ params["ssm_proj.weight"].T
    assert_close(proj, record["x_proj_out"][0], "x_proj")
    y, _ = mixer_reference(x[:, None], params, config)
    assert_close(y[:, 0], record["output"][0], "mixer output")


@requires_safetensors
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_ssm_core_selective_core_reads_ssm_proj_as_the_checkpoint_does(folder):
    """ssm_core's selective step, given ssm_proj.weight and dt_proj, is the reference's (dt, B, C) split.

    ssm_core's step holds B by a zero-order hold, the checkpoint's by Euler (B_bar = dt * B): the two
    agree when A tends to 0 (A_log = -60: exp(dt A) = 1 and expm1(dt A) / A = dt in float64). With
    that A the whole mixer, ssm_core's pieces against the reference, must agree over several steps,
    where B (written into the state) and C (reading it later) are no longer interchangeable.
    """
    config = read_config(folder)
    params = as_float64(read_weights(folder, config))["layers"][0]["mixer"]
    params = dict(params, A_log=np.full_like(params["A_log"], -60.0))
    x = np.asarray(expected(folder)["mixer"]["input"], dtype=np.float64)[0][:, None]  # [T, 1, hidden]
    inner = config.intermediate_size
    want, _ = mixer_reference(x, params, config)

    xz = linear(x, params, "in_proj")  # [T, 1, 2 inner]
    u, gate = xz[..., :inner], xz[..., inner:]
    conv, _ = ssm_core.causal_conv_scan(
        u, np.zeros((1, inner, config.conv_kernel)), params["conv_weights"], params.get("conv_bias", 0.0), np
    )
    u = silu(conv)
    decay = ssm_core.selective_decay(params["A_log"], np)
    h = np.zeros((1, inner, config.state_size))
    ys = []
    for t in range(x.shape[0]):
        y, h = ssm_core.selective_step(
            u[t], h, params["ssm_proj.weight"], params["dt_proj.weight"], params["dt_proj.bias"], decay, params["D"], np
        )
        ys.append(y)
    ours = linear(np.stack(ys) * silu(gate), params, "out_proj")
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-12 * np.abs(want).max())  # float64 against float64
    # The check has teeth: the (dt, B, C) rows with B and C swapped give another output.
    d, R = config.state_size, config.time_step_rank
    W = params["ssm_proj.weight"]
    swapped = dict(params, **{"ssm_proj.weight": np.concatenate([W[:R], W[R + d :], W[R : R + d]])})
    other, _ = mixer_reference(x, swapped, config)
    assert np.abs(other - want).max() > 1e-3 * np.abs(want).max()


@requires_safetensors
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_live_against_transformers(folder, monkeypatch):
    """When transformers is installed: its MambaForCausalLM, loaded from the fixture folder, on a new prompt.

    Longer than the recorded prompts (40 steps, so the conv window and the state carry far), with the
    mixers checked one by one on their own inputs too.
    """
    transformers = pytest.importorskip("transformers", reason="the live comparison needs transformers: pip install transformers")
    torch = pytest.importorskip("torch", reason="the live comparison needs torch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch
    model = transformers.MambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = read_config(folder)
    weights = as_float64(read_weights(folder, config))
    ids = np.random.default_rng(7).integers(0, config.vocab_size, size=(3, 40))
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    ours, _ = lm_reference(weights, config, ids.T)
    assert_close(ours.transpose(1, 0, 2), theirs, "live logits")
    x = np.random.default_rng(8).standard_normal((2, 40, config.hidden_size)).astype(np.float32)
    for index, layer in enumerate(model.backbone.layers):
        with torch.no_grad():
            theirs = layer.mixer(torch.from_numpy(x)).numpy()
        ours, _ = mixer_reference(x.transpose(1, 0, 2).astype(np.float64), weights["layers"][index]["mixer"], config)
        assert_close(ours.transpose(1, 0, 2), theirs, f"live mixer {index}")


def test_fixtures_say_what_wrote_them_and_are_small():
    for folder in (TIED, UNTIED):
        written_by = expected(folder)["written_by"]
        assert {"transformers", "torch", "safetensors"} <= set(written_by), written_by
    size = sum(p.stat().st_size for p in HF_FIXTURES.rglob("*") if p.is_file())
    assert size < 1024 * 1024, size


def test_fixture_tokenizer_encodes_the_recorded_prompts():
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(TIED / "tokenizer.json"))
    record = expected(TIED)
    assert [tokenizer.encode(text).ids for text in record["batch"]["texts"]] == record["batch"]["input_ids"]
    assert tokenizer.encode(record["single"]["text"]).ids == record["single"]["input_ids"]
    assert tokenizer.decode(record["single"]["input_ids"]) == record["single"]["text"]
    assert tokenizer.get_vocab_size() <= read_config(TIED).vocab_size


# ----------------------------------------------------------------------------- config


def test_read_config_of_the_fixtures():
    tied = read_config(TIED)
    assert (tied.hidden_size, tied.num_hidden_layers, tied.vocab_size, tied.state_size) == (32, 2, 100, 16)
    assert (tied.expand, tied.intermediate_size, tied.conv_kernel) == (2, 64, 4)
    assert tied.time_step_rank == 2  # "auto": ceil(32 / 16)
    assert (tied.use_bias, tied.use_conv_bias, tied.tie_word_embeddings, tied.residual_in_fp32) == (False, True, True, True)
    assert tied.layer_norm_epsilon == 1e-5 and tied.eos_token_id == 0 and tied.dtype == "float32"
    assert tied.source == "transformers"
    untied = read_config(UNTIED)
    assert (untied.hidden_size, untied.intermediate_size, untied.state_size, untied.time_step_rank) == (48, 96, 8, 4)
    assert (untied.use_bias, untied.use_conv_bias, untied.tie_word_embeddings) == (True, False, False)
    assert untied.layer_norm_epsilon == 1e-6
    assert untied.mixer_kwargs() == {
        "d_state": 8, "dt_rank": 4, "conv_kernel": 4, "expand": 2, "bias": True, "conv_bias": False,
        "residual": False, "discretization": "euler",
    }


def edited_config(tmp_path, source=TIED, drop=(), **changes):
    raw = json.loads((source / "config.json").read_text())
    for key in drop:
        raw.pop(key)
    raw.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"model_type": "mamba2"}, "model_type = 'mamba2'"),
        ({"model_type": "falcon_mamba"}, "model_type = 'falcon_mamba'"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"intermediate_size": 96}, "intermediate_size = 96"),
        ({"expand": 1.5}, "expand = 1.5"),
        ({"conv_kernel": 1}, "conv_kernel = 1"),
        ({"time_step_rank": "big"}, "time_step_rank = 'big'"),
        ({"hidden_size": "32"}, "hidden_size = '32'"),
        ({"state_size": 0}, "state_size = 0"),
        ({"num_hidden_layers": True}, "num_hidden_layers = True"),
        ({"use_bias": "yes"}, "use_bias = 'yes'"),
        ({"tie_word_embeddings": None}, "tie_word_embeddings = None"),
        ({"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon = -1e-05"),
        ({"eos_token_id": "</s>"}, "eos_token_id = '</s>'"),
    ],
)
def test_read_config_rejects_what_it_cannot_compute(tmp_path, changes, field):
    edited_config(tmp_path, **changes)
    with pytest.raises(ValueError, match="read_config") as error:
        read_config(tmp_path)
    assert field in str(error.value)
    assert "supported" in str(error.value) or "disagrees" in str(error.value)  # what it accepts


def test_read_config_defaults_and_ignored_fields(tmp_path):
    # Absent fields take transformers' defaults; init-only fields and alternative algorithms change nothing.
    edited_config(
        tmp_path, drop=("expand", "time_step_rank", "use_bias", "intermediate_size", "hidden_act", "dtype"),
        time_step_min=0.01, rescale_prenorm_residual=True, use_mambapy=True, use_associative_scan=False,
        initializer_range=3.0, hidden_size=40, torch_dtype="bfloat16",
    )
    config = read_config(tmp_path)
    assert config.expand == 2 and config.use_bias is False
    assert config.time_step_rank == 3  # ceil(40 / 16), not 40 // 16
    assert config.dtype == "bfloat16"  # transformers 4's name for it
    edited_config(tmp_path, expand=2.0, eos_token_id=[0, 1])
    assert read_config(tmp_path).expand == 2 and read_config(tmp_path).eos_token_id == (0, 1)


def test_read_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        read_config(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "weights.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="is a file"):
        read_config(tmp_path / "weights.txt")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"n_embd": 32}')
    with pytest.raises(ValueError, match="not a Mamba config"):
        read_config(tmp_path)


MAMBA_SSM_CONFIG = {  # the tied fixture, as mamba-ssm's MambaLMHeadModel would describe it
    "d_model": 32, "n_layer": 2, "vocab_size": 98, "ssm_cfg": {"d_state": 16, "d_conv": 4, "expand": 2},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 4,
    "tie_embeddings": True,
}


def mamba_ssm_checkpoint(folder: Path, lm_head=None, *, binary=False, **config_changes) -> Path:
    """The tied fixture saved as mamba-ssm does: its config and key names, and the tied head as a tensor of its own."""
    from safetensors.numpy import load_file, save_file

    tensors = {key.replace("embeddings.", "embedding."): value for key, value in load_file(TIED / "model.safetensors").items()}
    tensors["lm_head.weight"] = tensors["backbone.embedding.weight"].copy() if lm_head is None else lm_head
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**MAMBA_SSM_CONFIG, **config_changes}))
    if binary:
        torch = pytest.importorskip("torch", reason="pip install torch")
        torch.save({key: torch.from_numpy(value) for key, value in tensors.items()}, folder / "pytorch_model.bin")
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


@requires_safetensors
def test_mamba_ssm_config_and_names(tmp_path):
    folder = mamba_ssm_checkpoint(tmp_path / "mamba-ssm")
    config = read_config(folder)
    hf = read_config(TIED)
    assert config.source == "mamba_ssm"
    assert config.vocab_size == 100  # 98 padded to a multiple of 4
    same = ("hidden_size", "num_hidden_layers", "vocab_size", "state_size", "expand", "conv_kernel", "time_step_rank",
            "use_bias", "use_conv_bias", "layer_norm_epsilon", "tie_word_embeddings", "residual_in_fp32")
    assert {f: getattr(config, f) for f in same} == {f: getattr(hf, f) for f in same}
    ours, theirs = read_weights(folder, config), read_weights(TIED, hf)
    assert ours["lm_head"] is None  # tied: the saved copy is the embedding
    assert_same_weights(ours, theirs)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"rms_norm": False}, "rms_norm = False"),
        ({"d_intermediate": 64}, "d_intermediate = 64"),
        ({"attn_layer_idx": [1]}, "attn_layer_idx = [1]"),
        ({"ssm_cfg": {"layer": "Mamba2"}}, "layer = 'Mamba2'"),
        ({"ssm_cfg": {"headdim": 64}}, "'headdim'"),
        ({"ssm_cfg": {"d_conv": 1}}, "d_conv = 1"),
        ({"ssm_cfg": {"expand": 0}}, "expand = 0"),
        ({"residual_in_fp32": "yes"}, "residual_in_fp32 = 'yes'"),
        ({"some_new_option": 1}, "'some_new_option'"),
    ],
)
def test_mamba_ssm_config_errors(tmp_path, changes, field):
    (tmp_path / "config.json").write_text(json.dumps({**MAMBA_SSM_CONFIG, **changes}))
    with pytest.raises(ValueError, match="read_config") as error:
        read_config(tmp_path)
    assert field in str(error.value) and "supported" in str(error.value)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in MAMBA_SSM_CONFIG.items() if k != "n_layer"}))
    with pytest.raises(ValueError, match="n_layer is missing"):
        read_config(tmp_path)


# ----------------------------------------------------------------------------- weights


def flat(weights) -> dict:
    """``{name: array}`` of read_weights' result."""
    return flat_weights(weights)


def to_numpy(array):
    if type(array).__module__.startswith("torch"):
        return array.numpy()
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def assert_same_weights(ours, theirs):
    ours, theirs = flat(ours), flat(theirs)
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = to_numpy(ours[key]), to_numpy(theirs[key])
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key


@requires_safetensors
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_read_weights_renames_and_reshapes(folder):
    from safetensors.numpy import load_file

    stored = load_file(folder / "model.safetensors")
    config = read_config(folder)
    weights = read_weights(folder, config)
    shapes = config.param_shapes()
    assert len(weights["layers"]) == config.num_hidden_layers
    assert np.array_equal(weights["embedding"], stored["backbone.embeddings.weight"])
    assert np.array_equal(weights["norm_f"], stored["backbone.norm_f.weight"])
    if config.tie_word_embeddings:
        assert weights["lm_head"] is None and "lm_head.weight" not in stored
    else:
        assert np.array_equal(weights["lm_head"], stored["lm_head.weight"])
    for index, layer in enumerate(weights["layers"]):
        prefix = f"backbone.layers.{index}."
        assert np.array_equal(layer["norm"], stored[prefix + "norm.weight"])
        assert list(layer["mixer"]) == list(shapes["mixer"])
        for theirs, ours in MIXER_KEYS.items():
            if prefix + "mixer." + theirs not in stored:
                assert ours not in layer["mixer"], ours  # a bias the config does not have
                continue
            value = stored[prefix + "mixer." + theirs]
            if theirs == "conv1d.weight":  # [inner, 1, K] -> [inner, K], taps in the same order
                value = value[:, 0, :]
            assert layer["mixer"][ours].shape == shapes["mixer"][ours]
            assert np.array_equal(layer["mixer"][ours], value), ours
    assert ("conv_bias" in weights["layers"][0]["mixer"]) == config.use_conv_bias
    assert ("in_proj.bias" in weights["layers"][0]["mixer"]) == config.use_bias


def _framework_reason(framework):
    if framework == "cupy":
        import backends

        return backends.available().get("cupy")
    module = {"mlx": "mlx.core"}.get(framework, framework)
    try:
        __import__(module)
    except ImportError:
        return f"pip install {framework}"
    return None


@requires_safetensors
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_each_framework_gets_its_own_arrays(folder, framework):
    reason = _framework_reason(framework)
    if reason:
        pytest.skip(f"{framework} is not usable here: {reason}")
    weights = read_weights(folder, backend=backend_of(framework))  # the config read from the folder
    module = {"numpy": "numpy", "torch": "torch", "mlx": "mlx", "cupy": "cupy", "array_api_strict": "array_api_strict"}
    for key, value in flat(weights).items():
        assert type(value).__module__.partition(".")[0] == module[framework], (key, type(value))
    assert_same_weights(weights, read_weights(folder, backend=backend_of("numpy")))  # float32 kept, same values


def write_sharded(source: Path, folder: Path, shards: int = 3, framework: str = "numpy") -> dict:
    """``source``'s weights split over ``shards`` safetensors files with their index; returns the weight_map."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    folder.mkdir(exist_ok=True)
    shutil.copy(source / "config.json", folder)
    keys = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: tensors[key] for key in keys[index::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(value.nbytes for value in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json))
    return weight_map


@requires_safetensors
@pytest.mark.parametrize("framework", ["numpy", "torch", "mlx"])
@pytest.mark.parametrize("folder", CHECKPOINTS)
def test_sharded_checkpoint(tmp_path, folder, framework):
    reason = _framework_reason(framework)
    if reason:
        pytest.skip(f"{framework} is not usable here: {reason}")
    write_sharded(folder, tmp_path / "sharded")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert_same_weights(read_weights(tmp_path / "sharded", backend=backend_of(framework)), read_weights(folder, backend=backend_of(framework)))


@requires_safetensors
def test_sharded_checkpoint_errors(tmp_path):
    folder = tmp_path / "sharded"
    weight_map = write_sharded(TIED, folder)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = next(iter(weight_map))
    other = next(name for name in set(weight_map.values()) if name != weight_map[key])
    index_file.write_text(json.dumps({"weight_map": {**weight_map, key: other}}))
    with pytest.raises(ValueError, match=f"puts tensor '{key}' in '{other}'"):
        read_weights(folder)
    index_file.write_text(json.dumps({"weight_map": {**weight_map, "backbone.extra": other}}))
    with pytest.raises(ValueError, match="'backbone.extra'.*is in no shard"):
        read_weights(folder)
    index_file.write_text(json.dumps({"weight_map": {**weight_map, key: "shards/model.safetensors"}}))
    with pytest.raises(ValueError, match="not a plain file name"):
        read_weights(folder)
    index_file.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="weight_map"):
        read_weights(folder)
    index_file.write_text(json.dumps(index))
    (folder / other).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard '{other}'"):
        read_weights(folder)


@requires_safetensors
def test_pytorch_model_bin_is_read_for_torch_only(tmp_path):
    torch = pytest.importorskip("torch", reason="pip install torch")
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(UNTIED / "config.json", folder)
    torch.save(load_file(UNTIED / "model.safetensors"), folder / "pytorch_model.bin")
    weights = read_weights(folder, backend=backend_of("torch"))
    assert isinstance(weights["embedding"], torch.Tensor)
    assert_same_weights(weights, read_weights(UNTIED, backend=backend_of("torch")))
    for framework in ("numpy", "mlx", "array_api_strict"):
        with pytest.raises(ValueError, match="only pytorch_model.bin, a torch pickle, which needs torch"):
            read_weights(folder, backend=backend_of(framework))


@requires_safetensors
def test_mamba_ssm_pytorch_model_bin(tmp_path):
    folder = mamba_ssm_checkpoint(tmp_path / "mamba-ssm", binary=True)
    assert_same_weights(read_weights(folder, backend=backend_of("torch")), read_weights(TIED, backend=backend_of("torch")))


@requires_safetensors
def test_tied_head_that_differs_from_the_embedding_is_an_error(tmp_path):
    from safetensors.numpy import load_file

    embedding = load_file(TIED / "model.safetensors")["backbone.embeddings.weight"]
    folder = mamba_ssm_checkpoint(tmp_path / "mamba-ssm", lm_head=embedding + 1.0)
    with pytest.raises(ValueError, match="lm_head.weight .* differs"):
        read_weights(folder)
    # Untied, the same file is a model with its own head.
    folder = mamba_ssm_checkpoint(tmp_path / "mamba-ssm", lm_head=embedding + 1.0, tie_embeddings=False)
    assert np.array_equal(read_weights(folder)["lm_head"], embedding + 1.0)


def edited_weights(tmp_path, source=TIED, drop=(), **changes) -> Path:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    for key in drop:
        tensors.pop(key)
    tensors.update(changes)
    shutil.copy(source / "config.json", tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(drop=["backbone.layers.1.mixer.x_proj.weight"]), "'backbone.layers.1.mixer.x_proj.weight' is missing"),
        (dict(drop=["backbone.layers.0.norm.weight"]), "'backbone.layers.0.norm.weight' is missing"),
        (dict(drop=["backbone.embeddings.weight"]), "'backbone.embeddings.weight .*' is missing"),
        (dict(drop=["lm_head.weight"], source=UNTIED), "'lm_head.weight .*tie_word_embeddings=false.*' is missing"),
        ({"backbone.layers.0.mixer.extra": np.zeros(3, np.float32)}, "unknown tensor 'backbone.layers.0.mixer.extra'"),
        ({"backbone.layers.2.norm.weight": np.zeros(32, np.float32)}, "'backbone.layers.2.norm.weight'.*2 layers"),
        ({"backbone.layers.0.mixer.in_proj.bias": np.zeros(128, np.float32)}, "in_proj.bias.*use_bias=False"),
        ({"backbone.embedding.weight": np.zeros((100, 32), np.float32)}, "two embeddings"),
        (
            {"backbone.layers.0.mixer.conv1d.weight": np.zeros((64, 4), np.float32)},
            r"'backbone.layers.0.mixer.conv1d.weight' .* shape \(64, 4\); the config gives \(64, 1, 4\)",
        ),
        (
            {"backbone.layers.1.mixer.x_proj.weight": np.zeros((64, 34), np.float32)},
            r"x_proj.weight' .* shape \(64, 34\); the config gives \(34, 64\)",
        ),
    ],
)
@requires_safetensors
def test_read_weights_errors_name_the_tensor(tmp_path, edit, message):
    edit = dict(edit)
    folder = edited_weights(tmp_path, source=edit.pop("source", TIED), drop=edit.pop("drop", ()), **edit)
    with pytest.raises(ValueError, match=f"read_weights: .*{message}"):
        read_weights(folder)


def test_read_weights_argument_and_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        read_weights(tmp_path / "absent")
    shutil.copy(TIED / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        read_weights(tmp_path)


def write_bfloat16_safetensors(file: Path, tensors: dict) -> dict:
    """``tensors`` (float32) stored as bfloat16 (their top 16 bits), by hand; returns the float32 values kept."""
    header, blobs, offset, kept = {"__metadata__": {"format": "pt"}}, [], 0, {}
    for key, value in tensors.items():
        top = (np.ascontiguousarray(value, dtype="<f4").view("<u4") >> 16).astype("<u2")
        kept[key] = (top.astype(np.uint32) << 16).view(np.float32)
        blobs.append(top.tobytes())
        header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
        offset += len(blobs[-1])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return kept


@requires_safetensors
@pytest.mark.parametrize("framework", ["numpy", "torch", "mlx", "array_api_strict"])
def test_bfloat16_weights(tmp_path, framework):
    reason = _framework_reason(framework)
    if reason:
        pytest.skip(f"{framework} is not usable here: {reason}")
    from safetensors.numpy import load_file

    shutil.copy(TIED / "config.json", tmp_path)
    kept = write_bfloat16_safetensors(tmp_path / "model.safetensors", load_file(TIED / "model.safetensors"))
    weights = read_weights(tmp_path, backend=backend_of(framework))
    stored = {
        "numpy": "float32", "array_api_strict": "array_api_strict.float32", "torch": "torch.bfloat16",
        "mlx": "mlx.core.bfloat16",
    }
    assert str(weights["embedding"].dtype) == stored[framework]  # NumPy has no bfloat16: widened, exactly

    def float32(array):
        if framework == "torch":
            return array.float().numpy()
        if framework == "mlx":
            return np.asarray(array.astype(sys.modules["mlx.core"].float32))
        return to_numpy(array)

    assert np.array_equal(float32(weights["embedding"]), kept["backbone.embeddings.weight"])
    conv = float32(weights["layers"][1]["mixer"]["conv_weights"])
    assert np.array_equal(conv, kept["backbone.layers.1.mixer.conv1d.weight"][:, 0, :])


# ----------------------------------------------------------------------------- imports


def _modules_loaded_by(code: str) -> list:
    probe = "; print(sorted(m for m in ('torch', 'numpy', 'mlx', 'cupy', 'array_api_strict', 'safetensors') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", "import sys; " + code + probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_importing_the_reader_imports_no_array_library():
    assert _modules_loaded_by("import ssm_core.pretrained") == []


@requires_safetensors
@pytest.mark.parametrize("framework", ["numpy", "mlx", "array_api_strict"])
def test_reading_without_torch(framework):
    reason = _framework_reason(framework)
    if reason:
        pytest.skip(f"{framework} is not usable here: {reason}")
    loaded = _modules_loaded_by(
        f"import backends.{framework} as b; from ssm_core.pretrained import read_weights; "
        f"read_weights({str(UNTIED)!r}, backend=b.backend)"
    )
    assert "torch" not in loaded and framework.partition(".")[0] in loaded, loaded
