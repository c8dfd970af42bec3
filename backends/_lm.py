"""The Mamba language model of every array backend, written once (the math is ``ssm_core.lm``'s).

A backend module calls :func:`bind_lm` with its backend and its ``Mamba``
class to get its ``MambaLM``::

    from backends.numpy import MambaLM
    lm = MambaLM.from_pretrained("path/to/mamba-130m-hf")   # a directory as save_pretrained writes it
    logits = lm(ids)                                        # ids [batch] -> [batch, vocab]; states held
    new_ids = lm.generate([[1, 2, 3]], max_new_tokens=20)   # [batch, 20]
"""

from __future__ import annotations

from typing import ClassVar

from ssm_core.checks import check_axis
from ssm_core.generation import Generation
from ssm_core.lm import (
    MambaLMParams, check_ids, checkpoint_folder, flat_weights, lm_init, mamba_lm_apply, param_shapes, restored_on_error,
)
from ssm_core.pretrained import MambaLMConfig, read_config, read_weights

__all__ = ["LanguageModel", "bind_lm"]


class LanguageModel(Generation):
    """A Mamba language model (Hugging Face's ``MambaForCausalLM``) on one array library.

    Parameters
    ----------
    config : ssm_core.pretrained.MambaLMConfig
        Its sizes and options (``read_config(path)`` of a checkpoint).
    dtype : dtype or str, optional
        Of the parameters; by default the backend's (float32), and
        ``load_state_dict`` then follows the loaded weights. A half-precision
        model computes in float32 and answers float32 logits.
    seed : int, optional
        Seed of the backend's generator for the initial parameters.

    Variables
    ---------
    layers : list of Mamba
        The backend's ``Mamba(hidden_size, residual=False, discretization="euler", expand=..., ...)``
        layers, holding the states: the whole cache.
    params : ssm_core.lm.MambaLMParams
        The embedding, the norms and the head (the mixers are the layers').

    Notes
    -----
    ``lm(ids)``: one step, ids ``[batch]`` (an integer array of this
    library) -> logits ``[batch, vocab]``; ``lm.scan(ids, time_dim=0)``: ids
    ``[T, batch]`` -> ``[T, batch, vocab]``, from the held states, as ``T``
    steps would; ``generate`` and ``stream``: see :class:`ssm_core.generation.Generation`.
    Bad ids raise an error naming ``MambaLM`` and leave the states as they were.
    """

    backend: ClassVar[object]
    layer_class: ClassVar[type]

    def __init__(self, config: MambaLMConfig, dtype=None, seed=None):
        if not isinstance(config, MambaLMConfig):
            raise TypeError(f"{self._name()}: config must be a MambaLMConfig (read_config(path)), got {type(config).__name__}")
        self.config = config
        kwargs = config.mixer_kwargs()
        # Lazy libraries evaluate once per call of the model, not once per layer.
        self.layers = [
            self.layer_class(config.hidden_size, **kwargs, dtype=dtype, seed=None if seed is None else seed + 1 + i,
                             eager=False)
            for i in range(config.num_hidden_layers)
        ]
        self.dtype = self.layers[0].dtype if self.layers else self.backend.dtype(dtype)
        self._fixed_dtype = dtype is not None
        self.params = lm_init(config, self.backend.draws(self.dtype, seed))

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """The model of checkpoint ``path``: a directory as ``save_pretrained`` writes it (see
        :mod:`ssm_core.pretrained`), or a Hugging Face repository id downloaded by ``huggingface_hub``
        when it is installed (:func:`ssm_core.lm.checkpoint_folder`).

        ``dtype``: of the parameters; None keeps the checkpoint's (float32 for bfloat16 weights on a
        library without bfloat16, which holds them exactly).
        """
        folder = checkpoint_folder(path, f"{cls.__name__}.from_pretrained")
        config = read_config(folder)
        lm = cls(config, dtype=dtype)
        lm.load_state_dict(flat_weights(read_weights(folder, config, cls.backend)))
        return lm

    def _name(self) -> str:
        return f"MambaLM ({self.backend.name})"

    def __repr__(self) -> str:
        c = self.config
        return (f"{self.backend.name}.MambaLM(hidden_size={c.hidden_size}, layers={c.num_hidden_layers}, "
                f"vocab_size={c.vocab_size}, dtype={self.dtype})")

    # ------------------------------------------------------------- weights

    def state_dict(self) -> dict:
        """``{key: array}``: ``embedding``, ``norm_f``, ``lm_head`` (untied), ``norms.{i}``, ``layers.{i}.{key}``,
        as ``tracetorch.ssm.MambaLM.state_dict()`` names them."""
        p = self.params
        out = {"embedding": p.embedding, "norm_f": p.norm_f}
        if p.lm_head is not None:
            out["lm_head"] = p.lm_head
        for index, (norm, layer) in enumerate(zip(p.norms, self.layers)):
            out[f"norms.{index}"] = norm
            out.update({f"layers.{index}.{key}": value for key, value in layer.state_dict().items()})
        return out

    def load_state_dict(self, mapping, strict: bool = True) -> None:
        """Load weights keyed as :meth:`state_dict` (torch tensors, NumPy arrays or any DLPack-capable
        arrays); all or nothing. The dtype follows the weights unless the constructor was given one."""
        name, xp = self._name(), self.backend.xp
        shapes = param_shapes(self.config)
        missing, unexpected = sorted(set(shapes) - set(mapping)), sorted(set(mapping) - set(shapes))
        if strict and (missing or unexpected):
            raise ValueError(f"{name}: load_state_dict got missing keys {missing} and unexpected keys {unexpected}")
        loaded = {}
        for key in shapes.keys() & mapping.keys():
            array = self.layers[0]._convert(mapping[key], key) if self.layers else self.backend.asarray(mapping[key])
            if tuple(array.shape) != shapes[key]:
                raise ValueError(f"{name}: {key} must have shape {shapes[key]}, got {tuple(array.shape)}")
            if not xp.isdtype(array.dtype, "real floating"):
                raise TypeError(f"{name}: {key} must be real floating-point, got dtype {array.dtype}")
            loaded[key] = array
        merged = {**self.state_dict(), **loaded}
        dtype = self.dtype if self._fixed_dtype or "embedding" not in loaded else loaded["embedding"].dtype
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}."
            layer.load_state_dict({k[len(prefix):]: xp.astype(v, dtype) for k, v in merged.items() if k.startswith(prefix)})

        def own(key):
            value = merged.get(key)
            return None if value is None else xp.astype(value, dtype)

        norms = tuple(own(f"norms.{index}") for index in range(self.config.num_hidden_layers))
        self.params = MambaLMParams(own("embedding"), own("norm_f"), own("lm_head"), norms)
        self.dtype = dtype

    # ------------------------------------------------------------- states

    def zero_states(self) -> None:
        """Forget the states of every layer: the next call starts a new sequence."""
        for layer in self.layers:
            layer.zero_states()

    def save_states(self) -> dict:
        """Copies of the held states, ``{"layers.{i}.{state name}": array}`` (as ``tt.Model.save_states()``)."""
        return {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.save_states().items()}

    def load_states(self, states: dict, strict: bool = True) -> None:
        """Load states saved by :meth:`save_states`; all or nothing."""
        expected = {f"layers.{i}.{slot.name}" for i, layer in enumerate(self.layers) for slot in layer._slots}
        missing, unexpected = sorted(expected - set(states)), sorted(set(states) - expected)
        if strict and (missing or unexpected):
            raise ValueError(f"{self._name()}: load_states got missing states {missing} and unexpected states {unexpected}")
        with self._atomic():
            for index, layer in enumerate(self.layers):
                prefix = f"layers.{index}."
                layer.load_states({k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)}, strict)

    def _atomic(self):
        """A context that puts every layer's states back where the block it guards raises."""

        def restore(saved):
            for layer, states in zip(self.layers, saved):
                layer._states = states

        return restored_on_error(lambda: [layer._states for layer in self.layers], restore)  # replaced, never edited

    # ------------------------------------------------------------- calls

    def __call__(self, ids):
        """One step: token ids ``[batch]`` -> logits ``[batch, vocab]``; the states advance."""
        return self._run(ids, None)

    def scan(self, ids, time_dim: int = 0, compiled=None):
        """A sequence of token ids ``[T, batch]`` (time at ``time_dim``) -> logits ``[T, batch, vocab]`` (time there
        too), from the held states, as ``T`` steps would give them; the states end after the last step.
        ``compiled``: the layers' switch (see ``Mamba.scan``)."""
        check_axis(self._name(), "time_dim", time_dim)
        return self._run(ids, time_dim, compiled)

    def _prefill(self, ids):
        return self._run(ids, 0, last=True)

    def _step(self, ids):
        return self._run(ids, None)

    def _run(self, ids, time_dim, compiled=None, last=False):
        backend = self.backend
        if not isinstance(ids, backend.array_types):
            raise TypeError(
                f"{self._name()}: expected token ids as a {backend.array_types[0].__module__}."
                f"{backend.array_types[0].__name__}, got {type(ids).__module__}.{type(ids).__name__}"
            )
        held = self.layers[0].ssm_state if self.layers else None
        check_ids(self._name(), ids, self.config.vocab_size, backend.xp, time_dim, None if held is None else held.shape[0])

        def mixer(index, x):
            layer = self.layers[index]
            return layer(x) if time_dim is None else layer.scan(x, time_dim=time_dim, compiled=compiled)

        with self._atomic():  # a lazy library's failure surfaces at finish(): inside, so it restores the states too
            logits = mamba_lm_apply(ids, self.params, self.config, mixer, backend.xp, last)
            backend.finish((logits, *(s for layer in self.layers for s in layer._states.values())))
        return logits

    def _host(self, array):
        return self.backend.to_numpy(array) if isinstance(array, self.backend.array_types) else _to_host(array)

    def _ids(self, array):
        return self.backend.xp.asarray(array)


def _to_host(value):
    from ._host import to_host

    return to_host(value)


def bind_lm(backend, layer_class) -> type:
    """The ``MambaLM`` class of ``backend``, whose layers are ``layer_class`` (its ``Mamba``)."""
    cls = type("MambaLM", (LanguageModel,), {"backend": backend, "layer_class": layer_class})
    cls.__doc__ = LanguageModel.__doc__.replace("on one array library", f"on {backend.name}", 1)
    cls.__module__ = f"backends.{backend.name}"
    cls.__qualname__ = "MambaLM"
    return cls
