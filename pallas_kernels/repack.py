"""Load-time repacking of GPTQ linears into the kernels' own layout (uses only JAX / NumPy).

GPTQ stores ``qweight`` int32 ``[K*bits/32, N]``: row ``r`` holds input channels ``k = r*P + j``
(``P = 32 // bits``) at bits ``[bits*j, bits*j + bits)``. That order forces a kernel to interleave
``P`` unpacked rows, so at load time we rewrite the codes in a *block-planar* order:

* K is cut into blocks of ``B = P * S`` channels (``S``, the *slab*, is a layout parameter);
* inside block ``b`` the word at row ``r`` (``0 <= r < S``) holds, in field ``j``, channel
  ``k = b*B + j*S + r``.

Unpacking field ``j`` of an ``[S, n]`` tile of words therefore gives ``S`` *consecutive* channels,
which a kernel multiplies with ``x[:, b*B + j*S : b*B + (j+1)*S]`` without any shuffle. A slab of
``S`` channels always lies inside one quantization group because ``group_size % S == 0``.

Act-order (``desc_act``) checkpoints have a non-monotone ``g_idx``; we sort K by group once
(``perm``), so that groups become contiguous, and the kernels apply ``x[..., perm]`` at run time.
K is zero-padded to a multiple of ``B`` (codes 0, scales 0), N to a multiple of 128.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PackedGPTQ",
    "SUPPORTED_BITS",
    "GroupLayout",
    "analyze_g_idx",
    "choose_slab",
    "unpack_gptq_qweight",
    "pack_block_planar",
    "unpack_block_planar",
    "pack_gptq_linear",
    "dequantize_packed",
]

SUPPORTED_BITS = (2, 4, 8)
N_ALIGN = 128


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Result of :func:`analyze_g_idx`.

    Attributes:
      perm: int32 ``[K]`` order that makes groups contiguous (``x[..., perm]``), or None when
        ``g_idx`` is already ``arange(K) // group_size``.
      group_size: channels per group after the permutation (``K`` for per-channel scales).
    """

    perm: np.ndarray | None
    group_size: int


