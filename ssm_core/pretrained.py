"""Mamba language-model checkpoints in the Hugging Face layout: their config and weights, read.

A checkpoint is a directory, as ``transformers``' ``save_pretrained`` writes it
(``config.json`` with ``model.safetensors``, or shards named by
``model.safetensors.index.json``, or ``pytorch_model.bin``), or as
``mamba-ssm`` writes it (``config.json`` with ``d_model``, ``n_layer``,
``ssm_cfg``...; weights named ``backbone.embedding.weight``...). Nothing here
reaches the network: download with ``huggingface_hub`` and pass the directory.

:func:`read_config` gives a :class:`MambaLMConfig`; :func:`read_weights` gives
the arrays, renamed to the parameter names of this project's Mamba layer.
Each file is read by the backend the arrays are for (its ``read_tensors``):
the ``safetensors`` package's NumPy loader by default, ``mlx.core.load`` for
MLX, ``safetensors.torch`` for torch, so reading for NumPy, CuPy or MLX leaves
torch unimported; ``pytorch_model.bin`` needs torch and is read only by it.

What the checkpoint's model computes (``transformers``' ``MambaForCausalLM``):
the embedding, then per layer ``x = x + mixer(rms_norm(x))``, then
``rms_norm`` with ``norm_f`` and the LM head (the embedding itself when tied).
``rms_norm(x) = x / sqrt(mean(x**2) + layer_norm_epsilon) * weight``, one
epsilon for every norm. The mixer is Mamba with ``B_bar = dt * B`` (Euler),
``A_bar = exp(dt * A)``, no residual of its own, and inner width
``expand * hidden_size``. ``transformers`` computes the norms and the SSM in
float32 whatever the model's dtype, and with ``residual_in_fp32`` keeps the
residual stream in float32 between layers (for a float64 model too, which
rounds the residual to float32 at each layer).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ._array import namespace

__all__ = ["MambaLMConfig", "read_config", "read_weights", "read_safetensors", "MIXER_KEYS"]

# A checkpoint mixer's parameter -> this project's Mamba layer's state_dict key (conv1d.weight is reshaped,
# see _mixer_entry). The biases are present only when the config has them.
#
# conv1d.weight [inner, 1, K] -> conv_weights [inner, K]: torch's Conv1d is a cross-correlation, and the
# checkpoint's model pads K - 1 zeros on the left and keeps the first T outputs, so the output at time t is
# sum_k w[:, 0, k] * u[t - (K - 1) + k]: tap k meets the input K - 1 - k steps back. Our conv buffer holds
# the last K inputs oldest first (buffer[..., k] = u[t - (K - 1) + k]) and computes sum(buffer * conv_weights, -1),
# so conv_weights[:, k] = conv1d.weight[:, 0, k], in the same order, with no flip.
#
# x_proj.weight [R + 2 d, inner] -> ssm_proj.weight: the checkpoint splits x_proj's output into
# (dt_low_rank [R], B [d], C [d]) in that order (torch.split by [R, d, d]); our selective core takes
# proj[..., :R], proj[..., R:R + d], proj[..., R + d:] as (dt_low_rank, B, C): the same rows, unchanged.
MIXER_KEYS = {
    "A_log": "A_log",
    "D": "D",
    "in_proj.weight": "in_proj.weight",
    "in_proj.bias": "in_proj.bias",
    "conv1d.weight": "conv_weights",
    "conv1d.bias": "conv_bias",
    "x_proj.weight": "ssm_proj.weight",
    "dt_proj.weight": "dt_proj.weight",
    "dt_proj.bias": "dt_proj.bias",
    "out_proj.weight": "out_proj.weight",
    "out_proj.bias": "out_proj.bias",
}


@dataclass(frozen=True, kw_only=True)
class MambaLMConfig:
    """What a Mamba language-model checkpoint's ``config.json`` says, in ``transformers``' names.

    ``time_step_rank`` is resolved (``"auto"`` is ``ceil(hidden_size / 16)``);
    ``vocab_size`` is the number of embedding rows (mamba-ssm's padded size).
    ``dtype`` is the weights' dtype as the config names it (None when it does
    not); ``source`` is ``"transformers"`` or ``"mamba_ssm"``, the layout of the
    config. The token ids are for generation only.
    """

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    residual_in_fp32: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    dtype: str | None = None
    source: str = "transformers"

    @property
    def intermediate_size(self) -> int:
        """The mixer's inner width, ``expand * hidden_size``."""
        return self.expand * self.hidden_size

    def mixer_kwargs(self) -> dict:
        """The keyword options of this project's ``Mamba(hidden_size, ...)`` for one of the checkpoint's mixers."""
        return {
            "d_state": self.state_size,
            "dt_rank": self.time_step_rank,
            "conv_kernel": self.conv_kernel,
            "expand": self.expand,
            "bias": self.use_bias,
            "conv_bias": self.use_conv_bias,
            "residual": False,
            "discretization": "euler",
        }

    def param_shapes(self) -> dict:
        """``{"embedding", "norm_f", "lm_head", "norm", "mixer": {key: shape}}``: the shapes :func:`read_weights` gives."""
        N, inner, d, R, K = self.hidden_size, self.intermediate_size, self.state_size, self.time_step_rank, self.conv_kernel
        mixer = {
            "A_log": (inner, d),
            "D": (inner,),
            "in_proj.weight": (2 * inner, N),
            "conv_weights": (inner, K),
            "ssm_proj.weight": (R + 2 * d, inner),
            "dt_proj.weight": (inner, R),
            "dt_proj.bias": (inner,),
            "out_proj.weight": (N, inner),
        }
        if self.use_bias:
            mixer.update({"in_proj.bias": (2 * inner,), "out_proj.bias": (N,)})
        if self.use_conv_bias:
            mixer["conv_bias"] = (inner,)
        return {
            "embedding": (self.vocab_size, N),
            "norm_f": (N,),
            "lm_head": None if self.tie_word_embeddings else (self.vocab_size, N),
            "norm": (N,),
            "mixer": mixer,
        }


