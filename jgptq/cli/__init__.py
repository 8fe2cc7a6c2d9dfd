"""The ``jgptq`` command line.

Each subcommand lives in its own module here with two functions: ``add_arguments(parser)`` (cheap:
no JAX import at module import time, so ``jgptq --help`` is instant) and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Add a line when a subcommand module lands.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quantize": ("jgptq.cli.quantize", "Quantize a model with GPTQ (default: SmolLM2-135M) and write a checkpoint + report"),
    "eval": ("jgptq.cli.eval", "Perplexity of a float or GPTQ model on an evaluation corpus"),
    "generate": ("jgptq.cli.generate", "Generate text with a float or GPTQ model"),
    "convert": ("jgptq.cli.convert", "Convert between GGUF, Hugging Face float and GPTQ checkpoint folders"),
}


def build_parser() -> argparse.ArgumentParser:
    from jgptq import __version__

    parser = argparse.ArgumentParser(
        prog="jgptq",
        description="GPTQ post-training quantization in JAX: quantize, evaluate, run and export models.",
    )
    parser.add_argument("--version", action="version", version=f"jgptq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m jgptq.cli
    sys.exit(main())
