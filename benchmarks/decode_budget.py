"""Where a 7B batch-1 decode step's time goes, and what a speed-up over bf16 would need (issue #6).

Usage (on this machine; reads what ``bench_kernels.py --e2e ... --e2e-trace`` wrote on the GPU)::

    python benchmarks/decode_budget.py benchmarks/results/e2e_h100_s26_*.json [--target 3] [--out F]

Every quantized batch-1 row with a profiled scan call (``gpu_time_scan_call.layer_mosaic``) is
paired with the bf16 batch-1 row of the same file that ran the same attention / norm variant. From
the row's per-layer op list (the medians over every layer of the profiled scan):

* the four Mosaic matmuls of a layer (fused q/k/v, o_proj, fused gate/up, down_proj), each
  fitted as ``us = MB / r + f`` (least squares over the four; ``r`` the streaming rate in TB/s,
  ``f`` the fixed cost of one launch in us: launch, first bytes, tail and split-K reduction);
* ``shared``: every other op of the layer (decode-step attention, the two add + RMSNorm kernels,
  SiLU * up); the bf16 model runs the same kernels for these;
* ``outside``: the scan step minus ``layers x`` (matmuls + shared): lm_head, embedding, the final
  norm, sampling, the loop and any idle time.

It then reports the step with every matmul launch free of fixed cost (``f = 0``, the bytes at
``r``) and its ratio to bf16, and the fixed cost per matmul launch that ``--target`` x bf16
would allow with everything else as measured. The matmuls' bytes are the quantized weight
bytes of the layer's shapes at the row's measured bits per weight (``bits_per_quantized_weight``
of a row without a 4-bit lm_head, which would count the head too). Prints a table last; ``--out``
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np

MATMUL_OP = "scoped_mosaic_gpu_kernel"  # the Mosaic matmul's name in the profile
LAYER_MATMULS = ("q/k/v", "o_proj", "gate/up", "down")


def layer_matmul_shapes(hidden: int, ffn: int) -> tuple[tuple[int, int], ...]:
    """``(K, N)`` of a Llama layer's decode matmuls in launch order (q/k/v and gate/up fused, as
    the quantized model runs them; multi-head attention, as the bench's 7B shapes)."""
    return (hidden, 3 * hidden), (hidden, hidden), (hidden, 2 * ffn), (ffn, hidden)


def fit_stream(mb: list[float] | np.ndarray, us: list[float] | np.ndarray) -> tuple[float, float]:
    """Least-squares ``us = mb / r + f`` over matmuls of different sizes: ``(r TB/s, f us)``."""
    mb, us = np.asarray(mb, float), np.asarray(us, float)
    if mb.shape != us.shape or mb.size < 2 or np.ptp(mb) == 0:
        raise ValueError(f"fit_stream: need >= 2 matmuls of different sizes, same count of times; got {mb.size} "
                         f"sizes ({mb.tolist()}) and {us.size} times.")
    (inv_r, f), *_ = np.linalg.lstsq(np.c_[mb, np.ones_like(mb)], us, rcond=None)
    if inv_r <= 0:
        raise ValueError(f"fit_stream: the times do not grow with the bytes (slope {inv_r:.4g} us/MB).")
    return 1.0 / inv_r, float(f)


def layer_split(row: dict) -> tuple[list[float], float, list[tuple[str, float]]]:
    """``(matmul us in launch order, shared us, shared ops)`` of one layer of a row's profiled scan."""
    g = row.get("gpu_time_scan_call") or {}
    ops = (g.get("layer_mosaic") or {}).get("layer_ops")
    if not ops:
        raise ValueError(f"row {row.get('e2e')!r} batch {row.get('batch')}: no per-layer ops (run the bench with "
                         "--e2e-trace and a scan, batch 1 traced).")
    mm = [float(us) for name, us in ops if MATMUL_OP in name]
    if len(mm) != len(LAYER_MATMULS):
        raise ValueError(f"row {row.get('e2e')!r}: {len(mm)} matmul ops in a layer, expected {len(LAYER_MATMULS)} "
                         f"({', '.join(LAYER_MATMULS)}); ops: {[n for n, _ in ops]}.")
    shared = [(str(name), float(us)) for name, us in ops if MATMUL_OP not in name]
    return mm, sum(us for _, us in shared), shared


def layer_mb(bits: float, hidden: int = 4096, ffn: int = 11008) -> list[float]:
    """MB of quantized weights each layer matmul reads at ``bits`` per weight."""
    return [k * n * bits / 8 / 1e6 for k, n in layer_matmul_shapes(hidden, ffn)]


def budget(row: dict, bf16_ms: float, bits: float, *, target: float = 3.0, hidden: int = 4096,
           ffn: int = 11008, fit: tuple[float, float] | None = None) -> dict:
    """The budget of one quantized batch-1 row against its bf16 step (ms per step, scan). ``fit``:
    ``(r, f)`` to use instead of the row's own four-point fit (e.g. one fitted over many rows)."""
    if bf16_ms <= 0 or bits <= 0 or target <= 0:
        raise ValueError(f"budget: bf16_ms={bf16_ms}, bits={bits} and target={target} must be > 0.")
    mm, shared, shared_ops = layer_split(row)
    mb = layer_mb(bits, hidden, ffn)
    r, f = fit if fit is not None else fit_stream(mb, mm)
    layers = int(row["layers"])
    step = float(row["ms_per_step_scan"]) * 1e3
    outside = step - layers * (sum(mm) + shared)
    stream = sum(mb) / r  # one layer's matmul bytes at the fitted rate
    ideal = outside + layers * (stream + shared)  # = the step with every matmul launch's fixed cost gone
    goal = bf16_ms * 1e3 / target
    f_allowed = ((goal - outside) / layers - shared - stream) / len(mm)
    return dict(e2e=row["e2e"], attention=row.get("attention"), norm=row.get("norm"), layers=layers,
                step_us=round(step, 1), bf16_us=round(bf16_ms * 1e3, 1), ratio=round(bf16_ms * 1e3 / step, 3),
                matmul_us=[round(t, 2) for t in mm], matmul_mb=[round(b, 2) for b in mb],
                r_tbps=round(r, 3), f_us=round(f, 3), fit_resid_us=[round(t - b / r - f, 2) for t, b in zip(mm, mb)],
                shared_us=round(shared, 2), shared_ops=shared_ops, outside_us=round(outside, 1),
                stream_us_per_layer=round(stream, 2), ideal_step_us=round(ideal, 1),
                ideal_ratio=round(bf16_ms * 1e3 / ideal, 3), target=target, target_step_us=round(goal, 1),
                f_allowed_us=round(f_allowed, 3))