# ----------------------------------------------------------------------------- config


def _checkpoint_dir(function: str, path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{function}: no checkpoint directory {str(folder)!r}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{function}: {str(folder)!r} is a file; expected a checkpoint directory (config.json and its weights)"
        )
    return folder


class _Fields:
    """Reads and checks a config's fields; every error names the file, the field and what it accepts."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def error(self, name: str, value, supported: str) -> ValueError:
        return ValueError(f"{self.where}: {name} = {value!r} is not supported; supported: {supported}")

    def required(self, name: str):
        if name not in self.raw:
            raise ValueError(f"{self.where}: the field {name} is missing")
        return self.raw[name]

    def int(self, name: str, default=None, *, minimum: int = 1):
        value = self.required(name) if default is None else self.raw.get(name, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(name, value, f"an integer >= {minimum}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, value, "true or false")
        return value

    def epsilon(self, name: str, default: float) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise self.error(name, value, "a finite number >= 0")
        return float(value)

    def optional_token(self, name: str):
        value = self.raw.get(name)
        if value is None:
            return None
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, value, "a token id, a list of them, or null")
        return value


def _expand(fields: _Fields, key: str, default) -> int:
    value = fields.raw.get(key, default)
    # transformers and mamba-ssm take int(expand * hidden_size) for the inner width; our layer's
    # expand is a whole factor.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fields.error(key, value, "a whole expansion factor >= 1 (inner width = expand * hidden size)")
    return value


def _time_step_rank(fields: _Fields, key: str, hidden_size: int) -> int:
    value = fields.raw.get(key, "auto")
    if value == "auto":
        return math.ceil(hidden_size / 16)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fields.error(key, value, '"auto" (ceil(hidden_size / 16)) or an integer >= 1')
    return value


def _conv_kernel(fields: _Fields, key: str, default: int) -> int:
    value = fields.raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        # A kernel of 1 is still a convolution there (a per-channel scale and bias); our layer reads
        # conv_kernel <= 1 as no convolution at all.
        raise fields.error(key, value, "an integer >= 2 (a causal convolution of that many taps)")
    return value


def _dtype(fields: _Fields):
    value = fields.raw.get("dtype", fields.raw.get("torch_dtype"))
    return value if isinstance(value, str) else None


# transformers' MambaConfig fields that change what the model computes, beyond those MambaLMConfig keeps:
# The mixer's options: MambaLMConfig's field -> its name in transformers' config, and in mamba-ssm's ssm_cfg.
_TRANSFORMERS_MIXER = dict(
    state_size="state_size", expand="expand", conv_kernel="conv_kernel", time_step_rank="time_step_rank",
    use_bias="use_bias", use_conv_bias="use_conv_bias",
)
_MAMBA_SSM_MIXER = dict(
    state_size="d_state", expand="expand", conv_kernel="d_conv", time_step_rank="dt_rank", use_bias="bias",
    use_conv_bias="conv_bias",
)


def _mixer_options(fields: _Fields, names: dict, hidden_size: int) -> dict:
    """The mixer's options read from ``fields`` under ``names`` (see ``_TRANSFORMERS_MIXER``), with their defaults."""
    return dict(
        state_size=fields.int(names["state_size"], 16),
        expand=_expand(fields, names["expand"], 2),
        conv_kernel=_conv_kernel(fields, names["conv_kernel"], 4),
        time_step_rank=_time_step_rank(fields, names["time_step_rank"], hidden_size),
        use_bias=fields.bool(names["use_bias"], False),
        use_conv_bias=fields.bool(names["use_conv_bias"], True),
    )


