"""Train in torch, deploy on NumPy and MLX: a Mamba model learns selective copying.

The task (the selective-copying task of the Mamba paper): a sequence of
``--length`` positions holds ``--tokens`` data tokens (from a vocabulary of
``--vocab``) at random positions among blanks; then come ``--tokens`` marker
positions, at which the model must output the data tokens in their order. A
model without selective memory cannot do better than chance (1/vocab per
token): where the tokens sit changes with every sequence, so the layers must
decide, per input, what to keep.

1. Train a ``tt.Model`` (embedding, two ``tt.ssm.Mamba`` layers, linear head)
   in sequence mode (``model.scan``: a whole batch of sequences per call).
2. Evaluate it on held-out sequences; save a loss/accuracy plot and the weights.
3. Export the weights to every backend installed (NumPy always; MLX, CuPy
   when present), stream the test sequences one timestep at a time through
   each, and print: backend, accuracy, worst difference to torch, step latency.

    python examples/demo.py --help
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import backends
import tracetorch as tt


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="training steps (batches)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--device", default="cpu", help="torch device for training, e.g. cpu or cuda")
    parser.add_argument(
        "--backends", default="all",
        help="comma-separated backends to deploy on (numpy, mlx, cupy, array_api_strict), or 'all' installed",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the plot and the weights")
    parser.add_argument("--batch", type=int, default=64, help="sequences per training batch")
    parser.add_argument("--test", type=int, default=256, help="held-out test sequences")
    parser.add_argument("--length", type=int, default=16, help="positions holding the data tokens and blanks")
    parser.add_argument("--tokens", type=int, default=4, help="data tokens to remember per sequence")
    parser.add_argument("--vocab", type=int, default=8, help="distinct data tokens")
    parser.add_argument("--width", type=int, default=32, help="model width (features)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "test", "length", "tokens", "vocab", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.tokens > args.length:
        parser.error(f"--tokens ({args.tokens}) must not exceed --length ({args.length}): each token needs a position")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    problem = device_problem(args.device)
    if problem:
        parser.error(f"--device {args.device}: {problem}")
    problem = out_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    return args


def out_problem(path: Path):
    """Why ``path`` cannot be (or become) the output folder, or None."""
    if path.exists():
        return None if path.is_dir() else "exists and is not a folder; give a folder (one is created if missing)"
    for parent in path.parents:  # the nearest existing ancestor must be a folder to create the rest in
        if parent.exists():
            return None if parent.is_dir() else f"{parent} exists and is not a folder, so no folder can be made in it"
    return None


def device_problem(name: str):
    """Why torch cannot train on device ``name`` here, or None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        return str(error).splitlines()[0]
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "is_available") or not module.is_available():
        return f"this torch build ({torch.__version__}) has no usable {device.type} device"
    return None


# ----------------------------------------------------------------------------- the task


def selective_copying(generator: torch.Generator, batch: int, length: int, tokens: int, vocab: int):
    """``(inputs [T, batch], targets [tokens, batch])``: data tokens among blanks, then markers."""
    blank, marker = vocab, vocab + 1
    data = torch.randint(0, vocab, (batch, tokens), generator=generator)
    positions = torch.rand(batch, length, generator=generator).argsort(dim=-1)[:, :tokens].sort(dim=-1).values
    inputs = torch.full((batch, length + tokens), blank)
    inputs[torch.arange(batch)[:, None], positions] = data
    inputs[:, length:] = marker
    return inputs.T.contiguous(), data.T.contiguous()


