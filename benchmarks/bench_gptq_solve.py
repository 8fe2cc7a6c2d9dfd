"""Solve speed of ``jgptq.gptq`` (one layer: Hessian -> codes) on CPU or GPU.

Shapes are given as ``out x in`` (the PyTorch weight ``[out, in]``; jgptq's kernel is ``[in, out]``).
For each shape, act-order on/off and each in-block implementation (``xla`` fori_loop with an unroll
factor, ``pallas`` = one Pallas/Triton kernel per block, GPU only) it reports the compile time, the
median solve time (jitted solver, inputs on device, ``block_until_ready``), the share of codes equal
to the first implementation run, and -- where ``in <= --ref-max-in`` -- the share of codes equal to
the float64 NumPy transcription of the reference (``tests/jgptq/reference_numpy.py``), with the
rounding-tie excuse described there.

    PYTHONPATH=. python benchmarks/bench_gptq_solve.py --quick               # CPU smoke
    PYTHONPATH=. python benchmarks/bench_gptq_solve.py --impls xla:1,xla:16,pallas --out r.json

The problem is a random correlated one (seeded): X = (noise * per-feature scale) + low-rank mix,
``H = 2 X^T X / T`` with ``T = in + 512`` tokens, W ~ N(0, 0.02^2) with a few outliers.
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

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jgptq.config import GPTQConfig  # noqa: E402
from jgptq.solver import _runtime, _solve, _structural  # noqa: E402

DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008"]
QUICK_SHAPES = ["512x512", "1024x1024", "2048x1024"]


def make_problem(n_out: int, n_in: int, seed: int = 0, tokens_factor: float = 4.0
                 ) -> tuple[jax.Array, jax.Array]:
    """Correlated problem generated on the default device: ``w [in, out]``, ``h [in, in]`` from
    ``T = tokens_factor * in`` tokens (``tokens_factor <= 0``: ``T = in + 512``, nearly singular)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    t = int(tokens_factor * n_in) if tokens_factor > 0 else n_in + 512
    feat = jnp.exp(0.5 * jax.random.normal(k[0], (n_in,)))
    mix = jax.random.normal(k[1], (64, n_in)) * 0.5
    x = jax.random.normal(k[2], (t, n_in)) * feat + jax.random.normal(k[3], (t, 64)) @ mix
    h = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST) * (2.0 / t)
    w = jax.random.normal(k[4], (n_in, n_out)) * 0.02
    w = w.at[::97, ::13].multiply(6.0)
    return jax.block_until_ready(w), jax.block_until_ready(h)


def run_one(w, h, cfg: GPTQConfig, impl: str, unroll: int, reps: int):
    args = (w, h, *_runtime(cfg))
    kw = dict(config=_structural(cfg), unroll=unroll, impl=impl)
    t0 = time.perf_counter()
    compiled = _solve.lower(*args, **kw).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))           # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, 1e3 * statistics.median(times), out


def reference_agreement(w, h, cfg: GPTQConfig, codes) -> float:
    sys.path.insert(0, os.path.join(ROOT, "tests", "jgptq"))
    import reference_numpy as ref

    r = ref.fasterquant(np.asarray(w), np.asarray(h), bits=cfg.bits, group_size=cfg.group_size,
                        sym=cfg.sym, actorder=cfg.desc_act, static_groups=cfg.static_groups,
                        percdamp=cfg.damp_percent, blocksize=cfg.block_size)
    equal, _ = ref.codes_agreement(np.asarray(codes), r)
    return equal


