import pytest

from mcomp.compiler.recipe import Recipe, parse_weights_flag, preset_names
from mcomp.errors import ConfigError


def test_presets_load_and_are_ordered_by_stage():
    assert {"int4", "int8", "fp32"} <= set(preset_names())
    r = Recipe.preset("int4")
    assert [p.name for p in r.passes] == ["fuse_qkv", "fuse_gate_up", "quantize_weights_rtn"]
    assert r.passes[-1].config.bits == 4 and r.passes[-1].config.group_size == 128


def test_weights_shorthand_replaces_the_weight_stage():
    r = Recipe.preset("int4").replace_stage(parse_weights_flag("rtn:8"))
    q = [p for p in r.passes if p.stage == "weights"]
    assert len(q) == 1 and q[0].config.bits == 8 and q[0].config.group_size == 0
    assert parse_weights_flag("rtn:4:g64").config.group_size == 64
    assert parse_weights_flag("rtn:4:pc").config.group_size == 0


@pytest.mark.parametrize("bad", ["rtn", "rtn:x", "rtn:4:128", "nope:4", "rtn:5:g128", "rtn:4:g12"])
def test_bad_weights_shorthand_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        parse_weights_flag(bad)


def test_recipe_file_roundtrip_and_errors(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "mine"\n[calibration]\nn_samples = 4\n[[pass]]\nname = "quantize_weights_rtn"\n'
                 'bits = 3\ngroup_size = 64\n[[pass]]\nname = "fuse_qkv"\n')
    r = Recipe.from_file(p)
    assert r.name == "mine" and r.calibration.n_samples == 4
    assert [x.name for x in r.passes] == ["fuse_qkv", "quantize_weights_rtn"]   # stage order
    assert r.to_dict()["passes"][1]["config"]["bits"] == 3
    with pytest.raises(ConfigError, match="does not exist"):
        Recipe.from_file(tmp_path / "missing.toml")
    p.write_text("[[pass]]\nname = 'no_such_pass'\n")
    with pytest.raises(ConfigError, match="unknown pass 'no_such_pass'.*fuse_qkv"):
        Recipe.from_file(p)
    p.write_text("[[pass]]\nname = 'quantize_weights_rtn'\nbitz = 4\n")
    with pytest.raises(ConfigError, match="bitz"):
        Recipe.from_file(p)
    p.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Recipe.from_file(p)
    with pytest.raises(ConfigError, match="unknown preset"):
        Recipe.preset("int5")
