"""Generating tokens with a binding's language model, written once: prefill by scan, decode by stepping.

:class:`Generation` gives a model ``generate`` and ``stream``. The model
provides ``config`` (a :class:`~ssm_core.pretrained.MambaLMConfig`),
``zero_states()``, ``_step(ids)`` (one step: ids ``[batch]`` -> logits
``[batch, V]``, states held), ``_prefill(ids)`` (ids ``[T, batch]`` -> the
last step's logits ``[batch, V]``, states held), both without recording
gradients, ``_host(array)`` (its array as a NumPy array) and ``_ids(array)``
(NumPy ``int64`` ids as its own array).

The next token is chosen on the host, in NumPy, from the logits of the step:
the largest (greedy, ``temperature=0``; the first of equal ones, as
``argmax`` everywhere), or drawn from ``softmax(logits / temperature)``
restricted to the ``top_k`` largest, by one uniform number per sequence from
``numpy.random.default_rng(seed)`` and the inverse of the cumulative
distribution (in float64). So a seed gives the same tokens on every backend
wherever the backends' logits agree; they differ in the last bits between
libraries, which changes a drawn token only where a uniform number falls
within that distance of a boundary between two tokens' probabilities.
"""

from __future__ import annotations

import importlib
import math

__all__ = ["Generation", "choose_tokens"]


def _numpy():
    return importlib.import_module("numpy")  # ssm_core imports no array library at module level


def choose_tokens(logits, temperature: float, top_k, rng):
    """The next token of each sequence from host logits ``[batch, V]``: ``int64`` ``[batch]``."""
    np = _numpy()
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)  # [batch]
    z = np.asarray(logits, dtype=np.float64) / temperature  # [batch, V]
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]  # [batch, 1]: the k-th largest
        z = np.where(z < kth, -np.inf, z)  # ties with the k-th largest stay, as in transformers
    weights = np.exp(z - z.max(axis=-1, keepdims=True))  # [batch, V]
    cumulative = np.cumsum(weights, axis=-1)  # [batch, V]
    u = rng.random(z.shape[0])[:, None] * cumulative[:, -1:]  # [batch, 1], in [0, total)
    # The first token whose cumulative weight exceeds u: never one of weight 0.
    return np.sum(cumulative <= u, axis=-1).astype(np.int64)  # [batch]


def _check_int(name: str, what: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}: {what} must be {expected}, got {value!r}")
    return value


def _token_set(name: str, what: str, value) -> tuple:
    """``eos_token_id`` as a tuple of ids (empty: none)."""
    if value is None:
        return ()
    ids = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        ids = tuple(ids)
    except TypeError:
        ids = None
    if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{name}: {what} must be None, a token id or a list of them, got {value!r}")
    return ids