def _pairs(rows: list[dict]) -> list[tuple[dict, dict, float]]:
    """``(quantized row, bf16 row, bits)`` for every traced quantized batch-1 row of one file."""
    b1 = [r for r in rows if r.get("batch") == 1 and "ms_per_step_scan" in r]
    bits = next((r["bits_per_quantized_weight"] for r in b1
                 if "bits_per_quantized_weight" in r and "lm_head4" not in r["e2e"]), None)
    out = []
    for r in b1:
        if not r["e2e"].startswith("gptq") or not (r.get("gpu_time_scan_call") or {}).get("layer_mosaic", {}).get(
                "layer_ops"):
            continue
        base = [b for b in b1 if b["e2e"].startswith("bf16") and b.get("attention") == r.get("attention")
                and b.get("norm") == r.get("norm") and b.get("cmdbuf") == r.get("cmdbuf")]
        if base and bits:
            out.append((r, base[0], bits))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="e2e JSON files of bench_kernels.py (a list of rows each)")
    ap.add_argument("--target", type=float, default=3.0, help="speed-up over bf16 to budget for (issue #6: 3)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--match", default="", help="only quantized rows whose e2e label holds this")
    ap.add_argument("--out", default="", help="write the budget rows here (JSON)")
    args = ap.parse_args(argv)
    picked = []  # (file, row, bf16 row, bits)
    for path in args.files:
        with open(path) as fh:
            rows = json.load(fh)
        picked += [(os.path.basename(path), r, base, bits) for r, base, bits in _pairs(rows) if args.match in r["e2e"]]
    kw = dict(target=args.target, hidden=args.hidden, ffn=args.ffn)
    out = []
    for name, r, base, bits in picked:
        b = budget(r, base["ms_per_step_scan"], bits, **kw)
        b["file"] = name
        out.append(b)
    if not out:
        raise SystemExit("decode_budget: no traced quantized batch-1 row with a bf16 batch-1 row of the same "
                         "variant beside it, and a quantized row without a 4-bit lm_head for the bits per weight, "
                         f"in {args.files} (bench_kernels.py --e2e-trace --e2e-scan N, batch 1 traced).")
    # one (r, f) over every picked row's matmuls: steadier than four points per row
    pooled = fit_stream(np.concatenate([layer_mb(bits, args.hidden, args.ffn) for _, _, _, bits in picked]),
                        np.concatenate([layer_split(r)[0] for _, r, _, _ in picked]))
    for b, (_, r, base, bits) in zip(out, picked):
        p = budget(r, base["ms_per_step_scan"], bits, fit=pooled, **kw)
        b["pooled"] = {k: p[k] for k in ("r_tbps", "f_us", "fit_resid_us", "ideal_step_us", "ideal_ratio",
                                         "f_allowed_us")}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    print(f"\n7B decode at batch 1, per layer (us) and per step; target {args.target:g}x bf16. Own fit: each row's "
          f"four matmuls; pooled: r {pooled[0]:.3f} TB/s, f {pooled[1]:.2f} us over all {len(out)} rows.")
    print(f"  {'file / model':<58} {'step':>6} {'ratio':>6} {'shared':>6} {'outside':>7} | own: {'r':>5} {'f':>5} "
          f"{'f=0 x':>6} {'f ok':>6} | pooled: {'f=0 x':>6} {'f ok':>6}")
    for b in out:
        p = b["pooled"]
        print(f"  {(b['file'][:34] + ' ' + b['e2e'])[:58]:<58} {b['step_us']:6.0f} {b['ratio']:6.2f} {b['shared_us']:6.2f} "
              f"{b['outside_us']:7.0f} |      {b['r_tbps']:5.2f} {b['f_us']:5.2f} {b['ideal_ratio']:6.2f} "
              f"{b['f_allowed_us']:6.2f} |         {p['ideal_ratio']:6.2f} {p['f_allowed_us']:6.2f}")
    best = max(out, key=lambda b: b["pooled"]["ideal_ratio"])
    print(f"  'f=0 x': bf16 / (the step with no fixed cost in any matmul launch); 'f ok': the fixed cost per matmul "
          f"launch that {args.target:g}x allows.\n  Best row ({best['e2e']}): {best['ratio']:.2f}x now, "
          f"{best['pooled']['ideal_ratio']:.2f}x at f = 0; {args.target:g}x needs f <= "
          f"{best['pooled']['f_allowed_us']:.2f} us against the fitted {pooled[1]:.2f} us "
          f"(median over rows: {statistics.median(b['ratio'] for b in out):.2f}x now).")
    return out


if __name__ == "__main__":
    main()
