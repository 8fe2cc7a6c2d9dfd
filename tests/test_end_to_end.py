"""End to end: ``jgptq quantize`` → checkpoint → load → perplexity → generate.

- a tiny random Llama (saved by transformers, with a word-level tokenizer) through the command line,
  with padded calibration documents, then the written GPTQ folder loaded back and run;
- an interrupted write leaves no folder that looks like a checkpoint;
- (slow) the real SmolLM2-135M with a small calibration: GPTQ beats RTN's layer loss on average.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

WORDS = [f"w{i}" for i in range(200)]


def _tiny_folder(root: Path) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = root / "tiny"
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                   initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def _text_files(root: Path) -> tuple[Path, Path]:
    """Calibration documents of varied lengths (some shorter than seqlen ⇒ padding) and eval text.

    Word sequences follow a random Markov chain so the text is learnable-looking, not uniform noise.
    """
    rng = np.random.default_rng(0)
    nxt = rng.integers(0, len(WORDS), size=(len(WORDS), 3))

    def doc(n: int) -> str:
        w = int(rng.integers(len(WORDS)))
        out = []
        for _ in range(n):
            out.append(WORDS[w])
            w = int(nxt[w, rng.integers(3)])
        return " ".join(out)

    calib = root / "calib.txt"
    calib.write_text("\n".join(doc(int(n)) for n in rng.integers(10, 80, size=30)) + "\n")
    ev = root / "eval.txt"
    ev.write_text(doc(200))
    return calib, ev


def _run_cli(args: list[str]) -> int:
    from jgptq.cli import main

    return main(["quantize", *args])


def test_cli_quantize_eval_generate_tiny(tmp_path, capsys):
    import jax.numpy as jnp

    import jgptq.models as models
    from jgptq.evaluate import model_perplexity
    from jgptq.models.generate import generate
    from jgptq.models.llama import LlamaForCausalLM
    from jgptq.report import QuantizationReport

    folder = _tiny_folder(tmp_path)
    calib, ev = _text_files(tmp_path)
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--calib", str(calib), "--nsamples", "12", "--seqlen", "32",
            "--bits", "4", "--group-size", "32", "--eval", str(ev), "--eval-seqlen", "32",
            "--eval-windows", "4", "--batch-size", "4", "--out", str(out), "--quiet",
            "--dynamic", json.dumps({r"-:model\.layers\.1\.mlp\.down_proj": {}})]
    assert _run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "perplexity" in printed

    names = sorted(os.listdir(out))
    for f in ("config.json", "quantize_config.json", "model.safetensors", "quantization_report.json"):
        assert f in names
    assert sorted(os.listdir(tmp_path)) == ["calib.txt", "eval.txt", "out", "tiny"]  # no partial folders

    rep = QuantizationReport.load(out)
    t = rep.totals()
    assert t["modules"] == 13 and t["skipped"] == 1 and t["compared"] == 13 and t["loss"] < t["rtn_loss"]
    assert rep.calibration["nsamples"] == 12 and rep.calibration["seqlen"] == 32
    assert rep.calibration["tokens"] < 12 * 32  # some documents were padded, padding not counted
    ppl = rep.extra["perplexity"]
    assert ppl["windows"] == 4 and all(math.isfinite(ppl[k]) for k in ("fp", "rtn", "gptq"))
    summary = json.loads((out / "config.json").read_text())["quantization_config"]
    assert summary["bits"] == 4 and summary["group_size"] == 32 and summary["quant_method"] == "gptq"

    # the folder loads back as a GPTQ model and scores what the report says it scored
    loaded = models.load(out)
    assert loaded.kind == "gptq"
    config, qparams, tokenizer = loaded
    assert "qweight" in qparams["layers"][0]["mlp"]["down_proj"]
    assert "kernel" in qparams["layers"][1]["mlp"]["down_proj"]  # skipped by the dynamic rule: float
    ids = tokenizer(ev.read_text(), add_special_tokens=False)["input_ids"]
    again = model_perplexity(config, qparams, np.asarray(ids), seqlen=32, max_windows=4).ppl
    np.testing.assert_allclose(again, ppl["gptq"], rtol=2e-2)  # checkpoint stores fp16 embeddings

    # and generates: greedy continuation = argmax of a full forward at every step
    model = LlamaForCausalLM.from_params(config, qparams)
    prompt = ids[:7]
    gen = generate(model, None, [prompt], max_new_tokens=4)[0]
    assert len(gen) == 4 and all(0 <= g < config.vocab_size for g in gen)
    seq = list(prompt)
    for g in gen:
        logits = np.asarray(model(jnp.asarray([seq], jnp.int32)))
        assert int(np.argmax(logits[0, -1])) == g
        seq.append(g)

    # refuses to overwrite a finished checkpoint unless asked
    with pytest.raises(SystemExit, match="already exists"):
        _run_cli(argv)


def test_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch, capsys):
    import jgptq.checkpoint as checkpoint

    folder = _tiny_folder(tmp_path)
    calib, _ = _text_files(tmp_path)
    out = tmp_path / "out"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_safetensors_folder", boom)
    rc = _run_cli(["--model", str(folder), "--calib", str(calib), "--nsamples", "12", "--seqlen", "32",
                   "--bits", "4", "--group-size", "32", "--batch-size", "4", "--no-eval", "--out", str(out),
                   "--quiet"])  # the shapes of the test above: compiled code is reused
    assert rc == 130
    assert "quantized 2 blocks" in capsys.readouterr().out  # interrupted while writing, not before
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["calib.txt", "eval.txt", "tiny"]


@pytest.mark.slow
def test_real_model_small_calibration_beats_rtn(tmp_path, smollm2_gguf_path, brown_dir):
    """SmolLM2-135M, 8 x 256 Brown-train tokens, 4-bit g128: GPTQ's layer loss beats RTN's on average."""
    from jgptq.report import QuantizationReport

    out = tmp_path / "smollm2-gptq"
    rc = _run_cli(["--model", str(smollm2_gguf_path), "--nsamples", "8", "--seqlen", "256",
                   "--eval-windows", "1", "--eval-seqlen", "256", "--out", str(out), "--quiet"])
    assert rc == 0
    rep = QuantizationReport.load(out)
    t = rep.totals()
    assert t["modules"] == 210 and t["compared"] == 210
    assert t["mean_gain"] > 1.5, t  # geometric mean of RTN loss / GPTQ loss over the 210 linears
    assert t["beats_rtn"] >= 200, t
    per_layer = {}
    for m in rep.modules:
        per_layer.setdefault(m.layer, []).append(m.rtn_loss / m.loss)
    assert all(np.mean(v) > 1.0 for v in per_layer.values())
    ppl = rep.extra["perplexity"]
    assert math.isfinite(ppl["gptq"]) and ppl["gptq"] < 2 * ppl["fp"]
