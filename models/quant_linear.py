"""Linear layers for float and packed GPTQ weights: a pure function and the NNX modules.

A LIN (DESIGN.md) is either float ``{"kernel": [in, out], "bias"?: [out]}`` or quantized
``{"qweight": int32 [in*bits/32, out], "scales": [G, out], "zeros": uint8 [G, out],
"g_idx": int32 [in], "bias"?: [out]}``.

* :func:`linear` applies a LIN dict (or an NNX linear module) to activations; quantized dicts go
  through the XLA dequantize path (``jgptq.pack.dequantize_linear``).
* :class:`Linear` / :class:`QuantLinear` are the NNX modules built from LIN dicts
  (:func:`linear_from_params`). :class:`FusedQuantLinear` runs several GPTQ linears that read the
  same input (q/k/v, gate/up) as one wider quantized matmul (:func:`fuse_quantized`): one kernel
  launch instead of three or two, over a larger weight that fills the GPU better. ``QuantLinear``
  asks ``jgptq.pallas_kernels.dispatch.prepare`` once at build time for a kernel; when one fits,
  calls go to ``dispatch.matmul``, otherwise to the same XLA dequantize path. The model code does not change when kernels land.

Packed integers and their scales/zeros are held as :class:`QuantState` variables, not
``nnx.Param``, so ``nnx.state(model, nnx.Param)`` (an optimizer, LoRA) sees only float weights.
When a kernel was prepared, the layer does not keep ``qweight`` itself (the kernel's repacked
copy holds the same codes; ``to_params()`` rebuilds ``qweight`` exactly from it), so the int codes
are on the device once, not twice.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "QuantState", "PreparedKernel", "Linear", "QuantLinear", "FusedQuantLinear", "linear",
    "linear_from_params", "fuse_quantized", "concat_quantized", "quant_bits", "is_quantized", "dequantize",
    "prepared_of",
]

_QUANT_KEYS = ("qweight", "scales", "zeros", "g_idx")


class QuantState(nnx.Variable):
    """Non-trainable state of a quantized linear: packed codes, scales, zeros, g_idx."""


class PreparedKernel(nnx.Variable):
    """A kernel's own repacked copy of a quantized weight (pytree from ``dispatch.prepare``)."""


def is_quantized(lin: Mapping[str, Any]) -> bool:
    """True for a quantized LIN dict (has ``qweight``), False for a float one (has ``kernel``)."""
    if "qweight" in lin:
        return True
    if "kernel" in lin:
        return False
    raise ValueError(f"a linear layer's params need 'kernel' (float) or 'qweight' (GPTQ); got keys {sorted(lin)}")


def quant_bits(lin: Mapping[str, Any]) -> int:
    """Code width of a quantized LIN: ``32 * qweight.shape[0] // g_idx.shape[0]``, with shape checks.

    Raises:
      ValueError: a missing tensor, inconsistent shapes, or a width other than 2/3/4/8.
    """
    missing = [k for k in _QUANT_KEYS if k not in lin]
    if missing:
        raise ValueError(f"quantized linear params are missing {missing}; got keys {sorted(lin)}")
    qweight, scales, zeros, g_idx = (lin[k] for k in _QUANT_KEYS)
    if qweight.ndim != 2 or scales.ndim != 2 or zeros.ndim != 2 or g_idx.ndim != 1:
        raise ValueError(
            f"quantized linear expects qweight [in*bits/32, out], scales/zeros [G, out], g_idx [in]; got "
            f"qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, "
            f"g_idx {tuple(g_idx.shape)}")
    k = g_idx.shape[0]
    bits, rem = divmod(32 * qweight.shape[0], k)
    if rem or bits not in (2, 3, 4, 8):
        raise ValueError(
            f"qweight has {qweight.shape[0]} rows for in_features={k} (from g_idx): that is "
            f"{32 * qweight.shape[0] / k:g} bits per weight; only 2, 3, 4 and 8 bits are supported")
    n = qweight.shape[1]
    if scales.shape != zeros.shape or scales.shape[1] != n:
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [G, out={n}]")
    if qweight.dtype != jnp.int32:
        raise ValueError(f"qweight must be int32 (GPTQ row packing), got {qweight.dtype}")
    if "bias" in lin and lin["bias"] is not None and tuple(lin["bias"].shape) != (n,):
        raise ValueError(f"bias has shape {tuple(lin['bias'].shape)}, expected ({n},)")
    return bits


def dequantize(lin: Mapping[str, Any], dtype: Any) -> jax.Array:
    """Dequantized weight ``[in, out]`` in ``dtype``: ``(codes - zeros[g_idx]) * scales[g_idx]``."""
    from jgptq.pack import dequantize_linear

    return dequantize_linear({k: lin[k] for k in _QUANT_KEYS}, dtype)


