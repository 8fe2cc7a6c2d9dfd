"""Decode attention kernel (``pallas_kernels.decode_attention``) vs a float64 NumPy transcription.

CPU / CI: the Pallas interpreter on fresh random inputs (GQA and MHA, several tiles and splits,
left padding and holes in the valid slots, the query's slot anywhere in the cache). GPU
(``-m gpu``): the Triton-compiled kernel on Llama-2-7B decode shapes.
"""

from __future__ import annotations

import dataclasses
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
    # fewer programs than SMs: 128-slot steps (batch 1 of a 7B model: 32 programs)
    assert da.default_config(1, 32, 256, num_sms=132) == da.DecodeAttentionConfig(block_s=128, splits=1)
    # at least two programs per SM and no split: 32-slot steps (batch 16 of a 7B model: 512 programs)
    assert da.default_config(16, 32, 256, num_sms=132) == da.DecodeAttentionConfig(block_s=32, splits=1)
    assert da.default_config(9, 32, 256, num_sms=132).block_s == 32  # 288 programs >= 2 x 132 ...
    assert da.default_config(8, 32, 256, num_sms=132).block_s == 64  # ... 256 are not
    assert da.default_config(16, 32, 48, num_sms=132).block_s == 16  # 48 slots: 16 divides, 32 does not
    assert da.default_config(4, 32, 256, num_sms=132).block_s == 128  # 128 programs on 132 SMs
    assert da.default_config(5, 32, 256, num_sms=132).block_s == 64  # 160 programs on 132 SMs ...
    assert da.default_config(5, 32, 256, num_sms=192).block_s == 128  # ... and on 192
    long = da.default_config(1, 32, 4096, num_sms=132)  # split 16 ways: 512 programs, 64-slot steps
    assert long.block_s == 64 and long.splits == 16 and 4096 // 64 // long.splits >= 4
    assert da.default_config(16, 32, 4096, num_sms=132) == da.DecodeAttentionConfig(block_s=32, splits=1)
    assert da.default_config(1, 8, 80, num_sms=132).block_s == 16  # largest power of two dividing 80
    assert da.default_config(1, 8, 192, num_sms=132).block_s == 64  # 192 slots: no whole 128-slot steps
    # a forced split count takes the same slot-step rule
    assert da.default_config(1, 32, 256, num_sms=132, splits=4) == da.DecodeAttentionConfig(block_s=64, splits=4)
    assert da.default_config(1, 32, 256, num_sms=132, splits=2) == da.DecodeAttentionConfig(block_s=128, splits=2)
    assert da.default_config(8, 32, 256, num_sms=132, splits=2).block_s == 64  # 512 programs
    with pytest.raises(ValueError, match="splits=3 must divide the 4 steps of 64 slots"):
        da.default_config(1, 32, 256, num_sms=132, splits=3)


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
    takes the fused kernel from 8.0 on (the unfused one where only that applies), and the matmul
    dispatch the Mosaic kernel on 9.x."""
    import types

    from jgptq.models.config import LlamaConfig
    from jgptq.models.llama import _decode_path
    from jgptq.pallas_kernels import dispatch

    cfg = LlamaConfig(model_type="llama", vocab_size=8, hidden_size=128, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=64)
    x = jnp.zeros((1, 1, 128), jnp.bfloat16)
    kc = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    kc32 = kc.astype(jnp.float32)  # an fp32 cache under bf16 activations: only the unfused kernel
    for platform, cc, major in (("gpu", "9.0", 9), ("gpu", "8.6", 8), ("gpu", "7.5", 7), ("gpu", "gfx90a", None),
                                ("cpu", "", None)):
        monkeypatch.setattr(jax, "devices", lambda p=platform, c=cc: [types.SimpleNamespace(platform=p,
                                                                                            compute_capability=c)])
        assert dispatch.cuda_major() == major
        assert dispatch._auto_gpu_kernel() == ("mgpu" if major == 9 else "triton")
        new_gpu = major is not None and major >= 8
        assert _decode_path("auto", x, kc, cfg) == ("fused" if new_gpu else "xla"), (platform, cc)
        assert _decode_path("auto", x, kc32, cfg) == ("pallas" if new_gpu else "xla"), (platform, cc)
        assert _decode_path("xla", x, kc, cfg) == "xla"
        assert _decode_path("pallas", x, kc, cfg) == "pallas"
        assert _decode_path("pallas", x, kc32, cfg) == "pallas"
        assert _decode_path("fused", x, kc, cfg) == "fused"
        with pytest.raises(ValueError, match="float32 cache"):
            _decode_path("fused", x, kc32, cfg)
    small = dataclasses.replace(cfg, hidden_size=32, head_dim=16)  # RoPE halves of 8: unfused kernel only
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(platform="gpu", compute_capability="9.0")])
    assert _decode_path("auto", x[..., :32], kc[..., :16], small) == "pallas"
    with pytest.raises(ValueError, match="head_dim >= 32"):
        _decode_path("fused", x[..., :32], kc[..., :16], small)


# ---------------------------------------------------------------------------------------------
# decode_attention_update: RoPE + the in-place cache write + attention
# ---------------------------------------------------------------------------------------------
def np_rope_halves(x, cos, sin):
    """float64 rotate-half RoPE of ``x [..., hd]`` with ``cos/sin [..., hd/2]`` (broadcast)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _update_inputs(seed, b, h, kvh, hd, s, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.standard_normal((b, h + 2 * kvh, hd)) * 2, dtype)
    _, kc, vc, valid = _inputs(seed + 1, b, h, kvh, hd, s, dtype=dtype)
    pos = rng.integers(0, 3000, size=b)  # each row's token position (left padding: they differ)
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    ang = pos[:, None] * inv[None, :]
    return qkv, kc, vc, valid, jnp.asarray(np.cos(ang), dtype), jnp.asarray(np.sin(ang), dtype)


