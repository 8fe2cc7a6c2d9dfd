"""The uniform quantization grid of GPTQ (``IST-DASLab/gptq:quant.py`` ``Quantizer``), in JAX.

All functions reduce over axis 0 of a ``[rows, out]`` block (rows = input channels of one group,
``out`` = output channels), i.e. one scale/zero per output channel, like the reference's
``perchannel=True`` applied to the ``[out, in]`` PyTorch weight.

Differences from the reference, on purpose:

- scales are rounded to float16 (the checkpoint's storage dtype) as soon as they are found, and the
  zero point is derived from the rounded scale, so the grid used by the GPTQ error feedback is
  exactly the grid stored in the checkpoint (the reference keeps fp32 scales in the loop and
  re-derives the integer codes against fp16 scales while packing);
- the fp16 scale is kept inside ``[2^-24, 65504]`` (the positive fp16 range) so tiny or huge groups
  never divide by zero or overflow; the asym zero point is clipped to ``[0, maxq]`` (only reachable
  through that fp16 rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

FP16_TINY = 2.0 ** -24  # smallest positive float16 (subnormal)
FP16_MAX = 65504.0


class GridParams(NamedTuple):
    """Per-output-channel grid: ``scale`` float32 (fp16-representable) and ``zero`` float32
    (integer-valued, in ``[0, maxq]``), each ``[out]`` (or broadcastable)."""

    scale: jax.Array
    zero: jax.Array


def round_scale(scale: jax.Array) -> jax.Array:
    """Round float32 scales to the nearest float16 value, kept in ``[2^-24, 65504]``; float32 out."""
    s = jnp.clip(scale, FP16_TINY, FP16_MAX).astype(jnp.float16).astype(jnp.float32)
    return jnp.maximum(s, FP16_TINY)


def _range(w: jax.Array, sym) -> tuple[jax.Array, jax.Array]:
    """Reference ``find_params`` range over axis 0: ``[xmin, xmax]`` always containing 0."""
    xmin = jnp.minimum(jnp.min(w, axis=0), 0.0)
    xmax = jnp.maximum(jnp.max(w, axis=0), 0.0)
    xmax = jnp.where(sym, jnp.maximum(jnp.abs(xmin), xmax), xmax)
    xmin = jnp.where(sym & (xmin < 0), -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(dead, -1.0, xmin)
    xmax = jnp.where(dead, 1.0, xmax)
    return xmin, xmax


def _params_from_range(xmin: jax.Array, xmax: jax.Array, maxq, sym) -> GridParams:
    scale = round_scale((xmax - xmin) / maxq)
    zero = jnp.where(sym, (maxq + 1) / 2, jnp.clip(jnp.round(-xmin / scale), 0.0, maxq))
    return GridParams(scale, jnp.broadcast_to(zero, scale.shape).astype(jnp.float32))


def _maxq(bits: int) -> float:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
    return float((1 << bits) - 1)


def quantize_codes(w: jax.Array, params: GridParams, bits: int) -> jax.Array:
    """Integer codes (float32, integer-valued) ``clip(round(w / scale) + zero, 0, maxq)``."""
    return codes_for_maxq(w, params, _maxq(bits))


def codes_for_maxq(w: jax.Array, params: GridParams, maxq) -> jax.Array:
    """:func:`quantize_codes` with ``maxq = 2^bits - 1`` given directly (may be traced)."""
    return jnp.clip(jnp.round(w / params.scale) + params.zero, 0.0, maxq)


def dequantize_codes(codes: jax.Array, params: GridParams) -> jax.Array:
    """``scale * (codes - zero)`` in float32."""
    return params.scale * (codes - params.zero)


def quantize(w: jax.Array, params: GridParams, bits: int) -> jax.Array:
    """Fake-quantize: the grid point the reference's ``quantize(x, scale, zero, maxq)`` returns."""
    return dequantize_codes(quantize_codes(w, params, bits), params)


def find_params(w: jax.Array, bits: int, sym: bool, *, mse: float = 0.0, norm: float = 2.4,
                grid: int = 100, maxshrink: float = 0.8) -> GridParams:
    """Grid parameters for ``w [rows, out]`` (reduced over rows) -> ``GridParams`` of ``[out]``.

    Min/max grid of the reference; with ``mse > 0`` the reference's clip search: shrink the range
    by ``p = 1 - i/grid`` for ``i < maxshrink*grid`` and keep, per output channel, the ``p`` with
    the smallest ``sum |quantize(w) - w|^norm`` (first minimum wins; sym keeps the zero fixed).
    Zero rows of ``w`` never change the result (the range always contains 0 and 0 is on the grid).
    """
    return find_params_maxq(w, _maxq(bits), sym, mse=mse, norm=norm, grid=grid,
                            maxshrink=maxshrink)


def find_params_maxq(w: jax.Array, maxq, sym, *, mse: float = 0.0, norm: float = 2.4,
                     grid: int = 100, maxshrink: float = 0.8) -> GridParams:
    """:func:`find_params` with ``maxq`` and ``sym`` as values (they may be traced arrays)."""
    w = w.astype(jnp.float32)
    xmin, xmax = _range(w, sym)
    best = _params_from_range(xmin, xmax, maxq, sym)
    if not mse:
        return best
    steps = int(maxshrink * grid)

    def body(i, carry):
        best_err, scale, zero = carry
        p = 1.0 - i.astype(jnp.float32) / grid
        cand = _params_from_range(p * xmin, p * xmax, maxq, sym)
        q = dequantize_codes(codes_for_maxq(w, cand, maxq), cand)
        err = jnp.sum(jnp.abs(q - w) ** norm, axis=0)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, cand.scale, scale),
                jnp.where(better, cand.zero, zero))

    init = (jnp.full(xmin.shape, jnp.inf, jnp.float32), best.scale, best.zero)
    _, scale, zero = jax.lax.fori_loop(0, steps, body, init)
    return GridParams(scale, zero)
