"""Benchmark the GPTQ dequant-matmul kernels against XLA bf16, XLA dequant and PyTorch baselines.

Usage (on a GPU machine)::

    python benchmarks/bench_kernels.py --shapes 8192x28672,4096x4096 --ms 1,16,64,256 --out DIR

Every point is the median over trials of (wall time of ``reps`` back-to-back launches of one
jitted function that runs the op once on each of ``C`` weight copies) / (reps*C), with ``C`` chosen
so the copies exceed the L2 cache (50 MB on an H100): with the GPU busy end to end, this is
device time per op, launch gaps inside an executable included. PyTorch points are timed with
CUDA events over the same rotation. Bandwidth = (weights + scales + zeros + x + y bytes) / time.
Weights are GPTQ 4-bit g128 asymmetric (random codes, scales, zeros); activations bf16.

``--mgpu`` adds the Mosaic GPU kernel (``gptq_matmul_mgpu``, Hopper) with up to ``--max-mgpu-cfgs``
tile configs per point; a config that fails to compile is reported (the first failure in full)
and skipped. ``benchmarks/mgpu_check.sh`` is the short H100 run (tests + this comparison).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # installed (pip install -e .) or a PYTHONPATH shim (benchmarks/mgpu_check.sh)
    import jgptq.pallas_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jgptq.pallas_kernels import dispatch, repack  # noqa: E402
from jgptq.pallas_kernels.gptq_matmul_gpu import GPUConfig, default_config, gptq_matmul_gpu, random_gptq_linear  # noqa: E402
from jgptq.pallas_kernels import gptq_matmul_mgpu as mg  # noqa: E402

L2_BYTES = 50 * 2**20
BASELINES = True
INTERPRET = jax.default_backend() != "gpu"  # CPU smoke runs go through the Pallas interpreter
ROTATE_BYTES = 3 * L2_BYTES
MGPU = False
MGPU_PARTS = False  # --mgpu-parts: also time each mgpu config's Pallas call without the XLA epilogue
DEADLINE = float("inf")  # time.monotonic() after which remaining points / configs are skipped


def over_budget() -> bool:
    return time.monotonic() > DEADLINE
MAX_MGPU_CFGS = 8
TRITON_SWEEP_OFF = False
NO_TRITON = False  # --no-triton: skip the Triton-lowered kernel (gptq_matmul_gpu) entirely
NO_BF16 = False  # --no-baselines
MGPU_FILTER: list[str] = []  # --mgpu-filter: only mgpu configs whose name holds all of these
MGPU_EXCLUDE: list[str] = []  # --mgpu-exclude: drop mgpu configs whose name holds any of these
MGPU_VARIANTS: list[dict] = []  # --mgpu-variants: field overrides of the default config, timed in its place
_FULL_ERROR_SHOWN = [False]


def report_failure(name: str, e: Exception) -> str:
    """Print a config's failure: the first one in full (Mosaic compile errors), later ones cut."""
    msg = f"{type(e).__name__}: {e}"
    if not _FULL_ERROR_SHOWN[0]:
        _FULL_ERROR_SHOWN[0] = True
        print(f"FAILED {name} (first failure, full error follows)\n{'=' * 30}", flush=True)
        traceback.print_exc()
        print(f"{'=' * 30} end of first failure", flush=True)
    else:
        print(f"FAILED {name}: " + "\n  ".join(msg.splitlines()[:6])[:1200], flush=True)
    return msg[:2000]


