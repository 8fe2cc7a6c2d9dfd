"""Kernel dispatch for GPTQ quantized linears: ``prepare`` once at model build, ``matmul`` per call.

Contract used by ``jgptq.models`` (see DESIGN.md, "LIN (quantized)"):

* ``prepare(lin, *, bits, backend)`` runs on the host once per layer. ``lin`` is the GPTQ LIN dict
  (``qweight`` int32 ``[K*bits/32, N]`` GPTQ row packing, ``scales`` ``[G, N]``, ``zeros`` uint8
  ``[G, N]`` true zero points, ``g_idx`` int32 ``[K]``). It returns a :class:`Prepared` pytree, or
  ``None`` when no kernel fits this backend / bits / shape; the caller then uses its XLA
  dequantize path.
* ``matmul(x, prepared)`` computes ``x[..., K] @ dequant(W)[K, N] -> [..., N]`` in ``x.dtype``;
  it applies the act-order permutation of ``x`` itself. ``bias`` is the caller's business.

Choice of kernel:

| backend | bits | kernel |
|---|---|---|
| ``gpu`` (CUDA), Hopper (default ``gpu_kernel="auto"``, or ``"mgpu"``) | 4, 8 | :mod:`gptq_matmul_mgpu` (Pallas, Mosaic GPU lowering, Hopper wgmma; split-K grid for decode (stream-K for o_proj / down_proj-like layers at 9-16 tokens), persistent stream-K / warp-specialised tiles above, see its ``default_config``); M >= :data:`LARGE_M_MGPU`: one XLA dequantize + cuBLAS dot; 2-bit: the Triton-lowered kernel |
| ``gpu`` (CUDA), other GPUs (or ``gpu_kernel="triton"``) | 2, 4, 8 | :mod:`gptq_matmul_gpu` (Pallas, Triton lowering); for M above a threshold, one XLA dequantize + cuBLAS dot when that is faster |
| ``tpu`` | 2, 4, 8 | :mod:`gptq_matmul_tpu` (Pallas TPU) |
| ``cpu`` | – | None (XLA path); ``interpret=True`` forces the kernels through the Pallas interpreter (tests) |
| any | 3 | None: 3-bit words straddle fields (a 96-bit stream), no kernel; XLA path |

Also None when ``g_idx`` has groups of unequal sizes (no contiguous permutation exists) or the
group size is not a multiple of 16 (``"mgpu"``: neither divides nor is a multiple of 128).

The GPU kernel is chosen by ``prepare(..., gpu_kernel=...)``; its default is
:data:`DEFAULT_GPU_KERNEL` (``"auto"``: the Mosaic GPU kernel on Hopper, the Triton-lowered one
elsewhere).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from .repack import PackedGPTQ, SUPPORTED_BITS, dequantize_packed, pack_gptq_linear

__all__ = ["Prepared", "prepare", "matmul", "matmul_parts", "xla_matmul", "gptq_qweight", "LARGE_M_GPU", "LARGE_M_MGPU",
           "DEFAULT_GPU_KERNEL", "GPU_KERNELS", "cuda_major"]

# Above this many tokens the GPU path dequantizes once and calls XLA's dot (cuBLAS), which was
# faster than the Pallas kernel there on an H100 (benchmarks/RESULTS.md, "Pallas kernels").
LARGE_M_GPU = 128
# The same threshold for the Mosaic GPU kernel: its persistent warp-specialised tiles beat XLA
# dequantize + cuBLAS up to M = 1024 on an H200 (756 vs 961 us at 8192 x 28672, and 201 vs 480 us at
# M = 256) and tie at M = 4096 (3195 vs 3172 us; benchmarks/RESULTS.md). With the 4-bit "frag" layout
# (session 9) the kernel leads at 4096 too: 2741 us against 3187 for the XLA path (bf16 2726).
LARGE_M_MGPU = 8192

# GPU kernel used when prepare() is not told: "auto" picks "mgpu" (gptq_matmul_mgpu, Mosaic GPU,
# needs Hopper: wgmma / TMA) on compute capability 9.x and "triton" (gptq_matmul_gpu) elsewhere.
# The Mosaic GPU kernel is faster than the Triton-lowered one at every M measured on an H100 and
# passed the GPU test suite there (benchmarks/RESULTS.md).
DEFAULT_GPU_KERNEL = "auto"
GPU_KERNELS = ("triton", "mgpu")


def cuda_major() -> int | None:
    """The compute-capability major version of the default device when it is an NVIDIA GPU (9 on
    Hopper), else None (CPU, TPU, ROCm, no backend)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover - no backend at all
        return None
    major = str(getattr(dev, "compute_capability", "") or "").split(".")[0]
    return int(major) if dev.platform == "gpu" and major.isdigit() else None


