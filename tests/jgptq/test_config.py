"""GPTQConfig validation and round trips with AutoGPTQ / optimum / GPTQModel dicts."""

from __future__ import annotations

import json

import pytest

from jgptq.config import GPTQConfig


def test_defaults_and_maxq():
    c = GPTQConfig()
    assert (c.bits, c.group_size, c.sym, c.desc_act, c.static_groups) == (4, 128, True, False, False)
    assert c.damp_percent == 0.01 and c.block_size == 128 and c.mse == 0.0
    assert GPTQConfig(bits=3).maxq == 7 and GPTQConfig(bits=8).maxq == 255
    hash(c)  # usable as a static jit argument


@pytest.mark.parametrize("field,value,allowed", [
    ("bits", 5, r"\(2, 3, 4, 8\)"), ("bits", 4.0, r"\(2, 3, 4, 8\)"),
    ("group_size", 0, "-1"), ("group_size", -2, "-1"), ("group_size", True, "-1"),
    ("sym", 1, "True or False"), ("desc_act", "yes", "True or False"),
    ("damp_percent", -0.1, r"\[0, 1\]"), ("damp_percent", 1.5, r"\[0, 1\]"),
    ("damp_percent", float("nan"), r"\[0, 1\]"), ("block_size", 0, "positive"),
    ("mse", -1.0, ">= 0"), ("mse_maxshrink", 1.0, r"\(0, 1\)"),
])
def test_invalid_values_name_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"GPTQConfig\.{field} .*{allowed}"):
        GPTQConfig(**{field: value})


def test_round_trip_through_autogptq_dict():
    c = GPTQConfig(bits=3, group_size=64, sym=False, desc_act=True, static_groups=True,
                   damp_percent=0.05, true_sequential=False, mse=2.4, block_size=64)
    d = json.loads(json.dumps(c.to_dict()))
    for key in ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym",
                "true_sequential"):
        assert key in d
    assert d["quant_method"] == "gptq"
    assert GPTQConfig.from_dict(d) == c
    assert "block_size" not in GPTQConfig().to_dict()


def test_reads_real_world_dicts():
    thebloke = {"bits": 4, "group_size": 128, "damp_percent": 0.1, "desc_act": True,
                "static_groups": False, "sym": True, "true_sequential": True,
                "model_name_or_path": None, "model_file_base_name": "model"}
    c = GPTQConfig.from_dict(thebloke)
    assert (c.bits, c.group_size, c.damp_percent, c.desc_act) == (4, 128, 0.1, True)
    gptqmodel = {"bits": 4, "dynamic": None, "group_size": 128, "desc_act": False, "lm_head": False,
                 "quant_method": "gptq", "checkpoint_format": "gptq", "format": "gptq",
                 "pack_dtype": "int32", "sym": True,
                 "meta": {"quantizer": ["gptqmodel:5.0.0"], "damp_percent": 0.05,
                          "damp_auto_increment": 0.01, "static_groups": False,
                          "true_sequential": True, "mse": 0.0, "act_group_aware": True}}
    c = GPTQConfig.from_dict(gptqmodel)
    assert (c.damp_percent, c.desc_act, c.group_size) == (0.05, False, 128)
    c = GPTQConfig.from_dict({"w_bit": 8, "q_group_size": 32, "sym": False})
    assert (c.bits, c.group_size, c.sym) == (8, 32, False)
    # AutoGPTQ's defaults for missing keys: per-channel, act-order
    c = GPTQConfig.from_dict({"bits": 4})
    assert (c.group_size, c.desc_act) == (-1, True)


def test_from_dict_refuses_what_it_does_not_understand():
    with pytest.raises(ValueError, match="unknown quantization config key 'zero_point_bias'"):
        GPTQConfig.from_dict({"bits": 4, "zero_point_bias": 3})
    with pytest.raises(ValueError, match="quant_method must be 'gptq'"):
        GPTQConfig.from_dict({"bits": 4, "quant_method": "awq"})
    with pytest.raises(ValueError, match="Marlin"):
        GPTQConfig.from_dict({"bits": 4, "checkpoint_format": "marlin"})
    with pytest.raises(ValueError, match="GPTQConfig.bits"):
        GPTQConfig.from_dict({"bits": 6})
    with pytest.raises(ValueError, match="conflicting bits"):
        GPTQConfig.from_dict({"bits": 4, "w_bit": 3})


def test_recommended_preset_and_overrides():
    """jgptq's defaults: the reference plus act-order, static groups and the clip search; the plain
    constructor keeps the reference defaults."""
    from jgptq import GPTQConfig

    ref = GPTQConfig()
    assert (ref.desc_act, ref.static_groups, ref.mse) == (False, False, 0.0)
    rec = GPTQConfig.recommended()
    assert (rec.desc_act, rec.static_groups, rec.mse) == (True, True, 2.4)
    assert rec.replace(desc_act=False, static_groups=False, mse=0.0) == ref
    assert GPTQConfig.recommended(bits=3, mse=0.0) == GPTQConfig(bits=3, desc_act=True, static_groups=True)
    with pytest.raises(ValueError, match="bits"):
        GPTQConfig.recommended(bits=5)


def test_cli_preset_builds_the_config():
    import argparse

    from jgptq.cli import quantize as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    build = lambda *a: cli._build_config(p.parse_args(["--out", "x", *a]))  # noqa: E731
    from jgptq import GPTQConfig

    assert build() == GPTQConfig.recommended()
    assert build("--preset", "reference") == GPTQConfig()
    assert build("--no-desc-act", "--mse", "0") == GPTQConfig.recommended(desc_act=False, mse=0.0)
    assert build("--preset", "reference", "--desc-act", "--bits", "3") == GPTQConfig(bits=3, desc_act=True)
    with pytest.raises(SystemExit, match="--mse"):
        build("--mse", "-1")
