"""Quality table: Brown-test perplexity of RTN vs GPTQ on SmolLM2-135M (issue 4's quality benchmark).

Protocol (the project's data notes): calibration = ``--nsamples`` windows of ``--seqlen`` Brown-train
tokens, window starts ``default_rng(seed).integers(0, n_train - seqlen, nsamples)`` (standard
128 x 2048, seed 0); perplexity on non-overlapping 2048-token windows of Brown-test (64 windows),
fp32. RTN = round-to-nearest with the same bits / group size / symmetry.

Rows (``--suite table``): fp; RTN and GPTQ with the reference's settings at 4-bit per-channel, 4-bit
g128 (± act-order), 3-bit g128 (± act-order), 2-bit g64; then GPTQ with jgptq's defaults
(``GPTQConfig.recommended()``: act-order + static groups + MSE clip search) at each setting. ``--suite ablation`` adds, per setting, what each
sound fix contributes: act-order + static groups, MSE clip search (``mse``), stronger damping, all
combined, the asymmetric grid, and RTN with the same clip search / asymmetric grid (the "RTN ppl"
column always compares with RTN on the same grid). ``--suite all`` runs both.

Quantized models are evaluated with their dequantized weights in the float forward (the very weights
the packed checkpoint holds; ``--packed-eval`` runs the packed GPTQ path instead).

Results are written after every row (``bench_quality.json``), so a run cut short keeps what it
finished, together with ``bench_quality.md`` (table) and ``quality.svg`` (plot) in ``--out``.

Usage (GPU):  python benchmarks/bench_quality.py --gguf PATH --tokens brown_ids.npz --out DIR
Quick CPU check:  python benchmarks/bench_quality.py --nsamples 4 --seqlen 128 --eval-windows 2
                  --eval-seqlen 256 --layers 2 --suite smoke --out /tmp/q
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quantize import add_common_arguments, brown_ids, load_model, machine  # noqa: E402

# (label, settings) of the table; RTN rows ignore desc_act.
TABLE = [
    ("4b per-channel", dict(bits=4, group_size=-1)),
    ("4b g128", dict(bits=4, group_size=128)),
    ("4b g128 act-order", dict(bits=4, group_size=128, desc_act=True)),
    ("3b g128", dict(bits=3, group_size=128)),
    ("3b g128 act-order", dict(bits=3, group_size=128, desc_act=True)),
    ("2b g64", dict(bits=2, group_size=64)),
]
# GPTQConfig.recommended(): jgptq's defaults (what `jgptq quantize` uses)
DEFAULTS = dict(desc_act=True, static_groups=True, mse=2.4)
# What each fix contributes, added to a base setting (label suffix, GPTQConfig overrides).
ABLATIONS = [
    ("act+static", dict(desc_act=True, static_groups=True)),
    ("mse", dict(mse=2.4)),
    ("damp 0.1", dict(damp_percent=0.1)),
    ("act+static+mse", dict(desc_act=True, static_groups=True, mse=2.4)),
    ("asym", dict(sym=False)),
]
# RTN variants compared alongside (the clip search and the asymmetric grid help RTN too).
RTN_ABLATIONS = [("mse", dict(mse=2.4)), ("asym", dict(sym=False))]
ABLATION_BASES = ["4b per-channel", "4b g128", "3b g128", "2b g64"]


def _rtn_key(settings: dict[str, Any]) -> tuple:
    return (settings["bits"], settings["group_size"], settings.get("sym", True), settings.get("mse", 0.0))


def plan(suite: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``[(row label, method, GPTQConfig kwargs)]`` for a suite; RTN rows deduplicated."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    seen_rtn: set[tuple] = set()

    def add(label: str, method: str, kw: dict[str, Any]) -> None:
        if method == "rtn":
            kw = {k: v for k, v in kw.items() if k in ("bits", "group_size", "sym", "mse")}
            if _rtn_key(kw) in seen_rtn:
                return
            seen_rtn.add(_rtn_key(kw))
        rows.append((label, method, kw))

    if suite == "smoke":
        add("4b g128", "rtn", dict(bits=4, group_size=128))
        add("4b g128", "gptq", dict(bits=4, group_size=128))
        return rows
    if suite in ("table", "all"):
        for label, kw in TABLE:
            add(label.replace(" act-order", ""), "rtn", kw)
            add(label, "gptq", kw)
        for label, kw in TABLE:
            if "act-order" not in label:
                add(f"{label} jgptq defaults", "gptq", {**kw, **DEFAULTS})
    if suite in ("ablation", "all"):
        base = dict(TABLE)
        for b in ABLATION_BASES:
            for suffix, extra in ABLATIONS:
                add(f"{b} {suffix}", "gptq", {**base[b], **extra})
            for suffix, extra in RTN_ABLATIONS:
                add(f"{b} {suffix}", "rtn", {**base[b], **extra})
    return rows


def dequantized(params: dict[str, Any]) -> dict[str, Any]:
    """The params tree with every packed linear replaced by its dequantized float kernel."""
    from jgptq.pack import dequantize_linear

    def walk(node: Any) -> Any:
        if isinstance(node, dict) and "qweight" in node:
            out = {"kernel": np.asarray(dequantize_linear(node))}
            if node.get("bias") is not None:
                out["bias"] = node["bias"]
            return out
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--suite", default="table", choices=["table", "ablation", "all", "smoke"])
    p.add_argument("--only", default=None, help="comma-separated row labels to run (subset of the suite)")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None, help="first N test windows only (quick runs)")
    p.add_argument("--eval-batch", type=int, default=4, help="windows per forward call")
    p.add_argument("--packed-eval", action="store_true", help="evaluate through the packed GPTQ linears")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="combine the rows of earlier bench_quality.json files (same protocol) into --out "
                        "and exit; a later file's row replaces an earlier one with the same label and method")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)

    import jax

    import jgptq
    from jgptq import data
    from jgptq.evaluate import model_perplexity

    os.makedirs(args.out, exist_ok=True)
    config, params, tokenizer = load_model(args)
    if args.prepare_tokens:
        from bench_quantize import prepare_tokens

        prepare_tokens(args, tokenizer)
        return 0
    params = jax.tree_util.tree_map(np.asarray, params)
    ids = brown_ids(args, tokenizer)
    calib = data.calibration_windows(ids["train"], args.nsamples, args.seqlen, args.seed)
    test = ids["test"]

    def ppl(p_tree: dict[str, Any]) -> dict[str, Any]:
        tree = p_tree if args.packed_eval else dequantized(p_tree)
        r = model_perplexity(config, tree, test, seqlen=args.eval_seqlen, batch_size=args.eval_batch,
                             max_windows=args.eval_windows)
        return {"ppl": r.ppl, "windows": r.n_windows, "partial": r.partial, "eval_s": r.seconds}

    result: dict[str, Any] = {
        "benchmark": "bench_quality",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "layers": len(params["layers"]),
        "calibration": {"data": "brown-train", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                        "compute_dtype": args.compute_dtype},
        "eval": {"data": "brown-test", "seqlen": args.eval_seqlen, "windows": args.eval_windows,
                 "packed": args.packed_eval},
        "machine": machine(),
        "rows": [],
    }

    def save() -> None:
        for name, text in (("bench_quality.json", json.dumps(result, indent=1)),
                           ("bench_quality.md", markdown(result) + "\n"), ("quality.svg", svg_plot(result))):
            path = os.path.join(args.out, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    t0 = time.perf_counter()
    result["fp"] = ppl(params)
    print(f"fp: ppl {result['fp']['ppl']:.3f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    save()
    rows = plan(args.suite)
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        rows = [r for r in rows if r[0] in keep]
    for label, method, kw in rows:
        cfg = jgptq.GPTQConfig(**kw)
        t0 = time.perf_counter()
        try:
            qparams, report = jgptq.quantize(params, calib if method == "gptq" else None, cfg, config,
                                             mode=method, batch_size=args.batch_size,
                                             compute_dtype=args.compute_dtype, progress=False)
        except Exception as e:  # keep the table going; record what failed and why
            result["rows"].append({"label": label, "method": method, "config": kw, "error": repr(e)})
            print(f"{method:>4} {label}: FAILED {e!r}", flush=True)
            save()
            continue
        q_s = time.perf_counter() - t0
        row = {"label": label, "method": method, "config": kw, "quantize_s": q_s,
               "timings": report.timings, **ppl(qparams)}
        if method == "gptq":
            tot = report.totals()
            row.update(layer_loss=tot["loss"], rtn_layer_loss=tot["rtn_loss"], mean_gain=tot["mean_gain"],
                       beats_rtn=f"{tot['beats_rtn']}/{tot['compared']}", max_damp=tot["max_damp"])
        result["rows"].append(row)
        print(f"{method:>4} {label}: ppl {row['ppl']:.3f} (quantize {q_s:.1f}s, eval {row['eval_s']:.1f}s)", flush=True)
        save()
        del qparams
    save()
    print(markdown(result))
    return 0


def merge(paths: list[str], out: str) -> int:
    """Merge runs of this script (one protocol) into one table/plot in ``out``."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    base = dict(runs[0])
    for key in ("calibration", "eval", "model"):
        for r in runs[1:]:
            if r[key] != base[key]:
                raise SystemExit(f"{path}: {key} differs from {paths[0]} ({r[key]} vs {base[key]}); "
                                 "only runs of one protocol can be merged")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in runs:
        for row in r["rows"]:
            rows[(row["label"], row["method"])] = row
    base["rows"] = list(rows.values())
    base["merged_from"] = [{"path": p, "machine": r["machine"]} for p, r in zip(paths, runs)]
    os.makedirs(out, exist_ok=True)
    for name, text in (("bench_quality.json", json.dumps(base, indent=1)),
                       ("bench_quality.md", markdown(base) + "\n"), ("quality.svg", svg_plot(base))):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    print(markdown(base))
    return 0