# hidden_act is the activation after the convolution (the gate's SiLU is fixed); intermediate_size is
# recomputed from expand by transformers itself. Fields not named here (time_step_min/max/scale/floor/
# init_scheme, initializer_range, rescale_prenorm_residual: initialisation only; use_mambapy,
# use_associative_scan: other algorithms for the same scan; use_cache, architectures, and the generic
# fields every transformers config has) do not change the numbers and are not read.
def _transformers_config(raw: dict, where: str) -> MambaLMConfig:
    fields = _Fields(raw, where)
    model_type = raw.get("model_type", "mamba")
    if model_type != "mamba":
        raise fields.error("model_type", model_type, '"mamba" (Mamba-1; Mamba-2 and other variants are different models)')
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise fields.error("hidden_act", hidden_act, '"silu" (the activation after the convolution)')
    hidden_size = fields.int("hidden_size", 768)
    expand = _expand(fields, "expand", 2)
    if "intermediate_size" in raw and raw["intermediate_size"] != expand * hidden_size:
        raise ValueError(
            f"{where}: intermediate_size = {raw['intermediate_size']!r} disagrees with expand * hidden_size = "
            f"{expand} * {hidden_size} = {expand * hidden_size}; the inner width must be expand * hidden_size"
        )
    return MambaLMConfig(
        hidden_size=hidden_size,
        num_hidden_layers=fields.int("num_hidden_layers", 32),
        vocab_size=fields.int("vocab_size", 50280),
        **_mixer_options(fields, _TRANSFORMERS_MIXER, hidden_size),
        layer_norm_epsilon=fields.epsilon("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=fields.bool("tie_word_embeddings", True),
        residual_in_fp32=fields.bool("residual_in_fp32", True),
        bos_token_id=fields.optional_token("bos_token_id"),
        eos_token_id=fields.optional_token("eos_token_id"),
        pad_token_id=fields.optional_token("pad_token_id"),
        dtype=_dtype(fields),
        source="transformers",
    )


# mamba-ssm's MambaConfig (mamba_ssm/models/config_mamba.py) and the keyword arguments its Mamba-1 mixer
# takes through ssm_cfg. mamba-ssm builds its model with MambaConfig(**config), which rejects a field it
# does not know, so unknown fields are rejected here too.
_MAMBA_SSM_FIELDS = {
    "d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg", "rms_norm",
    "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings", "norm_epsilon",
}
# dt_min, dt_max, dt_init, dt_scale, dt_init_floor: initialisation only; use_fast_path: another kernel for
# the same numbers; layer: Mamba1 or Mamba2.
_MAMBA_SSM_SSM_CFG = {
    "layer", "d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias",
    "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path",
}


def _mamba_ssm_config(raw: dict, where: str) -> MambaLMConfig:
    fields = _Fields(raw, where)
    unknown = sorted(set(raw) - _MAMBA_SSM_FIELDS)
    if unknown:
        raise ValueError(
            f"{where}: unknown mamba-ssm config field {unknown[0]!r} = {raw[unknown[0]]!r}; supported fields: "
            f"{', '.join(sorted(_MAMBA_SSM_FIELDS))}"
        )
    if not fields.bool("rms_norm", True):
        raise fields.error("rms_norm", False, "true (RMSNorm; LayerNorm blocks are not supported)")
    if raw.get("d_intermediate", 0) != 0:
        raise fields.error("d_intermediate", raw["d_intermediate"], "0 (no MLP after each mixer)")
    if raw.get("attn_layer_idx"):
        raise fields.error("attn_layer_idx", raw["attn_layer_idx"], "[] (no attention layers)")
    ssm_cfg = raw.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise fields.error("ssm_cfg", ssm_cfg, "an object of the mixer's options")
    unknown = sorted(set(ssm_cfg) - _MAMBA_SSM_SSM_CFG)
    if unknown:
        raise ValueError(
            f"{where}: unknown ssm_cfg field {unknown[0]!r} = {ssm_cfg[unknown[0]]!r}; supported fields: "
            f"{', '.join(sorted(_MAMBA_SSM_SSM_CFG))}"
        )
    ssm = _Fields(ssm_cfg, f"{where}: ssm_cfg")
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise ssm.error("layer", ssm_cfg["layer"], '"Mamba1" (Mamba-2 is a different model)')
    hidden_size = fields.int("d_model")
    vocab_size = fields.int("vocab_size")
    multiple = fields.int("pad_vocab_size_multiple", 8)
    # mamba-ssm's model pads the vocabulary to a multiple of pad_vocab_size_multiple: the embedding's rows.
    vocab_size += -vocab_size % multiple
    return MambaLMConfig(
        hidden_size=hidden_size,
        num_hidden_layers=fields.int("n_layer"),
        vocab_size=vocab_size,
        **_mixer_options(ssm, _MAMBA_SSM_MIXER, hidden_size),
        layer_norm_epsilon=fields.epsilon("norm_epsilon", 1e-5),
        tie_word_embeddings=fields.bool("tie_embeddings", True),
        residual_in_fp32=fields.bool("residual_in_fp32", True),
        source="mamba_ssm",
    )


def read_config(path) -> MambaLMConfig:
    """The :class:`MambaLMConfig` of the checkpoint directory ``path`` (its ``config.json``).

    Reads ``transformers``' ``MambaConfig`` fields (``model_type`` ``"mamba"``)
    or ``mamba-ssm``'s (``d_model``, ``n_layer``, ``ssm_cfg``...); a field absent
    takes the default of the library that wrote the file. Raises
    ``FileNotFoundError`` when the directory or its ``config.json`` is missing,
    and ``ValueError`` naming the field, its value and what is supported for a
    model this project does not compute (another ``model_type`` or activation,
    LayerNorm, attention or MLP layers, a kernel-1 convolution, ...).
    """
    folder = _checkpoint_dir("read_config", path)
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"read_config: no config.json in {str(folder)!r}")
    where = f"read_config: {str(file)!r}"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if "model_type" in raw or "hidden_size" in raw:
        return _transformers_config(raw, where)
    if "d_model" in raw:
        return _mamba_ssm_config(raw, where)
    raise ValueError(
        f"{where}: not a Mamba config: it has neither model_type/hidden_size (transformers) nor d_model (mamba-ssm)"
    )


