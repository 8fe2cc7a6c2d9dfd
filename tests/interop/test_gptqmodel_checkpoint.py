"""The other direction: checkpoints written by GPTQModel load in jgptq and give the same logits.

GPTQModel (7.7.0, CPU) quantizes a tiny random Llama itself — its own GPTQ, its own packer, its own
``save`` (fp16/bf16 floats, v1 zero points, ``quantize_config.json`` with GPTQModel's meta) — then the
PyTorch reader (transformers + optimum + GPTQModel) runs the saved folder. jgptq loads the same folder
with ``jgptq.models.load`` and must match those logits within fp16 rounding. One case uses asymmetric
act-order (non-trivial ``g_idx``, v1 zeros written by GPTQModel's v2->v1 conversion), one symmetric
3-bit (the 10-1-10-1-10 stream).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import interop_tiny as tiny
from interop_client import Reader, save_ids

CASES = {
    "b4-asym-act-g32": {"bits": 4, "group_size": 32, "sym": False, "desc_act": True},
    "b3-sym-noact-g64": {"bits": 3, "group_size": 64, "sym": True, "desc_act": False},
}
LOGIT_RTOL = 1e-2


@pytest.fixture(scope="module")
def written(reader: Reader, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gptqmodel")
    rng = np.random.default_rng(3)
    v = tiny.TINY_HF["vocab_size"]
    calib = save_ids(root / "calib.npy", rng.integers(4, v, (32, 64)))
    ids = save_ids(root / "ids.npy", rng.integers(4, v, (2, 20)))
    src = {k: val for k, val in tiny.TINY_HF.items() if k not in ("architectures", "model_type")}
    tasks: list[dict[str, Any]] = []
    for i, (name, case) in enumerate(CASES.items()):
        tasks.append({"kind": "gptqmodel_quantize", "src": src, "out": str(root / name), "calib": calib,
                      "seed": 10 + i, **case})
    for name in CASES:
        tasks.append({"kind": "logits", "folder": str(root / name), "ids": ids, "out": str(root / f"{name}.npy")})
    report = reader.run(tasks, timeout=2400)
    return {"root": root, "ids": np.load(ids), "report": report}


@pytest.mark.parametrize("name", list(CASES))
def test_gptqmodel_folder_matches_in_jgptq(written: dict[str, Any], name: str) -> None:
    import jax

    from jgptq.models import llama
    from jgptq.models.loading import load

    folder = Path(written["root"]) / name
    loaded = load(folder)
    info = loaded.quant_info
    case = CASES[name]
    assert loaded.kind == "gptq" and info.bits == case["bits"] and info.sym == case["sym"]
    assert any(q.startswith("gptqmodel:") for q in info.quantizer)
    assert loaded.tokenizer is not None
    n_q = sum("qweight" in lin for lp in loaded.params["layers"] for m in ("self_attn", "mlp")
              for lin in lp[m].values())
    assert n_q == 14
    if case["desc_act"]:
        g = np.asarray(loaded.params["layers"][0]["mlp"]["down_proj"]["g_idx"])
        assert not np.array_equal(g, np.arange(g.size) // case["group_size"]), "expected act-order g_idx"
    fwd = jax.jit(llama.forward, static_argnums=(3,))
    flax = np.asarray(fwd(loaded.params, written["ids"], None, loaded.config))
    torch_logits = np.load(Path(written["root"]) / f"{name}.npy")
    err = float(np.abs(flax - torch_logits).max())
    scale = float(np.abs(torch_logits).max())
    assert err <= LOGIT_RTOL * scale, (f"{name}: jgptq's logits of the GPTQModel checkpoint differ from the "
                                       f"PyTorch reader's by {err:.4g} (scale {scale:.3g})")
