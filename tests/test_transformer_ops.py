"""The integer-only transformer ops (issue 42) against independent computations, and whole vision transformers
through the QAT interpreter and the integer executor.

- softmax: the polynomial for 2^-f against numpy at every fraction; the integer softmax against float softmax
  (numpy) within the bound of `ops.softmax`'s docstring; int16 extremes; a Python-integer reference row by row.
- matmul: against numpy's int64 product at the 8-bit extremes, K = 768.
- layout ops and constants: against numpy's reshape / transpose / indexing.
- layer_norm over the last axis: equal to the axis-1 op on the moved input (held to a Python-integer reference in
  test_layernorm.py).
- models: DigitsViT, a small timm ViT (fused attention), a small torchvision ViT (nn.MultiheadAttention): the
  fp32 interpreter computes the model's function, QAT simulation and executor agree on every element under
  uniform8, uniform4 and a random mixed config; their layer tables count token rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.inputs.vit import DigitsViT
from hawq_ray.ops.layernorm import layer_norm_constants
from hawq_ray.ops.softmax import FRACTION, LOG2E, ONE, POLY, exponent_constants, integer_softmax
from hawq_ray.program.executor import run_op, run_program
from hawq_ray.program.program import Op
from hawq_ray.quant.layers import layer_table
from hawq_ray.quant.qat import prepare

I16 = (-(1 << 15), (1 << 15) - 1)


def py_softmax_row(x: list, m: int, s: int) -> list:
    """The op's semantics with Python integers (unbounded; >> floors), written from the docstring."""
    top = max(x)
    es = []
    for xi in x:
        u = ((top - xi) * m + (1 << (s - 1))) >> s
        f = u & ((1 << FRACTION) - 1)
        p = POLY[1] + ((POLY[2] * f) >> FRACTION)
        p = POLY[0] + ((p * f) >> FRACTION)
        p = ONE + ((p * f) >> FRACTION)
        es.append(p >> min(u >> FRACTION, 31))
    r = (1 << 62) // sum(es)
    return [min((e * r + (1 << 53)) >> 54, 255) for e in es]


def test_the_exponent_polynomial_is_2_to_the_minus_f_within_1_8e_4():
    f = np.arange(1 << FRACTION, dtype=np.int64)
    p = POLY[1] + ((POLY[2] * f) >> FRACTION)
    p = POLY[0] + ((p * f) >> FRACTION)
    p = ONE + ((p * f) >> FRACTION)
    exact = 2.0 ** 30 * np.exp2(-f / 2.0 ** FRACTION)
    assert p[0] == ONE
    assert np.abs(p / exact - 1).max() < 1.8e-4


