"""Sampling, bucketing, argument checks, the ``jgptq generate`` command line, and the real model."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq.models.generate import bucket_length, generate, sample_logits
from jgptq.models.hf import load_hf
from jgptq.models.llama import LlamaForCausalLM


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_sampling_follows_softmax():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    n = 20000
    keys = jax.random.split(jax.random.key(0), 1)[0]
    toks = np.asarray(sample_logits(jnp.broadcast_to(jnp.asarray(logits), (n, 6)), keys, 0.8, 1.0,
                                    greedy=False, use_top_p=False))
    freq = np.bincount(toks, minlength=6) / n
    expected = _softmax(logits.astype(np.float64) / 0.8)
    assert (np.abs(freq - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 1e-3).all(), (freq, expected)


def test_top_p_keeps_the_nucleus_and_renormalizes():
    logits = np.array([0.3, 2.0, -1.0, 1.2, 0.0, -2.0], np.float32)
    p = _softmax(logits.astype(np.float64))
    order = np.argsort(-p)  # 1, 3, 0, 4, 2, 5
    top_p = p[order[0]] + p[order[1]] + 0.5 * p[order[2]]  # nucleus = first three tokens
    n = 20000
    toks = np.asarray(sample_logits(jnp.broadcast_to(jnp.asarray(logits), (n, 6)), jax.random.key(1), 1.0, top_p,
                                    greedy=False, use_top_p=True))
    freq = np.bincount(toks, minlength=6) / n
    nucleus = order[:3]
    assert set(np.flatnonzero(freq)) == set(nucleus)
    expected = np.zeros(6)
    expected[nucleus] = p[nucleus] / p[nucleus].sum()
    assert (np.abs(freq - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 1e-3).all(), (freq, expected)
    greedy = np.asarray(sample_logits(jnp.asarray(logits[None]), jax.random.key(2), 1.0, 1.0, greedy=True,
                                      use_top_p=False))
    assert greedy.tolist() == [1]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 8, 9, 200, 256, 257, 700)] == [8, 8, 16, 256, 256, 512, 768]
    with pytest.raises(ValueError, match="positive"):
        bucket_length(0)


def test_generate_argument_errors(tiny_hf_model):
    cfg, params, _ = load_hf(tiny_hf_model("llama").folder)
    model = LlamaForCausalLM.from_params(cfg, params)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, None, [[1, 2], []], 4)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 256\): \[256\]"):
        generate(model, None, [[1, 256]], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, None, [[1]], 4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, None, [[1]], 0)
    with pytest.raises(ValueError, match="needs its LlamaConfig"):
        generate(params, None, [[1]], 4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="decode_chunk must be an integer >= 1"):
            generate(model, None, [[1]], 4, decode_chunk=bad)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.9, 0.8)])
def test_decode_chunk_does_not_change_tokens_or_stream(tiny_hf_model, temperature, top_p):
    """Decoding 1, 3, 8 or 40 steps per jitted call (lax.scan) gives the same tokens and the same
    per-step stream, greedy and sampled, including rows that stop at an EOS inside a chunk and
    max_new_tokens that is not a multiple of the chunk."""
    cfg, params, _ = load_hf(tiny_hf_model("llama").folder)
    model = LlamaForCausalLM.from_params(cfg, params)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (5, 2, 9)]
    kw = dict(temperature=temperature, top_p=top_p, seed=11)
    free = generate(model, None, prompts, 13, eos_token_id=[], **kw)
    assert all(len(o) == 13 for o in free)
    eos = free[1][4]  # row 1 stops at its 5th token (other rows may stop elsewhere, or not at all)
    runs = {}
    for chunk in (1, 3, 8, 40):
        steps = []
        out = generate(model, None, prompts, 13, eos_token_id=eos, stream=steps.append, decode_chunk=chunk, **kw)
        runs[chunk] = (out, steps)
    out1, steps1 = runs[1]
    assert len(out1[1]) <= 5 and out1[1][-1] == eos
    for i, row in enumerate(out1):  # each row: the free run up to and including its first EOS
        cut = free[i].index(eos) + 1 if eos in free[i] else 13
        assert row == free[i][:cut]
    for chunk, (out, steps) in runs.items():
        assert out == out1 and steps == steps1, chunk
    assert generate(model, None, prompts, 1, decode_chunk=4, **kw) == [o[:1] for o in free]


def _tiny_tokenizer(folder):
    """A word-level tokenizer for the tiny models' 256-token vocabulary: words w3..w255."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


