"""jgptq.evaluate: protocol perplexity against float64 NumPy transcriptions (a random bigram "model")
and against a tiny random transformers Llama in PyTorch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jgptq.evaluate import PerplexityResult, model_perplexity, perplexity, window_cross_entropy

jax.config.update("jax_default_matmul_precision", "highest")

V = 97


def bigram_table(seed: int) -> np.ndarray:
    return (3.0 * np.random.default_rng(seed).standard_normal((V, V))).astype(np.float32)


def reference_ppl(table: np.ndarray, ids: np.ndarray, seqlen: int, n_windows: int | None = None):
    """float64 transcription of the protocol for logits = table[ids]: (ppl, per-window CE)."""
    t = table.astype(np.float64)
    logp = t - t.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    n = len(ids) // seqlen if n_windows is None else n_windows
    ces = []
    for w in range(n):
        win = ids[w * seqlen : (w + 1) * seqlen]
        ces.append(-np.mean(logp[win[:-1], win[1:]]))
    total = sum(ce * seqlen for ce in ces)
    return math.exp(total / (n * seqlen)), np.array(ces)


def test_perplexity_matches_float64_reference():
    table = bigram_table(0)
    ids = np.random.default_rng(1).integers(0, V, size=1000).astype(np.int32)
    seen = []

    def logits_fn(x):
        seen.append(tuple(x.shape))
        return jnp.asarray(table)[x]

    res = perplexity(logits_fn, ids, seqlen=128, progress=False)
    ppl, ces = reference_ppl(table, ids, 128)
    assert isinstance(res, PerplexityResult)
    assert res.n_windows == res.n_windows_total == 7 and not res.partial  # 1000 // 128, tail dropped
    assert res.n_tokens == 1000 and res.seqlen == 128
    assert res.ppl == pytest.approx(ppl, rel=1e-6) and float(res) == res.ppl
    assert res.nll == pytest.approx(math.log(ppl), rel=1e-6)
    np.testing.assert_allclose(res.window_ce, ces, rtol=1e-6)
    assert seen == [(1, 128)] * 7
    # the dropped tail does not matter
    ids2 = ids.copy()
    ids2[7 * 128 :] = (ids2[7 * 128 :] + 1) % V
    assert perplexity(logits_fn, ids2, seqlen=128, progress=False).ppl == res.ppl


def test_batches_padding_and_max_windows():
    table = bigram_table(2)
    ids = np.random.default_rng(3).integers(0, V, size=5 * 64 + 10).astype(np.int32)
    seen = []

    def logits_fn(x):
        seen.append(tuple(x.shape))
        return jnp.asarray(table)[x]

    ref, ces = reference_ppl(table, ids, 64)
    res = perplexity(logits_fn, ids, seqlen=64, batch_size=3, progress=False)
    assert seen == [(3, 64), (3, 64)]  # 5 windows: the last batch padded to a static shape
    assert res.n_windows == 5 and res.ppl == pytest.approx(ref, rel=1e-6)
    np.testing.assert_allclose(res.window_ce, ces, rtol=1e-6)

    part = perplexity(logits_fn, ids, seqlen=64, batch_size=2, max_windows=3, progress=False)
    ref3, _ = reference_ppl(table, ids, 64, n_windows=3)
    assert part.partial and part.n_windows == 3 and part.n_windows_total == 5
    assert part.ppl == pytest.approx(ref3, rel=1e-6)
    assert "partial: first 3 of 5 windows" in str(part)
    d = part.to_dict()
    assert d["partial"] is True and d["n_windows"] == 3 and len(d["window_ce"]) == 3


def test_chunking_and_bf16_logits():
    rng = np.random.default_rng(4)
    logits = (4 * rng.standard_normal((2, 50, V))).astype(np.float32)
    ids = rng.integers(0, V, size=(2, 50)).astype(np.int32)
    a = window_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), chunk=7)
    b = window_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), chunk=256)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # bf16 logits are reduced in float32: reference on the bf16-rounded values in float64
    lb = logits.astype(ml_dtypes.bfloat16)
    c = window_cross_entropy(jnp.asarray(lb), jnp.asarray(ids))
    x = lb.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    picked = np.take_along_axis(x[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(c, (lse[:, :-1] - picked).mean(-1), rtol=1e-6)


def test_nan_logits_name_the_window():
    table = bigram_table(5)
    table[13] = np.nan
    ids = np.random.default_rng(6).integers(0, V, size=4 * 32).astype(np.int32)
    ids[ids == 13] = 14
    ids[2 * 32 + 5] = 13  # only window 2 sees the NaN row
    with pytest.raises(ValueError, match="window 2 is nan"):
        perplexity(lambda x: jnp.asarray(table)[x], ids, seqlen=32, batch_size=2, progress=False)


def test_argument_errors():
    table = jnp.asarray(bigram_table(7))
    ok = np.arange(100, dtype=np.int32) % V
    fn = lambda x: table[x]  # noqa: E731
    with pytest.raises(ValueError, match="1-D integer"):
        perplexity(fn, ok.reshape(10, 10), seqlen=5, progress=False)
    with pytest.raises(ValueError, match="1-D integer"):
        perplexity(fn, ok.astype(np.float32), seqlen=5, progress=False)
    with pytest.raises(ValueError, match="do not fill one window of seqlen=200"):
        perplexity(fn, ok, seqlen=200, progress=False)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        perplexity(fn, ok, seqlen=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(fn, ok, seqlen=10, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(fn, ok, seqlen=10, max_windows=0, progress=False)
    with pytest.raises(ValueError, match=r"returned shape \(1, 9, 97\)"):
        perplexity(lambda x: table[x][:, :-1], ok, seqlen=10, progress=False)


def test_model_perplexity_matches_transformers(tmp_path):
    """A tiny random transformers Llama: our jitted model's protocol perplexity equals the float64
    cross-entropy of PyTorch's own logits."""
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    import jgptq.models as models

    torch.manual_seed(0)
    hf_cfg = HFLlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                           max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.3,
                           rope_theta=10000.0, tie_word_embeddings=False)
    ref_model = HFLlama(hf_cfg).eval()
    ref_model.save_pretrained(tmp_path)
    config, params, _ = models.load(tmp_path, tokenizer=False)

    seqlen = 48
    ids = np.random.default_rng(8).integers(0, 128, size=3 * seqlen + 7).astype(np.int32)
    res = model_perplexity(config, params, ids, seqlen=seqlen, batch_size=2)
    windows = torch.from_numpy(ids[: 3 * seqlen].reshape(3, seqlen)).long()
    with torch.no_grad():
        logits = ref_model(windows).logits.double().numpy()
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    tgt = windows.numpy()[:, 1:]
    ces = -np.take_along_axis(logp[:, :-1], tgt[..., None], -1)[..., 0].mean(-1)
    np.testing.assert_allclose(res.window_ce, ces, rtol=2e-5)
    assert res.ppl == pytest.approx(math.exp(np.sum(ces * seqlen) / (3 * seqlen)), rel=2e-5)
    assert res.ppl > 50  # a random model: near-uniform over 128 tokens, not a trivial value
