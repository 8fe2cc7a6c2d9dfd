"""Hopper kernel: ``y = x @ dequant(W)`` for GPTQ 4/8-bit weights, Pallas **Mosaic GPU** lowering.

Recipe A of ``shared/reference/jax.md`` §2.3 ("swap A/B"): the kernel computes
``yᵀ[N, M] = Wᵀ[N, K] · xᵀ[K, M]`` so that the quantized weights are the wgmma **A operand in
registers** (the only operand position that can be dequantized on the fly) and the tokens sit in
wgmma's N dimension (any multiple of 8 up to 256): one kernel for decode (M = 1..16 costs one
8- or 16-wide tile) and prefill.

Layout (:class:`MgpuPacked`, built once by :func:`pack_mgpu`):

* ``w`` (4-bit, ``layout="frag"``, the default): int32 words ``[Kp/128, Np/16, 256]`` of the
  *unsigned* codes, pre-permuted at pack time into the wgmma m64k16 register fragment
  (:func:`frag_pack`): each thread loads one 32-bit word per (16 rows x 16 K columns) holding
  exactly its 8 operand values, and turns each pair into a bf16x2 / f16x2 register with a shift,
  one ``lop3`` (the 4 bits become the low mantissa of 2^7 / 2^10) and one subtract of
  ``2^7 + z`` (the zero point folded into the exponent bias): no lane shuffles or permutes.
  Otherwise native ``jnp.int4`` / ``jnp.int8`` holding ``q - 2^(bits-1)`` (signed, for Mosaic's
  int -> bf16 upcast, which relays the ``WGMMA_UPCAST`` load layout through warp shuffles), as
  ``[Kp/128, Np, 128]`` (``layout="kblocks"``, the 8-bit default: a ``[rows, 128]`` tile is one
  contiguous run) or ``[Np, Kp]`` (``layout="nk"``). On the H200 at 8192 x 28672 ``"frag"`` took
  46 / 51 / 73 us at M = 1 / 16 / 64 against 55 / 66 / 93 us for ``"kblocks"``
  (benchmarks/RESULTS.md, session 9);
* ``sz``: ``[2, Gp, Np]`` in the activation dtype, ``sz[0]`` the scales and ``sz[1]`` the zeros
  shifted by ``2^(bits-1)`` (exact small integers), so ``W[k, n] = (w[n, k] - z[g, n]) * s[g, n]``
  (one array so that one TMA copy per pipeline step brings both rows; ``scales`` / ``zeros`` are
  views)
  with ``g = k // group_size``. The subtraction is exact in bf16/fp16, the product rounds once
  (the same rounding as dequantizing to the activation dtype first).
* act-order: K is permuted once so that groups are contiguous (:func:`repack.analyze_g_idx`);
  ``x[..., perm]`` is applied per call. K is zero-padded to ``Kp`` and N to a multiple of 128.

Schedules (``MgpuConfig.schedule``; :func:`default_config` picks by M):

* ``"grid"`` (decode, M <= 16): grid ``(Np/block_n, Mp/block_m, split_k)``, one warpgroup per
  CTA, described next; split-K partials (fp32) added in XLA, or (``split_reduce="tma"``) by the
  CTAs themselves with TMA reduce-adds into one fp32 buffer aliased through the custom call.
* ``"stream"`` (M <= 64, and larger M when there are fewer tiles than SMs): a persistent grid;
  the ``(M tile, N tile, K block)`` steps form one line cut into equal contiguous ranges, one per
  CTA (stream-K), each streamed through one uninterrupted TMA pipeline; a CTA writes an fp32
  partial sum for every tile it touches and XLA adds the (few) partials of a tile
  (:func:`stream_plan` says which slots exist).
* ``"tiles"`` (prefill): the same persistent pipeline cut at tile boundaries; each tile is
  written once, straight into ``y [M, N]`` through a transposed SMEM view (no XLA transpose).

The persistent schedules can be warp-specialised (``compute_wgs=2``): a memory warpgroup issues
the TMA copies (``plgpu.emit_pipeline_warp_specialized``) while two compute warpgroups each take
``block_n`` rows of a ``2 * block_n``-row weight tile.

Per-step math (grid ``(Np/block_n, Mp/block_m, split_k)``, one warpgroup per CTA): a TMA pipeline
(:func:`plgpu.emit_pipeline`, ``num_stages`` slots) brings a ``[block_n, block_k]`` int tile of
``w``, a ``[block_m, block_k]`` tile of ``x`` and the ``[groups, block_n]`` scale (and zero) rows
of that K block into SMEM; the body loads the weights into registers (int4/int8 -> bf16/fp16
upcast chosen by Mosaic's layout inference) and issues ``wgmma(acc[block_n, block_m], w_regs,
x_smemᵀ)`` in chunks of one swizzle width of K. Two ways to apply the group scales
(``MgpuConfig.scale_mode``):

* ``"acc"`` (default when ``block_k`` divides the group size): the wgmma runs on ``q - z``
  (subtracted in registers; an exact small integer in bf16/fp16) into a per-K-block accumulator
  whose fp32 value is scaled by the group's scale row and added to the running sum. Per K block
  this costs one op per weight plus ``block_n*block_m/128`` multiplies per thread, instead of two
  ops per weight, and the products are exact (no rounding of the dequantized weight).
* ``"weights"``: ``(q - z) * s`` per weight in registers before the wgmma (any group size).

``MgpuConfig.scale_impl`` picks how the scale rows reach the registers: ``"jnp"`` (a broadcast
that layout inference lowers) or ``"inline"`` (an :func:`plgpu.inline_mgpu` per-element FMA
reading SMEM; needed for g32 in ``"weights"`` mode). Split-K partial sums (fp32) are added in
XLA in ``[split, Np, Mp]`` order, then transposed; with ``transpose_out=True`` the grid kernel
stores them token-major, ``[split, M, Np]``, through a transposed SMEM view, so that the sum is
already ``y`` and M = 1 writes one token row instead of 8 padded ones.

With ``MgpuConfig.tma_bounds`` (the default) x is not padded in XLA on hardware: TMA zero-fills
the token rows past M, and the stores drop them. The default tiles for M < the token tile (decode)
store token-major split-K partials. Timed on an H200 (benchmarks/RESULTS.md, session 6): together
58.1 -> 52-53 us at M = 1, 8192 x 28672 (the pad gone, 1 partial row written instead of 8); in the
7B decode step they remove the pads and most of the split-K sum, though on ``"nk"`` weights the
step time moved within run-to-run spread (3.77 vs 3.88 ms). The ``"kblocks"`` weight layout (the
default) timed the same as ``"nk"`` at 8192 x 28672 but faster on the 4096-wide layers (M = 1: 8.6
vs 9.8 us at 4096 x 4096, 17.2 vs 21.4 at 4096 x 14336). In the 7B decode step both layouts take
the same GPU time (3.11-3.12 ms at batch 1); the wall time per step scattered from 3.52 to 3.93 ms
between runs on ``"kblocks"`` and 3.77-3.99 on ``"nk"``, a spread not yet explained.

The Mosaic GPU interpreter (CPU, jax 0.10.2) rejects transposed SMEM refs in wgmma and reads
both wgmma operands as SMEM allocations (no register A operand); with ``interpret=True`` the
same kernel (same grid, pipeline, block specs, TMA copies and SMEM tiles) runs its per-chunk
dequant and MMA as plain ``jnp`` ops on values read from SMEM. Only the leaf functions differ
(``_dequant_mma_interpret`` / ``_mma_acc_interpret`` vs. ``_dequant_mma_hw`` / ``_mma_acc_hw``).
The hardware path is checked on CPU by lowering for CUDA
(``tests/pallas_kernels/test_gptq_matmul_mgpu.py::test_lowers_for_cuda``), which runs the whole
Pallas -> Mosaic GPU lowering (layout inference, wgmma shape checks, Mosaic dialect lowering)
but not the LLVM/ptxas steps.

The file also holds the plain-jnp :func:`reference` and a benchmark :func:`main`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from .repack import analyze_g_idx, check_gptq_tensors, unpack_gptq_qweight

__all__ = [
    "accumulator_shape",
    "MgpuConfig", "MgpuPacked", "pack_mgpu", "default_config", "gptq_matmul_mgpu", "gptq_matmul_mgpu_parts",
    "gptq_matmul_mgpu_glu_parts", "glu_in_kernel", "glu_config", "glu_activation",
    "reference",
    "random_inputs", "main", "SUPPORTED_BITS", "JAX_VERSION",
]

SUPPORTED_BITS = (4, 8)
SCHEDULES = ("grid", "stream", "tiles")
SPLIT_REDUCES = ("xla", "tma")
STORE_WAITS = ("full", "read")
N_ALIGN = 128
K_ALIGN = 128
W_KBLOCK = 128  # K columns per contiguous block of the "kblocks" weight layout
LAYOUTS = ("kblocks", "nk", "frag")
SPLIT_PAD_BLOCKS = 8  # pack_mgpu(split_pad=True): K padded to a multiple of 8 x 128 ...
SPLIT_PAD_MAX_FRAC = 32  # ... when that adds at most K / 32 columns
JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


# ------------------------------------------------------------------------------------------ layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MgpuPacked:
    """A GPTQ linear in the Mosaic GPU kernel layout (pytree; arrays are leaves).

    Attributes:
      w: ``int4`` (bits 4) or ``int8`` (bits 8) ``code - 2^(bits-1)``, padded with 0, in
        ``layout``: ``"nk"`` ``[Np, Kp]`` (K contiguous per output row: a kernel's weight tile
        is ``rows`` runs of ``block_k * bits / 8`` bytes, ``Kp * bits / 8`` apart) or
        ``"kblocks"`` ``[Kp/128, Np, 128]`` (K cut into blocks of 128 columns, each block
        ``[Np, 128]`` with K contiguous: a ``[rows, 128]`` weight tile is one contiguous run), or
        (4-bit only) ``"frag"``: int32 words ``[Kp/128, Np/16, 256]`` of *unsigned* codes in the
        wgmma register-fragment order (:func:`frag_pack`; converted without lane shuffles).
      sz: ``[2, Gp, Np]`` in ``dtype``: ``sz[0]`` the scales (padded rows / columns are 0),
        ``sz[1]`` the zeros ``zero_point - 2^(bits-1)`` (exact integers).
      perm: int32 ``[K]`` act-order permutation applied to x, or None.
      bits, k, n, k_pad, n_pad, group_size: static sizes (``group_size`` after ``perm``; ``k_pad``
        for a single group).
    """

    w: jax.Array
    sz: jax.Array
    perm: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    k_pad: int = dataclasses.field(metadata=dict(static=True))
    n_pad: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    layout: str = dataclasses.field(default="kblocks", metadata=dict(static=True))

    def w_nk(self) -> jax.Array:
        """The codes as ``[Np, Kp]`` (either layout)."""
        if self.layout == "nk":
            return self.w
        if self.layout == "frag":
            return frag_unpack(self.w) - jnp.int8(8)
        return self.w.transpose(1, 0, 2).reshape(self.n_pad, self.k_pad)

    @property
    def dtype(self):
        return self.sz.dtype

    @property
    def scales(self) -> jax.Array:
        """``[Gp, Np]`` scales (a view of ``sz[0]``)."""
        return self.sz[0]

    @property
    def zeros(self) -> jax.Array:
        """``[Gp, Np]`` shifted zero points (a view of ``sz[1]``)."""
        return self.sz[1]

    @property
    def in_features(self) -> int:
        return self.k

    @property
    def out_features(self) -> int:
        return self.n


def default_layout(bits: int) -> str:
    """:func:`pack_mgpu`'s weight layout for ``bits``: ``"frag"`` for 4-bit, else ``"kblocks"``."""
    return "frag" if bits == 4 else "kblocks"


