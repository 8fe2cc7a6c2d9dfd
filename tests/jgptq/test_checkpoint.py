"""GPTQ checkpoint exchange: byte-level packing, export layout, import checks, bad files.

The expected bytes and dequantized weights come from ``golden_pack`` (a Python-integer transcription
of the format spec, independent of jgptq's packer) and from NumPy float64 arithmetic; folders are read
back with the ``safetensors`` library, not with jgptq's own reader.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import golden_pack as gp  # noqa: E402

from jgptq import pack  # noqa: E402
from jgptq.checkpoint import (CheckpointError, atomic_folder, export_gptq, export_hf,  # noqa: E402
                              parse_size)
from jgptq.config import GPTQConfig  # noqa: E402
from jgptq.models.config import LlamaConfig  # noqa: E402
from jgptq.models.gptq_folder import GPTQFolderError, load_gptq_folder  # noqa: E402

HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
          "mlp.down_proj": (128, 64)}


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a folder via the safetensors library (an independent reader)."""
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def tiny_params(seed: int, bits: int, group_size: int, sym: bool, act_order: bool, *,
                zero_free: bool = False) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Random quantized params for the HF config above and the raw (unpacked) quantized linears."""
    rng = np.random.default_rng(seed)
    raw: dict[str, dict[str, np.ndarray]] = {}
    layers = []
    for i in range(HF["num_hidden_layers"]):
        lp: dict[str, Any] = {"input_layernorm": {"scale": rng.normal(1, 0.1, 64).astype(np.float32)},
                              "post_attention_layernorm": {"scale": rng.normal(1, 0.1, 64).astype(np.float32)},
                              "self_attn": {}, "mlp": {}}
        for name, (n_in, n_out) in SHAPES.items():
            q = gp.random_quantized(rng, n_in, n_out, bits, group_size, sym, act_order)
            if zero_free:
                q["zeros"] = np.maximum(q["zeros"], 1).astype(np.uint8)
            raw[f"model.layers.{i}.{name}"] = q
            mod, proj = name.split(".")
            lp[mod][proj] = {"qweight": gp.pack_rows(q["codes"], bits), "scales": q["scales"],
                             "zeros": q["zeros"], "g_idx": q["g_idx"]}
        layers.append(lp)
    params = {"embed_tokens": {"embedding": rng.normal(0, 1, (96, 64)).astype(np.float32)}, "layers": layers,
              "norm": {"scale": rng.normal(1, 0.1, 64).astype(np.float32)},
              "lm_head": {"kernel": rng.normal(0, 0.1, (64, 96)).astype(np.float32)}}
    return params, raw


def config() -> LlamaConfig:
    return LlamaConfig.from_hf(HF)


# ------------------------------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("bits", gp.BITS)
def test_golden_words_rows_and_cols(bits: int) -> None:
    codes, words = gp.GOLDEN[bits]
    col = np.array(codes, dtype=np.uint8)[:, None]
    # qweight: 32 values down the input dim of one output column -> `bits` words
    np.testing.assert_array_equal(pack.pack_rows(col, bits)[:, 0], gp.as_int32(words))
    np.testing.assert_array_equal(pack.unpack_rows(gp.as_int32(words)[:, None], bits, 32)[:, 0], codes)
    # qzeros: the same 32 values along the output dim of one group -> the same words along columns
    np.testing.assert_array_equal(pack.pack_cols(col.T, bits)[0], gp.as_int32(words))


def test_golden_3bit_straddle_second_pattern() -> None:
    col = np.array(gp.GOLDEN_3BIT_CODES_B, dtype=np.uint8)[:, None]
    np.testing.assert_array_equal(pack.pack_rows(col, 3)[:, 0], gp.as_int32(gp.GOLDEN_3BIT_WORDS_B))


@pytest.mark.parametrize("bits", gp.BITS)
def test_export_bytes_match_independent_packer(tmp_path: Path, bits: int) -> None:
    params, raw = tiny_params(1, bits, 32, sym=False, act_order=True)
    qc = GPTQConfig(bits=bits, group_size=32, sym=False, desc_act=True)
    export_gptq(tmp_path / "v2", config(), params, qc, checkpoint_format="gptq_v2")
    t = read_folder(tmp_path / "v2")
    for name, q in raw.items():
        np.testing.assert_array_equal(t[f"{name}.qweight"], gp.pack_rows(q["codes"], bits))
        np.testing.assert_array_equal(t[f"{name}.qzeros"], gp.pack_cols(q["zeros"], bits))
        assert t[f"{name}.scales"].dtype == np.float16 and t[f"{name}.g_idx"].dtype == np.int32
        np.testing.assert_array_equal(t[f"{name}.g_idx"], q["g_idx"])
        w = gp.dequantize(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"], t[f"{name}.g_idx"],
                          bits, "gptq_v2")
        ref = q["scales"].astype(np.float64)[q["g_idx"]] * (q["codes"].astype(np.float64)
                                                             - q["zeros"].astype(np.float64)[q["g_idx"]])
        np.testing.assert_array_equal(w, ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sym_v1_qzeros_are_the_classic_words(tmp_path: Path, bits: int) -> None:
    params, _ = tiny_params(2, bits, 32, sym=True, act_order=False)
    export_gptq(tmp_path / "f", config(), params, GPTQConfig(bits=bits, group_size=32, sym=True))
    t = read_folder(tmp_path / "f")
    qz = t["model.layers.1.mlp.down_proj.qzeros"]
    assert np.all(qz.view(np.uint32) == gp.SYM_V1_QZERO_WORD[bits])
    q = json.loads((tmp_path / "f" / "quantize_config.json").read_text())
    assert q["checkpoint_format"] == "gptq" and q["format"] == "gptq"


def test_v1_refuses_zero_zero_and_auto_picks_v2(tmp_path: Path) -> None:
    params, raw = tiny_params(3, 4, 32, sym=False, act_order=False)
    assert any((q["zeros"] == 0).any() for q in raw.values())
    qc = GPTQConfig(bits=4, group_size=32, sym=False)
    with pytest.raises(CheckpointError, match="zero point of 0 cannot be stored in GPTQ v1"):
        export_gptq(tmp_path / "v1", config(), params, qc, checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()
    export_gptq(tmp_path / "auto", config(), params, qc)
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"][
        "checkpoint_format"] == "gptq_v2"
    # every zero >= 1: auto writes v1, storing zero - 1
    params, raw = tiny_params(3, 4, 32, sym=False, act_order=False, zero_free=True)
    export_gptq(tmp_path / "auto1", config(), params, qc)
    t = read_folder(tmp_path / "auto1")
    name = "model.layers.0.self_attn.q_proj"
    assert json.loads((tmp_path / "auto1" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    np.testing.assert_array_equal(gp.unpack_cols(t[f"{name}.qzeros"], 4), raw[name]["zeros"].astype(np.int64) - 1)


# ------------------------------------------------------------------------------------------------ layout


def test_folder_layout_and_configs(tmp_path: Path) -> None:
    params, _ = tiny_params(4, 3, 32, sym=True, act_order=True)
    qc = GPTQConfig(bits=3, group_size=32, sym=True, desc_act=True, damp_percent=0.05)
    out = export_gptq(tmp_path / "m", config(), params, qc, tokenizer=None, generation_config={"do_sample": False})
    names = sorted(os.listdir(out))
    assert names == ["config.json", "generation_config.json", "model.safetensors", "quantize_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    q = json.loads((out / "quantize_config.json").read_text())
    assert cfg["quantization_config"] == q
    assert q["quant_method"] == "gptq" and q["bits"] == 3 and q["group_size"] == 32 and q["desc_act"] is True
    assert q["sym"] is True and q["damp_percent"] == 0.05 and q["pack_dtype"] == "int32"
    assert q["meta"]["quantizer"][0].startswith("jgptq:")
    assert LlamaConfig.from_hf(cfg) == config()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    t = read_folder(out)
    assert t["model.embed_tokens.weight"].dtype == np.float16
    np.testing.assert_array_equal(t["lm_head.weight"], params["lm_head"]["kernel"].T.astype(np.float16))
    assert not any(k.endswith(".weight") and "proj" in k for k in t)
    assert sum(k.endswith(".g_idx") for k in t) == 14


def test_sharded_export_round_trips(tmp_path: Path) -> None:
    params, _ = tiny_params(5, 4, 32, sym=False, act_order=True)
    qc = GPTQConfig(bits=4, group_size=32, sym=False, desc_act=True)
    out = export_gptq(tmp_path / "s", config(), params, qc, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    t = read_folder(out)
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in t.values())
    _, back, _, info = load_gptq_folder(out, tokenizer=False)
    _assert_same_quantized(back, params)
    assert len(info.weight_files) == len(shards)


def _assert_same_quantized(a: dict[str, Any], b: dict[str, Any]) -> None:
    for la, lb in zip(a["layers"], b["layers"]):
        for mod in ("self_attn", "mlp"):
            for proj, lin in la[mod].items():
                for key in ("qweight", "zeros", "g_idx"):
                    np.testing.assert_array_equal(np.asarray(lin[key]), np.asarray(lb[mod][proj][key]))
                np.testing.assert_array_equal(np.asarray(lin["scales"]),
                                              np.asarray(lb[mod][proj]["scales"]).astype(np.float16))


@pytest.mark.parametrize("bits,sym,fmt", [(2, True, "auto"), (3, False, "gptq_v2"), (8, False, "auto"),
                                          (4, True, "gptq_v2")])
def test_export_import_round_trip(tmp_path: Path, bits: int, sym: bool, fmt: str) -> None:
    params, _ = tiny_params(6, bits, -1 if bits == 8 else 32, sym=sym, act_order=bits != 8)
    qc = GPTQConfig(bits=bits, group_size=-1 if bits == 8 else 32, sym=sym, desc_act=bits != 8)
    export_gptq(tmp_path / "r", config(), params, qc, checkpoint_format=fmt, dtype="float32")
    cfg, back, tok, info = load_gptq_folder(tmp_path / "r")
    assert cfg == config() and tok is None and info.bits == bits and info.sym == sym
    _assert_same_quantized(back, params)
    np.testing.assert_array_equal(back["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(back["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_float_export_round_trip_and_transformers_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    params, _ = tiny_params(7, 4, 32, True, False)
    for lp in params["layers"]:
        for mod in ("self_attn", "mlp"):
            for proj in lp[mod]:
                n_in, n_out = SHAPES[f"{mod}.{proj}"]
                lp[mod][proj] = {"kernel": rng.normal(size=(n_in, n_out)).astype(np.float32)}
    out = export_hf(tmp_path / "f", config(), params)
    from jgptq.models.hf import load_hf

    cfg, back, _ = load_hf(out, tokenizer=False)
    assert cfg == config()
    np.testing.assert_array_equal(back["layers"][1]["mlp"]["down_proj"]["kernel"],
                                  params["layers"][1]["mlp"]["down_proj"]["kernel"])
    t = read_folder(out)
    np.testing.assert_array_equal(t["model.layers.0.self_attn.k_proj.weight"],
                                  params["layers"][0]["self_attn"]["k_proj"]["kernel"].T)
    with pytest.raises(CheckpointError, match="quantized linears"):
        export_hf(tmp_path / "q", config(), tiny_params(7, 4, 32, True, False)[0])


# ------------------------------------------------------------------------------------------------ atomicity


def test_crash_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jgptq.checkpoint as ck

    params, _ = tiny_params(8, 4, 32, True, False)
    calls = {"n": 0}
    real = ck.write_json

    def failing(path: Any, obj: Any) -> None:
        calls["n"] += 1
        if Path(path).name == "config.json":
            raise OSError("disk full (simulated)")
        real(path, obj)

    monkeypatch.setattr(ck, "write_json", failing)
    with pytest.raises(OSError, match="simulated"):
        export_gptq(tmp_path / "out", config(), params, GPTQConfig(bits=4, group_size=32))
    assert calls["n"] >= 2
    assert os.listdir(tmp_path) == []


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    params, _ = tiny_params(9, 4, 32, True, False)
    qc = GPTQConfig(bits=4, group_size=32)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        export_gptq(tmp_path / "out", config(), params, qc)
    export_gptq(tmp_path / "out", config(), params, qc, overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_folder_error_keeps_old_content(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "d", overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "d") == ["keep"] and sorted(os.listdir(tmp_path)) == ["d"]


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(CheckpointError, match="cannot parse size"):
        parse_size("lots")


# ------------------------------------------------------------------------------------------------ export refusals


def test_export_refuses_inconsistent_params(tmp_path: Path) -> None:
    cfg = config()
    params, _ = tiny_params(10, 4, 32, sym=True, act_order=True)
    with pytest.raises(CheckpointError, match="desc_act=False"):
        export_gptq(tmp_path / "a", cfg, params, GPTQConfig(bits=4, group_size=32, sym=True, desc_act=False))
    params, _ = tiny_params(10, 4, 32, sym=False, act_order=False)
    with pytest.raises(CheckpointError, match="sym=True requires every zero point = 8"):
        export_gptq(tmp_path / "b", cfg, params, GPTQConfig(bits=4, group_size=32, sym=True))
    with pytest.raises(CheckpointError, match="holds 4-bit codes but the quantization config says 3 bits"):
        export_gptq(tmp_path / "c", cfg, params, GPTQConfig(bits=3, group_size=32, sym=False))
    params["layers"][0]["mlp"]["up_proj"]["scales"] = params["layers"][0]["mlp"]["up_proj"]["scales"].copy()
    params["layers"][0]["mlp"]["up_proj"]["scales"][0, 3] = np.nan
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        export_gptq(tmp_path / "d", cfg, params, GPTQConfig(bits=4, group_size=32, sym=False))
    params, _ = tiny_params(10, 4, 32, sym=True, act_order=False)
    params["embed_tokens"]["embedding"][0, 0] = 1e6
    with pytest.raises(CheckpointError, match="beyond float16"):
        export_gptq(tmp_path / "e", cfg, params, GPTQConfig(bits=4, group_size=32))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ import checks


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    params, _ = tiny_params(11, 4, 32, sym=True, act_order=True)
    return export_gptq(tmp_path / "m", config(), params, GPTQConfig(bits=4, group_size=32, sym=True, desc_act=True))


def _rewrite(folder: Path, fn) -> None:
    from safetensors.numpy import save_file

    t = dict(read_folder(folder))
    fn(t)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_json(path: Path, **changes: Any) -> None:
    d = json.loads(path.read_text())
    target = d.get("quantization_config", d) if path.name == "config.json" else d
    for k, v in changes.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v
    path.write_text(json.dumps(d))


def test_mislabelled_sym_zeros_detected(folder: Path) -> None:
    name = "model.layers.1.self_attn.o_proj.qzeros"

    def to_v2(t: dict[str, np.ndarray]) -> None:
        for k in [k for k in t if k.endswith(".qzeros")]:
            t[k] = gp.pack_cols(np.full((t[k].shape[0], t[k].shape[1] * 8), 8), 4)

    _rewrite(folder, to_v2)
    assert np.all(read_folder(folder)[name].view(np.uint32) == 0x88888888)
    with pytest.raises(GPTQFolderError, match="mislabelled.*stored as 8.*'gptq_v2'"):
        load_gptq_folder(folder, tokenizer=False)
    # with the override the file decodes to the same weights as before
    with pytest.warns(UserWarning, match="override"):
        _, params, _, info = load_gptq_folder(folder, tokenizer=False, checkpoint_format="gptq_v2")
    assert np.all(np.asarray(params["layers"][1]["self_attn"]["o_proj"]["zeros"]) == 8)
    assert info.checkpoint_format == "gptq_v2" and any("override" in w for w in info.warnings)


def test_sym_with_varying_zeros_is_an_error(folder: Path) -> None:
    def vary(t: dict[str, np.ndarray]) -> None:
        k = "model.layers.0.mlp.up_proj.qzeros"
        z = gp.unpack_cols(t[k], 4)
        z[0, 5] = 3
        t[k] = gp.pack_cols(z, 4)

    _rewrite(folder, vary)
    with pytest.raises(GPTQFolderError, match="up_proj: sym=True but the stored zero points"):
        load_gptq_folder(folder, tokenizer=False)


@pytest.mark.parametrize("case,pattern", [
    ("truncated", "truncated"),
    ("wrong_dtype", "qweight has dtype int64, expected int32"),
    ("missing_g_idx", "has no 'g_idx' tensor"),
    ("g_idx_range", "g_idx spans \\[0, 9\\], outside \\[0, 2\\)"),
    ("bad_shape", "qzeros has shape"),
    ("extra_tensor", "does not understand"),
    ("nan_norm", "NaN/Inf"),
])
def test_bad_files_are_clear_errors(folder: Path, case: str, pattern: str) -> None:
    st = folder / "model.safetensors"
    if case == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) - 1000])
    else:
        def edit(t: dict[str, np.ndarray]) -> None:
            k = "model.layers.0.mlp.down_proj"
            if case == "wrong_dtype":
                t[f"{k}.qweight"] = t[f"{k}.qweight"].astype(np.int64)
            elif case == "missing_g_idx":
                del t[f"{k}.g_idx"]
            elif case == "g_idx_range":
                t[f"{k.replace('down', 'up')}.g_idx"] = t[f"{k.replace('down', 'up')}.g_idx"].copy()
                t[f"{k.replace('down', 'up')}.g_idx"][3] = 9
            elif case == "bad_shape":
                t[f"{k}.qzeros"] = t[f"{k}.qzeros"][:2]
            elif case == "extra_tensor":
                t["model.layers.0.mlp.extra.weight"] = np.ones(3, np.float16)
            elif case == "nan_norm":
                t["model.norm.weight"] = t["model.norm.weight"].copy()
                t["model.norm.weight"][1] = np.nan
        _rewrite(folder, edit)
    with pytest.raises(GPTQFolderError, match=pattern):
        load_gptq_folder(folder, tokenizer=False)


def test_inconsistent_and_unsupported_configs(folder: Path) -> None:
    _edit_json(folder / "quantize_config.json", bits=8)
    with pytest.raises(GPTQFolderError, match="disagree on .*bits"):
        load_gptq_folder(folder, tokenizer=False)
    _edit_json(folder / "quantize_config.json", bits=4, checkpoint_format="marlin", format=None)
    _edit_json(folder / "config.json", checkpoint_format="marlin", format=None)
    with pytest.raises(GPTQFolderError, match="Marlin"):
        load_gptq_folder(folder, tokenizer=False)
    _edit_json(folder / "quantize_config.json", checkpoint_format="gptq", group_size=16)
    _edit_json(folder / "config.json", checkpoint_format="gptq", group_size=16)
    with pytest.raises(GPTQFolderError, match="qzeros has shape .* group_size=16; the file does not match its config"):
        load_gptq_folder(folder, tokenizer=False)


def test_autogptq_naming_and_quantize_config_only(folder: Path) -> None:
    ref = load_gptq_folder(folder, tokenizer=False)[1]
    os.rename(folder / "model.safetensors", folder / "gptq_model-4bit-32g.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]
    (folder / "config.json").write_text(json.dumps(cfg))
    q = json.loads((folder / "quantize_config.json").read_text())
    for k in ("checkpoint_format", "format", "quant_method", "meta", "pack_dtype", "lm_head"):
        q.pop(k)  # the classic AutoGPTQ file
    q["model_file_base_name"] = None
    (folder / "quantize_config.json").write_text(json.dumps(q))
    _, params, _, info = load_gptq_folder(folder, tokenizer=False)
    assert info.weight_files == ("gptq_model-4bit-32g.safetensors",) and info.declared_format is None
    assert info.config_sources == ("quantize_config.json",)
    _assert_same_quantized(params, ref)


def test_config_json_only(folder: Path) -> None:
    os.remove(folder / "quantize_config.json")
    _, params, _, info = load_gptq_folder(folder, tokenizer=False)
    assert info.config_sources == ("config.json:quantization_config",) and info.desc_act


def test_dispatch_through_models_load(folder: Path) -> None:
    from jgptq.models import loading

    loaded = loading.load(folder, tokenizer=False)
    assert loaded.kind == "gptq" and loaded.quant_info.bits == 4


def test_dynamic_rules_mixed_bits_and_float_modules(tmp_path: Path) -> None:
    """GPTQModel-style ``dynamic``: layer 0's down_proj left in float, layer 1's MLP at 8 bits."""
    rng = np.random.default_rng(12)
    params, _ = tiny_params(12, 4, 32, sym=True, act_order=False)
    params["layers"][0]["mlp"]["down_proj"] = {"kernel": rng.normal(size=(128, 64)).astype(np.float32)}
    raw8 = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        n_in, n_out = SHAPES[f"mlp.{proj}"]
        q = gp.random_quantized(rng, n_in, n_out, 8, 32, True, False)
        raw8[proj] = q
        params["layers"][1]["mlp"][proj] = {"qweight": gp.pack_rows(q["codes"], 8), "scales": q["scales"],
                                            "zeros": q["zeros"], "g_idx": q["g_idx"]}
    dynamic = {"-:model\\.layers\\.0\\.mlp\\.down_proj": {}, "+:model\\.layers\\.1\\.mlp\\..*": {"bits": 8}}
    qc = GPTQConfig(bits=4, group_size=32, sym=True)
    with pytest.raises(CheckpointError, match="is float but the quantization config quantizes"):
        export_gptq(tmp_path / "nodyn", config(), params, qc)
    out = export_gptq(tmp_path / "dyn", config(), params, qc, dynamic=dynamic, dtype="float32")
    q = json.loads((out / "quantize_config.json").read_text())
    assert q["dynamic"] == dynamic
    t = read_folder(out)
    assert "model.layers.0.mlp.down_proj.weight" in t and "model.layers.0.mlp.down_proj.qweight" not in t
    assert t["model.layers.1.mlp.up_proj.qweight"].shape == (64 * 8 // 32, 128)
    np.testing.assert_array_equal(t["model.layers.1.mlp.up_proj.qzeros"].view(np.uint32), 0x7F7F7F7F)
    _, back, _, _ = load_gptq_folder(out, tokenizer=False)
    np.testing.assert_array_equal(back["layers"][0]["mlp"]["down_proj"]["kernel"],
                                  params["layers"][0]["mlp"]["down_proj"]["kernel"])
    np.testing.assert_array_equal(gp.unpack_rows(back["layers"][1]["mlp"]["down_proj"]["qweight"], 8),
                                  raw8["down_proj"]["codes"])


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_convert_gptq_v1_to_v2_and_back(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jgptq.cli import main

    ref = load_gptq_folder(folder, tokenizer=False)[1]
    assert main(["convert", str(folder), "--out", str(tmp_path / "v2"), "--format", "gptq_v2"]) == 0
    assert "written as gptq_v2" in capsys.readouterr().out
    t = read_folder(tmp_path / "v2")
    assert np.all(t["model.layers.0.self_attn.q_proj.qzeros"].view(np.uint32) == 0x88888888)
    _assert_same_quantized(load_gptq_folder(tmp_path / "v2", tokenizer=False)[1], ref)
    assert main(["convert", str(tmp_path / "v2"), "--out", str(tmp_path / "v1"), "--format", "gptq"]) == 0
    assert read_folder(tmp_path / "v1")["model.layers.0.self_attn.q_proj.qzeros"].view(np.uint32)[0, 0] == 0x77777777
    assert main(["convert", str(tmp_path / "v2"), "--out", str(tmp_path / "v1")]) == 1  # exists
    assert "already exists" in capsys.readouterr().err


def test_cli_convert_repairs_mislabelled_file(folder: Path, tmp_path: Path) -> None:
    from jgptq.cli import main

    def to_v2(t: dict[str, np.ndarray]) -> None:
        for k in [k for k in t if k.endswith(".qzeros")]:
            t[k] = gp.pack_cols(np.full((t[k].shape[0], t[k].shape[1] * 8), 8), 4)

    _rewrite(folder, to_v2)
    assert main(["convert", str(folder), "--out", str(tmp_path / "bad")]) == 1
    with pytest.warns(UserWarning, match="override"):
        assert main(["convert", str(folder), "--out", str(tmp_path / "fixed"), "--read-format", "gptq_v2"]) == 0
    _, params, _, info = load_gptq_folder(tmp_path / "fixed", tokenizer=False)
    assert info.checkpoint_format == "gptq" and not info.warnings


def test_cli_convert_float_hf_folder(tmp_path: Path) -> None:
    from jgptq.cli import main

    rng = np.random.default_rng(13)
    params, _ = tiny_params(13, 4, 32, True, False)
    for lp in params["layers"]:
        for mod in ("self_attn", "mlp"):
            for proj in lp[mod]:
                n_in, n_out = SHAPES[f"{mod}.{proj}"]
                lp[mod][proj] = {"kernel": rng.normal(size=(n_in, n_out)).astype(np.float32)}
    src = export_hf(tmp_path / "src", config(), params)
    assert main(["convert", str(src), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16",
                 "--max-shard-size", "30KB"]) == 0
    out = tmp_path / "bf16"
    assert (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    t = read_folder(out)
    import ml_dtypes

    assert t["model.norm.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(t["model.norm.weight"], params["norm"]["scale"].astype(ml_dtypes.bfloat16))
    assert main(["convert", str(src), "--out", str(tmp_path / "x"), "--format", "gptq_v2"]) == 2


@pytest.mark.slow
def test_cli_convert_gguf_to_hf_loads_in_transformers(tmp_path: Path) -> None:
    """SmolLM2 GGUF -> HF float folder; transformers (PyTorch) logits match jgptq's Flax logits."""
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from jgptq.artifacts import smollm2_gguf
    from jgptq.cli import main
    from jgptq.models import llama
    from jgptq.models.loading import load

    gguf = smollm2_gguf()
    out = tmp_path / "smollm2-hf"
    assert main(["convert", str(gguf), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    loaded = load(out)
    ids = np.asarray(loaded.tokenizer("The quick brown fox jumps over the lazy dog, and then",
                                      add_special_tokens=False)["input_ids"])[None]
    flax = np.asarray(jax.jit(llama.forward, static_argnums=(3,))(loaded.params, ids, None, loaded.config))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(flax, ref, atol=2e-3 * float(np.abs(ref).max()), rtol=0)


def test_ragged_last_group_round_trips_with_a_warning(tmp_path: Path) -> None:
    """group_size 48 on in=64/128: the last group is shorter (SmolLM2's 576 at group 128 is the real case)."""
    params, raw = tiny_params(14, 4, 48, sym=False, act_order=False, zero_free=True)
    qc = GPTQConfig(bits=4, group_size=48, sym=False)
    with pytest.warns(UserWarning, match="not multiples of group_size=48"):
        out = export_gptq(tmp_path / "g48", config(), params, qc)
    t = read_folder(out)
    name = "model.layers.0.mlp.down_proj"  # in = 128 -> 3 groups of 48, 48, 32
    assert t[f"{name}.scales"].shape == (3, 64) and t[f"{name}.qzeros"].shape == (3, 8)
    w = gp.dequantize(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"], t[f"{name}.g_idx"], 4, "gptq")
    q = raw[name]
    ref = q["scales"].astype(np.float64)[q["g_idx"]] * (q["codes"] - q["zeros"].astype(np.float64)[q["g_idx"]])
    np.testing.assert_array_equal(w, ref)
    _assert_same_quantized(load_gptq_folder(out, tokenizer=False)[1], params)
