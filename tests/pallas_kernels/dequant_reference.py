"""Independent float64 NumPy references shared by the kernel tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def np_dequant(lin: dict, bits: int) -> np.ndarray:
    """float64 ``W[K, N] = scales[g_idx] * (codes - zeros[g_idx])`` straight from GPTQ tensors."""
    q = np.asarray(lin["qweight"]).view(np.uint32)
    p = 32 // bits
    k = q.shape[0] * p
    codes = np.empty((k, q.shape[1]), np.float64)
    for j in range(p):  # row r holds k = r*p + j at bits [bits*j, bits*j + bits)
        codes[j::p] = (q >> np.uint32(bits * j)) & np.uint32((1 << bits) - 1)
    g = np.asarray(lin["g_idx"])
    s = np.asarray(lin["scales"], np.float64)[g]
    z = np.asarray(lin["zeros"], np.float64)[g]
    return s * (codes - z)


def rel_err(y, ref) -> float:
    """Relative Frobenius error of a kernel output against a float64 reference (NaN/Inf fail)."""
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(y)), "kernel output has NaN/Inf"
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