class Copier(tt.Model):
    """Embedding -> Mamba -> Mamba -> linear head, one timestep per call (or a sequence with ``scan``)."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab + 2, width)  # data tokens, blank, marker
        self.body = nn.Sequential(tt.ssm.Mamba(width, d_state=8), tt.ssm.Mamba(width, d_state=8))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(self.body(self.embed(tokens)))


def accuracy(logits, targets) -> float:
    return float((logits.argmax(-1) == targets).float().mean())


# ----------------------------------------------------------------------------- training


class PlainProgress:
    """What the demo uses of a tqdm bar, where tqdm is not installed: a line at every tenth of the run."""

    def __init__(self, iterable, desc: str, total: int):
        self.iterable, self.desc, self.total = iterable, desc, total
        self.postfix = ""

    def __iter__(self):
        every = max(1, self.total // 10)
        for done, item in enumerate(self.iterable, 1):
            yield item
            if done % every == 0 or done == self.total:
                print(f"{self.desc}: {done}/{self.total} {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, **values):
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())


def progress_bar(iterable, desc: str, total: int):
    """A tqdm bar over ``iterable`` (the demo extra installs tqdm), else :class:`PlainProgress`."""
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgress(iterable, desc, total)
    # disable=None: a live bar on a terminal, silence in logs
    return tqdm(iterable, desc=desc, total=total, unit="batch", disable=None, mininterval=0.5)


def train(args, model, device) -> dict:
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = {"loss": [], "accuracy": []}
    progress = progress_bar(range(args.steps), "training (sequence mode)", args.steps)
    for _ in progress:
        inputs, targets = selective_copying(generator, args.batch, args.length, args.tokens, args.vocab)
        inputs, targets = inputs.to(device), targets.to(device)
        model.zero_states()
        logits = model.scan(inputs)[-args.tokens :]  # [tokens, batch, vocab] at the markers
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        history["accuracy"].append(accuracy(logits, targets))
        progress.set_postfix(loss=f"{history['loss'][-1]:.3f}", acc=f"{history['accuracy'][-1]:.2f}")
    return history


def save_plot(history: dict, chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, width=20):
        return np.convolve(values, np.ones(width) / width, mode="valid") if len(values) >= width else values

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(history["loss"], alpha=0.3, color="tab:blue")
    ax_loss.plot(smooth(history["loss"]), color="tab:blue")
    ax_loss.set(title="training loss (cross-entropy)", xlabel="batch", yscale="log")
    ax_acc.plot(history["accuracy"], alpha=0.3, color="tab:green")
    ax_acc.plot(smooth(history["accuracy"]), color="tab:green", label="recall accuracy")
    ax_acc.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.3f})")
    ax_acc.set(title="accuracy on the copied tokens", xlabel="batch", ylim=(0, 1.02))
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- deployment


def stream_on_backend(lib, model, inputs: np.ndarray):
    """Run ``model``'s trained weights on backend ``lib`` one timestep at a time.

    Returns ``(logits [T, batch, vocab] as NumPy, median seconds per step)``.
    """
    xp = lib.backend.xp
    layers = [lib.from_torch(layer.cpu()) for layer in model.body]
    table = lib.asarray(model.embed.weight.detach().cpu().numpy())
    head_w = lib.asarray(model.head.weight.detach().cpu().numpy())
    head_b = lib.asarray(model.head.bias.detach().cpu().numpy())
    outputs, times = [], []
    for tokens in inputs:  # one timestep of every test sequence
        start = time.perf_counter()
        h = xp.take(table, lib.asarray(tokens), axis=0)  # [batch, width]
        for layer in layers:
            h = layer(h)
        logits = h @ head_w.T + head_b  # [batch, vocab]
        lib.backend.synchronize()
        times.append(time.perf_counter() - start)
        outputs.append(lib.backend.to_numpy(logits))
    return np.stack(outputs), statistics.median(times)


def stream_on_torch(model, inputs: torch.Tensor):
    """The torch model stepped one timestep at a time: ``(logits, median seconds per step)``."""
    model.zero_states()
    outputs, times = [], []
    with torch.no_grad():
        for tokens in inputs:
            start = time.perf_counter()
            outputs.append(model(tokens))
            if tokens.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return torch.stack(outputs).cpu().numpy(), statistics.median(times)


def chosen_backends(spec: str) -> list:
    status = backends.available()
    if spec == "all":
        return [name for name, reason in status.items() if reason is None and name != "array_api_strict"]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in status:
            raise SystemExit(f"demo: unknown backend {name!r}; expected some of {', '.join(status)}")
        if status[name] is not None:
            raise SystemExit(f"demo: backend {name} is not usable here: {status[name]}")
    return names


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    deploy_on = chosen_backends(args.backends)
    args.out.mkdir(parents=True, exist_ok=True)

    model = Copier(args.vocab, args.width).to(device)
    started = time.perf_counter()
    history = train(args, model, device)
    train_seconds = time.perf_counter() - started

    chance = 1.0 / args.vocab
    inputs, targets = selective_copying(
        torch.Generator().manual_seed(args.seed + 2), args.test, args.length, args.tokens, args.vocab
    )
    model.zero_states()
    with torch.no_grad():
        reference = model.scan(inputs.to(device)).cpu().numpy()  # [T, test, vocab]
    test_accuracy = accuracy(torch.from_numpy(reference[-args.tokens :]), targets)
    save_plot(history, chance, args.out / "training.png")
    torch.save(model.state_dict(), args.out / "copier.pt")
    print(
        f"\ntrained {args.steps} batches in {train_seconds:.0f} s; held-out recall accuracy {test_accuracy:.3f} "
        f"(chance {chance:.3f}); plot and weights in {args.out}/"
    )

    rows = []
    logits, seconds = stream_on_torch(model, inputs.to(device))
    rows.append((f"torch ({device.type}, stepped)", logits, seconds))
    for name in deploy_on:
        lib = backends.load(name)
        logits, seconds = stream_on_backend(lib, model, inputs.numpy())
        rows.append((name, logits, seconds))
    scale = float(np.abs(reference).max())
    print(f"\n{'backend':<24} {'accuracy':>8} {'worst diff to torch':>20} {'step latency':>13}")
    results = {}
    for name, logits, seconds in rows:
        acc = accuracy(torch.from_numpy(logits[-args.tokens :]), targets)
        worst = float(np.abs(logits - reference).max()) / scale
        results[name] = {"accuracy": acc, "worst_difference": worst, "step_seconds": seconds}
        print(f"{name:<24} {acc:>8.3f} {worst:>20.2e} {seconds * 1e6:>10.0f} us")
    print("(worst diff: max |logits - torch sequence-mode logits| / max |torch logits|, over every step)")
    return {"test_accuracy": test_accuracy, "chance": chance, "backends": results}


if __name__ == "__main__":
    main()