def _check_update(out, qkv, kc, vc, valid, index, cos, sin, tol=2e-2, exact_v=True):
    """The kernel's (o, k_cache, v_cache) vs float64: RoPE on the rounded inputs, the write, attention.

    ``exact_v=False`` where ``qkv`` is an XLA sum of the addends the kernel added itself: the two
    fp32 sums may round to neighbouring bf16 values."""
    o, k_new, v_new = out
    b, rows, hd = qkv.shape
    kvh = kc.shape[2]
    h = rows - 2 * kvh
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    x, c, sn = f64(qkv), f64(cos)[:, None, :], f64(sin)[:, None, :]
    q, k = np_rope_halves(x[:, :h], c, sn), np_rope_halves(x[:, h:h + kvh], c, sn)
    want_k, want_v = f64(kc).copy(), f64(vc).copy()
    want_k[:, index], want_v[:, index] = k, x[:, h + kvh:]
    # the written slot: the rotated key rounded once per product/sum in the compute dtype
    np.testing.assert_allclose(f64(k_new)[:, index], want_k[:, index], atol=4e-2 * np.abs(k).max(), rtol=0)
    if exact_v:
        np.testing.assert_array_equal(f64(v_new)[:, index], want_v[:, index])
    else:  # at most one bf16 ulp apart
        np.testing.assert_allclose(f64(v_new)[:, index], want_v[:, index], rtol=2.0**-7, atol=1e-6)
    others = np.arange(kc.shape[1]) != index  # every other slot is untouched, bit for bit
    np.testing.assert_array_equal(np.asarray(k_new)[:, others], np.asarray(kc)[:, others])
    np.testing.assert_array_equal(np.asarray(v_new)[:, others], np.asarray(vc)[:, others])
    want_o = np_attention(q, want_k, want_v, np.asarray(valid), index)
    got = f64(o)
    assert got.shape == (b, h, hd) and np.isfinite(got).all()
    err = np.abs(got - want_o).max() / max(np.abs(want_o).max(), 1e-6)
    assert err < tol, err