@pytest.mark.parametrize("s_in", [1e-3, 3e-4, 0.02])
def test_integer_softmax_is_float_softmax_within_half_a_code_and_the_polynomial(s_in):
    rng = np.random.default_rng(int(s_in * 1e5))
    x = rng.integers(I16[0] // 4, I16[1] // 4, (6, 33))
    c = exponent_constants(s_in)
    got = integer_softmax(torch.from_numpy(x), int(c["multiplier"]), int(c["shift"])).numpy()
    z = x * s_in
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # half a code, the polynomial's relative error (2e-4) on e and on E, the dyadic exponent's rounding; a
    # probability above 255/256 is clamped to the top code
    assert np.all(np.abs(got / 256 - np.minimum(p, 255 / 256)) <= 0.5 / 256 + 5e-4 * p + 1e-6)


def test_integer_softmax_at_the_int16_extremes_equals_the_python_integer_reference():
    rows = [[I16[0], I16[1]] + [0] * 6, [I16[1]] * 8, [I16[0]] * 8, [I16[0]] * 7 + [I16[1]],
            list(range(-4, 4))]
    for s_in in (1e-4, 2e-3, 0.5):
        c = exponent_constants(s_in)
        m, s = int(c["multiplier"]), int(c["shift"])
        got = integer_softmax(torch.tensor(rows), m, s).tolist()
        assert got == [py_softmax_row(r, m, s) for r in rows]
    assert got[1] == [32] * 8 and got[3][-1] == 255        # equal logits share 256; one dominant takes all


def test_softmax_refuses_input_wider_than_int16():
    c = exponent_constants(1e-3)
    op = Op("softmax", ["x"], "p", consts=c)
    with pytest.raises(HawqError, match="int16"):
        run_op(op, [torch.tensor([[1 << 15, 0]])])


@pytest.mark.parametrize("signs", [(True, True), (False, True)])
def test_matmul_equals_numpy_at_the_8_bit_extremes(signs):
    rng = np.random.default_rng(7)
    lo_a = -128 if signs[0] else 0
    a = rng.choice([lo_a, 127 if signs[0] else 255, 0, 1], (2, 3, 5, 768))
    b = rng.choice([-128, 127, -1], (2, 3, 768, 4))
    a[0, 0, 0] = lo_a if signs[0] else 255        # the extreme row times the extreme column
    b[0, 0, :, 0] = -128
    op = Op("matmul", ["a", "b"], "z", attrs={"a_signed": signs[0], "b_signed": True, "k": 768})
    got = run_op(op, [torch.from_numpy(a), torch.from_numpy(b)]).numpy()
    assert np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


def test_layout_ops_and_constants_equal_numpy():
    x = np.arange(2 * 17 * 48).reshape(2, 17, 48)
    t = torch.from_numpy(x)
    qkv = run_op(Op("reshape", ["x"], "r", attrs={"shape": (-1, 17, 3, 4, 4)}), [t])
    heads = run_op(Op("permute", ["r"], "p", attrs={"dims": (2, 0, 3, 1, 4)}), [qkv])
    k = run_op(Op("take", ["p"], "k", attrs={"axis": 0, "index": 1}), [heads]).numpy()
    assert np.array_equal(k, x.reshape(2, 17, 3, 4, 4).transpose(2, 0, 3, 1, 4)[1])
    cls = run_op(Op("take", ["x"], "c", attrs={"axis": 1, "index": 0}), [t]).numpy()
    assert np.array_equal(cls, x[:, 0])
    value = np.arange(48, dtype=np.int32).reshape(1, 1, 48)
    const = run_op(Op("constant", ["x"], "v", consts={"value": value}), [t]).numpy()
    assert const.shape == (2, 1, 48) and np.array_equal(const[1], value[0])


def test_layer_norm_over_the_last_axis_is_the_channel_op_on_the_moved_value():
    rng = np.random.default_rng(3)
    c = 24
    consts, attrs = layer_norm_constants(rng.uniform(-2, 2, c), rng.uniform(-1, 1, c), 1e-5, 0.01, 0.002, c)
    x = torch.from_numpy(rng.integers(-3000, 3000, (2, 7, c)))
    last = Op("layer_norm", ["x"], "y", consts=consts, attrs=attrs | {"axis": 2, "lo": I16[0], "hi": I16[1]})
    first = Op("layer_norm", ["x"], "y", consts=consts, attrs=attrs | {"axis": 1, "lo": I16[0], "hi": I16[1]})
    assert torch.equal(run_op(last, [x]), run_op(first, [x.transpose(1, 2)]).transpose(1, 2))


# ---------------------------------------------------------------------------------------------- models

def small_timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(1)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0)


def small_torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(2)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)     # torchvision zeroes the head: nothing to compare
    return model


def small_torchvision_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    torch.manual_seed(3)
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10, layer_scale=0.5)
    with torch.no_grad():       # layer scales of both signs and sizes, as training leaves them
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.randn_like(p))
    return model


def small_timm_convnext():
    from timm.models.convnext import ConvNeXt
    torch.manual_seed(4)
    return ConvNeXt(in_chans=3, num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), ls_init_value=0.3)


def small_torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer
    torch.manual_seed(5)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10)
    with torch.no_grad():       # relative position biases away from their zero start, as training leaves them
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1)
    return model


def small_timm_swin():
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(7)
    model = SwinTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=16, depths=(2, 2),
                            num_heads=(2, 4), window_size=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1)
    return model


