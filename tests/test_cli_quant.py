"""`hawq-ray layers`, `cost`, `verify` from the command line (in-process), including bad input."""
import json

import pytest

from hawq_ray.service.cli import main


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


def test_layers_json_lists_the_default_model(capsys):
    assert main(["layers", "--json"]) == 0
    obj = last_json(capsys.readouterr().out)
    layers = obj["layers"]
    assert obj["model"] == "digits_resnet" and layers[0]["layer"] == "stem.conv"
    assert layers[0]["fixed_bits"] == 8 and layers[-1]["fixed_bits"] == 8
    # stem: 8 x 1 x 3 x 3 weights over 16 x 16 outputs
    assert layers[0]["params"] == 72 and layers[0]["macs"] == 72 * 256


def test_cost_json_resnet18_fp32_is_the_papers(capsys):
    assert main(["cost", "--model", "resnet18", "--bits", "fp32", "--json"]) == 0
    obj = last_json(capsys.readouterr().out)
    assert round(obj["size_mib"], 1) == 44.6 and round(obj["gbops"]) == 1858
    # the largest activation a layer reads at 224x224: layer1's and layer2.0's 64 x 56 x 56 inputs, 4 bytes each
    assert obj["activation_mib"] == 64 * 56 * 56 * 4 / 2 ** 20
    assert obj["memory_mib"] == obj["size_mib"] + obj["activation_mib"]


def test_cost_of_uniform4_counts_the_8_bit_image_as_the_largest_activation(capsys):
    # at 4 bits layer1 holds 64 x 56 x 56 / 2 bytes = 100352 B; conv1 keeps 8 bits and reads 3 x 224 x 224 B
    assert main(["cost", "--model", "resnet18", "--bits", "uniform4", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["activation_mib"] == 3 * 224 * 224 / 2 ** 20


def test_verify_default_uniform4_is_bit_exact_and_plots(capsys, tmp_path):
    png = tmp_path / "g1.png"
    assert main(["verify", "--bits", "uniform4", "--inputs", "8", "--json", "--plot", str(png)]) == 0
    obj = last_json(capsys.readouterr().out)
    assert obj["differing"] == 0 and obj["elements"] == 80 and obj["predictions_equal"]
    assert all(row["qat_vs_int_diff"] == 0 for row in obj["layers"])
    diffs = [row["fake_vs_int_norm_diff"] for row in obj["layers"]]
    assert max(diffs) > 0          # fake quantization does drift from the integer pipeline
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_verify_mixed_config_file(capsys, tmp_path):
    assert main(["layers", "--json"]) == 0
    layers = last_json(capsys.readouterr().out)["layers"]
    cfg = {r["layer"]: (8 if r["fixed_bits"] or i % 2 else 4) for i, r in enumerate(layers)}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(cfg))
    assert main(["verify", "--bits", str(path), "--json"]) == 0
    assert last_json(capsys.readouterr().out)["differing"] == 0


@pytest.mark.parametrize("argv,needle", [
    (["verify", "--bits", "uniform5"], "uniform5"),
    (["cost", "--model", "resnet81", "--bits", "fp32"], "resnet81"),
    (["verify", "--inputs", "0"], "--inputs"),
    (["verify", "--weights", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_unknown_layer_in_config_file(capsys, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"not.a.layer": 4}))
    assert main(["cost", "--bits", str(path)]) == 2
    assert "unknown layers" in capsys.readouterr().err
