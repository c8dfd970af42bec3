"""``ssm-anywhere``: run a pretrained Mamba checkpoint from the command line, on any backend.

::

    ssm-anywhere generate --model DIR --prompt "The state space" --backend numpy --max-new-tokens 32

``DIR`` is a checkpoint directory in the Hugging Face layout (download one with
``huggingface_hub.snapshot_download("state-spaces/mamba-130m-hf")``). The prompt
is tokenized with the checkpoint's ``tokenizer.json`` (the ``tokenizers``
package); ``--prompt-ids 1,2,3`` gives the ids instead. The text streams as it
is generated, and a last line gives the prefill and decode rates. A mistake (no
such directory, a checkpoint that is not Mamba, a backend that is not
installed) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

__all__ = ["main"]

BACKENDS = ("numpy", "torch", "mlx", "cupy")


class UsageError(Exception):
    """A mistake of the command line's user: said in one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssm-anywhere", description="Pretrained Mamba language models on any backend.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="continue a prompt, streaming the new text")
    generate.add_argument("--model", required=True,
                          help="a checkpoint directory (config.json and model.safetensors), or a Hugging Face "
                               "repository id (downloaded with huggingface_hub)")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text (tokenized with the checkpoint's tokenizer.json)")
    prompt.add_argument("--prompt-ids", help="the prompt as comma-separated token ids")
    generate.add_argument("--backend", choices=BACKENDS, default="numpy", help="the array library (default numpy)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    generate.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    generate.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    generate.add_argument("--dtype", default=None, help="float32 (default: the checkpoint's), float64, ...")
    return parser


def _model_class(backend: str):
    """The backend's ``MambaLM`` class, or a :class:`UsageError` saying why it cannot be used."""
    if backend == "torch":
        try:
            return importlib.import_module("tracetorch").ssm.MambaLM
        except ImportError as error:
            raise UsageError(f"the torch backend needs torch ({error}); pip install torch") from None
    import backends

    try:
        return backends.load(backend).MambaLM
    except ImportError as error:
        raise UsageError(str(error).removeprefix("backends.load: ")) from None


def _tokenizer(model: Path):
    """The checkpoint's tokenizer (``tokenizers``), or None where it has no ``tokenizer.json``."""
    file = model / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError("reading tokenizer.json needs the tokenizers package: pip install tokenizers") from None
    return Tokenizer.from_file(str(file))


def _prompt_ids(args, tokenizer) -> list:
    if args.prompt_ids is not None:
        try:
            return [int(part) for part in args.prompt_ids.split(",") if part.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer.json: give the prompt as --prompt-ids")
    return tokenizer.encode(args.prompt).ids


def _generate(args, out) -> None:
    from ssm_core.lm import checkpoint_folder

    try:  # a directory, or a Hugging Face repository id where huggingface_hub is installed
        model = checkpoint_folder(args.model, "ssm-anywhere")
    except FileNotFoundError as error:
        raise UsageError(str(error).removeprefix("ssm-anywhere: ")) from None
    if not model.is_dir():
        raise UsageError(f"no checkpoint directory {str(model)!r}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    tokenizer = _tokenizer(model)
    ids = _prompt_ids(args, tokenizer)
    if not ids:
        raise UsageError("the prompt has no tokens")
    MambaLM = _model_class(args.backend)
    try:
        lm = MambaLM.from_pretrained(model, dtype=args.dtype)
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise UsageError(str(error)) from None

    new, text = [], ""
    start = time.perf_counter()
    first = None
    for step in lm.stream(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        if first is None:
            first = time.perf_counter()  # the prompt's scan, which gives the first new token
        new.append(int(step[0]))
        if tokenizer is None:
            out.write(f"{new[-1]} ")
        else:
            # Decoding the whole continuation and printing what is new keeps characters made of several tokens whole.
            decoded = tokenizer.decode(new)
            out.write(decoded[len(text):])
            text = decoded
        out.flush()
    end = time.perf_counter()
    decode_rate = (len(new) - 1) / (end - first) if len(new) > 1 else float("nan")
    out.write(
        f"\n[{args.backend}] prefill: {len(ids)} tokens in {first - start:.3f} s ({len(ids) / (first - start):.1f} tokens/s); "
        f"decode: {len(new) - 1} tokens at {decode_rate:.1f} tokens/s\n"
    )


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _generate(args, sys.stdout)
    except UsageError as error:
        print(f"ssm-anywhere: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
