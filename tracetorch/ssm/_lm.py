"""``tt.ssm.MambaLM``: Hugging Face's ``MambaForCausalLM`` as a ``tt.Model`` (the math is ``ssm_core.lm``'s)."""

from __future__ import annotations

from typing import Optional

import array_api_compat.torch as xp_torch
import torch
from torch import nn

from ssm_core.checks import check_axis
from ssm_core.generation import Generation
from ssm_core.lm import (
    MambaLMParams, check_ids, checkpoint_folder, flat_weights, lm_init, mamba_lm_apply, restored_on_error,
)
from ssm_core.pretrained import MambaLMConfig, read_config, read_weights

from ..core import Model
from ..core._layer import _SEQUENCE_MODE
from ._backend import backend as torch_backend
from ._layers import Mamba

__all__ = ["MambaLM"]


class MambaLM(Model, Generation):
    r"""A Mamba language model (Hugging Face's ``MambaForCausalLM``): embedding, the blocks, norm, head.

    Each block is ``x + layer(rms_norm(x))`` with ``layer`` a
    :class:`~tracetorch.ssm.Mamba` ``(hidden_size, residual=False,
    discretization="euler", expand=..., bias=..., conv_bias=..., dt_rank=...)``;
    the layers hold the states, the whole generation cache. The math is
    :mod:`ssm_core.lm`'s, as on every backend.

    Parameters
    ----------
    config : ssm_core.pretrained.MambaLMConfig
        Its sizes and options (``read_config(path)`` of a checkpoint).

    Variables
    ---------
    embedding : Parameter ``[vocab_size, hidden_size]``
    norms : ParameterList of ``[hidden_size]``, one per layer
    layers : ModuleList of Mamba
    norm_f : Parameter ``[hidden_size]``
    lm_head : Parameter ``[vocab_size, hidden_size]``, or None: tied to the embedding

    Notes
    -----
    - ``lm(ids)``: one step, ids ``[batch]`` (a ``torch.long`` or other integer
      tensor on the model's device) -> logits ``[batch, vocab_size]``;
      ``lm.scan(ids, time_dim=0)``: ids ``[T, batch]`` -> ``[T, batch,
      vocab_size]``, from the held states, as ``T`` steps would give them.
      Inside ``tt.sequence_mode`` a call is a scan.
    - ``zero_states()``, ``save_states()``, ``load_states()``,
      ``TTcompile()``: ``tt.Model``'s, over the layers.
    - ``generate`` and ``stream`` (:class:`ssm_core.generation.Generation`)
      run without autograd and return ``torch.long`` ids.
    - Bad ids raise an error naming ``MambaLM`` and leave the states as they were.
    - Logits come out in float32 for a half-precision model (which computes
      in float32, as its layers do), in the model's dtype otherwise.
    """

    def __init__(self, config: MambaLMConfig):
        super().__init__()
        if not isinstance(config, MambaLMConfig):
            raise TypeError(f"MambaLM: config must be a MambaLMConfig (read_config(path)), got {type(config).__name__}")
        self.config = config
        init = lm_init(config, torch_backend.draws(torch.get_default_dtype()))
        self.embedding = nn.Parameter(init.embedding)
        self.norms = nn.ParameterList([nn.Parameter(norm) for norm in init.norms])
        self.layers = nn.ModuleList(
            [Mamba(config.hidden_size, **config.mixer_kwargs()) for _ in range(config.num_hidden_layers)]
        )
        self.norm_f = nn.Parameter(init.norm_f)
        self.register_parameter("lm_head", None if init.lm_head is None else nn.Parameter(init.lm_head))

    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None) -> "MambaLM":
        """The model of checkpoint ``path``: a directory as ``save_pretrained`` writes it (see
        :mod:`ssm_core.pretrained`), or a Hugging Face repository id downloaded by ``huggingface_hub``
        when it is installed (:func:`ssm_core.lm.checkpoint_folder`).

        ``dtype``: of the parameters (a ``torch.dtype`` or its name); None keeps the checkpoint's. On the CPU.
        """
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, dtype)  # "float32" -> torch.float32
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"MambaLM.from_pretrained: dtype must be a floating torch.dtype or None, got {dtype!r}")
        folder = checkpoint_folder(path, "MambaLM.from_pretrained")
        config = read_config(folder)
        weights = flat_weights(read_weights(folder, config, torch_backend))
        with torch.device("meta"):  # no initial values: the checkpoint's replace them
            lm = cls(config)
        lm.load_state_dict({k: v if dtype is None else v.to(dtype) for k, v in weights.items()}, assign=True)
        return lm

    def _params(self) -> MambaLMParams:
        return MambaLMParams(self.embedding, self.norm_f, self.lm_head, tuple(self.norms))

    # ------------------------------------------------------------- calls

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """One step: ids ``[batch]`` -> logits ``[batch, vocab_size]`` (inside ``tt.sequence_mode``: a scan)."""
        time_dim = self.layers[0].__dict__.get(_SEQUENCE_MODE) if len(self.layers) else None
        return self._run(ids, time_dim)

    def scan(self, ids: torch.Tensor, time_dim: int = 0) -> torch.Tensor:
        """A sequence of ids ``[T, batch]`` (time at ``time_dim``) -> logits ``[T, batch, vocab_size]`` (time there
        too), from the held states, as ``T`` steps would give them; the states end after the last step."""
        check_axis("MambaLM", "time_dim", time_dim)
        return self._run(ids, time_dim)

    @torch.no_grad()
    def _prefill(self, ids):
        return self._run(ids, 0, last=True)

    @torch.no_grad()
    def _step(self, ids):
        return self._run(ids, None)

    def _run(self, ids, time_dim, last=False):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"MambaLM: expected token ids as a torch.Tensor, got {type(ids).__module__}.{type(ids).__name__}")
        if ids.device != self.embedding.device:
            raise ValueError(f"MambaLM: expected ids on {self.embedding.device} (the model's), got {ids.device}")
        layers = list(self.layers)
        held = layers[0].ssm_state if layers else None
        check_ids("MambaLM", ids, self.config.vocab_size, xp_torch, time_dim, None if held is None else held.shape[0])

        def mixer(index, x):
            return layers[index](x) if time_dim is None else layers[index].scan(x, time_dim=time_dim)

        def restore(saved):
            for layer, states in zip(layers, saved):
                layer.__dict__.update(states)  # states are plain attributes

        with restored_on_error(lambda: [{n: getattr(layer, n) for n in layer.state_names} for layer in layers], restore):
            return mamba_lm_apply(ids, self._params(), self.config, mixer, xp_torch, last)

    def _host(self, array):
        import numpy as np

        return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)

    def _ids(self, array):
        return torch.from_numpy(array).to(self.embedding.device)