def factor_residual(h: jax.Array, damp: float = 0.01) -> float:
    """max |U^T U H_d - I| in float64 for the device's damped inverse factor ``U``."""
    from jgptq import linalg

    u, _, _ = jax.jit(lambda h: linalg.damped_inverse_factor(h, damp))(h)
    u = np.asarray(u, np.float64)
    hd = np.asarray(h, np.float64)
    hd = hd + damp * np.mean(np.diag(hd)) * np.eye(len(hd))
    return float(np.abs(u.T @ (u @ hd) - np.eye(len(hd))).max())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - the device copy has no .git
        return os.environ.get("JGPTQ_COMMIT", "unknown")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", default=None, help="out x in, e.g. 4096x4096")
    p.add_argument("--quick", action="store_true", help="small CPU shapes")
    p.add_argument("--impls", default=None,
                   help="comma list of xla:<unroll> and pallas (default: xla:1 on CPU, "
                        "xla:1,xla:16,pallas on GPU)")
    p.add_argument("--act-order", default="both", choices=["both", "on", "off"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true", help="symmetric (default: asymmetric)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ref-max-in", type=int, default=1024,
                   help="compare with the NumPy reference when in_features <= this")
    p.add_argument("--ref-only-act-order", action="store_true",
                   help="run the NumPy reference only for act-order cases")
    p.add_argument("--ref-shapes", nargs="*", default=None,
                   help="run the NumPy reference only for these shapes (default: all that fit "
                        "--ref-max-in)")
    p.add_argument("--tokens-factor", type=float, default=4.0,
                   help="calibration tokens per input feature (0: in+512 tokens, the first GPU run)")
    p.add_argument("--check-factor", action="store_true",
                   help="print max|U^T U (H + damp) - I| of the device factor (float64 check)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    impls = args.impls or ("xla:1" if backend == "cpu" else "xla:1,xla:16,pallas")
    impl_list = []
    for item in impls.split(","):
        name, _, unroll = item.partition(":")
        impl_list.append((name, int(unroll or 1)))
    acts = {"both": [False, True], "on": [True], "off": [False]}[args.act_order]
    device = str(jax.devices()[0].device_kind) if jax.devices() else backend
    print(f"# jgptq solve benchmark: jax {jax.__version__}, backend {backend}, device {device}, "
          f"commit {git_commit()}, bits {args.bits}, g{args.group_size}, "
          f"{'sym' if args.sym else 'asym'}", flush=True)
    header = f"{'out x in':>12} {'act':>4} {'impl':>9} {'compile s':>9} {'solve ms':>9} " \
             f"{'=first':>8} {'=ref':>8}"
    print(header, flush=True)
    rows: list[dict] = []
    meta = dict(jax=jax.__version__, backend=backend, device=device, commit=git_commit(),
                machine=platform.machine(), cpus=os.cpu_count(), bits=args.bits,
                group_size=args.group_size, sym=args.sym, tokens_factor=args.tokens_factor,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with jax.default_matmul_precision("highest"):
        for shape in shapes:
            n_out, n_in = (int(v) for v in shape.lower().split("x"))
            w, h = make_problem(n_out, n_in, tokens_factor=args.tokens_factor)
            if args.check_factor:
                print(f"# {shape}: factor residual {factor_residual(h):.3e}", flush=True)
            for act in acts:
                cfg = GPTQConfig(bits=args.bits, group_size=args.group_size, sym=args.sym,
                                 desc_act=act)
                first = None
                for name, unroll in impl_list:
                    if name.startswith("pallas") and backend != "gpu":
                        continue
                    try:
                        comp, ms, out = run_one(w, h, cfg, name, unroll, args.reps)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"{shape:>12} {str(act):>4} {name}:{unroll} FAILED: "
                              f"{type(e).__name__}: {str(e)[:300]}", flush=True)
                        rows.append(dict(shape=shape, act_order=act, impl=name, unroll=unroll,
                                         error=f"{type(e).__name__}: {str(e)[:2000]}"))
                        _dump(args.out, meta, rows)
                        continue
                    codes = np.asarray(out[0])
                    eq_first = 1.0 if first is None else float(np.mean(codes == first))
                    if first is None:
                        first = codes
                    eq_ref = None
                    if n_in <= args.ref_max_in and (act or not args.ref_only_act_order) and \
                            (args.ref_shapes is None or shape in args.ref_shapes) and \
                            (name, unroll) == impl_list[0]:
                        eq_ref = reference_agreement(w, h, cfg, codes)
                    row = dict(shape=shape, n_out=n_out, n_in=n_in, act_order=act, impl=name,
                               unroll=unroll, compile_s=round(comp, 2), solve_ms=round(ms, 2),
                               codes_equal_first=eq_first, codes_equal_reference=eq_ref,
                               loss=float(jnp.sum(out[4])), damp=float(out[5]))
                    rows.append(row)
                    _dump(args.out, meta, rows)
                    print(f"{shape:>12} {str(act):>4} {name + ':' + str(unroll):>9} "
                          f"{comp:9.2f} {ms:9.2f} {eq_first:8.5f} "
                          f"{'' if eq_ref is None else f'{eq_ref:8.5f}':>8}", flush=True)
    _dump(args.out, meta, rows)
    return 0


def _dump(path: str | None, meta: dict, rows: list[dict]) -> None:
    """Write the results so far (a killed run still leaves its finished rows)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