@pytest.fixture()
def tiny_folder_with_tokenizer(tiny_hf_model, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_hf_model("smollm2").folder, folder)
    return folder, _tiny_tokenizer(folder)


def test_cli_streams_the_greedy_continuation(tiny_folder_with_tokenizer, capsys):
    from jgptq.cli import main

    folder, tok = tiny_folder_with_tokenizer
    cfg, params, _ = load_hf(folder)
    prompt = "w5 w9 w33 w7"
    ids = tok(prompt)["input_ids"]
    expected = generate(params, cfg, [ids], 10, eos_token_id=[cfg.eos_token_ids[0], tok.eos_token_id])
    assert main(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out == tok.decode(expected[0], skip_special_tokens=True) + "\n"
    assert len(out.split()) >= 3
    argv = ["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "10", "--decode-chunk", "1"]
    assert main(argv) == 0 and capsys.readouterr().out == out  # one step per call: the same text


def test_cli_batch_of_prompts(tiny_folder_with_tokenizer, capsys):
    from jgptq.cli import main

    folder, tok = tiny_folder_with_tokenizer
    cfg, params, _ = load_hf(folder)
    prompts = ["w5 w9 w33 w7", "w100"]
    expected = generate(params, cfg, [tok(p)["input_ids"] for p in prompts], 6,
                        eos_token_id=[cfg.eos_token_ids[0], tok.eos_token_id])
    assert main(["generate", "--model", str(folder), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "6", "--stats"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "".join(f"--- [{i}] {p!r}\n{tok.decode(e, skip_special_tokens=True)}\n"
                              for i, (p, e) in enumerate(zip(prompts, expected)))
    assert "tokens/s" in cap.err


def test_cli_rejects_bad_arguments(tiny_folder_with_tokenizer):
    from jgptq.cli import main

    folder, _ = tiny_folder_with_tokenizer
    with pytest.raises(SystemExit, match="--top-p"):
        main(["generate", "--model", str(folder), "--prompt", "w5", "--top-p", "1.5"])
    with pytest.raises(SystemExit, match="--chat: this tokenizer has no chat template"):
        main(["generate", "--model", str(folder), "--prompt", "w5", "--chat"])
    with pytest.raises(SystemExit, match="--decode-chunk must be >= 1, got 0"):
        main(["generate", "--model", str(folder), "--prompt", "w5", "--decode-chunk", "0"])


@pytest.mark.slow
def test_real_smollm2_greedy_chat_matches_transformers(smollm2_gguf_path):
    """SmolLM2-135M-Instruct (GGUF): our greedy chat reply equals transformers' (fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    import jgptq.models as models

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg, params, tok = models.load(smollm2_gguf_path, dtype="float32")
    assert tok is not None
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    eos = sorted(set(cfg.eos_token_ids) | {tok.eos_token_id})
    ours = generate(params, cfg, [ids, ids[-5:]], 24, eos_token_id=eos)
    ref_model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    ref_ids = ref[0, len(ids):].tolist()
    if ref_ids[-1] in eos:
        ref_ids = ref_ids[: ref_ids.index(ref_ids[-1]) + 1]
    assert ours[0] == ref_ids, (tok.decode(ours[0]), tok.decode(ref_ids))
    assert "Paris" in tok.decode(ours[0])


def test_decode_attention_kernel_matches_xla_path(tiny_hf_model):
    """forward_step's one-token steps through the Pallas decode-attention kernel (interpreted on
    the CPU) give the XLA path's logits: bf16, grouped-query heads (3 per KV head), left-padded
    rows; generate() with either gives the same greedy tokens."""
    from jgptq.models.llama import forward_step

    cfg, params, _ = load_hf(tiny_hf_model("smollm2").folder)
    model = LlamaForCausalLM.from_params(cfg, params, dtype=jnp.bfloat16)
    tree = model.tree()
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(3, 256, size=(2, 6)), jnp.int32)
    mask = jnp.asarray([[False, False, True, True, True, True], [True] * 6])
    step = jax.jit(lambda ids, mask, cache, attention: forward_step(tree, ids, mask, cache, cfg, True, attention),
                   static_argnums=3)
    caches = {a: model.init_cache(2, 32) for a in ("xla", "pallas")}
    for a in caches:
        _, caches[a] = step(ids, mask, caches[a], a)  # prefill (T = 6): the XLA path in both
    one = jnp.ones((2, 1), bool)
    for t in range(4):
        tok = jnp.asarray(rng.integers(3, 256, size=(2, 1)), jnp.int32)
        out = {}
        for a in caches:
            out[a], caches[a] = step(tok, one, caches[a], a)
        ref = np.asarray(out["xla"], np.float32)
        err = np.abs(np.asarray(out["pallas"], np.float32) - ref).max() / np.abs(ref).max()
        assert err < 3e-2, (t, err)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    assert generate(model, None, prompts, 6, attention="pallas") == generate(model, None, prompts, 6, attention="xla")


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_decode_step_matches_xla_path(tiny_hf_model, quantized):
    """attention="fused" (RoPE, the cache write and attention in one kernel, interpreted on the
    CPU; with the GPTQ model it reads the fused q/k/v matmul's output directly) on left-padded
    bf16 rows of SmolLM2's head layout, step after step: logits as close to the float32 model's
    as the bf16 XLA path's are, KV caches equal to the XLA path's up to bf16 rounding, and
    generate() the same greedy tokens. "norm" adds norm="pallas" (each residual add + RMSNorm,
    the linear's split-K partials included, in one kernel; the next block gets its normalised
    input from the previous one)."""
    from test_quant_linear import quantize_params

    from jgptq.models.llama import forward_step

    cfg, params, _ = load_hf(tiny_hf_model("smollm2_hd64").folder)
    assert (cfg.head_dim, cfg.num_heads // cfg.num_kv_heads) == (64, 3)
    if quantized:
        params, _ = quantize_params(params, np.random.default_rng(8), shared_perm=True)
    models = {"f32": LlamaForCausalLM.from_params(cfg, params),
              "xla": LlamaForCausalLM.from_params(cfg, params, dtype=jnp.bfloat16)}
    models["fused"] = models["norm"] = models["xla"]
    assert ("qkv_proj" in models["xla"].tree()["layers"][0]["self_attn"]) == quantized
    rng = np.random.default_rng(6)
    ids = jnp.asarray(rng.integers(3, 256, size=(3, 5)), jnp.int32)
    mask = jnp.asarray([[False, False, True, True, True], [True] * 5, [False, True, True, True, True]])
    steps = {}
    for name, m in models.items():
        tree = m.tree()
        steps[name] = jax.jit(lambda ids, mask, cache, attention, tree=tree, norm="pallas" if name == "norm" else "xla":
                              forward_step(tree, ids, mask, cache, cfg, True, attention, norm), static_argnums=3)
    attn = {"f32": "xla", "xla": "xla", "fused": "fused", "norm": "fused"}
    caches = {n: m.init_cache(3, 32) for n, m in models.items()}
    for n in caches:
        _, caches[n] = steps[n](ids, mask, caches[n], attn[n])
    for t in range(4):
        tok = jnp.asarray(rng.integers(3, 256, size=(3, 1)), jnp.int32)
        one = jnp.asarray([[True], [t != 1], [True]])  # row 1 skips a step (a hole in its cache)
        out = {}
        for n in caches:
            out[n], caches[n] = steps[n](tok, one, caches[n], attn[n])
        ref = np.asarray(out["f32"])
        err = {n: np.abs(np.asarray(out[n], np.float32) - ref).max() / np.abs(ref).max()
               for n in ("xla", "fused", "norm")}
        assert err["fused"] <= 1.5 * err["xla"] + 0.01, (t, err)
        assert err["norm"] <= 1.5 * err["xla"] + 0.01, (t, err)
        for name in ("k", "v"):
            for n in ("fused", "norm"):
                for layer, (x, f) in enumerate(zip(caches["xla"][name], caches[n][name])):
                    x, f = np.asarray(x, np.float32), np.asarray(f, np.float32)
                    assert np.abs(x - f).max() <= 3e-2 * np.abs(x).max(), (t, n, name, layer)
    assert int(caches["fused"]["index"]) == int(caches["norm"]["index"]) == int(caches["xla"]["index"]) == 9
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    model = models["xla"]
    want = generate(model, None, prompts, 6, attention="xla", norm="xla")
    assert generate(model, None, prompts, 6, attention="fused", norm="xla") == want
    assert generate(model, None, prompts, 6, attention="fused", norm="pallas") == want


def test_decode_attention_argument_errors(tiny_hf_model):
    from jgptq.models.llama import forward_step

    cfg, params, _ = load_hf(tiny_hf_model("smollm2").folder)
    model = LlamaForCausalLM.from_params(cfg, params)  # float32: the kernel takes bf16 / fp16 only
    ids, one = jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1), bool)
    with pytest.raises(ValueError, match="attention='pallas' cannot run this decode step: dtype float32"):
        forward_step(model.tree(), ids, one, model.init_cache(1, 16), cfg, attention="pallas")
    with pytest.raises(ValueError, match="attention must be one of"):
        forward_step(model.tree(), ids, one, model.init_cache(1, 16), cfg, attention="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        generate(model, None, [[1]], 2, attention="flash")
    mcfg, mparams, _ = load_hf(tiny_hf_model("mistral").folder)
    mistral = LlamaForCausalLM.from_params(mcfg, mparams, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="sliding window"):
        forward_step(mistral.tree(), ids, one, mistral.init_cache(1, 16), mcfg, attention="pallas")
    with pytest.raises(ValueError, match="sliding window"):
        forward_step(mistral.tree(), ids, one, mistral.init_cache(1, 16), mcfg, attention="fused")
    bf16 = LlamaForCausalLM.from_params(cfg, params, dtype=jnp.bfloat16)  # head_dim 16: unfused kernel only
    with pytest.raises(ValueError, match="attention='fused' cannot run this decode step: head_dim=16"):
        forward_step(bf16.tree(), ids, one, bf16.init_cache(1, 16), cfg, attention="fused")
    with pytest.raises(ValueError, match="attention='fused' cannot run this decode step: dtype float32"):
        forward_step(model.tree(), ids, one, model.init_cache(1, 16), cfg, attention="fused")
    # "auto" falls back to the XLA path off the GPU and for unsupported shapes
    logits, _ = forward_step(model.tree(), ids, one, model.init_cache(1, 16), cfg, attention="auto")
    assert np.isfinite(np.asarray(logits)).all()


def test_decode_norm_argument_errors_and_float32(tiny_hf_model):
    """norm= is checked by name; norm="pallas" on a float32 model (no rounding steps) gives the
    XLA path's logits to fp32 accuracy, the GPTQ-free tiny SmolLM2 with tied embeddings."""
    from jgptq.models.llama import forward_step

    cfg, params, _ = load_hf(tiny_hf_model("smollm2").folder)
    model = LlamaForCausalLM.from_params(cfg, params)
    ids, one = jnp.ones((2, 1), jnp.int32), jnp.ones((2, 1), bool)
    with pytest.raises(ValueError, match="norm must be one of"):
        forward_step(model.tree(), ids, one, model.init_cache(2, 16), cfg, norm="fused")
    with pytest.raises(ValueError, match="norm must be one of"):
        generate(model, None, [[1]], 2, norm="rms")
    tree = model.tree()
    step = jax.jit(lambda ids, cache, norm: forward_step(tree, ids, one, cache, cfg, True, "xla", norm),
                   static_argnums=2)
    caches = {n: model.init_cache(2, 16) for n in ("xla", "pallas")}
    rng = np.random.default_rng(11)
    for _ in range(3):
        tok = jnp.asarray(rng.integers(3, 256, size=(2, 1)), jnp.int32)
        out = {}
        for n in caches:
            out[n], caches[n] = step(tok, caches[n], n)
        np.testing.assert_allclose(np.asarray(out["pallas"]), np.asarray(out["xla"]), rtol=2e-4, atol=2e-4)


def test_norm_kernel_takes_few_partials_and_sums_many():
    """_linear_addends: a linear's split-K partials go to the add + RMSNorm kernel as they are when
    there are at most NORM_MAX_PARTS of them, else summed in fp32 and rounded first (one addend);
    a linear with a bias, or without parts, gives its output. Both give the same normalised rows."""
    from jgptq.models import llama

    rng = np.random.default_rng(21)
    x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)

    class Split:  # a quantized linear's interface: __call__ and parts (no bias)
        bias = None

        def __init__(self, n):
            self.p = jnp.asarray(rng.standard_normal((n, 2, 1, 96)), jnp.float32)

        def parts(self, x):
            return self.p

        def __call__(self, x):
            return jnp.sum(self.p, axis=0).astype(x.dtype)

    few, many = Split(llama.NORM_MAX_PARTS), Split(llama.NORM_MAX_PARTS + 5)
    assert llama._linear_addends(few, x).shape == (llama.NORM_MAX_PARTS, 2, 1, 96)
    summed = llama._linear_addends(many, x)
    assert summed.shape == (1, 2, 1, 96) and summed.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(summed[0]), np.asarray(many(x)))
    dense = {"kernel": jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)}
    assert llama._linear_addends(dense, x).shape == (1, 2, 1, 96)
    cfg = type("C", (), {"rms_norm_eps": 1e-5})()
    h = jnp.asarray(rng.standard_normal((2, 1, 96)), jnp.bfloat16)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(96), jnp.bfloat16)
    for lin in (few, many):
        got_h, got_x = llama._add_norm(lin, x, h, scale, cfg)
        want_h = h + lin(x)
        np.testing.assert_allclose(np.asarray(got_h, np.float32), np.asarray(want_h, np.float32), rtol=8e-3)
        np.testing.assert_allclose(np.asarray(got_x, np.float32),
                                   np.asarray(llama.rms_norm(scale, want_h, 1e-5), np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("token_major", [True, False, "stream"])
def test_decode_zero_accumulators_come_from_the_norm_kernels(tiny_hf_model, monkeypatch, token_major):
    """With norm="pallas" a one-token step hands each TMA-reduced matmul (the Mosaic decode grid,
    here through the interpreter with K split) a zeroed fp32 accumulator that the add + RMSNorm
    kernel before it wrote: q/k/v's and o_proj's from the previous block's last norm kernel,
    gate/up's and down's from the post-attention one; only the first block's q/k/v and o_proj make
    their own. The logits equal those of the same step with the kernels' own zero fills, and stay
    close to the XLA path's. token_major=False: grids that store [Np, M] (transpose_out=False),
    whose accumulators are [1, Np, Mp] and whose call returns the finished product. "stream": the
    decode matmuls on the persistent stream-K schedule with token-major partials TMA-added into
    the same [1, rows, Np] accumulators (the bench's --e2e-configs stream)."""
    import dataclasses

    from test_quant_linear import quantize_params

    from jgptq.models import llama
    from jgptq.pallas_kernels import dispatch
    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg

    real_prepare, real_grid = dispatch.prepare, mg._grid_config
    monkeypatch.setattr(dispatch, "prepare", lambda l, *, bits, backend=None: real_prepare(
        l, bits=bits, backend="gpu", interpret=True, gpu_kernel="mgpu"))
    stream = dict(schedule="stream", split_k=1, ctas_per_sm=1, transpose_out=True, split_reduce="tma")
    monkeypatch.setattr(mg, "_num_sms", lambda: 3)
    monkeypatch.setattr(mg, "_grid_config", lambda m, p, **kw: dataclasses.replace(
        real_grid(m, p, **{"min_steps": 1, **kw}),
        **(stream if token_major == "stream" else {} if token_major else {"transpose_out": False})))
    cfg, params, _ = load_hf(tiny_hf_model("smollm2_hd64").folder)
    qparams, _ = quantize_params(params, np.random.default_rng(9), shared_perm=True)
    model = LlamaForCausalLM.from_params(cfg, qparams, dtype=jnp.bfloat16)
    tree = model.tree()
    d, f, hh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    want = 0  # matmuls that should get a norm kernel's zeros: all with a TMA accumulator but block 0's q/k/v, o
    for i, lp in enumerate(tree["layers"]):
        shapes = [llama._acc_shape(lp["self_attn"]["qkv_proj"], (2, 1, d), jnp.bfloat16),
                  llama._acc_shape(lp["self_attn"]["o_proj"], (2, 1, hh), jnp.bfloat16),
                  llama._acc_shape(lp["mlp"]["gate_up_proj"], (2, 1, d), jnp.bfloat16),
                  llama._acc_shape(lp["mlp"]["down_proj"], (2, 1, f), jnp.bfloat16)]
        assert shapes[0] is not None and shapes[2] is not None  # K = 192: split 2 ways here
        assert (shapes[0][2] <= 8) != bool(token_major), shapes  # [1, rows, Np] or [1, Np, Mp]
        want += sum(s is not None for s in (shapes if i else shapes[2:]))
    assert llama._acc_shape(tree["layers"][0]["self_attn"]["qkv_proj"], (2, 1, d), jnp.float32) is None
    calls = []
    real_parts = mg.gptq_matmul_mgpu_parts
    monkeypatch.setattr(mg, "gptq_matmul_mgpu_parts",
                        lambda x, p, **kw: (calls.append(kw.get("acc") is not None), real_parts(x, p, **kw))[1])
    rng = np.random.default_rng(10)
    ids = jnp.asarray(rng.integers(3, 256, size=(2, 4)), jnp.int32)
    mask = jnp.ones((2, 4), bool)
    cache0 = model.init_cache(2, 16)
    _, cache0 = llama.forward_step(tree, ids, mask, cache0, cfg, True, "xla", "xla")
    tok = jnp.asarray(rng.integers(3, 256, size=(2, 1)), jnp.int32)
    one = jnp.ones((2, 1), bool)
    got, cache = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
    assert sum(calls) == want >= 2 * len(tree["layers"]), (calls, want)
    assert calls[:2] == [False, False]  # block 0's q/k/v and o_proj
    calls.clear()
    monkeypatch.setattr(llama, "_acc_shape", lambda *a: None)  # the kernels zero-fill their own
    own, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
    assert not any(calls)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(own))
    xla, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "xla", "xla")
    err = np.abs(np.asarray(got) - np.asarray(xla)).max() / np.abs(np.asarray(xla)).max()
    assert err < 0.02, err