def _add_bias(y: jax.Array, bias: Any) -> jax.Array:
    return y if bias is None else y + jnp.asarray(bias).astype(y.dtype)


def linear(lin: Mapping[str, Any] | Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Apply a linear layer: ``x[..., in] -> [..., out]`` in ``x.dtype``.

    ``lin`` is a LIN dict (float ``kernel`` or quantized GPTQ tensors, XLA dequantize path) or an
    NNX linear module (anything callable), so the functional and module paths share one code path.
    """
    if callable(lin):
        return lin(x)
    if is_quantized(lin):
        w = dequantize(lin, x.dtype)
    else:
        w = jnp.asarray(lin["kernel"]).astype(x.dtype)
    return _add_bias(jnp.matmul(x, w), lin.get("bias"))


class Linear(nnx.Module):
    """Float linear layer: ``y = x @ kernel + bias``; ``kernel`` is ``[in, out]``."""

    def __init__(self, kernel: Any, bias: Any | None = None):
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be [in, out], got shape {tuple(kernel.shape)}")
        self.kernel = nnx.Param(kernel)
        if bias is not None:
            bias = jnp.asarray(bias)
            if bias.shape != (kernel.shape[1],):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({kernel.shape[1]},)")
        self.bias = None if bias is None else nnx.Param(bias)

    @property
    def in_features(self) -> int:
        return self.kernel.shape[0]

    @property
    def out_features(self) -> int:
        return self.kernel.shape[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x[..., in] -> [..., out]`` in ``x.dtype``."""
        y = jnp.matmul(x, self.kernel[...].astype(x.dtype))
        return _add_bias(y, None if self.bias is None else self.bias[...])

    def to_params(self) -> dict[str, jax.Array]:
        d = {"kernel": self.kernel[...]}
        if self.bias is not None:
            d["bias"] = self.bias[...]
        return d


def _is_dispatch_prepared(prepared: Any) -> bool:
    """True for a real ``dispatch.Prepared`` (whose codes ``dispatch.gptq_qweight`` can rebuild)."""
    if prepared is None:
        return False
    try:
        from jgptq.pallas_kernels import dispatch
    except ImportError:
        return False
    return isinstance(prepared, dispatch.Prepared)


def _prepare_kernel(lin: Mapping[str, Any], bits: int) -> Any | None:
    try:
        from jgptq.pallas_kernels import dispatch
    except ImportError:
        return None
    return dispatch.prepare(lin, bits=bits, backend=jax.default_backend())


class QuantLinear(nnx.Module):
    """GPTQ linear layer over packed weights: ``y = x @ dequant(W) + bias``.

    Args:
      lin: quantized LIN dict (``qweight`` int32 ``[in*bits/32, out]``, ``scales`` ``[G, out]``,
        ``zeros`` uint8 ``[G, out]`` true zero points, ``g_idx`` int32 ``[in]``, optional ``bias``).
      use_kernel: ask the Pallas dispatch for a kernel (default). False forces the XLA path.
    """

    def __init__(self, lin: Mapping[str, Any], *, use_kernel: bool = True):
        self.bits = quant_bits(lin)
        self.in_features = int(lin["g_idx"].shape[0])
        self.out_features = int(lin["qweight"].shape[1])
        bias = lin.get("bias")
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        prepared = _prepare_kernel(lin, self.bits) if use_kernel else None
        self.prepared = None if prepared is None else PreparedKernel(prepared)
        # With a real kernel layout the codes live only in the kernel's copy (qweight is ~97% of a
        # layer's GPTQ bytes): to_params() rebuilds qweight from it exactly. scales / zeros / g_idx
        # are small and kept as given (the kernel layouts may cast or pad them).
        drop_qweight = _is_dispatch_prepared(prepared)
        for k in _QUANT_KEYS:
            if k == "qweight" and drop_qweight:
                self.qweight = None
            else:
                setattr(self, k, QuantState(jnp.asarray(lin[k])))

    def _lin(self) -> dict[str, jax.Array]:
        d = {k: getattr(self, k)[...] for k in _QUANT_KEYS if getattr(self, k) is not None}
        if "qweight" not in d:
            from jgptq.pallas_kernels import dispatch

            d["qweight"] = dispatch.gptq_qweight(self.prepared.get_value())
        return {k: d[k] for k in _QUANT_KEYS}

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x[..., in] -> [..., out]`` in ``x.dtype``."""
        if self.prepared is not None:
            from jgptq.pallas_kernels import dispatch

            y = dispatch.matmul(x, self.prepared.get_value())
        else:
            y = jnp.matmul(x, dequantize(self._lin(), x.dtype))
        return _add_bias(y, None if self.bias is None else self.bias[...])

    def parts(self, x: jax.Array, acc: jax.Array | None = None, prefetch: Any = None) -> jax.Array:
        """``x[..., in]`` -> ``[P, ..., out]`` addends of ``x @ W`` without the bias: their fp32 sum
        over axis 0, rounded to ``x.dtype``, is the product (the split-K partials of the GPU
        kernel where it has them, for a consumer kernel that adds them itself; else ``P = 1``).
        ``acc``: zeros of :meth:`parts_accumulator`'s shape for the kernel to add into.
        ``prefetch``: the module whose matmul runs next (a hint: the GPU decode kernel prefetches
        its first weights into L2; see :func:`jgptq.pallas_kernels.dispatch.matmul_parts`)."""
        if self.prepared is not None:
            from jgptq.pallas_kernels import dispatch

            return dispatch.matmul_parts(x, self.prepared.get_value(), acc=acc, prefetch=prepared_of(prefetch))
        if acc is not None:
            raise ValueError("QuantLinear.parts: acc given, but this layer has no GPU kernel to take it.")
        return jnp.matmul(x, dequantize(self._lin(), x.dtype))[None]

    def glu_in_kernel(self, x_shape: tuple[int, ...], dtype: Any) -> bool:
        """Whether :meth:`glu_parts` makes its activation inside the GPU kernel for that input."""
        if self.prepared is None or self.bias is not None:
            return False
        from jgptq.pallas_kernels import dispatch

        return dispatch.glu_in_kernel(tuple(x_shape), dtype, self.prepared.get_value())

    def glu_parts(self, gu: jax.Array, dtype: Any, acc: jax.Array | None = None, prefetch: Any = None) -> jax.Array:
        """:meth:`parts` of ``x = silu(gate) * up`` (``dtype``) from ``gu = [gate | up]`` ``[..., 2 in]``
        (float32 or ``dtype``); on the GPU decode grids the kernel makes x itself
        (:func:`jgptq.pallas_kernels.dispatch.matmul_glu_parts`), elsewhere XLA does, in fp32."""
        if self.prepared is not None:
            from jgptq.pallas_kernels import dispatch

            return dispatch.matmul_glu_parts(gu, self.prepared.get_value(), dtype, acc=acc,
                                             prefetch=prepared_of(prefetch))
        if acc is not None:
            raise ValueError("QuantLinear.glu_parts: acc given, but this layer has no GPU kernel to take it.")
        from jgptq.pallas_kernels.gptq_matmul_mgpu import glu_activation

        return self.parts(glu_activation(gu, dtype))

    def parts_accumulator(self, x_shape: tuple[int, ...], dtype: Any) -> tuple[int, ...] | None:
        """The float32 ``acc`` shape :meth:`parts` takes for that input, or None (it takes none)."""
        if self.prepared is None:
            return None
        from jgptq.pallas_kernels import dispatch

        return dispatch.parts_accumulator(tuple(x_shape), dtype, self.prepared.get_value())

    def to_params(self) -> dict[str, jax.Array]:
        d = self._lin()
        if self.bias is not None:
            d["bias"] = self.bias[...]
        return d


def prepared_of(module: Any) -> Any:
    """The kernel-prepared weights (``dispatch.Prepared``) of a :class:`QuantLinear` or
    :class:`FusedQuantLinear`, or None (float layers, the XLA path, ``None``): what a matmul's
    ``prefetch`` hint points at."""
    if isinstance(module, FusedQuantLinear):
        module = module.inner
    if isinstance(module, QuantLinear) and module.prepared is not None:
        return module.prepared.get_value()
    return None


def linear_from_params(lin: Mapping[str, Any], *, use_kernel: bool = True) -> Linear | QuantLinear:
    """Build the NNX module for a LIN dict (float → :class:`Linear`, GPTQ → :class:`QuantLinear`)."""
    if is_quantized(lin):
        return QuantLinear(lin, use_kernel=use_kernel)
    return Linear(lin["kernel"], lin.get("bias"))



def _fusable(lins: Sequence[Mapping[str, Any]]) -> bool:
    """Whether :func:`concat_quantized` can join ``lins`` (checks only; copies nothing)."""
    if len(lins) < 2 or not all(is_quantized(l) for l in lins):
        return False
    g0 = np.asarray(lins[0]["g_idx"])
    if len({quant_bits(l) for l in lins}) != 1 or any(
            np.asarray(l["g_idx"]).shape != g0.shape or not np.array_equal(np.asarray(l["g_idx"]), g0)
            for l in lins[1:]):
        return False
    if len({jnp.asarray(l["scales"]).dtype for l in lins}) != 1 or len({l["scales"].shape[0] for l in lins}) != 1:
        return False
    biased = [l.get("bias") is not None for l in lins]
    return all(biased) or not any(biased)


def concat_quantized(lins: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """One quantized LIN whose output columns are ``lins``' side by side, or None when they cannot
    share one matmul: not all quantized, other bit widths, input widths, ``g_idx`` (act-order
    permutations differ unless the layers saw the same Hessian), scale dtypes, or only some
    with a bias.

    Packing is per output column (GPTQ ``qweight`` rows hold input channels), so the parts'
    ``qweight`` / ``scales`` / ``zeros`` concatenate along their last axis exactly.
    """
    if not _fusable(lins):
        return None
    out = {k: jnp.concatenate([jnp.asarray(l[k]) for l in lins], axis=-1) for k in ("qweight", "scales", "zeros")}
    out["g_idx"] = jnp.asarray(lins[0]["g_idx"])
    if lins[0].get("bias") is not None:
        dt = jnp.result_type(*[jnp.asarray(l["bias"]).dtype for l in lins])
        out["bias"] = jnp.concatenate([jnp.asarray(l["bias"]).astype(dt) for l in lins])
    return out


class FusedQuantLinear(nnx.Module):
    """GPTQ linears that read the same input, run as one: ``x -> (x @ W_0 + b_0, x @ W_1 + b_1, ...)``.

    Holds one :class:`QuantLinear` over the concatenated output columns (:func:`concat_quantized`);
    calling it returns the parts' outputs as a tuple, ``to_params()`` the parts' LIN dicts.
    """

    def __init__(self, lins: Sequence[Mapping[str, Any]], *, use_kernel: bool = True):
        cat = concat_quantized(lins)
        if cat is None:
            raise ValueError("these linears cannot be fused: they need equal bits, g_idx, scale dtype and bias presence")
        self.sizes = tuple(int(l["qweight"].shape[1]) for l in lins)
        self.inner = QuantLinear(cat, use_kernel=use_kernel)

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    def concatenated(self, x: jax.Array) -> jax.Array:
        """``x[..., in]`` -> the parts' outputs side by side, ``[..., sum(out_i)]`` (no split)."""
        return self.inner(x)

    @property
    def has_bias(self) -> bool:
        return self.inner.bias is not None

    def parts(self, x: jax.Array, acc: jax.Array | None = None, prefetch: Any = None) -> jax.Array:
        """:meth:`QuantLinear.parts` of the fused matmul: ``[P, ..., sum(out_i)]`` addends, no bias."""
        return self.inner.parts(x, acc=acc, prefetch=prefetch)

    def parts_accumulator(self, x_shape: tuple[int, ...], dtype: Any) -> tuple[int, ...] | None:
        """:meth:`QuantLinear.parts_accumulator` of the fused matmul."""
        return self.inner.parts_accumulator(x_shape, dtype)

    def __call__(self, x: jax.Array, acc: jax.Array | None = None, prefetch: Any = None) -> tuple[jax.Array, ...]:
        """``x[..., in]`` -> one ``[..., out_i]`` per part, in ``x.dtype``. ``acc``: zeros of
        :meth:`parts_accumulator`'s shape for the kernel to add into, ``prefetch``: the module whose
        matmul runs next (either one: through :meth:`parts`)."""
        if acc is None and prefetch is None:
            y = self.inner(x)
        else:
            p = self.inner.parts(x, acc=acc, prefetch=prefetch)
            y = jnp.sum(p.astype(jnp.float32), axis=0).astype(x.dtype)
            y = _add_bias(y, None if self.inner.bias is None else self.inner.bias[...])
        return tuple(jnp.split(y, np.cumsum(self.sizes)[:-1].tolist(), axis=-1))

    def to_params(self) -> list[dict[str, jax.Array]]:
        """The parts' LIN dicts (exact: the columns of the fused tensors)."""
        d = self.inner.to_params()
        bounds = np.cumsum((0, *self.sizes))
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            lin = {k: d[k][..., a:b] for k in ("qweight", "scales", "zeros")}
            lin["g_idx"] = d["g_idx"]
            if "bias" in d:
                lin["bias"] = d["bias"][a:b]
            parts.append(lin)
        return parts


def fuse_quantized(lins: Sequence[Mapping[str, Any]], *, use_kernel: bool = True) -> FusedQuantLinear | None:
    """A :class:`FusedQuantLinear` over ``lins``, or None when they cannot be fused (float layers,
    or quantized ones that differ; see :func:`concat_quantized`)."""
    if not _fusable(lins):
        return None
    return FusedQuantLinear(lins, use_kernel=use_kernel)