def _auto_gpu_kernel() -> str:
    """"mgpu" when the default device is a Hopper GPU (compute capability 9.x), else "triton"."""
    return "mgpu" if cuda_major() == 9 else "triton"

_GPU_NAMES = ("gpu", "cuda", "rocm")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prepared:
    """A layer prepared for one kernel (pytree; ``packed`` holds the arrays).

    Attributes:
      packed: the repacked weights (:class:`repack.PackedGPTQ`, or
        :class:`gptq_matmul_mgpu.MgpuPacked` for ``kernel == "mgpu"``).
      backend: ``"gpu"`` or ``"tpu"``.
      interpret: run the kernel through the Pallas interpreter (CPU tests).
      large_m: token count from which ``matmul`` uses the XLA dequantize + dot path instead.
      kernel: ``"triton"`` / ``"mgpu"`` on GPU, ``"tpu"`` on TPU.
    """

    packed: Any
    backend: str = dataclasses.field(metadata=dict(static=True))
    interpret: bool = dataclasses.field(default=False, metadata=dict(static=True))
    large_m: int = dataclasses.field(default=LARGE_M_GPU, metadata=dict(static=True))
    kernel: str = dataclasses.field(default="triton", metadata=dict(static=True))

    @property
    def in_features(self) -> int:
        return self.packed.k

    @property
    def out_features(self) -> int:
        return self.packed.n


def _normalize_backend(backend: str | None) -> str:
    b = (backend or jax.default_backend()).lower()
    if b in _GPU_NAMES:
        return "gpu"
    return b


def prepare(
    lin: Mapping[str, Any],
    *,
    bits: int,
    backend: str | None = None,
    interpret: bool = False,
    large_m: int | None = None,
    gpu_kernel: str | None = None,
    dtype: Any = jnp.bfloat16,
) -> Prepared | None:
    """Repack a GPTQ LIN dict into a kernel layout, or return None when no kernel fits.

    Args:
      lin: GPTQ LIN dict (module docstring). Extra keys (``bias``) are ignored.
      bits: code width (2, 3, 4 or 8).
      backend: ``"gpu"``/``"cuda"``, ``"tpu"`` or ``"cpu"``; default ``jax.default_backend()``.
      interpret: use the Pallas interpreter (lets CPU tests run the GPU or TPU kernel).
      large_m: override the GPU large-M threshold (tests, tuning).
      gpu_kernel: ``"triton"``, ``"mgpu"`` or ``"auto"`` (GPU backend only; ``"auto"``: ``"mgpu"`` on
        Hopper, else ``"triton"``); default :data:`DEFAULT_GPU_KERNEL` (``"auto"``).
      dtype: activation dtype the ``"mgpu"`` layout stores scales / zeros in (bf16 or fp16;
        other activation dtypes are cast per call). Ignored by the other kernels.

    Returns:
      A :class:`Prepared` for :func:`matmul`, or ``None`` (use the XLA path).

    Raises:
      ValueError: missing keys, shapes that disagree, or NaN/Inf scales.
    """
    missing = [k for k in ("qweight", "scales", "zeros", "g_idx") if k not in lin]
    if missing:
        raise ValueError(
            f"prepare() needs a quantized LIN dict with qweight/scales/zeros/g_idx; missing {missing} "
            f"(keys seen: {sorted(lin)}). Float LINs have no kernel."
        )
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8; got {bits}.")
    gk = DEFAULT_GPU_KERNEL if gpu_kernel is None else gpu_kernel
    auto = gk == "auto"
    if auto:
        gk = _auto_gpu_kernel()
    if gk not in GPU_KERNELS:
        raise ValueError(f"gpu_kernel must be 'auto' or one of {GPU_KERNELS}; got {gpu_kernel!r}.")
    b = _normalize_backend(backend)
    if bits not in SUPPORTED_BITS:
        return None
    if b == "gpu" and gk == "mgpu":
        from .gptq_matmul_mgpu import SUPPORTED_BITS as MGPU_BITS, pack_mgpu

        mp = None
        if bits in MGPU_BITS:
            mp = pack_mgpu(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=bits, dtype=dtype)
        if mp is not None:
            thr = LARGE_M_MGPU if large_m is None else int(large_m)
            return Prepared(packed=mp, backend=b, interpret=interpret, large_m=thr, kernel="mgpu")
        if not auto:  # asked for the Mosaic GPU kernel explicitly: no layout fits
            return None
        # "auto": 2-bit, or a group layout the Mosaic kernel lacks -> the Triton-lowered kernel
    if b == "gpu":
        layout = "nk"
    elif b == "tpu":
        layout = "kn"
    else:
        return None
    packed = pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=bits, layout=layout)
    if packed is None:
        return None
    thr = LARGE_M_GPU if large_m is None else int(large_m)
    return Prepared(packed=packed, backend=b, interpret=interpret, large_m=thr,
                    kernel="triton" if b == "gpu" else b)


