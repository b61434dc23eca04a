"""Quantizers, BN folding, the layer table and cost, checked against hand computations and the paper."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.contract.bits import parse_bits
from hawq_ray.contract.cost import config_costs
from hawq_ray.quant.layers import layer_table
from hawq_ray.inputs.models import get_model, input_shape
from hawq_ray.quant.fold import fold_bn
from hawq_ray.quant.qat import prepare
from hawq_ray.quant.quantizers import quantize_weight, weight_perturbation


def test_weight_quantizer_is_symmetric_per_channel_with_ste():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.01, 0.02, -0.04]], requires_grad=True)
    q, s = quantize_weight(w, 4)
    np.testing.assert_allclose(s.numpy(), [1.0 / 7, 0.04 / 7], rtol=1e-6)
    # numpy: floor(w/s + 1/2) clamped to [-8, 7]
    want = np.clip(np.floor(w.detach().numpy() / s.numpy()[:, None] + 0.5), -8, 7)
    assert np.array_equal(q.detach().numpy(), want)
    q.sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), np.broadcast_to(1 / s.numpy()[:, None], (2, 3)), rtol=1e-6)
    w8 = torch.randn(16, 3, 3, 3)
    q8, _ = quantize_weight(w8, 8)
    assert q8.min() >= -128 and q8.max() <= 127 and q8.abs().amax(dim=(1, 2, 3)).eq(127).all()


def test_weight_perturbation_matches_numpy():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    for bits in (4, 8):
        wn = w.numpy().reshape(8, -1)
        s = np.abs(wn).max(1) / (2 ** (bits - 1) - 1)
        qn = np.clip(np.floor(wn / s[:, None] + 0.5), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        want = float(((qn * s[:, None] - wn) ** 2).sum())
        assert weight_perturbation(w, bits) == pytest.approx(want, rel=1e-5)
    assert weight_perturbation(w, 4) > weight_perturbation(w, 8) * 100


def test_bn_folding_equation_16_matches_conv_then_bn():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 3, 8, 8)
    w, b = fold_bn(conv.weight, conv.bias, bn)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fp32_mode_of_quant_model_equals_the_original_model():
    model = get_model("resnet20_cifar10").eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    qm = prepare(model, "uniform8", (3, 32, 32)).set_mode("fp32")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def digits_trained(tmp_path_factory):
    from hawq_ray.inputs.data import load_data
    from hawq_ray.quant.finetune import fp32_weights
    data = load_data("digits", input_shape=input_shape())
    model, _, _ = fp32_weights(tmp_path_factory.mktemp("fp32"), data, epochs=4)
    return model, data


def rounding_noise_error(model, bits: int, x, calibration, draws: int = 5, seed: int = 1) -> float:
    """Relative logit error of `model` when every quantized tensor carries the error of a correct b-bit
    quantizer, modelled as independent uniform noise of one quantization step, computed here from the
    definitions (Appendix B-C): weights per output channel, S = max|W_c| / (2^(b-1) - 1); each ReLU output,
    S = max / (2^b - 1) over the calibration batch; the input image, S = max|x| / 127."""
    gen = torch.Generator().manual_seed(seed)
    noise = lambda t, s: (torch.rand(t.shape, generator=gen) - 0.5) * s   # noqa: E731
    with torch.no_grad():
        ref = model(x)
        ranges, hooks = {}, []
        relus = {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
        for name, mod in relus.items():
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: ranges.__setitem__(name, float(o.max()))))
        model(calibration)
        for h in hooks:
            h.remove()
        errors = []
        for _ in range(draws):
            noisy = __import__("copy").deepcopy(model).eval()
            for mod in noisy.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    w = mod.weight
                    step = (w.abs().flatten(1).amax(1) / (2 ** (bits - 1) - 1)).view(-1, *([1] * (w.dim() - 1)))
                    w.add_(noise(w, step))
            for name, mod in noisy.named_modules():
                if name in relus:
                    step = ranges[name] / (2 ** bits - 1)
                    mod.register_forward_hook(lambda m, i, o, step=step: o + noise(o, step))
            out = noisy(x + noise(x, float(calibration.abs().max()) / 127))
            errors.append(float((out - ref).norm() / ref.norm()))
    return float(np.mean(errors))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_that_of_one_rounding_step(digits_trained, bits):
    """On trained digits weights and held-out digits: the QAT model's logit error against fp32 is what rounding
    every quantized tensor to its step predicts (0.5x to 1.25x of the noise model; measured 0.87x for 8 bits,
    0.72x for 4), and uniform8 keeps the fp32 top-1 decision on at least 99% of the images. A weight or
    activation scale twice too large leaves this window (measured 1.71x and 1.41x at 8 bits)."""
    from hawq_ray.quant.finetune import Recipe, calibrated
    torch.manual_seed(0)
    model, data = digits_trained
    x = torch.stack([data.test[i][0] for i in range(256)])
    calibration = torch.stack([data.train[i][0] for i in range(128)])
    qm = calibrated(model, f"uniform{bits}", data.train, Recipe(), input_shape())
    with torch.no_grad():
        ref, out = model(x), qm(x)
    measured = float((out - ref).norm() / ref.norm())
    predicted = rounding_noise_error(model, bits, x, calibration)
    assert 0.5 * predicted <= measured <= 1.25 * predicted, (measured, predicted)
    if bits == 8:
        assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.99


def test_unsupported_module_names_module_and_type():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmax2d(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(HawqError, match=r"module '1' of type Softmax2d"):
        prepare(model, "uniform8", (3, 8, 8))
    with pytest.raises(HawqError, match="no quantizable layer"):
        prepare(nn.Sequential(nn.ReLU()), "uniform8", (3, 8, 8))


def test_layer_table_resnet18_columns_groups_and_fixed_layers():
    t = layer_table(get_model("resnet18"), (3, 224, 224))
    assert list(t.columns) == ["layer", "kind", "params", "macs", "product_macs", "narrow_product_macs", "act_elements", "group", "fixed_bits"]
    assert len(t) == 21 and t["layer"].is_unique
    assert t.iloc[0]["layer"] == "features.init_block.conv.conv" and t.iloc[0]["fixed_bits"] == 8
    assert t.iloc[-1]["layer"] == "output" and t.iloc[-1]["fixed_bits"] == 8
    assert t["fixed_bits"].notna().sum() == 2
    # first conv: 64 x 3 x 7 x 7 weights, 112 x 112 outputs -> macs = 64*112*112*147
    assert t.iloc[0]["params"] == 64 * 3 * 49 and t.iloc[0]["macs"] == 64 * 112 * 112 * 147
    ds = t[t["layer"] == "features.stage2.unit1.identity_conv.conv"].iloc[0]
    assert ds["group"] == "features.stage2.unit1.body.conv1.conv"
    assert (t["group"] == "features.stage2.unit1.body.conv1.conv").sum() == 2
    assert (t["group"] != "").sum() == 6          # three downsample pairs
    assert int(t["macs"].sum()) == pytest.approx(1.8144e9, rel=1e-3)


@pytest.mark.parametrize("name,config,mib,gb", [
    # HAWQ-V3's published tables: size (MB) and BOPS (G); None where we do not compare
    ("resnet18", "fp32", 44.6, 1858), ("resnet18", "uniform8", 11.1, 116),
    ("resnet50", "uniform8", None, 247), ("resnet50", "uniform4", 13.1, None),
])
def test_size_and_bops_match_the_paper(name, config, mib, gb):
    t = layer_table(get_model(name), input_shape(name))
    bits = {layer: 32 for layer in t["layer"]} if config == "fp32" else parse_bits(config, t)
    costs = config_costs(t, bits)
    if mib is not None:
        assert round(costs["size_mib"], 1) == mib
    if gb is not None:
        assert round(costs["gbops"]) == gb


def test_cost_counts_by_hand_on_a_tiny_table():
    t = pd.DataFrame({"layer": ["a", "b"], "params": [1000, 2 ** 20], "macs": [10 ** 6, 10 ** 9],
                      "fixed_bits": pd.array([8, pd.NA], dtype="Int64")})
    bits = parse_bits("uniform4", t)
    assert bits == {"a": 8, "b": 4}
    costs = config_costs(t, bits)
    assert costs["size_mib"] == pytest.approx((1000 * 1 + 2 ** 20 * 0.5) / 2 ** 20)
    assert costs["gbops"] == pytest.approx((10 ** 6 * 64 + 10 ** 9 * 16) / 1e9)
    assert np.isnan(costs["latency_ms"])                               # no measured latencies
    t["lat4_ms"], t["lat8_ms"] = [1.0, 2.0], [3.0, 5.0]
    assert config_costs(t, bits)["latency_ms"] == 3.0 + 2.0            # a at 8 bits, b at 4


def test_bit_config_errors_name_the_input(tmp_path):
    t = layer_table(get_model(), (1, 16, 16))
    with pytest.raises(HawqError, match="unknown layers"):
        parse_bits({"nope": 4}, t)
    with pytest.raises(HawqError, match=r"no bits for layers \['block1.conv2'"):
        parse_bits({"block1.conv1": 4}, t)
    cfg = {r: 4 for r in t["layer"]}
    cfg["stem.conv"] = 8
    cfg["fc"] = 8
    cfg["block1.conv1"] = 6
    with pytest.raises(HawqError, match="valid bits are 4 and 8"):
        parse_bits(cfg, t)
    cfg["block1.conv1"] = 4
    cfg["fc"] = 4
    with pytest.raises(HawqError, match="fixed at 8"):
        parse_bits(cfg, t)
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(HawqError, match="cannot read a JSON bit config"):
        parse_bits(str(bad), t)


def test_macs_of_grouped_and_depthwise_convs_divide_by_the_groups():
    """MACs of a conv = Cout * (Cin / groups) * KH * KW * OH * OW: each output reads only its group's inputs.
    Guards the layer table against counting a grouped or depthwise conv as dense (groups x too many MACs,
    and BOPS with them). Every expected number is worked out by hand below."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4), nn.ReLU(),      # grouped
                          nn.Conv2d(16, 16, (3, 5), padding=(1, 2), groups=16), nn.ReLU(),  # depthwise
                          nn.Conv2d(16, 6, 1), nn.Flatten(), nn.Linear(6 * 5 * 6, 3)).eval()
    t = layer_table(model, (8, 10, 12)).set_index("layer")
    # conv 0: 10x12 -> stride 2, pad 1, 3x3: OH = (10 + 2 - 3) // 2 + 1 = 5, OW = (12 + 2 - 3) // 2 + 1 = 6
    assert t.loc["0", "macs"] == 16 * (8 // 4) * 3 * 3 * 5 * 6 == 8640
    assert t.loc["2", "macs"] == 16 * (16 // 16) * 3 * 5 * 5 * 6 == 7200     # depthwise 3x5, 'same' padding
    assert t.loc["4", "macs"] == 6 * 16 * 1 * 1 * 5 * 6 == 2880
    assert t.loc["6", "macs"] == 180 * 3 == 540
    assert t.loc["0", "params"] == 16 * 2 * 9 and t.loc["2", "params"] == 16 * 15
    # BOPS = MACs * b * b (Eq. 9), in GBOPS, for the grouped and the depthwise layer alone at 4 and 8 bits
    for layer, macs in (("0", 8640), ("2", 7200)):
        one = t.loc[[layer]].reset_index()
        assert config_costs(one, {layer: 4})["gbops"] == pytest.approx(macs * 16 / 1e9, rel=1e-12)
        assert config_costs(one, {layer: 8})["gbops"] == pytest.approx(macs * 64 / 1e9, rel=1e-12)


def test_macs_of_mobilenet_v2_depthwise_convs_and_total():
    """torchvision's MobileNetV2 at 224x224: its depthwise convs by hand, and the whole model's 300.8 M
    multiply-adds (the paper's 300 M; counting depthwise convs as dense would give several G)."""
    t = layer_table(get_model("torchvision:mobilenet_v2"), (3, 224, 224)).set_index("layer")
    assert t.loc["features.1.conv.0.0", "macs"] == 32 * 1 * 3 * 3 * 112 * 112        # 32 channels, stride 1
    assert t.loc["features.2.conv.1.0", "macs"] == 96 * 1 * 3 * 3 * 56 * 56          # 96 channels, stride 2
    assert t.loc["features.0.0", "macs"] == 32 * 3 * 3 * 3 * 112 * 112                # the dense stem
    assert int(t["macs"].sum()) == pytest.approx(300.8e6, rel=1e-3)
    one = t.loc[["features.2.conv.1.0"]].reset_index()
    assert config_costs(one, {"features.2.conv.1.0": 4})["gbops"] == pytest.approx(96 * 9 * 56 * 56 * 16 / 1e9)


def test_bn_fold_keeps_eps_where_the_running_variance_is_tiny():
    """Eq. 16 with sigma = sqrt(running_var + eps): on channels whose running variance is 0 or far below eps
    (dead channels are common in trained CNNs), dropping eps changes the folded weights by orders of magnitude.
    The folded weights and bias against numpy's formula, and the folded conv against conv then BN."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.0, 1e-7, 1e-4, 1.0]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        bn.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))
        bn.bias.copy_(torch.tensor([0.0, 0.1, -0.1, 0.2]))
    bn.eval()
    w, b = fold_bn(conv.weight, conv.bias, bn)
    gain = bn.weight.detach().numpy().astype(np.float64) / np.sqrt(bn.running_var.numpy().astype(np.float64) + 1e-3)
    np.testing.assert_allclose(w.detach().numpy(), conv.weight.detach().numpy() * gain[:, None, None, None],
                               rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), (conv.bias.detach().numpy() - bn.running_mean.numpy()) * gain
                               + bn.bias.detach().numpy(), rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)