def pack_mgpu(
    qweight: Any, scales: Any, zeros: Any, g_idx: Any, *, bits: int, dtype: Any = jnp.bfloat16,
    layout: str | None = None, split_pad: bool = True,
) -> MgpuPacked | None:
    """Repack a GPTQ LIN (``qweight`` int32 ``[K*bits/32, N]``, ``scales``/``zeros`` ``[G, N]``,
    ``g_idx`` ``[K]``) into :class:`MgpuPacked`. Host side, once per layer.

    Args:
      bits: 4 or 8.
      dtype: activation dtype the kernel will see most (bfloat16 or float16); scales / zeros are
        stored in it (other activation dtypes are cast per call).
      layout: ``"frag"`` (the default for 4-bit: words in wgmma register-fragment order, see
        :class:`MgpuPacked`; 8192 x 28672 on the H200: 46 / 51 / 73 us at M = 1 / 16 / 64 against
        55 / 66 / 93 for ``"kblocks"``), ``"kblocks"`` (the default for 8-bit; contiguous weight
        tiles) or ``"nk"``.
      split_pad: (default True) pad K further, with zero codes and zero-scale groups, to a multiple
        of ``SPLIT_PAD_BLOCKS`` K blocks of 128 when that adds at most 1/``SPLIT_PAD_MAX_FRAC`` of K,
        so that the decode grid can split K 8 ways. Without it K = 11008 (Llama-2-7B's
        down_proj) has 86 = 2 x 43 blocks: split-K at most 2 with >= 4 steps per CTA, i.e. 64 CTAs
        on 132 SMs at M = 1 and N = 4096; padded to 88 blocks (+2.3 % bytes) it splits 11 ways.

    Returns:
      The packed layer, or None when no kernel layout fits: groups of unequal size (no
      contiguous permutation), or a group size that neither divides nor is a multiple of 128
      (and is not the whole K).

    Raises:
      ValueError: bad bits / dtype / shapes, or non-finite scales.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the Mosaic GPU kernel supports bits in {SUPPORTED_BITS}; got {bits}.")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be bfloat16 or float16; got {dtype}.")
    if layout is None:
        layout = default_layout(bits)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    qweight, scales, zeros, g_idx_np = check_gptq_tensors(qweight, scales, zeros, g_idx, bits)
    p = 32 // bits
    k, n = int(g_idx_np.shape[0]), int(qweight.shape[1])
    num_groups = int(scales.shape[0])
    groups = analyze_g_idx(g_idx_np, num_groups)
    if groups is None:
        return None
    gs = groups.group_size
    if num_groups > 1 and not (gs % K_ALIGN == 0 or (K_ALIGN % gs == 0 and gs >= 16)):
        return None
    align = K_ALIGN if num_groups == 1 else max(K_ALIGN, gs)
    k_pad = -(-k // align) * align
    if split_pad:
        k_pad = _split_pad(k, k_pad, align)
    if num_groups == 1:
        gs = k_pad
    n_pad = -(-n // N_ALIGN) * N_ALIGN
    g_pad = k_pad // gs
    codes = unpack_gptq_qweight(qweight, bits)  # [K, N] in [0, 2^bits)
    perm = None
    if groups.perm is not None:
        perm = jnp.asarray(groups.perm)
        codes = jnp.take(codes, perm, axis=0)
    half = 1 << (bits - 1)
    wdt = jnp.int4 if bits == 4 else jnp.int8
    if layout == "frag":
        if bits != 4:
            raise ValueError(f"layout='frag' packs 4-bit weights only; got bits={bits} (use 'kblocks').")
        w = frag_pack(jnp.pad(codes.astype(jnp.int8), ((0, k_pad - k), (0, n_pad - n))).T)
    else:
        w = jnp.pad((codes - half).astype(jnp.int8), ((0, k_pad - k), (0, n_pad - n))).T  # [Np, Kp]
    if layout == "kblocks":
        w = w.reshape(n_pad, k_pad // W_KBLOCK, W_KBLOCK).transpose(1, 0, 2)
    if layout != "frag":
        w = w.astype(wdt)
    pad = ((0, g_pad - num_groups), (0, n_pad - n))
    s = jnp.pad(scales.astype(jnp.float32), pad).astype(dtype)
    z = jnp.pad(zeros.astype(jnp.int32) - half, pad).astype(dtype)
    return MgpuPacked(w=w, sz=jnp.stack([s, z]), perm=perm, bits=bits, k=k, n=n, k_pad=k_pad,
                      n_pad=n_pad, group_size=gs, layout=layout)


def _split_pad(k: int, k_pad: int, align: int) -> int:
    """``k_pad`` (a multiple of ``align``) raised to a multiple of ``SPLIT_PAD_BLOCKS * K_ALIGN``
    (and of ``align``) when that pads at most ``k / SPLIT_PAD_MAX_FRAC`` columns in all."""
    step = math.lcm(align, SPLIT_PAD_BLOCKS * K_ALIGN)
    wide = -(-k // step) * step
    return wide if (wide - k) * SPLIT_PAD_MAX_FRAC <= k else k_pad


def pack_mgpu_linear(lin: Mapping[str, Any], *, bits: int, dtype: Any = jnp.bfloat16,
                     layout: str | None = None, split_pad: bool = True) -> MgpuPacked | None:
    """:func:`pack_mgpu` on a GPTQ LIN dict (``qweight``/``scales``/``zeros``/``g_idx``)."""
    return pack_mgpu(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=bits, dtype=dtype,
                     layout=layout, split_pad=split_pad)


def dequantize_mgpu(packed: MgpuPacked, dtype: Any = jnp.float32) -> jax.Array:
    """Dense ``[Kp, Np]`` weight in *permuted* K order: ``(w - zeros) * scales`` in fp32, cast."""
    g = jnp.arange(packed.k_pad) // packed.group_size
    q = packed.w_nk().astype(jnp.float32).T  # [Kp, Np]
    w = (q - packed.zeros.astype(jnp.float32)[g]) * packed.scales.astype(jnp.float32)[g]
    return w.astype(dtype)


# ------------------------------------------------------------------ "frag" weight layout (4-bit)
#
# Each thread's wgmma A-operand values, pre-permuted at pack time into one 32-bit word per
# (16-row group, 16-column K tile): lane l = 4 g + t of a warp holds rows g and g + 8, columns
# 2t, 2t + 1, 2t + 8, 2t + 9 of the tile (the m64k16 register fragment), as 4 pairs
# (row h, column half e) -> "slot" h + 2 e, its two values at nibbles slot and slot + 4. A warp
# then loads its 32 words of a tile in one conflict-free 128-byte access, and each pair becomes
# a bf16x2 / f16x2 register with a shift, one lop3 and one subtract (zero point folded into the
# exponent bias) -- no lane shuffles, no permutes. Words are ordered ``[Kp/128, Np/16, 256]``:
# per K block of 128 and 16-row group, ``chunk (2 x 64 columns), lane (32), tile in chunk (4)``.

FRAG_WORDS = 256  # int32 words per (16 rows x 128 K columns)
_FRAG_AXES = (2, 8, 2, 4, 2, 4, 2)  # h, g | c, i, e, t, v: row = 8h + g, col = 64c + 16i + 8e + 2t + v


def _frag_shifts() -> np.ndarray:
    """``[h, e, v]`` bit offsets of a value in its word: nibble ``h + 2e + 4v``."""
    h, e, v = np.meshgrid(np.arange(2), np.arange(2), np.arange(2), indexing="ij")
    return (4 * (h + 2 * e + 4 * v)).astype(np.uint32)


def frag_pack(codes_nk: jax.Array) -> jax.Array:
    """Unsigned 4-bit codes ``[Np, Kp]`` (``Np % 16 == Kp % 128 == 0``) -> int32 words
    ``[Kp/128, Np/16, 256]`` of the ``"frag"`` layout."""
    n, k = codes_nk.shape
    c = codes_nk.astype(jnp.uint32).reshape(n // 16, 2, 8, k // 128, 2, 4, 2, 4, 2)  # rg h g kb c i e t v
    sh = jnp.asarray(_frag_shifts()).reshape(1, 2, 1, 1, 1, 1, 2, 1, 2)
    words = jnp.sum(c << sh, axis=(1, 6, 8), dtype=jnp.uint32)  # rg g kb c i t (disjoint bits: sum = or)
    words = words.transpose(2, 0, 3, 1, 5, 4).reshape(k // 128, n // 16, FRAG_WORDS)  # kb rg c g t i
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def frag_unpack(words: jax.Array) -> jax.Array:
    """Inverse of :func:`frag_pack` over ``[kb, rg, c * 128]`` words (``c`` = 1 or 2 chunks of 64
    columns): unsigned codes (int8) ``[rg * 16, kb * c * 64]``."""
    kb, rg, w = words.shape
    cc = w // 128
    u = jax.lax.bitcast_convert_type(words, jnp.uint32).reshape(kb, rg, cc, 8, 4, 4)  # kb rg c g t i
    # nibble 4v + 2e + h, static shifts (no array constants: this also runs inside interpreted kernels)
    nib = jnp.stack([(u >> (4 * j)) & 15 for j in range(8)], axis=-1).reshape(kb, rg, cc, 8, 4, 4, 2, 2, 2)
    nib = nib.transpose(1, 8, 3, 0, 2, 5, 7, 4, 6)  # rg h g kb c i e t v  (from kb rg c g t i v e h)
    return nib.reshape(rg * 16, kb * cc * 64).astype(jnp.int8)


def _wgmma_fragment_map(shape: tuple[int, int]) -> tuple[tuple[int, ...], np.ndarray]:
    """Mosaic's ``WGMMA_LAYOUT`` register array for ``shape`` (bf16 / f16) and, per register,
    ``(b, h, i, e)``: its pair sits at row ``64 b + 16 warp + 8 h + g`` and columns
    ``16 i + 8 e + 2 t`` (+1) of the thread (lane ``4 g + t``). Derived from the layout's tiling;
    raises NotImplementedError if that does not match the PTX m64k16 fragment."""
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu

    lay = fa.WGMMA_LAYOUT
    contig = tuple(mu.get_contiguous_strides(shape))
    strides = lay.tiling.tile_strides(contig)
    tiled = lay.tiled_tiling_shape
    dyn = strides[-lay.tiled_tiling_rank:]

    def offset(idx, dims):
        shp = tuple(tiled[d] for d in dims)
        return sum(((idx // s) % z) * dyn[d] for d, s, z in zip(dims, mu.get_contiguous_strides(shp), shp))

    rs = tuple(lay.registers_shape(shape))
    out = np.zeros(rs + (4,), np.int64)
    for tid in range(128):
        w, lane = divmod(tid, 32)
        g, t = divmod(lane, 4)
        base = offset(lane, lay.lane_dims) + offset(w, lay.warp_dims)
        for ridx in np.ndindex(rs):
            r, col = divmod(base + sum(i * s for i, s in zip(ridx, strides)), shape[1])
            b, rem = divmod(r - 16 * w - g, 64)
            h, rem_r = divmod(rem, 8)
            i, rem_c = divmod(col - 2 * t, 16)
            e, rem_e = divmod(rem_c, 8)
            if rem_r or rem_e or h > 1 or e > 1 or lay.vector_length != 2:
                raise NotImplementedError("Mosaic's WGMMA_LAYOUT is not the m64k16 fragment the 'frag' layout packs")
            if tid == 0:
                out[ridx] = (b, h, i, e)
            elif tuple(out[ridx]) != (b, h, i, e):
                raise NotImplementedError("Mosaic's WGMMA_LAYOUT differs between threads from the PTX fragment")
    return rs, out


def _frag_dequant(part, chunk_idx: int, z_ref, s_ref, *, col0: int, gs: int, bk: int, bn: int, cdt):
    """The ``[bn, 64]`` WGMMA-layout operand ``q - z`` (``s_ref`` None) or ``(q - z) * s`` of
    columns ``[col0, col0 + 64)`` of the K block, from a ``"frag"`` SMEM part ``[bn/16, words]``
    (``chunk_idx``: the 64-column chunk within the part). ``z_ref`` / ``s_ref``: ``[rows, bn]``
    zero / scale rows of the block (one row when ``gs >= bk``)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref, vector

    shape = (bn, 64)
    rs, fmap = _wgmma_fragment_map(shape)
    half = jnp.dtype(cdt) == jnp.dtype(jnp.float16)
    # 2^7 (bf16) / 2^10 (f16) as the exponent: the 4 code bits are the low mantissa bits, value
    # = magic + code exactly; magic + z (z = zero point - 8 as stored, +8) is subtracted
    magic, op = (0x6400, "f16x2") if half else (0x4300, "bf16x2")
    bias = (1024.0 if half else 128.0) + 8.0
    types = (plgpu.RefType(), plgpu.RefType()) + ((plgpu.RefType(),) if s_ref is not None else ())

    @plgpu.inline_mgpu(arg_types=types, return_type=plgpu.ShapeDtypeStruct(shape, cdt, plgpu.Layout.WGMMA))
    def dequant(_, w_smem, z_smem, *s_smem):
        i32 = ir.IntegerType.get_signless(32)
        index = ir.IndexType.get()
        et = ir.F16Type.get() if half else ir.BF16Type.get()
        v2 = ir.VectorType.get((2,), et)
        ci = lambda v: arith.constant(i32, v)  # noqa: E731
        idx = lambda v: arith.index_cast(index, v)  # noqa: E731
        tid = mu.thread_idx()
        lane = arith.remui(tid, ci(32))
        warp = arith.remui(arith.divui(tid, ci(32)), ci(4))
        g = arith.divui(lane, ci(4))
        word_off = idx(arith.addi(ci(chunk_idx * 128), arith.muli(lane, ci(4))))
        words = {b: vector.load(ir.VectorType.get((4,), i32), w_smem, [idx(arith.addi(warp, ci(4 * b))), word_off])
                 for b in range(bn // 64)}
        pair_regs: dict = {}

        def pair(ref, b, h, grp, add):
            key = (id(ref), b, h, grp)
            if key not in pair_regs:
                row = idx(arith.addi(arith.addi(arith.muli(warp, ci(16)), g), ci(64 * b + 8 * h)))
                val = memref.load(ref, [arith.constant(index, grp), row])
                if add:
                    val = arith.addf(val, arith.constant(et, add))
                pair_regs[key] = mu.bitcast(vector.broadcast(v2, val), i32)
            return pair_regs[key]

        regs = np.empty(rs, dtype=object)
        for ridx in np.ndindex(rs):
            b, h, i, e = (int(v) for v in fmap[ridx])
            grp = 0 if gs >= bk else (col0 + 16 * i) // gs
            word = vector.extract(words[b], dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))
            sh = 4 * (h + 2 * e)
            shift = f"shr.u32 t, $1, {sh};" if sh else "mov.b32 t, $1;"
            ops = [word, pair(z_smem, b, h, grp, bias)]
            tail = f"sub.{op} $0, t, $2;"
            if s_smem:
                ops.append(pair(s_smem[0], b, h, grp, 0.0))
                tail = f"sub.{op} t, t, $2; mul.rn.{op} $0, t, $3;"
            asm = (f"{{ .reg .b32 t; {shift} lop3.b32 t, t, 0x000F000F, 0x{magic:04X}{magic:04X}, 0xea; {tail} }}")
            out = llvm.inline_asm(i32, ops, asm, "=r," + ",".join("r" * len(ops)))
            regs[ridx] = mu.bitcast(out, v2)
        return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return dequant(part, z_ref, *(() if s_ref is None else (s_ref,)))


# ------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Tiles of :func:`gptq_matmul_mgpu`.

    Attributes:
      block_m: tokens per CTA = wgmma N (multiple of 8, ≤ 256).
      block_n: output features per CTA = wgmma M (multiple of 64, divides ``Np``).
      block_k: K per pipeline step (64, 128 or 256; divides ``Kp``; divides or is a multiple of
        the group size).
      split_k: K partitions (divides ``Kp / block_k``); fp32 partials summed in XLA.
      num_stages: TMA pipeline depth (SMEM slots).
      scale_mode: where the group scales are applied:

        * ``"weights"``: dequantize ``(q - z) * s`` per weight in registers before the wgmma
          (any group size; two bf16 ops per weight);
        * ``"acc"``: the zero point is subtracted from the codes in registers (``q - z`` is an
          integer in [-255, 255], exact in bf16/fp16), the wgmma runs on those, and each K block's
          fp32 ``[block_n, block_m]`` product is scaled by the group's ``s`` before it is added
          to the accumulator (one op per weight plus ``block_n*block_m/128`` multiplies per
          thread and K block, instead of two ops per weight). Needs ``block_k`` to divide the
          group size.
      scale_impl: how the hardware path applies scales / zeros: ``"jnp"`` (the ``[block_n]``
        scale row is read from SMEM once and broadcast by Mosaic's layout inference) or
        ``"inline"`` (an :func:`plgpu.inline_mgpu` per-element FMA reading SMEM per element; the
        only choice for groups narrower than one wgmma K chunk, i.e. g32 in ``"weights"``).
        The interpreter ignores it.
      w_layout: how the hardware path loads the int weight tile from SMEM into registers:
        ``"auto"`` (Mosaic's layout inference picks) or ``"upcast"`` (explicitly in the
        conversion-friendly ``WGMMA_UPCAST_4X`` / ``_2X`` layout: 32-bit SMEM loads of 8 int4 or
        4 int8 values per thread, then a register relayout to the wgmma operand layout before
        the int -> bf16/fp16 upcast). The interpreter ignores it.
      schedule: how work is spread over CTAs:

        * ``"grid"``: one CTA per ``(N tile, M tile, K split)``; each runs its own pipeline.
        * ``"stream"``: a persistent grid of ``ctas_per_sm`` CTAs per SM. The
          ``(M tile, N tile, K block)`` steps are laid out in one line and cut into equal
          contiguous ranges, one per CTA (stream-K): every CTA streams one uninterrupted TMA
          pipeline, crossing tile boundaries, and writes an fp32 partial sum per tile it touches;
          the (at most a few) partials of a tile are added in XLA. Balanced to one K block.
        * ``"tiles"``: the same persistent pipeline, cut at tile boundaries (each tile in one
          CTA, written once in the activation dtype; no partial sums).

        ``"stream"`` / ``"tiles"`` need ``split_k=1``.
      ctas_per_sm: CTAs per SM of the persistent schedules.
      compute_wgs: 1 (one warpgroup issues the copies and computes) or 2 (warp-specialised:
        a memory warpgroup issues the TMA copies while two compute warpgroups each take
        ``block_n`` rows of a ``2 * block_n`` weight tile). Persistent schedules only.
      zero_mode: ``scale_mode="acc"`` only: ``"regs"`` subtracts the zero point from every code
        in registers; ``"xsum"`` runs the wgmma on the raw codes and corrects each K block's
        product by ``z[n] * sum_k x[m, k]`` (two FMAs per accumulator element instead of one op
        per weight; the per-block sums of x are computed in XLA, fp32).
      transpose_out: ``"grid"`` and ``"tiles"``: True: the kernel writes ``y [M, Np]`` (grid
        split-K: its fp32 partials ``[split, M, Np]``) itself, the accumulator stored through a
        transposed SMEM view, so no XLA transpose follows; False writes ``yᵀ [Np, Mp]``; None
        (default): True for ``"tiles"``, False for ``"grid"``; :func:`default_config` sets True
        for the decode grids, M <= 16 (M = 1 then writes 1 partial row, not 8; at M = 16 the
        token-major store timed ~2 us slower alone on the H200, but spares the model an XLA
        transpose per matmul).
        ``"stream"`` writes fp32 partials: ``[slots, Np, Mp]`` by default, ``[slots, rows, Np]``
        with ``transpose_out=True`` (with ``split_reduce="tma"``: one token-major fp32 buffer, as the
        split decode grids write; :func:`accumulator_shape`).
      split_reduce: how the partial sums of split K (``"grid"`` with ``split_k > 1``) and of
        stream-K (``"stream"``) are added (:func:`default_config` takes ``"tma"`` for the split
        decode grids, ``"xla"`` elsewhere): ``"xla"`` (the field's default): each partial goes to its own
        fp32 slot in GMEM and an XLA reduction adds the slots; ``"tma"``: every CTA adds its fp32
        partial into one zero-initialised fp32 ``y`` in GMEM with a TMA reduce-add
        (``cp.reduce.async.bulk ... .add``, performed in L2), so the slots are neither written to
        DRAM nor read back, and one XLA op casts the sum to the activation dtype. The fp32 adds
        land in any order, so results can differ between runs in the last fp32 bits (hence in
        an occasional bf16 rounding). Hardware only: the interpreter has no TMA reduction and
        runs the ``"xla"`` path for either value.
      tma_bounds: (default True) hardware path: x goes to the
        kernel unpadded (the TMA loads zero-fill the token rows and K columns past its end) and
        the transposed outputs are written unpadded (the TMA stores drop the rows past M): no
        XLA pad before, no slice of padding after.
        (M >= 8 still pads to a multiple of 8: Mosaic's tiled GMEM views need it.) False pads x
        in XLA to whole token tiles first (the interpreter always does: it rejects out-of-bounds
        copies; so does ``zero_mode="xsum"``).
      store_wait: what a CTA of the ``"grid"`` / ``"stream"`` schedules waits for before it exits,
        after its last TMA store or reduce-add: ``"full"`` (the default: the write has reached
        GMEM, ``cp.async.bulk.wait_group 0``) or ``"read"`` (only that the copy engine has read
        the SMEM tile, ``cp.async.bulk.wait_group.read 0``; the write completes on its own
        before the launch does, as CUTLASS's TMA-store epilogues end). ``"read"`` frees the
        CTA's SMEM slot one L2 round trip earlier; for the decode grids' many short CTAs it
        measured no faster on the H100 (8192 x 28672 at M = 1: 50.8 against 50.4 us; the 7B
        step 2.18 against 2.15 ms; benchmarks/RESULTS.md session 23), so it is off. Kernels that
        signal other CTAs after their stores (the persistent MLP) always wait in full. The
        interpreter ignores it.
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_stages: int = 4
    scale_mode: str = "weights"
    scale_impl: str = "jnp"
    w_layout: str = "auto"
    schedule: str = "grid"
    ctas_per_sm: int = 2
    compute_wgs: int = 1
    transpose_out: bool | None = None
    zero_mode: str = "regs"
    tma_bounds: bool = True
    split_reduce: str = "xla"
    store_wait: str = "full"

    @property
    def writes_y(self) -> bool:
        """Whether the kernel stores token-major output (``transpose_out`` resolved)."""
        if self.schedule == "stream":
            return bool(self.transpose_out)
        return self.schedule == "tiles" if self.transpose_out is None else bool(self.transpose_out)


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # pragma: no cover - no devices
        return 132


def _grid_config(m: int, packed: MgpuPacked, *, min_steps: int | None = None, ctas_per_sm: int | None = None,
                 max_split: int | None = None, block_n: int | None = None) -> MgpuConfig:
    """The ``"grid"`` schedule's tiles for ``m`` tokens (H100 / H200 sweeps, benchmarks/RESULTS.md):
    many short CTAs (split-K up to ~16 CTAs per SM at M <= 16; 8 pipeline stages at M <= 8, 4 at
    M <= 16), token-major partials and the explicit upcast layout for decode (at M = 16 token-major
    partials and 16 rather than 8 CTAs per SM took the 7B decode step at batch 16 from 3.01 to
    2.61 ms on the H200: no XLA transpose of [Np, M] outputs, benchmarks/RESULTS.md session 14);
    M <= 64 one 64-wide N tile per CTA; larger M dequantizes the weights in registers ("weights") under the widest token
    tile.

    ``min_steps`` (K blocks per CTA at least, when K is split; default 2 at M <= 8, else 4),
    ``ctas_per_sm`` (the CTA count split-K aims for, per SM; default 16 / 8 / 2 by M), ``max_split``
    (the largest split; default 64 at M <= 8, else 32) and ``block_n`` (the N tile the split is
    chosen for) are the benchmark's tuning knobs. A split K's partials are TMA-reduced in the kernel
    (``split_reduce="tma"``; the interpreter adds them in XLA). Up to 32 splits at 9-16 tokens:
    K = 11008 (split-padded to 88 blocks) then splits 22 ways of 4 blocks rather than 11 of 8 (the
    7B down_proj at M = 1 in the decode step: 13.3 -> 10.3 us on the H200, benchmarks/RESULTS.md
    session 10). At M <= 8 more and shorter CTAs again: 2+ K blocks per CTA, up to 64 splits, and
    64-row N tiles where 128-row ones stay under the CTA target (q/k/v 3072 CTAs, o_proj 1024,
    down_proj 44 splits, 2816; gate/up and 8192 x 28672 reach it with 128 rows). In the 7B decode
    step at batch 1 on the H100 that took the matmuls from 50.2 to 47.9 us per layer (q/k/v 12.61 ->
    11.68, o_proj 5.95 -> 5.41, gate/up 20.1 -> 19.74, down 11.58 -> 11.04) and the step from 2.28 to
    2.18 ms (2.12-2.18 over three runs; session 20; gate/up in the step measured the same with
    64-row tiles, and 8192 x 28672 alone could not tell the two apart). At batch 16 the same knobs
    measured 2.98 against 2.99 ms, so 9-16 tokens keep theirs."""
    small = m <= 8
    min_steps = (2 if small else 4) if min_steps is None else min_steps
    max_split = (64 if small else 32) if max_split is None else max_split
    auto_bn = block_n is None
    if min_steps < 1:
        raise ValueError(f"min_steps={min_steps} must be >= 1.")
    if m <= 16:
        bm = 8 if m <= 8 else 16
        bn, bk, stages = 128, 128, 8 if m <= 8 else 4
    elif m <= 64:
        bm = 32 if m <= 32 else 64
        bn, bk, stages = 64, 128, 4
    elif m <= 128:
        bm, bn, bk, stages = 128, 128, 128, 3
    else:
        bm, bn, bk, stages = 256, 64, 128, 2
    if block_n is not None:
        if block_n not in (64, 128) or packed.n_pad % block_n:
            raise ValueError(f"block_n={block_n} must be 64 or 128 and divide Np={packed.n_pad}.")
        bn = block_n
    if packed.n_pad % bn:
        bn = 64
    if packed.group_size == 64:  # K blocks of one group each, so that scale_mode="acc" applies
        bk = 64
        stages = min(2 * stages, 8)
    nk = packed.k_pad // bk
    target = (ctas_per_sm or (16 if m <= 16 else 2)) * _num_sms()

    def split_for(bn):
        ctas, split = -(-m // bm) * (packed.n_pad // bn), 1
        if ctas < target:
            for d in range(1, min(nk, max_split) + 1):
                if nk % d == 0 and nk // d >= min_steps:  # keep >= min_steps pipeline steps per CTA
                    split = d
                    if ctas * d >= target:
                        break
        return split, ctas * split

    split, ctas = split_for(bn)
    if small and auto_bn and bn == 128 and ctas < target:
        # decode: a layer whose 128-row tiles stay under the CTA target takes 64-row ones
        bn = 64
        split, _ = split_for(bn)
    if 8 < m <= 16 and packed.n_pad >= 12288 and auto_bn:
        # wide layers at 9-16 tokens: 64-row N tiles under the split chosen for 128-row ones (twice the
        # CTAs, each with half the weights): the 7B decode step at batch 16 took 2.98 (2.87-2.99) against
        # 3.13 (3.09-3.28) ms on the H100 (fused q/k/v 22.0 -> 20.1 us, gate/up 28.9 -> 26.2 us
        # standalone; 4096 x 4096 and 11008 x 4096 were slower, so they keep 128), session 18
        bn = 64
    mode = "acc" if packed.group_size % bk == 0 and bm * bn <= 64 * 128 else "weights"
    # token-major partials at M <= 16: rows past M are not written (M = 1: 53 vs 58 us at
    # 8192 x 28672 on the H200 with TMA bounds), and the consumers take [M, N] rows as they are
    # (at M = 16 an [Np, Mp] store alone is ~2 us faster, but XLA then transposes it); split-K
    # partials TMA-added into one fp32 buffer in the kernel: in the 7B decode step that took 1902 against 2032 us of GPU time per step (no per-split slots written and read back;
    # the consumers read one fp32 row), benchmarks/RESULTS.md session 12
    return MgpuConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_stages=stages, scale_mode=mode,
                      w_layout="upcast" if m <= 16 else "auto", transpose_out=True if m <= 16 else None,
                      split_reduce="tma" if split > 1 else "xla")


def _decode_stream_config(m: int, packed: MgpuPacked, ctas_per_sm: int = 2) -> MgpuConfig:
    """The decode grid's token tile, K blocks, stages and scale mode for ``m`` tokens on the
    persistent stream-K schedule: ``ctas_per_sm`` CTAs per SM over 128-row N tiles, token-major fp32
    partials TMA-added into one buffer (the same :func:`accumulator_shape` as the split grids)."""
    return dataclasses.replace(_grid_config(m, packed), schedule="stream", split_k=1, ctas_per_sm=ctas_per_sm,
                               block_n=128, transpose_out=True, split_reduce="tma")


def default_config(m: int, packed: MgpuPacked) -> MgpuConfig:
    """Tiles and schedule for ``m`` tokens, from the H200 sweep in benchmarks/RESULTS.md
    (8192 x 28672, 4096 x 4096, 4096 x 14336, g128):

    * M <= 16: the ``"grid"`` schedule with split-K (:func:`_grid_config`): its many short CTAs
      kept more loads in flight than the persistent schedules (M = 1: 56 vs 66+ us, M = 16:
      64.5 vs 68.5+ us at 8192 x 28672; with empty bodies 39.5 vs 49.6+ us at M = 1; on the H100
      in session 24 stream-K took 55-67 against 50 us at M = 1). Except at 9-16 tokens on layers
      of at least 4096 x 4096 that are not wide (Np < 12288; the 7B o_proj and down_proj):
      persistent stream-K, 2 CTAs per SM, 128-row tiles, token-major partials TMA-added into one
      buffer (:func:`_decode_stream_config`). In the 7B decode step at batch 16 on the H100 that
      took down_proj from 13.5 to 11.3 us and o_proj from 6.4 to 6.2 us per layer, and the step from
      2.95-2.97 to 2.81-2.88 ms in four runs (benchmarks/RESULTS.md session 24); the wide layers
      measured no better with it, and at one token it is slower on every layer.
    * M <= 64: persistent stream-K (``"stream"``), the zero point subtracted in registers
      (``"acc"``); two compute warpgroups over 256-row weight tiles for big layers, one
      warpgroup and 2 CTAs per SM otherwise.
    * larger M: two compute warpgroups dequantizing ``[64, 64]`` weight tiles in registers
      under a 256- (128-) token tile; whole tiles per CTA written straight to ``y`` when the tiles
      cover at least 5/8 of the SMs (``"tiles"``), else stream-K over 128-token tiles to split K as well.
    """
    if m <= 16:
        if m > 8 and packed.n_pad < 12288 and packed.n_pad % 128 == 0 and packed.k_pad * packed.n_pad >= 4096 * 4096:
            return _decode_stream_config(m, packed)
        return _grid_config(m, packed)
    gs = packed.group_size
    if m <= 64:
        bk = 64 if gs == 64 else 128
        bm = 32 if m <= 32 else 64
        big = packed.k_pad * packed.n_pad >= 64 * 2**20
        if big and packed.n_pad % 256 == 0:
            bn, wgs, cps = 128, 2, 1
        else:
            bn, wgs, cps = 64, 1, 2
        return MgpuConfig(block_m=bm, block_n=bn, block_k=bk, num_stages=4,
                          scale_mode="acc" if gs % bk == 0 else "weights", w_layout="upcast",
                          schedule="stream", ctas_per_sm=cps, compute_wgs=wgs)
    bm = 256 if m >= 256 else 128
    tiles = -(-m // bm) * (packed.n_pad // 128)
    # whole tiles once they cover 5/8 of the SMs: a wave of whole tiles on 85-97 % of the SMs beat stream-K
    # (4096 x 14336 at M = 256: 45.9 against 61.7-67.0 us; 4096 x 4096 and 14336 x 4096 at M = 1024:
    # 50.2 / 158.8 against 74-84 / 213-245 us); at 24 % stream-K wins by 2-2.6x (M = 256 of those two).
    # Stream-K ran at ~0.63 of the tiles' per-SM rate there, hence the 5/8 (H100, session 21)
    schedule = "tiles" if 8 * tiles >= 5 * _num_sms() else "stream"
    if schedule == "stream":
        bm = 128  # fp32 partial-sum tiles of 2 x [64, 256] would not fit SMEM beside the pipeline
        # K blocks of 128 for 4-bit weights in groups of 128 (or per channel): 4096 x 4096 / 14336 x 4096 at
        # M = 256 took 22.7 / 56.9 against 24.2-24.6 / 59.1-60.4 us with 64 (H100, session 21). 8-bit
        # weights or g32's scale rows would not fit SMEM with 128 (264 / 238 KB, compiled on the H100)
        bk = 128 if packed.bits == 4 and gs % 128 == 0 and packed.k_pad % 128 == 0 else 64
    else:
        # K blocks of 64 under 256-token tiles (201 vs 244+ us at M = 256), of 128 under whole 128-token
        # tiles (127 vs 145 us at M = 128; 8192 x 28672 on the H200)
        bk = 128 if bm == 128 else 64
    # 3 pipeline stages from 4096 tokens (8192 x 28672 on the H100, session 18: 2554 / 2662 against 2642 /
    # 2706 us with 4 stages in two runs; at 1024 tokens 3 stages were slower, 659 against 623 us)
    return MgpuConfig(block_m=bm, block_n=64, block_k=bk, num_stages=3 if m >= 4096 else 4, scale_mode="weights",
                      w_layout="upcast", schedule=schedule, ctas_per_sm=1, compute_wgs=2)


def _validate(x: jax.Array, packed: MgpuPacked, cfg: MgpuConfig) -> None:
    if not isinstance(packed, MgpuPacked):
        raise ValueError(
            f"gptq_matmul_mgpu needs an MgpuPacked (pack_mgpu(...)); got {type(packed).__name__}."
        )
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x must be bfloat16 or float16 (cast first); got {x.dtype}.")
    if x.ndim < 1 or x.shape[-1] != packed.k:
        raise ValueError(f"x must be [..., K={packed.k}]; got shape {tuple(x.shape)}.")
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if bm <= 0 or bm % 8 or bm > 256:
        raise ValueError(f"block_m={bm} must be a multiple of 8 in [8, 256] (it is the wgmma N).")
    if bn <= 0 or bn % 64 or packed.n_pad % bn:
        raise ValueError(f"block_n={bn} must be a multiple of 64 dividing Np={packed.n_pad} (wgmma M).")
    if bm * bn > 128 * 128:
        raise ValueError(
            f"block_m*block_n={bm * bn} > 16384: the fp32 accumulator would need more than 128 "
            "registers per thread."
        )
    if bk not in (64, 128, 256) or packed.k_pad % bk:
        raise ValueError(f"block_k={bk} must be 64, 128 or 256 and divide Kp={packed.k_pad}.")
    gs = packed.group_size
    if gs % bk and bk % gs:
        raise ValueError(f"block_k={bk} must divide or be a multiple of the group size {gs}.")
    nk = packed.k_pad // bk
    if cfg.split_k <= 0 or nk % cfg.split_k:
        raise ValueError(f"split_k={cfg.split_k} must divide the number of K blocks Kp/block_k={nk}.")
    if cfg.num_stages < 1:
        raise ValueError(f"num_stages={cfg.num_stages} must be ≥ 1.")
    if cfg.scale_impl not in ("jnp", "inline"):
        raise ValueError(f"scale_impl must be 'jnp' or 'inline'; got {cfg.scale_impl!r}.")
    if cfg.w_layout not in ("auto", "upcast"):
        raise ValueError(f"w_layout must be 'auto' or 'upcast'; got {cfg.w_layout!r}.")
    if cfg.scale_mode not in ("weights", "acc"):
        raise ValueError(f"scale_mode must be 'weights' or 'acc'; got {cfg.scale_mode!r}.")
    if cfg.scale_mode == "acc" and bm * bn > 64 * 128:
        raise ValueError(
            f"scale_mode='acc' keeps two fp32 accumulators: block_m*block_n={bm * bn} must be ≤ 8192 "
            "(≤ 64 registers per thread each)."
        )
    if cfg.scale_mode == "acc" and gs % bk:
        raise ValueError(
            f"scale_mode='acc' needs block_k={bk} to divide the group size {gs}; use scale_mode='weights'."
        )
    if cfg.zero_mode not in ("regs", "xsum"):
        raise ValueError(f"zero_mode must be 'regs' or 'xsum'; got {cfg.zero_mode!r}.")
    if cfg.zero_mode == "xsum" and cfg.scale_mode != "acc":
        raise ValueError("zero_mode='xsum' needs scale_mode='acc'.")
    if cfg.zero_mode == "xsum" and packed.layout == "frag":
        raise ValueError("zero_mode='xsum' needs the 'kblocks' or 'nk' weight layout (the 'frag' conversion "
                         "subtracts the zero point itself).")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {cfg.schedule!r}.")
    if cfg.split_reduce not in SPLIT_REDUCES:
        raise ValueError(f"split_reduce must be one of {SPLIT_REDUCES}; got {cfg.split_reduce!r}.")
    if cfg.store_wait not in STORE_WAITS:
        raise ValueError(f"store_wait must be one of {STORE_WAITS}; got {cfg.store_wait!r}.")
    if cfg.compute_wgs not in (1, 2):
        raise ValueError(f"compute_wgs={cfg.compute_wgs} must be 1 or 2.")
    if cfg.schedule == "grid":
        if cfg.compute_wgs != 1:
            raise ValueError("compute_wgs=2 (warp specialisation) needs schedule='stream' or 'tiles'.")
    else:
        if cfg.split_k != 1:
            raise ValueError(f"schedule={cfg.schedule!r} needs split_k=1 (it splits K itself); got {cfg.split_k}.")
        if cfg.ctas_per_sm < 1:
            raise ValueError(f"ctas_per_sm={cfg.ctas_per_sm} must be ≥ 1.")
        if packed.n_pad % (bn * cfg.compute_wgs):
            raise ValueError(
                f"compute_wgs={cfg.compute_wgs} x block_n={bn} must divide Np={packed.n_pad} "
                "(one weight tile per CTA holds both warpgroups' rows)."
            )


# ------------------------------------------------------------------------------------------ kernel


def _swizzle(minor_bits: int) -> int:
    for sw in (128, 64, 32, 16):
        if minor_bits % (sw * 8) == 0:
            return sw
    raise ValueError(f"minor dimension of {minor_bits} bits is not a multiple of 16 bytes")


def _tiled(rows_bits: int, elem_bits: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    sw = _swizzle(rows_bits)
    if sw == 16:  # Pallas accepts swizzles of 32, 64 and 128 bytes only: leave the tile plain
        return sw, ()
    return sw, (plgpu.TilingTransform((8, sw * 8 // elem_bits)), plgpu.SwizzleTransform(sw))


def _group_cols(col0: int, width: int, gs: int, bk: int) -> tuple[int, int]:
    """For tile columns ``[col0, col0+width)``: (first row of the tile's scale block, group size
    within the chunk, or 0 when the whole chunk is one group)."""
    if gs >= bk:
        return 0, 0
    if gs >= width:
        return col0 // gs, 0
    return col0 // gs, gs


def _w_value(w_parts):
    """The ``[bn, bk]`` weight tile (interpreter) from its K parts (:func:`_w_parts`); signed
    ``code - 8`` for ``"frag"`` words (int32) too."""
    vals = [p[...] for p in w_parts]
    if vals[0].dtype == jnp.int32:  # "frag"
        vals = [frag_unpack(v[None]) - jnp.int8(8) for v in vals]
    return vals[0] if len(vals) == 1 else jnp.concatenate(vals, axis=1)


def _dequant_mma_interpret(acc, w_smem, x_smem, s_smem, z_smem, *, chunk, gs, bk, cdt):
    """Interpreter leaf: the same per-chunk math as :func:`_dequant_mma_hw` in plain jnp."""
    w = _w_value(w_smem)
    x = x_smem[...]
    s = s_smem[...].astype(jnp.float32)  # [groups_in_tile, bn]
    z = z_smem[...].astype(jnp.float32)
    ng = s.shape[0]
    for j in range(bk // chunk):
        ks = slice(j * chunk, (j + 1) * chunk)
        col = jnp.arange(j * chunk, (j + 1) * chunk)
        grp = col // gs if ng > 1 else jnp.zeros_like(col)
        sc = s[grp].T  # [bn, chunk]
        zc = z[grp].T
        q = w[:, ks].astype(jnp.float32)
        wd = ((q - zc).astype(cdt) * sc.astype(cdt)).astype(cdt)
        acc = acc + jax.lax.dot_general(wd, x[:, ks], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
    return acc


def _mma_acc_interpret(acc, w_smem, x_smem, s_smem, z_smem, *, chunk, bk, cdt, xs_smem=None):
    """Interpreter leaf of ``scale_mode="acc"``: ``acc + ((codes - z) @ x) * s`` per K block
    (``acc`` None: the scaled block product alone); with ``xs_smem`` (the block's ``sum_k x``,
    a ``[bm]`` ref) as ``(codes @ x - z * xs) * s``."""
    w = _w_value(w_smem)
    x = x_smem[...]
    z = z_smem[...].astype(cdt)[0][:, None]  # [bn, 1]
    t = None
    for j in range(bk // chunk):
        ks = slice(j * chunk, (j + 1) * chunk)
        wj = w[:, ks].astype(cdt) if xs_smem is not None else w[:, ks].astype(cdt) - z
        d = jax.lax.dot_general(wj, x[:, ks], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        t = d if t is None else t + d
    if xs_smem is not None:
        t = t - z.astype(jnp.float32) * xs_smem[...][None, :]
    t = t * s_smem[...].astype(jnp.float32)[0][:, None]
    return t if acc is None else acc + t


def _scale_rows_inline(t, s_ref):
    """``t[n, m] * s[0, n]`` (fp32) over a WGMMA-layout accumulator value (hardware path)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.Layout.WGMMA),
        return_type=plgpu.ShapeDtypeStruct(t.shape, t.dtype, plgpu.Layout.WGMMA),
    )
    def scaled(_, s_smem, tv):
        index = ir.IndexType.get()
        f32 = ir.F32Type.get()

        def mul(v, idx):
            sv = arith.extf(f32, memref.load(s_smem, (arith.constant(index, 0), idx[0])))
            return arith.mulf(v, sv)

        return tv.foreach(mul, create_array=True)

    return scaled(s_ref, t)


def _bcast_rows(v, shape):
    """``[bn]`` -> ``[bn, cols]`` (each row constant)."""
    return jax.lax.broadcast_in_dim(v, shape, (0,))



def _transposed(ref: Any) -> Any:
    """The ``[bk, bm]`` x tile as wgmma's ``[bm, bk]``-major B operand.

    ``plgpu.transpose_ref`` is what jax 0.10 lowers and what the H100 run (jax 0.11.2) compiled;
    0.11 deprecates it in favour of ``ref.transpose``, which is used once it is removed.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fn = getattr(plgpu, "transpose_ref", None)
    if fn is None:
        return ref.transpose((1, 0))
    return fn(ref, (1, 0))


def _load_w(w_smem, bits: int, w_layout: str):
    """The ``[bn, bk]`` int weight tile from SMEM into registers."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if w_layout == "upcast":
        lay = plgpu.Layout.WGMMA_UPCAST_4X if bits == 4 else plgpu.Layout.WGMMA_UPCAST_2X
        idx = inspect.signature(plgpu.load).parameters.get("idx")
        if idx is None or idx.default is not inspect.Parameter.empty:
            return plgpu.load(w_smem, layout=lay)  # jax >= 0.11: the index is part of the ref
        with warnings.catch_warnings():  # jax 0.10 takes it separately (0.11 deprecates that)
            warnings.simplefilter("ignore", DeprecationWarning)
            return plgpu.load(w_smem, (), layout=lay)
    return w_smem[...]


def _load_layout(ref, layout):
    """``plgpu.load`` of a whole SMEM ref in ``layout`` (the index argument moved into the ref in 0.11)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    idx = inspect.signature(plgpu.load).parameters.get("idx")
    if idx is None or idx.default is not inspect.Parameter.empty:
        return plgpu.load(ref, layout=layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return plgpu.load(ref, (), layout=layout)


def _w_chunks(w_parts, bits: int, w_layout: str, chunk: int):
    """Registers of the weight tile's K parts; returns ``get(j)``, the ``[bn, chunk]`` slice of
    K chunk ``j`` (each part is ``[bn, width]``, ``width`` a multiple of ``chunk``)."""
    vals = [_load_w(p, bits, w_layout) for p in w_parts]
    width = vals[0].shape[1]

    def get(j):
        c0 = j * chunk
        return vals[c0 // width][:, c0 % width: c0 % width + chunk]

    return get


def _frag_part(w_parts, col0: int):
    """``(part ref, chunk index)`` holding the 64 K columns from ``col0`` of a ``"frag"`` tile."""
    width = w_parts[0].shape[-1] // 2  # columns per part (2 words per column per 16 rows)
    return w_parts[col0 // width], (col0 % width) // 64


def _upcast(wj, cdt, w_layout: str):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if w_layout == "upcast":
        wj = plgpu.layout_cast(wj, plgpu.Layout.WGMMA)
    return wj.astype(cdt)


def _mma_acc_hw(acc, w_smem, x_smem, s_smem, z_smem, *, chunk, bk, cdt, bn, bm, impl, bits, w_layout, xs_smem=None):
    """Hardware leaf of ``scale_mode="acc"``: wgmma on (upcast codes - z) into a scoped
    accumulator, then ``acc + product * s`` on the fp32 values (``acc`` None: the product alone)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def mm(tmp_ref):
        w = None if w_layout == "frag" else _w_chunks(w_smem, bits, w_layout, chunk)
        steps = bk // chunk
        for j in range(steps):
            ks = slice(j * chunk, (j + 1) * chunk)
            with jax.named_scope("upcast"):
                if w_layout == "frag":  # q - z straight from the fragment-ordered words
                    wj = _frag_dequant(*_frag_part(w_smem, j * chunk), z_smem, None, col0=j * chunk, gs=bk, bk=bk,
                                       bn=bn, cdt=cdt)
                else:
                    wj = _upcast(w(j), cdt, w_layout)
                    if xs_smem is None:
                        wj = wj - _bcast_rows(z_smem[0, :], wj.shape)
            with jax.named_scope("wgmma"):
                plgpu.wgmma(tmp_ref, wj, _transposed(x_smem.at[:, ks]))
            plgpu.wgmma_wait(1 if j + 1 < steps else 0)
        return tmp_ref[...]

    t = pl.run_scoped(mm, plgpu.ACC((bn, bm), jnp.float32))
    with jax.named_scope("scale"):
        if xs_smem is not None:  # codes @ x - z (x) sum_k x, then * s
            t = t - _bcast_rows(z_smem[0, :].astype(jnp.float32), t.shape) * jax.lax.broadcast_in_dim(
                xs_smem[...], t.shape, (1,))
        if impl == "jnp":
            t = t * _bcast_rows(s_smem[0, :].astype(jnp.float32), t.shape)
        else:
            t = _scale_rows_inline(t, s_smem)
    return t if acc is None else acc + t


def _scale_inline(w, s_ref, z_ref, *, row0: int, sub_gs: int):
    """``(w - z[g, n]) * s[g, n]`` over a WGMMA-layout ``[bn, chunk]`` array (hardware path).

    ``g = row0 + col // sub_gs`` (or ``row0`` when ``sub_gs == 0``); ``n`` is the row.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.Layout.WGMMA),
        return_type=plgpu.ShapeDtypeStruct(w.shape, w.dtype, plgpu.Layout.WGMMA),
    )
    def scaled(_, s_smem, z_smem, wv):
        index = ir.IndexType.get()

        def fma(v, idx):
            g = arith.constant(index, row0)
            if sub_gs:
                g = arith.addi(g, arith.divui(idx[1], arith.constant(index, sub_gs)))
            sv = memref.load(s_smem, (g, idx[0]))
            zv = memref.load(z_smem, (g, idx[0]))
            return arith.mulf(arith.subf(v, zv), sv)

        return wv.foreach(fma, create_array=True)

    return scaled(s_ref, z_ref, w)


def _dequant_mma_hw(acc_ref, w_smem, x_smem, s_smem, z_smem, *, chunk, gs, bk, cdt, impl, bits, w_layout):
    """Hardware leaf: weights SMEM -> registers (int upcast) -> scaled in registers -> wgmma A."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    w = None if w_layout == "frag" else _w_chunks(w_smem, bits, w_layout, chunk)
    steps = bk // chunk
    for j in range(steps):
        ks = slice(j * chunk, (j + 1) * chunk)
        row0, sub = _group_cols(j * chunk, chunk, gs, bk)
        with jax.named_scope("dequant"):
            if w_layout == "frag":  # (q - z) * s straight from the fragment-ordered words
                wj = _frag_dequant(*_frag_part(w_smem, j * chunk), z_smem, s_smem, col0=j * chunk, gs=gs, bk=bk,
                                   bn=acc_ref.shape[0], cdt=cdt)
                plgpu.wgmma(acc_ref, wj, _transposed(x_smem.at[:, ks]))
                plgpu.wgmma_wait(1 if j + 1 < steps else 0)
                continue
            wc = _upcast(w(j), cdt, w_layout)
            if impl == "jnp" and not sub:
                shape = wc.shape
                wj = (wc - _bcast_rows(z_smem[row0, :], shape)) * _bcast_rows(s_smem[row0, :], shape)
            else:
                wj = _scale_inline(wc, s_smem, z_smem, row0=row0, sub_gs=sub)
        with jax.named_scope("wgmma"):
            plgpu.wgmma(acc_ref, wj, _transposed(x_smem.at[:, ks]))
        plgpu.wgmma_wait(1 if j + 1 < steps else 0)


def _w_spec(packed: MgpuPacked, rows: int, bk: int):
    """``(block shape, index(n_tile, k_block), transforms)`` of the weight tile ``[rows, bk]`` at
    (N tile, K block) in ``packed.w``'s layout.

    ``"nk"``: a ``[rows, bk]`` block of ``[Np, Kp]``. ``"kblocks"`` (``[Kp/W_KBLOCK, Np, W_KBLOCK]``):
    ``bk <= W_KBLOCK`` is a ``[1, rows, bk]`` block (one contiguous run of ``rows * bk * bits / 8``
    bytes when ``bk == W_KBLOCK``); ``bk = 2 * W_KBLOCK`` a ``[2, rows, W_KBLOCK]`` block (two runs).
    The SMEM tile is ``[parts, rows, width]``; :func:`_w_parts` gives the ``[rows, width]`` refs.
    """
    kb = W_KBLOCK
    width = bk if packed.layout == "nk" else min(bk, kb)
    if packed.layout == "frag":  # [Kp/128, Np/16, 256] words, plain (the kernel addresses them itself)
        if bk <= kb:
            per = kb // bk
            return (1, rows // 16, 2 * bk), lambda n, k: (k // per, n, k % per), ()
        return (bk // kb, rows // 16, FRAG_WORDS), lambda n, k: (k, n, 0), ()
    transforms = _tiled(width * packed.bits, packed.bits)[1]
    if packed.layout == "nk":
        return (rows, bk), lambda n, k: (n, k), transforms
    if bk <= kb:
        per = kb // bk
        return (1, rows, bk), lambda n, k: (k // per, n, k % per), transforms
    return (bk // kb, rows, kb), lambda n, k: (k, n, 0), transforms


def _w_parts(w_smem, packed: MgpuPacked, wg=None, bn: int = 0) -> tuple:
    """The SMEM weight tile as ``[rows, width]`` refs in K order (``"frag"``: ``[rows/16, 2 *
    width]`` words); with ``wg`` only the rows ``[wg * bn, (wg + 1) * bn)`` of each."""
    if packed.layout == "nk":
        parts = (w_smem,)
    else:
        parts = tuple(w_smem.at[i] for i in range(w_smem.shape[0]))
    if wg is None:
        return parts
    rows = pl.ds(wg * (bn // 16), bn // 16) if packed.layout == "frag" else pl.ds(wg * bn, bn)
    return tuple(p.at[rows] for p in parts)


def _tma_reduces(cfg: MgpuConfig, interpret: bool) -> bool:
    """Whether the kernel adds its partials into one fp32 GMEM buffer (``split_reduce="tma"``)."""
    if interpret or cfg.split_reduce != "tma":
        return False
    return cfg.split_k > 1 if cfg.schedule == "grid" else cfg.schedule == "stream"


def _make_kernel(body, *, out_type, scratch_types, grid, grid_names, interpret: bool, reduce_into: bool,
                 **mesh_kw):
    """The ``plgpu.kernel`` of ``body``; with ``reduce_into`` the output is instead a mutable fp32
    ``Ref`` passed as the last operand (aliased in and out of the custom call), which the body
    TMA-reduces into (``plgpu.kernel``'s vmap wrapper does not take ``Ref`` operands, so this
    builds the same mesh kernel through ``pl.kernel``, scratch allocated by ``run_scoped``)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        params: dict[str, Any] = dict(interpret=InterpretGPUParams())
    else:
        params = dict(compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    if not reduce_into:
        return plgpu.kernel(body, out_type=out_type, scratch_types=scratch_types, grid=grid, grid_names=grid_names,
                            **mesh_kw, **params)

    collective = mesh_kw.get("thread_name")  # warp-specialised: the scratch is shared by all warpgroups

    def scoped(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch_types,
                      **(dict(collective_axes=collective) if collective else {}))

    run = pl.kernel(scoped, out_type=(), mesh=plgpu.Mesh(grid=grid, grid_names=grid_names, **mesh_kw), **params)

    def call(*args, acc=None):
        if acc is None:
            acc = jnp.zeros(out_type.shape, jnp.float32)
        elif acc.shape != out_type.shape or acc.dtype != jnp.float32:
            raise ValueError(f"acc must be float32 {out_type.shape}; got {acc.dtype} {acc.shape}")
        ref = jax.new_ref(acc)
        run(*args, ref)
        return ref[...]

    return call


@dataclasses.dataclass(frozen=True)
class _TileProgram:
    """One ``"grid"`` work item as a function other kernels can call (:func:`_tile_program`).

    ``run(ni, mi, si, x_gmem, w_gmem, sz_gmem, *rest)`` computes the ``(N tile ni, M tile mi, K
    split si)`` item and stores (or TMA-adds) it into the grid kernel's ``[slot, rows, Np]`` /
    ``[slot, Np, rows]`` output window; ``rest`` as the grid kernel's body takes it (prefetch
    views, x sums, the output ref, the output SMEM tile, the glu x tile). ``out_shape`` /
    ``scratch`` / ``grid`` / ``reduce_into`` describe the grid kernel built from it."""

    run: Any
    grid: tuple[int, int, int]
    out_shape: jax.ShapeDtypeStruct
    scratch: tuple
    reduce_into: bool


def _build(mp: int, packed: MgpuPacked, cfg: MgpuConfig, cdt, interpret: bool, rows: int | None = None,
           glu: bool = False, pf_plan: tuple = ()):
    """``"grid"`` kernel: ``[split, rows, Np]`` (``transpose_out``) or ``[split, Np, rows]`` partial
    sums (fp32 when ``split > 1``, else ``cdt``); ``rows`` (default ``mp``) may be the unpadded M on
    hardware, where the TMA store drops the token rows past it. ``glu``: the first operand is
    ``gu [rows, 2, Kp]`` float32 instead of x, and each step makes its x tile as
    ``silu(gu[:, 0]) * gu[:, 1]`` (:func:`_glu_tile`). ``pf_plan`` (:func:`_prefetch_plan`): two
    more operands after the scales (the next matmul's words and scales / zeros as 2-D views)
    whose planned rows the CTAs prefetch into L2 once their own output is on its way."""
    prog = _tile_program(mp, packed, cfg, cdt, interpret, rows, glu=glu, pf_plan=pf_plan)

    def body(*refs):
        prog.run(jax.lax.axis_index("n"), jax.lax.axis_index("m"), jax.lax.axis_index("k"), *refs)

    return _make_kernel(body, out_type=prog.out_shape, scratch_types=list(prog.scratch), grid=prog.grid,
                        grid_names=("n", "m", "k"), interpret=interpret, reduce_into=prog.reduce_into)


def _tile_program(mp: int, packed: MgpuPacked, cfg: MgpuConfig, cdt, interpret: bool, rows: int | None = None,
                  glu: bool = False, pf_plan: tuple = (), fp32_out: bool = False,
                  glu_offset: int = 0, store_wait: str | None = None) -> _TileProgram:
    """The work item of :func:`_build`'s grid kernel (arguments as there), for that kernel and for
    persistent kernels that run several items per CTA (``pallas_kernels/persistent_mlp.py``).
    ``fp32_out``: the item stores fp32 even when K is not split (default: ``cdt`` then).
    ``glu_offset`` (with ``glu``): x is a 2-D ``[rows, C]`` fp32 ref holding gate in its first
    columns and up from column ``glu_offset * block_k`` on (a fused gate/up product as stored),
    instead of ``[rows, 2, Kp]``. ``store_wait`` (default ``cfg.store_wait``): what the item waits
    for after its output store (``"full"`` for callers that signal other CTAs once it returns)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    read_only = (cfg.store_wait if store_wait is None else store_wait) == "read"

    bm, bn, bk, split = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    gs = packed.group_size
    bits = packed.bits
    nk = packed.k_pad // bk
    steps_per_split = nk // split
    grid = (packed.n_pad // bn, mp // bm, split)
    out_dt = jnp.float32 if split > 1 or fp32_out else cdt  # split-K: fp32 partials, summed in XLA ...
    reduce_into = _tma_reduces(cfg, interpret)  # ... or TMA-added into one fp32 buffer
    # K chunk per wgmma issue = the swizzle width of the x tile (in elements).
    x_sw, x_tr = _tiled(bk * 16, 16)
    chunk = x_sw * 8 // 16
    w_block, w_index, w_tr = _w_spec(packed, bn, bk)
    if gs >= bk:
        s_rows, blocks_per_group = 1, gs // bk
    else:
        s_rows, blocks_per_group = bk // gs, 0
    tr = cfg.writes_y
    rows = mp if rows is None else rows
    o_bits = jnp.dtype(out_dt).itemsize * 8
    _, o_tr = _tiled((bn if tr else bm) * o_bits, o_bits)

    xsum = cfg.zero_mode == "xsum"

    def run(ni, mi, si, x_gmem, w_gmem, sz_gmem, *rest):
        pf_views, rest = (rest[:2], rest[2:]) if pf_plan else ((), rest)
        xg_smem, rest = (rest[-1], rest[:-1]) if glu else (None, rest)
        xs_gmem, o_gmem, o_smem = rest if xsum else (None, *rest)
        k0 = si * steps_per_split

        def sz_index(ki):
            if blocks_per_group:
                return (0, (k0 + ki) // blocks_per_group, ni)
            return (0, k0 + ki, ni)

        specs = [
            plgpu.BlockSpec(w_block, lambda ki: w_index(ni, k0 + ki), transforms=w_tr),
            plgpu.BlockSpec((bm, bk), lambda ki: (mi, k0 + ki), transforms=x_tr),
            plgpu.BlockSpec((2, s_rows, bn), sz_index),  # scales and zeros: one copy
        ]
        gm = (w_gmem, x_gmem, sz_gmem)
        if glu:  # gate and up tiles (fp32) in place of the x tile
            f_tr = () if interpret else _tiled(bk * 32, 32)[1]
            if glu_offset:  # x is [rows, >= 2 K] (gate | up): up's K block j is block glu_offset + j
                specs[1:2] = [plgpu.BlockSpec((bm, bk), lambda ki, o=o: (mi, o + k0 + ki), transforms=f_tr)
                              for o in (0, glu_offset)]
            else:
                specs[1:2] = [plgpu.BlockSpec((bm, None, bk), lambda ki, h=h: (mi, h, k0 + ki), transforms=f_tr)
                              for h in (0, 1)]
            gm = (w_gmem, x_gmem, x_gmem, sz_gmem)

        def unfold(step):  # glu: the step's x tile made from its gate / up tiles
            if not glu:
                return step

            def wrapped(idx, w_smem, g_smem, u_smem, *more):
                _glu_tile(xg_smem, g_smem, u_smem, interpret)
                return step(idx, w_smem, xg_smem, *more)

            return wrapped

        leaf_kw = dict(chunk=chunk, gs=gs, bk=bk, cdt=cdt)
        hw_kw = dict(bits=bits, w_layout="frag" if packed.layout == "frag" else cfg.w_layout)
        if cfg.scale_mode == "acc":
            if xsum:  # per-K-block sums of x (_x_block_sums)
                specs.append(plgpu.BlockSpec((1, 1, _xs_width(bm)), lambda ki: (k0 + ki, mi, 0)))
                gm += (xs_gmem,)
            pipe = functools.partial(plgpu.emit_pipeline, grid=(steps_per_split,), in_specs=specs,
                                     max_concurrent_steps=cfg.num_stages,
                                     init_carry=jnp.zeros((bn, bm), jnp.float32))

            def step(_, w_smem, x_smem, sz_smem, *rest):
                *xs, acc = rest
                xs_kw = dict(xs_smem=xs[0].at[0, 0, pl.ds(0, bm)]) if xs else {}
                w_parts = _w_parts(w_smem, packed)
                if interpret:
                    return _mma_acc_interpret(acc, w_parts, x_smem, sz_smem.at[0], sz_smem.at[1], chunk=chunk,
                                              bk=bk, cdt=cdt, **xs_kw)
                return _mma_acc_hw(acc, w_parts, x_smem, sz_smem.at[0], sz_smem.at[1], chunk=chunk, bk=bk,
                                   cdt=cdt, bn=bn, bm=bm, impl=cfg.scale_impl, **hw_kw, **xs_kw)

            acc = pipe(unfold(step))(*gm)
        elif interpret:
            def step(_, w_smem, x_smem, sz_smem, acc):
                return _dequant_mma_interpret(acc, _w_parts(w_smem, packed), x_smem, sz_smem.at[0], sz_smem.at[1],
                                              **leaf_kw)

            acc = plgpu.emit_pipeline(
                unfold(step), grid=(steps_per_split,), in_specs=specs, max_concurrent_steps=cfg.num_stages,
                init_carry=jnp.zeros((bn, bm), jnp.float32),
            )(*gm)
        else:
            def compute(acc_ref):
                def step(_, w_smem, x_smem, sz_smem):
                    _dequant_mma_hw(acc_ref, _w_parts(w_smem, packed), x_smem, sz_smem.at[0], sz_smem.at[1],
                                    impl=cfg.scale_impl, **leaf_kw, **hw_kw)

                plgpu.emit_pipeline(
                    unfold(step), grid=(steps_per_split,), in_specs=specs,
                    max_concurrent_steps=cfg.num_stages,
                )(*gm)
                return acc_ref[...]

            acc = pl.run_scoped(compute, plgpu.ACC((bn, bm), jnp.float32))
        slot = 0 if reduce_into else si
        if not tr:
            o_smem[...] = acc.astype(out_dt)
            window = o_gmem.at[slot, pl.ds(ni * bn, bn), pl.ds(mi * bm, bm)]
        else:
            _store_transposed(o_smem, acc.astype(out_dt), interpret)
            window = o_gmem.at[slot, pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, window, **(dict(reduction_op="add") if reduce_into else {}))
        if pf_plan:  # CTA c of C (launch order: n fastest) takes chunks c, c + C, ...
            _issue_prefetches(pf_views, pf_plan, ni + grid[0] * (mi + grid[1] * si), math.prod(grid))
        plgpu.wait_smem_to_gmem(0, wait_read_only=read_only)

    slots = 1 if reduce_into else split
    return _TileProgram(
        run=run, grid=grid, reduce_into=reduce_into,
        out_shape=jax.ShapeDtypeStruct((slots, rows, packed.n_pad) if tr else (slots, packed.n_pad, rows), out_dt),
        scratch=(plgpu.SMEM((bm, bn) if tr else (bn, bm), out_dt, transforms=() if interpret else o_tr),
                 *([plgpu.SMEM((bm, bk), cdt, transforms=() if interpret else x_tr)] if glu else [])),
    )


# L2 prefetch of the next matmul's weights (decode grids; off unless a caller passes ``prefetch``)
PREFETCH_MAX_BYTES = 16 << 20  # at most this much of the next layer's words per call (L2: 50 MB)
_PF_WORD_ROWS = 8  # words chunk: 8 rows of the [Kp/128 * Np/16, 256] view = one 128-row N tile of one K block


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _prefetch_plan(nxt: MgpuPacked) -> tuple[tuple[int, int, int, int], ...]:
    """What a decode grid prefetches of ``nxt`` (the matmul that runs after it): its first K blocks
    (``"frag"`` words ``[Kp/128, Np/16, 256]`` are K-block major, so a prefix of the array is
    what split 0 of every N tile, the next grid's first CTAs in launch order, streams first) up to
    :data:`PREFETCH_MAX_BYTES`, and the scale / zero rows of their groups. Segments
    ``(view, first row, rows per chunk, chunks)`` over the views of :func:`_prefetch_views`
    (0: words ``[rows, 256]`` int32, 1: ``sz`` ``[rows, 128]``); ``()`` for other layouts."""
    if not isinstance(nxt, MgpuPacked) or nxt.layout != "frag":
        return ()
    n16 = nxt.n_pad // 16
    nk = nxt.k_pad // W_KBLOCK
    blocks = max(1, min(nk, PREFETCH_MAX_BYTES // (n16 * 256 * 4)))
    segs = [(0, 0, _PF_WORD_ROWS, blocks * n16 // _PF_WORD_ROWS)]
    gp = nxt.sz.shape[1]
    groups = min(gp, -(-blocks * W_KBLOCK // nxt.group_size))
    per_group = nxt.n_pad // 128  # rows of the [.., 128] sz view per (scale or zero, group)
    r = _largest_divisor(per_group * groups, 256)
    segs += [(1, h * gp * per_group, r, groups * per_group // r) for h in (0, 1)]
    return tuple(segs)


def _prefetch_views(nxt: MgpuPacked) -> tuple[jax.Array, jax.Array]:
    """The 2-D views :func:`_prefetch_plan` counts rows of (free reshapes of contiguous arrays)."""
    return nxt.w.reshape(-1, 256), nxt.sz.reshape(-1, 128)


def _issue_prefetches(views, plan, c, ctas: int) -> None:
    """TMA prefetches (``cp.async.bulk.prefetch``, fire and forget) of the planned chunks that CTA
    ``c`` of ``ctas`` takes: ``c``, ``c + ctas``, ..."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    for view, start, r, chunks in plan:
        for it in range(-(-chunks // ctas)):
            j = c + it * ctas

            @pl.when(j < chunks)
            def _prefetch(view=views[view], start=start, r=r, j=j):
                plgpu.async_prefetch(view.at[pl.ds(start + j * r, r)])


def _silu_mul(g: jax.Array, u: jax.Array) -> jax.Array:
    """``silu(g) * u`` with ``silu(g) = g / (1 + exp(-g))``, in the dtype of ``g`` / ``u``."""
    return g / (1.0 + jnp.exp(-g)) * u


def glu_activation(gu: jax.Array, dtype: Any) -> jax.Array:
    """``x = silu(gate) * up`` from ``gu = [gate | up]`` (``[..., 2 K]``) as the fused kernel makes
    it: in fp32, rounded once to ``dtype`` (the XLA path of :func:`gptq_matmul_mgpu_glu_parts`)."""
    g, u = jnp.split(gu.astype(jnp.float32), 2, axis=-1)
    return _silu_mul(g, u).astype(dtype)


def _glu_tile(dst, g_ref, u_ref, interpret: bool) -> None:
    """``dst[...] = silu(g) * u`` rounded to ``dst``'s dtype, from fp32 gate / up SMEM tiles
    (``silu(g) = g / (1 + exp(-g))`` in fp32), then made visible to the wgmma that reads ``dst``.

    On hardware the tiles (all swizzled) are read and written through transposed ``[bk, bm]`` views
    in the transposed wgmma register layout, as the kernel's output tile is written
    (:func:`_store_transposed`); Mosaic's layout inference finds no layout for a plain or
    warpgroup-strided store into a tile that a wgmma then reads.
    The previous step's wgmma has finished reading ``dst`` (its leaf waits for all of them)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        dst[...] = _silu_mul(g_ref[...], u_ref[...]).astype(dst.dtype)
        return
    lay = plgpu.Layout.WGMMA_TRANSPOSED  # [bk, bm] values through transposed views of the tiles
    g, u = _load_layout(_transposed(g_ref), lay), _load_layout(_transposed(u_ref), lay)
    _transposed(dst)[...] = plgpu.layout_cast(_silu_mul(g, u).astype(dst.dtype), lay)
    plgpu.commit_smem()  # fence for the async proxy + warpgroup barrier: every thread's part is in


def _store_transposed(o_ref, val, interpret: bool) -> None:
    """The ``[bn, bm]`` accumulator value into the ``[bm, bn]`` SMEM tile ``o_ref``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        o_ref[...] = val.T
    else:  # through a transposed view of the tile, in the transposed wgmma register layout
        _transposed(o_ref)[...] = plgpu.layout_cast(val, plgpu.Layout.WGMMA_TRANSPOSED)


def _xs_width(bm: int) -> int:
    """Row width (fp32) of the x-sums array: at least 32 floats, so that every TMA copy of one
    row lands on a 128-byte SMEM slot (a bare ``[1, 8]`` fp32 block would give 32-byte slots)."""
    return max(bm, 32)


def _x_block_sums(x2: jax.Array, cfg: MgpuConfig) -> jax.Array:
    """``xs[k, i, j] = sum(x2[i*bm + j, k*bk:(k+1)*bk])`` in fp32, ``[nk, Mp/bm, _xs_width(bm)]``
    (zero beyond ``bm``): what ``zero_mode="xsum"`` multiplies the zero points by."""
    mp, kp = x2.shape
    bm, bk = cfg.block_m, cfg.block_k
    xs = x2.astype(jnp.float32).reshape(mp // bm, bm, kp // bk, bk).sum(-1).transpose(2, 0, 1)
    return jnp.pad(xs, ((0, 0), (0, 0), (0, _xs_width(bm) - bm)))


def _cta_start(c, *, ctas: int, tiles: int, nk: int, aligned: bool):
    """First pipeline step of CTA ``c`` (ints, NumPy or traced int32 scalars alike)."""
    if aligned:
        return (c * tiles // ctas) * nk
    return c * (tiles * nk) // ctas


def _first_cta(step, *, ctas: int, total: int):
    """The CTA whose range ``[start_c, start_{c+1})`` holds ``step`` (unaligned split): the largest
    ``c`` with ``c * total // ctas <= step``, i.e. ``c * total < (step + 1) * ctas``."""
    return ((step + 1) * ctas - 1) // total


def stream_plan(tiles: int, nk: int, ctas: int, aligned: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """Static work split of the persistent schedules over ``tiles * nk`` pipeline steps.

    CTA ``c`` runs steps ``[starts[c], starts[c + 1])`` of the line ``tile * nk + k``:
    ``starts[c] = c * T // C`` (``"stream"``, ``T = tiles * nk``), or the same cut at tile
    boundaries (``aligned``, ``"tiles"``). Returns ``(C, starts [C + 1], counts [tiles])`` where
    ``counts[t]`` is how many CTAs write a partial sum of tile ``t`` (1 when aligned). The kernel
    recomputes these bounds from its CTA index with the same integer formulas.
    """
    total = tiles * nk
    c = max(1, min(ctas, tiles if aligned else total))
    starts = _cta_start(np.arange(c + 1, dtype=np.int64), ctas=c, tiles=tiles, nk=nk, aligned=aligned)
    first = np.searchsorted(starts, np.arange(tiles) * nk, side="right") - 1
    last = np.searchsorted(starts, np.arange(tiles) * nk + nk - 1, side="right") - 1
    return c, starts, (last - first + 1).astype(np.int64)


def _stream_geometry(mp: int, packed: MgpuPacked, cfg: MgpuConfig):
    """(ctas, starts, counts, tile sizes) of a persistent schedule for ``mp`` padded tokens."""
    bn_cta = cfg.block_n * cfg.compute_wgs
    n_nt, n_mt = packed.n_pad // bn_cta, mp // cfg.block_m
    nk = packed.k_pad // cfg.block_k
    ctas = cfg.ctas_per_sm * _num_sms()
    total = n_nt * n_mt * nk
    while ctas > 1 and total * ctas >= 2**31:  # the kernel's int32 step arithmetic
        ctas //= 2
    c, starts, counts = stream_plan(n_nt * n_mt, nk, ctas, cfg.schedule == "tiles")
    return c, starts, counts, bn_cta, n_nt, n_mt, nk


def _build_stream(mp: int, packed: MgpuPacked, cfg: MgpuConfig, cdt, interpret: bool, rows: int | None = None):
    """Persistent ``"stream"`` / ``"tiles"`` kernel: ``[slots, Np, Mp]`` partial sums (fp32), or
    for ``"tiles"`` ``[1, rows, Np]`` (``transpose_out``; ``rows`` default ``Mp``, may be the
    unpadded M on hardware) or else ``[1, Np, Mp]`` in ``cdt``. Returns ``(kernel, counts, slots)``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    wgs = cfg.compute_wgs
    bits, gs = packed.bits, packed.group_size
    ctas, _, counts, bn_cta, n_nt, _, nk = _stream_geometry(mp, packed, cfg)
    tiles = int(counts.shape[0])
    total = tiles * nk
    aligned = cfg.schedule == "tiles"
    direct = cfg.writes_y  # token-major: "tiles" y, or "stream" fp32 partial rows
    reduce_into = _tma_reduces(cfg, interpret)  # partials TMA-added into one fp32 buffer
    slots = 1 if reduce_into else int(counts.max())
    out_dt = cdt if aligned else jnp.float32
    x_sw, x_tr = _tiled(bk * 16, 16)
    chunk = x_sw * 8 // 16
    w_block, w_index, w_tr = _w_spec(packed, bn_cta, bk)
    o_bits = jnp.dtype(out_dt).itemsize * 8
    _, o_tr = _tiled((bn if direct else bm) * o_bits, o_bits)
    acc_mode = cfg.scale_mode == "acc"
    acc_ref_mode = not acc_mode and not interpret  # hardware "weights": wgmma into an ACC ref
    i32 = jnp.int32

    cta_start = functools.partial(_cta_start, ctas=ctas, tiles=tiles, nk=nk, aligned=aligned)
    first_cta = functools.partial(_first_cta, ctas=ctas, total=total)

    def coords(step):
        tile = step // nk
        return tile // n_nt, tile % n_nt, step % nk  # m tile, n tile, K block

    if gs >= bk:
        sz_block, sz_row = (2, 1, bn_cta), lambda k: k // (gs // bk)
    else:
        sz_block, sz_row = (2, bk // gs, bn_cta), lambda k: k

    xsum = cfg.zero_mode == "xsum"
    w_layout = "frag" if packed.layout == "frag" else cfg.w_layout

    def block_product(acc, w_smem, x_smem, s_ref, z_ref, xs_ref=None):
        """acc (value, or ACC ref in acc_ref_mode) plus this K block's contribution."""
        if acc_mode:
            xs_kw = {} if xs_ref is None else dict(xs_smem=xs_ref)
            if interpret:
                return _mma_acc_interpret(acc, w_smem, x_smem, s_ref, z_ref, chunk=chunk, bk=bk, cdt=cdt, **xs_kw)
            return _mma_acc_hw(acc, w_smem, x_smem, s_ref, z_ref, chunk=chunk, bk=bk, cdt=cdt, bn=bn, bm=bm,
                               impl=cfg.scale_impl, bits=bits, w_layout=w_layout, **xs_kw)
        if interpret:
            return _dequant_mma_interpret(acc, w_smem, x_smem, s_ref, z_ref, chunk=chunk, gs=gs, bk=bk, cdt=cdt)
        _dequant_mma_hw(acc, w_smem, x_smem, s_ref, z_ref, chunk=chunk, gs=gs, bk=bk, cdt=cdt,
                        impl=cfg.scale_impl, bits=bits, w_layout=w_layout)
        return acc

    def body(x_gmem, w_gmem, sz_gmem, *rest):
        xs_gmem, o_gmem, o_smem = rest if xsum else (None, *rest)
        c = jax.lax.axis_index("c").astype(i32)
        start = cta_start(c)
        nsteps = cta_start(c + 1) - start

        specs = [
            plgpu.BlockSpec(w_block, lambda s: w_index(coords(start + s)[1], coords(start + s)[2]), transforms=w_tr),
            plgpu.BlockSpec((bm, bk), lambda s: (coords(start + s)[0], coords(start + s)[2]), transforms=x_tr),
            plgpu.BlockSpec(sz_block, lambda s: (0, sz_row(coords(start + s)[2]), coords(start + s)[1])),
        ]
        gm = (w_gmem, x_gmem, sz_gmem)
        if xsum:  # per-K-block sums of x (_x_block_sums)
            specs.append(plgpu.BlockSpec((1, 1, _xs_width(bm)),
                                         lambda s: (coords(start + s)[2], coords(start + s)[0], 0)))
            gm += (xs_gmem,)

        def step_fn(idx, w_smem, x_smem, sz_smem, xs_smem, acc, wg):
            (s,) = idx
            if wgs > 1:
                rows = pl.ds(wg * bn, bn)
                w_smem, sz_s, sz_z = _w_parts(w_smem, packed, wg, bn), sz_smem.at[0, :, rows], sz_smem.at[1, :, rows]
                o_ref = o_smem.at[wg]
            else:
                w_smem = _w_parts(w_smem, packed)
                sz_s, sz_z, o_ref = sz_smem.at[0], sz_smem.at[1], o_smem
            acc = block_product(acc, w_smem, x_smem, sz_s, sz_z,
                                None if xs_smem is None else xs_smem.at[0, 0, pl.ds(0, bm)])
            line = start + s
            mt, nt, k = coords(line)
            flush = jnp.logical_or(k == nk - 1, s == nsteps - 1)

            @pl.when(flush)
            def _store():
                slot = 0 if aligned or reduce_into else c - first_cta(line - k)
                val = acc[...] if acc_ref_mode else acc
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                if not direct:
                    o_ref[...] = val.astype(out_dt)
                else:  # [bn, bm] accumulator into the [bm, bn] tile
                    _store_transposed(o_ref, val.astype(out_dt), interpret)
                if acc_ref_mode:
                    acc[...] = jnp.zeros((bn, bm), jnp.float32)
                plgpu.commit_smem()
                row0 = nt * bn_cta + (wg * bn if wgs > 1 else 0)
                if direct:
                    dst = o_gmem.at[slot, pl.ds(mt * bm, bm), pl.ds(row0, bn)]
                else:
                    dst = o_gmem.at[slot, pl.ds(row0, bn), pl.ds(mt * bm, bm)]
                plgpu.copy_smem_to_gmem(o_ref, dst, **(dict(reduction_op="add") if reduce_into else {}))

            if acc_ref_mode:
                return acc
            return acc * (1 - flush.astype(jnp.float32))

        def split(args):  # (w, x, sz[, xs], carry) -> (w, x, sz, xs or None, carry)
            return (*args[:3], args[3] if xsum else None, args[-1])

        def run(init, wg):
            if wgs == 1:
                pipe = functools.partial(plgpu.emit_pipeline, grid=(nsteps,), in_specs=specs,
                                         max_concurrent_steps=cfg.num_stages)
                if acc_ref_mode:
                    def step_ref(idx, *args):
                        step_fn(idx, *split((*args, init)), None)

                    pipe(step_ref)(*gm)
                else:
                    pipe(lambda idx, *args: step_fn(idx, *split(args), None), init_carry=init)(*gm)
                return

            def context(pipeline):
                pipeline(init)

            plgpu.emit_pipeline_warp_specialized(
                lambda idx, *args: step_fn(idx, *split(args), wg),
                grid=(nsteps,), memory_registers=40, in_specs=specs, wg_axis="wg", num_compute_wgs=wgs,
                max_concurrent_steps=cfg.num_stages, compute_context=context,
            )(*gm)

        wg = jax.lax.axis_index("wg").astype(i32) if wgs > 1 else None
        if acc_ref_mode:
            # each compute warpgroup's own accumulator; the memory warpgroup allocates none
            if wgs == 1:
                pl.run_scoped(lambda acc_ref: run(acc_ref, wg), plgpu.ACC((bn, bm), jnp.float32))
            else:
                def context_ref(pipeline):
                    pl.run_scoped(lambda acc_ref: pipeline(acc_ref), plgpu.ACC((bn, bm), jnp.float32))

                plgpu.emit_pipeline_warp_specialized(
                    lambda idx, *args: step_fn(idx, *split(args), wg),
                    grid=(nsteps,), memory_registers=40, in_specs=specs, wg_axis="wg", num_compute_wgs=wgs,
                    max_concurrent_steps=cfg.num_stages, compute_context=context_ref,
                )(*gm)
        else:
            run(jnp.zeros((bn, bm), jnp.float32), wg)
        plgpu.wait_smem_to_gmem(0, wait_read_only=cfg.store_wait == "read")

    o_shape = (bm, bn) if direct else (bn, bm)
    if wgs > 1:
        o_shape = (wgs, *o_shape)
    mesh_kw = dict(num_threads=wgs + 1, thread_name="wg") if wgs > 1 else {}
    kernel = _make_kernel(
        body,
        out_type=jax.ShapeDtypeStruct(
            (slots, *((mp if rows is None else rows, packed.n_pad) if direct else (packed.n_pad, mp))), out_dt),
        scratch_types=[plgpu.SMEM(o_shape, out_dt, transforms=() if interpret else o_tr)],
        grid=(ctas,), grid_names=("c",), interpret=interpret, reduce_into=reduce_into, **mesh_kw,
    )
    return kernel, counts, slots


def _stream_sum_rows(parts: jax.Array, counts: np.ndarray, mp: int, packed: MgpuPacked, cfg: MgpuConfig) -> jax.Array:
    """``[Mp, Np]`` from token-major ``[slots, Mp, Np]`` stream-K partials (``transpose_out=True``);
    slot ``j`` of tile ``t`` counts only when ``j < counts[t]``, as in :func:`_stream_sum`."""
    slots = parts.shape[0]
    if slots == 1:
        return parts[0]
    bn_cta = cfg.block_n * cfg.compute_wgs
    n_nt, n_mt = packed.n_pad // bn_cta, mp // cfg.block_m
    valid = np.arange(slots)[:, None] < counts.reshape(1, -1)  # tile t = m tile * n_nt + n tile
    valid = valid.reshape(slots, n_mt, 1, n_nt, 1)
    p = parts.reshape(slots, n_mt, cfg.block_m, n_nt, bn_cta)
    return jnp.where(valid, p, 0.0).sum(0).reshape(mp, packed.n_pad)


def _stream_sum(parts: jax.Array, counts: np.ndarray, mp: int, packed: MgpuPacked, cfg: MgpuConfig) -> jax.Array:
    """``[Np, Mp]`` from the ``[slots, Np, Mp]`` partials: slot ``j`` of tile ``t`` counts only when
    ``j < counts[t]`` (the other slots were never written)."""
    slots = parts.shape[0]
    if slots == 1:
        return parts[0]
    bn_cta = cfg.block_n * cfg.compute_wgs
    n_nt, n_mt = packed.n_pad // bn_cta, mp // cfg.block_m
    valid = np.arange(slots)[:, None] < counts.reshape(n_mt, n_nt).T.reshape(1, -1)  # [slots, n_nt*n_mt]
    valid = valid.reshape(slots, n_nt, 1, n_mt, 1)
    p = parts.reshape(slots, n_nt, bn_cta, n_mt, cfg.block_m)
    return jnp.where(valid, p, 0.0).sum(0).reshape(packed.n_pad, mp)


# ------------------------------------------------------------------------------------------ public


def _resolve(x: jax.Array, packed: MgpuPacked, config: MgpuConfig | None) -> tuple[tuple[int, ...], int, MgpuConfig]:
    """Validated ``(leading dims, token count, config)`` of a call (default config for that M)."""
    lead = x.shape[:-1]
    m = math.prod(lead)
    if not isinstance(packed, MgpuPacked):
        _validate(x, packed, MgpuConfig())
    cfg = config or default_config(max(m, 1), packed)
    _validate(x, packed, cfg)
    return lead, m, cfg


def gptq_matmul_mgpu(
    x: jax.Array,
    packed: MgpuPacked,
    *,
    config: MgpuConfig | None = None,
    interpret: bool = False,
    prefetch: MgpuPacked | None = None,
) -> jax.Array:
    """``x[..., K] @ dequant(W)[K, N] -> [..., N]`` in ``x.dtype`` (fp32 accumulation), Hopper.

    Args:
      x: bf16 / fp16 activations ``[..., K]`` in the layer's original channel order.
      packed: the layer from :func:`pack_mgpu`.
      config: tiles; default :func:`default_config` for this M.
      interpret: run through the Mosaic GPU interpreter (CPU tests; slow, small shapes only).
      prefetch: the next matmul's layer, for the decode grids to prefetch into L2
        (:func:`gptq_matmul_mgpu_parts`).

    Raises:
      ValueError: wrong dtype / shape, or a config that does not fit the layer (see
        :class:`MgpuConfig`).
    """
    _check_prefetch(prefetch)
    lead, m, cfg = _resolve(x, packed, config)
    if m == 0:
        return jnp.zeros((*lead, packed.n), x.dtype)
    y = _forward(x.reshape(m, packed.k), packed, cfg, interpret, prefetch=prefetch,
                 pf_plan=_plan_for(prefetch, cfg, interpret))
    return y.reshape(*lead, packed.n)


def gptq_matmul_mgpu_parts(
    x: jax.Array,
    packed: MgpuPacked,
    *,
    config: MgpuConfig | None = None,
    interpret: bool = False,
    acc: jax.Array | None = None,
    prefetch: MgpuPacked | None = None,
) -> jax.Array:
    """:func:`gptq_matmul_mgpu` before its split-K sum: ``[P, ..., N]`` addends whose sum over axis 0
    in fp32, rounded to ``x.dtype``, is the product (up to the fp32 order of that sum).

    With a split-K grid that stores token-major partials (the decode configs) these are the
    kernel's fp32 partials as written, so a consumer kernel can add them itself instead of XLA
    running a separate sum; otherwise ``P = 1`` and the one addend is the finished product.

    ``acc`` (float32, :func:`accumulator_shape`; only where that is not None): a buffer of zeros
    made elsewhere for the kernel's TMA reduction to add into (see :func:`accumulator_shape`); the
    addends then sum to ``acc[0, :M, :N] + x @ W`` (``[Np, Mp]`` grids: ``acc[0, :N, :M].T + x @ W``,
    one addend rounded to ``x.dtype``; in the interpreter a token-major ``acc`` is the last addend).

    ``prefetch``: the layer of the matmul that runs next (a decode step's next projection). A
    ``"grid"`` kernel's CTAs then prefetch its first K blocks into L2 (up to
    :data:`PREFETCH_MAX_BYTES`; ``"frag"`` layouts) as they finish, so that the next kernel's first
    loads find them there. A hint: results do not change, and the interpreter ignores it.
    """
    _check_prefetch(prefetch)
    lead, m, cfg = _resolve(x, packed, config)
    want = accumulator_shape(m, packed, config=cfg, interpret=interpret)
    if acc is not None and (want is None or tuple(acc.shape) != want or acc.dtype != jnp.float32):
        raise ValueError(f"gptq_matmul_mgpu_parts: acc must be float32 {want} for this call "
                         f"(accumulator_shape); got {acc.dtype} {tuple(acc.shape)}.")
    if m == 0:
        return jnp.zeros((1, *lead, packed.n), x.dtype)
    if cfg.schedule == "tiles" or not cfg.writes_y:  # one addend: the product (plus acc, if given)
        return _forward(x.reshape(m, packed.k), packed, cfg, interpret, acc=acc, prefetch=prefetch,
                        pf_plan=_plan_for(prefetch, cfg, interpret)).reshape(1, *lead, packed.n)
    parts = _forward(x.reshape(m, packed.k), packed, cfg, interpret, parts=True, acc=acc, prefetch=prefetch,
                     pf_plan=_plan_for(prefetch, cfg, interpret))
    return parts.reshape(parts.shape[0], *lead, packed.n)


def _check_prefetch(prefetch: Any) -> None:
    if prefetch is not None and not isinstance(prefetch, MgpuPacked):
        raise ValueError(f"prefetch must be the next layer's MgpuPacked (pack_mgpu) or None; "
                         f"got {type(prefetch).__name__}.")


def glu_in_kernel(m: int, packed: MgpuPacked, config: MgpuConfig | None = None) -> bool:
    """Whether :func:`gptq_matmul_mgpu_glu_parts` makes ``silu(gate) * up`` inside the kernel for
    ``m`` tokens (the decode grids; no act-order permutation of K, no ``zero_mode="xsum"``);
    elsewhere XLA makes it first."""
    cfg = config or default_config(max(m, 1), packed)
    return m > 0 and cfg.schedule == "grid" and packed.perm is None and cfg.zero_mode != "xsum"


def glu_config(m: int, packed: MgpuPacked, *, grid: bool = False) -> MgpuConfig:
    """:func:`default_config` for ``m`` tokens with fewer pipeline stages where the fused-activation
    kernel (:func:`gptq_matmul_mgpu_glu_parts`) would otherwise need more shared memory per CTA
    than the plain one: its stages hold fp32 gate and up tiles (``2 * block_m * block_k * 4``
    bytes) instead of a bf16 x tile, plus one x tile of scratch. Same grid and split (so the same
    :func:`accumulator_shape`); at least 2 stages. ``grid``: start from the split-K decode grid
    (:func:`_grid_config`) at M <= 16 even where :func:`default_config` takes stream-K (the
    persistent MLP's down phase)."""
    cfg = _grid_config(max(m, 1), packed) if grid and m <= 16 else default_config(max(m, 1), packed)
    if cfg.schedule != "grid":
        return cfg
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    w, x, sz = bk * bn * packed.bits // 8, bm * bk * 2, 2 * max(1, bk // packed.group_size) * bn * 2
    stages = (cfg.num_stages * (w + x + sz) - x) // (w + 2 * bm * bk * 4 + sz)
    return dataclasses.replace(cfg, num_stages=int(min(cfg.num_stages, max(2, stages))))


def gptq_matmul_mgpu_glu_parts(
    gu: jax.Array,
    packed: MgpuPacked,
    *,
    dtype: Any = jnp.bfloat16,
    config: MgpuConfig | None = None,
    interpret: bool = False,
    acc: jax.Array | None = None,
    prefetch: MgpuPacked | None = None,
) -> jax.Array:
    """:func:`gptq_matmul_mgpu_parts` of ``x = silu(gate) * up`` (a gated MLP's down projection)
    given ``gu = [gate | up]``, the output of a fused gate/up matmul, without a separate kernel
    for the activation: on the decode grids (:func:`glu_in_kernel`) each pipeline step loads fp32
    gate and up tiles and writes its x tile itself.

    ``x`` is computed in fp32 and rounded once to ``dtype`` (``silu(g) = g / (1 + exp(-g))``);
    elsewhere the same expression runs in XLA first and the plain kernel follows.

    Args:
      gu: ``[..., 2 K]`` float32 (bf16 / fp16 are widened), gate in the first ``K`` columns.
      packed: the down projection (``K = packed.k``).
      dtype: the activation dtype of x (bfloat16 / float16); the addends' rounding target.
      config: tiles; default :func:`glu_config` for this M.
      interpret, acc, prefetch: as :func:`gptq_matmul_mgpu_parts` (``acc`` of
        :func:`accumulator_shape` for ``(m, packed)``).
    Returns:
      ``[P, ..., N]`` addends, as :func:`gptq_matmul_mgpu_parts`.
    """
    _check_prefetch(prefetch)
    k = packed.k if isinstance(packed, MgpuPacked) else None
    if gu.ndim < 1 or k is None or gu.shape[-1] != 2 * k:
        raise ValueError(f"gptq_matmul_mgpu_glu_parts: gu must be [..., 2 K] = [..., {2 * k if k else '2K'}] "
                         f"(gate | up) for this layer; got shape {tuple(gu.shape)}.")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"gptq_matmul_mgpu_glu_parts: dtype must be bfloat16 or float16; got {jnp.dtype(dtype)}.")
    if gu.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"gptq_matmul_mgpu_glu_parts: gu must be float32, bfloat16 or float16; got {gu.dtype}.")
    dt = jnp.dtype(dtype)
    lead = gu.shape[:-1]
    m = math.prod(lead)
    xs = jax.ShapeDtypeStruct((*lead, k), dt)
    _, _, cfg = _resolve(xs, packed, config or glu_config(m, packed))
    if not glu_in_kernel(m, packed, cfg):
        return gptq_matmul_mgpu_parts(glu_activation(gu, dt), packed, config=cfg, interpret=interpret, acc=acc,
                                      prefetch=prefetch)
    want = accumulator_shape(m, packed, config=cfg, interpret=interpret)
    if acc is not None and (want is None or tuple(acc.shape) != want or acc.dtype != jnp.float32):
        raise ValueError(f"gptq_matmul_mgpu_glu_parts: acc must be float32 {want} for this call "
                         f"(accumulator_shape); got {acc.dtype} {tuple(acc.shape)}.")
    gu3 = gu.astype(jnp.float32).reshape(m, 2, k)
    if not cfg.writes_y:
        return _forward(gu3, packed, cfg, interpret, acc=acc, glu_dtype=dt, prefetch=prefetch,
                        pf_plan=_plan_for(prefetch, cfg, interpret)).reshape(1, *lead, packed.n)
    parts = _forward(gu3, packed, cfg, interpret, parts=True, acc=acc, glu_dtype=dt, prefetch=prefetch,
                     pf_plan=_plan_for(prefetch, cfg, interpret))
    return parts.reshape(parts.shape[0], *lead, packed.n)


def accumulator_shape(m: int, packed: MgpuPacked, *, config: MgpuConfig | None = None,
                      interpret: bool = False) -> tuple[int, ...] | None:
    """The fp32 buffer shape a :func:`gptq_matmul_mgpu_parts` call for ``m`` tokens can add its
    split-K partials into (its ``acc``), or None where that call has no such buffer.

    Decode grids (split K, ``split_reduce="tma"``) TMA-add their partials into one zero-filled
    fp32 buffer: ``[1, rows, Np]`` when they store token-major (the default at M <= 16),
    ``[1, Np, Mp]`` with ``transpose_out=False`` (the call then returns the finished product, one
    addend). The persistent stream-K schedule with ``split_reduce="tma"`` adds its partials the
    same way (token-major with ``transpose_out=True``). Made inside a jitted loop, XLA merges those zero fills and then copies the merged
    buffer once per call (~1 us each on an H200, benchmarks/RESULTS.md session 13); a caller that
    already runs a kernel before the matmul can have it write the zeros
    (``pallas_kernels.add_rms_norm(..., zeros=...)``) and pass them as ``acc``. In the
    interpreter (no TMA reduction) ``acc`` is one more addend of the result.
    """
    if m < 1:
        return None
    cfg = config or default_config(m, packed)
    split = cfg.split_k > 1 if cfg.schedule == "grid" else cfg.schedule == "stream"
    if not (split and cfg.split_reduce == "tma"):
        return None
    if not cfg.writes_y:
        return (1, packed.n_pad, -(-m // cfg.block_m) * cfg.block_m)
    return (1, _x_geometry(m, packed, cfg, interpret)[0], packed.n_pad)


def _x_geometry(m: int, packed: MgpuPacked, cfg: MgpuConfig, interpret: bool) -> tuple[int, int]:
    """``(rows, pad_k)``: the token rows of x (and of token-major outputs) for ``m`` tokens and
    the K columns XLA pads x by. With TMA bounds (hardware) the TMA zero-fills the tile rows / K
    columns past x's end and drops output rows past its end; Mosaic's tiled GMEM views need the
    row count below or a multiple of the 8-row tiling (and K of the x tile's 64-column tiling), so
    M pads to a multiple of 8 at most. Otherwise (the interpreter, ``zero_mode="xsum"``) whole
    token tiles and K blocks."""
    if cfg.tma_bounds and not interpret and cfg.zero_mode != "xsum":
        x_cols = _swizzle(cfg.block_k * 16) * 8 // 16
        return (m if m < 8 else -(-m // 8) * 8), (0 if packed.k % x_cols == 0 else packed.k_pad - packed.k)
    return -(-m // cfg.block_m) * cfg.block_m, packed.k_pad - packed.k


def _plan_for(prefetch: MgpuPacked | None, cfg: MgpuConfig, interpret: bool) -> tuple:
    """:func:`_forward`'s ``pf_plan`` for a call: made by the public functions, outside the jit, so
    that a changed :data:`PREFETCH_MAX_BYTES` makes a new trace."""
    return () if prefetch is None or interpret or cfg.schedule != "grid" else _prefetch_plan(prefetch)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "parts", "glu_dtype", "pf_plan"))
def _forward(x2: jax.Array, packed: MgpuPacked, cfg: MgpuConfig, interpret: bool, parts: bool = False,
             acc: jax.Array | None = None, glu_dtype: Any = None, prefetch: MgpuPacked | None = None,
             pf_plan: tuple | None = None) -> jax.Array:
    """``glu_dtype``: x2 is ``[m, 2, K]`` float32 gate / up (grid schedule, no permutation) and the
    kernel makes x in that dtype (:func:`gptq_matmul_mgpu_glu_parts`). ``prefetch``: the next
    matmul's layer, whose first K blocks a grid kernel prefetches into L2 as ``pf_plan`` says
    (:func:`_plan_for`; None: planned here; hardware only: the interpreter has no L2)."""
    if pf_plan is None:
        pf_plan = _plan_for(prefetch, cfg, interpret)
    m = x2.shape[0]
    glu = glu_dtype is not None
    cdt = jnp.dtype(glu_dtype) if glu else x2.dtype
    bm = cfg.block_m
    mp = -(-m // bm) * bm
    if glu and (cfg.schedule != "grid" or packed.perm is not None or cfg.zero_mode == "xsum"):
        raise ValueError("the in-kernel silu(gate) * up needs the grid schedule, no act-order permutation and "
                         "zero_mode='regs'")
    if packed.perm is not None:
        x2 = jnp.take(x2, packed.perm, axis=1)
    rows, pad_k = _x_geometry(m, packed, cfg, interpret)  # rows == mp without TMA bounds
    pad_m = rows - m
    if pad_m or pad_k:
        x2 = jnp.pad(x2, ((0, pad_m), (0, 0), (0, pad_k)) if glu else ((0, pad_m), (0, pad_k)))
    sz = packed.sz if packed.sz.dtype == cdt else packed.sz.astype(cdt)
    args = (x2, packed.w, sz)
    if cfg.zero_mode == "xsum":
        args += (_x_block_sums(x2, cfg),)
    if cfg.schedule == "grid":
        if pf_plan:
            args = (*args[:3], *_prefetch_views(prefetch), *args[3:])
        kernel = _build(mp, packed, cfg, cdt, interpret, rows if cfg.writes_y else mp, glu=glu, pf_plan=pf_plan)
        if acc is not None and _tma_reduces(cfg, interpret):
            out = kernel(*args, acc=acc)  # [1, rows, Np]: acc + the product
        else:
            out = kernel(*args)  # [split, rows, Np]
            if acc is not None:  # the interpreter: acc is one more addend
                out = jnp.concatenate([out.astype(jnp.float32), acc[:, : out.shape[1], : out.shape[2]]], axis=0)
        if parts and cfg.writes_y:  # token-major: the partials as they are, [split, m, N]
            return out[:, :m, : packed.n]
        y = out.sum(0) if out.shape[0] > 1 else out[0]  # one slot: no split, or split_reduce="tma"
        if cfg.writes_y:
            return y[:m, : packed.n].astype(cdt)
    else:
        reduce_into = _tma_reduces(cfg, interpret)
        # token-major stream partials in slots keep whole token tiles (their sum masks per tile)
        out_rows = rows if cfg.schedule == "tiles" or reduce_into else mp
        kernel, counts, _ = _build_stream(mp, packed, cfg, cdt, interpret, out_rows)
        out = kernel(*args, acc=acc) if acc is not None and reduce_into else kernel(*args)
        if cfg.schedule == "tiles" and cfg.writes_y:  # [1, rows, Np], already y
            return out[0, :m, : packed.n]
        if cfg.writes_y:  # "stream", token-major fp32 partials: [1, rows, Np] (TMA-reduced) or [slots, mp, Np]
            y = out[0] if reduce_into else _stream_sum_rows(out, counts, mp, packed, cfg)
            if acc is not None and not reduce_into:  # the interpreter: acc is one more addend
                y = y + acc[0, : y.shape[0]]
            if parts:
                return y[None, :m, : packed.n]
            return y[:m, : packed.n].astype(cdt)
        y = out[0] if reduce_into else _stream_sum(out, counts, mp, packed, cfg)  # [Np, Mp]
        if acc is not None and not reduce_into:
            y = y + acc[0, :, : y.shape[1]]
    return y[: packed.n, :m].T.astype(cdt)


def reference(x: jax.Array, packed: MgpuPacked) -> jax.Array:
    """Plain-jnp ``x @ dequant(W)``: permute x, dequantize in fp32, fp32 dot, cast to x.dtype."""
    k = packed.k
    x2 = x.reshape(-1, k)
    if packed.perm is not None:
        x2 = jnp.take(x2, packed.perm, axis=1)
    x2 = jnp.pad(x2, ((0, 0), (0, packed.k_pad - k))).astype(jnp.float32)
    w = dequantize_mgpu(packed, jnp.float32)
    y = jnp.dot(x2, w, precision=jax.lax.Precision.HIGHEST)[:, : packed.n]
    return y.astype(x.dtype).reshape(*x.shape[:-1], packed.n)


def random_inputs(key: jax.Array, k: int, n: int, *, bits: int = 4, group_size: int = 128,
                  act_order: bool = False) -> dict[str, jax.Array]:
    """A random GPTQ LIN dict (same generator as the Triton kernel's tests)."""
    from .gptq_matmul_gpu import random_gptq_linear

    return random_gptq_linear(key, k, n, bits=bits, group_size=group_size, act_order=act_order)


def main() -> None:  # pragma: no cover - benchmark
    """Self-check and timing: ``python -m jgptq.pallas_kernels.gptq_matmul_mgpu``.

    The full comparison against the Triton kernel and XLA is ``benchmarks/bench_kernels.py
    --mgpu`` (``benchmarks/mgpu_check.sh``).
    """
    import time

    interpret = jax.default_backend() != "gpu"
    k, n = (8192, 28672) if not interpret else (256, 128)
    lin = random_inputs(jax.random.key(0), k, n)
    packed = pack_mgpu_linear(lin, bits=4)
    for m in ((1, 16, 64, 256) if not interpret else (1, 9)):
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        f = jax.jit(lambda x: gptq_matmul_mgpu(x, packed, interpret=interpret))
        y = f(x).block_until_ready()
        ref = reference(x, packed)
        err = float(jnp.linalg.norm((y - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
        reps = 20 if not interpret else 1
        t0 = time.perf_counter()
        for _ in range(reps):
            y = f(x)
        y.block_until_ready()
        dt = (time.perf_counter() - t0) / reps
        print(f"M={m:5d} K={k} N={n} {default_config(m, packed)}: {dt * 1e6:9.1f} us  rel.err {err:.2e}")


if __name__ == "__main__":  # pragma: no cover
    main()
