"""jgptq-written GPTQ folders load unchanged in transformers + optimum + GPTQModel (PyTorch, CPU).

A tiny random Llama is quantized by ``jgptq.gptq`` in every combination of bits (2/3/4/8), sym/asym,
act-order on/off and group size (-1/32/128) — 48 folders — exported with ``jgptq.export_gptq``, and all
are loaded by the independent reader in one subprocess (``reader.py`` in the interop venv). For each:

- every quantized module's weight as the PyTorch kernel computes it (module applied to an identity
  matrix) equals jgptq's dequantized weight rounded to float16, within one float16 ulp;
- the PyTorch fp16 logits match jgptq's Flax logits (float32, packed weights) within 1% of the logit
  range (fp16 activations give ~0.1-0.3%; a one-step zero-point error gives tens of percent);
- jgptq's own loader reads the folder back to the identical packed tensors.

The control: a sym 4-bit folder whose qzeros are rewritten in the v2 convention while still labelled
``gptq`` — the reader's logits must miss jgptq's by far more than the tolerance (proving the comparison
can fail), and jgptq's loader must refuse the file as mislabelled.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import interop_tiny as tiny
from interop_client import Reader, save_ids

COMBOS = list(itertools.product((2, 3, 4, 8), (True, False), (False, True), (-1, 32, 128)))
LOGIT_RTOL = 1e-2


def combo_id(c: tuple[int, bool, bool, int]) -> str:
    bits, sym, act, gs = c
    return f"b{bits}-{'sym' if sym else 'asym'}-{'act' if act else 'noact'}-g{gs}"


_FORWARD: list[Any] = []


def _flax_logits(config: Any, params: dict[str, Any], ids: np.ndarray) -> np.ndarray:
    """jgptq's float32 logits of the packed params (one jitted forward, compiled once per shape set)."""
    import jax

    from jgptq.models import llama

    if not _FORWARD:
        _FORWARD.append(jax.jit(llama.forward, static_argnums=(3,)))
    return np.asarray(_FORWARD[0](params, ids, None, config))


def _rewrite_qzeros_as_v2(folder: Path) -> None:
    """Store the true zero (v2) in every qzeros tensor while the configs keep saying 'gptq' (v1)."""
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import load_file, save_file

    import golden_pack as gp

    f = folder / "model.safetensors"
    t = dict(load_file(f))
    for k in [k for k in t if k.endswith(".qzeros")]:
        t[k] = gp.pack_cols(gp.unpack_cols(t[k], 4) + 1, 4)
    save_file(t, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def matrix(reader: Reader, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "jgptq"))  # golden_pack
    import jgptq
    from jgptq.checkpoint import export_gptq
    from jgptq.models.config import LlamaConfig

    root = tmp_path_factory.mktemp("matrix")
    config = LlamaConfig.from_hf(tiny.TINY_HF)
    params = tiny.float_params(0)
    hs = tiny.hessians(1)
    ids = np.random.default_rng(2).integers(0, tiny.TINY_HF["vocab_size"], (2, 24))
    ids_path = save_ids(root / "ids.npy", ids)
    res: dict[str, Any] = {"config": config, "folders": {}, "flax": {}, "qparams": {}}
    tasks = []
    for i, combo in enumerate(COMBOS):
        bits, sym, act, gs = combo
        qc = jgptq.GPTQConfig(bits=bits, group_size=gs, sym=sym, desc_act=act)
        qparams = tiny.quantize_tiny(params, hs, qc)
        # asym: alternate between 'auto' (v1 when every zero >= 1) and explicit v2, so both conventions are read
        fmt = "auto" if sym or i % 2 else "gptq_v2"
        folder = export_gptq(root / combo_id(combo), config, qparams, qc, checkpoint_format=fmt)
        res["folders"][combo] = folder
        res["qparams"][combo] = qparams
        res["flax"][combo] = _flax_logits(config, qparams, ids)
        tasks.append({"kind": "logits", "folder": str(folder), "ids": ids_path, "out": str(folder) + ".logits.npy",
                      "weights_out": str(folder) + ".weights.npz"})
    control_src = res["folders"][(4, True, False, 32)]
    control = root / "control-v2-zeros-labelled-gptq"
    shutil.copytree(control_src, control)
    _rewrite_qzeros_as_v2(control)
    res["control"] = control
    tasks.append({"kind": "logits", "folder": str(control), "ids": ids_path, "out": str(control) + ".logits.npy"})
    res["report"] = reader.run(tasks)
    return res


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_reader_logits_match_flax(matrix: dict[str, Any], combo: tuple[int, bool, bool, int]) -> None:
    folder = matrix["folders"][combo]
    torch_logits = np.load(str(folder) + ".logits.npy")
    flax = matrix["flax"][combo]
    assert torch_logits.shape == flax.shape
    err = float(np.abs(torch_logits - flax).max())
    scale = float(np.abs(flax).max())
    assert err <= LOGIT_RTOL * scale, (
        f"{combo_id(combo)}: PyTorch reader logits differ from jgptq's Flax logits by {err:.4g} "
        f"(logit scale {scale:.3g}; tolerance {LOGIT_RTOL * scale:.3g})")


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_reader_weights_match_dequantized(matrix: dict[str, Any], combo: tuple[int, bool, bool, int]) -> None:
    from jgptq.pack import unpack_rows

    folder = matrix["folders"][combo]
    weights = np.load(str(folder) + ".weights.npz")
    qparams = matrix["qparams"][combo]
    assert len(weights.files) == 14
    for name in weights.files:  # model.layers.{i}.{mod}.{proj}
        _, _, i, mod, proj = name.split(".")
        lin = qparams["layers"][int(i)][mod][proj]
        g = lin["g_idx"]
        codes = unpack_rows(lin["qweight"], combo[0], g.shape[0]).astype(np.float64)
        ref = lin["scales"].astype(np.float64)[g] * (codes - lin["zeros"].astype(np.float64)[g])
        ref16 = ref.astype(np.float16)
        got = weights[name]
        ulp = np.spacing(np.abs(ref16)).astype(np.float32)
        bad = np.abs(got - ref16.astype(np.float32)) > ulp
        assert not bad.any(), (f"{combo_id(combo)} {name}: {int(bad.sum())} weights differ by more than one fp16 "
                               f"ulp, max |diff| {np.abs(got - ref).max():.4g}")