def analyze_g_idx(g_idx: Any, num_groups: int) -> GroupLayout | None:
    """Find a K permutation after which group ``g`` covers channels ``[g*gs, (g+1)*gs)``.

    Args:
      g_idx: int ``[K]`` group of each input channel (GPTQ order, maybe non-monotone).
      num_groups: ``G``, the number of rows of ``scales``.

    Returns:
      The layout, or None when ``g_idx`` has groups of unequal size (no kernel fits; use XLA).
    """
    g = np.asarray(g_idx).astype(np.int64).reshape(-1)
    k = g.shape[0]
    if k == 0 or g.min() < 0 or g.max() >= num_groups:
        raise ValueError(
            f"g_idx must hold group ids in [0, {num_groups}) for {num_groups} scale rows; "
            f"got min {g.min() if k else None}, max {g.max() if k else None}. "
            "Check that scales and g_idx come from the same layer."
        )
    counts = np.bincount(g, minlength=num_groups)
    gs = int(counts[0])
    if num_groups == 1:
        gs = k
    if gs <= 0 or np.any(counts[:-1] != gs) or counts[-1] > gs or counts[-1] == 0:
        return None
    if np.all(g == np.arange(k) // gs):
        return GroupLayout(perm=None, group_size=gs)
    perm = np.argsort(g, kind="stable").astype(np.int32)
    return GroupLayout(perm=perm, group_size=gs)


def choose_slab(k: int, group_size: int, bits: int) -> int | None:
    """Pick the slab ``S`` (words per block row) for this K / group size; None if none fits.

    Candidates, in order of preference, are 32, 16, 64, 128 (powers of two ≥ 16 keep Triton dots
    legal; 32 was fastest on an H100, 128 overflows shared memory there); ``S`` must divide the
    group size (a slab must not straddle groups) and the block ``B = P*S`` must divide, or be a
    multiple of, the group size (so a block holds whole "runs" of one group). We take the first
    whose K padding stays within 1/16 of K, else the one with least padding.
    """
    p = 32 // bits
    options = [
        s for s in (32, 16, 64, 128)
        if group_size >= k or (group_size % s == 0 and (group_size % (p * s) == 0 or (p * s) % group_size == 0))
    ]
    if not options:
        return None
    best = None
    for s in options:
        kp = -(-k // (p * s)) * p * s
        if kp - k <= k // 16:
            return s
        if best is None or kp < best[0]:
            best = (kp, s)
    return best[1]


def unpack_gptq_qweight(qweight: jax.Array, bits: int) -> jax.Array:
    """GPTQ row-packed int32 ``[K*bits/32, N]`` -> int32 codes ``[K, N]`` in ``[0, 2^bits)``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unpack_gptq_qweight supports bits in {SUPPORTED_BITS}; got {bits}.")
    p = 32 // bits
    q = jnp.asarray(qweight)
    shifts = (jnp.arange(p, dtype=jnp.uint32) * bits)[None, :, None]
    u = jax.lax.bitcast_convert_type(q, jnp.uint32)[:, None, :]
    codes = (u >> shifts) & jnp.uint32((1 << bits) - 1)
    return codes.reshape(q.shape[0] * p, q.shape[1]).astype(jnp.int32)


def pack_block_planar(codes: jax.Array, *, bits: int, slab: int, k_pad: int, n_pad: int) -> jax.Array:
    """Codes int ``[K, N]`` -> block-planar words int32 ``[k_pad*bits/32, n_pad]`` (zero padded)."""
    p = 32 // bits
    k, n = codes.shape
    if k_pad % (p * slab) or k_pad < k or n_pad < n:
        raise ValueError(f"bad padding: K={k} -> {k_pad} (block {p * slab}), N={n} -> {n_pad}")
    c = jnp.pad(jnp.asarray(codes).astype(jnp.uint32), ((0, k_pad - k), (0, n_pad - n)))
    c = c.reshape(k_pad // (p * slab), p, slab, n_pad)
    shifts = (jnp.arange(p, dtype=jnp.uint32) * bits)[None, :, None, None]
    words = jnp.sum(c << shifts, axis=1, dtype=jnp.uint32)  # fields are disjoint: sum == or
    return jax.lax.bitcast_convert_type(words.reshape(k_pad // p, n_pad), jnp.int32)


def unpack_block_planar(words: jax.Array, *, bits: int, slab: int) -> jax.Array:
    """Inverse of :func:`pack_block_planar`: int32 ``[Kp/P, Np]`` -> int32 codes ``[Kp, Np]``."""
    p = 32 // bits
    w = jax.lax.bitcast_convert_type(jnp.asarray(words), jnp.uint32)
    rows, n = w.shape
    w = w.reshape(rows // slab, 1, slab, n)
    shifts = (jnp.arange(p, dtype=jnp.uint32) * bits)[None, :, None, None]
    codes = (w >> shifts) & jnp.uint32((1 << bits) - 1)
    return codes.reshape(rows * p, n).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedGPTQ:
    """A GPTQ linear in kernel layout (a pytree: arrays are leaves, the rest is static).

    Attributes:
      words: int32 block-planar codes, ``[Kp*bits/32, Np]`` (layout ``"kn"``) or its transpose
        ``[Np, Kp*bits/32]`` (layout ``"nk"``).
      scales: ``[Gp, Np]`` (``"kn"``) or ``[Np, Gp]`` (``"nk"``), the checkpoint's float dtype;
        padded rows / columns are 0.
      zeros: same shape and dtype as ``scales``; true zero points (exact integers ≤ 255).
      perm: int32 ``[K]`` act-order permutation applied to x, or None.
      bits, k, n: code width and the layer's true in / out features.
      k_pad, n_pad: padded sizes (``k_pad % (32//bits * slab) == 0``, ``n_pad % 128 == 0``).
      group_size: channels per group after ``perm`` (``k_pad`` when there is one group).
      slab: words per block row (see module docstring).
      layout: ``"kn"`` or ``"nk"``.
    """

    words: jax.Array
    scales: jax.Array
    zeros: jax.Array
    perm: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    k_pad: int = dataclasses.field(metadata=dict(static=True))
    n_pad: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    slab: int = dataclasses.field(metadata=dict(static=True))
    layout: str = dataclasses.field(metadata=dict(static=True))

    @property
    def num_groups_padded(self) -> int:
        return -(-self.k_pad // self.group_size)


def check_gptq_tensors(qweight: Any, scales: Any, zeros: Any, g_idx: Any, bits: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array, np.ndarray]:
    """Validate a GPTQ LIN's tensors for repacking; ``(qweight, scales, zeros, g_idx as numpy)``.

    Raises ``ValueError`` naming the tensor: ``qweight`` not int32 ``[K*bits/32, N]``, ``scales`` /
    ``zeros`` not both ``[G, N]``, non-float or non-finite scales.
    """
    qweight = jnp.asarray(qweight)
    scales = jnp.asarray(scales)
    zeros = jnp.asarray(zeros)
    g_idx_np = np.asarray(g_idx)
    k = int(g_idx_np.shape[0])
    if qweight.ndim != 2 or qweight.dtype != jnp.int32 or qweight.shape[0] * (32 // bits) != k:
        raise ValueError(
            f"qweight must be int32 [K*bits/32, N] = [{k}*{bits}/32, N]; got {qweight.dtype} "
            f"{tuple(qweight.shape)}. Check bits and g_idx."
        )
    n = int(qweight.shape[1])
    if scales.ndim != 2 or scales.shape[1] != n or zeros.shape != scales.shape:
        raise ValueError(
            f"scales and zeros must both be [G, N={n}]; got scales {tuple(scales.shape)}, "
            f"zeros {tuple(zeros.shape)}."
        )
    if not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"scales must be a float array; got {scales.dtype}.")
    _check_finite("scales", scales)
    return qweight, scales, zeros, g_idx_np


def _check_finite(name: str, a: jax.Array) -> None:
    if jnp.issubdtype(a.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(a))):
        raise ValueError(f"{name} contains NaN or Inf; a GPTQ layer needs finite {name}.")


def pack_gptq_linear(
    qweight: Any,
    scales: Any,
    zeros: Any,
    g_idx: Any,
    *,
    bits: int,
    layout: str,
    slab: int | None = None,
) -> PackedGPTQ | None:
    """Repack one GPTQ LIN (DESIGN.md) into the block-planar kernel layout. Host-side, once.

    Args:
      qweight: int32 ``[K*bits/32, N]`` GPTQ row packing.
      scales: float ``[G, N]``.
      zeros: uint8/int ``[G, N]`` true zero points.
      g_idx: int32 ``[K]``.
      bits: 2, 4 or 8.
      layout: ``"kn"`` (N contiguous; TPU) or ``"nk"`` (K contiguous; GPU).
      slab: force the slab ``S`` (tests / tuning); default :func:`choose_slab`.

    Returns:
      The packed layer, or None when this layer's groups cannot be made contiguous with equal
      sizes or no slab divides the group size (the caller should use the XLA path).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"kernel layout supports bits in {SUPPORTED_BITS}; got {bits}.")
    if layout not in ("kn", "nk"):
        raise ValueError(f"layout must be 'kn' or 'nk'; got {layout!r}.")
    qweight, scales, zeros, g_idx_np = check_gptq_tensors(qweight, scales, zeros, g_idx, bits)
    p = 32 // bits
    k, n = int(g_idx_np.shape[0]), int(qweight.shape[1])
    num_groups = int(scales.shape[0])
    groups = analyze_g_idx(g_idx_np, num_groups)
    if groups is None:
        return None
    gs = groups.group_size
    if slab is None:
        slab = choose_slab(k, gs, bits)
        if slab is None:
            return None
    elif gs < k and (gs % slab or (gs % (p * slab) and (p * slab) % gs)):
        raise ValueError(
            f"slab={slab} does not fit group size {gs}: need group_size % slab == 0 and "
            f"block {p * slab} dividing or divisible by the group size. Pass slab=None."
        )
    block = p * slab
    k_pad = -(-k // block) * block
    n_pad = -(-n // N_ALIGN) * N_ALIGN
    if num_groups == 1:
        gs = k_pad
    g_pad = -(-k_pad // gs)
    codes = unpack_gptq_qweight(qweight, bits)
    perm = None
    if groups.perm is not None:
        perm = jnp.asarray(groups.perm)
        codes = jnp.take(codes, perm, axis=0)
    words = pack_block_planar(codes, bits=bits, slab=slab, k_pad=k_pad, n_pad=n_pad)
    sdt = scales.dtype if scales.dtype in (jnp.float16, jnp.bfloat16, jnp.float32) else jnp.float32
    pad = ((0, g_pad - num_groups), (0, n_pad - n))
    s = jnp.pad(scales.astype(sdt), pad)
    z = jnp.pad(zeros.astype(jnp.int32).astype(sdt), pad)
    if layout == "nk":
        words, s, z = words.T, s.T, z.T
    return PackedGPTQ(
        words=words, scales=s, zeros=z, perm=perm, bits=bits, k=k, n=n, k_pad=k_pad,
        n_pad=n_pad, group_size=gs, slab=slab, layout=layout,
    )


def dequantize_packed(packed: PackedGPTQ, dtype: Any = jnp.float32) -> jax.Array:
    """Dense ``[Kp, Np]`` weight in *permuted* K order, ``scales * (codes - zeros)``, in ``dtype``."""
    words, s, z = packed.words, packed.scales, packed.zeros
    if packed.layout == "nk":
        words, s, z = words.T, s.T, z.T
    codes = unpack_block_planar(words, bits=packed.bits, slab=packed.slab)
    g = jnp.arange(packed.k_pad) // packed.group_size
    w = s.astype(jnp.float32)[g] * (codes.astype(jnp.float32) - z.astype(jnp.float32)[g])
    return w.astype(dtype)