# ----------------------------------------------------------------------------- weights


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _module(function: str, name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{function}: reading the weights needs {name.partition('.')[0]}: {error}") from None


def read_safetensors(file) -> dict:
    """``{name: NumPy array}`` of one safetensors file; bfloat16, which NumPy lacks, widened exactly to float32.

    Every backend without a loader of its own reads through this (then converts),
    so no library but NumPy is imported.
    """
    function, file = "read_weights", Path(file)
    safetensors = _module(function, "safetensors")
    np = _module(function, "numpy")
    with safetensors.safe_open(str(file), framework="numpy") as handle:
        dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    if "BF16" not in dtypes.values():
        return _module(function, "safetensors.numpy").load_file(str(file))
    arrays = {}
    for key, entry in safetensors.deserialize(file.read_bytes()):
        if entry["dtype"] == "BF16":
            # bfloat16 is the top half of a float32: shift its bits up.
            bits = np.frombuffer(bytes(entry["data"]), dtype="<u2").astype(np.uint32) << 16
            arrays[key] = bits.view(np.float32).reshape(entry["shape"])
        else:
            dtype = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                     "I8": "i1", "U8": "u1", "BOOL": "?"}.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{function}: tensor {key!r} of {str(file)!r} has dtype {entry['dtype']}, which NumPy cannot hold")
            arrays[key] = np.frombuffer(bytes(entry["data"]), dtype=dtype).reshape(entry["shape"]).copy()
    return arrays