def small_torchvision_swin_v2():
    """Cosine attention, the continuous position bias MLP, post-norm; 10x10 tokens padded to 12x12 windows,
    then 5x5 padded to 8x8 (shifted: the mask covers padded tokens too)."""
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2, PatchMergingV2
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    with torch.no_grad():          # away from the initial values, which hide a wrong logit scale or key bias
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("qkv.bias"):
                p.normal_(0, 0.5)
    return model


def small_timm_beit():
    """q and v biases around a fixed zero built in forward (F.linear of the module's weight), a relative position
    bias per block, layer scale on Linear outputs, the mean of the patch tokens (the class token cropped off)."""
    from timm.models.beit import Beit
    torch.manual_seed(6)
    model = Beit(img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2, init_values=0.5,
                 use_rel_pos_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
                p.normal_(0, 0.5)
    nn.init.normal_(model.head.weight, std=1.0)
    return model


def small_timm_swin_v2():
    """timm's own cosine window attention: F.normalize, a logit scale, its continuous position bias MLP."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    torch.manual_seed(7)
    model = SwinTransformerV2(img_size=32, patch_size=4, num_classes=10, embed_dim=16, depths=(2, 2),
                              num_heads=(2, 4), window_size=4)
    nn.init.normal_(model.head.fc.weight, std=1.0)
    return model


class PaddedTokens(nn.Module):
    """Token mixing through zero padding, a crop, RMSNorm and F.normalize (none of them a block of a zoo)."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(4, 16), nn.RMSNorm(16)
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):                          # (N, 1, 6, 4): six tokens of four features
        t = self.norm(self.embed(x.flatten(1, 2)))
        t = torch.nn.functional.pad(t, (0, 0, 2, 1))               # nine tokens, zeros at both ends
        t = self.fc(t)[:, 1:7]
        t = torch.nn.functional.normalize(t, dim=-1) + t[:, :, :]
        return self.head(t[:, 2])


class RadixSum(nn.Module):
    """Split attention's reductions: a sum over the radix axis of (N, 2, C, H, W), a sum over H and W."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv(x)
        y = y.view(y.shape[0], 2, 8, y.shape[2], y.shape[3]).sum(dim=1)
        return self.head(self.fc(y).sum((2, 3)))


def small_torchvision_maxvit():
    from torchvision.models.maxvit import MaxVit
    torch.manual_seed(6)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                   block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1)
        nn.init.normal_(model.classifier[-1].weight, std=1.0)     # logits well above the 8-bit noise
    return model


def small_timm_maxvit():
    """timm's MaxViT (MBConv, block and grid attention with an MLP relative position bias), at 32x32."""
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg
    torch.manual_seed(5)
    cfg = MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=("M", "M"), stem_width=8, stem_bias=True,
                     conv_cfg=MaxxVitConvCfg(),
                     transformer_cfg=MaxxVitTransformerCfg(rel_pos_type="mlp", dim_head=8, partition_ratio=8))
    return MaxxVit(cfg, img_size=32, num_classes=10)


MODELS = {"digits_vit": (lambda: DigitsViT(seed=3), (1, 16, 16)),
          "timm_vit": (small_timm_vit, (3, 16, 16)),
          "torchvision_vit": (small_torchvision_vit, (3, 16, 16)),
          "torchvision_convnext": (small_torchvision_convnext, (3, 32, 32)),
          "timm_convnext": (small_timm_convnext, (3, 32, 32)),
          "torchvision_swin": (small_torchvision_swin, (3, 32, 32)),     # 8x8 tokens, shifted 4x4 windows
          "torchvision_maxvit": (small_torchvision_maxvit, (3, 32, 32)),   # block and grid attention, einsum
          "timm_maxvit": (small_timm_maxvit, (3, 32, 32)),
          "timm_swin": (small_timm_swin, (3, 32, 32)),    # explicit window attention, channels-last head
          "torchvision_swin_v2": (small_torchvision_swin_v2, (3, 40, 40)),
          "timm_swin_v2": (small_timm_swin_v2, (3, 32, 32)),
          "timm_beit": (small_timm_beit, (3, 16, 16)),
          "padded_tokens": (PaddedTokens, (1, 6, 4)),
          "radix_sum": (RadixSum, (3, 6, 6))}
