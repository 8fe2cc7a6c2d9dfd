"""TPU kernel: ``y = x @ dequant(W)`` for GPTQ 2/4/8-bit weights, Pallas TPU (Mosaic).

Weights are in the block-planar ``"kn"`` layout of :mod:`repack` (words ``[Kp*bits/32, Np]``,
N on lanes; scales / zeros ``[Gp, Np]``). Grid ``(M blocks, N blocks, K blocks)``, K last and
sequential, an fp32 VMEM accumulator (the ``jax.experimental.pallas.ops.tpu.matmul`` pattern).
Per K block the kernel unpacks each field ``j`` of the ``[S, bn]`` word tile into ``S``
consecutive channels, dequantizes them with their group's row of scales / zeros in fp32, stacks
the ``P`` slabs back into ``[B, bn]`` (``B = P*S``, the block in channel order) and runs one MXU
dot against ``x[:, block]``.

TPU tiling: ``block_m`` a multiple of 16 (bf16), ``block_n`` of 128 and ``B`` of 128 on real
hardware; CI runs it with ``interpret=True`` (no TPU here). Also holds :func:`reference` and a
benchmark :func:`main`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .repack import PackedGPTQ, dequantize_packed, pack_gptq_linear

__all__ = ["TPUConfig", "gptq_matmul_tpu", "reference", "main"]


@dataclasses.dataclass(frozen=True)
class TPUConfig:
    """Tiles of :func:`gptq_matmul_tpu`: tokens and output features per program."""

    block_m: int = 128
    block_n: int = 256


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, acc_ref, *, bits, slab, group_size, num_k):
    p = 32 // bits
    blk = p * slab
    kb = pl.program_id(2)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = w_ref[...]  # [S, bn] int32
    mask = jnp.int32((1 << bits) - 1)
    slabs = []
    with jax.named_scope("dequant"):
        for j in range(p):
            q = (jax.lax.shift_right_logical(w, jnp.int32(bits * j)) & mask).astype(jnp.float32)
            g = (kb * blk + j * slab) // group_size
            s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
            z = z_ref[pl.ds(g, 1), :].astype(jnp.float32)
            slabs.append(((q - z) * s).astype(x_ref.dtype))
        wd = jnp.concatenate(slabs, axis=0)  # [B, bn], channel order of the block
    with jax.named_scope("mma"):
        acc_ref[...] += jnp.dot(x_ref[...], wd, preferred_element_type=jnp.float32)

    @pl.when(kb == num_k - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def gptq_matmul_tpu(
    x: jax.Array,
    packed: PackedGPTQ,
    *,
    config: TPUConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x[..., K] @ dequant(W)[K, N] -> [..., N]`` in ``x.dtype`` (fp32 accumulation) on TPU.

    Args:
      x: bf16 / fp16 / fp32 activations ``[..., K]``, original channel order.
      packed: the layer from ``pack_gptq_linear(..., layout="kn")``.
      config: tiles; ``block_m`` is clipped to the padded M, ``block_n`` must divide ``Np``.
      interpret: run through the Pallas interpreter (CPU tests).
    """
    if not isinstance(packed, PackedGPTQ) or packed.layout != "kn":
        raise ValueError(
            "gptq_matmul_tpu needs a PackedGPTQ in layout 'kn' (pack_gptq_linear(..., layout='kn')); "
            f"got {type(packed).__name__} layout {getattr(packed, 'layout', None)!r}."
        )
    if x.ndim < 1 or x.shape[-1] != packed.k:
        raise ValueError(f"x must be [..., K={packed.k}]; got shape {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array; got {x.dtype}.")
    cfg = config or TPUConfig()
    if config is None:
        bn = cfg.block_n
        while packed.n_pad % bn:
            bn //= 2
        cfg = TPUConfig(block_m=cfg.block_m, block_n=bn)
    if cfg.block_n <= 0 or packed.n_pad % cfg.block_n:
        raise ValueError(f"block_n={cfg.block_n} must divide Np={packed.n_pad} (a multiple of 128).")
    if cfg.block_m <= 0 or cfg.block_m % 8:
        raise ValueError(f"block_m={cfg.block_m} must be a positive multiple of 8.")
    lead = x.shape[:-1]
    m = math.prod(lead)
    bm = min(cfg.block_m, -(-m // 16) * 16)
    y = _forward(x.reshape(m, packed.k), packed, bm, cfg.block_n, interpret)
    return y.reshape(*lead, packed.n)


@functools.partial(jax.jit, static_argnames=("bm", "bn", "interpret"))
def _forward(x2: jax.Array, packed: PackedGPTQ, bm: int, bn: int, interpret: bool) -> jax.Array:
    m = x2.shape[0]
    p = 32 // packed.bits
    blk = p * packed.slab
    nk = packed.k_pad // blk
    mp = -(-m // bm) * bm
    if packed.perm is not None:
        x2 = jnp.take(x2, packed.perm, axis=1)
    x2 = jnp.pad(x2, ((0, mp - m), (0, packed.k_pad - packed.k)))
    gp = packed.scales.shape[0]
    kernel = functools.partial(
        _kernel, bits=packed.bits, slab=packed.slab, group_size=packed.group_size, num_k=nk
    )
    from jax.experimental.pallas import tpu as pltpu

    params = {}
    if not interpret:
        params["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, packed.n_pad), x2.dtype),
        grid=(mp // bm, packed.n_pad // bn, nk),
        in_specs=[
            pl.BlockSpec((bm, blk), lambda i, j, k: (i, k)),
            pl.BlockSpec((packed.slab, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((gp, bn), lambda i, j, k: (0, j)),
            pl.BlockSpec((gp, bn), lambda i, j, k: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        interpret=interpret,
        name=f"gptq{packed.bits}_tpu",
        **params,
    )(x2, packed.words, packed.scales, packed.zeros)
    return out[:m, : packed.n]


def reference(x: jax.Array, packed: PackedGPTQ) -> jax.Array:
    """Plain-jnp ``x @ dequant(W)``: permute x, unpack + dequantize in fp32, fp32 dot, cast."""
    x2 = x.reshape(-1, packed.k)
    if packed.perm is not None:
        x2 = jnp.take(x2, packed.perm, axis=1)
    x2 = jnp.pad(x2, ((0, 0), (0, packed.k_pad - packed.k))).astype(jnp.float32)
    y = jnp.dot(x2, dequantize_packed(packed, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y[:, : packed.n].astype(x.dtype).reshape(*x.shape[:-1], packed.n)


def main() -> None:  # pragma: no cover - benchmark
    """Self-check and timing: ``python -m jgptq.pallas_kernels.gptq_matmul_tpu`` (interpret off TPU)."""
    import time

    from .gptq_matmul_gpu import random_gptq_linear

    interpret = jax.default_backend() != "tpu"
    k, n = (8192, 28672) if not interpret else (512, 256)
    lin = random_gptq_linear(jax.random.key(0), k, n)
    packed = pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=4, layout="kn")
    for m in (1, 16, 256):
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        f = jax.jit(lambda x: gptq_matmul_tpu(x, packed, interpret=interpret))
        y = f(x).block_until_ready()
        ref = reference(x, packed).astype(jnp.float32)
        err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        t0 = time.perf_counter()
        for _ in range(10):
            y = f(x)
        y.block_until_ready()
        print(f"M={m:5d} K={k} N={n}: {(time.perf_counter() - t0) / 10 * 1e6:9.1f} us  rel.err {err:.2e}")


if __name__ == "__main__":  # pragma: no cover
    main()