@pytest.mark.parametrize("b,h,kvh,hd,s,index,cfg", [
    (2, 9, 3, 64, 64, 40, da.DecodeAttentionConfig(block_s=16)),               # SmolLM2 heads (G = 3)
    (1, 9, 3, 64, 96, 95, da.DecodeAttentionConfig(block_s=16, splits=3)),     # last slot, splits
    (3, 4, 4, 32, 64, 0, da.DecodeAttentionConfig(block_s=16, splits=2)),      # MHA, slot 0
    (2, 16, 2, 64, 128, 77, None),                                             # G = 8, default tiles (128 slots a step)
    (1, 6, 2, 128, 48, 20, da.DecodeAttentionConfig(block_s=16, splits=3)),    # hd = 128, mid split
    (1, 4, 4, 32, 256, 200, da.DecodeAttentionConfig(block_s=128, splits=2)),  # 128-slot steps, 2 splits
    (3, 4, 4, 32, 96, 70, da.DecodeAttentionConfig(block_s=32)),               # 32-slot steps (many programs)
])
@pytest.mark.parametrize("n_parts", [0, 3])
def test_update_matches_float64_reference(b, h, kvh, hd, s, index, cfg, n_parts):
    """Also with q/k/v as 3 fp32 split-K addends (the kernel adds them and rounds once)."""
    qkv, kc, vc, valid, cos, sin = _update_inputs(b * 100 + index, b, h, kvh, hd, s)
    valid = valid.at[:, index].set(True)
    arg = qkv
    if n_parts:
        noise = np.random.default_rng(index).standard_normal((n_parts - 1, *qkv.shape)).astype(np.float32)
        arg = jnp.concatenate([jnp.asarray(qkv, jnp.float32)[None] - noise.sum(0), jnp.asarray(noise)])
        qkv = jnp.sum(arg, axis=0).astype(qkv.dtype)  # what the kernel rounds its sum to
    out = da.decode_attention_update(arg, kc, vc, valid, index, cos, sin, config=cfg, interpret=True)
    assert [a.dtype for a in out] == [qkv.dtype] * 3 and out[1].shape == kc.shape
    _check_update(out, qkv, kc, vc, valid, index, cos, sin, exact_v=not n_parts)
    ref = da.reference_update(arg, kc, vc, valid, index, cos, sin)
    for got, want in zip(out, ref):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("b,h,kvh,hd,s,index,splits", [
    (2, 9, 3, 64, 96, 95, 3),    # SmolLM2 heads, the new slot in the last split
    (3, 4, 4, 32, 64, 0, 4),     # MHA, slot 0: three splits hold no allowed slot
    (1, 6, 2, 128, 128, 70, 2),  # hd = 128, G = 3
])
@pytest.mark.parametrize("counter", ["none", "int32", "float32"])
def test_update_combine_in_kernel(b, h, kvh, hd, s, index, splits, counter):
    """combine="kernel": the last program of each row and head combines the splits' partials (an
    atomic counter finds it). Same output as the XLA combine (and float64), with the counter made by
    the function, given as int32 zeros, or as float32 zeros (a norm kernel's: the same bits)."""
    qkv, kc, vc, valid, cos, sin = _update_inputs(b * 31 + index, b, h, kvh, hd, s)
    valid = valid.at[:, index].set(True).at[0, : max(index - 5, 0)].set(False)  # row 0: only the last few slots
    cfg = da.DecodeAttentionConfig(block_s=16, splits=splits, combine="kernel")
    cnt = {"none": None, "int32": jnp.zeros((b, kvh), jnp.int32), "float32": jnp.zeros((b, kvh), jnp.float32)}[counter]
    out = jax.jit(lambda *a: da.decode_attention_update(*a, config=cfg, counter=cnt, interpret=True))(
        qkv, kc, vc, valid, jnp.int32(index), cos, sin)
    _check_update(out, qkv, kc, vc, valid, index, cos, sin)
    xla = da.decode_attention_update(qkv, kc, vc, valid, index, cos, sin, interpret=True,
                                     config=dataclasses.replace(cfg, combine="xla"))
    np.testing.assert_allclose(np.asarray(out[0], np.float32), np.asarray(xla[0], np.float32), atol=2e-2, rtol=2e-2)


