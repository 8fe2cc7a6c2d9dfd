"""Quantized linear layers and models built from GPTQ pytrees.

References are independent: codes are packed here with a plain bit-stream packer written from
shared/reference/gptq.md §1.4 (value j of each run of 32 at bit ``bits*j`` of a little-endian
``bits*32``-bit integer split into ``bits`` words; for 2/4/8 bits this is the usual word-per-row
layout, for 3 bits the 10-1-10-1-10 stream), and dequantized in float64 NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jgptq.models import llama
from jgptq.models.hf import load_hf
from jgptq.models.llama import LlamaForCausalLM
from jgptq.models.quant_linear import Linear, QuantLinear, QuantState, linear, quant_bits


def pack_rows_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint codes ``[in, out]`` -> GPTQ qweight int32 ``[in*bits/32, out]`` (bit-stream packer)."""
    k, n = codes.shape
    assert k % 32 == 0
    out = np.zeros((k // 32 * bits, n), np.uint32)
    for r in range(k // 32):
        for c in range(n):
            stream = 0
            for j in range(32):
                stream |= int(codes[32 * r + j, c]) << (bits * j)
            for w in range(bits):
                out[r * bits + w, c] = (stream >> (32 * w)) & 0xFFFFFFFF
    return out.view(np.int32)


def make_lin(rng: np.random.Generator, k: int, n: int, bits: int, group: int, act_order: bool,
             bias: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A random quantized LIN and its float64 dequantized kernel ``[k, n]``."""
    gs = k if group == -1 else group
    g = -(-k // gs)
    codes = rng.integers(0, 2**bits, size=(k, n)).astype(np.uint8)
    scales = rng.uniform(0.005, 0.05, size=(g, n)).astype(np.float16)
    zeros = rng.integers(0, 2**bits, size=(g, n)).astype(np.uint8)
    g_idx = np.arange(k, dtype=np.int32) // gs
    if act_order:
        g_idx = g_idx[rng.permutation(k)]  # non-monotone, as desc_act checkpoints store it
    w = (codes.astype(np.float64) - zeros[g_idx]) * scales[g_idx].astype(np.float64)
    lin = {"qweight": pack_rows_reference(codes, bits), "scales": scales, "zeros": zeros, "g_idx": g_idx}
    if bias:
        lin["bias"] = rng.normal(size=n).astype(np.float32)
    return lin, w


@pytest.mark.parametrize("bits,group,act_order", [
    (4, 32, False), (4, 32, True), (3, 32, True), (2, -1, False), (8, 64, True), (4, 48, False),
])
def test_quant_linear_matches_float64_reference(bits, group, act_order):
    rng = np.random.default_rng(bits * 100 + (group % 97) + act_order)
    k, n = 96, 40
    lin, w = make_lin(rng, k, n, bits, group, act_order, bias=True)
    x = rng.normal(size=(2, 5, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w + lin["bias"]
    layer = QuantLinear(lin)
    assert layer.bits == bits and quant_bits(lin) == bits
    y = np.asarray(jax.jit(lambda m, a: m(a))(layer, jnp.asarray(x)))
    assert y.shape == (2, 5, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # the functional path (a LIN dict) is the same computation
    np.testing.assert_allclose(np.asarray(linear(lin, jnp.asarray(x))), y, rtol=1e-6, atol=1e-6)
    # bf16 compute
    yb = layer(jnp.asarray(x, jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), ref, rtol=0, atol=2e-2 * np.abs(ref).max())
    # to_params gives the same tensors back
    back = layer.to_params()
    for key in lin:
        np.testing.assert_array_equal(np.asarray(back[key]), lin[key])


def test_packed_state_is_not_trainable():
    rng = np.random.default_rng(1)
    lin, _ = make_lin(rng, 64, 32, 4, 32, False, bias=True)
    layer = QuantLinear(lin)
    params = jax.tree.leaves(nnx.state(layer, nnx.Param))
    assert len(params) == 1 and params[0].shape == (32,)  # only the float bias
    quant = nnx.state(layer, QuantState)
    dtypes = sorted(str(x.dtype) for x in jax.tree.leaves(quant))
    assert dtypes == ["float16", "int32", "int32", "uint8"]


@pytest.mark.parametrize("change,pattern", [
    (lambda l: l.update(qweight=l["qweight"][:-1]), r"bits per weight; only 2, 3, 4 and 8"),
    (lambda l: l.update(zeros=l["zeros"][:, :-1]), r"scales \(2, 32\) and zeros \(2, 31\)"),
    (lambda l: l.pop("g_idx"), r"missing \['g_idx'\]"),
    (lambda l: l.update(qweight=l["qweight"].astype(np.int64)), r"qweight must be int32"),
    (lambda l: l.update(bias=np.zeros(7, np.float32)), r"bias has shape \(7,\), expected \(32,\)"),
])
def test_bad_quantized_params_are_refused(change, pattern):
    lin, _ = make_lin(np.random.default_rng(2), 64, 32, 4, 32, False, bias=False)
    change(lin)
    with pytest.raises(ValueError, match=pattern):
        QuantLinear(lin)


def test_kernel_hook_is_used_when_prepare_returns_a_value(monkeypatch):
    """QuantLinear asks dispatch.prepare at build time and calls dispatch.matmul when it answers."""
    from jgptq.pallas_kernels import dispatch

    rng = np.random.default_rng(3)
    lin, w = make_lin(rng, 64, 32, 4, 32, True, bias=True)
    calls = {"prepare": 0, "matmul": 0}

    def fake_prepare(l, *, bits, backend=None, **kw):
        calls["prepare"] += 1
        assert bits == 4 and backend == jax.default_backend()
        return {"w": jnp.asarray(w * 2.0, jnp.float32)}  # deliberately different from the XLA path

    def fake_matmul(x, prepared):
        calls["matmul"] += 1
        return (x @ prepared["w"]).astype(x.dtype)

    monkeypatch.setattr(dispatch, "prepare", fake_prepare)
    monkeypatch.setattr(dispatch, "matmul", fake_matmul)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    layer = QuantLinear(lin)
    y = np.asarray(jax.jit(lambda m, a: m(a))(layer, jnp.asarray(x)))
    np.testing.assert_allclose(y, x @ (2 * w) + lin["bias"], rtol=1e-5, atol=1e-5)
    assert calls == {"prepare": 1, "matmul": 1}
    xla = QuantLinear(lin, use_kernel=False)
    assert calls["prepare"] == 1
    np.testing.assert_allclose(np.asarray(xla(jnp.asarray(x))), x @ w + lin["bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [None, "mgpu"])
def test_parts_add_up_to_the_layer_without_bias(monkeypatch, kernel):
    """QuantLinear.parts / FusedQuantLinear.parts: addends whose fp32 sum, rounded, is the product
    without the bias (the XLA path: one addend; the Mosaic kernel interpreted with a split-K
    decode grid: its partials)."""
    from jgptq.models.quant_linear import FusedQuantLinear
    from jgptq.pallas_kernels import dispatch

    if kernel:
        real_prepare = dispatch.prepare
        monkeypatch.setattr(dispatch, "prepare", lambda l, *, bits, backend=None: real_prepare(
            l, bits=bits, backend="gpu", interpret=True, gpu_kernel=kernel))
    rng = np.random.default_rng(9)
    lin, w = make_lin(rng, 1024, 128, 4, 128, True, bias=True)
    layer = QuantLinear(lin)
    assert (layer.prepared is not None) == bool(kernel)
    x = jnp.asarray(rng.normal(size=(2, 1, 1024)), jnp.bfloat16)
    parts = layer.parts(x)
    assert parts.ndim == 4 and parts.shape[1:] == (2, 1, 128) and (parts.shape[0] > 1) == bool(kernel)
    total = np.asarray(jnp.sum(parts.astype(jnp.float32), 0).astype(jnp.bfloat16), np.float64)
    ref = np.asarray(x, np.float64) @ w
    np.testing.assert_allclose(total, ref, rtol=0, atol=1e-2 * np.abs(ref).max())
    with_bias = np.asarray(layer(x), np.float64)
    np.testing.assert_allclose(with_bias - total, np.broadcast_to(lin["bias"], ref.shape), rtol=0,
                               atol=2e-2 * np.abs(with_bias).max())
    lin2, _ = make_lin(rng, 1024, 64, 4, 128, True, bias=False)
    lin2["g_idx"] = lin["g_idx"]
    fused = FusedQuantLinear([{k: v for k, v in lin.items() if k != "bias"}, lin2])
    assert not fused.has_bias and fused.parts(x).shape[1:] == (2, 1, 192)


@pytest.mark.parametrize("kernel", [None, "mgpu"])
def test_glu_parts_are_the_parts_of_silu_gate_times_up(monkeypatch, kernel):
    """QuantLinear.glu_parts: addends summing to silu(gate) * up (fp32, rounded once to bf16) @ W,
    from fp32 [gate | up]: the XLA path (no kernel) and the Mosaic decode grid (interpreted, which
    makes the activation in the kernel); acc is refused where no kernel takes one."""
    from jgptq.pallas_kernels import dispatch

    if kernel:
        real_prepare = dispatch.prepare
        monkeypatch.setattr(dispatch, "prepare", lambda l, *, bits, backend=None: real_prepare(
            l, bits=bits, backend="gpu", interpret=True, gpu_kernel=kernel))
    rng = np.random.default_rng(19)
    lin, w = make_lin(rng, 512, 128, 4, 128, False, bias=False)
    layer = QuantLinear(lin)
    assert (layer.prepared is not None) == bool(kernel)
    assert layer.glu_in_kernel((2, 1, 512), jnp.bfloat16) == bool(kernel)
    gu = rng.normal(size=(2, 1, 1024)) * 3.0
    g, u = gu[..., :512], gu[..., 512:]
    x = np.asarray(jnp.asarray(g / (1.0 + np.exp(-g)) * u, jnp.float32).astype(jnp.bfloat16), np.float64)
    parts = layer.glu_parts(jnp.asarray(gu, jnp.float32), jnp.bfloat16)
    assert parts.shape[1:] == (2, 1, 128)
    ref = x @ w
    np.testing.assert_allclose(np.asarray(parts, np.float64).sum(0), ref, rtol=0, atol=1e-2 * np.abs(ref).max())
    if not kernel:
        with pytest.raises(ValueError, match="acc given"):
            layer.glu_parts(jnp.asarray(gu, jnp.float32), jnp.bfloat16, acc=jnp.zeros((1, 2, 128), jnp.float32))


def test_real_pallas_kernel_through_the_interpreter(monkeypatch):
    """The kernels colleague's GPU kernel, run by the Pallas interpreter, plugs in behind QuantLinear."""
    from jgptq.pallas_kernels import dispatch

    real_prepare = dispatch.prepare
    monkeypatch.setattr(dispatch, "prepare",
                        lambda l, *, bits, backend=None: real_prepare(l, bits=bits, backend="gpu", interpret=True))
    rng = np.random.default_rng(4)
    lin, w = make_lin(rng, 128, 64, 4, 32, True, bias=False)
    layer = QuantLinear(lin)
    if layer.prepared is None:
        pytest.skip("dispatch.prepare chose no kernel for this shape")
    x = rng.normal(size=(2, 128)).astype(np.float32)
    ref = x.astype(np.float64) @ w
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def quantize_params(params: dict, rng: np.random.Generator, bits: int = 4, group: int = 32,
                    shared_perm: bool = False) -> tuple[dict, dict]:
    """RTN-quantize every block linear (asym, act-order g_idx on q/k/v: one permutation per layer
    with ``shared_perm``, as GPTQ gives layers that see the same Hessian; else one per linear)
    -> (quantized params, float params holding the float64-dequantized kernels)."""
    qparams = jax.tree.map(lambda x: x, params)
    fparams = jax.tree.map(lambda x: x, params)
    maxq = 2**bits - 1
    for i, lp in enumerate(params["layers"]):
        perm = None
        for name in llama.LINEAR_NAMES:
            mod, proj = name.split(".")
            lin = lp[mod][proj]
            wk = np.asarray(lin["kernel"], np.float64)  # [in, out]
            k, n = wk.shape
            g_idx = np.arange(k, dtype=np.int32) // group
            if mod == "self_attn" and proj != "o_proj":
                if perm is None or not shared_perm:
                    perm = rng.permutation(k)
                g_idx = g_idx[perm]
            G = -(-k // group)
            lo = np.stack([wk[g_idx == g].min(0) for g in range(G)]).clip(max=0)
            hi = np.stack([wk[g_idx == g].max(0) for g in range(G)]).clip(min=0)
            scales = ((hi - lo) / maxq).astype(np.float16)
            s64 = scales.astype(np.float64)
            zeros = np.round(-lo / s64).clip(0, maxq).astype(np.uint8)
            codes = np.clip(np.round(wk / s64[g_idx]) + zeros[g_idx], 0, maxq).astype(np.uint8)
            deq = (codes.astype(np.float64) - zeros[g_idx]) * s64[g_idx]
            q = {"qweight": pack_rows_reference(codes, bits), "scales": scales, "zeros": zeros, "g_idx": g_idx}
            if "bias" in lin:
                q["bias"] = lin["bias"]
            qparams["layers"][i][mod][proj] = q
            fparams["layers"][i][mod][proj] = dict(lin, kernel=deq.astype(np.float32))
    return qparams, fparams


@pytest.mark.parametrize("variant", ["qwen2", "smollm2"])
def test_quantized_model_equals_float_model_of_dequantized_weights(tiny_hf_model, variant):
    cfg, params, _ = load_hf(tiny_hf_model(variant).folder)
    qparams, fparams = quantize_params(params, np.random.default_rng(5))
    qmodel = LlamaForCausalLM.from_params(cfg, qparams)
    fmodel = LlamaForCausalLM.from_params(cfg, fparams)
    assert isinstance(qmodel.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(fmodel.layers[0].self_attn.q_proj, Linear)
    ids = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 16)))
    fwd = jax.jit(lambda m, x: m(x))
    qlog, flog = np.asarray(fwd(qmodel, ids)), np.asarray(fwd(fmodel, ids))
    np.testing.assert_allclose(qlog, flog, rtol=0, atol=1e-4 * np.abs(flog).max())
    # the quantized weights really differ from the float ones (the test is not vacuous)
    orig = np.asarray(jax.jit(llama.forward, static_argnums=3)(params, ids, None, cfg))
    assert np.abs(orig - flog).max() > 1e-3 * np.abs(orig).max()
    # the functional (driver) path runs on quantized layer params too
    h = llama.embed(qparams, ids)
    hq = jax.jit(llama.decoder_block, static_argnums=(4, 5))(qparams["layers"][0], h, None, None, cfg, False)
    hf_ = llama.decoder_block(fparams["layers"][0], h, None, None, cfg)
    np.testing.assert_allclose(np.asarray(hq), np.asarray(hf_), rtol=0, atol=1e-4 * np.abs(np.asarray(hf_)).max())
    # round trip and trainable state
    back = qmodel.to_params()
    assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(jnp.asarray, qparams))
    trainable = jax.tree.leaves(nnx.state(qmodel, nnx.Param))
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in trainable)
    n_lin_biases = sum(1 for lp in qparams["layers"] for m in ("self_attn", "mlp") for l in lp[m].values() if "bias" in l)
    assert len(trainable) == (2 if cfg.tie_word_embeddings else 3) + 2 * cfg.num_layers + n_lin_biases


@pytest.mark.parametrize("variant", ["qwen2", "llama"])
def test_fused_projections_equal_separate_layers(tiny_hf_model, variant, monkeypatch):
    """q/k/v (same act-order g_idx) and gate/up run as one fused GPTQ matmul each: same logits as
    the unfused model and the float model of the dequantized weights, exact to_params(), and the
    same through the real GPU kernel in the Pallas interpreter."""
    from jgptq.models.quant_linear import FusedQuantLinear
    from jgptq.pallas_kernels import dispatch

    cfg, params, _ = load_hf(tiny_hf_model(variant).folder)
    qparams, fparams = quantize_params(params, np.random.default_rng(11), shared_perm=True)
    fused = LlamaForCausalLM.from_params(cfg, qparams)
    plain = LlamaForCausalLM.from_params(cfg, qparams, fuse=False)
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert isinstance(attn.qkv_proj, FusedQuantLinear) and attn.q_proj is None and attn.o_proj is not None
    assert isinstance(mlp.gate_up_proj, FusedQuantLinear) and mlp.gate_proj is None
    assert attn.qkv_proj.sizes == (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                                   cfg.num_kv_heads * cfg.head_dim)
    assert set(fused.layers[0].tree()["self_attn"]) == {"qkv_proj", "o_proj"}
    assert plain.layers[0].self_attn.qkv_proj is None
    ids = jnp.asarray(np.random.default_rng(12).integers(0, cfg.vocab_size, size=(2, 9)))
    fwd = jax.jit(lambda m, x: m(x))
    a, b = np.asarray(fwd(fused, ids)), np.asarray(fwd(plain, ids))
    ref = np.asarray(fwd(LlamaForCausalLM.from_params(cfg, fparams), ids))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    np.testing.assert_allclose(a, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    back = fused.to_params()
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(jax.tree.map(jnp.asarray, qparams)), strict=True):
        assert x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
    # the fused layer through the real GPU kernel (Pallas interpreter) gives the same logits
    real_prepare = dispatch.prepare
    monkeypatch.setattr(dispatch, "prepare",
                        lambda l, *, bits, backend=None: real_prepare(l, bits=bits, backend="gpu", interpret=True))
    kern = LlamaForCausalLM.from_params(cfg, qparams, dtype=jnp.bfloat16)
    assert kern.layers[0].self_attn.qkv_proj.inner.prepared is not None
    c = np.asarray(fwd(kern, ids))
    d = np.asarray(fwd(LlamaForCausalLM.from_params(cfg, qparams, dtype=jnp.bfloat16, use_kernels=False), ids))
    assert np.abs(c - d).max() < 0.05 * np.abs(d).max()


def test_concat_quantized_refuses_what_cannot_share_a_matmul():
    from jgptq.models.quant_linear import concat_quantized, fuse_quantized

    rng = np.random.default_rng(13)
    a, _ = make_lin(rng, 64, 32, 4, 32, True, bias=False)
    b = dict(a, qweight=a["qweight"][:, :16], scales=a["scales"][:, :16], zeros=a["zeros"][:, :16])
    cat = concat_quantized([a, b])
    assert cat["qweight"].shape == (8, 48) and np.array_equal(np.asarray(cat["g_idx"]), a["g_idx"])
    other_perm, _ = make_lin(rng, 64, 16, 4, 32, True, bias=False)
    eight, _ = make_lin(rng, 64, 16, 8, 32, False, bias=False)
    biased = dict(b, bias=np.ones(16, np.float32))
    floats = {"kernel": np.ones((64, 16), np.float32)}
    for parts in ([a, other_perm], [a, eight], [a, biased], [a, floats], [a]):
        assert concat_quantized(parts) is None and fuse_quantized(parts) is None
    assert concat_quantized([biased, dict(biased)])["bias"].shape == (32,)


def test_quantized_model_generates(tiny_hf_model):
    from jgptq.models.generate import generate

    cfg, params, _ = load_hf(tiny_hf_model("llama").folder)
    qparams, fparams = quantize_params(params, np.random.default_rng(7), bits=8)
    prompts = [[3, 4, 5, 6], [9]]
    assert generate(qparams, cfg, prompts, 6, eos_token_id=[]) == generate(fparams, cfg, prompts, 6, eos_token_id=[])


def test_load_dispatches_gptq_folders(tiny_hf_model, tmp_path):
    """jgptq.models.load on an exported GPTQ folder gives a model equal to the in-memory one."""
    from jgptq import GPTQConfig
    from jgptq.checkpoint import export_gptq
    from jgptq.models import load

    cfg, params, _ = load_hf(tiny_hf_model("qwen2").folder)
    qparams, _ = quantize_params(params, np.random.default_rng(8))
    out = export_gptq(tmp_path / "gptq", cfg, qparams, GPTQConfig(bits=4, group_size=32, sym=False, desc_act=True),
                      dtype="float32")
    loaded = load(out)
    assert loaded.kind == "gptq" and loaded.quant_info is not None
    cfg2, qparams2, _ = loaded
    assert cfg2 == cfg
    ids = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, size=(1, 12)))
    fwd = jax.jit(lambda m, x: m(x))
    a = np.asarray(fwd(LlamaForCausalLM.from_params(cfg, qparams), ids))
    b = np.asarray(fwd(LlamaForCausalLM.from_params(cfg2, qparams2), ids))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
