"""Pallas kernels for GPTQ quantized matmuls (GPU, TPU), each with a plain-jnp reference.

Uses only JAX and NumPy (no jgptq core imports). Modules:

- :mod:`.dispatch` — the contract the models call: ``prepare(lin, *, bits, backend)`` once per
  layer (host side; returns None when no kernel fits, then the caller uses its XLA path) and
  ``matmul(x, prepared)``.
- :mod:`.repack` — GPTQ LIN -> block-planar kernel layout (act-order permutation applied once,
  K/N padding), :class:`~.repack.PackedGPTQ`.
- :mod:`.gptq_matmul_gpu` — Pallas (Triton lowering) dequant-matmul for CUDA GPUs: ``"dot"``
  and ``"gemv"`` variants, split-K.
- :mod:`.gptq_matmul_tpu` — Pallas TPU dequant-matmul (tested in interpret mode).
"""