def test_decode_attention_split_counters_come_from_the_norm_kernels(tiny_hf_model, monkeypatch):
    """With the fused decode-attention kernel set to combine its slot splits itself
    (combine="kernel"), a one-token step with norm="pallas" hands every block but the first the
    split counters ([B, KV] zeros) that the previous block's last norm kernel wrote; the first block's
    kernel makes its own. Logits equal the same step with the XLA combine (up to the combine's
    rounding) and stay close to the XLA path's; the caches are the same."""
    import dataclasses

    from jgptq.models import llama
    from jgptq.pallas_kernels import decode_attention as da

    cfg, params, _ = load_hf(tiny_hf_model("smollm2_hd64").folder)
    model = LlamaForCausalLM.from_params(cfg, params, dtype=jnp.bfloat16)
    tree = model.tree()
    rng = np.random.default_rng(12)
    ids = jnp.asarray(rng.integers(3, 256, size=(2, 5)), jnp.int32)
    mask = jnp.asarray([[False, True, True, True, True], [True] * 5])
    cache0 = model.init_cache(2, 32)
    _, cache0 = llama.forward_step(tree, ids, mask, cache0, cfg, True, "xla", "xla")
    tok = jnp.asarray(rng.integers(3, 256, size=(2, 1)), jnp.int32)
    one = jnp.ones((2, 1), bool)
    real_cfg, real_update = da.default_config, da.decode_attention_update
    results = {}
    for combine in ("xla", "kernel"):
        monkeypatch.setattr(da, "default_config", lambda b, kvh, s, num_sms=None, c=combine: dataclasses.replace(
            real_cfg(b, kvh, s, num_sms), block_s=16, splits=2, combine=c))
        counters = []
        monkeypatch.setattr(da, "decode_attention_update", lambda *a, **kw: (
            counters.append(kw.get("counter")), real_update(*a, **kw))[1])
        results[combine] = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
        if combine == "kernel":
            assert counters[0] is None and len(counters) == cfg.num_layers
            assert all(c is not None and c.shape == (2, cfg.num_kv_heads) and c.dtype == jnp.float32
                       for c in counters[1:]), counters
        else:
            assert all(c is None for c in counters)
    (got, cache), (want, cache_x) = results["kernel"], results["xla"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=2e-2 * np.abs(np.asarray(want)).max())
    for name in ("k", "v"):
        for a, b in zip(cache[name], cache_x[name]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    monkeypatch.setattr(da, "default_config", real_cfg)
    monkeypatch.setattr(da, "decode_attention_update", real_update)
    xla, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "xla", "xla")
    err = np.abs(np.asarray(got) - np.asarray(xla)).max() / np.abs(np.asarray(xla)).max()
    assert err < 0.03, err


