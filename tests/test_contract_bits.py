"""Bit configs on disk: {layer: bits} JSON and HAWQ bit_config.py style, parsed without running code."""
from __future__ import annotations

from pathlib import Path

import pytest

from hawq_ray.contract.bits import (BitConfigError, parse_hawq_bit_config, read_bits, read_hawq_bit_config,
                                    write_bits, write_hawq_bit_config)

DATA = Path(__file__).parent / "data"


def test_json_and_hawq_round_trip(tmp_path):
    bits = {"conv1": 8, "layer1.0.conv1": 4, "fc": 8}
    write_bits(bits, tmp_path / "a.json")
    assert read_bits(tmp_path / "a.json") == bits
    write_bits(bits, tmp_path / "a.py", name="bit_config_mine")
    assert read_hawq_bit_config(tmp_path / "a.py") == {"bit_config_mine": bits}
    assert read_bits(tmp_path / "a.py") == bits
    write_hawq_bit_config({"x": bits, "y": {"fc": 4}}, tmp_path / "b.py")
    assert read_bits(tmp_path / "b.py", name="y") == {"fc": 4}
    with pytest.raises(BitConfigError, match="config None not found; it has x, y"):
        read_bits(tmp_path / "b.py")


def test_reads_hawq_published_layout():
    configs = read_hawq_bit_config(DATA / "hawq_v3_bit_config_excerpt.py")
    assert len(configs) == 18
    r18 = configs["bit_config_resnet18_bops_0.5"]
    assert r18["quant_init_block_convbn"] == 8 and r18["stage1.unit2.quant_convbn2"] == 4 and len(r18) == 21
    # HAWQ's own file has activation entries and int32 accumulators too: all plain ints, read as they are
    src = """bit_config_dict = {
"bit_config_resnet18_uniform4" : {
'quant_input': 8,
'quant_act_int32': 16,
'stage1.unit1.quant_convbn1': 4,
},
}"""
    assert parse_hawq_bit_config(src)["bit_config_resnet18_uniform4"]["quant_act_int32"] == 16


def test_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    src = f"import os\nbit_config_dict = {{'a': {{'x': int(open({str(marker)!r}, 'w').write('1'))}}}}\n"
    with pytest.raises(BitConfigError, match="plain literals"):
        parse_hawq_bit_config(src, "evil.py")
    assert not marker.exists()


@pytest.mark.parametrize("src,match", [
    ("bit_config_dict = {'a': {'x': 4.5}}", "entry 'x': 4.5"),
    ("bit_config_dict = {'a': {'x': True}}", "entry 'x': True"),
    ("bit_config_dict = {'a': {'x': -4}}", "entry 'x': -4"),
    ("x = 1", "found 0 dict literals"),
    ("bit_config_dict = {", "not Python source"),
    ("bit_config_dict = {}", "non-empty dict"),
])
def test_bad_configs(src, match):
    with pytest.raises(BitConfigError, match=match):
        parse_hawq_bit_config(src, "cfg.py")


def test_bad_json(tmp_path):
    (tmp_path / "c.json").write_text('{"a": "8"}')
    with pytest.raises(BitConfigError, match=r"c.json: entry 'a': '8'"):
        read_bits(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{")
    with pytest.raises(BitConfigError, match="cannot read a JSON bit config"):
        read_bits(tmp_path / "d.json")
