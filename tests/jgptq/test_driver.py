"""Tests of the model-level driver ``jgptq.quantize`` and its report.

Independent references: a float64 NumPy Llama block (RMSNorm, RoPE, GQA attention, SwiGLU) written
from the Hugging Face definition, float64 Hessians over unmasked tokens, and the core ``jgptq.gptq``
/ ``jgptq.rtn`` called directly on single modules.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from jgptq.driver import Calibration, module_name, resolve_dynamic
from jgptq.report import ModuleReport, QuantizationReport


# ------------------------------------------------------------------------------------------------
# dynamic rules (GPTQModel semantics)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False


def test_dynamic_first_match_wins_and_skip():
    base = _Cfg()
    dyn = {
        r"-:model\.layers\.0\.mlp\..*": {},
        r"+:.*down_proj": {"bits": 8, "group_size": 32},
        r".*mlp\..*": {"bits": 3},
    }
    assert resolve_dynamic(module_name(0, "mlp.down_proj"), base, dyn) is None
    assert resolve_dynamic(module_name(0, "mlp.up_proj"), base, dyn) is None
    assert resolve_dynamic(module_name(1, "mlp.down_proj"), base, dyn) == _Cfg(bits=8, group_size=32)
    assert resolve_dynamic(module_name(1, "mlp.up_proj"), base, dyn) == _Cfg(bits=3)
    assert resolve_dynamic(module_name(1, "self_attn.q_proj"), base, dyn) is base
    # re.match anchors at the start: a pattern without the prefix does not match mid-name
    assert resolve_dynamic(module_name(2, "mlp.up_proj"), base, {r"layers\.2": {"bits": 2}}) is base
    assert resolve_dynamic(module_name(2, "mlp.up_proj"), base, None) is base


def test_dynamic_validation_errors():
    from jgptq.driver import _validate_dynamic

    with pytest.raises(ValueError, match="unknown GPTQConfig fields"):
        _validate_dynamic(_Cfg(), {"+:.*": {"bitz": 3}})
    with pytest.raises(ValueError, match="invalid regex"):
        _validate_dynamic(_Cfg(), {"-:(": {}})
    _validate_dynamic(_Cfg(), {"-:.*": {"ignored": 1}, "+:.*q_proj": {"bits": 8}})


def test_calibration_normalization():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(3, 7))
    mask = rng.random((3, 7)) > 0.3
    for form in (ids, (ids, mask), {"input_ids": ids, "attention_mask": mask.astype(np.int32)}):
        c = Calibration.from_any(form)
        assert c.ids.dtype == np.int32 and c.mask.dtype == bool and c.ids.shape == (3, 7)
    assert (Calibration.from_any((ids, mask)).mask == mask).all()
    with pytest.raises(ValueError, match="all False"):
        Calibration.from_any((ids, np.zeros_like(mask)))
    with pytest.raises(ValueError, match="does not match"):
        Calibration.from_any((ids, mask[:, :3]))
    with pytest.raises(ValueError, match="integer array"):
        Calibration.from_any(ids.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# report


def _random_report(seed: int) -> QuantizationReport:
    rng = np.random.default_rng(seed)
    mods = []
    for layer in range(3):
        for m in ("self_attn.q_proj", "mlp.down_proj"):
            loss = float(rng.uniform(0.1, 2.0))
            mods.append(ModuleReport(name=module_name(layer, m), layer=layer, shape=(64, 96), method="gptq",
                                     bits=4, group_size=32, sym=True, desc_act=False, loss=loss,
                                     rtn_loss=float(loss * rng.uniform(0.7, 3.0)),
                                     damp=float(rng.uniform(0.01, 0.05)), time_s=float(rng.uniform(0, 1)),
                                     hessian="attn_in", tokens=100))
    mods.append(ModuleReport(name=module_name(3, "mlp.up_proj"), layer=3, shape=(64, 96), method="skip"))
    return QuantizationReport(modules=mods, config={"bits": 4}, calibration={"nsamples": 2},
                              timings={"total": 1.5}, extra={"perplexity": {"fp": np.float32(3.5)}})


def test_report_totals_against_numpy(tmp_path):
    rep = _random_report(1)
    q = [m for m in rep.modules if m.method != "skip"]
    loss = np.array([m.loss for m in q])
    rtn = np.array([m.rtn_loss for m in q])
    t = rep.totals()
    assert t["modules"] == 6 and t["skipped"] == 1 and t["compared"] == 6
    np.testing.assert_allclose(t["loss"], loss.sum(), rtol=1e-12)
    np.testing.assert_allclose(t["rtn_loss"], rtn.sum(), rtol=1e-12)
    np.testing.assert_allclose(t["mean_gain"], np.exp(np.mean(np.log(rtn / loss))), rtol=1e-12)
    assert t["beats_rtn"] == int((loss < rtn).sum())
    np.testing.assert_allclose(t["max_damp"], max(m.damp for m in q))

    path = rep.save(tmp_path)
    assert path.endswith("quantization_report.json")
    raw = json.loads(open(path).read())
    assert raw["totals"]["beats_rtn"] == t["beats_rtn"] and len(raw["modules"]) == 7
    back = QuantizationReport.load(tmp_path)
    assert back.modules == rep.modules and back.totals() == t
    assert not list(tmp_path.glob("*.tmp"))

    table = rep.summary_table()
    assert "layer 0" in table and "layer 3" in table and "total" in table
    assert f"{t['beats_rtn']}/6" in table
    assert set(rep.summary()) == {"totals", "config", "calibration", "timings", "environment", "extra"}


def test_report_rejects_unknown_module_keys():
    d = _random_report(2).to_dict()
    d["modules"][0]["mystery"] = 1
    with pytest.raises(ValueError, match="mystery"):
        QuantizationReport.from_dict(d)


# ------------------------------------------------------------------------------------------------
# the driver on a tiny random Llama (shared runs: the jitted phases compile once per shape)

TINY = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=True)
N_CAL, SEQ, BATCH = 6, 24, 4  # 6 samples in batches of 4: the last batch has 2 padding rows


def tiny_model(seed: int = 0):
    from jgptq.models.config import LlamaConfig

    cfg = LlamaConfig(**TINY)
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden_size, cfg.intermediate_size

    def lin(i, o):
        return {"kernel": (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)}

    def norm():
        return {"scale": (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)}

    params = {
        "embed_tokens": {"embedding": rng.standard_normal((cfg.vocab_size, d)).astype(np.float32)},
        "layers": [{"input_layernorm": norm(),
                    "self_attn": {"q_proj": lin(d, cfg.q_size), "k_proj": lin(d, cfg.kv_size),
                                  "v_proj": lin(d, cfg.kv_size), "o_proj": lin(cfg.q_size, d)},
                    "post_attention_layernorm": norm(),
                    "mlp": {"gate_proj": lin(d, f), "up_proj": lin(d, f), "down_proj": lin(f, d)}}
                   for _ in range(cfg.num_layers)],
        "norm": norm(),
    }
    return cfg, params


def tiny_calibration(seed: int = 1, pad_fill_seed: int = 2):
    """Ids ``[6, 24]`` with right padding on two rows; the padded positions hold random ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY["vocab_size"], size=(N_CAL, SEQ)).astype(np.int32)
    mask = np.ones((N_CAL, SEQ), bool)
    mask[1, 17:] = False
    mask[4, 9:] = False
    fill = np.random.default_rng(pad_fill_seed).integers(0, TINY["vocab_size"], size=ids.shape)
    ids = np.where(mask, ids, fill).astype(np.int32)
    return ids, mask