def _mosaic_tiny_model(tiny_hf_model, monkeypatch, seed: int, **quant_kw):
    """The tiny SmolLM2-shaped model (head_dim 64), GPTQ-quantized with ``seed``, its layers
    prepared for the Mosaic GPU kernels run through the interpreter: ``(config, model tree)``."""
    from test_quant_linear import quantize_params

    from jgptq.pallas_kernels import dispatch

    real_prepare = dispatch.prepare
    monkeypatch.setattr(dispatch, "prepare", lambda l, *, bits, backend=None: real_prepare(
        l, bits=bits, backend="gpu", interpret=True, gpu_kernel="mgpu"))
    cfg, params, _ = load_hf(tiny_hf_model("smollm2_hd64").folder)
    qparams, _ = quantize_params(params, np.random.default_rng(seed), **quant_kw)
    return cfg, LlamaForCausalLM.from_params(cfg, qparams, dtype=jnp.bfloat16)


def _one_step_inputs(tree, model, cfg, seed: int):
    """A 5-token prefill of 2 rows (XLA path) and the next token: ``(cache, tok, valid)``."""
    from jgptq.models import llama

    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(3, 256, size=(2, 5)), jnp.int32)
    _, cache0 = llama.forward_step(tree, ids, jnp.ones((2, 5), bool), model.init_cache(2, 16), cfg, True, "xla",
                                   "xla")
    return cache0, jnp.asarray(rng.integers(3, 256, size=(2, 1)), jnp.int32), jnp.ones((2, 1), bool)


