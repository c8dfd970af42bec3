"""A Mamba language model, written once: Hugging Face's ``MambaForCausalLM`` as pure functions on arrays.

The model (:class:`~ssm_core.pretrained.MambaLMConfig` says its sizes)::

    x = embedding[ids]                                     # [..., N]
    for each layer:  x = x + mixer(rms_norm(x, norm))      # Mamba(residual=False, discretization="euler", expand, ...)
    logits = rms_norm(x, norm_f) @ head.T                  # head: the embedding itself when tied

with ``rms_norm(x, w) = x / sqrt(mean(x**2) + eps) * w``. The layer states are
the whole generation cache: one :class:`~ssm_core.selective.MambaState` per
layer, of a size that does not grow with the sequence.

Numbers as ``transformers`` computes them where that matters: each norm is
computed in the compute dtype (float32 for a half-precision model, as
``transformers`` does) and rounded to the model's dtype before its weight
multiplies it; with ``residual_in_fp32`` the residual stream stays in the
compute dtype between layers (``transformers`` keeps it in float32: the same
for float32 and half-precision models; a float64 model keeps its float64 here,
where ``transformers`` rounds the stream and its norms to float32). The
logits come out in the compute dtype (``transformers``' ``.float()`` for half
precision).

:func:`mamba_lm_apply` is the model around any mixer (the bindings pass their
stateful ``Mamba`` layers); :func:`mamba_lm_step` and :func:`mamba_lm_scan`
are the pure forms, with the states as arguments. :func:`check_ids` is the
check of token ids every binding makes; :func:`checkpoint_folder` finds a
checkpoint's directory (the one place that may reach the network, and only
when asked for a repository id with ``huggingface_hub`` installed).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from ._array import linear, namespace
from .checks import check_dim
from .init import Draws
from .layout import compute_dtype
from .pretrained import MambaLMConfig
from .selective import Mamba, MambaConfig, mamba_scan, mamba_step

__all__ = [
    "MambaLMParams", "mixer_config", "param_shapes", "lm_init", "rms_norm", "embed", "mamba_lm_apply",
    "mamba_lm_step", "mamba_lm_scan", "mamba_lm_zero_states", "check_ids", "flat_weights", "checkpoint_folder",
    "restored_on_error",
]


class MambaLMParams(NamedTuple):
    """The language model's parameters: ``embedding`` ``[V, N]``, ``norm_f`` ``[N]``, ``lm_head`` ``[V, N]``
    (None: tied to the embedding), ``norms``: one ``[N]`` per layer, ``mixers``: one
    :class:`~ssm_core.selective.MambaParams` per layer (None where a binding's layers hold them)."""

    embedding: Any
    norm_f: Any
    lm_head: Any
    norms: tuple
    mixers: Optional[tuple] = None


def mixer_config(config: MambaLMConfig) -> MambaConfig:
    """The config of each of the model's ``Mamba`` layers."""
    return MambaConfig(config.hidden_size, **config.mixer_kwargs())


def param_shapes(config: MambaLMConfig) -> dict:
    """``{key: shape}`` of the model's parameters, keyed as the bindings' ``state_dict()``.

    ``embedding``, ``norm_f``, ``lm_head`` (untied only), ``norms.{i}`` and
    ``layers.{i}.{key}`` with each layer's ``Mamba`` keys.
    """
    N, V = config.hidden_size, config.vocab_size
    shapes = {"embedding": (V, N), "norm_f": (N,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (V, N)
    mixer = mixer_config(config).param_shapes()
    for index in range(config.num_hidden_layers):
        shapes[f"norms.{index}"] = (N,)
        shapes.update({f"layers.{index}.{key}": shape for key, shape in mixer.items()})
    return shapes


def flat_weights(weights: dict) -> dict:
    """:func:`~ssm_core.pretrained.read_weights`' nested result as ``{key: array}`` of :func:`param_shapes`."""
    flat = {"embedding": weights["embedding"], "norm_f": weights["norm_f"]}
    if weights["lm_head"] is not None:
        flat["lm_head"] = weights["lm_head"]
    for index, layer in enumerate(weights["layers"]):
        flat[f"norms.{index}"] = layer["norm"]
        flat.update({f"layers.{index}.{key}": value for key, value in layer["mixer"].items()})
    return flat


def lm_init(config: MambaLMConfig, draws: Draws) -> MambaLMParams:
    """Fresh parameters around the mixers (which their layers draw): ``N(0, 0.02**2)`` embedding and head, unit norms.

    GPT-2's and mamba-ssm's embedding init; the norms start as the identity's scale.
    """
    xp, dtype = draws.xp, draws.dtype
    N, V = config.hidden_size, config.vocab_size
    embedding = 0.02 * draws.normal((V, N))
    head = None if config.tie_word_embeddings else 0.02 * draws.normal((V, N))
    norms = tuple(xp.ones((N,), dtype=dtype) for _ in range(config.num_hidden_layers))
    return MambaLMParams(embedding, xp.ones((N,), dtype=dtype), head, norms)


# ----------------------------------------------------------------------------- the model


def rms_norm(x, weight, eps: float, xp, dtype):
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` for ``x`` ``[..., N]``, as ``transformers``' ``MambaRMSNorm``.

    Computed in the compute dtype of ``dtype`` (float32 for half precision),
    the normalised ``x`` rounded to ``dtype`` before ``weight`` (cast to
    ``dtype`` too) multiplies it; returns ``[..., N]`` of ``dtype``.
    """
    wide = compute_dtype(dtype, xp)
    x = x if x.dtype == wide else xp.astype(x, wide)  # [..., N]
    inverse_rms = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)  # [..., 1]
    normed = x * inverse_rms  # [..., N]
    normed = normed if normed.dtype == dtype else xp.astype(normed, dtype)
    return (weight if weight.dtype == dtype else xp.astype(weight, dtype)) * normed  # [..., N]


def embed(ids, embedding, xp):
    """The rows of ``embedding`` ``[V, N]`` that the integer ``ids`` ``[...]`` name: ``[..., N]``."""
    rows = xp.take(embedding, xp.reshape(ids, (-1,)), axis=0)  # [ids.size, N]
    return xp.reshape(rows, (*ids.shape, embedding.shape[1]))  # [..., N]


def mamba_lm_apply(ids, params: MambaLMParams, config: MambaLMConfig, mixer: Callable, xp, last: bool = False):
    """Logits ``[..., V]`` of token ids ``ids`` ``[...]`` (checked by the caller: :func:`check_ids`).

    ``mixer(index, x)`` runs layer ``index``'s ``Mamba`` block on its normed
    input ``x`` ``[..., N]`` (of the model's dtype) and returns its output, a
    step or a scan as the caller's ids are; it is called once per layer, in
    order. ``last``: ids ``[T, ...]`` with time on axis 0, of which only the
    last step's logits ``[..., V]`` are wanted (a prompt's prefill: the head,
    the largest product, then runs once).
    """
    dtype = params.embedding.dtype
    wide = compute_dtype(dtype, xp)
    eps = config.layer_norm_epsilon
    residual = embed(ids, params.embedding, xp)  # [..., N]
    if config.residual_in_fp32 and residual.dtype != wide:
        residual = xp.astype(residual, wide)  # [..., N]
    for index, norm in enumerate(params.norms):
        y = mixer(index, rms_norm(residual, norm, eps, xp, dtype))  # [..., N]
        residual = residual + (y if y.dtype == residual.dtype else xp.astype(y, residual.dtype))  # [..., N]
    if last:
        residual = residual[-1, ...]  # [..., N]
    head = params.embedding if params.lm_head is None else params.lm_head  # [V, N]
    # As transformers: the final norm in the residual's dtype, the head's product in the model's.
    x = rms_norm(residual, params.norm_f, eps, xp, residual.dtype)  # [..., N]
    logits = linear(x if x.dtype == dtype else xp.astype(x, dtype), head, None, xp)  # [..., V]
    return logits if logits.dtype == wide else xp.astype(logits, wide)


def _mixer_states(function: Callable, params: MambaLMParams, config: MambaLMConfig, states, xp, plan):
    """``(mixer, new states)``: a mixer for :func:`mamba_lm_apply` running ``function`` from ``states``."""
    options = mixer_config(config)
    new_states = list(states)

    def mixer(index, x):
        y, new_states[index] = function(x, states[index], params.mixers[index], xp, plan=plan, config=options)
        return y

    return mixer, new_states


def mamba_lm_step(ids, states: list, params: MambaLMParams, config: MambaLMConfig, xp=None, plan=None):
    """One step of the model: ids ``[batch]`` -> ``(logits [batch, V], new states)``.

    ``states``: one :class:`~ssm_core.selective.MambaState` per layer, features
    last (``[batch, inner, d]`` and ``[batch, inner, K]``; :func:`mamba_lm_zero_states`).
    The arrays share one dtype, the one the layers compute in (cast
    half-precision weights to float32 first, as the bindings do); ``plan``
    as in :func:`~ssm_core.selective.mamba_step`.
    """
    xp = namespace(params.embedding, xp=xp)
    mixer, new_states = _mixer_states(mamba_step, params, config, states, xp, plan)
    return mamba_lm_apply(ids, params, config, mixer, xp), new_states


def mamba_lm_scan(ids, states: list, params: MambaLMParams, config: MambaLMConfig, xp=None, plan=None):
    """The model over a sequence: ids ``[T, batch]`` -> ``(logits [T, batch, V], new states)``.

    The same numbers as ``T`` calls of :func:`mamba_lm_step`; as there otherwise.
    """
    xp = namespace(params.embedding, xp=xp)
    mixer, new_states = _mixer_states(mamba_scan, params, config, states, xp, plan)
    return mamba_lm_apply(ids, params, config, mixer, xp), new_states


def mamba_lm_zero_states(config: MambaLMConfig, batch: int, xp, dtype, device=None) -> list:
    """Zero states of every layer for ``batch`` sequences: the empty cache."""
    options = mixer_config(config)
    return [Mamba.zero_state(options, (batch,), xp, dtype, device) for _ in range(config.num_hidden_layers)]


@contextlib.contextmanager
def restored_on_error(save: Callable, restore: Callable):
    """A context that calls ``restore(save())`` where the block it guards raises: a model's states as they were.

    A model's call runs its layers one after another; one that fails after
    others have stepped would leave them a step ahead of it.
    """
    saved = save()
    try:
        yield
    except BaseException:
        restore(saved)
        raise


# ----------------------------------------------------------------------------- token ids


def check_ids(name: str, ids, vocab_size: int, xp, time_dim=None, held_batch=None) -> int:
    """Raise naming ``name`` unless ``ids`` are token ids of one step ``[batch]`` (``time_dim`` None)
    or a sequence ``[T, batch]`` with its time axis at ``time_dim``; return the batch size.

    Integer ids in ``[0, vocab_size)``; ``held_batch``: the batch size of the
    states a model holds (None: none held), which the ids must have.
    """
    if not xp.isdtype(ids.dtype, "integral"):
        raise TypeError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    if time_dim is None:
        if ids.ndim != 1:
            raise ValueError(f"{name}: expected token ids of one step, shape [batch], got shape {tuple(ids.shape)}")
        batch = ids.shape[0]
    else:
        if ids.ndim != 2:
            raise ValueError(
                f"{name}: expected a sequence of token ids, shape [T, batch] (time on axis time_dim={time_dim}), "
                f"got shape {tuple(ids.shape)}"
            )
        batch = ids.shape[1 - check_dim(name, time_dim, 2, "time_dim")]
    if held_batch is not None and batch != held_batch:
        raise ValueError(
            f"{name}: the ids are of batch {batch}, the held states of batch {held_batch}; call zero_states() first"
        )
    if math.prod(ids.shape):
        low, high = int(xp.min(ids)), int(xp.max(ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}), got ids from {low} to {high}")
    return batch


# ----------------------------------------------------------------------------- checkpoints

# A Hugging Face repository id: "owner/name".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a download takes of a repository: the config, the safetensors weights and their index, the tokenizer.
_DOWNLOADED = ["*.json", "*.safetensors"]


def checkpoint_folder(path, function: str) -> Path:
    """The local directory of checkpoint ``path``.

    ``path`` itself where it exists. Otherwise, where it reads as a Hugging
    Face repository id (``"owner/name"``) and ``huggingface_hub`` is
    installed, the snapshot ``huggingface_hub.snapshot_download`` keeps (its
    cache, downloading what is missing: the JSON files and the safetensors
    weights); without ``huggingface_hub``, ``FileNotFoundError`` saying how to
    get it. Errors name ``function``.
    """
    folder = Path(path)
    if folder.exists():
        return folder
    text = str(path)
    if not _REPO_ID.fullmatch(text):
        raise FileNotFoundError(f"{function}: no checkpoint directory {text!r}")
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        raise FileNotFoundError(
            f"{function}: no directory {text!r}; as a Hugging Face repository id it needs huggingface_hub to "
            "download (pip install huggingface_hub), or download it yourself and pass the directory"
        ) from None
    return Path(hub.snapshot_download(repo_id=text, allow_patterns=_DOWNLOADED))