@pytest.mark.parametrize("combo", COMBOS[::5], ids=combo_id)
def test_jgptq_reads_its_export_back(matrix: dict[str, Any], combo: tuple[int, bool, bool, int]) -> None:
    from jgptq.models.gptq_folder import load_gptq_folder

    config, back, _, info = load_gptq_folder(matrix["folders"][combo], tokenizer=False)
    assert config == matrix["config"] and info.bits == combo[0] and info.sym == combo[1]
    for la, lb in zip(back["layers"], matrix["qparams"][combo]["layers"]):
        for mod in ("self_attn", "mlp"):
            for proj, lin in la[mod].items():
                for key in ("qweight", "scales", "zeros", "g_idx"):
                    np.testing.assert_array_equal(lin[key], np.asarray(lb[mod][proj][key]))


def test_formats_written(matrix: dict[str, Any]) -> None:
    formats = {}
    for combo, folder in matrix["folders"].items():
        q = json.loads((Path(folder) / "quantize_config.json").read_text())
        formats.setdefault((combo[1], q["checkpoint_format"]), 0)
        formats[(combo[1], q["checkpoint_format"])] += 1
    assert formats.get((True, "gptq"), 0) == 24  # sym always v1
    assert formats.get((False, "gptq_v2"), 0) >= 12  # asym: v2 explicitly, and wherever some zero is 0
    kernels = {k for r in matrix["report"] for k in r.get("kernels", [])}
    assert kernels, "the reader reported no GPTQ kernel modules"


def test_reader_kernel_fallbacks_are_the_known_ones(matrix: dict[str, Any]) -> None:
    """GPTQModel 7.7 auto-selects its fused CPU int4 kernel for group_size=-1, whose aten op only takes
    groups of 32..256 (here down_proj has in=512), so those 4-bit folders are read with backend='torch'.
    Any other fallback is a new problem and fails here."""
    combos = list(matrix["folders"])
    fallbacks = {combo_id(combos[r["task"]]): r["fallback"] for r in matrix["report"]
                 if r.get("fallback") and r["task"] < len(combos)}
    unexpected = {k: v for k, v in fallbacks.items() if not (k.startswith("b4-") and k.endswith("-g-1"))}
    assert not unexpected, f"the reader's automatic kernel failed on: {unexpected}"


def test_mislabelled_control_fails_both_checks(matrix: dict[str, Any]) -> None:
    from jgptq.models.gptq_folder import GPTQFolderError, load_gptq_folder

    control = matrix["control"]
    torch_logits = np.load(str(control) + ".logits.npy")
    flax = matrix["flax"][(4, True, False, 32)]
    err = float(np.abs(torch_logits - flax).max())
    assert err > 5 * LOGIT_RTOL * float(np.abs(flax).max()), (
        f"the mislabelled control should be misread by the PyTorch reader, but its logits differ by only {err:.3g}")
    with pytest.raises(GPTQFolderError, match="mislabelled"):
        load_gptq_folder(control, tokenizer=False)
