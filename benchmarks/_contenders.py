"""What ``benchmarks.scan`` times: each contender built on one whole sequence.

``build(job)`` is shared by the timing loop of ``benchmarks.scan`` and by
the fresh process of ``benchmarks._peak`` that measures a contender's peak
memory and first call: both import it from here.
"""

from __future__ import annotations

import inspect
import sys

import torch

import tracetorch as tt

from ._layers import PUBLISHED, make_layer

FEATURES = 256
WARMUP_T = 48  # warm-up sequences are this short: the same code paths (S4/S5 scans are chunked from 32 and 48 steps on)
PEERS = ("mamba.py pscan", "transformers MambaMixer")


def scan_variants(scan, prefix: str) -> dict:
    """``{contender: keyword arguments of scan}``: eager and compiled apart when ``scan`` takes ``compiled=``."""
    if "compiled" in inspect.signature(scan).parameters:
        return {f"{prefix} scan eager": {"compiled": False}, f"{prefix} scan compiled": {"compiled": True}}
    return {f"{prefix} scan": {}}


def contenders(layer: str) -> list:
    names = ["floor", PUBLISHED, "ours step", *scan_variants(getattr(tt.ssm, layer).scan, "ours")]
    return names + list(PEERS) if layer == "Mamba" else names


# Decay values per block of the floor's exp: 2 MiB of float32, what a core's cache holds.
EXP_BLOCK = 2**19


def _floor(layer: str, grad: bool, device: str):
    """The exp and matmul work ``layer`` cannot avoid over a sequence ``[T, B, N]``: ``(forward, weights)``.

    S4/S5: the states' input and readout, ``[T·B, N] x [N, d]`` and
    ``[T·B, d] x [d, N]`` (S5's products; S4 does as many multiply-adds,
    feature by feature). S6: the projections (``x_proj``, ``dt_proj``) and one
    exp per decay value, ``T·B·N·d`` of them, in cache-sized blocks. Mamba:
    S6's, plus ``in_proj`` and ``out_proj``. Sums stand for the outputs, so
    that fwd+bwd runs the same work backwards.
    """
    sizes = make_layer(layer, FEATURES, "cpu")
    N, d, rank = FEATURES, sizes.d_state, getattr(sizes, "dt_rank", None)

    def weight(rows, cols):
        return (torch.randn(rows, cols, device=device) / rows**0.5).requires_grad_(grad)

    if layer in ("S4", "S5"):
        B, C = weight(N, d), weight(d, N)
        return (lambda xs: (xs.reshape(-1, N) @ B @ C).sum()), [B, C]
    w_x, w_dt, A, w_in, w_out = weight(N, rank + 2 * d), weight(rank, N), weight(N, d), weight(N, 2 * N), weight(N, N)
    rows = max(1, EXP_BLOCK // (N * d))

    def forward(xs):
        u = xs.reshape(-1, N)
        if layer == "Mamba":
            u = (u @ w_in)[:, :N]  # in_proj; its gate half meets the output before out_proj
        proj = u @ w_x  # x_proj: dt's low rank, B, C
        dt = proj[:, :rank] @ w_dt  # dt_proj
        total = proj[:, rank:].sum()
        for start in range(0, dt.shape[0], rows):
            total = total + torch.exp(dt[start : start + rows, :, None] * A).sum()
        return total + (u @ w_out).sum() if layer == "Mamba" else total

    return forward, [w_x, w_dt, A] + ([w_in, w_out] if layer == "Mamba" else [])


def _peer(contender: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if contender == "mamba.py pscan":
        from mambapy.mamba import MambaBlock, MambaConfig

        config = MambaConfig(d_model=FEATURES, n_layers=1, d_state=16, expand_factor=1, d_conv=4, pscan=True)
        return MambaBlock(config).to(device)
    for kernels in ("mamba_ssm", "causal_conv1d"):  # installed, they would replace the torch path measured here
        sys.modules.setdefault(kernels, None)
    import transformers
    from transformers.models.mamba.modeling_mamba import MambaMixer

    transformers.logging.set_verbosity_error()  # else it says, kernel by kernel, that it falls back to torch
    config = transformers.MambaConfig(hidden_size=FEATURES, state_size=16, expand=1, conv_kernel=4)
    return MambaMixer(config, layer_idx=0).to(device)


def _in_mode(mode: str, forward, params: list):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                forward()
    else:
        def call():
            for p in params:
                p.grad = None
            forward().sum().backward()
    return call


def build(job: dict):
    """``(call, warm)``: ``job``'s contender on one whole sequence in its mode, and on a short one to warm up.

    ``job`` names ``device``, ``layer``, ``T``, ``batch``, ``mode`` and ``contender``.
    """
    device, layer, who = job["device"], job["layer"], job["contender"]
    torch.manual_seed(1)
    xs = torch.randn(job["T"], job["batch"], FEATURES, device=device)
    if who == "floor":
        forward, params = _floor(layer, job["mode"] != "fwd", device)
    else:
        module = _peer(who, device) if who in PEERS else make_layer(layer, FEATURES, device, who == PUBLISHED)
        params = list(module.parameters())
        scan_kwargs = scan_variants(type(module).scan, "ours").get(who) if who.startswith("ours scan") else None

        def forward(seq):
            if who in PEERS:
                return module(seq.transpose(0, 1))  # batch first
            module.zero_states()
            if scan_kwargs is not None:
                return module.scan(seq, time_dim=0, **scan_kwargs)
            return torch.stack([module(x) for x in seq])

    call = _in_mode(job["mode"], lambda: forward(xs), params)
    if who.endswith("compiled"):  # a shorter sequence would compile another graph
        return call, call
    return call, _in_mode(job["mode"], lambda: forward(xs[:WARMUP_T]), params)
