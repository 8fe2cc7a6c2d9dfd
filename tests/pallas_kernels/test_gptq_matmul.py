"""Pallas GPTQ kernels vs independent float64 NumPy transcriptions of GPTQ dequantization.

CPU/CI: every kernel in interpret mode. GPU (``-m gpu``): the same matrix compiled for real,
skipped when no GPU is present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq.pallas_kernels import dispatch, repack
from jgptq.pallas_kernels.gptq_matmul_gpu import GPUConfig, gptq_matmul_gpu, random_gptq_linear
from jgptq.pallas_kernels.gptq_matmul_gpu import reference as gpu_reference
from jgptq.pallas_kernels.gptq_matmul_tpu import TPUConfig, gptq_matmul_tpu
from jgptq.pallas_kernels.gptq_matmul_tpu import reference as tpu_reference

from dequant_reference import np_dequant, rel_err  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"


def make(seed, k, n, bits, gs, act_order):
    lin = random_gptq_linear(jax.random.key(seed), k, n, bits=bits, group_size=gs, act_order=act_order)
    return lin, np_dequant(lin, bits)


# ---------------------------------------------------------------- repacking


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_gptq_qweight_matches_numpy(bits):
    lin, _ = make(1, 256, 40, bits, 64, False)
    codes = np.asarray(repack.unpack_gptq_qweight(lin["qweight"], bits))
    q = np.asarray(lin["qweight"]).view(np.uint32)
    p = 32 // bits
    for j in range(p):
        np.testing.assert_array_equal(codes[j::p], (q >> np.uint32(bits * j)) & ((1 << bits) - 1))


@pytest.mark.parametrize("bits,slab", [(4, 16), (4, 32), (8, 32), (2, 16)])
def test_block_planar_roundtrip_and_layout(bits, slab):
    rng = np.random.default_rng(7)
    k, n = 300, 130
    codes = rng.integers(0, 1 << bits, (k, n))
    p = 32 // bits
    kp = -(-k // (p * slab)) * p * slab
    words = repack.pack_block_planar(jnp.asarray(codes), bits=bits, slab=slab, k_pad=kp, n_pad=256)
    assert words.shape == (kp // p, 256) and words.dtype == jnp.int32
    back = np.asarray(repack.unpack_block_planar(words, bits=bits, slab=slab))
    np.testing.assert_array_equal(back[:k, :n], codes)
    assert not back[k:].any() and not back[:, n:].any()
    # the defining property: field j of word row b*S + r is channel b*P*S + j*S + r
    w = np.asarray(words).view(np.uint32)
    b, r, j, col = 1 if kp > p * slab else 0, 3, p - 1, 5
    kk = b * p * slab + j * slab + r
    if kk < k:
        assert (w[b * slab + r, col] >> (bits * j)) & ((1 << bits) - 1) == codes[kk, col]


def test_analyze_g_idx_act_order_and_refusals():
    rng = np.random.default_rng(3)
    k, gs = 200, 64
    perm = rng.permutation(k)
    inv = np.argsort(perm)
    g_idx = inv // gs  # GPTQ act-order: group of channel k is invperm[k] // gs
    lay = repack.analyze_g_idx(g_idx, 4)
    assert lay.group_size == gs
    np.testing.assert_array_equal(g_idx[lay.perm], np.arange(k) // gs)
    trivial = repack.analyze_g_idx(np.arange(k) // gs, 4)
    assert trivial.perm is None and trivial.group_size == gs
    assert repack.analyze_g_idx(np.zeros(k, np.int32), 1).group_size == k
    uneven = np.repeat(np.arange(3), [10, 20, 10])
    assert repack.analyze_g_idx(uneven, 3) is None
    with pytest.raises(ValueError, match="g_idx must hold group ids"):
        repack.analyze_g_idx(np.full(k, 9), 4)


def test_pack_rejects_bad_inputs():
    lin, _ = make(2, 256, 128, 4, 128, False)
    bad = dict(lin, scales=lin["scales"].at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="NaN or Inf"):
        repack.pack_gptq_linear(bad["qweight"], bad["scales"], bad["zeros"], bad["g_idx"], bits=4, layout="nk")
    with pytest.raises(ValueError, match="qweight must be int32"):
        repack.pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=8, layout="nk")
    with pytest.raises(ValueError, match="layout"):
        repack.pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=4, layout="xy")


# ---------------------------------------------------------------- GPU kernel (interpret)

GPU_CASES = [
    # bits, gs, act_order, K, N, M, variant, split
    (4, 128, False, 576, 192, 1, "dot", 1),   # SmolLM2 K=576: K % 128 != 0, N padded
    (4, 128, True, 576, 128, 3, "dot", 1),    # act-order
    (4, 32, True, 256, 128, 1, "gemv", 2),    # g32, split-K
    (4, 64, False, 1536, 128, 17, "dot", 2),  # K=1536, M not a block multiple
    (4, -1, False, 320, 256, 1, "gemv", 1),   # per-channel
    (8, 128, True, 384, 128, 5, "dot", 1),    # 8-bit act-order
    (8, 64, False, 256, 128, 1, "gemv", 1),
    (4, 64, True, 512, 128, 1, "gemv-kernel-sums", 2),
    (2, 128, False, 512, 128, 2, "dot", 1),
]


@pytest.mark.parametrize("bits,gs,act_order,k,n,m,variant,split", GPU_CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_gpu_kernel_interpret(bits, gs, act_order, k, n, m, variant, split, dtype):
    lin, w64 = make(10 + k + m, k, n, bits, gs, act_order)
    packed = repack.pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=bits, layout="nk")
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(dtype)
    sums = "kernel" if variant.endswith("kernel-sums") else "xla"
    variant = variant.split("-")[0]
    cfg = GPUConfig(variant=variant, block_m=1 if variant == "gemv" else 16, block_n=64, split_k=split, x_sums=sums)
    nb = packed.k_pad // ((32 // bits) * packed.slab)
    if nb % split:
        cfg = GPUConfig(variant=variant, block_m=cfg.block_m, block_n=64, split_k=1, x_sums=sums)
    y = gptq_matmul_gpu(x, packed, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    ref64 = np.asarray(x, np.float64) @ w64
    assert rel_err(y, ref64) < 6e-3  # bf16 output rounding is ~1.5e-3
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(gpu_reference(x, packed), np.float32),
                               rtol=2e-2, atol=2e-2 * float(np.abs(ref64).max()))


def test_gpu_kernel_fp16_and_leading_dims_and_convert_mode():
    lin, w64 = make(5, 512, 128, 4, 128, True)
    packed = repack.pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=4, layout="nk")
    x = jax.random.normal(jax.random.key(1), (2, 3, 512), jnp.float32).astype(jnp.float16)
    ref64 = np.asarray(x, np.float64) @ w64
    for cfg in (GPUConfig(block_n=128), GPUConfig(block_n=128, dequant="convert"),
                GPUConfig(block_n=64, split_k=2, x_sums="kernel")):
        y = gptq_matmul_gpu(x, packed, config=cfg, interpret=True)
        assert y.shape == (2, 3, 128) and y.dtype == jnp.float16
        assert rel_err(y, ref64) < 3e-3


def test_gpu_kernel_validation_errors():
    lin, _ = make(6, 256, 128, 4, 128, False)
    packed = repack.pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=4, layout="nk")
    x = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="K=256"):
        gptq_matmul_gpu(jnp.ones((2, 255), jnp.bfloat16), packed, interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        gptq_matmul_gpu(x.astype(jnp.float32), packed, interpret=True)
    with pytest.raises(ValueError, match="exactly one token"):
        gptq_matmul_gpu(x, packed, config=GPUConfig(variant="gemv", block_m=1), interpret=True)
    with pytest.raises(ValueError, match="x_sums"):
        gptq_matmul_gpu(x, packed, config=GPUConfig(x_sums="gpu"), interpret=True)
    with pytest.raises(ValueError, match="split_k"):
        gptq_matmul_gpu(x, packed, config=GPUConfig(split_k=3), interpret=True)
    kn = repack.pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=4, layout="kn")
    with pytest.raises(ValueError, match="layout 'nk'"):
        gptq_matmul_gpu(x, kn, interpret=True)


# ---------------------------------------------------------------- TPU kernel (interpret)

TPU_CASES = [
    (4, 128, False, 576, 128, 1),
    (4, 128, True, 1536, 256, 20),
    (4, -1, False, 256, 128, 3),
    (8, 64, True, 384, 128, 2),
    (2, 128, False, 512, 128, 1),
]


@pytest.mark.parametrize("bits,gs,act_order,k,n,m", TPU_CASES)
def test_tpu_kernel_interpret(bits, gs, act_order, k, n, m):
    lin, w64 = make(20 + k + m, k, n, bits, gs, act_order)
    packed = repack.pack_gptq_linear(lin["qweight"], lin["scales"], lin["zeros"], lin["g_idx"], bits=bits, layout="kn")
    x = jax.random.normal(jax.random.key(m + 1), (m, k), jnp.float32).astype(jnp.bfloat16)
    y = gptq_matmul_tpu(x, packed, config=TPUConfig(block_m=16, block_n=128), interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    ref64 = np.asarray(x, np.float64) @ w64
    assert rel_err(y, ref64) < 8e-3  # weights are rounded to bf16 before the MXU dot
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(tpu_reference(x, packed), np.float32),
                               rtol=3e-2, atol=2e-2 * float(np.abs(ref64).max()))


# ---------------------------------------------------------------- dispatch


def test_dispatch_contract():
    lin, w64 = make(30, 576, 128, 4, 128, True)
    assert dispatch.prepare(lin, bits=4, backend="cpu") is None
    assert dispatch.prepare(lin, bits=3, backend="gpu") is None
    uneven = dict(lin, g_idx=jnp.asarray(np.repeat(np.arange(5), [200, 100, 100, 100, 76]), jnp.int32))
    assert dispatch.prepare(uneven, bits=4, backend="gpu") is None
    with pytest.raises(ValueError, match="missing"):
        dispatch.prepare({"kernel": jnp.ones((4, 4))}, bits=4, backend="gpu")
    x = jax.random.normal(jax.random.key(3), (2, 576), jnp.float32).astype(jnp.bfloat16)
    ref64 = np.asarray(x, np.float64) @ w64
    for backend in ("gpu", "tpu"):
        prep = dispatch.prepare(lin, bits=4, backend=backend, interpret=True)
        assert prep is not None and prep.in_features == 576 and prep.out_features == 128
        y = jax.jit(dispatch.matmul)(x, prep)  # Prepared is a pytree: passes through jit
        assert rel_err(y, ref64) < 8e-3
    prep = dispatch.prepare(lin, bits=4, backend="gpu", interpret=True, large_m=2)
    assert rel_err(dispatch.matmul(x, prep), ref64) < 8e-3  # XLA large-M path
    y32 = dispatch.matmul(x.astype(jnp.float32), prep)  # fp32 activations: XLA path in fp32
    assert y32.dtype == jnp.float32 and rel_err(y32, ref64) < 1e-5
    with pytest.raises(ValueError, match="value returned by prepare"):
        dispatch.matmul(x, None)


# ---------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,gs,act_order,k,n,dtype", [
    (4, 128, False, 576, 1536, jnp.bfloat16), (4, 128, True, 1536, 576, jnp.bfloat16),
    (4, 32, False, 4096, 4096, jnp.float16), (4, -1, False, 4096, 1024, jnp.bfloat16),
    (8, 128, True, 2048, 1024, jnp.bfloat16), (8, 64, False, 1024, 512, jnp.float16),
    (2, 64, False, 1024, 512, jnp.bfloat16),
])
def test_gpu_kernel_compiled(bits, gs, act_order, k, n, dtype):
    lin, w64 = make(40 + k, k, n, bits, gs, act_order)
    prep = dispatch.prepare(lin, bits=bits, backend="gpu", gpu_kernel="triton")  # not "auto": Hopper picks mgpu
    packed = prep.packed
    for m in (1, 33):
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(dtype)
        ref64 = np.asarray(x, np.float64) @ w64
        cfgs = [None] + ([GPUConfig(variant="gemv", block_m=1, block_n=128)] if m == 1 else [])
        for cfg in cfgs:
            y = jax.jit(lambda x: gptq_matmul_gpu(x, packed, config=cfg))(x)
            assert rel_err(y, ref64) < 6e-3, (m, cfg)
    assert rel_err(dispatch.matmul(x, prep), ref64) < 6e-3  # M=33 through dispatch
