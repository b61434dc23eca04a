import hashlib
import pickle

import pytest
import torch
import torch.fx
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.inputs.models import DEFAULT_MODEL, EMBEDDED_MODELS, DigitsResNet, get_model, input_shape, num_classes

# Parameter counts measured with pytorchcv 0.0.74.
PYTORCHCV_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "inceptionv3": 23_834_568,
                    "resnet20_cifar10": 272_474}
PYTORCHCV_SHAPES = {"resnet18": (3, 224, 224), "resnet50": (3, 224, 224), "inceptionv3": (3, 299, 299),
                    "resnet20_cifar10": (3, 32, 32)}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt by pytorchcv to download fails the test."""
    from pytorchcv.models.common import model_store

    def refuse(*args, **kwargs):
        raise AssertionError(f"pytorchcv tried to download: {args}")

    monkeypatch.setattr(model_store, "_download", refuse)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_default_model_architecture_and_size():
    model = get_model()
    assert get_model(DEFAULT_MODEL).__class__ is DigitsResNet
    convs = 9 * 1 * 8 + 2 * 9 * 8 * 8 + (9 * 8 * 16 + 9 * 16 * 16 + 8 * 16) + (9 * 16 * 24 + 9 * 24 * 24 + 16 * 24)
    bns = 2 * (3 * 8 + 3 * 16 + 3 * 24)
    assert count(model) == convs + bns + 24 * 10 + 10 == 14_370
    assert input_shape(model) == input_shape(None) == input_shape(DEFAULT_MODEL) == (1, 16, 16)
    assert num_classes(model) == 10
    assert model.block1.downsample is None
    assert model.block2.downsample.conv.stride == (2, 2) and model.block2.downsample.conv.kernel_size == (1, 1)


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_embedded_models_are_deterministic_and_leave_global_rng_alone(name):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, second = get_model(name).state_dict(), get_model(name).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_default_model_traces_with_fx():
    model = get_model().eval()
    traced = torch.fx.symbolic_trace(model)
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 3
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"block2.conv1", "block2.downsample.conv", "block3.downsample.conv", "fc"} <= targets
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(traced(x), model(x))
    assert model(x).shape == (4, 10)


@pytest.mark.parametrize("name", ["resnet18", "resnet20_cifar10"])
def test_small_pytorchcv_models_build_and_run(name):
    model = get_model(name).eval()
    assert count(model) == PYTORCHCV_PARAMS[name]
    assert input_shape(name) == input_shape(model) == PYTORCHCV_SHAPES[name]
    with torch.no_grad():
        out = model(torch.randn(1, *input_shape(model)))
    assert out.shape == (1, num_classes(model))


@pytest.mark.parametrize("name", ["resnet50", "inceptionv3"])
def test_large_pytorchcv_models_build(name):
    model = get_model(name)
    assert count(model) == PYTORCHCV_PARAMS[name]
    assert input_shape(model) == PYTORCHCV_SHAPES[name]
    assert num_classes(model) == 1000


def test_unknown_name_suggests_close_matches():
    with pytest.raises(HawqError, match=r"unknown model 'resnet81'.*resnet18"):
        get_model("resnet81")
    with pytest.raises(HawqError, match=r"unknown model 'digits_vt': did you mean digits_vit"):
        get_model("digits_vt")
    with pytest.raises(HawqError, match="unknown model"):
        input_shape("not_a_model_at_all")


def test_module_passes_through():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    assert get_model(module) is module
    with pytest.raises(HawqError, match="explicitly"):
        input_shape(module)
    with pytest.raises(HawqError, match="pretrained=True needs a pytorchcv model name"):
        get_model(module, pretrained=True)


def write_cache_file(folder, name, state, sha1_prefix=None):
    staging = folder / "staging.pth"
    torch.save(state, staging)
    digest = hashlib.sha1(staging.read_bytes()).hexdigest()
    path = folder / f"{name}-0597-{sha1_prefix or digest[:8]}.pth"
    staging.rename(path)
    return path


def test_pretrained_loads_from_local_cache_with_matching_sha1(tmp_path):
    source = get_model("resnet20_cifar10")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["output.extra"] = torch.zeros(1)  # pytorchcv ignores extra keys in its own files; so do we
    write_cache_file(tmp_path, "resnet20_cifar10", state)
    model = get_model("resnet20_cifar10", pretrained=True, cache_dir=tmp_path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_pretrained_refuses_file_whose_sha1_does_not_match_its_name(tmp_path):
    path = write_cache_file(tmp_path, "resnet20_cifar10", get_model("resnet20_cifar10").state_dict(), "deadbeef")
    with pytest.raises(HawqError, match=f"{path.name} but its SHA1 does not match"):
        get_model("resnet20_cifar10", pretrained=True, cache_dir=tmp_path)


def test_pretrained_without_cached_file_says_where_it_looked(tmp_path):
    with pytest.raises(HawqError) as info:
        get_model("resnet20_cifar10", pretrained=True, cache_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "resnet20_cifar10-<error>-<sha1[:8]>.pth" in message
    assert "\n" not in message
    with pytest.raises(HawqError, match="no pretrained weights"):
        get_model(pretrained=True)


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s, "epoch": 3}, lambda s: {"model": s}])
def test_weights_path_loads_bare_or_wrapped_state_dicts(tmp_path, wrap):
    trained = DigitsResNet(seed=7)
    path = tmp_path / "w.pt"
    torch.save(wrap(trained.state_dict()), path)
    model = get_model(weights=path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))


def test_weights_path_loads_safetensors(tmp_path):
    from safetensors.torch import save_file

    trained = DigitsResNet(seed=7)
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    model = get_model(weights=tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    torch.save(trained.state_dict(), tmp_path / "not.safetensors")  # a pickle under a safetensors name
    with pytest.raises(HawqError, match=r"cannot load weights file .*not\.safetensors: ") as info:
        get_model(weights=tmp_path / "not.safetensors")
    assert "\n" not in str(info.value)


def test_weights_missing_file(tmp_path):
    with pytest.raises(HawqError, match=r"weights file .*nope\.pt does not exist"):
        get_model(weights=tmp_path / "nope.pt")


def test_weights_that_do_not_match_the_model_name_the_keys(tmp_path):
    path = tmp_path / "digits.pt"
    torch.save(get_model().state_dict(), path)
    with pytest.raises(HawqError, match=r"does not match model .*missing \d+: .*unexpected \d+: stem\.conv\.weight"):
        get_model("resnet20_cifar10", weights=path)
    torch.save(DigitsResNet(num_classes=7).state_dict(), path)
    with pytest.raises(HawqError, match=r"shape mismatch 2: fc\.weight \(7, 24\) vs \(10, 24\)"):
        get_model(weights=path)


def test_file_that_is_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(HawqError, match=r"cannot load weights file .*garbage\.pth"):
        get_model(weights=path)


class CreatesFileOnLoad:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    # The payload is live: plain unpickling creates the marker file.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(CreatesFileOnLoad(proof))).close()
    assert proof.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": CreatesFileOnLoad(marker)}, path)
    with pytest.raises(HawqError, match=r"weights file .*evil\.pth: refused to unpickle io\.open") as info:
        get_model(weights=path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
