"""The CuPy backend: the state-space layers on NVIDIA GPUs.

Arrays live on the current CUDA device. Weights load from torch tensors on the
GPU without a host round trip (DLPack), and from host arrays by copy. CuPy
runs asynchronously: results are usable as they are (CuPy orders the work on
its stream); call ``backend.synchronize()`` before timing.
"""

from __future__ import annotations

import array_api_compat.cupy as xp
import cupy as cp

from ._host import to_host
from ._layer import bind
from ._lm import bind_lm
from .numpy import NumpyBackend

__all__ = ["backend", "asarray", "from_torch", "S4", "S5", "S6", "Mamba", "MambaLM"]

_DLPACK_CUDA = 2  # DLDeviceType kDLCUDA


class CupyBackend(NumpyBackend):
    """CuPy mirrors NumPy's API: only making, moving and synchronising arrays differ."""

    name = "cupy"
    xp = xp
    array_types = (cp.ndarray,)

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

    def generator(self, seed):
        return cp.random.default_rng(seed)

    def synchronize(self):
        cp.cuda.get_current_stream().synchronize()

    def scan_method(self, time_invariant, xs):
        # A GPU runs the log-depth recurrence's few large operations faster than T small steps.
        return super().scan_method(time_invariant, xs) if time_invariant else "parallel"


backend = CupyBackend()
asarray = backend.asarray
S4, S5, S6, Mamba, from_torch = bind(backend)
MambaLM = bind_lm(backend, Mamba)