def test_down_projection_makes_silu_up_in_its_kernel(tiny_hf_model, monkeypatch):
    """With llama.GLU_IN_DOWN on (off by default), norm="pallas" and the Mosaic decode grid
    (interpreted here) each block's down projection takes the fused gate/up matmul's output (its
    fp32 partial sum, or its one finished addend) and makes silu(gate) * up in its own kernel (no
    separate activation op); the logits stay as close to the XLA path's as with the activation
    made by XLA (llama.GLU_IN_DOWN = False, the default), which calls no such kernel."""
    from jgptq.models import llama
    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg

    cfg, model = _mosaic_tiny_model(tiny_hf_model, monkeypatch, 11)
    tree = model.tree()
    calls = []
    real_glu = mg.gptq_matmul_mgpu_glu_parts
    monkeypatch.setattr(llama, "GLU_IN_DOWN", True)
    monkeypatch.setattr(mg, "gptq_matmul_mgpu_glu_parts",
                        lambda gu, p, **kw: (calls.append(gu.dtype), real_glu(gu, p, **kw))[1])
    cache0, tok, one = _one_step_inputs(tree, model, cfg, 12)
    got, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
    # gu: the gate/up kernel's fp32 partial sum, or its finished product in bf16 (one addend)
    assert len(calls) == len(tree["layers"]) and set(calls) <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}, calls
    calls.clear()
    monkeypatch.setattr(llama, "GLU_IN_DOWN", False)
    act_xla, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
    assert not calls
    xla, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "xla", "xla")
    scale = np.abs(np.asarray(xla)).max()
    for out in (got, act_xla):
        assert np.abs(np.asarray(out) - np.asarray(xla)).max() / scale < 0.02
    assert np.abs(np.asarray(got) - np.asarray(act_xla)).max() / scale < 0.02


