"""Pallas kernels for quantized matmuls (GPU Mosaic, TPU), each with a plain-jnp reference."""
