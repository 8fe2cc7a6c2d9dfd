"""GPTQ bit packing: integer codes <-> int32 words, in NumPy (export) and inside ``jax.jit``.

Layout (``shared/reference/gptq.md`` §1.4, the AutoGPTQ / GPTQModel / vLLM format): every run of
``L`` consecutive values along the packed axis is one continuous little-endian bit stream of
``L * bits`` bits, value ``j`` at bits ``[bits*j, bits*j + bits)``, cut into ``L * bits / 32``
int32 words. ``L = 32 / bits`` for 2/4/8 bits (one word holds ``32/bits`` values), ``L = 32`` for
3 bits (three words hold 32 values; values 10 and 21 straddle word boundaries). Words are built as
uint32 and reinterpreted as int32 (two's complement).

- ``pack_rows`` / ``unpack_rows``: along the input dimension (rows of the ``[in, out]`` code
  matrix) -- the checkpoint's ``qweight`` ``[in*bits/32, out]``.
- ``pack_cols`` / ``unpack_cols``: along the output dimension (columns) -- ``qzeros``
  ``[G, out*bits/32]``.
- ``dequantize_linear``: the XLA path of the models: packed LIN dict -> float ``[in, out]``.

Every function takes NumPy arrays (and returns NumPy arrays) or JAX arrays (returns JAX arrays,
traceable under ``jit``); the array type of the first argument decides.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)

Array = Any  # np.ndarray | jax.Array


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def run_length(bits: int) -> int:
    """Number of values in one packing run: 32 for 3-bit, ``32 // bits`` otherwise."""
    _check_bits(bits)
    return 32 if bits == 3 else 32 // bits


def _is_numpy(x: Array) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def _to_uint32(x: Array) -> Array:
    """Reinterpret int32 words as uint32 (no value change for uint32 input)."""
    if _is_numpy(x):
        x = np.asarray(x)
        if x.dtype == np.uint32:
            return x
        if x.dtype != np.int32:
            raise TypeError(f"packed words must be int32 (or uint32), got dtype {x.dtype}")
        return x.view(np.uint32)
    if x.dtype == jnp.uint32:
        return x
    if x.dtype != jnp.int32:
        raise TypeError(f"packed words must be int32 (or uint32), got dtype {x.dtype}")
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _to_int32(x: Array) -> Array:
    if _is_numpy(x):
        return np.asarray(x, dtype=np.uint32).view(np.int32)
    return jax.lax.bitcast_convert_type(x, jnp.int32)