def _rtn_for(result: dict[str, Any], kw: dict[str, Any]) -> float | None:
    """Perplexity of the RTN row (no clip search) on the grid (bits, group, sym) of ``kw``, if it ran."""
    key = (kw["bits"], kw["group_size"], kw.get("sym", True), 0.0)
    for r in result["rows"]:
        if r["method"] == "rtn" and "ppl" in r and _rtn_key({**r["config"], "mse": r["config"].get("mse", 0.0)}) == key:
            return r["ppl"]
    return None


def markdown(result: dict[str, Any]) -> str:
    """Table: one row per setting with RTN ppl, GPTQ ppl and the GPTQ/RTN layer-loss ratio."""
    cal, ev, m = result["calibration"], result["eval"], result["machine"]
    subset = "" if ev["windows"] is None else f" (first {ev['windows']})"
    lines = [
        f"Brown-test perplexity of {result['model']} ({result['layers']} blocks); calibration "
        f"{cal['nsamples']} x {cal['seqlen']} {cal['data']} tokens, seed {cal['seed']}; eval "
        f"{ev['seqlen']}-token windows{subset}; "
        f"sym unless marked asym; {m['device']} ({m['backend']}), jax {m['jax']}, commit {m['commit']}.",
        "",
        f"fp32: **{result['fp']['ppl']:.3f}**",
        "",
        "| setting | method | ppl | RTN ppl (same grid) | Δ vs RTN | layer loss / RTN | modules < RTN |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['method']} | failed: {r['error'][:60]} | | | | |")
            continue
        rtn = _rtn_for(result, r["config"])
        delta = f"{r['ppl'] - rtn:+.3f}" if (rtn is not None and r["method"] == "gptq") else ""
        ratio = (f"{r['layer_loss'] / r['rtn_layer_loss']:.3f}" if r.get("layer_loss") else "")
        method = r["method"]
        rtn_s = "" if rtn is None else f"{rtn:.3f}"
        lines.append(f"| {r['label']} | {method} | {r['ppl']:.3f} | {rtn_s} | {delta} | {ratio} | "
                     f"{r.get('beats_rtn', '')} |")
    return "\n".join(lines)