def _shard_names(function: str, index_file: Path) -> tuple:
    """``(weight_map, shard file names)`` of a sharded checkpoint's index."""
    where = f"{function}: {str(index_file)!r}"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{where}: expected an object with a non-empty weight_map {{tensor name: shard file}}")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # A shard lies beside its index: a name with a folder in it would read a file elsewhere.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
            raise ValueError(f"{where}: shard file name {shard!r} is not a plain file name in the checkpoint directory")
    return weight_map, shards


def _read_tensors(function: str, folder: Path, backend) -> tuple:
    """``({name: array}, what was read)`` of the checkpoint's weights, as stored."""
    present = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"{function}: no weights in {str(folder)!r}; expected one of {', '.join(_WEIGHT_FILES)}"
        )
    safetensors_files = [name for name in present if "safetensors" in name]
    if not safetensors_files and not getattr(backend, "reads_torch_pickles", False):
        raise ValueError(
            f"{function}: {str(folder)!r} holds only {present[0]}, a torch pickle, which needs torch to read; "
            "load it with the torch binding (tt.ssm), or save the weights as safetensors"
        )
    read = read_safetensors if backend is None else backend.read_tensors
    chosen = (safetensors_files or present)[0]
    if not chosen.endswith(".index.json"):
        return read(folder / chosen), str(folder / chosen)
    weight_map, shards = _shard_names(function, folder / chosen)
    tensors, origin = {}, {}
    for shard in shards:
        file = folder / shard
        if not file.is_file():
            raise FileNotFoundError(f"{function}: shard {shard!r} named by {chosen} is missing from {str(folder)!r}")
        for key, value in read(file).items():
            if key in tensors:
                raise ValueError(f"{function}: tensor {key!r} is in two shards, {origin[key]!r} and {shard!r}")
            tensors[key], origin[key] = value, shard
    for key, shard in weight_map.items():
        if origin.get(key) != shard:
            found = f"is in {origin[key]!r}" if key in origin else "is in no shard"
            raise ValueError(f"{function}: {chosen} puts tensor {key!r} in {shard!r}, but it {found}")
    return tensors, f"{folder / chosen} ({len(shards)} shards)"


_LAYER_KEY = re.compile(r"layers\.(\d+)\.(norm\.weight|mixer\.(.+))")


def _arrays_equal(a, b) -> bool:
    if tuple(a.shape) != tuple(b.shape):
        return False
    xp = namespace(a, b)
    return bool(xp.all(a == b))


