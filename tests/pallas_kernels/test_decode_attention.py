"""Decode attention kernel (``pallas_kernels.decode_attention``) vs a float64 NumPy transcription.

CPU / CI: the Pallas interpreter on fresh random inputs (GQA and MHA, several tiles and splits,
left padding and holes in the valid slots, the query's slot anywhere in the cache). GPU
(``-m gpu``): the Triton-compiled kernel on Llama-2-7B decode shapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq.pallas_kernels import decode_attention as da

ON_GPU = jax.default_backend() == "gpu"


def np_attention(q, kc, vc, valid, index) -> np.ndarray:
    """float64 loop-free transcription: per (row, query head) softmax over the allowed slots."""
    q, kc, vc = (np.asarray(a, np.float64) for a in (q, kc, vc))
    b, h, hd = q.shape
    s, kvh = kc.shape[1], kc.shape[2]
    g = h // kvh
    out = np.zeros((b, h, hd))
    for bi in range(b):
        allowed = np.asarray(valid[bi], bool) & (np.arange(s) <= index)
        if not allowed.any():
            continue
        for hi in range(h):
            kv = hi // g
            sc = kc[bi, allowed, kv] @ q[bi, hi] / math.sqrt(hd)
            p = np.exp(sc - sc.max())
            out[bi, hi] = (p / p.sum()) @ vc[bi, allowed, kv]
    return out


def _inputs(seed, b, h, kvh, hd, s, dtype=jnp.bfloat16, holes=True):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, hd)) * 2
    kc = rng.standard_normal((b, s, kvh, hd))
    vc = rng.standard_normal((b, s, kvh, hd))
    valid = np.ones((b, s), bool)
    for bi in range(b):  # left padding of a different length per row, and some holes
        valid[bi, : rng.integers(0, s // 3)] = False
        if holes:
            valid[bi, rng.integers(0, s, size=s // 8)] = False
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    # the reference sees exactly the rounded inputs the kernel sees
    return cast(q), cast(kc), cast(vc), jnp.asarray(valid)


def _check(out, q, kc, vc, valid, index, tol=2e-2):
    want = np_attention(np.asarray(q, np.float32), np.asarray(kc, np.float32), np.asarray(vc, np.float32),
                        np.asarray(valid), index)
    got = np.asarray(out, np.float64)
    assert got.shape == want.shape and got.dtype != np.object_
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err < tol, err


@pytest.mark.parametrize("b,h,kvh,hd,s,index,cfg", [
    (1, 4, 4, 64, 64, 37, da.DecodeAttentionConfig(block_s=16)),               # MHA, 3 partial steps
    (2, 6, 2, 16, 96, 95, da.DecodeAttentionConfig(block_s=32)),              # G = 3 (SmolLM2-like), last slot
    (3, 8, 2, 64, 128, 70, da.DecodeAttentionConfig(block_s=16, splits=4)),   # splits, some past index
    (2, 16, 2, 32, 192, 191, da.DecodeAttentionConfig(block_s=32, splits=3)),  # G = 8, 3 splits
    (1, 2, 1, 128, 48, 0, da.DecodeAttentionConfig(block_s=16, splits=3)),    # index 0: one slot at most
    (2, 4, 2, 64, 256, 200, None),                                            # default config
])
def test_matches_float64_reference(b, h, kvh, hd, s, index, cfg):
    q, kc, vc, valid = _inputs(b * 1000 + s + index, b, h, kvh, hd, s)
    valid = valid.at[:, index].set(True)  # the new token's own slot is valid, as in decoding
    out = da.decode_attention(q, kc, vc, valid, index, config=cfg, interpret=True)
    assert out.dtype == q.dtype
    _check(out, q, kc, vc, valid, index)
    np.testing.assert_allclose(np.asarray(da.reference(q, kc, vc, valid, index), np.float32),
                               np.asarray(out, np.float32), atol=3e-2, rtol=3e-2)


def test_float16_and_traced_index():
    q, kc, vc, valid = _inputs(7, 2, 4, 2, 64, 64, dtype=jnp.float16)
    f = jax.jit(lambda q, kc, vc, valid, i: da.decode_attention(q, kc, vc, valid, i, interpret=True))
    for index in (5, 63):
        out = f(q, kc, vc, valid, jnp.int32(index))
        assert out.dtype == jnp.float16
        _check(out, q, kc, vc, valid, index)


def test_rows_without_an_allowed_slot_are_zero():
    q, kc, vc, valid = _inputs(3, 3, 4, 2, 64, 64, holes=False)
    valid = valid.at[1].set(False).at[2, :20].set(False)  # row 1: nothing valid; row 2: nothing <= 10
    for cfg in (da.DecodeAttentionConfig(block_s=16), da.DecodeAttentionConfig(block_s=16, splits=2)):
        out = np.asarray(da.decode_attention(q, kc, vc, valid, 10, config=cfg, interpret=True), np.float32)
        assert (out[1] == 0).all() and (out[2] == 0).all()
        _check(out, q, kc, vc, valid, 10)


def test_default_config_splits_long_caches_only():
    assert da.default_config(1, 32, 256, num_sms=132) == da.DecodeAttentionConfig(block_s=64, splits=1)
    long = da.default_config(1, 32, 4096, num_sms=132)
    assert long.block_s == 64 and long.splits == 16 and 4096 // 64 // long.splits >= 4
    assert da.default_config(16, 32, 4096, num_sms=132).splits == 1  # 512 programs already
    assert da.default_config(1, 8, 80, num_sms=132).block_s == 16  # largest power of two dividing 80


@pytest.mark.parametrize("args,match", [
    (dict(dtype=jnp.float32), "dtype float32"),
    (dict(hd=48), "head_dim=48"),
    (dict(s=40), "40 cache slots"),
    (dict(h=6, kvh=4), "not a multiple"),
    (dict(cfg=da.DecodeAttentionConfig(block_s=16, splits=3)), "splits=3"),
    (dict(cfg=da.DecodeAttentionConfig(block_s=24)), "block_s=24"),
    (dict(valid_shape=(2, 32)), "k_valid must be"),
])
def test_bad_input_is_rejected(args, match):
    h, kvh, hd, s = args.get("h", 4), args.get("kvh", 2), args.get("hd", 64), args.get("s", 64)
    q, kc, vc, valid = _inputs(0, 2, h, kvh, hd, s, dtype=args.get("dtype", jnp.bfloat16))
    if "valid_shape" in args:
        valid = jnp.ones(args["valid_shape"], bool)
    with pytest.raises(ValueError, match=match):
        da.decode_attention(q, kc, vc, valid, 3, config=args.get("cfg"), interpret=True)


def test_mismatched_cache_is_rejected():
    q, kc, vc, valid = _inputs(0, 2, 4, 2, 64, 64)
    with pytest.raises(ValueError, match="must match"):
        da.decode_attention(q, kc, vc[:, :16], valid, 3, interpret=True)
    with pytest.raises(ValueError, match="in q's dtype"):
        da.decode_attention(q, kc.astype(jnp.float16), vc, valid, 3, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("b,kvh,s,index", [(1, 32, 256, 100), (16, 32, 256, 255), (1, 32, 4096, 3000),
                                           (4, 8, 2048, 1500)])
def test_compiled_on_gpu(b, kvh, s, index):
    h = 32
    q, kc, vc, valid = _inputs(11, b, h, kvh, 128, s)
    valid = valid.at[:, index].set(True)
    out = jax.jit(da.decode_attention)(q, kc, vc, valid, jnp.int32(index))
    _check(out, q, kc, vc, valid, index)


def test_auto_picks_the_kernel_on_nvidia_sm80_and_newer_only(monkeypatch):
    """dispatch.cuda_major reads the device's compute capability; the models' attention="auto"
    takes the kernel from 8.0 on (and the matmul dispatch the Mosaic kernel on 9.x)."""
    import types

    from jgptq.models.config import LlamaConfig
    from jgptq.models.llama import _use_decode_kernel
    from jgptq.pallas_kernels import dispatch

    cfg = LlamaConfig(model_type="llama", vocab_size=8, hidden_size=128, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=64)
    q = jnp.zeros((1, 1, 2, 64), jnp.bfloat16)
    kc = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    for platform, cc, major in (("gpu", "9.0", 9), ("gpu", "8.6", 8), ("gpu", "7.5", 7), ("gpu", "gfx90a", None),
                                ("cpu", "", None)):
        monkeypatch.setattr(jax, "devices", lambda p=platform, c=cc: [types.SimpleNamespace(platform=p,
                                                                                            compute_capability=c)])
        assert dispatch.cuda_major() == major
        assert dispatch._auto_gpu_kernel() == ("mgpu" if major == 9 else "triton")
        assert _use_decode_kernel("auto", q, kc, cfg) == (major is not None and major >= 8), (platform, cc)
        assert _use_decode_kernel("xla", q, kc, cfg) is False
        assert _use_decode_kernel("pallas", q, kc, cfg) is True
