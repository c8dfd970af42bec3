"""The CuPy backend: the state-space layers on NVIDIA GPUs.

Arrays live on the current CUDA device. Weights load from torch tensors on the
GPU without a host round trip (DLPack), and from host arrays by copy. CuPy
runs asynchronously: results are usable as they are (CuPy orders the work on
its stream); call ``backend.synchronize()`` before timing.
"""

from __future__ import annotations

import array_api_compat.cupy as xp
import cupy as cp
import numpy as np

import ssm_core

from ._host import to_host
from ._layer import bind

__all__ = ["backend", "asarray", "from_torch", "S4", "S5", "S6", "Mamba"]

_DLPACK_CUDA = 2  # DLDeviceType kDLCUDA


class CupyBackend:
    name = "cupy"
    xp = xp
    array_types = (cp.ndarray,)
    default_dtype = np.dtype(np.float32)

    lti_scan = "auto"
    selective_scan = "parallel"

    def dtype(self, spec):
        return self.default_dtype if spec is None else np.dtype(spec)

    def asarray(self, value):
        if isinstance(value, cp.ndarray):
            return value
        if hasattr(value, "detach"):  # torch.Tensor: DLPack refuses one that requires grad
            value = value.detach()
        if hasattr(value, "__dlpack_device__") and value.__dlpack_device__()[0] == _DLPACK_CUDA:
            return cp.from_dlpack(value)
        return cp.asarray(to_host(value))

    def to_numpy(self, array):
        return cp.asnumpy(array)

    def draws(self, dtype, seed):
        rng = cp.random.default_rng(seed)
        # The generator draws float32 or float64 only: narrower dtypes get float32 draws, cast.
        draw = dtype if dtype == np.float64 else np.float32
        return ssm_core.Draws(
            xp=xp,
            dtype=dtype,
            uniform=lambda shape: rng.random(shape, dtype=draw).astype(dtype, copy=False),
            normal=lambda shape: rng.standard_normal(shape, dtype=draw).astype(dtype, copy=False),
        )

    def finish(self, arrays):
        pass

    def synchronize(self):
        cp.cuda.get_current_stream().synchronize()


backend = CupyBackend()
asarray = backend.asarray
S4, S5, S6, Mamba, from_torch = bind(backend)
