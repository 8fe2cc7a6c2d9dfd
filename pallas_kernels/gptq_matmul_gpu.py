"""GPU kernel: ``y = x @ dequant(W)`` for GPTQ 2/4/8-bit weights, Pallas (Triton lowering).

Weights are in the block-planar ``"nk"`` layout of :mod:`repack` (words ``[Np, Kp*bits/32]``,
K contiguous, scales / zeros ``[Np, Gp]``). Two variants share one grid
``(M blocks, N blocks, split-K)``:

* ``"dot"``: computes ``yᵀ = Wᵀ xᵀ`` tile by tile (weights are the left operand, tokens the
  right, so M = 1..16 costs one 16-wide tile). Codes become the dot operand through exponent
  "magic" (``0x4300 | q`` is the bf16 ``128 + q``; ``0x6400 | q`` the fp16 ``1024 + q``), no
  int->float conversion. The group's scale and zero are applied to the fp32 dot result:
  ``acc += (Σ_k x_k (q_k + o) - (z + o) Σ_k x_k) * s`` over each run of channels of one group,
  with the run sums ``Σ_k x_k`` precomputed by XLA (``x_sums="xla"``, default: fastest on the
  large H100 shapes) or reduced from the x tiles in-kernel (``x_sums="kernel"``: one launch fewer,
  but a cross-warp reduction per slab).
* ``"gemv"`` (M == 1): the same algebra with fp32 FMAs on CUDA cores (``0x43800000 | q<<15`` is
  the fp32 ``256 + q``), no tensor-core tile padding.

Both accumulate in fp32; split-K partial sums are added in XLA. The file also holds the plain-jnp
:func:`reference` and a benchmark :func:`main`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .repack import PackedGPTQ, dequantize_packed, pack_gptq_linear

__all__ = ["GPUConfig", "default_config", "gptq_matmul_gpu", "reference", "main"]

_VARIANTS = ("dot", "gemv")


@dataclasses.dataclass(frozen=True)
class GPUConfig:
    """Tile configuration of :func:`gptq_matmul_gpu`.

    Attributes:
      variant: ``"dot"`` (tensor cores, any M) or ``"gemv"`` (CUDA-core FMAs, M == 1 only).
      block_m: tokens per program (power of two ≥ 16 for ``"dot"``; 1 for ``"gemv"``).
      block_n: output features per program (power of two, divides ``Np``).
      split_k: number of K partitions (divides the number of K blocks); partials summed in XLA.
      num_warps, num_stages: Triton launch parameters.
      dequant: ``"magic"`` (exponent-bit tricks, no int->float instructions) or ``"convert"``
        (plain conversions; a fallback should a lowering reject the bit casts).
      x_sums: where the per-run activation sums come from: ``"xla"`` (a small fused XLA
        reduction before the kernel) or ``"kernel"`` (reduced in-kernel).
    """

    variant: str = "dot"
    block_m: int = 16
    block_n: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    dequant: str = "magic"
    x_sums: str = "xla"


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # pragma: no cover - no devices
        return 132


def default_config(m: int, packed: PackedGPTQ) -> GPUConfig:
    """Heuristic tile choice for ``m`` tokens (tuned on an H100; see benchmarks/RESULTS.md)."""
    nb = packed.k_pad // ((32 // packed.bits) * packed.slab)
    if m <= 16:
        bm, bn, warps = 16, 64, 4
    elif m <= 32:
        bm, bn, warps = 32, 128, 4
    elif m <= 64:
        bm, bn, warps = 64, 64, 4
    else:
        bm, bn, warps = 128, 128, 8
    while packed.n_pad % bn:
        bn //= 2
    programs = -(-m // bm) * (packed.n_pad // bn)
    target = 6 * _num_sms()  # H100, 8192x28672, M=1: ~900 programs beat 450 and 1800
    split = 1
    for d in range(1, min(nb, 16) + 1):
        if nb % d == 0:
            split = d
            if programs * d >= target:
                break
    if programs >= target:
        split = 1
    return GPUConfig(variant="dot", block_m=bm, block_n=bn, split_k=split, num_warps=warps, num_stages=3)


def _magic_operand(w: jax.Array, j: int, bits: int, dtype: Any, mode: str) -> tuple[jax.Array, float]:
    """Field ``j`` of int32 words ``w`` as ``dtype`` values ``q + offset``; returns (values, offset)."""
    mask = (1 << bits) - 1
    q = jax.lax.shift_right_logical(w, jnp.int32(bits * j)) & jnp.int32(mask) if j else w & jnp.int32(mask)
    if mode == "convert":
        return q.astype(jnp.float32).astype(dtype), 0.0
    if dtype == jnp.float16:
        return jax.lax.bitcast_convert_type((q | jnp.int32(0x6400)).astype(jnp.int16), jnp.float16), 1024.0
    if bits <= 7:  # bf16: 0x4300 is 128.0 with 7 mantissa bits free
        return jax.lax.bitcast_convert_type((q | jnp.int32(0x4300)).astype(jnp.int16), jnp.bfloat16), 128.0
    return q.astype(jnp.float32).astype(dtype), 0.0  # 8-bit into bf16: 0..255 is exact


def _magic_f32(w: jax.Array, j: int, bits: int, mode: str) -> jax.Array:
    """Field ``j`` of int32 words ``w`` as fp32 ``256 + q`` (bits placed at mantissa bit 15)."""
    if mode == "convert":
        q = jax.lax.shift_right_logical(w, jnp.int32(bits * j)) & jnp.int32((1 << bits) - 1)
        return q.astype(jnp.float32) + 256.0
    mask = ((1 << bits) - 1) << 15
    sh = bits * j - 15
    if sh > 0:
        v = jax.lax.shift_right_logical(w, jnp.int32(sh))
    elif sh < 0:
        v = jax.lax.shift_left(w, jnp.int32(-sh))
    else:
        v = w
    return jax.lax.bitcast_convert_type((v & jnp.int32(mask)) | jnp.int32(0x43800000), jnp.float32)


def _kernel(*refs, bits, slab, chunk, group_size, blocks_per_split, variant, block_m, block_n, dequant,
            x_sums):
    if x_sums == "xla":
        x_ref, xc_ref, w_ref, s_ref, z_ref, o_ref = refs
    else:
        (x_ref, w_ref, s_ref, z_ref, o_ref), xc_ref = refs, None
    p = 32 // bits
    blk = p * slab
    runs = blk // chunk  # runs of one group per block
    per_run = chunk // slab  # slabs per run
    lo = pl.program_id(2) * blocks_per_split
    cdt = x_ref.dtype

    if variant == "dot":
        def body(t, acc):
            b = lo + t
            w = w_ref[:, pl.ds(pl.multiple_of(b * slab, slab), slab)]  # [bn, S] int32
            for r in range(runs):
                d = None
                xs = None
                offset = 0.0
                for jj in range(per_run):
                    j = r * per_run + jj
                    k0 = pl.multiple_of(b * blk + j * slab, slab)
                    xj = x_ref[:, pl.ds(k0, slab)]  # [bm, S]
                    with jax.named_scope("dequant"):
                        qj, offset = _magic_operand(w, j, bits, cdt, dequant)
                    with jax.named_scope("mma"):
                        t_ = jax.lax.dot_general(qj, xj, (((1,), (1,)), ((), ())),
                                                 preferred_element_type=jnp.float32)  # [bn, bm]
                    d = t_ if d is None else d + t_
                    if xc_ref is None:
                        xsum = jnp.sum(xj.astype(jnp.float32), axis=1)[None, :]  # [1, bm]
                        xs = xsum if xs is None else xs + xsum
                if xc_ref is not None:
                    xs = xc_ref[pl.ds(b * runs + r, 1), :]  # [1, bm]
                g = (b * blk + r * chunk) // group_size
                s = s_ref[:, pl.ds(g, 1)].astype(jnp.float32)  # [bn, 1]
                z = z_ref[:, pl.ds(g, 1)].astype(jnp.float32) + offset
                acc = acc + (d - z * xs) * s
            return acc

        acc = jax.lax.fori_loop(0, blocks_per_split, body, jnp.zeros((block_n, block_m), jnp.float32))
        o_ref[...] = acc.T.astype(o_ref.dtype)
    else:
        def body(t, carry):
            acc2, accz = carry
            b = lo + t
            w = w_ref[:, pl.ds(pl.multiple_of(b * slab, slab), slab)]  # [bn, S] int32
            for r in range(runs):
                part = None
                xrun = None
                for jj in range(per_run):
                    j = r * per_run + jj
                    k0 = pl.multiple_of(b * blk + j * slab, slab)
                    xj = x_ref[:, pl.ds(k0, slab)].astype(jnp.float32)  # [1, S]
                    with jax.named_scope("dequant_fma"):
                        v = _magic_f32(w, j, bits, dequant) * xj
                    part = v if part is None else part + v
                    xrun = xj if xrun is None else xrun + xj
                g = (b * blk + r * chunk) // group_size
                s = s_ref[:, pl.ds(g, 1)].astype(jnp.float32)  # [bn, 1]
                z = z_ref[:, pl.ds(g, 1)].astype(jnp.float32) + 256.0
                if xc_ref is None:
                    xs = jnp.sum(xrun, axis=1, keepdims=True)  # [1, 1]
                else:
                    xs = xc_ref[pl.ds(b * runs + r, 1), :]  # [1, 1]
                acc2 = acc2 + part * s
                accz = accz + z * s * xs
            return acc2, accz

        init = (jnp.zeros((block_n, slab), jnp.float32), jnp.zeros((block_n, 1), jnp.float32))
        acc2, accz = jax.lax.fori_loop(0, blocks_per_split, body, init)
        y = jnp.sum(acc2, axis=1, keepdims=True) - accz  # [bn, 1]
        o_ref[...] = y.T.astype(o_ref.dtype)


def _validate(x: jax.Array, packed: PackedGPTQ, cfg: GPUConfig) -> None:
    if not isinstance(packed, PackedGPTQ) or packed.layout != "nk":
        raise ValueError(
            "gptq_matmul_gpu needs a PackedGPTQ in layout 'nk' (pack_gptq_linear(..., layout='nk')); "
            f"got {type(packed).__name__} layout {getattr(packed, 'layout', None)!r}."
        )
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x must be bfloat16 or float16 (cast first); got {x.dtype}.")
    if x.ndim < 1 or x.shape[-1] != packed.k:
        raise ValueError(f"x must be [..., K={packed.k}]; got shape {tuple(x.shape)}.")
    if cfg.x_sums not in ("xla", "kernel"):
        raise ValueError(f"config.x_sums must be 'xla' or 'kernel'; got {cfg.x_sums!r}.")
    if cfg.dequant not in ("magic", "convert"):
        raise ValueError(f"config.dequant must be 'magic' or 'convert'; got {cfg.dequant!r}.")
    if cfg.variant not in _VARIANTS:
        raise ValueError(f"config.variant must be one of {_VARIANTS}; got {cfg.variant!r}.")
    nb = packed.k_pad // ((32 // packed.bits) * packed.slab)
    bm, bn = cfg.block_m, cfg.block_n
    if bn <= 0 or bn & (bn - 1) or packed.n_pad % bn:
        raise ValueError(f"block_n={bn} must be a power of two dividing Np={packed.n_pad}.")
    if cfg.split_k <= 0 or nb % cfg.split_k:
        raise ValueError(f"split_k={cfg.split_k} must divide the number of K blocks {nb}.")
    if cfg.variant == "dot" and (bm < 16 or bm & (bm - 1)):
        raise ValueError(f"variant 'dot' needs block_m a power of two ≥ 16; got {bm}.")
    if cfg.variant == "gemv" and bm != 1:
        raise ValueError(f"variant 'gemv' needs block_m == 1; got {bm}.")


def gptq_matmul_gpu(
    x: jax.Array,
    packed: PackedGPTQ,
    *,
    config: GPUConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x[..., K] @ dequant(W)[K, N] -> [..., N]`` in ``x.dtype`` (fp32 accumulation).

    Args:
      x: bf16 / fp16 activations ``[..., K]`` in the layer's original channel order.
      packed: the layer from ``pack_gptq_linear(..., layout="nk")``.
      config: tiles; default :func:`default_config` for this M. ``"gemv"`` needs M == 1.
      interpret: run through the Pallas interpreter (CPU tests).
    """
    lead = x.shape[:-1]
    m = math.prod(lead)
    cfg = config or default_config(m, packed)
    _validate(x, packed, cfg)
    if cfg.variant == "gemv" and m != 1:
        raise ValueError(f"variant 'gemv' handles exactly one token; got M={m}. Use variant 'dot'.")
    y = _forward(x.reshape(m, packed.k), packed, cfg, interpret)
    return y.reshape(*lead, packed.n)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _forward(x2: jax.Array, packed: PackedGPTQ, cfg: GPUConfig, interpret: bool) -> jax.Array:
    m = x2.shape[0]
    bits, slab = packed.bits, packed.slab
    p = 32 // bits
    blk = p * slab
    chunk = min(packed.group_size, blk)
    nb = packed.k_pad // blk
    bm, bn = cfg.block_m, cfg.block_n
    mp = -(-m // bm) * bm
    if packed.perm is not None:
        x2 = jnp.take(x2, packed.perm, axis=1)
    if mp != m or packed.k_pad != packed.k:
        x2 = jnp.pad(x2, ((0, mp - m), (0, packed.k_pad - packed.k)))
    gp = packed.scales.shape[1]
    operands = [x2]
    in_specs = [pl.BlockSpec((bm, packed.k_pad), lambda i, j, s: (i, 0))]
    if cfg.x_sums == "xla":
        operands.append(x2.astype(jnp.float32).reshape(mp, packed.k_pad // chunk, chunk).sum(-1).T)  # [Kp/C, Mp]
        in_specs.append(pl.BlockSpec((packed.k_pad // chunk, bm), lambda i, j, s: (0, i)))
    operands += [packed.words, packed.scales, packed.zeros]
    in_specs += [
        pl.BlockSpec((bn, packed.k_pad // p), lambda i, j, s: (j, 0)),
        pl.BlockSpec((bn, gp), lambda i, j, s: (j, 0)),
        pl.BlockSpec((bn, gp), lambda i, j, s: (j, 0)),
    ]
    split = cfg.split_k
    grid = (mp // bm, packed.n_pad // bn, split)
    kernel = functools.partial(
        _kernel, bits=bits, slab=slab, chunk=chunk, group_size=packed.group_size,
        blocks_per_split=nb // split, variant=cfg.variant, block_m=bm, block_n=bn, dequant=cfg.dequant,
        x_sums=cfg.x_sums,
    )
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((mp, packed.n_pad), x2.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, mp, packed.n_pad), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params["compiler_params"] = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton lowering is deprecated upstream
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
            interpret=interpret, name=f"gptq{bits}_{cfg.variant}", **params,
        )(*operands)
    if split > 1:
        out = out.sum(0).astype(x2.dtype)
    return out[:m, : packed.n]


def reference(x: jax.Array, packed: PackedGPTQ) -> jax.Array:
    """Plain-jnp ``x @ dequant(W)``: permute x, unpack + dequantize in fp32, fp32 dot, cast."""
    k = packed.k
    x2 = x.reshape(-1, k)
    if packed.perm is not None:
        x2 = jnp.take(x2, packed.perm, axis=1)
    x2 = jnp.pad(x2, ((0, 0), (0, packed.k_pad - k))).astype(jnp.float32)
    w = dequantize_packed(packed, jnp.float32)
    y = jnp.dot(x2, w, precision=jax.lax.Precision.HIGHEST)[:, : packed.n]
    return y.astype(x.dtype).reshape(*x.shape[:-1], packed.n)


def random_gptq_linear(key: jax.Array, k: int, n: int, *, bits: int = 4, group_size: int = 128,
                       act_order: bool = False) -> dict[str, jax.Array]:
    """A random GPTQ LIN dict (DESIGN.md): codes, scales ~ U(0.5,1.5)/2^bits-ish, zeros, g_idx."""
    kq, ks, kz, kp = jax.random.split(key, 4)
    p = 32 // bits
    gs = k if group_size == -1 else group_size
    g = -(-k // gs)
    codes = jax.random.randint(kq, (k // p, p, n), 0, 1 << bits, dtype=jnp.uint32)
    shifts = (jnp.arange(p, dtype=jnp.uint32) * bits)[None, :, None]
    qweight = jax.lax.bitcast_convert_type(jnp.sum(codes << shifts, axis=1, dtype=jnp.uint32), jnp.int32)
    scales = (jax.random.uniform(ks, (g, n), jnp.float32, 0.5, 1.5) / (1 << bits)).astype(jnp.float16)
    zeros = jax.random.randint(kz, (g, n), 0, 1 << bits, dtype=jnp.int32).astype(jnp.uint8)
    if act_order:
        inv = jax.random.permutation(kp, k)
        g_idx = (inv // gs).astype(jnp.int32)
    else:
        g_idx = (jnp.arange(k) // gs).astype(jnp.int32)
    return {"qweight": qweight, "scales": scales, "zeros": zeros, "g_idx": g_idx}


def main() -> None:  # pragma: no cover - benchmark
    """Quick self-check and timing on the default device: ``python -m jgptq.pallas_kernels.gptq_matmul_gpu``."""
    import time

    interpret = jax.default_backend() != "gpu"
    k, n = (8192, 28672) if not interpret else (512, 256)
    lin = random_gptq_linear(jax.random.key(0), k, n)
    packed = pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=4, layout="nk")
    for m in (1, 16, 64, 256):
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        f = jax.jit(lambda x: gptq_matmul_gpu(x, packed, interpret=interpret))
        y = f(x).block_until_ready()
        ref = reference(x, packed)
        err = float(jnp.linalg.norm((y - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
        t0 = time.perf_counter()
        for _ in range(20):
            y = f(x)
        y.block_until_ready()
        dt = (time.perf_counter() - t0) / 20
        print(f"M={m:5d} K={k} N={n}: {dt * 1e6:9.1f} us  rel.err {err:.2e}")


if __name__ == "__main__":  # pragma: no cover
    main()