def test_combine_refusals():
    qkv, kc, vc, valid, cos, sin = _update_inputs(1, 1, 4, 2, 32, 64)
    cfg = da.DecodeAttentionConfig(block_s=16, splits=2, combine="kernel")
    with pytest.raises(ValueError, match="combine must be one of"):
        da.decode_attention_update(qkv, kc, vc, valid, 3, cos, sin, interpret=True,
                                   config=dataclasses.replace(cfg, combine="atomic"))
    with pytest.raises(ValueError, match=r"counter must be \[B, KV\]"):
        da.decode_attention_update(qkv, kc, vc, valid, 3, cos, sin, config=cfg, counter=jnp.zeros((2,), jnp.int32),
                                   interpret=True)
    with pytest.raises(ValueError, match="decode_attention_update only"):
        da.decode_attention(qkv[:, :4], kc, vc, valid, 3, config=cfg, interpret=True)


def test_update_float16_jit_donated_and_rows_without_slots():
    qkv, kc, vc, valid, cos, sin = _update_inputs(5, 3, 9, 3, 64, 64, dtype=jnp.float16)
    valid = valid.at[:, 30].set(True).at[1].set(False)  # row 1 has nothing to attend to
    kc0, vc0 = np.asarray(kc), np.asarray(vc)
    f = jax.jit(lambda *a: da.decode_attention_update(*a, interpret=True), donate_argnums=(1, 2))
    o, k_new, v_new = f(qkv, kc, vc, valid, jnp.int32(30), cos, sin)
    assert o.dtype == jnp.float16 and (np.asarray(o)[1] == 0).all()
    _check_update((o, k_new, v_new), qkv, jnp.asarray(kc0), jnp.asarray(vc0), valid, 30, cos, sin)


@pytest.mark.parametrize("kw,match", [
    (dict(rows=7), "no query heads"),
    (dict(hd=16), "head_dim >= 32"),
    (dict(cos_shape=(2, 64)), "cos and sin must be"),
    (dict(cos_dtype=jnp.float32), "cos / sin"),
    (dict(cache_dtype=jnp.float16), "must be in the cache's dtype"),
    (dict(parts_dtype=jnp.int32), "float32 or the cache's dtype"),
    (dict(rank=5), "qkv must be"),
    (dict(cfg=da.DecodeAttentionConfig(block_s=16, splits=3)), "splits=3"),
])
def test_update_bad_input_is_rejected(kw, match):
    hd = kw.get("hd", 64)
    qkv, kc, vc, valid, cos, sin = _update_inputs(0, 2, 4, 2, hd, 64)
    if "rows" in kw:
        qkv = qkv[:, :kw["rows"] - 3]
    if "cos_shape" in kw:
        cos = jnp.ones(kw["cos_shape"], cos.dtype)
    if "cos_dtype" in kw:
        sin = sin.astype(kw["cos_dtype"])
    if "cache_dtype" in kw:
        kc, vc = kc.astype(kw["cache_dtype"]), vc.astype(kw["cache_dtype"])
    if "parts_dtype" in kw:
        qkv = qkv[None].astype(kw["parts_dtype"])
    if "rank" in kw:
        qkv = qkv.reshape((1,) * (kw["rank"] - 3) + qkv.shape)
    with pytest.raises(ValueError, match=match):
        da.decode_attention_update(qkv, kc, vc, valid, 3, cos, sin, config=kw.get("cfg"), interpret=True)


