"""Residual add + RMSNorm kernel (``pallas_kernels.add_rms_norm``) vs a float64 NumPy transcription.

CPU / CI: the Pallas interpreter on fresh random inputs (hidden sizes that are and are not powers
of two, one and several rows per program, a linear's output in the compute dtype or fp32, or its
split-K addends); the compiled path lowered to Triton IR for CUDA. GPU (``-m gpu``): the
Triton-compiled kernel on Llama-2-7B and SmolLM2 widths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq.pallas_kernels import add_rms_norm as arn

ON_GPU = jax.default_backend() == "gpu"


def np_add_rms_norm(y, residual, scale, eps, dtype):
    """float64 transcription, rounding to ``dtype`` exactly where the model does: the linear's
    output, the residual sum, the normalised value and the scaled product."""
    rnd = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(dtype), np.float64)  # noqa: E731
    y = np.asarray(y, np.float64)
    if y.ndim == np.ndim(residual) + 1:
        y = y.sum(axis=0)
    h = rnd(np.asarray(residual, np.float64) + rnd(y))
    yn = rnd(h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps))
    return h, rnd(np.asarray(scale, np.float64) * yn)


def _inputs(seed, lead, d, n_parts, dtype, y_dtype=None):
    rng = np.random.default_rng(seed)
    shape = (n_parts, *lead, d) if n_parts else (*lead, d)
    y = jnp.asarray(rng.standard_normal(shape) * 3, y_dtype or (jnp.float32 if n_parts else dtype))
    res = jnp.asarray(rng.standard_normal((*lead, d)) * 2, dtype)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(d), dtype)
    return y, res, scale


def _check(got, want, dtype, rel_ulps=1):
    """Equal up to ``rel_ulps`` units in the last place of ``dtype`` (the fp32 sums' order)."""
    eps = float(jnp.finfo(dtype).eps)
    for g, w in zip(got, want):
        g = np.asarray(g, np.float64)
        assert g.shape == w.shape and np.isfinite(g).all()
        if dtype == jnp.float32:  # no rounding step to match: fp32 against float64 throughout
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
            continue
        tol = rel_ulps * eps * np.maximum(np.abs(w), 1e-30) + 1e-30
        bad = np.abs(g - w) > tol
        # a last-bit difference in rare values (the kernel's and NumPy's sums run in other orders)
        assert bad.mean() <= 1e-3, (bad.sum(), np.abs(g - w).max())
        assert np.allclose(g, w, rtol=4 * eps, atol=0), np.abs(g - w).max()


@pytest.mark.parametrize("lead,d,n_parts,dtype,cfg", [
    ((1,), 4096, 0, jnp.bfloat16, None),                                 # 7B decode, linear output
    ((1, 1), 4096, 8, jnp.bfloat16, None),                               # o_proj's 8 split-K partials
    ((3,), 576, 22, jnp.bfloat16, None),                                 # SmolLM2 width, 22 addends
    ((2, 5), 576, 0, jnp.float16, arn.AddRmsNormConfig(rows_per_program=4)),  # rows past M masked
    ((7,), 300, 3, jnp.float32, arn.AddRmsNormConfig(rows_per_program=2, num_warps=2)),
])
def test_matches_float64_reference(lead, d, n_parts, dtype, cfg):
    y, res, scale = _inputs(d + n_parts, lead, d, n_parts, dtype)
    got = arn.add_rms_norm(y, res, scale, 1e-5, config=cfg, interpret=True)
    assert all(g.dtype == dtype and g.shape == res.shape for g in got)
    _check(got, np_add_rms_norm(y, res, scale, 1e-5, dtype), dtype)


def test_fp32_linear_output_is_rounded_first():
    """A TMA-reduced fp32 output is rounded to the compute dtype before the residual add."""
    y, res, scale = _inputs(3, (4,), 1024, 0, jnp.bfloat16, y_dtype=jnp.float32)
    got = jax.jit(lambda *a: arn.add_rms_norm(*a, 1e-6, interpret=True))(y, res, scale)
    _check(got, np_add_rms_norm(y, res, scale, 1e-6, jnp.bfloat16), jnp.bfloat16)


def test_matches_the_model_ops():
    """The reference is the model's own residual add and rms_norm."""
    from jgptq.models.llama import rms_norm

    y, res, scale = _inputs(5, (2, 1), 576, 4, jnp.bfloat16)
    h, x = arn.add_rms_norm(y, res, scale, 1e-5, interpret=True)
    h_ref = res + jnp.sum(y, axis=0).astype(res.dtype)
    _check((h, x), (np.asarray(h_ref, np.float64), np.asarray(rms_norm(scale, h_ref, 1e-5), np.float64)),
           jnp.bfloat16)


@pytest.mark.parametrize("args,match", [
    (dict(y=(2, 8), res=(2, 16)), "neither the residual's shape"),
    (dict(y=(70, 2, 8), res=(2, 8)), "70 addends"),
    (dict(scale=(9,)), r"scale must be \[8\]"),
    (dict(eps=0.0), "eps must be"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(dtype=jnp.int32), "compute dtype"),
    (dict(cfg=arn.AddRmsNormConfig(rows_per_program=3)), "powers of two"),
])
def test_bad_input_is_rejected(args, match):
    dt = args.get("dtype", jnp.bfloat16)
    y = jnp.ones(args.get("y", (2, 8)), jnp.float32)
    res = jnp.ones(args.get("res", (2, 8)), dt)
    scale = jnp.ones(args.get("scale", (8,)), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        arn.add_rms_norm(y, res, scale, args.get("eps", 1e-5), config=args.get("cfg"), interpret=True)


@pytest.mark.parametrize("n_parts", [0, 8, 22])
def test_lowers_to_triton_for_cuda(n_parts):
    """The compiled path (not the interpreter) lowers to Triton IR on any machine."""
    sds = jax.ShapeDtypeStruct
    for m, d in ((1, 4096), (16, 576)):
        y = sds((n_parts, m, d), jnp.float32) if n_parts else sds((m, d), jnp.bfloat16)
        f = jax.jit(lambda *a: arn.add_rms_norm(*a, 1e-5))
        low = f.trace(y, sds((m, d), jnp.bfloat16), sds((d,), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
        assert "add_rms_norm" in low.as_text()


def test_zero_programs():
    """The zero outputs get their own programs after the row programs: one per 8192 values, at
    most 64 (a decode step's single row program would otherwise write all of them)."""
    assert arn.zero_programs(()) == 0
    assert arn.zero_programs((1,)) == 1
    assert arn.zero_programs((8192,)) == 1 and arn.zero_programs((8192, 1)) == 2
    assert arn.zero_programs((4100, 40000)) == 6
    assert arn.zero_programs((304 * 4096,)) == arn.MAX_ZERO_PROGRAMS == 64


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,d,n_parts", [(1, 4096, 0), (1, 4096, 8), (16, 4096, 22), (5, 576, 4), (300, 4096, 0)])
def test_compiled_on_gpu(m, d, n_parts):
    y, res, scale = _inputs(m * d + n_parts, (m,), d, n_parts, jnp.bfloat16)
    got = jax.jit(lambda *a: arn.add_rms_norm(*a, 1e-5))(y, res, scale)
    _check(got, np_add_rms_norm(y, res, scale, 1e-5, jnp.bfloat16), jnp.bfloat16)


@pytest.mark.parametrize("m,shapes", [(1, [(1, 1, 4100), (1, 1, 40000)]), (5, [(1, 8, 96), (3,)]),
                                      (300, [(1, 304, 4096)])])
def test_zeros_outputs(m, shapes):
    """zeros=: the kernel also writes float32 zero arrays of those shapes (the interpreter starts
    outputs as NaN, so an unwritten element shows); h and x stay what they are without them."""
    d = 96
    y, res, scale = _inputs(m * 7 + len(shapes), (m,), d, 0, jnp.bfloat16)
    h, x, zs = arn.add_rms_norm(y, res, scale, 1e-5, zeros=shapes, interpret=True)
    h0, x0 = arn.add_rms_norm(y, res, scale, 1e-5, interpret=True)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h0, np.float32))
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(x0, np.float32))
    assert [z.shape for z in zs] == [tuple(s) for s in shapes] and all(z.dtype == jnp.float32 for z in zs)
    for z in zs:
        a = np.asarray(z)
        assert np.isfinite(a).all() and not a.any()
    with pytest.raises(ValueError, match="every dimension"):
        arn.add_rms_norm(y, res, scale, 1e-5, zeros=[(4, 0)], interpret=True)
    with pytest.raises(ValueError, match="sequence of shapes"):
        arn.add_rms_norm(y, res, scale, 1e-5, zeros=[5], interpret=True)
    sds = jax.ShapeDtypeStruct
    low = jax.jit(lambda *a: arn.add_rms_norm(*a, 1e-5, zeros=shapes)).trace(
        sds(y.shape, y.dtype), sds(res.shape, res.dtype), sds(scale.shape, scale.dtype)).lower(lowering_platforms=("cuda",))
    assert "add_rms_norm" in low.as_text()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_zeros_outputs_compiled_on_gpu():
    """On the GPU the zero outputs are fresh (uninitialised) buffers: every element must be written.
    Dirty the allocator first so that unwritten memory would show."""
    junk = [jnp.full((1 << 20,), jnp.nan, jnp.float32) + i for i in range(8)]
    jax.block_until_ready(junk)
    del junk
    for m, shapes in ((1, [(1, 1, 12288), (1, 1, 4096)]), (16, [(1, 16, 22016), (1, 16, 4096)])):
        y, res, scale = _inputs(m + 3, (m,), 4096, 0, jnp.bfloat16)
        h, x, zs = jax.jit(lambda *a: arn.add_rms_norm(*a, 1e-5, zeros=shapes))(y, res, scale)
        _check((h, x), np_add_rms_norm(y, res, scale, 1e-5, jnp.bfloat16), jnp.bfloat16)
        for z, s in zip(zs, shapes):
            a = np.asarray(z)
            assert a.shape == s and np.isfinite(a).all() and not a.any()