class Generation:
    """``generate`` and ``stream`` for a language model (see the module's docstring for what it provides)."""

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, seed=None,
                 eos_token_id=None, pad_token_id=None):
        """Continue ``prompt_ids``: the new ids ``[batch, max_new_tokens]``, as this model's integer array.

        Parameters
        ----------
        prompt_ids : array or list
            ``[batch, T]`` token ids (as ``transformers``' ``generate`` takes
            them), or a flat list (or 1-d array) of ids for one sequence
            (``batch`` 1); any array library's, or nested lists. ``T >= 1``.
        max_new_tokens : int
            How many tokens to make.
        temperature : float, default 0.0
            0: greedy, the largest logit. Otherwise sampled from
            ``softmax(logits / temperature)``.
        top_k : int, optional
            Sample among the ``top_k`` largest logits only.
        seed : int, optional
            Seed of the sampling's ``numpy.random.Generator``: the same seed,
            the same tokens, on every backend (see :mod:`ssm_core.generation`).
            None: fresh randomness.
        eos_token_id : int or list of int, optional
            None (the default): no stopping, every sequence makes
            ``max_new_tokens`` tokens. Given (``lm.config.eos_token_id`` is
            what ``transformers`` stops at by default): a sequence that made
            one of these ids is finished and continues with ``pad_token_id``;
            generation ends early, with fewer columns, once all are finished.
        pad_token_id : int, optional
            What finished sequences continue with: by default the config's
            ``pad_token_id``, else the first ``eos_token_id``.

        The states start from zeros (a new conversation): the prompt is run
        by ``scan`` (its last step's logits only), then each new token by one
        step; the model then holds the states after the prompt and every new
        token but the last.
        """
        np = _numpy()
        steps, batch = self._token_steps(prompt_ids, max_new_tokens, temperature, top_k, seed, eos_token_id,
                                         pad_token_id)
        tokens = list(steps)
        return self._ids(np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), np.int64))

    def stream(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, seed=None,
               eos_token_id=None, pad_token_id=None):
        """:meth:`generate` one step at a time: an iterator of each step's new ids ``[batch]``, as they come.

        The arguments are checked at once; the model runs as the iterator is
        advanced (the prompt at the first step). The same ids as :meth:`generate`.
        """
        steps, _ = self._token_steps(prompt_ids, max_new_tokens, temperature, top_k, seed, eos_token_id,
                                     pad_token_id)
        return (self._ids(tokens) for tokens in steps)

    # ------------------------------------------------------------- the loop

    def _prompt(self, name: str, prompt_ids):
        """``prompt_ids`` as host ``int64`` ``[batch, T]``, checked."""
        np = _numpy()
        try:
            prompt = np.asarray(prompt_ids) if isinstance(prompt_ids, (list, tuple)) else self._host(prompt_ids)
        except (TypeError, ValueError) as error:  # ragged lists, objects no library takes
            raise ValueError(f"{name}: prompt_ids must be [batch, T] token ids or a flat list of them ({error})") from None
        if prompt.ndim == 1:
            prompt = prompt[None, :]  # one sequence
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError(
                f"{name}: expected prompt_ids of shape [batch, T] with T >= 1, or a flat list of ids, "
                f"got shape {tuple(np.shape(prompt_ids))}"
            )
        if prompt.dtype == bool or not np.issubdtype(prompt.dtype, np.integer):
            raise TypeError(f"{name}: expected integer token ids in prompt_ids, got dtype {prompt.dtype}")
        vocab = self.config.vocab_size
        if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab):
            raise ValueError(
                f"{name}: token ids must lie in [0, {vocab}), got ids from {prompt.min()} to {prompt.max()}"
            )
        return prompt.astype(np.int64)

    def _token_steps(self, prompt_ids, max_new_tokens, temperature, top_k, seed, eos_token_id, pad_token_id):
        """``(iterator of host ids [batch] per step, batch)``, the arguments checked now."""
        np = _numpy()
        name = f"{type(self).__name__}.generate"
        prompt = self._prompt(name, prompt_ids)
        _check_int(name, "max_new_tokens", max_new_tokens, 0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not 0 <= temperature < math.inf:
            raise ValueError(f"{name}: temperature must be a finite number >= 0, got {temperature!r}")
        _check_int(name, "top_k", top_k, 1, allow_none=True)
        _check_int(name, "seed", seed, 0, allow_none=True)
        eos = _token_set(name, "eos_token_id", eos_token_id)
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else (eos or (0,))[0]
        _check_int(name, "pad_token_id", pad_token_id, 0)
        vocab = self.config.vocab_size
        for what, ids in (("pad_token_id", (pad_token_id,)), ("eos_token_id", eos or ())):
            if any(i >= vocab for i in ids):  # fed back as the next step's input
                raise ValueError(f"{name}: {what} must be below the vocabulary size {vocab}, got {max(ids)}")

        def steps():
            self.zero_states()
            if max_new_tokens == 0:
                return
            rng = np.random.default_rng(seed)
            logits = self._host(self._prefill(self._ids(np.ascontiguousarray(prompt.T))))  # [batch, V]
            finished = np.zeros(prompt.shape[0], dtype=bool)
            for step in range(max_new_tokens):
                tokens = choose_tokens(logits, temperature, top_k, rng)  # [batch]
                if eos:
                    tokens = np.where(finished, pad_token_id, tokens)
                    finished |= np.isin(tokens, eos)
                yield tokens
                if step + 1 == max_new_tokens or finished.all():
                    return
                logits = self._host(self._step(self._ids(tokens)))  # [batch, V]

        return steps(), prompt.shape[0]