@pytest.mark.parametrize("n_parts,splits,combine", [(0, 1, "xla"), (8, 1, "xla"), (5, 4, "xla"), (5, 4, "kernel"),
                                                    (0, 2, "kernel")])
def test_update_lowers_to_triton_for_cuda(n_parts, splits, combine):
    """The compiled path (not the interpreter) lowers to Triton IR on any machine: every primitive
    the kernel uses has a Triton lowering (7B heads, SmolLM2 heads)."""
    for b, h, kvh, hd, s in ((1, 32, 32, 128, 256), (2, 9, 3, 64, 512)):
        sds = jax.ShapeDtypeStruct
        bf = jnp.bfloat16
        qkv = sds((n_parts, b, h + 2 * kvh, hd), jnp.float32) if n_parts else sds((b, h + 2 * kvh, hd), bf)
        cfg = da.DecodeAttentionConfig(block_s=64, splits=splits, combine=combine)
        f = jax.jit(lambda *a: da.decode_attention_update(*a, config=cfg))
        low = f.trace(qkv, sds((b, s, kvh, hd), bf), sds((b, s, kvh, hd), bf), sds((b, s), bool), sds((), jnp.int32),
                      sds((b, hd // 2), bf), sds((b, hd // 2), bf)).lower(lowering_platforms=("cuda",))
        assert "decode_attention_update" in low.as_text()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("b,h,kvh,hd,s,index", [(1, 32, 32, 128, 256, 100), (16, 32, 32, 128, 256, 255),
                                                (1, 32, 32, 128, 4096, 3000), (4, 32, 8, 128, 2048, 1500),
                                                (2, 9, 3, 64, 512, 300)])
def test_update_compiled_on_gpu(b, h, kvh, hd, s, index):
    qkv, kc, vc, valid, cos, sin = _update_inputs(13, b, h, kvh, hd, s)
    valid = valid.at[:, index].set(True)
    kc0, vc0 = jnp.array(kc, copy=True), jnp.array(vc, copy=True)
    out = jax.jit(da.decode_attention_update)(qkv, kc, vc, valid, jnp.int32(index), cos, sin)
    _check_update(out, qkv, kc0, vc0, valid, index, cos, sin)
    # the same from 5 fp32 split-K addends, the caches donated (written in place)
    noise = jax.random.normal(jax.random.key(index), (4, *qkv.shape), jnp.float32)
    parts = jnp.concatenate([qkv.astype(jnp.float32)[None] - noise.sum(0), noise])
    rounded = jnp.sum(parts, axis=0).astype(qkv.dtype)
    f = jax.jit(da.decode_attention_update, donate_argnums=(1, 2))
    out = f(parts, jnp.array(kc0, copy=True), jnp.array(vc0, copy=True), valid, jnp.int32(index), cos, sin)
    _check_update(out, rounded, kc0, vc0, valid, index, cos, sin, exact_v=False)
    # the splits combined in the kernel (atomic counter, given as float32 zeros), three calls in one jit
    for sp in (2, 4):
        cfg = da.DecodeAttentionConfig(block_s=64 if s >= 512 else 16, splits=sp, combine="kernel")
        cnt = jnp.zeros((b, kvh), jnp.float32)

        def three(qkv, kc, vc, cnt):
            outs = []
            for _ in range(3):
                o, kc, vc = da.decode_attention_update(qkv, kc, vc, valid, jnp.int32(index), cos, sin, config=cfg,
                                                       counter=cnt)
                outs.append(o)
            return outs, kc, vc

        outs, k3, v3 = jax.jit(three)(qkv, jnp.array(kc0, copy=True), jnp.array(vc0, copy=True), cnt)
        for o in outs:
            _check_update((o, k3, v3), qkv, kc0, vc0, valid, index, cos, sin)
