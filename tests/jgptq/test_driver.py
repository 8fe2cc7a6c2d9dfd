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