def test_persistent_mlp_runs_each_blocks_mlp_in_one_kernel(tiny_hf_model, monkeypatch):
    """With llama.PERSISTENT_MLP on (off by default), norm="pallas" and the Mosaic kernels
    (interpreted here: one CTA, no barrier) each block's gated MLP is one persistent_mlp kernel
    call (gate/up, then down with silu(gate) * up in its x tiles) taking the zero buffers the
    norm kernel made; no gate/up or down matmul runs on its own. The logits stay as close to the
    XLA path's as the default path's are, and the default calls no such kernel."""
    from jgptq.models import llama
    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg
    from jgptq.pallas_kernels import persistent_mlp as pm

    cfg, model = _mosaic_tiny_model(tiny_hf_model, monkeypatch, 13)
    tree = model.tree()
    calls, matmuls = [], []
    real_mlp, real_parts = pm.gptq_mlp_mgpu, mg.gptq_matmul_mgpu_parts
    monkeypatch.setattr(pm, "gptq_mlp_mgpu", lambda h, gup, dn, **kw: (
        calls.append((kw.get("gu") is not None, kw.get("acc") is not None)), real_mlp(h, gup, dn, **kw))[1])
    monkeypatch.setattr(mg, "gptq_matmul_mgpu_parts", lambda x, p, **kw: (matmuls.append(p.n), real_parts(x, p, **kw))[1])
    cache0, tok, one = _one_step_inputs(tree, model, cfg, 14)
    monkeypatch.setattr(llama, "PERSISTENT_MLP", True)
    got, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
    assert calls == [(True, True)] * len(tree["layers"]), calls  # both buffers from the norm kernel
    inter = cfg.intermediate_size
    assert matmuls.count(2 * inter) == 0, matmuls  # no gate/up matmul of its own
    calls.clear()
    monkeypatch.setattr(llama, "PERSISTENT_MLP", False)
    default, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
    assert not calls
    xla, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "xla", "xla")
    scale = np.abs(np.asarray(xla)).max()
    err = [float(np.abs(np.asarray(o) - np.asarray(xla)).max() / scale) for o in (got, default)]
    assert np.all(np.isfinite(np.asarray(got))) and err[1] < 0.04, err
    # as close to the XLA path as the per-op kernels are (both round the same bf16 activations)
    assert err[0] <= 1.25 * err[1] + 0.005, err
    assert np.abs(np.asarray(got) - np.asarray(default)).max() / scale < 0.03


