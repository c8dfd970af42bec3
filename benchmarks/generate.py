"""Token generation with a pretrained-size Mamba: ours on each backend against ``transformers``, in one run.

``python -m benchmarks.generate [--quick] [--threads 2] [--new-tokens 32] [--prefill 512]``

A random model of ``state-spaces/mamba-130m-hf``'s shape (768 wide, 24 layers,
expand 2, ``d_state`` 16, vocabulary 50,280, tied head), float32, batch 1,
written once with ``transformers``' ``save_pretrained`` and loaded from there by
every contender, so all run the same weights:

- **decode**: ms per new token, greedy, states as the cache (``transformers``:
  its cached ``generate``); the time of ``max_new_tokens = 1 + n`` minus that of
  ``1``, over ``n``, so the prompt's cost cancels;
- **floor**: reading every weight once at the copy bandwidth measured here, the
  least a decode step can take on this machine (a step reads all weights);
- **prefill**: one forward over a ``--prefill``-token prompt (ours: ``scan``);
- **memory**: the process's resident memory after decoding ``n`` and ``4 n``
  more tokens: a decode that keeps nothing per token adds nothing.

``--quick`` is a smoke run on a 2-layer model (figures not comparable).
Without ``transformers`` installed (``pip install -e '.[bench]'``) its rows are skipped.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results-local"
SHAPE = dict(hidden_size=768, num_hidden_layers=24, expand=2, state_size=16, vocab_size=50280, conv_kernel=4,
             tie_word_embeddings=True)
QUICK_SHAPE = dict(SHAPE, num_hidden_layers=2)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def copy_bandwidth(nbytes: int = 1 << 28, rounds: int = 5) -> float:
    """Bytes per second moved by a large ``numpy`` copy, its reads and writes counted: the memory's rate."""
    source = np.ones(nbytes // 4, np.float32)
    target = np.empty_like(source)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times)


def write_checkpoint(folder: Path, shape: dict, seed: int = 0) -> int:
    """A random ``MambaForCausalLM`` of ``shape`` saved in ``folder``; returns its weights' size in bytes."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**shape)).float().eval()
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ours(name: str):
    """``(MambaLM class, ids from a NumPy array)`` of backend ``name``."""
    if name == "torch":
        import torch
        import tracetorch as tt

        return tt.ssm.MambaLM, torch.as_tensor
    import backends

    module = backends.load(name)
    return module.MambaLM, module.asarray


def measure_ours(name: str, folder: Path, prompt: np.ndarray, long_prompt: np.ndarray, new: int, rounds: int) -> dict:
    import torch

    cls, as_ids = _ours(name)
    lm = cls.from_pretrained(folder, dtype="float32" if name != "torch" else torch.float32)
    prompt = prompt.tolist()
    if name == "torch":
        lm.eval()
    context = torch.no_grad() if name == "torch" else _nullcontext()
    with context:
        lm.generate(prompt, 2)  # warm-up
        one = _median_time(lambda: lm.generate(prompt, 1), rounds)
        more = _median_time(lambda: lm.generate(prompt, 1 + new), rounds)
        prefill_ids = as_ids(np.ascontiguousarray(long_prompt.T))  # [T, batch]

        def prefill():
            lm.zero_states()
            lm.scan(prefill_ids)

        prefill()
        prefill_s = _median_time(prefill, max(1, rounds // 2))
        lm.generate(prompt, 1 + new)
        before = _rss_mib()
        lm.generate(prompt, 1 + 4 * new)
        after = _rss_mib()
    return {"decode_ms": (more - one) / new * 1e3, "prefill_s": prefill_s, "rss_growth_mib": after - before}


def measure_transformers(folder: Path, prompt: np.ndarray, long_prompt: np.ndarray, new: int, rounds: int) -> dict:
    import torch
    from transformers import MambaForCausalLM

    model = MambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, long_ids = torch.as_tensor(prompt), torch.as_tensor(long_prompt)

    def generate(count):
        # eos_token_id=[]: no stopping (None would fall back to the config's eos id).
        model.generate(ids, max_new_tokens=count, do_sample=False, eos_token_id=[], pad_token_id=0)

    with torch.no_grad():
        generate(2)
        one = _median_time(lambda: generate(1), rounds)
        more = _median_time(lambda: generate(1 + new), rounds)
        model(long_ids)
        prefill_s = _median_time(lambda: model(long_ids), max(1, rounds // 2))
    return {"decode_ms": (more - one) / new * 1e3, "prefill_s": prefill_s, "rss_growth_mib": float("nan")}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer smoke run (figures not comparable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="torch,numpy", help="comma-separated: torch, numpy, mlx, cupy (default torch,numpy)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    shape = QUICK_SHAPE if args.quick else SHAPE
    new = 4 if args.quick else args.new_tokens
    prefill_len = 32 if args.quick else args.prefill
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, shape["vocab_size"], (1, 8))
    long_prompt = rng.integers(0, shape["vocab_size"], (1, prefill_len))
    load = os.getloadavg()[0]
    bandwidth = copy_bandwidth()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            nbytes = write_checkpoint(folder, shape)
        except ImportError as error:
            return f"python -m benchmarks.generate needs transformers to write the checkpoint ({error}): pip install -e '.[bench]'"
        floor_ms = nbytes / bandwidth * 1e3
        rows["transformers (torch, cached generate)"] = measure_transformers(folder, prompt, long_prompt, new, args.rounds)
        gc.collect()
        for name in args.backends.split(","):
            try:
                rows[f"ours: {name}"] = measure_ours(name, folder, prompt, long_prompt, new, args.rounds)
            except ImportError as error:
                rows[f"ours: {name}"] = {"skipped": str(error)}
            gc.collect()
    reference = rows["transformers (torch, cached generate)"]
    lines = [
        f"Generation, random model of mamba-130m's shape ({shape['num_hidden_layers']} layers, {shape['hidden_size']} wide, "
        f"vocabulary {shape['vocab_size']}), float32, batch 1, {args.threads} threads, torch {torch.__version__}; "
        f"1-minute load average {load:.2f} at the start.",
        f"Weights {nbytes / 2**20:.0f} MiB; copy bandwidth measured {bandwidth / 1e9:.1f} GB/s: decode floor "
        f"{floor_ms:.1f} ms a token.",
        "",
        f"| | decode (ms/token) | / floor | speed-up over transformers | prefill of {prefill_len} tokens (s) | "
        f"speed-up over transformers | RSS growth over {4 * new} more tokens (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in rows.items():
        if "skipped" in row:
            lines.append(f"| {label} | skipped: {row['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {label} | {row['decode_ms']:.1f} | {row['decode_ms'] / floor_ms:.2f} | "
            f"{reference['decode_ms'] / row['decode_ms']:.2f}× | {row['prefill_s']:.2f} | "
            f"{reference['prefill_s'] / row['prefill_s']:.2f}× | {row['rss_growth_mib']:.0f} |"
        )
    text = "\n".join(lines)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "generate.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    print(main())
