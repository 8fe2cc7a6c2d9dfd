"""``jgptq convert``: GGUF / Hugging Face float / GPTQ folders -> Hugging Face safetensors folders.

- a ``.gguf`` file or a float Hugging Face folder -> a float Hugging Face folder (``--dtype``), which
  transformers loads with ``AutoModelForCausalLM.from_pretrained``;
- a GPTQ folder (any writer: AutoGPTQ, GPTQModel, optimum, jgptq) -> a GPTQ folder re-written by jgptq,
  e.g. between the v1 (``gptq``) and v2 (``gptq_v2``) zero-point conventions (``--format``), with the
  loader's checks applied on the way (a mislabelled file can be repaired with ``--read-format``).

Every output folder is written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options (no JAX import here)."""
    p.add_argument("src", help="a .gguf file, a Hugging Face float folder or a GPTQ checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of float tensors (default: float32 for float models, float16 for GPTQ)")
    p.add_argument("--format", dest="checkpoint_format", default="auto", choices=["auto", "gptq", "gptq_v2"],
                   help="GPTQ sources: zero-point convention to write (auto: v1 when every zero is >= 1)")
    p.add_argument("--read-format", default=None, choices=["gptq", "gptq_v2"],
                   help="GPTQ sources: decode the source's zero points with this convention instead of what it "
                        "declares (to repair a mislabelled checkpoint)")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (e.g. 2GB, 500MB)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")


def _source_generation_config(src: Path) -> dict[str, Any] | None:
    f = src / "generation_config.json" if src.is_dir() else None
    if f is not None and f.is_file():
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            return None
        return {k: v for k, v in data.items() if k != "transformers_version"} if isinstance(data, dict) else None
    return None


def run(args: argparse.Namespace) -> int:
    from jgptq.checkpoint import CheckpointError, export_gptq, export_hf
    from jgptq.models.loading import model_kind

    src = Path(args.src)
    try:
        kind = model_kind(src)
    except (ValueError, FileNotFoundError) as e:
        print(f"jgptq convert: {e}", file=sys.stderr)
        return 2
    gen = _source_generation_config(src)
    try:
        if kind == "gptq":
            from jgptq.models.gptq_folder import load_gptq_folder

            config, params, _, info = load_gptq_folder(src, tokenizer=False, checkpoint_format=args.read_format)
            tokenizer = None if args.no_tokenizer or not src.is_dir() else _tokenizer_source(src)
            out = export_gptq(args.out, config, params, info.quant_config, tokenizer=tokenizer,
                              checkpoint_format=args.checkpoint_format, dtype=args.dtype or "float16",
                              generation_config=gen, max_shard_size=args.max_shard_size,
                              overwrite=args.overwrite, dynamic=info.raw.get("dynamic") or None)
            q = json.loads((Path(out) / "quantize_config.json").read_text())
            print(f"wrote GPTQ folder {out}: {info.bits}-bit, group {info.group_size}, "
                  f"{'sym' if info.sym else 'asym'}, read as {info.checkpoint_format}, written as "
                  f"{q['checkpoint_format']}")
            return 0
        if args.read_format or args.checkpoint_format != "auto":
            print("jgptq convert: --format/--read-format apply to GPTQ sources only; "
                  f"{src} is a {kind} model", file=sys.stderr)
            return 2
        from jgptq.models.loading import load

        loaded = load(src, dtype="float32", tokenizer=not args.no_tokenizer)
        tokenizer = None if args.no_tokenizer else (
            _tokenizer_source(src) if kind == "hf" else loaded.tokenizer)
        out = export_hf(args.out, loaded.config, loaded.params, tokenizer=tokenizer, dtype=args.dtype or "float32",
                        generation_config=gen, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        print(f"wrote Hugging Face folder {out} ({args.dtype or 'float32'}) from {kind} source {src}")
        return 0
    except CheckpointError as e:
        print(f"jgptq convert: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # loader errors (GPTQFolderError, ConfigError, SafetensorsError, GGUFError)
        print(f"jgptq convert: cannot read {src}: {e}", file=sys.stderr)
        return 1


def _tokenizer_source(folder: Path) -> Path | None:
    """The folder itself when it holds tokenizer files (copied verbatim), else None."""
    from jgptq.checkpoint import TOKENIZER_FILES

    return folder if any((folder / n).is_file() for n in TOKENIZER_FILES) else None
