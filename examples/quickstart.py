"""Quickstart: a traceTorch model with all four SSM layers, stepped one timestep at a time.

Then the same weights run on the NumPy backend (and MLX when installed), step
by step, giving the same outputs.

    python examples/quickstart.py
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import backends
import tracetorch as tt


class Net(tt.Model):
    def __init__(self, features: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, features),
            tt.ssm.Mamba(features),
            tt.ssm.S4(features, d_state=16),
            tt.ssm.S5(features, d_state=16),
            tt.ssm.S6(features),
            nn.Linear(features, 2),
        )

    def forward(self, x):
        return self.net(x)


def main() -> None:
    torch.manual_seed(0)
    model = Net()
    xs = torch.randn(20, 4, 10)  # [T, batch, features]

    model.zero_states()
    with torch.no_grad():
        ys = torch.stack([model(x_t) for x_t in xs])  # one timestep per call
    print(f"torch:  inputs {tuple(xs.shape)} -> outputs {tuple(ys.shape)}, checksum {ys.sum().item():+.6f}")
    for key, state in model.save_states().items():
        print(f"        state {key:<22} {tuple(state.shape)}")

    # The same weights on every other backend installed, stepped the same way.
    first, ssm_layers, last = model.net[0], list(model.net)[1:-1], model.net[-1]
    hidden = first(xs).detach().numpy()  # [T, batch, features]
    for name, reason in backends.available().items():
        if reason is not None or name == "array_api_strict":
            continue
        lib = backends.load(name)
        layers = [lib.from_torch(layer) for layer in ssm_layers]
        outs = []
        for h in hidden:
            h = lib.asarray(h)
            for layer in layers:
                h = layer(h)
            outs.append(lib.backend.to_numpy(h))
        out = last(torch.from_numpy(np.stack(outs))).detach()
        print(f"{name + ':':<7} same weights, worst difference to torch {float((out - ys).abs().max()):.2e}")


if __name__ == "__main__":
    main()
