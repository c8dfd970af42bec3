"""The array-api-strict backend: proves the layers use the array API standard and nothing else.

A test backend: ``array_api_strict`` implements the standard and only it, so
a layer that runs here calls no library-specific function.
"""

from __future__ import annotations

import array_api_strict as xp
import numpy as np

import ssm_core

from ssm_core.backend import Backend
from ._host import to_host
from ._layer import bind
from ._lm import bind_lm

__all__ = ["backend", "asarray", "from_torch", "S4", "S5", "S6", "Mamba", "MambaLM"]

_DTYPES = {"float32": xp.float32, "float64": xp.float64}


class ArrayApiStrictBackend(Backend):
    name = "array_api_strict"
    xp = xp
    array_types = (type(xp.asarray(0.0)),)
    default_dtype = xp.float32
    overwrites_temporaries = True  # the standard's in-place operators, checked strictly

    def dtype(self, spec):
        if spec is None:
            return self.default_dtype
        if spec in _DTYPES.values():
            return spec
        return _DTYPES[np.dtype(spec).name]

    def asarray(self, value):
        if isinstance(value, self.array_types):
            return value
        return xp.asarray(to_host(value))

    def to_numpy(self, array):
        return np.from_dlpack(array)

    def draws(self, dtype, seed):
        rng = np.random.default_rng(seed)
        np_dtype = np.dtype(str(dtype).rsplit(".", 1)[-1])
        return ssm_core.Draws(
            xp=xp,
            dtype=dtype,
            uniform=lambda shape: xp.asarray(rng.random(shape, dtype=np_dtype)),
            normal=lambda shape: xp.asarray(rng.standard_normal(shape, dtype=np_dtype)),
        )


backend = ArrayApiStrictBackend()
asarray = backend.asarray
S4, S5, S6, Mamba, from_torch = bind(backend)
MambaLM = bind_lm(backend, Mamba)