@pytest.mark.parametrize("glu", [False, True])
def test_decode_matmuls_prefetch_the_next_one(tiny_hf_model, monkeypatch, glu):
    """With llama.PREFETCH_NEXT on (off by default) and the decode kernels (Mosaic grids through the
    interpreter, norm="pallas", attention="fused") each block's matmuls hint the one that runs
    next: q/k/v -> o_proj -> gate/up -> down -> the next block's q/k/v, and the last down
    projection nothing (lm_head is float). The interpreter has no L2, so the logits are those of
    the same step without hints, bit for bit. glu: the down projection made silu(gate) * up in its
    kernel (llama.GLU_IN_DOWN), which hints the same way."""
    from jgptq.models import llama
    from jgptq.models.quant_linear import prepared_of
    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg

    monkeypatch.setattr(llama, "GLU_IN_DOWN", glu)
    cfg, model = _mosaic_tiny_model(tiny_hf_model, monkeypatch, 12, shared_perm=True)
    tree = model.tree()
    order = []
    for lp in tree["layers"]:
        order += [lp["self_attn"]["qkv_proj"], lp["self_attn"]["o_proj"], lp["mlp"]["gate_up_proj"],
                  lp["mlp"]["down_proj"]]
    words = [prepared_of(m).packed.w for m in order]
    calls, glu_calls = [], []

    def record(real):
        def f(x, p, **kw):
            nxt = kw.get("prefetch")
            if real is real_glu:
                glu_calls.append(nxt is not None)
            calls.append((next(i for i, w in enumerate(words) if w is p.w),
                          None if nxt is None else next(i for i, w in enumerate(words) if w is nxt.w)))
            return real(x, p, **kw)
        return f

    real_glu = mg.gptq_matmul_mgpu_glu_parts
    monkeypatch.setattr(mg, "gptq_matmul_mgpu_parts", record(mg.gptq_matmul_mgpu_parts))
    monkeypatch.setattr(mg, "gptq_matmul_mgpu_glu_parts", record(real_glu))
    rng = np.random.default_rng(13)
    ids = jnp.asarray(rng.integers(3, 256, size=(2, 4)), jnp.int32)
    cache0 = model.init_cache(2, 16)
    _, cache0 = llama.forward_step(tree, ids, jnp.ones((2, 4), bool), cache0, cfg, True, "xla", "xla")
    tok = jnp.asarray(rng.integers(3, 256, size=(2, 1)), jnp.int32)
    one = jnp.ones((2, 1), bool)
    monkeypatch.setattr(llama, "PREFETCH_NEXT", True)
    got, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
    n = len(order)
    assert calls == [(i, i + 1 if i + 1 < n else None) for i in range(n)], calls
    assert glu_calls == ([True] * (len(tree["layers"]) - 1) + [False] if glu else [])  # the last hints nothing
    calls.clear()
    monkeypatch.setattr(llama, "PREFETCH_NEXT", False)
    plain, _ = llama.forward_step(tree, tok, one, cache0, cfg, True, "fused", "pallas")
    assert calls and all(nxt is None for _, nxt in calls), calls  # (gate/up without acc: no parts call)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))
