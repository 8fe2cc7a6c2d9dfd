"""The ``jgptq`` command line.

Each subcommand lives in its own module here with two functions: ``add_arguments(parser)`` (cheap:
no JAX import at module import time, so ``jgptq --help`` is instant) and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    enable_compilation_cache()
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def enable_compilation_cache() -> str | None:
    """Keep XLA's compiled programs on disk so a second ``jgptq`` run skips compilation.

    The cache lives in ``$JGPTQ_XLA_CACHE`` (default: ``xla/`` in the artifact cache,
    ``$JGPTQ_CACHE`` or ``~/.cache/jgptq``); ``JGPTQ_XLA_CACHE=off`` disables it. Only the command
    line sets this process-wide JAX option; the library never does. Returns the folder or None.
    """
    choice = os.environ.get("JGPTQ_XLA_CACHE", "")
    if choice.lower() in ("0", "off", "no", "none", "false"):
        return None
    import jax

    from jgptq.artifacts import cache_dir

    path = choice or str(cache_dir() / "xla")
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except (OSError, AttributeError) as e:  # an unwritable folder must not stop the job
        print(f"jgptq: XLA compilation cache disabled ({e})", file=sys.stderr)
        return None
    return path


if __name__ == "__main__":  # python -m jgptq.cli
    sys.exit(main())