CFG_KW = dict(bits=4, group_size=32)


@pytest.fixture(scope="module")
def tiny_run():
    import jgptq

    cfg, params = tiny_model()
    ids, mask = tiny_calibration()
    inputs = {}
    qparams, report = jgptq.quantize(
        params, (ids, mask), jgptq.GPTQConfig(**CFG_KW), cfg, batch_size=BATCH, progress=False,
        on_block_input=lambda i, h: inputs.__setitem__(i, np.asarray(h)))
    return dict(cfg=cfg, params=params, ids=ids, mask=mask, qparams=qparams, report=report, inputs=inputs)


def _dequantized_params(qparams):
    from jgptq.pack import dequantize_linear

    def walk(node):
        if isinstance(node, dict) and "qweight" in node:
            return {"kernel": np.asarray(dequantize_linear(node))}
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(qparams)


def _hf_hidden_states(cfg, params, ids, mask):
    """Hidden states of transformers' LlamaModel (float64) for the params tree: list of ``[n, S, D]``."""
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if v is not None})
    model = transformers.LlamaForCausalLM(hf_cfg).double().eval()
    sd = {"model.embed_tokens.weight": params["embed_tokens"]["embedding"],
          "model.norm.weight": params["norm"]["scale"]}
    for i, lp in enumerate(params["layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{i}.{norm}.weight"] = lp[norm]["scale"]
        for part in ("self_attn", "mlp"):
            for name, lin in lp[part].items():
                sd[f"model.layers.{i}.{part}.{name}.weight"] = np.asarray(lin["kernel"]).T
    sd = {k: torch.from_numpy(np.array(v, np.float64)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(pos.astype(np.int64)), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def test_block_inputs_are_the_quantized_models_hidden_states(tiny_run):
    """Block i's captured inputs = transformers' hidden_states[i] of the model whose earlier blocks
    hold the dequantized GPTQ weights (so the driver propagates through the quantized blocks)."""
    r = tiny_run
    ref = _hf_hidden_states(r["cfg"], _dequantized_params(r["qparams"]), r["ids"], r["mask"])
    emb = np.asarray(r["params"]["embed_tokens"]["embedding"])[r["ids"]]
    np.testing.assert_array_equal(r["inputs"][0], emb)
    m = r["mask"]
    for i in range(r["cfg"].num_layers):
        got = r["inputs"][i]
        assert got.shape == (N_CAL, SEQ, TINY["hidden_size"])
        np.testing.assert_allclose(got[m], ref[i][m], rtol=2e-4, atol=2e-4)
    # ...and not the float model's (the quantization did change block 0)
    ref_fp = _hf_hidden_states(r["cfg"], r["params"], r["ids"], r["mask"])
    assert np.abs(r["inputs"][1][m] - ref_fp[1][m]).max() > 1e-3


def _rms(x, scale, eps=TINY["rms_norm_eps"]):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def test_report_complete_and_losses_match_float64(tiny_run):
    import jgptq
    from jgptq.solver import rtn
    from jgptq.pack import dequantize_linear

    r = tiny_run
    rep, cfg = r["report"], r["cfg"]
    names = [module_name(i, m) for i in range(cfg.num_layers)
             for g in (["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
                       ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]) for m in g]
    assert [m.name for m in rep.modules] == names
    tokens = int(r["mask"].sum())
    for m in rep.modules:
        assert m.method == "gptq" and m.bits == 4 and m.group_size == 32
        assert np.isfinite(m.loss) and m.loss > 0 and np.isfinite(m.rtn_loss) and m.rtn_loss > 0
        assert m.damp >= 0.01 - 1e-7 and m.time_s >= 0 and m.tokens == tokens
    assert rep.calibration == {"nsamples": N_CAL, "seqlen": SEQ, "tokens": tokens, "batch_size": BATCH,
                               "attention": "xla"}
    for k in ("embed", "hessian", "quantize", "forward", "pack", "total"):
        assert rep.timings[k] >= 0
    t = rep.totals()
    assert t["modules"] == 14 and t["compared"] == 14

    # q/k/v of every block: loss = tr(ΔWᵀ Σ ΔW) / T in float64 over the unmasked tokens only
    by_name = {m.name: m for m in rep.modules}
    m = r["mask"]
    for i in range(cfg.num_layers):
        lp = r["params"]["layers"][i]
        x = _rms(r["inputs"][i], lp["input_layernorm"]["scale"])[m]
        sigma = x.T @ x
        for mod in ("q_proj", "k_proj", "v_proj"):
            w = np.asarray(lp["self_attn"][mod]["kernel"], np.float64)
            q = np.asarray(dequantize_linear(r["qparams"]["layers"][i]["self_attn"][mod]), np.float64)
            q_rtn = np.asarray(rtn(jnp_f32(w), jgptq.GPTQConfig(**CFG_KW)).dequantize(), np.float64)
            want = np.trace((w - q).T @ sigma @ (w - q)) / tokens
            want_rtn = np.trace((w - q_rtn).T @ sigma @ (w - q_rtn)) / tokens
            got = by_name[module_name(i, f"self_attn.{mod}")]
            np.testing.assert_allclose(got.loss, want, rtol=2e-3)
            np.testing.assert_allclose(got.rtn_loss, want_rtn, rtol=2e-3)


def jnp_f32(x):
    import jax.numpy as jnp

    return jnp.asarray(x, jnp.float32)


def test_gptq_beats_rtn_on_the_tiny_model(tiny_run):
    t = tiny_run["report"].totals()
    assert t["loss"] < 0.9 * t["rtn_loss"], t
    assert t["beats_rtn"] >= 12, t


def test_padding_never_reaches_the_hessians(tiny_run):
    """Different ids under the mask ⇒ bit-identical quantized weights and losses."""
    import jax

    import jgptq

    r = tiny_run
    ids2, mask2 = tiny_calibration(pad_fill_seed=99)
    assert (ids2 != r["ids"])[~r["mask"]].any() and (ids2 == r["ids"])[r["mask"]].all()
    q2, rep2 = jgptq.quantize(r["params"], (ids2, mask2), jgptq.GPTQConfig(**CFG_KW), r["cfg"],
                              batch_size=BATCH, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(r["qparams"]["layers"]), jax.tree_util.tree_leaves(q2["layers"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [m.loss for m in rep2.modules] == [m.loss for m in r["report"].modules]
    # control: changing an unmasked id does change the result
    ids3 = ids2.copy()
    ids3[0, 3] = (ids3[0, 3] + 1) % TINY["vocab_size"]
    _, rep3 = jgptq.quantize(r["params"], (ids3, mask2), jgptq.GPTQConfig(**CFG_KW), r["cfg"],
                             batch_size=BATCH, progress=False)
    assert [m.loss for m in rep3.modules] != [m.loss for m in rep2.modules]


def test_shared_hessian_concatenation_is_exact():
    """GPTQ treats output columns independently: quantizing [k | v | q] in one call (one Cholesky)
    gives the codes of three separate calls with the same H."""
    import jax.numpy as jnp

    import jgptq
    from jgptq.solver import gptq

    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 64)) * rng.uniform(0.2, 3.0, 64)
    h = jnp.asarray(2 * x.T @ x / 200, jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((64, n)), jnp.float32) for n in (32, 32, 64)]
    for cfg in (jgptq.GPTQConfig(**CFG_KW), jgptq.GPTQConfig(bits=3, group_size=32, desc_act=True)):
        cat = gptq(jnp.concatenate(ws, axis=1), h, cfg)
        sep = np.concatenate([np.asarray(gptq(w, h, cfg).codes) for w in ws], axis=1)
        assert (np.asarray(cat.codes) == sep).mean() > 0.999


def test_rtn_mode_matches_core_rtn_and_dynamic_rules():
    import jax

    import jgptq
    from jgptq.solver import rtn

    cfg, params = tiny_model(seed=3)
    dyn = {r"-:model\.layers\.1\.mlp\.down_proj": {}, r"+:.*\.q_proj": {"bits": 8}}
    base = jgptq.GPTQConfig(**CFG_KW)
    q, rep = jgptq.quantize(params, None, base, cfg, mode="rtn", dynamic=dyn, progress=False)
    for i, layer in enumerate(params["layers"]):
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            part, name = mod.split(".")
            got = q["layers"][i][part][name]
            if i == 1 and mod == "mlp.down_proj":
                assert sorted(got) == ["kernel"] and got["kernel"] is layer[part][name]["kernel"]  # float, untouched
                continue
            c = base.replace(bits=8) if name == "q_proj" else base
            want = rtn(jnp_f32(layer[part][name]["kernel"]), c).to_params()
            assert sorted(got) == sorted(want)
            for k in want:
                np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    by = {m.name: m for m in rep.modules}
    assert by[module_name(1, "mlp.down_proj")].method == "skip"
    assert by[module_name(0, "self_attn.q_proj")].bits == 8 and by[module_name(0, "self_attn.k_proj")].bits == 4
    assert rep.totals()["skipped"] == 1 and rep.totals()["modules"] == 13
    assert all(m.loss is None for m in rep.modules)
    jax.tree_util.tree_leaves(q)  # a valid pytree


def test_nonfinite_weights_are_rejected():
    import jgptq

    cfg, params = tiny_model(seed=4)
    params["layers"][1]["mlp"]["up_proj"]["kernel"][3, 5] = np.nan
    ids, mask = tiny_calibration()
    with pytest.raises(ValueError, match=r"up_proj.*NaN"):
        jgptq.quantize(params, (ids, mask), jgptq.GPTQConfig(**CFG_KW), cfg, progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        jgptq.quantize(tiny_model()[1], None, jgptq.GPTQConfig(**CFG_KW), cfg, progress=False)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 96\)"):
        jgptq.quantize(tiny_model()[1], ids + 96, jgptq.GPTQConfig(**CFG_KW), cfg, progress=False)


def test_true_sequential_false_uses_the_float_block(tiny_run):
    """One Hessian pass on the float block: k/v/q (first group either way) are identical to the
    true-sequential run, while o_proj now sees float q/k/v inputs and so differs."""
    import jgptq

    r = tiny_run
    q2, rep2 = jgptq.quantize(r["params"], (r["ids"], r["mask"]),
                              jgptq.GPTQConfig(**CFG_KW, true_sequential=False), r["cfg"],
                              batch_size=BATCH, progress=False)
    l0, l0_seq = q2["layers"][0]["self_attn"], r["qparams"]["layers"][0]["self_attn"]
    for mod in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_array_equal(np.asarray(l0[mod]["qweight"]), np.asarray(l0_seq[mod]["qweight"]))
    assert (np.asarray(l0["o_proj"]["qweight"]) != np.asarray(l0_seq["o_proj"]["qweight"])).any()
    assert [m.name for m in rep2.modules] == [m.name for m in r["report"].modules]
    assert rep2.totals()["compared"] == 14


def test_biases_are_carried_over():
    import jgptq

    cfg, params = tiny_model(seed=6)
    cfg = cfg.replace(qkv_bias=True, o_bias=True)
    rng = np.random.default_rng(6)
    for lp in params["layers"]:
        for name, lin in lp["self_attn"].items():
            lin["bias"] = rng.standard_normal(lin["kernel"].shape[1]).astype(np.float32)
    ids, mask = tiny_calibration()
    q, _ = jgptq.quantize(params, (ids, mask), jgptq.GPTQConfig(**CFG_KW), cfg, batch_size=BATCH,
                          progress=False)
    for lp, qp in zip(params["layers"], q["layers"]):
        for name, lin in lp["self_attn"].items():
            assert qp["self_attn"][name]["bias"] is lin["bias"]
            assert "qweight" in qp["self_attn"][name]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_staged_block_equals_rerunning_the_whole_block(tiny_run, true_sequential):
    """The driver's stages (attention once per block) give the reference's results: every group of
    block 1 equals ``jgptq.gptq`` on the Hessian of that group's input captured by re-running the
    whole block (``decoder_block(capture=True)``) with the groups before it quantized (true
    sequential) or all float (not), from the driver's own block inputs."""
    import jax.numpy as jnp

    import jgptq
    from jgptq.hessian import hessian_from_activations
    from jgptq.models import llama
    from jgptq.pack import dequantize_linear, unpack_rows

    r = tiny_run
    if true_sequential:
        qparams, inputs = r["qparams"], r["inputs"]
    else:
        inputs = {}
        qparams, _ = jgptq.quantize(r["params"], (r["ids"], r["mask"]),
                                    jgptq.GPTQConfig(**CFG_KW, true_sequential=False), r["cfg"],
                                    batch_size=BATCH, progress=False,
                                    on_block_input=lambda i, h: inputs.__setitem__(i, np.asarray(h)))
    i = 1
    float_layer = r["params"]["layers"][i]
    quant_layer = qparams["layers"][i]
    layer = {part: {k: (dict(v) if isinstance(v, dict) else v) for k, v in sub.items()}
             for part, sub in float_layer.items()}
    mask = jnp.asarray(r["mask"])
    cfg = jgptq.GPTQConfig(**CFG_KW)
    for group in llama.LINEAR_GROUPS:
        _, cap = llama.decoder_block(layer, jnp.asarray(inputs[i]), None, mask, r["cfg"], capture=True)
        h = hessian_from_activations(cap[llama.LINEAR_INPUT[group[0]]], mask)
        for mod in group:
            part, name = mod.split(".")
            want = jgptq.gptq(jnp.asarray(float_layer[part][name]["kernel"]), h, cfg)
            got = quant_layer[part][name]
            codes = np.asarray(unpack_rows(jnp.asarray(got["qweight"]), 4, got["g_idx"].shape[0]))
            assert (codes == np.asarray(want.codes)).mean() > 0.999, mod
        if true_sequential:  # later groups see this group quantized
            for mod in group:
                part, name = mod.split(".")
                layer[part][name] = {"kernel": np.asarray(dequantize_linear(quant_layer[part][name]))}
