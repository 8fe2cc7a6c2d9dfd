"""Parity of jgptq.models with transformers (PyTorch, fp32, eager attention) on tiny random models.

Every supported variant (Llama 2-style GQA, biases, Llama 3.1 RoPE scaling, linear RoPE, SmolLM2
tied embeddings, Mistral sliding window, Qwen2 q/k/v biases) is saved with ``save_pretrained``,
loaded by ``jgptq.models.hf.load_hf`` (no PyTorch) and compared: logits within 1e-4 relative,
padded batches equal to unpadded rows, KV-cache decoding equal to full recomputation, greedy
generations identical, and the decoder-block interface equal to the PyTorch block.
"""

from __future__ import annotations

import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import VARIANTS
from jgptq.models import llama
from jgptq.models.config import ConfigError
from jgptq.models.generate import generate
from jgptq.models.hf import SafetensorsError, load_hf, save_hf
from jgptq.models.llama import LlamaForCausalLM
from jgptq.models.loading import load

ALL = sorted(VARIANTS)
V = 256


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.double().numpy()


_forward = jax.jit(llama.forward, static_argnums=3)


@pytest.mark.parametrize("variant", ALL)
def test_logits_match_transformers(tiny_hf_model, variant):
    m = tiny_hf_model(variant)
    cfg, params, tok = load_hf(m.folder)
    assert tok is None
    ids = np.random.default_rng(10).integers(0, V, size=(2, 24))
    ref = torch_logits(m.torch_model, ids)
    out = np.asarray(_forward(params, jnp.asarray(ids), None, cfg))
    assert out.dtype == np.float32 and out.shape == (2, 24, V)
    assert rel_err(out, ref) < 1e-4
    # the NNX module runs the same math
    model = LlamaForCausalLM.from_params(cfg, params)
    assert rel_err(np.asarray(model(jnp.asarray(ids))), ref) < 1e-4


@pytest.mark.parametrize("variant,change", [
    ("mistral", {"sliding_window": None}),
    ("llama31", {"rope_scaling": llama.LlamaConfig.__dataclass_fields__["rope_scaling"].default}),
    ("llama_linear_rope", {"rope_scaling": llama.LlamaConfig.__dataclass_fields__["rope_scaling"].default}),
])
def test_variant_features_are_exercised(tiny_hf_model, variant, change):
    """Switching the variant's feature off breaks parity: the parity test really covers it."""
    m = tiny_hf_model(variant)
    cfg, params, _ = load_hf(m.folder)
    ids = np.random.default_rng(11).integers(0, V, size=(1, 40))
    ref = torch_logits(m.torch_model, ids)
    assert rel_err(np.asarray(_forward(params, jnp.asarray(ids), None, cfg)), ref) < 1e-4
    wrong = np.asarray(_forward(params, jnp.asarray(ids), None, cfg.replace(**change)))
    assert rel_err(wrong, ref) > 1e-3


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2"])
def test_padded_batch_matches_unpadded_rows(tiny_hf_model, variant):
    m = tiny_hf_model(variant)
    cfg, params, _ = load_hf(m.folder)
    rng = np.random.default_rng(12)
    t = 20
    rows = [rng.integers(0, V, size=n) for n in (20, 13, 7)]
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), bool)
    ids[0], mask[0] = rows[0], True                          # full
    ids[1, t - 13:], mask[1, t - 13:] = rows[1], True        # left-padded
    ids[2, :7], mask[2, :7] = rows[2], True                  # right-padded
    ids[~mask] = rng.integers(0, V, size=(~mask).sum())      # padding holds random tokens
    out = np.asarray(_forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg))
    for i, row in enumerate(rows):
        ref = torch_logits(m.torch_model, row[None])[0]
        assert rel_err(out[i][mask[i]], ref) < 1e-4, i


