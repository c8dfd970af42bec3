"""The MLX backend: the state-space layers on Apple silicon (and MLX's CPU build elsewhere).

MLX evaluates lazily. By default a layer evaluates each step's output and
states before returning (``eager=True``), so results behave like any array
and the graph never grows across steps. For speed in a loop, build with
``eager=False`` and call ``mlx.core.eval`` yourself every few steps (at least
before reading a result): one evaluation then covers many steps::

    layer = Mamba(64, eager=False)
    for t, x in enumerate(stream):
        y = layer(x)
        if t % 16 == 15:
            mx.eval(y, *layer.save_states().values())  # evaluates the held states too
"""

from __future__ import annotations

import mlx.core as mx

import ssm_core

from ssm_core.backend import Backend
from ._layer import bind, is_torch_bfloat16
from ._lm import bind_lm

__all__ = ["backend", "xp", "asarray", "from_torch", "S4", "S5", "S6", "Mamba", "MambaLM"]

_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32, "float64": mx.float64}


def _zeros(shape, dtype=None, device=None):
    return mx.zeros(shape, dtype=mx.float32 if dtype is None else dtype)


def _asarray(obj, dtype=None, copy=None):
    if isinstance(obj, mx.array) and not copy:
        return obj if dtype is None else obj.astype(dtype)
    return mx.array(obj, dtype=dtype)  # a new array: MLX arrays take item assignment


def _moveaxis(x, source, destination):
    # mx.moveaxis takes single axes only; the standard also takes tuples.
    if isinstance(source, int):
        return mx.moveaxis(x, source, destination)
    ndim = x.ndim
    moves = sorted(zip((d % ndim for d in destination), (s % ndim for s in source)))
    order = [axis for axis in range(ndim) if axis not in {s for _, s in moves}]
    for destination_axis, source_axis in moves:
        order.insert(destination_axis, source_axis)
    return mx.transpose(x, order)


def _isdtype(dtype, kind):
    if kind == "real floating":
        return dtype in (mx.float16, mx.bfloat16, mx.float32, mx.float64)
    if kind == "integral":  # token ids
        return mx.issubdtype(dtype, mx.integer)
    return mx.issubdtype(dtype, kind)


# MLX computes float64 exp (and so logaddexp) to float32 accuracy only, while
# its float64 expm1, log1p and power are accurate: rebuild exp from those.
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of log(2): k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00


def _exp(x):
    if x.dtype != mx.float64:
        return mx.exp(x)
    x = mx.clip(x, -800.0, 800.0)  # exp is 0 / inf there already; keeps k finite
    k = mx.round(x * _INV_LN2)
    r = (x - k * _LN2_HI) - k * _LN2_LO  # |r| <= log(2)/2
    half = mx.floor(0.5 * k)  # 2**k in two factors: no overflow/underflow of 2**k alone near the ends
    return (mx.power(2.0, half) * (1.0 + mx.expm1(r))) * mx.power(2.0, k - half)


def _logaddexp(x, y):
    if x.dtype != mx.float64:
        return mx.logaddexp(x, y)
    high = mx.maximum(x, y)
    return high + mx.log1p(_exp(-mx.abs(x - y)))


class _Namespace:
    """``mlx.core`` completed where it differs from the array API standard."""

    __name__ = "backends.mlx.xp"

    def __init__(self, **completions):
        self.__dict__.update(completions)

    def __getattr__(self, name):
        return getattr(mx, name)

    def __repr__(self):
        return "<mlx.core, completed by backends.mlx>"


xp = _Namespace(
    zeros=_zeros,
    asarray=_asarray,
    isdtype=_isdtype,
    moveaxis=_moveaxis,
    astype=lambda x, dtype, copy=True: x.astype(dtype),  # MLX arrays share no views: a copy is moot
    exp=_exp,
    logaddexp=_logaddexp,
)


class MlxBackend(Backend):
    name = "mlx"
    xp = xp
    array_types = (mx.array,)
    default_dtype = mx.float32

    def dtype(self, spec):
        if spec is None:
            return self.default_dtype
        if isinstance(spec, mx.Dtype):
            return spec
        import numpy as np

        name = spec if isinstance(spec, str) else np.dtype(spec).name
        if name not in _DTYPES:
            raise TypeError(f"backends.mlx: expected a floating dtype ({', '.join(_DTYPES)}), got {spec!r}")
        return _DTYPES[name]

    def asarray(self, value):
        if isinstance(value, mx.array):
            return value
        from ._host import to_host

        if is_torch_bfloat16(value):
            # NumPy has no bfloat16: through float32, which holds every bfloat16 value exactly.
            return mx.array(to_host(value.float()), dtype=mx.float32).astype(mx.bfloat16)
        host = to_host(value)
        # mx.array(host) would narrow float64 to float32: keep the dtype.
        return mx.array(host, dtype=_DTYPES.get(host.dtype.name))

    def to_numpy(self, array):
        import numpy as np

        return np.asarray(array)

    def read_tensors(self, file):
        return dict(mx.load(str(file)))  # MLX reads safetensors itself, bfloat16 included

    def draws(self, dtype, seed):
        keys = [None if seed is None else mx.random.key(seed)]

        def next_key():  # None: MLX's global generator (mx.random.seed)
            if keys[0] is None:
                return None
            keys[0], key = mx.random.split(keys[0])
            return key

        # MLX draws in float32 at most; wider dtypes get float32 draws, cast.
        draw_dtype = mx.float32 if dtype == mx.float64 else dtype
        return ssm_core.Draws(
            xp=xp,
            dtype=dtype,
            uniform=lambda shape: mx.random.uniform(shape=shape, dtype=draw_dtype, key=next_key()).astype(dtype),
            normal=lambda shape: mx.random.normal(shape=shape, dtype=draw_dtype, key=next_key()).astype(dtype),
        )

    # mx.compile fuses the scan block's elementwise chains. On the Linux CPU
    # build a compiled block measured no faster than eager (exp dominates), so
    # the automatic policy compiles on Apple GPUs only.
    compiler_name = "mx.compile"
    fused_block = 8
    compile_auto = mx.metal.is_available()

    def compile_block(self, key):
        def block(*arrays):
            return ssm_core.selective_block(ssm_core.BlockInputs(*arrays), xp)

        compiled = mx.compile(block)
        return lambda inputs: compiled(*inputs)

    def scan_method(self, time_invariant, xs):
        # The CPU-only build links the reference BLAS ([8192, 256] x [256, 64] takes about
        # 230 ms there, 3 ms in torch): S4/S5's chunked form is no faster than stepping
        # (measured: S4 slower up to T = 256, S5 even), so they step.
        if time_invariant and not mx.metal.is_available():
            return "loop"
        return super().scan_method(time_invariant, xs)

    def finish(self, arrays):
        mx.eval(*(a for a in arrays if a is not None))

    def synchronize(self):
        mx.synchronize()


backend = MlxBackend()
asarray = backend.asarray
ssm_core.register_namespace(mx, xp)
S4, S5, S6, Mamba, from_torch = bind(backend)
MambaLM = bind_lm(backend, Mamba)
