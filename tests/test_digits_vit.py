"""`digits_vit`, the embedded tiny vision transformer for the digits data: its architecture, explicit attention,
traceability and a short training run."""
import time

import pytest
import torch
import torch.fx
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.inputs.models import DIGITS_VIT, fp32_recipe, get_model, input_shape, num_classes
from hawq_ray.inputs.vit import DigitsViT, ViTAttention

WIDTH, DEPTH, HEADS, MLP, PATCHES = 64, 4, 4, 128, 16


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_digits_vit_is_selectable_by_name():
    model = get_model(DIGITS_VIT)
    assert type(model) is DigitsViT and DIGITS_VIT == "digits_vit"
    assert input_shape("digits_vit") == input_shape(model) == (1, 16, 16)
    assert num_classes(model) == 10
    with pytest.raises(HawqError, match="'digits_vit' has no pretrained weights"):
        get_model("digits_vit", pretrained=True)
    assert fp32_recipe("digits_vit")["epochs"] > 0 and fp32_recipe(None) == fp32_recipe("digits_resnet")
    with pytest.raises(HawqError, match="no fp32 training recipe"):
        fp32_recipe("resnet18")


def test_parameter_count_from_the_architecture():
    model = get_model("digits_vit")
    patch_embed = 1 * WIDTH * 4 * 4 + WIDTH                     # 4x4 stride-4 conv, 1 channel in
    tokens = WIDTH + (PATCHES + 1) * WIDTH                      # class token, position embedding of 17 tokens
    layer_norm = 2 * WIDTH
    attention = (WIDTH * 3 * WIDTH + 3 * WIDTH) + (WIDTH * WIDTH + WIDTH)   # qkv, proj
    mlp = (WIDTH * MLP + MLP) + (MLP * WIDTH + WIDTH)                       # fc1, fc2
    block = 2 * layer_norm + attention + mlp
    head = layer_norm + WIDTH * 10 + 10                          # final norm, linear on the class token
    assert count(model) == patch_embed + tokens + DEPTH * block + head == 136_906


def test_shapes_and_plain_modules():
    model = get_model("digits_vit").eval()
    seen = {}
    hooks = [model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("patches", o.shape)),
             model.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o.shape)),
             model.head.register_forward_hook(lambda m, i, o: seen.__setitem__("head_in", i[0].shape))]
    with torch.no_grad():
        out = model(torch.randn(3, 1, 16, 16))
    for hook in hooks:
        hook.remove()
    assert out.shape == (3, 10)
    assert seen == {"patches": (3, WIDTH, 4, 4), "tokens": (3, PATCHES + 1, WIDTH), "head_in": (3, WIDTH)}
    kinds = [type(m) for m in model.modules()]
    assert nn.MultiheadAttention not in kinds
    assert kinds.count(nn.LayerNorm) == 2 * DEPTH + 1 and kinds.count(nn.GELU) == DEPTH
    assert kinds.count(ViTAttention) == DEPTH
    assert all(m.heads == HEADS for m in model.modules() if isinstance(m, ViTAttention))


def test_explicit_attention_is_multi_head_attention():
    """The op-by-op attention computes what torch's MultiheadAttention does with the same weights."""
    torch.manual_seed(0)
    attn = ViTAttention(WIDTH, HEADS)
    reference = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(attn.qkv.weight)
        reference.in_proj_bias.copy_(attn.qkv.bias)
        reference.out_proj.weight.copy_(attn.proj.weight)
        reference.out_proj.bias.copy_(attn.proj.bias)
        x = torch.randn(2, PATCHES + 1, WIDTH)
        expected = reference(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_the_seed_sets_the_init():
    """(Equal inits for one seed and the global RNG left alone: tests/test_models.py, every embedded model.)"""
    assert not torch.equal(DigitsViT(seed=1).pos_embed, DigitsViT().pos_embed)


def test_traces_with_fx_into_explicit_ops():
    model = get_model("digits_vit").eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    methods = [n.target for n in traced.graph.nodes if n.op == "call_method"]
    functions = [getattr(n.target, "__name__", str(n.target)) for n in traced.graph.nodes if n.op == "call_function"]
    assert methods.count("softmax") == DEPTH and functions.count("matmul") == 2 * DEPTH
    modules = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.3.mlp.fc2", "norm", "head"} <= modules


@pytest.mark.usefixtures("one_torch_thread")
def test_short_training_beats_chance_by_far(tmp_path):
    """20 of the recipe's 60 epochs, without its shift augmentation (which slows a short schedule: 78% at 20
    epochs), reach 95% here (96-97% on the seed-1 and seed-2 splits), chance being 10%; 80% leaves room for
    another CPU's arithmetic. The full recipe measured 98.1% held-out top-1 on this split."""
    from hawq_ray.inputs.data import load_data
    from hawq_ray.quant.finetune import float_predictions, fp32_weights, labels_of, top1, train_fp32

    data = load_data("digits", input_shape=input_shape("digits_vit"))
    model = get_model("digits_vit")
    start = time.time()
    train_fp32(model, data.train, **{**fp32_recipe("digits_vit"), "epochs": 20, "shift": 0})
    accuracy = top1(float_predictions(model, data.test), labels_of(data.test))
    print(f"digits_vit, 20 epochs: top-1 {accuracy:.4f} in {time.time() - start:.1f} s")
    assert accuracy >= 0.8
    # the fp32 weights cache takes the name: a file per model, loaded back into a DigitsViT
    trained, path, fresh = fp32_weights(tmp_path, data, model_name="digits_vit", epochs=0)
    assert fresh and path.name == "digits_vit_fp32.pt"
    again, _, fresh = fp32_weights(tmp_path, data, model_name="digits_vit", epochs=0)
    assert not fresh and type(again) is DigitsViT
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))


def test_the_shift_augmentation_is_seeded_and_moves_the_batches():
    """The same seed trains the same weights; a shift trains different ones than none (the batches moved)."""
    from hawq_ray.inputs.data import load_data
    from hawq_ray.quant.finetune import train_fp32

    data = load_data("digits", input_shape=(1, 16, 16), seed=0)
    small = data.train if len(data.train) <= 128 else torch.utils.data.Subset(data.train, range(128))

    def weights(shift):
        model = DigitsViT(depth=1, dim=16, heads=2, seed=0)
        train_fp32(model, small, epochs=1, lr=0.05, batch_size=32, shift=shift, seed=3)
        return model.head.weight.detach().clone()
    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(0))