@pytest.mark.parametrize("variant", ["llama31", "mistral", "smollm2"])
def test_kv_cache_decoding_equals_full_recomputation(tiny_hf_model, variant):
    m = tiny_hf_model(variant)
    cfg, params, _ = load_hf(m.folder)
    model = LlamaForCausalLM.from_params(cfg, params)
    rng = np.random.default_rng(13)
    b, p, n = 2, 8, 12  # 8-slot prompt (row 1 left-padded by 3), then 12 single-token steps
    ids = rng.integers(0, V, size=(b, p + n))
    mask = np.ones((b, p + n), bool)
    mask[1, :3] = False
    full = np.asarray(_forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg))
    step = jax.jit(lambda mdl, i, mk, c: mdl.step(i, mk, c))
    cache = model.init_cache(b, 32)
    logits, cache = step(model, jnp.asarray(ids[:, :p]), jnp.asarray(mask[:, :p]), cache)
    got = [np.asarray(logits)]
    for j in range(p, p + n):
        logits, cache = step(model, jnp.asarray(ids[:, j:j + 1]), jnp.asarray(mask[:, j:j + 1]), cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert int(cache["index"]) == p + n
    np.testing.assert_allclose(got[mask], full[mask], rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("variant", ALL)
def test_greedy_generation_matches_transformers(tiny_hf_model, variant):
    m = tiny_hf_model(variant)
    cfg, params, _ = load_hf(m.folder)
    prompts = _llama_prompts()
    ours = generate(params, cfg, prompts, 12, eos_token_id=[])  # from a params tree
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = m.torch_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                         max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert o == ref[0, len(p):].tolist()


# These share the "llama" model and the batch/prompt shapes of the greedy test, so they reuse its
# compiled prefill/decode functions.
def _llama_prompts() -> list[list[int]]:
    rng = np.random.default_rng(14)
    return [rng.integers(3, V, size=n).tolist() for n in (9, 3, 14)]


def test_generation_stops_at_eos_and_streams(tiny_hf_model):
    m = tiny_hf_model("llama")
    cfg, params, _ = load_hf(m.folder)
    model = LlamaForCausalLM.from_params(cfg, params)
    prompts = _llama_prompts()
    free = generate(model, None, prompts, 12, eos_token_id=[])
    eos = free[0][3]  # the 4th token of row 0 becomes EOS: row 0 must stop there
    assert eos not in free[0][:3]
    steps: list[list[int | None]] = []
    got = generate(model, None, prompts, 12, eos_token_id=eos, stream=steps.append)
    assert got[0] == free[0][:4]
    for i in (1, 2):
        cut = free[i].index(eos) + 1 if eos in free[i] else 12
        assert got[i] == free[i][:cut]
    # stream: one entry per row per step, None after a row finished, same tokens as returned
    for i in range(3):
        streamed = [s[i] for s in steps]
        assert [t for t in streamed if t is not None] == got[i]
        assert all(t is None for t in streamed[len(got[i]):])


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_hf_model):
    m = tiny_hf_model("llama")
    cfg, params, _ = load_hf(m.folder)
    model = LlamaForCausalLM.from_params(cfg, params)
    prompts = _llama_prompts()
    a = generate(model, None, prompts, 12, temperature=1.0, seed=3, eos_token_id=[])
    b = generate(model, None, prompts, 12, temperature=1.0, seed=3, eos_token_id=[])
    c = generate(model, None, prompts, 12, temperature=1.0, seed=4, eos_token_id=[])
    assert a == b and a != c
    greedy = generate(model, None, prompts, 12, eos_token_id=[])
    assert a != greedy
    assert generate(model, None, prompts, 12, temperature=0.7, top_p=1e-6, seed=5, eos_token_id=[]) == greedy


def test_decoder_block_interface_matches_torch_layer(tiny_hf_model):
    m = tiny_hf_model("qwen2")
    cfg, params, _ = load_hf(m.folder)
    ids = np.random.default_rng(15).integers(0, V, size=(2, 10))
    captured_torch: dict[str, np.ndarray] = {}
    layer0 = m.torch_model.model.layers[0]
    hooks = []
    for name, mod in [("attn_in", layer0.self_attn.q_proj), ("o_in", layer0.self_attn.o_proj),
                      ("mlp_in", layer0.mlp.gate_proj), ("down_in", layer0.mlp.down_proj)]:
        hooks.append(mod.register_forward_hook(
            lambda _m, inp, _out, name=name: captured_torch.__setitem__(name, inp[0].double().numpy())))
    with torch.no_grad():
        hs = m.torch_model(torch.tensor(ids), output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    h0 = llama.embed(params, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(h0), hs[0].numpy(), rtol=0, atol=1e-6)
    block = jax.jit(llama.decoder_block, static_argnums=(4, 5))
    h1, cap = block(params["layers"][0], h0, None, None, cfg, True)
    assert rel_err(np.asarray(h1), hs[1].double().numpy()) < 1e-5
    assert set(cap) == {"attn_in", "o_in", "mlp_in", "down_in"}
    for k, ref in captured_torch.items():
        assert rel_err(np.asarray(cap[k]), ref) < 1e-5, k
    # names and groups cover each linear exactly once, in true-sequential order
    assert [n for g in llama.LINEAR_GROUPS for n in g] == list(llama.LINEAR_NAMES)
    assert sorted(llama.LINEAR_NAMES) == sorted(llama.LINEAR_INPUT)
    h2 = block(params["layers"][1], h1, None, None, cfg, False)
    logits = np.asarray(llama.final_logits(params, h2, cfg))
    assert rel_err(logits, torch_logits(m.torch_model, ids)) < 1e-4


def test_sharded_folder_loads_like_single_file(tiny_hf_model):
    single = tiny_hf_model("llama")
    sharded = tiny_hf_model("llama", sharded=True)
    assert (sharded.folder / "model.safetensors.index.json").exists()
    cfg, params, _ = load_hf(sharded.folder)
    ids = np.random.default_rng(16).integers(0, V, size=(1, 12))
    assert rel_err(np.asarray(_forward(params, jnp.asarray(ids), None, cfg)),
                   torch_logits(sharded.torch_model, ids)) < 1e-4
    _, params1, _ = load_hf(single.folder)
    assert jax.tree.structure(params) == jax.tree.structure(params1)


def test_bf16_runs_close_to_fp32(tiny_hf_model):
    m = tiny_hf_model("smollm2")
    loaded = load(m.folder, dtype="bf16")
    cfg, params, _ = loaded
    assert loaded.kind == "hf"
    assert params["layers"][0]["mlp"]["up_proj"]["kernel"].dtype == ml_dtypes.bfloat16
    model = LlamaForCausalLM.from_params(cfg, params)
    assert model.dtype == jnp.bfloat16
    ids = np.random.default_rng(17).integers(0, V, size=(2, 16))
    out = np.asarray(jax.jit(lambda mdl, x: mdl(x))(model, jnp.asarray(ids)))
    ref = torch_logits(m.torch_model, ids)
    assert out.dtype == np.float32
    assert 1e-4 < rel_err(out, ref) < 5e-2  # bf16 rounding, but the same model
    # and no worse than transformers' own bf16 model is against its fp32 logits
    import copy

    tbf16 = copy.deepcopy(m.torch_model).to(torch.bfloat16)
    assert rel_err(out, ref) < 2 * rel_err(torch_logits(tbf16, ids), ref)
    # bf16 generation runs and produces in-vocabulary tokens
    toks = generate(model, None, [[1, 2, 3]], 5, eos_token_id=[])
    assert len(toks[0]) == 5 and all(0 <= t < V for t in toks[0])


@pytest.mark.parametrize("variant", ["smollm2", "qwen2", "llama31"])
def test_save_hf_roundtrip_through_transformers(tiny_hf_model, tmp_path, variant):
    import transformers

    m = tiny_hf_model(variant)
    cfg, params, _ = load_hf(m.folder)
    out = save_hf(tmp_path / "saved", cfg, params, dtype="float32", max_shard_size=30_000)
    assert (out / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = np.random.default_rng(18).integers(0, V, size=(1, 12))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(m.torch_model, ids), rtol=0, atol=1e-5)
    cfg2, params2, _ = load_hf(out)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_nnx_module_roundtrip_and_trainable_state(tiny_hf_model):
    m = tiny_hf_model("llama_bias")
    cfg, params, _ = load_hf(m.folder)
    model = LlamaForCausalLM.from_params(cfg, params)
    back = model.to_params()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == sum(x.size for x in jax.tree.leaves(params))
    layer = model.layers[1]
    h = jnp.asarray(np.random.default_rng(19).normal(size=(1, 6, cfg.hidden_size)), jnp.float32)
    np.testing.assert_allclose(np.asarray(layer(h)), np.asarray(llama.decoder_block(params["layers"][1], h, None, None, cfg)),
                               rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- bad input
def test_missing_tensor_is_named(tiny_hf_model, tmp_path):
    from jgptq.models.hf import SafetensorsFile, write_safetensors

    m = tiny_hf_model("llama")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((m.folder / "config.json").read_text())
    f = SafetensorsFile(m.folder / "model.safetensors")
    tensors = {k: np.asarray(f[k]) for k in f.keys() if k != "model.layers.1.mlp.down_proj.weight"}
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(SafetensorsError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf(folder)


def test_wrong_shape_is_named(tiny_hf_model, tmp_path):
    from jgptq.models.hf import SafetensorsFile, write_safetensors

    m = tiny_hf_model("llama")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((m.folder / "config.json").read_text())
    f = SafetensorsFile(m.folder / "model.safetensors")
    tensors = {k: np.asarray(f[k]) for k in f.keys()}
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"]
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(SafetensorsError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(64, 64\).*\(32, 64\)"):
        load_hf(folder)


def test_extra_tensor_and_nan_are_refused(tiny_hf_model, tmp_path):
    from jgptq.models.hf import SafetensorsFile, write_safetensors

    m = tiny_hf_model("llama")
    f = SafetensorsFile(m.folder / "model.safetensors")
    for case in ("extra", "nan"):
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_text((m.folder / "config.json").read_text())
        tensors = {k: np.array(f[k]) for k in f.keys()}
        if case == "extra":
            tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
        else:
            tensors["model.norm.weight"][3] = np.nan
        write_safetensors(folder / "model.safetensors", tensors)
        with pytest.raises(SafetensorsError, match=r"layers\.2\.mlp\.up_proj" if case == "extra" else r"model\.norm\.weight.*NaN"):
            load_hf(folder)


def test_truncated_safetensors_names_file_and_tensor(tiny_hf_model, tmp_path):
    m = tiny_hf_model("llama", sharded=True)
    folder = tmp_path / "trunc"
    folder.mkdir()
    for p in m.folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    data = (folder / shard).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    (folder / shard).write_bytes(data[: 8 + n + (len(data) - 8 - n) // 2])
    with pytest.raises(SafetensorsError, match=rf"{shard}.*tensor '.*'.*truncated"):
        load_hf(folder)
    (folder / shard).write_bytes(data[:5])
    with pytest.raises(SafetensorsError, match=rf"{shard}.*too short"):
        load_hf(folder)
    (folder / shard).unlink()
    with pytest.raises(SafetensorsError, match=rf"{shard}.*missing"):
        load_hf(folder)


def test_unknown_config_key_is_refused_at_load(tiny_hf_model, tmp_path):
    m = tiny_hf_model("llama")
    folder = tmp_path / "m"
    folder.mkdir()
    cfg = json.loads((m.folder / "config.json").read_text())
    cfg["attn_logit_softcapping"] = 30.0
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((m.folder / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"config\.json.*attn_logit_softcapping"):
        load(folder)


def test_load_dispatch_errors(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"\.gguf"):
        load(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no such model"):
        load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ConfigError, match="awq"):
        load(tmp_path)


def test_check_params_names_bad_tensors(tiny_hf_model):
    m = tiny_hf_model("llama")
    cfg, params, _ = load_hf(m.folder)
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"][1]["self_attn"]["v_proj"]["kernel"] = np.ones((64, 64), np.float32)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.kernel.*\(64, 64\)"):
        LlamaForCausalLM.from_params(cfg, bad)
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"][0]["mlp"]["up_proj"]["kernel"] = bad["layers"][0]["mlp"]["up_proj"]["kernel"].copy()
    bad["layers"][0]["mlp"]["up_proj"]["kernel"][0, 0] = np.inf
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.kernel.*NaN or Inf"):
        LlamaForCausalLM.from_params(cfg, bad)
    bad = jax.tree.map(lambda x: x, params)
    del bad["lm_head"]
    with pytest.raises(ValueError, match="missing lm_head"):
        LlamaForCausalLM.from_params(cfg, bad)


def test_staged_block_functions_compose_to_decoder_block(tiny_hf_model):
    """The driver-facing stages (attention_output, attention_residual, mlp_hidden, block_output)
    reproduce decoder_block's output and captured inputs on a left-padded batch."""
    import jax.numpy as jnp

    from jgptq.models import llama

    m = tiny_hf_model("qwen2")
    config, params, _ = load_hf(m.folder)
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.standard_normal((3, 10, config.hidden_size)).astype(np.float32))
    mask = jnp.asarray(np.arange(10)[None, :] >= np.array([[0], [3], [6]]))
    pos = llama.positions_from_mask(mask)
    lp = params["layers"][0]
    want, cap = llama.decoder_block(lp, h, pos, mask, config, capture=True)
    o = llama.attention_output(lp, h, pos, mask, config)
    h_mid = llama.attention_residual(lp, h, o)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(llama.attention_input(lp, h, config)), np.asarray(cap["attn_in"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(o)[valid], np.asarray(cap["o_in"])[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(llama.mlp_input(lp, h_mid, config))[valid],
                               np.asarray(cap["mlp_in"])[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(llama.mlp_hidden(lp, h_mid, config))[valid],
                               np.asarray(cap["down_in"])[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(llama.block_output(lp, h_mid, config))[valid],
                               np.asarray(want)[valid], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention impl"):
        llama.attention_output(lp, h, pos, mask, config, impl="flash")


@pytest.mark.gpu
@pytest.mark.skipif(__import__("jax").default_backend() != "gpu", reason="needs a CUDA GPU")
def test_cudnn_attention_matches_xla_in_bf16(tiny_hf_model):
    """The fused cuDNN path of the calibration forwards agrees with the einsum path (right padding)."""
    import jax.numpy as jnp

    from jgptq.models import llama

    m = tiny_hf_model("llama")
    config, params, _ = load_hf(m.folder)
    lp = jax_tree_cast(params["layers"][0], jnp.bfloat16)
    rng = np.random.default_rng(6)
    h = jnp.asarray(rng.standard_normal((2, 64, config.hidden_size)), jnp.bfloat16)
    mask = jnp.asarray(np.arange(64)[None, :] < np.array([[64], [40]]))
    pos = llama.positions_from_mask(mask)
    a = llama.attention_output(lp, h, pos, mask, config, impl="xla").astype(jnp.float32)
    b = llama.attention_output(lp, h, pos, mask, config, impl="cudnn").astype(jnp.float32)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(b)[valid], np.asarray(a)[valid], rtol=3e-2, atol=3e-2)


def jax_tree_cast(tree, dtype):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else a, tree)