ATTENTION = {"digits_vit", "timm_vit", "torchvision_vit", "torchvision_swin", "torchvision_maxvit", "timm_maxvit",
             "timm_swin", "torchvision_swin_v2", "timm_swin_v2", "timm_beit"}
# one model of each way attention is written (digits_vit's TVM test is test_deploy_transformer's)
COMPILED = ("timm_vit", "torchvision_vit", "torchvision_swin_v2", "torchvision_maxvit", "timm_maxvit", "timm_beit",
            "torchvision_convnext")
SHIFTED = {"torchvision_swin", "timm_swin", "torchvision_swin_v2", "timm_swin_v2"}
EXPECTED = {"torchvision_convnext": {"affine"}, "timm_convnext": {"affine"},       # layer scale
            "torchvision_swin_v2": {"pad", "crop", "affine"}, "timm_swin_v2": {"affine"},
            "timm_beit": {"crop", "affine", "sum_pool2d"}, "padded_tokens": {"pad", "crop"},
            "radix_sum": {"sum_pool2d", "permute"}}


def mixed_bits(model, shape, seed):
    """4 or 8 bits at random for each searchable layer, 8 for the fixed ones."""
    table = layer_table(model, shape)
    rng = np.random.default_rng(seed)
    return {row.layer: int(rng.choice([4, 8])) if pd.isna(row.fixed_bits) else 8 for row in table.itertuples()}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bits", ["uniform8", "uniform4", "mixed"])
def test_qat_simulation_and_executor_agree_on_every_element(name, bits):
    build, shape = MODELS[name]
    model = build().eval()
    config = mixed_bits(model, shape, 5) if bits == "mixed" else bits
    qm = prepare(model, config, shape)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn((8, *shape), generator=gen)
    qm.calibrate([x[:4], x[4:]]).eval()
    with torch.no_grad():
        out, _ = qm.run(x)
    program = qm.to_integer()
    got = run_program(program, program.quantize_input(x))
    assert torch.equal(got, out.q)
    ops = {op.op for op in program.ops}
    assert {"softmax", "matmul", "layer_norm", "permute"} <= ops if name in ATTENTION else \
        name == "radix_sum" or {"layer_norm"} <= ops
    assert EXPECTED.get(name, set()) <= ops
    assert ("roll" in ops) == (name in SHIFTED)


@pytest.mark.parametrize("name", COMPILED)
def test_the_compiled_module_matches_the_executor_on_every_value(name):
    """The TVM module of a small model of each family under a random mixed config (4-bit q, k, v beside 8-bit
    ones), 8 random inputs: every value its kernels store equals the integer executor's."""
    from hawq_ray.analysis.verify import check_compiled
    build, shape = MODELS[name]
    model = build().eval()
    qm = prepare(model, mixed_bits(model, shape, 5), shape)
    x = torch.randn((8, *shape), generator=torch.Generator().manual_seed(11))
    qm.calibrate([x]).eval()
    program = qm.to_integer()
    out, _ = check_compiled(program, program.quantize_input(x), "llvm")
    assert out["tvm_differing"] == 0 and out["tvm_first_divergence"] is None and out["tvm_values"] > 20, out


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_a_products_operands_are_codes_of_their_qkv_layers_bits(name):
    """Every product of two activations reads codes of the bits the config gives the layer its operands come
    from (4 or 8 per qkv row, at random), and softmax's probabilities as unsigned 8-bit codes: checked on the
    values the integer program computes, against the range of a b-bit code, not against its own attributes."""
    build, shape = MODELS[name]
    model = build().eval()
    config = mixed_bits(model, shape, 2)
    qm = prepare(model, config, shape)
    x = torch.randn((4, *shape), generator=torch.Generator().manual_seed(3))
    qm.calibrate([x]).eval()
    program = qm.to_integer()
    _, values = run_program(program, program.quantize_input(x), record=True)
    products = {n.name: n for n in qm.graph.nodes if n.kind == "matmul"}
    widths = set()
    for op in (op for op in program.ops if op.op == "matmul"):
        node = products[op.output]
        layer = node.attrs["operand_layer"]
        assert layer.endswith(("qkv", "in_proj"))
        for i, (operand, signed) in enumerate(zip(op.inputs, (op.attrs["a_signed"], op.attrs["b_signed"]))):
            bits = 8 if node.attrs["narrow"][i] else config[layer]     # softmax's codes, or the qkv row's
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            codes = values[operand]
            assert lo <= int(codes.min()) and int(codes.max()) <= hi, (op.output, i, bits)
            assert (op.attrs["a_bits"], op.attrs["b_bits"])[i] == bits
            widths.add(bits)
    assert {4, 8} <= widths