def mgpu_candidates(m: int, packed, limit: int) -> list:
    """``(config, weight layout)`` pairs: the default first (``"frag"`` layout, TMA bounds,
    token-major grid partials when M is below the token tile), then on ``"kblocks"``, then with the split-K / stream-K
    partials TMA-added in the kernel (``split_reduce="tma"``), then the same tiles on the ``"nk"``
    layout, with the session-4 options (x padded in XLA, grid partials ``[split, Np, Mp]``, ``"nk"``),
    and with token-major partials forced on; then other split / block sizes and the persistent
    schedules (at most ``limit``; configs that do not fit the layer dropped)."""
    C = mg.MgpuConfig
    A, W, U = "acc", "weights", "upcast"
    rp = dataclasses.replace
    d = mg.default_config(m, packed)
    bk = 64 if packed.group_size == 64 else 128
    D = mg.default_layout(4)  # "frag": weights pre-permuted into wgmma register order
    c = [(d, D), (d, "kblocks")]
    nkb = packed.k_pad // d.block_k
    tma = rp(d, split_reduce="tma")
    if d.schedule == "grid" and d.split_k > 1:  # partials TMA-added in L2 instead of summed by XLA
        c += [(tma, D), (tma, "kblocks"), (rp(tma, split_k=min(2 * d.split_k, nkb // 4) or 1), D)]
    elif d.schedule == "stream":
        c += [(tma, D), (tma, "kblocks")]
    c += [(d, "nk"), (_session4_options(d), "nk"), (_token_major(d), D)]
    if m <= 16:
        bm = 8 if m <= 8 else 16
        c += [(rp(d, split_k=max(1, d.split_k // 2)), D),
              (rp(d, split_k=max(1, d.split_k // 4)), D),
              (rp(d, split_k=min(2 * d.split_k, nkb)), D),
              (rp(d, block_k=256, split_k=max(1, d.split_k // 2), num_stages=4, scale_mode=W) if bk == 128 else d,
               D),
              (C(bm, 128, bk, 1, 8, A, "jnp", U, "stream", 2, 1), D),
              (rp(d, block_n=64), D)]
    elif m <= 64:
        bm = 32 if m <= 32 else 64
        c += [(C(bm, 64, bk, 1, 4, A, "jnp", U, "stream", 2, 1), D),
              (C(bm, 128, bk, 1, 4, A, "jnp", U, "stream", 1, 2), D)]
    else:
        c += [(C(256, 64, 64, 1, 4, W, "jnp", U, "tiles", 1, 2), D),
              (C(128, 64, 128, 1, 4, W, "jnp", U, "tiles", 1, 2), D),
              (C(128, 64, 64, 1, 4, W, "jnp", U, "stream", 1, 2), D)]
    out = []
    nk = lambda cfg: packed.k_pad // cfg.block_k  # noqa: E731
    for cfg, lay in c:
        if ((cfg, lay) not in out and packed.n_pad % (cfg.block_n * cfg.compute_wgs) == 0
                and packed.k_pad % cfg.block_k == 0 and nk(cfg) % cfg.split_k == 0
                and (packed.group_size % cfg.block_k == 0 or cfg.block_k % packed.group_size == 0)
                and (cfg.scale_mode == W or (packed.group_size % cfg.block_k == 0
                                             and cfg.block_m * cfg.block_n <= 8192))):
            out.append((cfg, lay))
    return out[:limit]


def parse_variants(spec: str) -> list[dict]:
    """``--mgpu-variants``: ``"num_stages=3;block_n=64,split_k=8"`` -> one dict of field values per
    ``;``-separated set (ints, ``True`` / ``False`` / ``None``, else strings)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kw = {}
        for item in part.split(","):
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--mgpu-variants: {item!r} is not FIELD=VALUE")
            v = val.strip()
            kw[key.strip()] = {"True": True, "False": False, "None": None}.get(v, int(v) if v.lstrip("-").isdigit() else v)
        out.append(kw)
    return out


def variant_configs(base, variants: list[dict]) -> list:
    """``base`` (an ``MgpuConfig``) with each dict's fields replaced; an unknown field is an error
    naming it."""
    fields = {f.name for f in dataclasses.fields(base)}
    out = []
    for kw in variants:
        bad = sorted(set(kw) - fields)
        if bad:
            raise ValueError(f"--mgpu-variants: unknown MgpuConfig field(s) {bad}; fields: {sorted(fields)}")
        out.append(dataclasses.replace(base, **kw))
    return out


def mgpu_name(cfg, layout: str = "frag") -> str:
    s = (f"mgpu[bm{cfg.block_m},bn{cfg.block_n},bk{cfg.block_k},sk{cfg.split_k},st{cfg.num_stages},"
         f"{cfg.scale_mode},{cfg.scale_impl},{cfg.w_layout}")
    if cfg.schedule != "grid":
        s += f",{cfg.schedule},cps{cfg.ctas_per_sm},wg{cfg.compute_wgs}"
        if cfg.schedule == "tiles" and not cfg.writes_y:
            s += ",yT-xla"
    elif cfg.writes_y:
        s += ",y-mn"
    if cfg.zero_mode != "regs":
        s += f",z-{cfg.zero_mode}"
    if cfg.split_reduce != "xla":
        s += f",sum-{cfg.split_reduce}"
    if cfg.tma_bounds:
        s += ",tma-bounds"
    if layout != mg.default_layout(4):
        s += f",w-{layout}"
    return s + "]"


def device_bytes(x) -> int:
    """Bytes an array occupies on the GPU: sub-byte integer dtypes (``jnp.int4``) are bit-packed
    there, while ``.nbytes`` counts one byte per element for them."""
    import jax.numpy as jnp

    dt = jnp.dtype(x.dtype)
    if jnp.issubdtype(dt, jnp.integer) and jnp.iinfo(dt).bits < 8:
        return -(-x.size * jnp.iinfo(dt).bits // 8)
    return int(x.nbytes)


def _copies(nbytes: int, cap: int = 16) -> int:
    return max(2, min(cap, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def time_jax(fn, args, copies: int, trials: int = 7, min_s: float = 0.02) -> float:
    """Median seconds per op; ``fn(*args)`` runs ``copies`` ops."""
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    reps = max(3, min(200, int(min_s / max(one, 1e-6))))
    res = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        res.append((time.perf_counter() - t0) / (reps * copies))
    return statistics.median(res)


def time_torch(fn, n_copies: int, trials: int = 7) -> float:
    import torch

    for i in range(n_copies):
        fn(i)
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for i in range(n_copies):
        fn(i)
    en.record()
    torch.cuda.synchronize()
    one = st.elapsed_time(en) / 1e3
    reps = max(3, min(200, int(0.02 / max(one, 1e-6))))
    res = []
    for _ in range(trials):
        st.record()
        for _ in range(reps):
            for i in range(n_copies):
                fn(i)
        en.record()
        torch.cuda.synchronize()
        res.append(st.elapsed_time(en) / 1e3 / (reps * n_copies))
    return statistics.median(res)


def candidate_configs(m: int, packed: repack.PackedGPTQ, sweep: bool) -> list[GPUConfig]:
    """The default config first, then (with ``sweep``) a small hand-picked neighbourhood."""
    base = default_config(m, packed)
    if not sweep:
        return [base]
    nb = packed.k_pad // ((32 // packed.bits) * packed.slab)
    c = [base]
    if m <= 16:
        for bn, split, w, st in ((64, 2, 4, 3), (128, 4, 4, 3), (128, 4, 4, 4), (64, 4, 4, 4), (64, 2, 4, 5),
                                 (128, 4, 8, 3), (32, 4, 4, 3)):
            c.append(GPUConfig("dot", 16, bn, split, w, st))
        c.append(GPUConfig("dot", 16, 128, 4, 4, 3, dequant="convert"))
        c.append(GPUConfig("dot", 16, 64, 2, 4, 3, x_sums="kernel"))
        if m == 1:
            for bn, split, w in ((64, 2, 4), (128, 4, 4), (32, 4, 4), (64, 4, 2)):
                c.append(GPUConfig("gemv", 1, bn, split, w, 3))
    elif m <= 64:
        for bn, split, w in ((64, 1, 4), (128, 1, 4), (128, 2, 4), (64, 2, 4), (128, 1, 8)):
            c.append(GPUConfig("dot", 64, bn, split, w, 3))
    else:
        for bm, bn, w, st in ((128, 128, 8, 3), (64, 128, 4, 3), (128, 256, 8, 3), (128, 128, 4, 4), (64, 256, 8, 3)):
            c.append(GPUConfig("dot", bm, bn, 1, w, st))
    out = []
    for cfg in c:
        if nb % cfg.split_k == 0 and packed.n_pad % cfg.block_n == 0 and cfg not in out:
            out.append(cfg)
    return out


def bench_shape(k: int, n: int, ms: list[int], *, sweep: bool, slabs: list[int | None], torch_ok: bool,
                rows: list[dict], max_cfgs: int) -> None:
    lin0 = random_gptq_linear(jax.random.key(0), k, n, bits=4, group_size=128)
    wbytes = lin0["qweight"].nbytes + lin0["scales"].nbytes + lin0["zeros"].nbytes
    c_q = _copies(wbytes)
    c_bf = _copies(k * n * 2)
    lins = [lin0] + [random_gptq_linear(jax.random.key(i + 1), k, n, bits=4, group_size=128) for i in range(c_q - 1)]
    ws_bf = [jax.random.normal(jax.random.key(100 + i), (k, n), jnp.bfloat16) * 0.02 for i in range(c_bf)]

    def rec(m, name, t, nbytes, err=None, cfg=None, layout=None):
        row = dict(K=k, N=n, M=m, variant=name, us=t * 1e6, GBps=nbytes / t / 1e9, err=err,
                   cfg=None if cfg is None else dataclasses.asdict(cfg), layout=layout)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for m in ms:
        if over_budget():
            print(f"SKIPPED K={k} N={n} M={m}: --budget-s exhausted", flush=True)
            continue
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
        io = m * k * 2 + m * n * 2
        # XLA bf16
        f = jax.jit(lambda x, ws: [x @ w for w in ws])
        if not NO_BF16:
            rec(m, "xla_bf16", time_jax(f, (x, ws_bf), c_bf), k * n * 2 + io)
        # XLA dequant (GPTQ int32 unpacked in-graph, gather by g_idx, then dot)

        def xla_deq(x, ls):
            outs = []
            for l in ls:
                codes = repack.unpack_gptq_qweight(l["qweight"], 4).astype(jnp.float32)
                g = l["g_idx"]
                w = (l["scales"].astype(jnp.float32)[g] * (codes - l["zeros"].astype(jnp.float32)[g])).astype(x.dtype)
                outs.append(jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
            return outs

        if BASELINES:
            rec(m, "xla_dequant", time_jax(jax.jit(xla_deq), (x, lins), c_q), wbytes + io)
        for slab in ([] if NO_TRITON else slabs):
            packs = [repack.pack_gptq_linear(l["qweight"], l["scales"], l["zeros"], l["g_idx"], bits=4,
                                             layout="nk", slab=slab) for l in lins]
            p0 = packs[0]
            ref = dispatch.xla_matmul(x.astype(jnp.float32), p0)
            pbytes = p0.words.nbytes + p0.scales.nbytes + p0.zeros.nbytes + io
            cfgs = candidate_configs(m, p0, sweep)[:max_cfgs]
            if TRITON_SWEEP_OFF:
                cfgs = cfgs[:1]
            best = None
            for cfg in cfgs:
                name = (f"pallas[S{p0.slab},{cfg.variant},bm{cfg.block_m},bn{cfg.block_n},sk{cfg.split_k},"
                        f"w{cfg.num_warps},st{cfg.num_stages},{cfg.dequant},sums-{cfg.x_sums}]")
                try:
                    fk = jax.jit(lambda x, ps, cfg=cfg: [gptq_matmul_gpu(x, p, config=cfg, interpret=INTERPRET)
                                                         for p in ps])
                    y = fk(x, packs[:1])[0].astype(jnp.float32)
                    err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
                    t = time_jax(fk, (x, packs), c_q)
                    rec(m, name, t, pbytes, err, cfg)
                    if best is None or t < best[0]:
                        best = (t, name)
                except Exception as e:  # keep going: report the failure
                    rows.append(dict(K=k, N=n, M=m, variant=name, error=report_failure(name, e)))
            # what the model gets: dispatch with default config
            preps = [dispatch.Prepared(packed=p, backend="gpu", interpret=INTERPRET) for p in packs]
            if not TRITON_SWEEP_OFF:
                try:
                    fd = jax.jit(lambda x, ps: [dispatch.matmul(x, p) for p in ps])
                    rec(m, f"dispatch[S{p0.slab}]", time_jax(fd, (x, preps), c_q), pbytes)
                except Exception as e:
                    rows.append(dict(K=k, N=n, M=m, variant="dispatch", error=report_failure("dispatch", e)))
        if MGPU:
            bench_mgpu(k, n, m, x, lins, c_q, io, rec, rows)
        if torch_ok:
            try:
                bench_torch(k, n, m, c_bf, c_q, io, rec)
            except Exception as e:
                print(f"FAILED torch: {type(e).__name__}: {str(e)[:800]}", flush=True)
                traceback.print_exc()


def bench_mgpu(k, n, m, x, lins, c_q, io, rec, rows):
    """The Mosaic GPU kernel over a few tile configs (default first)."""
    try:
        by_layout = {lay: [mg.pack_mgpu_linear(lin, bits=4, dtype=x.dtype, layout=lay) for lin in lins]
                     for lay in mg.LAYOUTS}
    except Exception as e:
        rows.append(dict(K=k, N=n, M=m, variant="mgpu[pack]", error=report_failure("mgpu pack", e)))
        return
    packs = by_layout[mg.default_layout(4)]  # pack_mgpu's default layout: what dispatch.prepare builds
    p0 = packs[0]
    plain = [mg.pack_mgpu_linear(lin, bits=4, dtype=x.dtype, split_pad=False) for lin in lins]
    if plain[0].k_pad != p0.k_pad:  # K padded for split-K by default (pack_mgpu split_pad): also time without
        by_layout["unpadded"] = plain
    del plain
    ref = mg.reference(x, p0).astype(jnp.float32)
    pbytes = device_bytes(p0.w) + p0.sz.nbytes + io
    if m >= 256:  # what dispatch does from LARGE_M_MGPU on: dequantize in XLA, then cuBLAS
        try:
            fx = jax.jit(lambda x, ps: [dispatch.xla_matmul(x, p) for p in ps])
            rec(m, "mgpu_layout_xla_dequant", time_jax(fx, (x, packs), c_q), pbytes)
        except Exception as e:
            rows.append(dict(K=k, N=n, M=m, variant="mgpu_layout_xla_dequant", error=report_failure("xla", e)))
    cands = [c for c in mgpu_candidates(m, p0, 64)
             if all(f in mgpu_name(*c) for f in MGPU_FILTER) and not any(f in mgpu_name(*c) for f in MGPU_EXCLUDE)]
    if MGPU_VARIANTS:  # the default, then the default with each set of fields replaced (--mgpu-variants)
        d = mg.default_config(m, p0)
        cands = [(d, mg.default_layout(4))] + [(c, mg.default_layout(4)) for c in variant_configs(d, MGPU_VARIANTS)
                                                if c != d]
    if "unpadded" in by_layout:
        cands.insert(2, (mg.default_config(m, by_layout["unpadded"][0]), "unpadded"))
    first = None  # the default's timed call, timed again after the others (DEFAULT_AGAIN)
    timed = 0
    for i, (cfg, lay) in enumerate(cands[:MAX_MGPU_CFGS]):
        if over_budget():
            print(f"SKIPPED mgpu {cfg} at K={k} N={n} M={m}: --budget-s exhausted", flush=True)
            continue
        name = mgpu_name(cfg, lay)
        packs = by_layout[lay]
        try:
            fk = jax.jit(lambda x, ps, cfg=cfg: [mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=INTERPRET)
                                                 for p in ps])
            y = fk(x, packs[:1])[0].astype(jnp.float32)
            err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            t = time_jax(fk, (x, packs), c_q)
            rec(m, name, t, pbytes, err, cfg, lay)
            timed += 1
            if i == 0:
                first = (fk, packs, name, err, cfg, lay)
            if MGPU_PARTS and m <= 16 and i < 4:  # the Pallas call alone (inputs already padded; no XLA epilogue)
                bm = cfg.block_m
                mp = -(-m // bm) * bm
                x2 = jnp.pad(x, ((0, mp - m), (0, p0.k_pad - p0.k)))

                def pallas_only(x2, ps, cfg=cfg):
                    if cfg.schedule == "grid":
                        return [mg._build(mp, p, cfg, x2.dtype, INTERPRET)(x2, p.w, p.sz) for p in ps]
                    return [mg._build_stream(mp, p, cfg, x2.dtype, INTERPRET)[0](x2, p.w, p.sz) for p in ps]

                rec(m, "kernel_only:" + name, time_jax(jax.jit(pallas_only), (x2, packs), c_q), pbytes, None, cfg)
                # diagnostic: the same grid / persistent schedule and TMA pipeline (w, x, scales+zeros into SMEM)
                # with an empty body = the streaming rate this structure can reach
                real = mg._mma_acc_hw, mg._dequant_mma_hw
                mg._mma_acc_hw = lambda acc, *a, **kw: acc
                mg._dequant_mma_hw = lambda *a, **kw: None
                try:  # a fresh jit of the same function traces the patched leaves
                    fe = jax.jit(lambda x2, ps: pallas_only(x2, ps))
                    rec(m, "empty_body:" + name, time_jax(fe, (x2, packs), c_q), pbytes, None, cfg)
                finally:
                    mg._mma_acc_hw, mg._dequant_mma_hw = real
                if cfg.schedule == "grid":  # and the other way round: the same bodies with no copies at all
                    with _compute_only_pipeline():
                        fc = jax.jit(lambda x2, ps: pallas_only(x2, ps))
                        rec(m, "compute_only:" + name, time_jax(fc, (x2, packs), c_q), pbytes, None, cfg)
        except Exception as e:  # keep going: one config failing must not end the run
            rows.append(dict(K=k, N=n, M=m, variant=name, error=report_failure(name, e)))
    if first is not None and timed > 1 and DEFAULT_AGAIN and not over_budget():
        # Session 20 (H100, 8192 x 28672, M = 1): the config timed first came out 3.5-4 us slower than
        # the one after it in two runs with the two configs swapped. The default timed again last, as
        # its own row (AGAIN_SUFFIX), tells a position effect from a config difference.
        fk, packs, name, err, cfg, lay = first
        rec(m, name + AGAIN_SUFFIX, time_jax(fk, (x, packs), c_q), pbytes, err, cfg, lay)


AGAIN_SUFFIX = "#again"
DEFAULT_AGAIN = True  # --no-default-again turns the second timing of the default off


def default_times(rs: list[dict]) -> tuple[float, float]:
    """A point's Mosaic rows -> (the default's time when timed first, its time when timed again last;
    nan where absent). The default is the first ``mgpu[`` row."""
    mgr = [r for r in rs if r["variant"].startswith("mgpu[") and "us" in r]
    if not mgr:
        return float("nan"), float("nan")
    name = mgr[0]["variant"]
    again = next((r["us"] for r in mgr if r["variant"] == name + AGAIN_SUFFIX), float("nan"))
    return mgr[0]["us"], again


@contextlib.contextmanager
def _compute_only_pipeline():
    """Diagnostic: ``plgpu.emit_pipeline`` replaced by a loop over the same steps on one SMEM
    buffer per operand, never copied into (no TMA, no barriers): each CTA's dequant + wgmma work
    alone, so that with the empty-body time it splits the kernel into memory and compute. The
    SMEM holds whatever was there (timing only; the result is garbage)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    real = plgpu.emit_pipeline

    def fake(body, *, grid, in_specs, max_concurrent_steps=1, init_carry=None, **kw):
        def run(*gmem):
            smem = [plgpu.SMEM(sp.block_shape, g.dtype, transforms=tuple(sp.transforms)) for sp, g in zip(in_specs, gmem)]

            def scoped(*refs):
                if init_carry is None:
                    jax.lax.fori_loop(0, grid[0], lambda i, c: body((i,), *refs), None)
                    return None
                return jax.lax.fori_loop(0, grid[0], lambda i, c: body((i,), *refs, c), init_carry)

            return pl.run_scoped(scoped, *smem)

        return run

    plgpu.emit_pipeline = fake
    try:
        yield
    finally:
        plgpu.emit_pipeline = real


def bench_torch(k, n, m, c_bf, c_q, io, rec):
    import torch

    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(c_bf)]
    rec(m, "torch_bf16", time_torch(lambda i: torch.nn.functional.linear(x, ws[i]), c_bf), k * n * 2 + io)
    # tinygemm: int4 g128 asym, packed once
    gs = 128
    packed, sz = [], []
    for i in range(c_q):
        q = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32)
        try:
            wq = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        except Exception:
            wq = torch.ops.aten._convert_weight_to_int4pack(q, 8)
        packed.append(wq)
        s = torch.rand(k // gs, n, 2, device=dev, dtype=torch.bfloat16)
        sz.append(s)
    fn = lambda i: torch.ops.aten._weight_int4pack_mm(x, packed[i], gs, sz[i])  # noqa: E731
    fn(0)
    rec(m, "torch_tinygemm", time_torch(fn, c_q), k * n // 2 + (k // gs) * n * 4 + io)


def _session4_options(cfg):
    """``cfg`` as session 4's defaults ran it: x padded in XLA, grid partials ``[split, Np, Mp]``."""
    return dataclasses.replace(cfg, tma_bounds=False, transpose_out=None)


def _token_major(cfg):
    """``cfg`` with token-major output forced on (grid / tiles; stream has none)."""
    return dataclasses.replace(cfg, transpose_out=None if cfg.schedule == "stream" else True)


def _tma_reduce(cfg):
    """``cfg`` with its split-K / stream-K partials TMA-reduced in the kernel (when it has any)."""
    split = cfg.split_k > 1 or cfg.schedule == "stream"
    return dataclasses.replace(cfg, split_reduce="tma") if split else cfg


def _grid_variant(**kw):
    """default_config with the decode grid's split-K knobs changed (M <= 16)."""
    def pick(default, m, p):
        return mg._grid_config(m, p, **kw) if m <= 16 else default(m, p)
    return pick


def _major16_variant(**kw):
    """The decode grid storing token-major partials at every M <= 16 (before ed44e99 the default
    stored [Np, M] at M = 16, which XLA then transposed), with optional other grid knobs."""
    def pick(default, m, p):
        if m > 16:
            return default(m, p)
        return dataclasses.replace(mg._grid_config(m, p, **kw), transpose_out=True)
    return pick


# --e2e-configs: name -> (pack_mgpu keyword arguments, config(default_config, m, packed))
E2E_CONFIGS = {
    "kblocks": (dict(layout="kblocks"), lambda default, m, p: default(m, p)),
    "tma": ({}, lambda default, m, p: _tma_reduce(default(m, p))),
    "steps2": ({}, _grid_variant(min_steps=2)),
    "steps8": ({}, _grid_variant(min_steps=8)),
    "cta8": ({}, _grid_variant(ctas_per_sm=8)),
    "cta32": ({}, _grid_variant(ctas_per_sm=32, min_steps=2)),
    "split32": ({}, _grid_variant(max_split=32)),
    "tma-split32": ({}, lambda default, m, p: _tma_reduce(_grid_variant(max_split=32)(default, m, p))),
    # session 11's default: the split-K partials summed in XLA (or by the consumer kernel)
    "xla-reduce": ({}, lambda default, m, p: dataclasses.replace(default(m, p), split_reduce="xla")),
    "major16": ({}, _major16_variant()),
    "major16-cta16": ({}, _major16_variant(ctas_per_sm=16)),
    # session 17's default for the wide layers (N >= 12288) at 9-16 tokens: 128-row N tiles (the default
    # takes 64 since session 18: the 7B step at batch 16 2.98 against 3.13 ms on the H100)
    # the split-K grid for every decode layer, as before session 24 moved o_proj / down_proj at 9-16 tokens
    # to stream-K (default_config)
    "grid16": ({}, lambda default, m, p: mg._grid_config(m, p) if m <= 16 else default(m, p)),
    "bn128-wide": ({}, lambda default, m, p: (dataclasses.replace(default(m, p), block_n=128)
                                              if 8 < m <= 16 and p.n_pad >= 12288 else default(m, p))),
}


_STREAM_SPEC = re.compile(r"stream((?:-(?:c|st|bn|wg)\d+)*)(?:@(\d+x\d+(?:\+\d+x\d+)*))?")


def _stream_variant(knobs: dict[str, str], shapes: set | None = None):
    """The decode matmuls (M <= 16) on the persistent stream-K schedule instead of the split-K grid:
    ``c`` CTAs per SM (default 1), ``st`` pipeline stages (default the grid's), ``wg`` compute
    warpgroups (default 1; 2: warp-specialised, a memory warpgroup feeding two compute warpgroups
    that each take ``bn`` rows of the CTA's tile), ``bn`` the N tile per compute warpgroup (default
    128 with one warpgroup, 64 with two, where the CTA tile divides Np); token-major fp32 partials TMA-added into one buffer, as the
    split grids store them, so the model's accumulators and norm kernels take them unchanged.
    ``shapes``: only the layers of these ``(K, N)`` (default every layer)."""
    def pick(default, m, p):
        if m > 16 or (shapes is not None and (p.k, p.n) not in shapes):
            return default(m, p)
        base = mg._decode_stream_config(m, p, int(knobs.get("c", 1)))
        wgs = int(knobs.get("wg", 1))
        bn = int(knobs.get("bn", 128 if wgs == 1 and p.n_pad % 128 == 0 else 64))
        return dataclasses.replace(base, block_n=bn, compute_wgs=wgs, num_stages=int(knobs.get("st", base.num_stages)))
    return pick


_GRID_SPEC = re.compile(r"g((?:-(?:s|c|x|bn|st|k|rw)\d+)+)(?:@(\d+x\d+(?:\+\d+x\d+)*))?")
_GRID_KNOBS = {"s": "min_steps", "c": "ctas_per_sm", "x": "max_split", "bn": "block_n"}


def e2e_config(name: str):
    """``--e2e-configs`` entry ``name`` as ``(pack_mgpu keyword arguments, config(default, m, packed))``:
    a name of :data:`E2E_CONFIGS`, or decode-grid specs ``g-<knob><N>...[@KxN[+KxN...]]`` joined by
    ``/``. A spec's knobs are ``s`` (min_steps), ``c`` (ctas_per_sm), ``x`` (max_split), ``bn`` (the N
    tile), ``st`` (pipeline stages), ``k`` (split-K forced, a divisor of the K blocks) and ``rw`` (``rw1``:
    ``store_wait="read"``, each CTA exits once its output tile is read out of SMEM); at M <= 16
    a layer takes the first spec naming its K x N shape (a spec without ``@`` names every shape), and
    a layer no spec names keeps the default: e.g. ``g-s2@4096x4096`` splits o_proj of the 7B step into
    CTAs of 2 K blocks and leaves the other layers alone, ``g-s1@4096x4096/g-x64`` gives o_proj 1-block
    CTAs and every other layer up to 64 splits. ``stream[-cN][-stN][-bnN][-wgN][@KxN[+KxN...]]``: the decode matmuls (or only those of the named shapes) on the
    persistent stream-K schedule (:func:`_stream_variant`), e.g. ``stream-c2-st4``."""
    if name in E2E_CONFIGS:
        return E2E_CONFIGS[name]
    stream = _STREAM_SPEC.fullmatch(name)
    if stream is not None:
        knobs = dict(re.findall(r"-([a-z]+)(\d+)", stream.group(1)))
        if len(knobs) != stream.group(1).count("-"):
            raise SystemExit(f"--e2e-configs: {name!r} sets a knob twice")
        shapes = ({tuple(int(v) for v in s.split("x")) for s in stream.group(2).split("+")} if stream.group(2)
                  else None)
        return {}, _stream_variant(knobs, shapes)
    specs = []
    for spec in name.split("/"):
        match = _GRID_SPEC.fullmatch(spec)
        if match is None:
            raise SystemExit(f"--e2e-configs: unknown variant {name!r} ({spec!r}); known: {', '.join(E2E_CONFIGS)}, "
                             "or grid specs g-<knob><N>...[@KxN+...] joined by / with knobs s, c, x, bn, st, k, rw "
                             "(e.g. g-s2-bn64@4096x4096/g-x64)")
        knobs = dict(re.findall(r"-([a-z]+)(\d+)", match.group(1)))
        if len(knobs) != match.group(1).count("-"):
            raise SystemExit(f"--e2e-configs: {spec!r} sets a knob twice")
        shapes = {tuple(int(v) for v in s.split("x")) for s in match.group(2).split("+")} if match.group(2) else None
        specs.append((spec, shapes, knobs))

    def pick(default, m, p):
        spec, knobs = next(((sp, kn) for sp, shapes, kn in specs if shapes is None or (p.k, p.n) in shapes),
                           (None, None))
        if m > 16 or spec is None:
            return default(m, p)
        cfg = mg._grid_config(m, p, **{_GRID_KNOBS[k]: int(v) for k, v in knobs.items() if k in _GRID_KNOBS})
        if "st" in knobs:
            cfg = dataclasses.replace(cfg, num_stages=int(knobs["st"]))
        if "rw" in knobs:
            cfg = dataclasses.replace(cfg, store_wait="read" if int(knobs["rw"]) else "full")
        if "k" in knobs:
            split, nk = int(knobs["k"]), p.k_pad // cfg.block_k
            if split < 1 or nk % split:
                raise ValueError(f"{spec}: split {split} does not divide the {nk} K blocks of {p.k} x {p.n}")
            cfg = dataclasses.replace(cfg, split_k=split, split_reduce="tma" if split > 1 else "xla")
        return cfg

    return {}, pick


def decode_attn_points(args, interp: bool) -> list[tuple[str, tuple[int, int, int, int, int]]]:
    """``--decode-attn-shapes`` as ``(spec, (B, H, KV, hd, S))``; tiny stand-ins in the interpreter."""
    out = []
    for spec in args.decode_attn_shapes.split(","):
        b, h, kvh, hd, s = (int(v) for v in spec.split("x"))
        out.append((spec, (min(b, 2), 4, 2, 64, min(s, 128)) if interp else (b, h, kvh, hd, s)))
    return out


def bench_decode_attention(args) -> list[dict]:
    """Device-timed decode attention (one token per row over a ``[B, S, KV, hd]`` bf16 cache, all
    slots valid, the query at slot ``index``): the Pallas kernel (default tiles, and one split)
    against the XLA einsum path of ``jgptq.models.llama`` (what ``forward_step(attention="xla")``
    runs). Caches rotate over copies larger than L2; GB/s counts the K/V bytes the kernel reads
    (slots <= index) and, for XLA, all slots (it reads the whole cache)."""
    from jgptq.models.config import LlamaConfig
    from jgptq.models.llama import _attention
    from jgptq.pallas_kernels import decode_attention as da

    interp = jax.default_backend() != "gpu"
    rows = []
    for spec, (b, h, kvh, hd, s) in decode_attn_points(args, interp):
        cfg = LlamaConfig(model_type="llama", vocab_size=8, hidden_size=h * hd, intermediate_size=8, num_layers=1,
                          num_heads=h, num_kv_heads=kvh, head_dim=hd)
        cache_bytes = 2 * b * s * kvh * hd * 2
        n = 2 if interp else _copies(cache_bytes)
        key = jax.random.key(s + b)
        q = jax.random.normal(key, (b, h, hd), jnp.bfloat16)
        kcs = [jax.random.normal(jax.random.fold_in(key, 2 * i), (b, s, kvh, hd), jnp.bfloat16) for i in range(n)]
        vcs = [jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (b, s, kvh, hd), jnp.bfloat16) for i in range(n)]
        valid = jnp.ones((b, s), bool)

        def xla(q, kcs, vcs, index):
            pos = jnp.full((b, 1), index)
            kpos = jnp.broadcast_to(jnp.arange(s), (b, s))
            return [_attention(q[:, None], kc, vc, index + jnp.arange(1), valid, pos, kpos, cfg)
                    for kc, vc in zip(kcs, vcs)]

        def kernel(q, kcs, vcs, index, config=None):
            return [da.decode_attention(q, kc, vc, valid, index, config=config, interpret=interp)
                    for kc, vc in zip(kcs, vcs)]

        d = da.default_config(b, kvh, s)
        fns = {"xla": xla, f"pallas[bs{d.block_s},sp{d.splits}]": kernel}
        if d.splits != 1:
            one = dataclasses.replace(d, splits=1)
            fns["pallas[bs64,sp1]"] = functools.partial(kernel, config=one)
        for index in (s // 2, s - 1):
            ref = da.reference(q, kcs[0], vcs[0], valid, index)
            for name, fn in fns.items():
                f = jax.jit(fn)
                try:
                    out = f(q, kcs, vcs, jnp.int32(index))[0].reshape(b, h, hd)
                    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                    t = time_jax(f, (q, kcs, vcs, jnp.int32(index)), n, trials=3 if interp else 7)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(report_failure(f"decode attention {spec} {name}", e), flush=True)
                    continue
                read = cache_bytes * ((index + 1) / s if name != "xla" else 1.0)
                row = dict(decode_attn=spec, B=b, H=h, KV=kvh, hd=hd, S=s, index=index, impl=name, us=t * 1e6,
                           GBps=read / t / 1e9, max_abs_err=err)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\ndecode attention (us; GB/s of the K/V it reads):")
    for r in rows:
        print(f"  B={r['B']:3d} H={r['H']} KV={r['KV']} hd={r['hd']} S={r['S']:6d} index={r['index']:6d} "
              f"{r['impl']:>18}: {r['us']:8.1f} us {r['GBps']:8.0f} GB/s  err {r['max_abs_err']:.1e}")
    return rows


def update_sweep_configs(b: int, kvh: int, s: int, index: int) -> list:
    """``--decode-attn-update`` configs: the default, then its other slot steps, then block_s x
    warps x stages around it, then more splits (each valid for ``s`` slots)."""
    from jgptq.pallas_kernels import decode_attention as da

    d = da.default_config(b, kvh, s)
    out = [d]
    for bs in (32, 64, 128):  # the default's other slot steps first (a short --decode-attn-max-cfgs keeps them)
        c = dataclasses.replace(d, block_s=bs)
        if (s // d.splits) % bs == 0 and c not in out:
            out.append(c)
    for bs, nw, ns in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
        c = dataclasses.replace(d, block_s=bs, num_warps=nw, num_stages=ns)
        if (s // d.splits) % bs == 0 and c not in out:
            out.append(c)
    for sp in (2, 4, 8):
        c = dataclasses.replace(d, splits=sp)
        if s % (sp * d.block_s) == 0 and sp * d.block_s <= max(index, 1) * 2 and c not in out:
            out.append(c)
    return out


def bench_decode_update(args) -> list[dict]:
    """Device-timed ``decode_attention_update`` (RoPE + cache write + attention) over configs, from
    ``--decode-attn-parts`` fp32 split-K addends of the q/k/v matmul as in the 7B step (0: one bf16
    input). The caches are donated and carried from call to call (written in place, as in the
    decode loop), rotated over copies larger than L2. Times are the profiler's GPU kernel
    durations (median over every call of a config): the configs of a point run one after another
    in one trace, so their kernels are told apart by order."""
    import glob
    import gzip

    from jgptq.pallas_kernels import decode_attention as da

    interp = jax.default_backend() != "gpu"
    rows = []
    for spec, (b, h, kvh, hd, s) in decode_attn_points(args, interp):
        n = 2 if interp else _copies(2 * b * s * kvh * hd * 2)
        p = args.decode_attn_parts
        key = jax.random.key(b * s + h)
        shape = (p, b, h + 2 * kvh, hd) if p else (b, h + 2 * kvh, hd)
        qkv = jax.random.normal(key, shape, jnp.float32 if p else jnp.bfloat16)
        ang = jax.random.uniform(jax.random.fold_in(key, 1), (b, hd // 2)) * 6.0
        cos, sin = jnp.cos(ang).astype(jnp.bfloat16), jnp.sin(ang).astype(jnp.bfloat16)
        valid = jnp.ones((b, s), bool)

        def fresh():
            return ([jax.random.normal(jax.random.fold_in(key, 2 * i + 2), (b, s, kvh, hd), jnp.bfloat16)
                     for i in range(n)],
                    [jax.random.normal(jax.random.fold_in(key, 2 * i + 3), (b, s, kvh, hd), jnp.bfloat16)
                     for i in range(n)])

        for index in (s // 2, s - 1):
            if over_budget():
                break
            cfgs = update_sweep_configs(b, kvh, s, index)[: args.decode_attn_max_cfgs]
            runs = []  # (cfg, name, jitted fn, [kcs, vcs], err)
            for cfg in cfgs:
                if over_budget():
                    break

                def fn(qkv, kcs, vcs, index, cfg=cfg):
                    outs = [da.decode_attention_update(qkv, kc, vc, valid, index, cos, sin, config=cfg,
                                                       interpret=interp) for kc, vc in zip(kcs, vcs)]
                    return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]

                f = jax.jit(fn, donate_argnums=(1, 2))
                name = f"bs{cfg.block_s},sp{cfg.splits},w{cfg.num_warps},st{cfg.num_stages}"
                try:
                    kcs, vcs = fresh()
                    ref = da.reference_update(qkv, kcs[0], vcs[0], valid, index, cos, sin)[0]
                    o, kcs, vcs = f(qkv, kcs, vcs, jnp.int32(index))
                    err = float(jnp.max(jnp.abs(o[0].astype(jnp.float32) - ref.astype(jnp.float32))))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(report_failure(f"decode update {spec} {name}", e), flush=True)
                    continue
                runs.append([cfg, name, f, [kcs, vcs], err])
            reps = 2 if interp else 10
            tdir = os.path.join(args.out, f"trace_update_{spec}_{index}")
            with jax.profiler.trace(tdir, create_perfetto_trace=True):
                for run in runs:
                    kcs, vcs = run[3]
                    for _ in range(reps):
                        o, kcs, vcs = run[2](qkv, kcs, vcs, jnp.int32(index))
                    jax.block_until_ready(o)
                    run[3] = [kcs, vcs]
            files = glob.glob(os.path.join(tdir, "**", "*perfetto_trace.json.gz"), recursive=True)
            spans = []
            if files:
                with gzip.open(files[0]) as fh:
                    tr = json.load(fh)
                events = tr["traceEvents"] if isinstance(tr, dict) else tr
                spans = sorted((a, b - a) for a, b, nm in gpu_spans(events) if "decode_attention_update" in nm)
            per = reps * n
            if len(spans) != per * len(runs):
                print(f"decode update {spec} index {index}: {len(spans)} kernel spans in the trace, expected "
                      f"{per} x {len(runs)}; no device times", flush=True)
                continue
            for i, (cfg, name, _, _, err) in enumerate(runs):
                t = statistics.median(d for _, d in spans[i * per:(i + 1) * per]) * 1e-6
                read = 2 * b * kvh * hd * 2 * (index + 1)
                row = dict(decode_update=spec, B=b, H=h, KV=kvh, hd=hd, S=s, index=index, parts=p, cfg=name,
                           default=i == 0 and cfg == cfgs[0], us=t * 1e6, GBps=read / t / 1e9, max_abs_err=err)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del runs
    print(f"\ndecode_attention_update, {args.decode_attn_parts} fp32 q/k/v addends (device us; best 3 + default):")
    for key in dict.fromkeys((r["decode_update"], r["index"]) for r in rows):
        pts = sorted((r for r in rows if (r["decode_update"], r["index"]) == key), key=lambda r: r["us"])
        dflt = next((r for r in pts if r["default"]), None)
        best = ", ".join(f"{r['cfg']} {r['us']:.1f}" for r in pts[:3])
        print(f"  {key[0]:>18} index {key[1]:5d}: default {dflt['us'] if dflt else float('nan'):6.1f} | best {best}"
              f" | err {max(r['max_abs_err'] for r in pts):.1e}")
    return rows

def e2e_base(rows: list[dict], r: dict) -> dict:
    """The bf16 row that ``r`` is compared with: same batch, same decode attention and norm."""
    return next(b for b in rows if b["model"] == "bf16" and b["batch"] == r["batch"]
                and b.get("attention") == r.get("attention") and b.get("norm") == r.get("norm")
                and b.get("cmdbuf") == r.get("cmdbuf"))


def e2e_compile_variants(args) -> list[tuple[str, dict | None, int]]:
    """``(name, XLA compiler options, scan unroll)`` of each compiled form of every e2e variant:
    the default (``"on"``), and per flag: ``--e2e-cmdbuf-off`` (XLA launches the step's kernels one
    by one, no CUDA graph), ``--e2e-unroll N`` (the decode scan unrolled N steps per loop
    iteration), ``--e2e-xla-option KEY=VALUE`` (that XLA debug option for this compile only)."""
    out = [("on", None, 1)]
    if args.e2e_cmdbuf_off:
        out.append(("cmdbuf-off", {"xla_gpu_enable_command_buffer": ""}, 1))
    for n in args.e2e_unroll:
        out.append((f"unroll{n}", None, n))
    for opt in args.e2e_xla_option:
        k, sep, v = opt.partition("=")
        if not sep or not k:
            raise SystemExit(f"--e2e-xla-option must be KEY=VALUE; got {opt!r}")
        out.append((f"xla[{opt}]", {k: v}, 1))
    return out


@contextlib.contextmanager
def e2e_norm(variant: str):
    """``--e2e-norm`` variant -> the ``norm=`` of ``forward_step``, with ``pallas`` variants'
    suffixes applied while tracing: ``-pN`` the kernel adds at most N split-K addends itself
    (``jgptq.models.llama.NORM_MAX_PARTS``), ``-wN`` it runs N warps (``add_rms_norm.default_config``),
    ``-glu`` / ``-xact`` silu(gate) * up inside the down projection's kernel / as its own XLA op
    (``jgptq.models.llama.GLU_IN_DOWN`` True / False), ``-gsN`` inside it with N pipeline stages
    (``gptq_matmul_mgpu.glu_config``), ``-pf`` each decode matmul prefetching the next one's first
    weights into L2 (``jgptq.models.llama.PREFETCH_NEXT``), ``-pfN`` that with at most N MiB of
    words per matmul (``gptq_matmul_mgpu.PREFETCH_MAX_BYTES``), ``-pmlp`` each block's MLP as one persistent
    kernel (``jgptq.models.llama.PERSISTENT_MLP``), ``-pmlpV`` that with the timing variant V of
    ``python -m jgptq.pallas_kernels.persistent_mlp`` (CTAs per SM, gate/up split, stage cap: 1, 3s2, 2k4)."""
    from jgptq.models import llama
    from jgptq.pallas_kernels import add_rms_norm as arn
    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg

    old_parts, old_cfg, old_glu = llama.NORM_MAX_PARTS, arn.default_config, llama.GLU_IN_DOWN
    old_glu_cfg, old_pf, old_pf_bytes = mg.glu_config, llama.PREFETCH_NEXT, mg.PREFETCH_MAX_BYTES
    from jgptq.pallas_kernels import persistent_mlp as pm

    old_pmlp, old_pm_cfg = llama.PERSISTENT_MLP, pm.default_config
    name, *opts = variant.split("-")
    try:  # a bad suffix raises inside: the knobs already set are put back
        for o in opts:
            if o[:4] == "pmlp":
                llama.PERSISTENT_MLP = True
                if o != "pmlp":
                    spec = o[4:]
                    if not pm._VARIANT.fullmatch(spec):
                        raise SystemExit(f"--e2e-norm: -pmlp{spec} in {variant!r}: want -pmlp<CTAs per SM 1-4>"
                                         "[k<gate/up split>][s<max stages>][nopf], e.g. -pmlp3s2")

                    def cfg_of(m, gate_up, down, spec=spec, **kw):
                        return pm._variant(spec, old_pm_cfg(m, gate_up, down, **kw), gate_up)

                    pm.default_config = cfg_of
            elif o[:2] == "pf" and (o == "pf" or o[2:].isdigit()):
                llama.PREFETCH_NEXT = True
                if o != "pf":
                    mg.PREFETCH_MAX_BYTES = int(o[2:]) << 20
            elif o in ("glu", "xact"):
                llama.GLU_IN_DOWN = o == "glu"
            elif o[:2] == "gs" and o[2:].isdigit():
                llama.GLU_IN_DOWN = True
                mg.glu_config = lambda m, p, n=int(o[2:]): dataclasses.replace(old_glu_cfg(m, p), num_stages=n)
            elif o[:1] == "p" and o[1:].isdigit():
                llama.NORM_MAX_PARTS = int(o[1:])
            elif o[:1] == "w" and o[1:].isdigit():
                arn.default_config = lambda m, d, n, w=int(o[1:]): dataclasses.replace(old_cfg(m, d, n), num_warps=w)
            else:
                raise SystemExit(f"--e2e-norm: unknown suffix {o!r} in {variant!r} (-pN, -wN, -glu, -gsN, -xact, -pf, "
                                 "-pfN, -pmlp, -pmlpV)")
        yield name
    finally:
        llama.NORM_MAX_PARTS, arn.default_config, llama.GLU_IN_DOWN = old_parts, old_cfg, old_glu
        mg.glu_config, llama.PREFETCH_NEXT, mg.PREFETCH_MAX_BYTES = old_glu_cfg, old_pf, old_pf_bytes
        llama.PERSISTENT_MLP, pm.default_config = old_pmlp, old_pm_cfg


@contextlib.contextmanager
def e2e_attention(variant: str):
    """``--e2e-attention`` variant -> the ``attention=`` of ``forward_step``, with suffixes applied to
    ``decode_attention.default_config`` (the fused / unfused decode-attention kernels' tiles) while
    tracing: ``-bsN`` N cache slots per loop step, ``-spN`` N slot splits (capped to what the cache
    allows), ``-wN`` N warps, ``-stN`` N pipeline stages, ``-ck`` the splits combined in the kernel
    (``combine="kernel"``, the fused kernel only). ``fused-st3`` is the fused kernel with 3 stages
    where the default has 2; ``fused-sp4-ck`` 4 splits combined in the kernel."""
    from jgptq.pallas_kernels import decode_attention as da

    old_cfg = da.default_config
    name, *opts = variant.split("-")
    fields = {"bs": "block_s", "sp": "splits", "w": "num_warps", "st": "num_stages"}
    changes = {}
    for o in opts:
        if o == "ck":
            changes["combine"] = "kernel"
            continue
        key = o.rstrip("0123456789")
        if key not in fields or key == o:
            raise SystemExit(f"--e2e-attention: unknown suffix {o!r} in {variant!r} (-bsN, -spN, -wN, -stN, -ck)")
        changes[fields[key]] = int(o[len(key):])

    def patched(b, kvh, s, num_sms=None):
        if "splits" in changes and "block_s" not in changes:  # the default's slot steps for that split
            sp = max(1, changes["splits"])
            while True:  # the largest split count <= the asked one that the default's steps allow
                try:
                    base = old_cfg(b, kvh, s, num_sms, splits=sp)
                    break
                except ValueError:
                    sp -= 1
            cfg = dataclasses.replace(base, **{k: v for k, v in changes.items() if k != "splits"})
        else:
            cfg = dataclasses.replace(old_cfg(b, kvh, s, num_sms), **changes)
        sp = cfg.splits
        while sp > 1 and s % (cfg.block_s * sp):  # keep what divides the cache
            sp -= 1
        return dataclasses.replace(cfg, splits=sp)

    if changes:
        da.default_config = patched
    try:
        yield name
    finally:
        da.default_config = old_cfg


def e2e_cache(model, batch: int, slots: int, context: int) -> dict:
    """An empty KV cache whose first ``context`` slots count as filled (random keys / values):
    decode steps then attend to that many earlier tokens, as mid-generation."""
    cache = model.init_cache(batch, slots)
    if context:
        if not 0 < context < slots:
            raise SystemExit(f"--e2e-context must be in [0, {slots}); got {context}")
        key = jax.random.key(context)
        fill = lambda x, i: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)  # noqa: E731
        cache = e2e_rewind(dict(cache, k=[fill(x, i) for i, x in enumerate(cache["k"])],
                                v=[fill(x, 1000 + i) for i, x in enumerate(cache["v"])]), context)
    return cache


def e2e_rewind(cache: dict, context: int) -> dict:
    """``cache`` with decoding set back to slot ``context`` (keys / values kept, later slots invalid):
    every timed stretch of steps starts at the same context. Without it the cache index runs on
    from round to round and, past the last slot, every step rewrites that slot and attends to the
    whole cache (sessions 17-24 timed most steps at ~150-256 tokens of context, not at
    ``--e2e-context``)."""
    slots = cache["valid"].shape[1]
    valid = jnp.broadcast_to(jnp.arange(slots) < context, cache["valid"].shape)
    return dict(cache, valid=valid, index=jnp.asarray(context, cache["index"].dtype))


E2E_TRACE_STEPS = 5  # --e2e-trace: profiled single steps (after one warm call) ...
E2E_TRACE_SCANS = 2  # ... and profiled scan calls (after one warm call)


def e2e_check_slots(args) -> int:
    """The most steps one timed stretch runs from ``--e2e-context``; exits when they pass the cache."""
    longest = max(args.e2e_steps, args.e2e_scan, 1 + E2E_TRACE_STEPS if args.e2e_trace else 0,
                  (1 + E2E_TRACE_SCANS) * args.e2e_scan if args.e2e_trace else 0)
    if args.e2e_context + longest > args.e2e_slots:
        raise SystemExit(f"--e2e-context {args.e2e_context} + {longest} decode steps per timed stretch pass the "
                         f"--e2e-slots {args.e2e_slots} of the cache; raise --e2e-slots")
    return longest


def bench_e2e(args) -> list[dict]:
    """Decode tokens/s of a Llama-2-7B-shaped model (random weights made on the device), bf16 vs GPTQ.

    The quantized model uses 4-bit g128 asymmetric GPTQ linears (all 7 per block; embeddings,
    norms and lm_head stay bf16; ``--e2e-quant-lm-head`` adds one with lm_head quantized too) through
    ``jgptq.models`` (its ``QuantLinear`` asks
    ``dispatch.prepare`` for a kernel). Reports ms/step, tokens/s and the device bytes of the
    weights the kernels read (bits per quantized weight).

    Every timed stretch (``--e2e-steps`` steps, one scan, each trace) starts from ``--e2e-context``
    tokens of context (:func:`e2e_rewind`). All models stay on the device and are timed in
    ``--e2e-rounds`` interleaved rounds (the model order rotates each round); a row's
    ``ms_per_step`` is the median over rounds, ``ms_rounds`` each round's. A model timed alone, once, after the others moved by 10 % between runs on the
    H200 (benchmarks/RESULTS.md, session 6); interleaving spreads such drift over all models.
    """
    from jgptq.models.config import LlamaConfig
    from jgptq.models.llama import LlamaForCausalLM

    e2e_check_slots(args)
    d, f, layers, v = (4096, 11008, args.e2e_layers, 32000) if not INTERPRET else (256, 512, 2, 512)
    cfg = LlamaConfig(model_type="llama", vocab_size=v, hidden_size=d, intermediate_size=f, num_layers=layers,
                      num_heads=d // 128, num_kv_heads=d // 128, head_dim=128)
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    key = (jax.random.fold_in(jax.random.key(0), i) for i in itertools.count())  # as many as the models need

    def float_lin(k, n):
        return {"kernel": (jax.random.normal(next(key), (k, n), jnp.bfloat16) * 0.02)}

    def quant_lin(k, n):
        lin = random_gptq_linear(next(key), k, n, bits=4, group_size=128)
        lin["scales"] = (lin["scales"].astype(jnp.float32) * 0.03).astype(jnp.float16)
        return lin

    def build(make, head=None):
        layers_p = []
        for _ in range(layers):
            lp = {"input_layernorm": {"scale": jnp.ones((d,), jnp.bfloat16)},
                  "post_attention_layernorm": {"scale": jnp.ones((d,), jnp.bfloat16)},
                  "self_attn": {}, "mlp": {}}
            for name, (k, n) in shapes.items():
                a, b = name.split(".")
                lp[a][b] = make(k, n)
            layers_p.append(lp)
        return {"embed_tokens": {"embedding": jax.random.normal(next(key), (v, d), jnp.bfloat16) * 0.02},
                "layers": layers_p, "norm": {"scale": jnp.ones((d,), jnp.bfloat16)},
                "lm_head": (head or float_lin)(d, v)}

    batches = tuple(int(b) for b in args.e2e_batches.split(","))
    if 1 not in batches:
        raise SystemExit("--e2e-batches must include 1 (the ratios, traces and generate() rows are batch 1)")
    rows = []
    runs = [("bf16", float_lin, None, True, False)]
    runs += [(f"gptq4_g128[{kn}]", quant_lin, kn, True, False) for kn in args.e2e_kernels.split(",")]
    if args.e2e_nofuse:  # q/k/v and gate/up as separate kernels (the first kernel choice)
        kn = args.e2e_kernels.split(",")[0]
        runs.append((f"gptq4_g128[{kn},unfused]", quant_lin, kn, False, False))
    if args.e2e_variants:  # the Mosaic kernel on the "nk" layout, as session 4 ran it, and without split_pad
        runs.append(("gptq4_g128[mgpu,nk]", quant_lin, "mgpu", True, "nk"))
        runs.append(("gptq4_g128[mgpu,session4]", quant_lin, "mgpu", True, "session4"))
        runs.append(("gptq4_g128[mgpu,unpadded]", quant_lin, "mgpu", True, "unpadded"))
    if args.e2e_quant_lm_head:  # lm_head a 4-bit GPTQ linear too (GPTQModel's lm_head=True), first kernel
        kn = args.e2e_kernels.split(",")[0]
        runs.append((f"gptq4_g128[{kn},lm_head4]", quant_lin, kn, True, "lm_head4"))
    configs = {name: e2e_config(name) for name in filter(None, args.e2e_configs.split(","))}
    for name in configs:
        runs.append((f"gptq4_g128[mgpu,{name}]", quant_lin, "mgpu", True, name))
    real_pack, real_default = mg.pack_mgpu, mg.default_config
    gen_models = {}
    built = []  # (label, step, leaves, {batch: [ids, mask, cache]}, row fields)
    for label, make, kernel, fuse, variant in runs:
        if kernel is not None:  # the kernel QuantLinear's dispatch.prepare picks at build time
            dispatch.DEFAULT_GPU_KERNEL = kernel
        # dispatch.prepare and gptq_matmul_mgpu look these up at build / trace time: for this model
        # only, pack the "nk" layout ("session4": "nk" without split_pad, the default tiles with x padded
        # and [split, Np, Mp] partials; "unpadded": the default without split_pad). Both batch sizes are
        # compiled here; the timed calls reuse them.
        mg.pack_mgpu = (functools.partial(real_pack, layout="nk") if variant == "nk"
                        else functools.partial(real_pack, layout="nk", split_pad=False) if variant == "session4"
                        else functools.partial(real_pack, split_pad=False) if variant == "unpadded"
                        else functools.partial(real_pack, **configs[variant][0]) if variant in configs
                        else real_pack)
        mg.default_config = ((lambda m, p: _session4_options(real_default(m, p))) if variant == "session4"
                             else functools.partial(configs[variant][1], real_default) if variant in configs
                             else real_default)
        params = build(make, quant_lin if variant == "lm_head4" else None)
        model = LlamaForCausalLM.from_params(cfg, params, dtype=jnp.bfloat16, fuse=fuse)
        del params
        wbytes = 0
        kernels = 0
        flat = nnx_flat_arrays(model)
        total_bytes = sum(device_bytes(x) for _, x in flat)
        for path, x in flat:
            if "prepared" in path:
                kernels += 1
                wbytes += device_bytes(x)
        # as models/generate.py does: flatten the module once and jit a function of its leaves
        # (passing the NNX module itself to a jitted function re-walks its graph in Python on
        # every call, a host cost of milliseconds per step for a 32-layer model)
        leaves, treedef = jax.tree.flatten(model)

        attns = args.e2e_attention.split(",")
        norms = args.e2e_norm.split(",")
        for attn, nvar, (cbuf, copts, unroll) in itertools.product(attns, norms, e2e_compile_variants(args)):
            name = label + (f",attn-{attn}" if len(attns) > 1 else "") + (f",norm-{nvar}" if len(norms) > 1 else "")
            name += f",{cbuf}" if cbuf != "on" else ""
            nrm = nvar.split("-")[0]
            if nrm not in ("auto", "xla", "pallas"):
                raise SystemExit(f"--e2e-norm: unknown implementation {nvar!r}")
            avar, attn = attn, attn.split("-")[0]

            def run(leaves, ids, mask, cache, treedef=treedef, attn=attn, nrm=nrm):
                return jax.tree.unflatten(treedef, leaves).step(ids, mask, cache, last_only=True, attention=attn,
                                                                 norm=nrm)

            def run_scan(leaves, ids, mask, cache, treedef=treedef, attn=attn, nrm=nrm, unroll=unroll):
                # --e2e-scan: that many greedy decode steps in one jitted lax.scan (one host call for
                # all of them: the per-call host work of dispatching ~600 arguments, and any CUDA graph
                # update, is paid once per scan)
                def body(carry, _):
                    ids, cache = carry
                    logits, cache = jax.tree.unflatten(treedef, leaves).step(ids, mask, cache, last_only=True,
                                                                              attention=attn, norm=nrm)
                    return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], cache), None

                (ids, cache), _ = jax.lax.scan(body, (ids, cache), None, length=args.e2e_scan, unroll=unroll)
                return ids, cache

            step = jax.jit(run, donate_argnums=(3,), compiler_options=copts)
            scan = jax.jit(run_scan, donate_argnums=(3,), compiler_options=copts) if args.e2e_scan > 0 else None
            state = {}
            for batch in batches:
                cache = e2e_cache(model, batch, args.e2e_slots, args.e2e_context)
                ids = jnp.ones((batch, 1), jnp.int32)
                mask = jnp.ones((batch, 1), bool)
                with e2e_norm(nvar), e2e_attention(avar):
                    logits, cache = step(leaves, ids, mask, cache)  # compile (under this model's patch)
                    jax.block_until_ready(logits)
                    if scan is not None:
                        _, cache = scan(leaves, ids, mask, cache)
                        jax.block_until_ready(cache)
                state[batch] = [ids, mask, cache]
            built.append((name, (step, scan), leaves, state, dict(device_bytes_all_state=total_bytes,
                                                                  kernel_arrays=kernels, kernel_bytes=wbytes,
                                                                  attention=avar, norm=nvar, model=label, cmdbuf=cbuf,
                                                                  context=args.e2e_context)))
        if args.e2e_generate:  # models.generate.generate() flattens the module itself
            gen_models[label] = model
        del model
    mg.pack_mgpu, mg.default_config = real_pack, real_default
    times = {(label, b): [] for label, *_ in built for b in batches}
    issue = {key: [] for key in times}
    scan_times = {key: [] for key in times}
    finite = {}
    rounds = max(1, args.e2e_rounds)
    for r in range(rounds):
        for label, (step, scan), leaves, state, _ in built[r % len(built):] + built[: r % len(built)]:
            for batch in batches:
                ids, mask, cache = state[batch]
                cache = e2e_rewind(cache, args.e2e_context)
                n = args.e2e_steps
                jax.block_until_ready(cache)
                t0 = time.perf_counter()
                for _ in range(n):
                    logits, cache = step(leaves, ids, mask, cache)
                t1 = time.perf_counter()  # the host has issued every step (it waits when it runs ahead)
                jax.block_until_ready(logits)
                times[(label, batch)].append((time.perf_counter() - t0) / n)
                issue[(label, batch)].append((t1 - t0) / n)
                finite[(label, batch)] = bool(jnp.all(jnp.isfinite(logits)))
                if scan is not None:
                    cache = jax.block_until_ready(e2e_rewind(cache, args.e2e_context))
                    t0 = time.perf_counter()
                    _, cache = scan(leaves, ids, mask, cache)
                    jax.block_until_ready(cache)
                    scan_times[(label, batch)].append((time.perf_counter() - t0) / args.e2e_scan)
                state[batch][2] = cache
    rows = []
    for label, (step, scan), leaves, state, fields in built:
        for batch in batches:
            ts = times[(label, batch)]
            dt = statistics.median(ts)
            row = dict(e2e=label, batch=batch, layers=layers, ms_per_step=dt * 1e3, tokens_per_s=batch / dt,
                       ms_rounds=[t * 1e3 for t in ts], ms_issue_rounds=[t * 1e3 for t in issue[(label, batch)]],
                       finite=finite[(label, batch)], **fields)
            if scan is not None:
                row.update(scan_steps=args.e2e_scan, ms_per_step_scan=statistics.median(scan_times[(label, batch)]) * 1e3,
                           ms_rounds_scan=[t * 1e3 for t in scan_times[(label, batch)]])
            if args.e2e_trace and batch == args.e2e_trace_batch:  # where a decode step's GPU time goes
                ids, mask, cache = state[batch]
                cache = e2e_rewind(cache, args.e2e_context)
                state[batch][2], row["gpu_time"] = trace_steps(lambda c: step(leaves, ids, mask, c), cache,
                                                           E2E_TRACE_STEPS, os.path.join(args.out, f"trace_{len(rows)}"))
                if scan is not None:  # the same inside one scan call (its fields are per call of scan_steps)
                    ids, mask, cache = state[batch]
                    cache = e2e_rewind(cache, args.e2e_context)
                    state[batch][2], tr = trace_steps(lambda c: scan(leaves, ids, mask, c), cache, E2E_TRACE_SCANS,
                                                      os.path.join(args.out, f"trace_scan_{len(rows)}"))
                    row["gpu_time_scan_call"] = tr
                    if "gpu_busy_us_per_step" in tr:
                        row["scan_busy_us_per_step"] = tr["gpu_busy_us_per_step"] / args.e2e_scan
                        row["scan_idle_us_per_step"] = tr["gpu_idle_us_per_step"] / args.e2e_scan
            rows.append(row)
            print(json.dumps(row), flush=True)
    del built
    if args.e2e_generate:  # the user path: jgptq.models.generate.generate, batch 1, greedy
        from jgptq.models.generate import generate

        gen_mod = sys.modules["jgptq.models.generate"]

        n_new = args.e2e_generate
        for row in (r for r in rows if r["batch"] == 1 and r["model"] in gen_models and r["cmdbuf"] == "on"):
            model = gen_models[row["model"]]
            gen_mod._COMPILED.clear()  # its cache key has norm="pallas", not the pallas-pN patch
            for chunk in (1, 16):
                rates = []
                with e2e_norm(row["norm"]) as nrm, e2e_attention(row["attention"]) as att:
                    kw = dict(eos_token_id=[], decode_chunk=chunk, attention=att, norm=nrm)
                    generate(model, None, [[1] * 8], n_new, **kw)  # compile
                    for _ in range(2):
                        stamps = []
                        generate(model, None, [[1] * 8], n_new, stream=lambda _s: stamps.append(time.perf_counter()),
                                 **kw)
                        rates.append((n_new - 1) / (time.perf_counter() - stamps[0]))
                row[f"generate_tok_s_chunk{chunk}"] = max(rates)
        gen_models.clear()
    q_w = layers * sum(k * n for k, n in shapes.values())
    for r in rows:
        if r["e2e"] != "bf16" and r["kernel_bytes"]:
            r["bits_per_quantized_weight"] = 8 * r["kernel_bytes"] / q_w
    print("\ne2e decode (Llama-2-7B shapes, random weights):")
    for r in rows:
        base = e2e_base(rows, r)
        spread = f"{min(r['ms_rounds']):.2f}-{max(r['ms_rounds']):.2f}"
        print(f"  {r['e2e']:>18} batch {r['batch']:3d}: {r['ms_per_step']:8.2f} ms/step ({spread} over "
              f"{len(r['ms_rounds'])} rounds; host issues one in {statistics.median(r['ms_issue_rounds']):.2f}) "
              f"{r['tokens_per_s']:9.1f} tok/s "
              f"({base['ms_per_step'] / r['ms_per_step']:.2f}x vs bf16), state {r['device_bytes_all_state'] / 2**30:.2f} GiB"
              + (f", kernel weights {r.get('bits_per_quantized_weight', 0):.2f} bits/weight" if r["kernel_bytes"] else ""))
    if any("generate_tok_s_chunk1" in r for r in rows):
        print(f"\ngenerate() batch 1, {args.e2e_generate} new tokens, decode tok/s after the first token:")
        for r in rows:
            if "generate_tok_s_chunk1" in r:
                base = e2e_base(rows, r)
                print(f"  {r['e2e']:>18}: decode_chunk=1 {r['generate_tok_s_chunk1']:7.1f} "
                      f"({r['generate_tok_s_chunk1'] / base['generate_tok_s_chunk1']:.2f}x vs bf16), "
                      f"decode_chunk=16 {r['generate_tok_s_chunk16']:7.1f} "
                      f"({r['generate_tok_s_chunk16'] / base['generate_tok_s_chunk16']:.2f}x vs bf16)")
    if any("ms_per_step_scan" in r for r in rows):
        print(f"\nthe same, {rows[0]['scan_steps']} decode steps per jitted lax.scan (one host call):")
        for r in rows:
            base = e2e_base(rows, r)
            print(f"  {r['e2e']:>18} batch {r['batch']:3d}: {r['ms_per_step_scan']:8.2f} ms/step "
                  f"({min(r['ms_rounds_scan']):.2f}-{max(r['ms_rounds_scan']):.2f}) "
                  f"{r['batch'] / r['ms_per_step_scan'] * 1e3:9.1f} tok/s "
                  f"({base['ms_per_step_scan'] / r['ms_per_step_scan']:.2f}x vs bf16)"
                  + (f"; GPU busy {r['scan_busy_us_per_step']:.0f} us, idle {r['scan_idle_us_per_step']:.0f} us per step"
                     if "scan_busy_us_per_step" in r else ""))
    return rows


def trace_steps(step, cache, n: int, tdir: str):
    """Profile ``n`` decode steps; return (cache, summary): GPU busy time per step and the ops
    that take it (from the profiler's Perfetto trace: complete events on GPU device tracks)."""
    import glob
    import gzip

    logits, cache = step(cache)
    jax.block_until_ready(logits)
    with jax.profiler.trace(tdir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(n):
            logits, cache = step(cache)
        jax.block_until_ready(logits)
        wall = (time.perf_counter() - t0) / n
    files = glob.glob(os.path.join(tdir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not files:
        return cache, {"error": "no perfetto trace written"}
    with gzip.open(files[0]) as f:
        tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = process_names(events)
    gpu = gpu_pids(pname)
    spans = gpu_spans(events)
    tl = gpu_timeline(spans, n)
    summary = dict(wall_us_per_step=wall * 1e6, gpu_tracks=sorted(pname[p] for p in gpu)[:6],
                   all_tracks=sorted(pname.values())[:12], **tl)
    host = {}
    for e in events:  # host-side work per step (XLA runtime / launch events on the CPU tracks)
        if (e.get("ph") == "X" and "dur" in e and e.get("pid") not in gpu
                and not any(f in e["name"] for f in ("profiler.py", "contextlib.py"))):  # the tracer's own
            host[e["name"]] = host.get(e["name"], 0.0) + e["dur"]
    summary["host_top_us_per_step"] = [(nm[:90], round(t / n, 1)) for nm, t in
                                       sorted(host.items(), key=lambda kv: -kv[1])[:25]]
    for match in ("mosaic", "gemm"):  # per layer: 4 Mosaic kernels (quantized) / 4 GEMMs (bf16, fused)
        if any(match in nm for _, _, nm in spans):
            summary[f"layer_{match}"] = layer_cycle(spans, match, 4)
            break  # a quantized model's only GEMM is lm_head: no per-layer cycle of GEMMs
    print(json.dumps(summary), flush=True)
    return cache, summary


def process_names(events: list[dict]) -> dict:
    """``{pid: track name}`` of a perfetto trace's process metadata events."""
    return {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}


def gpu_pids(pname: dict) -> set:
    """The pids of a trace's GPU tracks (the host tracks carry op / thunk events of the same names)."""
    return {pid for pid, nm in pname.items() if "GPU" in nm or "gpu" in nm or "/device:" in nm}


def gpu_spans(events: list[dict]) -> list[tuple[float, float, str]]:
    """``(start_us, end_us, name)`` of every complete event on a GPU track of a perfetto trace."""
    gpu = gpu_pids(process_names(events))
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
            if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]


def gpu_timeline(spans: list[tuple[float, float, str]], n: int) -> dict:
    """Summarize GPU kernel spans ``(start_us, end_us, name)`` of ``n`` profiled steps, per step:
    busy time (the union of the spans), idle time between the first start and the last end, the
    ops taking the most time, and the ops that the idle gaps come right before (a kernel that
    waits on its launch, or follows a host round trip, collects the gap in front of it)."""
    spans = sorted(spans)
    ops: dict[str, float] = {}
    idle_before: dict[str, float] = {}
    busy, idle, gaps5, end = 0.0, 0.0, 0, None
    for a, b, name in spans:
        ops[name] = ops.get(name, 0.0) + (b - a)
        if end is not None and a > end:
            idle += a - end
            gaps5 += a - end > 5
            idle_before[name] = idle_before.get(name, 0.0) + (a - end)
        if end is None or b > end:
            busy += b - (a if end is None else max(a, end))
            end = b
    top = lambda d, k: [(name[:90], t / n) for name, t in sorted(d.items(), key=lambda kv: -kv[1])[:k]]  # noqa: E731
    return dict(gpu_busy_us_per_step=busy / n, gpu_idle_us_per_step=idle / n, gpu_events=len(spans) // n,
                gaps_over_5us_per_step=gaps5 / n, top_ops_us_per_step=top(ops, 15),
                idle_before_ops_us_per_step=top(idle_before, 10))


def layer_cycle(spans: list[tuple[float, float, str]], match: str, period: int) -> dict:
    """Per-layer view of a profiled decode: the kernels whose name holds ``match`` come ``period``
    per layer (the Mosaic kernels: fused q/k/v, o, fused gate/up, down). Returns the median duration
    (us) of each position in that cycle over all layers and steps, the number of matches, and
    every GPU op of the second layer in order, ``(name, us)`` (from its first match to the next
    layer's; the ops between the matmuls: norms, rope, attention, split-K sums)."""
    spans = sorted(spans)
    hits = [i for i, (_, _, nm) in enumerate(spans) if match in nm]
    if len(hits) < 2 * period + 1:
        return dict(matches=len(hits))
    pos = [statistics.median(spans[i][1] - spans[i][0] for i in hits[j::period]) for j in range(period)]
    one = spans[hits[period]:hits[2 * period]]
    return dict(matches=len(hits), us_by_position=[round(t, 2) for t in pos],
                layer_ops=[(nm[:48], round(b - a, 2)) for a, b, nm in one])


def nnx_flat_arrays(model) -> list[tuple[str, jax.Array]]:
    """(path, array) for every array leaf of an NNX module's state."""
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return [(jax.tree_util.keystr(p), x) for p, x in flat if hasattr(x, "nbytes")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x28672,4096x4096,4096x14336,14336x4096")
    ap.add_argument("--ms", default="1,16,64,256,1024,4096")
    ap.add_argument("--sweep", action="store_true", help="try several tile configs per point")
    ap.add_argument("--sweep-shapes", default="", help="only sweep these shapes (KxN,...); default all")
    ap.add_argument("--max-cfgs", type=int, default=12)
    ap.add_argument("--slabs", default="auto", help="comma list of slab sizes (auto = repack.choose_slab)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-xla-dequant", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--mgpu", action="store_true", help="also benchmark the Mosaic GPU kernel")
    ap.add_argument("--mgpu-parts", action="store_true", help="also time the mgpu Pallas call alone")
    ap.add_argument("--max-mgpu-cfgs", type=int, default=8, help="per point, first shape")
    ap.add_argument("--max-mgpu-cfgs-rest", type=int, default=8, help="per point, other shapes")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton-lowered kernel")
    ap.add_argument("--mgpu-filter", default="", help="comma list: only mgpu configs whose name holds all")
    ap.add_argument("--mgpu-variants", default="",
                    help="';'-separated sets of MgpuConfig FIELD=VALUE (',' within a set): time the default config "
                         "and each set applied to it, in place of the candidate list (e.g. 'num_stages=3;block_n=64')")
    ap.add_argument("--mgpu-exclude", default="", help="comma list: drop mgpu configs whose name holds any")
    ap.add_argument("--no-default-again", action="store_true",
                    help="do not time the default mgpu config a second time after the others (row '<name>#again', "
                         "the table's def_again column)")
    ap.add_argument("--no-baselines", action="store_true", help="skip XLA bf16 (and torch) rows")
    ap.add_argument("--triton-default-only", action="store_true",
                    help="time only the Triton kernel's default config (no dispatch row)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="skip the remaining points / mgpu configs after this many seconds (0: no limit)")
    ap.add_argument("--e2e", action="store_true", help="only the end-to-end 7B-shape decode benchmark")
    ap.add_argument("--e2e-layers", type=int, default=32)
    ap.add_argument("--e2e-slots", type=int, default=256)
    ap.add_argument("--e2e-steps", type=int, default=20, help="decode steps per timed round")
    ap.add_argument("--e2e-scan", type=int, default=0,
                    help="also time N greedy decode steps per jitted lax.scan call (host cost paid once per N)")
    ap.add_argument("--e2e-generate", type=int, default=0,
                    help="also time models.generate.generate() at batch 1 for N new tokens, decode_chunk 1 and 16")
    ap.add_argument("--e2e-rounds", type=int, default=3,
                    help="interleaved timing rounds over all models (median reported)")
    ap.add_argument("--e2e-kernels", default="auto",
                    help="comma list of GPU kernels (auto, mgpu, triton) to build the quantized model with")
    ap.add_argument("--e2e-trace", action="store_true",
                    help="also profile 5 batch-1 decode steps per model: GPU busy / idle time, the top ops "
                         "and the ops the idle gaps precede")
    ap.add_argument("--e2e-trace-batch", type=int, default=1,
                    help="the batch size --e2e-trace profiles (one of --e2e-batches)")
    ap.add_argument("--e2e-variants", action="store_true",
                    help="also time the quantized model on the Mosaic kernel with the \"nk\" weight layout, "
                         "as session 4 ran it (\"nk\", K not split-padded, x padded in XLA, [split, Np, Mp] "
                         "partials), and the default without pack_mgpu's split_pad")
    ap.add_argument("--e2e-configs", default="",
                    help="comma list: also time the quantized model with these Mosaic-kernel variants "
                         f"({', '.join(E2E_CONFIGS)}) or decode-grid specs g-<knob><N>...[@KxN+...] (e2e_config)")
    ap.add_argument("--decode-attn", action="store_true",
                    help="only the decode-attention benchmark: pallas_kernels.decode_attention vs the models' "
                         "XLA attention (one new token per row over a KV cache)")
    ap.add_argument("--decode-attn-update", action="store_true",
                    help="only the fused decode step's kernel (decode_attention_update) over a config sweep, "
                         "on --decode-attn-shapes")
    ap.add_argument("--decode-attn-parts", type=int, default=8,
                    help="--decode-attn-update: fp32 split-K addends of q/k/v (the 7B step at batch 1 has 8; 0: bf16)")
    ap.add_argument("--decode-attn-max-cfgs", type=int, default=40,
                    help="--decode-attn-update: configs per point at most (the default first)")
    ap.add_argument("--decode-attn-shapes", default="1x32x32x128x256,16x32x32x128x256,1x32x32x128x4096,"
                    "16x32x8x128x4096,1x32x8x128x32768",
                    help="comma list of BxHxKVxhdxS")
    ap.add_argument("--e2e-attention", default="auto",
                    help="comma list of decode-attention implementations (auto, xla, pallas, fused; "
                         "jgptq.models.llama.DECODE_ATTENTION), each timed on every model; suffixes -bsN / -spN / "
                         "-wN / -stN set the kernel's slots per step / splits / warps / stages (e2e_attention)")
    ap.add_argument("--e2e-norm", default="auto",
                    help="comma list of decode residual-add + RMSNorm implementations (auto, xla, pallas, "
                         "pallas-pN: the kernel adding at most N split-K addends itself, pallas-wN: with N warps, "
                         "auto-glu / auto-xact: silu(gate) * up inside down_proj's kernel / as its own XLA op, auto-gsN: "
                         "inside it with N pipeline stages; auto-pf / auto-pfN: each decode matmul prefetching the "
                         "next one's first weights (at most N MiB) into L2; "
                         "jgptq.models.llama.DECODE_NORM), each timed with every attention variant")
    ap.add_argument("--e2e-cmdbuf-off", action="store_true",
                    help="also time every variant compiled without XLA command buffers (CUDA graphs)")
    ap.add_argument("--e2e-unroll", type=int, action="append", default=[],
                    help="also time every variant with its decode scan unrolled N steps (repeatable)")
    ap.add_argument("--e2e-xla-option", action="append", default=[],
                    help="KEY=VALUE: also time every variant compiled with that XLA debug option (repeatable)")
    ap.add_argument("--e2e-batches", default="1,16",
                    help="comma list of batch sizes (every model keeps a KV cache per batch size and "
                         "attention variant on the device: 16 GB per batch-16 cache at 4096 slots)")
    ap.add_argument("--e2e-context", type=int, default=128,
                    help="cache slots already filled when decoding starts (tokens of context); every timed stretch "
                         "of steps starts there again")
    ap.add_argument("--e2e-quant-lm-head", action="store_true",
                    help="--e2e: also a GPTQ model whose lm_head is a 4-bit g128 GPTQ linear as well (as GPTQModel "
                         "writes with lm_head=True); the default GPTQ models keep lm_head in bf16")
    ap.add_argument("--e2e-nofuse", action="store_true",
                    help="also time the quantized model with q/k/v and gate/up as separate kernels")
    args = ap.parse_args()
    print(f"jax {jax.__version__} devices {jax.devices()}", flush=True)
    if args.decode_attn_update:
        if args.budget_s:
            globals()["DEADLINE"] = time.monotonic() + args.budget_s
        rows = bench_decode_update(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_decode_update.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return
    if args.decode_attn:
        rows = bench_decode_attention(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_decode_attention.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return
    if args.e2e:
        rows = bench_e2e(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_e2e.json"), "w") as f:
            json.dump(rows, f, indent=1)
        return
    global BASELINES, MGPU, MAX_MGPU_CFGS, TRITON_SWEEP_OFF, DEADLINE, MGPU_PARTS, NO_TRITON, DEFAULT_AGAIN
    MGPU_PARTS, NO_TRITON = args.mgpu_parts, args.no_triton
    DEFAULT_AGAIN = not args.no_default_again
    MGPU_FILTER[:] = [f for f in args.mgpu_filter.split(",") if f]
    MGPU_EXCLUDE[:] = [f for f in args.mgpu_exclude.split(",") if f]
    MGPU_VARIANTS[:] = parse_variants(args.mgpu_variants)
    global NO_BF16
    NO_BF16 = args.no_baselines
    if args.budget_s > 0:
        DEADLINE = time.monotonic() + args.budget_s
    BASELINES = not args.no_xla_dequant
    MGPU, MAX_MGPU_CFGS, TRITON_SWEEP_OFF = args.mgpu, args.max_mgpu_cfgs, args.triton_default_only
    slabs = [None if s == "auto" else int(s) for s in args.slabs.split(",")]
    torch_ok = not args.no_torch
    if torch_ok:
        try:
            import torch

            torch_ok = torch.cuda.is_available()
            if torch_ok:
                print(f"torch {torch.__version__} {torch.cuda.get_device_name()}", flush=True)
        except Exception:
            torch_ok = False
    rows: list[dict] = []
    for shp in args.shapes.split(","):
        k, n = map(int, shp.split("x"))
        sw = args.sweep and (not args.sweep_shapes or shp in args.sweep_shapes.split(","))
        MAX_MGPU_CFGS = args.max_mgpu_cfgs if shp == args.shapes.split(",")[0] else args.max_mgpu_cfgs_rest
        bench_shape(k, n, [int(m) for m in args.ms.split(",")], sweep=sw, slabs=slabs if sw else [None],
                    torch_ok=torch_ok, rows=rows, max_cfgs=args.max_cfgs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump(rows, f, indent=1)
    summarize(rows)


def summarize(rows: list[dict]) -> None:
    """Print, per (K, N, M): bf16 baseline, best Pallas config, dispatch, XLA dequant, torch."""
    keys = sorted({(r["K"], r["N"], r["M"]) for r in rows})
    print(f"\n{'K':>6} {'N':>6} {'M':>5} | {'xla_bf16':>9} {'xla_deq':>9} {'torch_bf16':>10} {'tinygemm':>9} | "
          f"{'best_pallas':>11} {'GB/s':>6} {'vs_bf16':>7} {'dispatch':>9} | best config")
    mg_rows = []
    for key in keys:
        rs = [r for r in rows if (r["K"], r["N"], r["M"]) == key and "us" in r]
        get = lambda name: next((r["us"] for r in rs if r["variant"] == name), float("nan"))  # noqa: E731
        pal = [r for r in rs if r["variant"].startswith("pallas")]
        mgr = [r for r in rs if r["variant"].startswith("mgpu[")]  # kernel rows (not mgpu_layout_xla_dequant)
        if mgr:
            bm_ = min(mgr, key=lambda r: r["us"])
            tri = min((r["us"] for r in pal), default=float("nan"))
            mg_rows.append((key, get("xla_bf16"), tri, bm_, default_times(rs),
                            max(r.get("err") or 0.0 for r in mgr)))
        best = min(pal, key=lambda r: r["us"]) if pal else None
        disp = min((r["us"] for r in rs if r["variant"].startswith("dispatch")), default=float("nan"))
        bf = get("xla_bf16")
        print(f"{key[0]:6d} {key[1]:6d} {key[2]:5d} | {bf:9.1f} {get('xla_dequant'):9.1f} {get('torch_bf16'):10.1f} "
              f"{get('torch_tinygemm'):9.1f} | {best['us'] if best else float('nan'):11.1f} "
              f"{best['GBps'] if best else float('nan'):6.0f} {bf / best['us'] if best else float('nan'):7.2f} "
              f"{disp:9.1f} | {best['variant'] if best else '-'}")
    if mg_rows:
        print(f"\nMosaic GPU kernel (us; 'mgpu_def' = default_config timed first, 'def_again' = timed again "
              f"after the other configs; err = worst rel. error of any mgpu config)")
        print(f"{'K':>6} {'N':>6} {'M':>5} | {'xla_bf16':>9} {'triton':>9} {'mgpu_def':>9} {'def_again':>9} "
              f"{'mgpu_best':>9} {'GB/s':>6} {'vs_bf16':>7} {'vs_triton':>9} {'err':>8} | best mgpu config")
        for key, bf, tri, b, (dflt, again), err in mg_rows:
            print(f"{key[0]:6d} {key[1]:6d} {key[2]:5d} | {bf:9.1f} {tri:9.1f} {dflt:9.1f} {again:9.1f} "
                  f"{b['us']:9.1f} {b['GBps']:6.0f} {bf / b['us']:7.2f} {tri / b['us']:9.2f} {err:8.1e} | "
                  f"{b['variant']}")
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"\n{len(failed)} config(s) failed: " + ", ".join(f"{r['K']}x{r['N']} M={r['M']} {r['variant']}"
                                                         for r in failed[:12]))


if __name__ == "__main__":
    main()
