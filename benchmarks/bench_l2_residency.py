"""How much of a decode matmul's time is DRAM, how much fixed cost? Cold vs L2-resident weights (issue #6)

Usage (an H100 / H200; through ``benchmarks/mgpu_check.sh`` with ``L2_S`` > 0, or with jgptq
importable)::

    python benchmarks/bench_l2_residency.py --shapes 4096x4096,4096x12288 --ms 1,16 --out DIR

For each 7B decode layer shape (K x N, 4-bit g128, the Mosaic kernel's default layout and
config) one jitted function runs ``C`` iterations of what a decode step does around a matmul:
``--delay-norms`` latency-bound kernels (the residual-add + RMSNorm kernel, ~2 us each; the
attention / norm / SiLU kernels between two matmuls) then the matmul, each iteration's input
computed from the previous output. Variants:

* ``cold``: ``C`` weight copies larger than L2, rotated (as in a decode step);
* ``warm``: every iteration on the same weights, L2-resident after the first (the most an L2
  prefetch of the next matmul's weights could give).

Device times from one profiler trace per variant (inside XLA's command buffers, as in a decode
step): per iteration the GPU busy time and the matmul kernel's median. Prints a table last;
writes ``bench_l2_residency.json``.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp

try:
    import jgptq.pallas_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jgptq.pallas_kernels import gptq_matmul_mgpu as mg  # noqa: E402
from jgptq.pallas_kernels.add_rms_norm import add_rms_norm  # noqa: E402
from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear  # noqa: E402

ROTATE_BYTES = 150 * 2**20  # three times an H100 / H200 L2


def gpu_spans(fn, args, tdir: str) -> list[tuple[float, float, str]]:
    """``(start_us, end_us, name)`` of the GPU ops of one ``fn(*args)`` call (after a warm-up)."""
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(tdir, create_perfetto_trace=True):
        jax.block_until_ready(fn(*args))
    files = glob.glob(os.path.join(tdir, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(sorted(files)[-1]) as f:
        tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, nm in pname.items() if "GPU" in nm or "gpu" in nm or "/device:" in nm}
    return sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                  if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e)


def busy_us(spans) -> float:
    busy, end = 0.0, None
    for a, b, _ in spans:
        if end is None or b > end:
            busy += b - (a if end is None else max(a, end))
            end = b
    return busy


def kind(name: str) -> str:
    n = name.lower()
    if "rms" in n or "norm" in n:
        return "norm"
    if "mosaic" in n or "gptq" in n or "mgpu" in n or "kernel" in n:
        return "matmul"
    return "other"


def bench_shape(k: int, n: int, m: int, args, rows: list[dict]) -> None:
    lin = [random_gptq_linear(jax.random.key(i), k, n, bits=4, group_size=128) for i in range(1)]
    p0 = mg.pack_mgpu_linear(lin[0], bits=4)
    wbytes = sum(int(a.nbytes) for a in (p0.w, p0.sz))
    copies = max(2, min(args.max_copies, math.ceil(ROTATE_BYTES / wbytes)))
    packs = [p0] + [mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(i), k, n, bits=4, group_size=128), bits=4)
                    for i in range(1, copies)]
    cfg = mg.default_config(m, p0)
    scale = jnp.ones((k,), jnp.bfloat16)
    res0 = jax.random.normal(jax.random.key(7), (m, k), jnp.float32).astype(jnp.bfloat16)

    def make(variant: str):
        def run(packs, res):
            y = jnp.zeros((m, n), jnp.float32)
            out = []
            for i in range(copies):
                p = packs[0] if variant == "warm" else packs[i]
                z = jnp.resize(y, (m, k))  # the next input, from this output
                for _ in range(args.delay_norms):
                    res, z = add_rms_norm(z, res, scale, 1e-5)
                y = mg.gptq_matmul_mgpu(z.astype(jnp.bfloat16), p, config=cfg).astype(jnp.float32)
                out.append(y[0, 0])
            return jnp.stack(out)
        return jax.jit(run)

    for variant in ("cold", "warm"):
        fn = make(variant)
        with tempfile.TemporaryDirectory() as tdir:
            spans = gpu_spans(fn, (packs, res0), tdir)
        by = {}
        for a, b, nm in spans:
            by.setdefault(kind(nm), []).append(b - a)
        names = sorted({nm[:60] for _, _, nm in spans})
        row = dict(K=k, N=n, M=m, variant=variant, copies=copies, weight_MB=wbytes / 2**20,
                   busy_us_per_iter=busy_us(spans) / copies,
                   ops_per_iter=len(spans) / copies,
                   matmul_us=statistics.median(by["matmul"]) if by.get("matmul") else None,
                   norm_us=statistics.median(by["norm"]) if by.get("norm") else None,
                   counts={kd: len(v) for kd, v in by.items()}, names=names[:8],
                   delay_norms=args.delay_norms, config=str(cfg))
        rows.append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x12288,4096x4096,4096x22016,11008x4096")
    ap.add_argument("--delay-norms", type=int, default=3)
    ap.add_argument("--ms", default="1", help="comma list of token counts")
    ap.add_argument("--max-copies", type=int, default=16)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    print(f"jax {jax.__version__} devices {jax.devices()}", flush=True)
    rows: list[dict] = []
    for s in args.shapes.split(","):
        k, n = (int(v) for v in s.lower().split("x"))
        for m in (int(v) for v in args.ms.split(",")):
            try:
                bench_shape(k, n, m, args, rows)
            except Exception as e:  # noqa: BLE001 - report and go on to the next point
                print(f"FAILED {s} M={m}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_l2_residency.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\n{'K x N':>12} {'M':>3} {'variant':>7} {'busy/iter':>10} {'matmul':>8} {'norm':>6} ops")
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{r['K']:>5}x{r['N']:<6} {r['M']:>3} {r['variant']:>7} {r['busy_us_per_iter']:>10.2f} "
              f"{f(r['matmul_us']):>8} {f(r['norm_us']):>6} {r['ops_per_iter']:.1f}")


if __name__ == "__main__":
    main()
