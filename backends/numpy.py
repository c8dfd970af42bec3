"""The NumPy backend: the state-space layers on CPU arrays.

::

    from backends.numpy import Mamba
    layer = Mamba(64)
    layer.load_state_dict(torch_layer.state_dict())
    y = layer(x)          # x: numpy.ndarray [batch, 64]
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np

import ssm_core

from ssm_core.backend import Backend
from ._host import to_host
from ._layer import bind
from ._lm import bind_lm

__all__ = ["backend", "asarray", "from_torch", "S4", "S5", "S6", "Mamba", "MambaLM"]


class NumpyBackend(Backend):
    name = "numpy"
    xp = xp
    array_types = (np.ndarray,)
    default_dtype = np.dtype(np.float32)

    def dtype(self, spec):
        return self.default_dtype if spec is None else np.dtype(spec)

    def asarray(self, value):
        return to_host(value)

    def to_numpy(self, array):
        return array

    def generator(self, seed):
        return np.random.default_rng(seed)

    def draws(self, dtype, seed):
        rng = self.generator(seed)
        # The generator draws float32 or float64 only: narrower dtypes get float32 draws, cast.
        draw = dtype if dtype == np.float64 else np.float32
        return ssm_core.Draws(
            xp=self.xp,
            dtype=dtype,
            uniform=lambda shape: rng.random(shape, dtype=draw).astype(dtype, copy=False),
            normal=lambda shape: rng.standard_normal(shape, dtype=draw).astype(dtype, copy=False),
        )


backend = NumpyBackend()
asarray = backend.asarray
S4, S5, S6, Mamba, from_torch = bind(backend)
MambaLM = bind_lm(backend, Mamba)