@functools.lru_cache(maxsize=None)
def _stream_plan(bits: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """For each word of a run: tuples ``(value index j, shift, direction)``.

    ``direction = +1``: the value's low bits go to this word, shifted left by ``shift``;
    ``direction = -1``: the value's high bits spill into this word, shifted right by ``shift``.
    """
    n_values = run_length(bits)
    n_words = n_values * bits // 32
    plan = []
    for w in range(n_words):
        entries = []
        lo, hi = 32 * w, 32 * w + 32
        for j in range(n_values):
            start, end = bits * j, bits * j + bits
            if end <= lo or start >= hi:
                continue
            if start >= lo:
                entries.append((j, start - lo, +1))
            else:  # the value began in the previous word; its top bits land at bit 0
                entries.append((j, lo - start, -1))
        plan.append(tuple(entries))
    return tuple(plan)


def _pack_axis0(codes: Array, bits: int) -> Array:
    """Pack ``codes[n, m]`` (values in ``[0, 2^bits)``) along axis 0 into int32 ``[n*bits/32, m]``."""
    xp = np if _is_numpy(codes) else jnp
    n, m = codes.shape
    n_values = run_length(bits)
    if n % n_values:
        raise ValueError(
            f"cannot pack {n} values along the packed axis at {bits} bits: the length must be a "
            f"multiple of {n_values} ({'32 values per 3 words' if bits == 3 else f'{n_values} values per word'}); "
            "pad the layer or choose another bit width")
    u = codes.astype(xp.uint32).reshape(n // n_values, n_values, m)
    words = []
    for entries in _stream_plan(bits):
        word = None
        for j, shift, direction in entries:
            v = u[:, j, :]
            part = (v << xp.uint32(shift)) if direction > 0 else (v >> xp.uint32(shift))
            word = part if word is None else (word | part)
        words.append(word)
    packed = xp.stack(words, axis=1).reshape(n * bits // 32, m)
    return _to_int32(packed)


def _unpack_axis0(packed: Array, bits: int, n: int) -> Array:
    """Inverse of :func:`_pack_axis0`: int32 ``[n*bits/32, m]`` -> uint8 ``[n, m]``."""
    xp = np if _is_numpy(packed) else jnp
    n_values = run_length(bits)
    if n % n_values:
        raise ValueError(
            f"cannot unpack {n} values at {bits} bits: the unpacked length must be a multiple of "
            f"{n_values}")
    rows, m = packed.shape
    if rows * 32 != n * bits:
        raise ValueError(
            f"packed array has {rows} words along the packed axis, but {n} values at {bits} bits "
            f"need {n * bits // 32}; check bits and in_features/out_features")
    n_words = n_values * bits // 32
    u = _to_uint32(packed).reshape(n // n_values, n_words, m)
    mask = xp.uint32((1 << bits) - 1)
    values: list[Any] = [None] * n_values
    for w, entries in enumerate(_stream_plan(bits)):
        word = u[:, w, :]
        for j, shift, direction in entries:
            if direction > 0:
                part = word >> xp.uint32(shift)
            else:
                part = word << xp.uint32(shift)
            values[j] = part if values[j] is None else (values[j] | part)
    out = xp.stack([v & mask for v in values], axis=1).reshape(n, m)
    return out.astype(xp.uint8)


def _check_codes(codes: Array, bits: int, what: str) -> None:
    if codes.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(codes.shape)}")
    if _is_numpy(codes):
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"{what} must be an integer array, got dtype {codes.dtype}")
        if codes.size:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi > (1 << bits) - 1:
                raise ValueError(
                    f"{what} must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, "
                    f"got values in [{lo}, {hi}]")
    elif not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"{what} must be an integer array, got dtype {codes.dtype}")


def pack_rows(codes: Array, bits: int) -> Array:
    """Pack integer codes ``[in, out]`` along ``in`` -> int32 ``qweight [in*bits/32, out]``.

    ``in`` must be a multiple of ``32/bits`` (2/4/8-bit) or of 32 (3-bit). NumPy input is
    range-checked (``[0, 2^bits - 1]``); JAX input is taken modulo ``2^bits`` bits-wise unchecked.
    """
    _check_bits(bits)
    _check_codes(codes, bits, "codes")
    if not _is_numpy(codes):
        codes = codes & ((1 << bits) - 1)
    return _pack_axis0(codes, bits)


def unpack_rows(qweight: Array, bits: int, in_features: int) -> Array:
    """Unpack ``qweight [in*bits/32, out]`` (int32) -> uint8 codes ``[in, out]``."""
    _check_bits(bits)
    if qweight.ndim != 2:
        raise ValueError(f"qweight must be 2-D, got shape {tuple(qweight.shape)}")
    return _unpack_axis0(qweight, bits, in_features)


def pack_cols(values: Array, bits: int) -> Array:
    """Pack ``values [G, out]`` along ``out`` -> int32 ``[G, out*bits/32]`` (the ``qzeros`` layout)."""
    _check_bits(bits)
    _check_codes(values, bits, "values")
    if not _is_numpy(values):
        values = values & ((1 << bits) - 1)
    return _pack_axis0(values.T, bits).T


def unpack_cols(packed: Array, bits: int, out_features: int) -> Array:
    """Unpack ``[G, out*bits/32]`` int32 -> uint8 ``[G, out]`` (inverse of :func:`pack_cols`)."""
    _check_bits(bits)
    if packed.ndim != 2:
        raise ValueError(f"packed zeros must be 2-D, got shape {tuple(packed.shape)}")
    return _unpack_axis0(packed.T, bits, out_features).T


def bits_of(lin: Mapping[str, Array]) -> int:
    """Bit width of a packed LIN dict: ``32 * qweight.shape[0] // g_idx.shape[0]`` (DESIGN.md)."""
    in_features = lin["g_idx"].shape[0]
    rows = lin["qweight"].shape[0]
    if in_features == 0 or (32 * rows) % in_features:
        raise ValueError(
            f"inconsistent packed linear: qweight has {rows} rows for {in_features} input "
            "features (g_idx length); expected in_features*bits/32 rows")
    bits = 32 * rows // in_features
    _check_bits(bits)
    return bits


def dequantize_linear(lin: Mapping[str, Array], dtype: Any = jnp.float32) -> jax.Array:
    """Packed LIN dict -> dequantized kernel ``[in, out]`` in ``dtype`` (jit-friendly).

    ``lin`` holds ``qweight`` int32 ``[in*bits/32, out]``, ``scales`` ``[G, out]``, ``zeros``
    uint8 ``[G, out]`` (true zero points) and ``g_idx`` int32 ``[in]``; the result is
    ``(codes - zeros[g_idx]) * scales[g_idx]``, computed in float32 and cast to ``dtype``.
    """
    for key in ("qweight", "scales", "zeros", "g_idx"):
        if key not in lin:
            raise KeyError(f"packed linear is missing {key!r}; it has {sorted(lin)}")
    bits = bits_of(lin)
    g_idx = jnp.asarray(lin["g_idx"])
    in_features = g_idx.shape[0]
    qweight = jnp.asarray(lin["qweight"])
    codes = unpack_rows(qweight, bits, in_features)
    scales = jnp.asarray(lin["scales"])
    zeros = jnp.asarray(lin["zeros"])
    if scales.shape != zeros.shape or scales.shape[1] != qweight.shape[1]:
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
            f"[G, out] with out = {qweight.shape[1]}")
    s = jnp.take(scales.astype(jnp.float32), g_idx, axis=0)
    z = jnp.take(zeros.astype(jnp.float32), g_idx, axis=0)
    return ((codes.astype(jnp.float32) - z) * s).astype(dtype)
