"""Kernel dispatch for GPTQ quantized linears: ``prepare`` once at model build, ``matmul`` per call.

Contract used by ``jgptq.models`` (see DESIGN.md, "LIN (quantized)"):

* ``prepare(lin, *, bits, backend)`` runs on the host once per layer. ``lin`` is the GPTQ LIN dict
  (``qweight`` int32 ``[K*bits/32, N]`` GPTQ row packing, ``scales`` ``[G, N]``, ``zeros`` uint8
  ``[G, N]`` true zero points, ``g_idx`` int32 ``[K]``). It returns the kernel's own prepared
  pytree, or ``None`` when no kernel fits this backend / bits / shape; the caller then uses its XLA
  dequantize path.
* ``matmul(x, prepared)`` computes ``x[..., K] @ dequant(W)[K, N] -> [..., N]`` in ``x.dtype``;
  it applies the act-order permutation of ``x`` itself.

This first version returns ``None`` everywhere (no kernel yet); kernels are added behind it.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

__all__ = ["prepare", "matmul"]


def prepare(lin: Mapping[str, Any], *, bits: int, backend: str | None = None) -> Any | None:
    """Repack a GPTQ LIN dict into a kernel layout, or return None when no kernel fits.

    Args:
      lin: GPTQ LIN dict (see module docstring). Extra keys (``bias``) are ignored.
      bits: code width (2, 3, 4 or 8).
      backend: ``"gpu"``, ``"tpu"`` or ``"cpu"``; default ``jax.default_backend()``.

    Returns:
      A prepared pytree for :func:`matmul`, or ``None`` (use the XLA path).
    """
    del lin, bits, backend
    return None


def matmul(x: jax.Array, prepared: Any) -> jax.Array:
    """``x[..., K] @ W[K, N] -> [..., N]`` with the kernel chosen by :func:`prepare`."""
    raise ValueError(
        "pallas_kernels.dispatch.matmul got a prepared value but no kernel is implemented yet; "
        f"prepare() returns None in this version (got {type(prepared).__name__}). Use the XLA path."
    )