def read_weights(path, config: MambaLMConfig | None = None, backend=None) -> dict:
    """The weights of the checkpoint directory ``path``, renamed for this project.

    ``backend``: the :class:`~ssm_core.backend.Backend` whose arrays to
    return (its ``read_tensors`` reads each file); None: NumPy arrays.
    ``config``: :func:`read_config`'s (read from ``path`` when None). Reads
    ``model.safetensors``, else the shards of ``model.safetensors.index.json``,
    else (a backend that reads torch pickles) ``pytorch_model.bin`` or its
    shards. Returns::

        {"embedding": [vocab, hidden], "norm_f": [hidden], "lm_head": [vocab, hidden] or None (tied),
         "layers": [{"norm": [hidden], "mixer": {key: array}}, ...]}

    with the mixer's keys those of this project's Mamba layer (:data:`MIXER_KEYS`;
    ``conv_weights`` ``[inner, K]`` from ``conv1d.weight`` ``[inner, 1, K]``;
    the biases only when the config has them). Arrays keep the stored dtype
    (bfloat16 is widened exactly to float32 where the library lacks it).
    Keys may carry ``transformers``' names (``backbone.embeddings.weight``)
    or ``mamba-ssm``'s (``backbone.embedding.weight``), with or without the
    ``backbone.`` prefix. A missing, unknown or misshapen tensor raises
    ``ValueError`` naming it; so does an ``lm_head.weight`` that differs from
    the embedding of a tied model.
    """
    function = "read_weights"
    folder = _checkpoint_dir(function, path)
    config = read_config(folder) if config is None else config
    tensors, source = _read_tensors(function, folder, backend)
    shapes = config.param_shapes()

    def stored_shape(canonical_shape, mixer_key):
        if mixer_key == "conv1d.weight":
            return (canonical_shape[0], 1, canonical_shape[1])
        return canonical_shape

    def take(key, value, expected):
        if tuple(value.shape) != tuple(expected):
            raise ValueError(
                f"{function}: tensor {key!r} of {source} has shape {tuple(value.shape)}; the config gives "
                f"{tuple(expected)}"
            )
        return value

    embedding = norm_f = lm_head = None
    layers = [{"norm": None, "mixer": {}} for _ in range(config.num_hidden_layers)]
    embedding_key = None
    for key, value in tensors.items():
        name = key[len("backbone."):] if key.startswith("backbone.") else key
        match = _LAYER_KEY.fullmatch(name)
        if name in ("embeddings.weight", "embedding.weight"):
            if embedding is not None:
                raise ValueError(f"{function}: {source} holds two embeddings, {embedding_key!r} and {key!r}")
            embedding, embedding_key = take(key, value, shapes["embedding"]), key
        elif name == "norm_f.weight":
            norm_f = take(key, value, shapes["norm_f"])
        elif key == "lm_head.weight":
            lm_head = take(key, value, (config.vocab_size, config.hidden_size))
        elif match and int(match.group(1)) < config.num_hidden_layers:
            layer = layers[int(match.group(1))]
            mixer_key = match.group(3)
            if mixer_key is None:
                layer["norm"] = take(key, value, shapes["norm"])
                continue
            ours = MIXER_KEYS.get(mixer_key)
            if ours is None or ours not in shapes["mixer"]:
                why = "" if ours is None else f" (the config has use_bias={config.use_bias}, use_conv_bias={config.use_conv_bias})"
                raise ValueError(f"{function}: unknown tensor {key!r} in {source}{why}")
            value = take(key, value, stored_shape(shapes["mixer"][ours], mixer_key))
            layer["mixer"][ours] = value[:, 0, :] if mixer_key == "conv1d.weight" else value  # [inner, K]
        else:
            why = f" (the config has {config.num_hidden_layers} layers)" if match else ""
            raise ValueError(f"{function}: unknown tensor {key!r} in {source}{why}")

    missing = []
    if embedding is None:
        missing.append("backbone.embeddings.weight (mamba-ssm: backbone.embedding.weight)")
    if norm_f is None:
        missing.append("backbone.norm_f.weight")
    if lm_head is None and not config.tie_word_embeddings:
        missing.append("lm_head.weight (the config has tie_word_embeddings=false)")
    stored_names = {ours: theirs for theirs, ours in MIXER_KEYS.items()}
    for index, layer in enumerate(layers):
        if layer["norm"] is None:
            missing.append(f"backbone.layers.{index}.norm.weight")
        missing.extend(
            f"backbone.layers.{index}.mixer.{stored_names[ours]}" for ours in shapes["mixer"] if ours not in layer["mixer"]
        )
    if missing:
        raise ValueError(f"{function}: tensor {missing[0]!r} is missing from {source}" + (
            f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    if config.tie_word_embeddings and lm_head is not None:
        # mamba-ssm saves the tied head as a tensor of its own: it must be the embedding.
        if not _arrays_equal(lm_head, embedding):
            raise ValueError(
                f"{function}: the config ties the LM head to the embedding, but lm_head.weight in {source} differs "
                "from it; set tie_word_embeddings (mamba-ssm: tie_embeddings) to false to use it"
            )
        lm_head = None

    return {
        "embedding": embedding,
        "norm_f": norm_f,
        "lm_head": lm_head,
        "layers": [{"norm": layer["norm"], "mixer": {key: layer["mixer"][key] for key in shapes["mixer"]}} for layer in layers],
    }