def gptq_qweight(prepared: Prepared) -> jax.Array:
    """Rebuild the GPTQ ``qweight`` (int32 ``[K*bits/32, N]``, row packing) from a kernel layout.

    Exact: every layout keeps the codes losslessly (undoing the act-order permutation and the
    K/N padding), so a layer that keeps only the kernel's copy of its codes can still export its
    checkpoint tensors.
    """
    if not isinstance(prepared, Prepared):
        raise ValueError(f"gptq_qweight() needs the value returned by prepare(); got {type(prepared).__name__}.")
    packed = prepared.packed
    bits = packed.bits
    if isinstance(packed, PackedGPTQ):
        from .repack import unpack_block_planar

        words = packed.words.T if packed.layout == "nk" else packed.words
        codes = unpack_block_planar(words, bits=bits, slab=packed.slab)  # [Kp, Np]
    else:  # gptq_matmul_mgpu.MgpuPacked: w holds code - 2^(bits-1)
        codes = packed.w_nk().astype(jnp.int32).T + (1 << (bits - 1))
    codes = codes[: packed.k, : packed.n]
    if packed.perm is not None:  # the layouts hold codes[perm]
        codes = jnp.take(codes, jnp.argsort(packed.perm), axis=0)
    p = 32 // bits
    c = codes.astype(jnp.uint32).reshape(packed.k // p, p, packed.n)
    shifts = (jnp.arange(p, dtype=jnp.uint32) * bits)[None, :, None]
    words = jnp.sum(c << shifts, axis=1, dtype=jnp.uint32)  # fields are disjoint: sum == or
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def xla_matmul(x: jax.Array, packed: Any) -> jax.Array:
    """XLA path on the packed layout: dequantize the whole weight in ``x.dtype``, then one dot."""
    k = packed.k
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if packed.perm is not None:
        x2 = jnp.take(x2, packed.perm, axis=1)
    x2 = jnp.pad(x2, ((0, 0), (0, packed.k_pad - k)))
    if isinstance(packed, PackedGPTQ):
        w = dequantize_packed(packed, x.dtype)
    else:
        from .gptq_matmul_mgpu import dequantize_mgpu

        w = dequantize_mgpu(packed, x.dtype)
    y = jnp.dot(x2, w, preferred_element_type=jnp.float32)[:, : packed.n]
    return y.astype(x.dtype).reshape(*lead, packed.n)


def matmul(x: jax.Array, prepared: Prepared) -> jax.Array:
    """``x[..., K] @ W[K, N] -> [..., N]`` in ``x.dtype`` with the kernel chosen by :func:`prepare`.

    bf16 / fp16 activations go through the kernel; other dtypes (fp32) through :func:`xla_matmul`
    in that dtype. Jit-compatible; the path is picked from static shapes.
    """
    if not isinstance(prepared, Prepared):
        raise ValueError(
            f"matmul() needs the value returned by prepare(); got {type(prepared).__name__}. "
            "When prepare() returned None, use the XLA path instead."
        )
    packed = prepared.packed
    if x.shape[-1] != packed.k:
        raise ValueError(f"x must be [..., K={packed.k}]; got shape {tuple(x.shape)}.")
    m = math.prod(x.shape[:-1])
    if x.dtype not in (jnp.bfloat16, jnp.float16) or m == 0:
        return xla_matmul(x, packed)
    if prepared.backend == "gpu":
        if m >= prepared.large_m:
            return xla_matmul(x, packed)
        if prepared.kernel == "mgpu":
            from .gptq_matmul_mgpu import gptq_matmul_mgpu

            return gptq_matmul_mgpu(x, packed, interpret=prepared.interpret)
        from .gptq_matmul_gpu import gptq_matmul_gpu

        return gptq_matmul_gpu(x, packed, interpret=prepared.interpret)
    if prepared.backend == "tpu":
        from .gptq_matmul_tpu import gptq_matmul_tpu

        return gptq_matmul_tpu(x, packed, interpret=prepared.interpret)
    raise ValueError(f"unknown backend {prepared.backend!r} in Prepared; expected 'gpu' or 'tpu'.")


def _parts_on_mgpu(x_shape: tuple[int, ...], dtype: Any, prepared: Any) -> bool:
    return (isinstance(prepared, Prepared) and prepared.backend == "gpu" and prepared.kernel == "mgpu"
            and dtype in (jnp.bfloat16, jnp.float16) and x_shape[-1] == prepared.packed.k
            and 0 < math.prod(x_shape[:-1]) < prepared.large_m)


def parts_accumulator(x_shape: tuple[int, ...], dtype: Any, prepared: Any) -> tuple[int, ...] | None:
    """The float32 ``acc`` shape :func:`matmul_parts` takes for an input of ``x_shape`` / ``dtype``
    (a Mosaic decode grid that TMA-adds its partials into one buffer), or None where it takes none.
    See :func:`jgptq.pallas_kernels.gptq_matmul_mgpu.accumulator_shape`."""
    if not _parts_on_mgpu(tuple(x_shape), jnp.dtype(dtype), prepared):
        return None
    from .gptq_matmul_mgpu import accumulator_shape

    return accumulator_shape(math.prod(x_shape[:-1]), prepared.packed, interpret=prepared.interpret)


def _prefetch_target(prefetch: Any) -> Any:
    """The Mosaic layout of ``prefetch`` (a :class:`Prepared` of the matmul that runs next) for the
    kernel's L2 prefetch, or None where there is nothing it can prefetch (no layer, another kernel)."""
    if prefetch is None:
        return None
    if not isinstance(prefetch, Prepared):
        raise ValueError(f"prefetch must be the next layer's Prepared (prepare()) or None; got "
                         f"{type(prefetch).__name__}.")
    return prefetch.packed if prefetch.kernel == "mgpu" else None


def matmul_parts(x: jax.Array, prepared: Prepared, acc: jax.Array | None = None,
                 prefetch: Prepared | None = None) -> jax.Array:
    """:func:`matmul` as ``[P, ..., N]`` addends: their fp32 sum over axis 0, rounded to ``x.dtype``,
    is ``matmul(x, prepared)`` (up to the fp32 order of that sum).

    Where the Mosaic kernel runs a split-K grid (decode) these are its fp32 partials, for a
    consumer that adds them itself (``pallas_kernels.decode_attention_update``); elsewhere ``P = 1``
    and the addend is :func:`matmul`'s result.

    ``acc``: a float32 buffer of zeros of :func:`parts_accumulator`'s shape (only where that is not
    None) for the kernel to add its partials into instead of a zero fill of its own.
    ``prefetch``: the :class:`Prepared` of the matmul that runs next; a Mosaic decode grid then
    prefetches its first K blocks into L2 (``gptq_matmul_mgpu_parts(prefetch=)``; a hint, ignored
    by the other paths).
    """
    if acc is not None and parts_accumulator(tuple(x.shape), x.dtype, prepared) is None:
        raise ValueError("matmul_parts: this call takes no acc (parts_accumulator is None).")
    nxt = _prefetch_target(prefetch)
    if _parts_on_mgpu(tuple(x.shape), x.dtype, prepared):
        from .gptq_matmul_mgpu import gptq_matmul_mgpu_parts

        return gptq_matmul_mgpu_parts(x, prepared.packed, interpret=prepared.interpret, acc=acc, prefetch=nxt)
    return matmul(x, prepared)[None]


def glu_in_kernel(x_shape: tuple[int, ...], dtype: Any, prepared: Any) -> bool:
    """Whether :func:`matmul_glu_parts` makes ``silu(gate) * up`` inside the matmul kernel for an
    activation of ``x_shape`` (``[..., K]``) / ``dtype``: the Mosaic decode grids
    (:func:`jgptq.pallas_kernels.gptq_matmul_mgpu.glu_in_kernel`)."""
    if not _parts_on_mgpu(tuple(x_shape), jnp.dtype(dtype), prepared):
        return False
    from .gptq_matmul_mgpu import glu_in_kernel as mgpu_glu

    return mgpu_glu(math.prod(x_shape[:-1]), prepared.packed)


def matmul_glu_parts(gu: jax.Array, prepared: Prepared, dtype: Any, acc: jax.Array | None = None,
                     prefetch: Prepared | None = None) -> jax.Array:
    """:func:`matmul_parts` of ``x = silu(gate) * up`` in ``dtype`` (a gated MLP's down projection),
    from ``gu = [gate | up]`` (``[..., 2 K]``, float32 or the activation dtype: a fused gate/up
    matmul's output). Where :func:`glu_in_kernel` holds, the Mosaic kernel makes x itself (no
    separate activation kernel); elsewhere XLA makes it (in fp32, rounded once to ``dtype``)
    and :func:`matmul_parts` follows. ``acc``, ``prefetch``: as :func:`matmul_parts`, for the
    ``[..., K]`` input."""
    if not isinstance(prepared, Prepared):
        raise ValueError(f"matmul_glu_parts() needs the value returned by prepare(); got {type(prepared).__name__}.")
    k = prepared.packed.k
    if gu.ndim < 1 or gu.shape[-1] != 2 * k:
        raise ValueError(f"matmul_glu_parts: gu must be [..., 2 K] = [..., {2 * k}] (gate | up); got shape "
                         f"{tuple(gu.shape)}.")
    x_shape = (*gu.shape[:-1], k)
    if acc is not None and parts_accumulator(x_shape, dtype, prepared) is None:
        raise ValueError("matmul_glu_parts: this call takes no acc (parts_accumulator is None).")
    if glu_in_kernel(x_shape, dtype, prepared):
        from .gptq_matmul_mgpu import gptq_matmul_mgpu_glu_parts

        return gptq_matmul_mgpu_glu_parts(gu, prepared.packed, dtype=dtype, interpret=prepared.interpret, acc=acc,
                                          prefetch=_prefetch_target(prefetch))
    from .gptq_matmul_mgpu import glu_activation

    return matmul_parts(glu_activation(gu, dtype), prepared, acc=acc, prefetch=prefetch)


def mlp_in_kernel(x_shape: tuple[int, ...], dtype: Any, gate_up: Any, down: Any) -> bool:
    """Whether :func:`matmul_mlp` runs a gated MLP's decode step as one persistent Mosaic kernel
    (:func:`jgptq.pallas_kernels.persistent_mlp.gptq_mlp_mgpu`) for an activation of ``x_shape``
    (``[..., K]``): both layers on the Mosaic kernel, 1 to 16 tokens, ``gate_up`` the fused
    ``[gate | up]`` of ``down``'s input size (see ``persistent_mlp.supported``)."""
    if not (isinstance(gate_up, Prepared) and isinstance(down, Prepared)):
        return False
    x_shape, dt = tuple(x_shape), jnp.dtype(dtype)
    if not (_parts_on_mgpu(x_shape, dt, gate_up) and _parts_on_mgpu((*x_shape[:-1], down.packed.k), dt, down)):
        return False
    from .persistent_mlp import supported

    return supported(math.prod(x_shape[:-1]), gate_up.packed, down.packed, dt, interpret=gate_up.interpret) is None


def mlp_accumulators(x_shape: tuple[int, ...], dtype: Any, gate_up: Prepared,
                     down: Prepared) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The float32 zero buffers :func:`matmul_mlp` takes (``gu``, ``acc``) for that input, or None
    where :func:`mlp_in_kernel` does not hold."""
    if not mlp_in_kernel(x_shape, dtype, gate_up, down):
        return None
    from .persistent_mlp import accumulator_shapes

    return accumulator_shapes(math.prod(tuple(x_shape)[:-1]), gate_up.packed, down.packed,
                              interpret=gate_up.interpret)


def matmul_mlp(x: jax.Array, gate_up: Prepared, down: Prepared, gu: jax.Array | None = None,
               acc: jax.Array | None = None) -> jax.Array:
    """``down(silu(gate(x)) * up(x))`` as one fp32 addend ``[1, ..., N]`` (plus ``acc``), through
    the persistent decode MLP kernel; ``gu`` / ``acc``: zeros of :func:`mlp_accumulators`' shapes
    made elsewhere. Only where :func:`mlp_in_kernel` holds (else a ValueError naming why)."""
    if not mlp_in_kernel(tuple(x.shape), x.dtype, gate_up, down):
        from .persistent_mlp import supported

        why = (supported(math.prod(x.shape[:-1]), getattr(gate_up, "packed", None), getattr(down, "packed", None),
                         x.dtype) if isinstance(gate_up, Prepared) and isinstance(down, Prepared) else None)
        raise ValueError("matmul_mlp: the persistent MLP kernel does not apply here"
                         + (f": {why}" if why else " (both layers must be prepared for the Mosaic GPU kernel, "
                            "with a bf16 / fp16 input of 1 to 16 tokens)"))
    from .persistent_mlp import gptq_mlp_mgpu

    return gptq_mlp_mgpu(x, gate_up.packed, down.packed, gu=gu, acc=acc, interpret=gate_up.interpret)