@pytest.mark.parametrize("name", MODELS)
def test_the_fp32_interpreter_computes_the_model_and_qat_stays_close(name):
    build, shape = MODELS[name]
    model = build().eval()
    qm = prepare(model, "uniform8", shape)
    x = torch.randn((8, *shape), generator=torch.Generator().manual_seed(4))
    qm.calibrate([x]).eval()
    with torch.no_grad():
        ref = model(x)
        fp32 = qm.set_mode("fp32")(x)
        qat = qm.set_mode("qat")(x)
    assert torch.allclose(fp32, ref, atol=1e-5, rtol=1e-5)
    assert (qat - ref).abs().max() < 0.1 * ref.abs().max()        # 8-bit: close to the float function


@pytest.mark.parametrize("name,layer,macs", [
    ("torchvision_swin", "features.1.0.attn.qkv", 8 * 8 * 16 * 48),     # F.linear of the module's weight
    ("torchvision_swin", "features.1.0.attn.proj", 8 * 8 * 16 * 16),
    ("timm_beit", "blocks.0.attn.qkv", 17 * 32 * 96)])                 # F.linear with a bias built in forward
def test_layers_read_through_f_linear_count_their_macs(name, layer, macs):
    build, shape = MODELS[name]
    assert layer_table(build(), shape).set_index("layer").loc[layer, "macs"] == macs


def test_layer_table_of_a_vit_counts_token_rows_and_fixes_the_ends():
    model = DigitsViT()
    table = layer_table(model, (1, 16, 16))
    rows = table.set_index("layer")
    assert rows.loc["blocks.0.attn.qkv", "macs"] == 17 * 64 * 192       # 17 tokens
    assert rows.loc["blocks.0.mlp.fc2", "macs"] == 17 * 128 * 64
    assert rows.loc["head", "macs"] == 64 * 10                          # the class token only
    assert rows.loc["patch_embed", "fixed_bits"] == 8 and rows.loc["head", "fixed_bits"] == 8
    assert table["fixed_bits"].isna().sum() == 16                        # 4 Linear layers x 4 blocks searchable


@pytest.mark.parametrize("name,per_product", [
    ("digits_vit", 17 * 17 * 64),                         # q k^T, p v: tokens^2 x width each
    ("timm_vit", 17 * 17 * 32),                           # through scaled_dot_product_attention
    ("torchvision_vit", 17 * 17 * 32),                    # through nn.MultiheadAttention
    ("torchvision_swin", None)])                          # windows: H W x C x window tokens each
def test_products_of_activations_are_priced_at_their_operands_bits_on_their_qkv_row(name, per_product):
    """q k^T reads two operands at the qkv layer's bits b (b x b a MAC), p v reads v at b beside softmax's
    8-bit probabilities (8 x b): hand-counted MACs, priced by BOPS = sum MACs b^2 + q k^T b^2 + p v 8 b."""
    from hawq_ray.contract.cost import config_costs
    build, shape = MODELS[name]
    table = layer_table(build(), shape)
    charged = table[table["product_macs"] > 0]
    assert all(layer.endswith(("qkv", "in_proj")) for layer in charged["layer"])
    expected = [per_product] * len(charged) if per_product else [8 * 8 * 16 * 16] * 2 + [4 * 4 * 32 * 16] * 2
    assert charged["product_macs"].tolist() == expected
    assert charged["narrow_product_macs"].tolist() == expected
    assert (table["narrow_product_macs"] > 0).sum() == len(charged)
    rng = np.random.default_rng(0)
    bits = {layer: int(rng.choice([4, 8])) for layer in table["layer"]}
    b = np.array([bits[layer] for layer in table["layer"]])
    qk = table["product_macs"].to_numpy()
    pv = table["narrow_product_macs"].to_numpy()
    expected_bops = int((table["macs"].to_numpy() * b * b).sum() + (qk * b * b).sum() + (pv * 8 * b).sum())
    assert config_costs(table, bits)["gbops"] == pytest.approx(expected_bops / 1e9, rel=1e-12)


