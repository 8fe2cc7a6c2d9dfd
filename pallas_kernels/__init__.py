"""Pallas kernels for GPTQ quantized matmuls (GPU, TPU) and decode attention, each with a plain-jnp reference.

Uses only JAX and NumPy (no jgptq core imports). Modules:

- :mod:`.dispatch` — the contract the models call: ``prepare(lin, *, bits, backend)`` once per
  layer (host side; returns None when no kernel fits, then the caller uses its XLA path),
  ``matmul(x, prepared)`` and ``gptq_qweight(prepared)`` (the GPTQ codes back, exactly).
- :mod:`.repack` — GPTQ LIN -> block-planar kernel layout (act-order permutation applied once,
  K/N padding), :class:`~.repack.PackedGPTQ`.
- :mod:`.gptq_matmul_gpu` — Pallas (Triton lowering) dequant-matmul for CUDA GPUs: ``"dot"``
  and ``"gemv"`` variants, split-K.
- :mod:`.gptq_matmul_mgpu` — Pallas Mosaic GPU (Hopper wgmma) dequant-matmul, 4/8-bit, own layout
  (:func:`~.gptq_matmul_mgpu.pack_mgpu`); what ``dispatch.prepare`` picks on Hopper by default
  (``gpu_kernel="auto"``; the Triton-lowered kernel on other GPUs and for 2-bit).
- :mod:`.persistent_mlp` — a gated MLP's decode step (gate/up, grid barrier, down with
  ``silu(gate) * up`` in its x tiles) as one persistent Mosaic GPU kernel; behind
  ``jgptq.models.llama.PERSISTENT_MLP`` (off until timed on a GPU).
- :mod:`.grid_sync` — the grid-wide counter barrier and proxy fences persistent kernels use.
- :mod:`.gptq_matmul_tpu` — Pallas TPU dequant-matmul (tested in interpret mode).
- :mod:`.decode_attention` — Pallas (Triton lowering) attention of one new token per row over a
  KV cache (grouped-query heads, per-slot validity, sequence splits combined in XLA); what
  ``jgptq.models.llama.forward_step(attention="auto")`` runs on CUDA GPUs.
"""