def _is_defaults(cfg: dict[str, Any]) -> bool:
    return all(cfg.get(k) == v for k, v in DEFAULTS.items()) and cfg.get("sym", True) and "damp_percent" not in cfg


def _is_reference(cfg: dict[str, Any]) -> bool:
    return not any(cfg.get(k) for k in ("desc_act", "static_groups", "mse", "damp_percent")) and cfg.get("sym", True)


def _find_gptq(result: dict[str, Any], kw: dict[str, Any], pick: Any) -> float | None:
    for r in result["rows"]:
        c = r["config"]
        if (r["method"] == "gptq" and "ppl" in r and c["bits"] == kw["bits"]
                and c["group_size"] == kw["group_size"] and pick(c)):
            return r["ppl"]
    return None


def _short(v: float) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v / 1000:.0f}k" if v < 1e6 else f"{v / 1e6:.1f}M"


def svg_plot(result: dict[str, Any]) -> str:
    """A dependency-free SVG bar chart: ppl (log scale) of RTN, GPTQ with the reference's settings
    and GPTQ with jgptq's defaults, per table setting (missing bars were not measured)."""
    groups: list[tuple[str, list[float | None]]] = []
    for label, kw in TABLE:
        if "act-order" in label:
            continue
        vals = [_rtn_for(result, kw), _find_gptq(result, kw, _is_reference), _find_gptq(result, kw, _is_defaults)]
        if any(v is not None for v in vals):
            groups.append((label, vals))
    fp = result["fp"]["ppl"]
    w, h, left, bottom, top = 760, 360, 60, 70, 30
    vals = [v for _, vs in groups for v in vs if v] + [fp]
    lo, hi = math.log10(min(vals) * 0.9), math.log10(max(vals) * 1.1)

    def y(v: float) -> float:
        return top + (h - top - bottom) * (1 - (math.log10(v) - lo) / (hi - lo))

    bw = (w - left - 20) / max(len(groups), 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">SmolLM2-135M, Brown-test perplexity '
           f'(log scale; lower is better)</text>']
    for tick in (10, 20, 30, 50, 100, 200, 500, 1000, 10000, 100000, 1000000, 10000000):
        if lo <= math.log10(tick) <= hi:
            out.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>'
                       f'<text x="{left - 5}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick}</text>')
    out.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(fp):.1f}" y2="{y(fp):.1f}" stroke="#333" '
               f'stroke-dasharray="4 3"/><text x="{w - 22}" y="{y(fp) - 4:.1f}" text-anchor="end">fp32 {fp:.2f}</text>')
    base_y = h - bottom
    series = (("#d98c5f", "RTN"), ("#9cc3ee", "GPTQ, reference settings"), ("#1f5fb4", "GPTQ, jgptq defaults"))
    for i, (label, vs) in enumerate(groups):
        x0 = left + i * bw + bw * 0.1
        for j, (v, (color, name)) in enumerate(zip(vs, series)):
            if v is None:
                continue
            x = x0 + j * bw * 0.27
            out.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bw * 0.25:.1f}" height="{base_y - y(v):.1f}" '
                       f'fill="{color}"><title>{name} {label}: {v:.3f}</title></rect>'
                       f'<text x="{x + bw * 0.125:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" font-size="9">'
                       f'{_short(v)}</text>')
        out.append(f'<text x="{x0 + bw * 0.39:.1f}" y="{base_y + 16}" text-anchor="middle">{label}</text>')
    lx = left
    for color, name in series:
        out.append(f'<rect x="{lx}" y="{h - 30}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{h - 21}">{name}</text>')
        lx += 14 + 7 * len(name) + 16
    cal = result["calibration"]
    out.append(f'<text x="{w - 20}" y="{h - 21}" text-anchor="end" fill="#555">calibration {cal["nsamples"]}x'
               f'{cal["seqlen"]} Brown-train, seed {cal["seed"]}; {result["machine"]["device"]}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