def test_multihead_attention_keeps_its_state_dict_and_function():
    from hawq_ray.inputs.attention import explicit_attention
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    keys = list(mha.state_dict())
    want = mha(x, x, x, need_weights=False)[0]
    explicit_attention(mha)
    assert list(mha.state_dict()) == keys and len(list(mha.parameters())) == 4
    assert torch.allclose(mha(x, x, x, need_weights=False)[0], want, atol=1e-6)


class MaskedAttention(nn.Module):
    """Attention with a learned, data-dependent mask: which keys a query sees depends on the input."""

    def __init__(self):
        super().__init__()
        self.qkv, self.gate, self.out = nn.Linear(8, 24), nn.Linear(8, 1), nn.Linear(32, 4)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], 4, 3, 8).permute(2, 0, 1, 3).unbind(0)
        mask = self.gate(x).transpose(1, 2) > 0
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.flatten(1))


class WithMaskedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MaskedAttention()

    def forward(self, x):
        return self.attn(x)


class Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.fft.fft(x).real)


@pytest.mark.parametrize("build,shape,where", [(WithMaskedAttention, (4, 8), "in module 'attn' of type MaskedAttention"),
                                               (Spectral, (4, 8), "function 'fft_fft'"),
                                               (small_torchvision_swin, (3, 36, 36), "9x9 map (odd sides")])
def test_an_op_with_no_integer_form_is_one_line_naming_it(build, shape, where):
    with pytest.raises(HawqError) as e:
        prepare(build(), "uniform8", shape)
    assert where in str(e.value) and "\n" not in str(e.value)


def test_hessian_traces_through_fused_attention_equal_the_explicit_path():
    """Hessian-vector products need the second derivative of attention, which the fused SDPA kernels lack: the
    traces of timm's fused path (run on the math kernel) equal those of its explicit path, same draws."""
    import warnings
    from hawq_ray.analysis.sensitivity import layer_traces

    model = small_timm_vit().eval()
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = layer_traces(model, batches, max_iter=8, rank=2, seed=1)
        for block in model.blocks:
            block.attn.fused_attn = False
        explicit = layer_traces(model, batches, max_iter=8, rank=2, seed=1)
    assert len(fused) == 10 and np.isfinite(fused["trace"]).all()
    assert np.allclose(fused["trace"], explicit["trace"], rtol=1e-3, atol=1e-6)


class ComputedBias(nn.Module):
    """A bias computed in forward from parameters alone (einsum, a reduction), added to a Linear's output."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)
        self.a, self.b = nn.Parameter(torch.randn(2, 4)), nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return self.head(self.fc(x) + torch.einsum("ij,jk->ik", self.a, self.b).sum(0))


def test_a_constant_computed_from_parameters_is_exact_and_trains():
    model = ComputedBias().eval()
    qm = prepare(model, "uniform8", (5, 8))
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    qm.calibrate([x]).eval()
    with torch.no_grad():
        out, _ = qm.run(x)
        assert torch.equal(qm.set_mode("fp32")(x), model(x))
    qm.set_mode("qat")
    program = qm.to_integer()
    assert torch.equal(run_program(program, program.quantize_input(x)), out.q)
    qm.train()
    qm(x).sum().backward()
    assert qm.model.a.grad.abs().sum() > 0 and qm.model.b.grad.abs().sum() > 0
