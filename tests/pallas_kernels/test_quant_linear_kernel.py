"""The Flax quantized linear gives the same output through the Pallas kernel and the XLA fallback.

No GPU here, so ``dispatch.prepare`` is patched to pick the GPU (then TPU) kernel in interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jgptq.pallas_kernels import dispatch
from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

quant_linear = pytest.importorskip("jgptq.models.quant_linear")


@pytest.mark.parametrize("backend,act_order,gpu_kernel,bits", [
    ("gpu", True, "triton", 4), ("tpu", False, None, 4), ("gpu", True, "mgpu", 4), ("gpu", False, "mgpu", 8),
    ("gpu", True, "triton", 2),
])
def test_quant_linear_kernel_matches_fallback(monkeypatch, backend, act_order, gpu_kernel, bits):
    lin = random_gptq_linear(jax.random.key(11), 576, 192, bits=bits, group_size=128, act_order=act_order)
    lin["bias"] = jax.random.normal(jax.random.key(12), (192,), jnp.float32).astype(jnp.float16)
    real_prepare = dispatch.prepare
    target = backend
    calls = []

    def forced(lin_, *, bits, backend=None, **kw):
        calls.append(bits)
        kw = {} if gpu_kernel is None else {"gpu_kernel": gpu_kernel}
        return real_prepare(lin_, bits=bits, backend=target, interpret=True, **kw)

    monkeypatch.setattr(dispatch, "prepare", forced)
    with_kernel = quant_linear.QuantLinear(lin)
    fallback = quant_linear.QuantLinear(lin, use_kernel=False)
    assert calls == [bits] and with_kernel.prepared is not None and fallback.prepared is None
    # one copy of the codes on the device: the kernel layout's; qweight is rebuilt exactly for export
    assert with_kernel.qweight is None and fallback.qweight is not None
    back = with_kernel.to_params()
    assert sorted(back) == sorted(lin)
    for key in lin:
        np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(lin[key]))
        assert back[key].dtype == lin[key].dtype
    kept = sum(x.nbytes for x in jax.tree.leaves(nnx.state(with_kernel, quant_linear.QuantState)))
    assert kept < lin["qweight"].nbytes / 4  # scales, zeros, g_idx only
    x = jax.random.normal(jax.random.key(13), (2, 3, 576), jnp.float32).astype(jnp.bfloat16)
    y_k = np.asarray(with_kernel(x), np.float32)
    y_f = np.asarray(fallback(x), np.float32)
    assert y_k.shape == (2, 3, 192)
    scale = float(np.abs(y_f).max())
    np.testing.assert_allclose(y_k, y_f, rtol=2e-2, atol=1.5e-2 * scale)
    rel = np.linalg.norm(y_k - y_f) / np.linalg.norm(y_f)
    assert rel < 1e-2, rel
