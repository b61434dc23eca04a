"""The model sources: pytorchcv names, `torchvision:NAME`, `timm:NAME`, `package.module:callable`; weights never
download."""
import hashlib
import json
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision

from hawq_ray.contract import HawqError
from hawq_ray.inputs import models
from hawq_ray.inputs.models import get_model, input_shape

USER_NETS = '''
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.conv(x))))


def build_net():
    return TinyNet()


def shaped_net():
    net = TinyNet()
    net.input_shape = (3, 32, 32)
    return net


def broken():
    raise ValueError("bad width\\nsecond line of the message")


def not_a_module():
    return 42


NOT_CALLABLE = 3
'''


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """torch.hub's cache points into tmp_path, and any attempt to fetch a URL fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """Modules on sys.path: hawq_user_nets (USER_NETS), hawq_user_shaped (module-level input_shape), and
    hawq_user_broken (raises at import)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "hawq_user_nets.py").write_text(USER_NETS)
    (code / "hawq_user_shaped.py").write_text("from hawq_user_nets import build_net\ninput_shape = (3, 64, 48)\n")
    (code / "hawq_user_broken.py").write_text("raise RuntimeError('boom at import\\nmore detail')\n")
    monkeypatch.syspath_prepend(str(code))
    yield
    for name in ("hawq_user_nets", "hawq_user_shaped", "hawq_user_broken"):
        sys.modules.pop(name, None)


def one_line_error(call, *args, **kwargs):
    with pytest.raises(HawqError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def randomized(model):
    """A state dict of `model` with every float tensor replaced by fresh random values."""
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


# --- torchvision:NAME ---

def test_torchvision_name_builds_the_torchvision_class():
    model = get_model("torchvision:mobilenet_v2")
    assert type(model) is torchvision.models.MobileNetV2
    assert input_shape("torchvision:mobilenet_v2") == (3, 224, 224)
    assert input_shape("torchvision:resnet18") == (3, 224, 224)


def test_inception_v3_is_299_and_single_output():
    assert input_shape("torchvision:inception_v3") == (3, 299, 299)
    model = get_model("torchvision:inception_v3")
    assert type(model) is torchvision.models.Inception3
    # without the aux head torchvision's forward returns the logits tensor in training mode too, not a namedtuple
    # (a forward pass is left out: it takes seconds on a small machine)
    assert model.aux_logits is False and model.AuxLogits is None


def test_googlenet_drops_aux_heads_and_loads_a_full_state_dict(tmp_path):
    full = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    state = randomized(full)
    path = tmp_path / "googlenet.pt"
    torch.save(state, path)
    model = get_model("torchvision:googlenet", weights=path)  # the aux1/aux2 weights are not an error
    assert model.aux1 is None and model.aux2 is None
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_unknown_torchvision_name_suggests_close_matches():
    message = one_line_error(get_model, "torchvision:resnet81")
    assert "'torchvision:resnet81' is not a torchvision model" in message and "did you mean resnet18" in message
    assert "mobilenet_v2" in message
    assert "is not a torchvision model" in one_line_error(input_shape, "torchvision:resnet81")


@pytest.mark.parametrize("name, kind", [("fasterrcnn_resnet50_fpn", "detection"),
                                        ("deeplabv3_resnet50", "segmentation"), ("r3d_18", "video"),
                                        ("raft_small", "optical_flow"), ("quantized_mobilenet_v2", "quantization")])
def test_non_classification_torchvision_models_are_refused(name, kind):
    message = one_line_error(get_model, f"torchvision:{name}")
    assert f"is a {kind} model; hawq-ray takes classification models only" in message
    assert "resnet18" in message and "mobilenet_v2" in message


def test_pretrained_without_cached_file_names_the_expected_path(tmp_path):
    expected_name = torchvision.models.get_model_weights("mobilenet_v2").DEFAULT.url.rsplit("/", 1)[-1]
    message = one_line_error(get_model, "torchvision:mobilenet_v2", pretrained=True, cache_dir=tmp_path)
    assert f"expected {tmp_path / expected_name};" in message and "never downloads" in message
    # without cache_dir: torch.hub's own cache, $TORCH_HOME/hub/checkpoints
    message = one_line_error(get_model, "torchvision:mobilenet_v2", pretrained=True)
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / expected_name) in message


def write_hub_file(folder, name, state):
    """Save `state` as torch.hub would cache it: `{name}-{sha256[:8]}.pth`; returns the path."""
    staging = folder / "staging.pth"
    torch.save(state, staging)
    path = folder / f"{name}-{hashlib.sha256(staging.read_bytes()).hexdigest()[:8]}.pth"
    staging.rename(path)
    return path


def test_pretrained_loads_cached_file_whose_sha256_matches_its_name(tmp_path, monkeypatch):
    state = randomized(get_model("torchvision:squeezenet1_1"))
    path = write_hub_file(tmp_path, "squeezenet1_1", state)
    # torchvision's own name carries the real file's hash, which a test file cannot match: use ours
    monkeypatch.setattr(models, "torchvision_weights_filename", lambda name: path.name)
    model = get_model("torchvision:squeezenet1_1", pretrained=True, cache_dir=tmp_path)
    assert torch.equal(model.classifier[1].weight, state["classifier.1.weight"])
    assert torch.equal(model.features[0].weight, state["features.0.weight"])


def test_pretrained_refuses_cached_file_whose_sha256_does_not_match(tmp_path):
    name = models.torchvision_weights_filename("squeezenet1_1")
    torch.save(get_model("torchvision:squeezenet1_1").state_dict(), tmp_path / name)
    message = one_line_error(get_model, "torchvision:squeezenet1_1", pretrained=True, cache_dir=tmp_path)
    assert str(tmp_path / name) in message and "SHA256 does not start with" in message


# --- package.module:callable ---

@pytest.mark.usefixtures("user_code")
def test_user_callable_and_class_build():
    model = get_model("hawq_user_nets:build_net")
    assert type(model).__name__ == "TinyNet" and model.fc.out_features == 5
    assert type(get_model("hawq_user_nets:TinyNet")).__name__ == "TinyNet"
    assert input_shape("hawq_user_nets:build_net") == (3, 224, 224)
    assert input_shape("hawq_user_nets:shaped_net") == (3, 32, 32)  # the model's own input_shape
    assert input_shape("hawq_user_shaped:build_net") == (3, 64, 48)  # the module's input_shape


@pytest.mark.usefixtures("user_code")
def test_user_model_weights_load_and_pretrained_is_refused(tmp_path):
    state = randomized(get_model("hawq_user_nets:build_net"))
    torch.save(state, tmp_path / "w.pt")
    model = get_model("hawq_user_nets:build_net", weights=tmp_path / "w.pt")
    assert torch.equal(model.fc.weight, state["fc.weight"])
    message = one_line_error(get_model, "hawq_user_nets:build_net", pretrained=True)
    assert "'hawq_user_nets:build_net'" in message and "weights=PATH" in message


@pytest.mark.usefixtures("user_code")
@pytest.mark.parametrize("spec, needles", [
    ("hawq_no_such_module:build", ["cannot import hawq_no_such_module", "ModuleNotFoundError"]),
    ("hawq_user_broken:build", ["cannot import hawq_user_broken", "RuntimeError: boom at import"]),
    ("hawq_user_nets:buld_net", ["has no attribute 'buld_net'", "did you mean build_net"]),
    ("hawq_user_nets:NOT_CALLABLE", ["NOT_CALLABLE is a int, not a callable"]),
    ("hawq_user_nets:broken", ["calling it raised ValueError: bad width"]),
    ("hawq_user_nets:not_a_module", ["returned a int, not a torch.nn.Module"]),
    ("hawq_user_nets:", ["is not package.module:callable"]),
])
def test_bad_user_specs_are_one_line_errors(spec, needles):
    message = one_line_error(get_model, spec)
    assert f"{spec!r}" in message
    assert all(needle in message for needle in needles), message
    assert "second line" not in message and "more detail" not in message
    one_line_error(input_shape, spec)


def test_pytorchcv_hint_mentions_all_forms():
    message = one_line_error(get_model, "resnet81")
    assert "resnet18" in message and "torchvision:NAME" in message and "package.module:callable" in message
    assert "timm:NAME" in message and "'digits_vit'" in message


# --- timm:NAME ---

@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or name lookup fails the test (timm and huggingface_hub fetch with their own
    clients, so the urllib / torch.hub guards above would not see them), and so does the hub client itself."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to use the network: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    import huggingface_hub
    import timm.models._hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._hub, "download_cached_file", refuse)


def timm_hub_id(name):
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name).hf_hub_id


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(folder, repo_id, filename, state, blob_name=None):
    """Lay `state` out as huggingface_hub caches a file: refs/main names a commit, whose snapshot's `filename`
    links to blobs/<sha256> (or `blob_name`); returns the snapshot path."""
    repo = folder / f"models--{repo_id.replace('/', '--')}"
    for sub in ("refs", "blobs", f"snapshots/{COMMIT}"):
        (repo / sub).mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    staging = folder / "staging"
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(staging))
    else:
        torch.save(state, staging)
    blob = repo / "blobs" / (blob_name or hashlib.sha256(staging.read_bytes()).hexdigest())
    staging.rename(blob)
    snapshot = repo / "snapshots" / COMMIT / filename
    snapshot.symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_timm_resnet18_builds_and_goes_through_layers(capsys):
    import timm
    from hawq_ray.service.cli import main

    model = get_model("timm:resnet18")
    assert isinstance(model, timm.models.ResNet) and models.num_classes(model) == 1000
    assert input_shape("timm:resnet18") == input_shape(model) == (3, 224, 224)  # the pretrained config's
    assert input_shape("timm:resnet18.a3_in1k") == (3, 160, 160)                # a tag's own config
    assert not models.is_user_code("timm:resnet18") and models.is_user_code("mypkg.nets:build")
    assert main(["layers", "--model", "timm:resnet18", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    layers = obj["layers"]
    assert obj["model"] == "timm:resnet18" and len(layers) == 21
    assert layers[0]["layer"] == "conv1" and layers[0]["params"] == 3 * 64 * 49
    assert layers[0]["macs"] == 3 * 64 * 49 * 112 * 112
    assert layers[-1]["layer"] == "fc" and layers[-1]["kind"] == "linear" and layers[-1]["params"] == 512 * 1000


def test_timm_resnet18_uniform8_runs_as_integers():
    from hawq_ray.program.executor import run_program
    from hawq_ray.quant.qat import prepare

    torch.manual_seed(0)
    qm = prepare(get_model("timm:resnet18").eval(), "uniform8", (3, 32, 32))  # a small input keeps it quick
    x = torch.randn(4, 3, 32, 32)
    qm.calibrate([x])
    qm.eval()
    with torch.no_grad():
        simulated = qm(x)
    program = qm.to_integer()
    integers = program.dequantize_output(run_program(program, program.quantize_input(x)))
    assert integers.shape == (4, 1000)
    torch.testing.assert_close(integers.float(), simulated.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, needles", [
    ("timm:resnet81", ["'timm:resnet81' is not a timm model", "did you mean resnet18"]),
    ("timm:deit_tiny_patch16_244", ["did you mean deit_tiny_patch16_224"]),
    ("timm:resnet18.a1_in2k",
     ["no pretrained tag 'a1_in2k' for resnet18", "did you mean a1_in1k", "timm:resnet18.TAG"]),
    ("timm:hf-hub:timm/resnet18.a1_in1k", ["is not a timm model"]),   # timm's own hub prefix would fetch: refused
])
def test_unknown_timm_names_are_one_line_errors(spec, needles):
    message = one_line_error(get_model, spec)
    assert all(needle in message for needle in needles), message
    assert "timm:NAME" in message or "timm:resnet18.TAG" in message
    assert "is not a timm model" in one_line_error(input_shape, "timm:resnet81")


@pytest.mark.usefixtures("no_network")
def test_timm_pretrained_without_cache_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo_id = timm_hub_id("resnet18")
    message = one_line_error(get_model, "timm:resnet18", pretrained=True, cache_dir=tmp_path)
    repo = tmp_path / f"models--{repo_id.replace('/', '--')}"
    assert f"expected {repo}/snapshots/<commit in refs/main>/model.safetensors" in message
    assert "never downloads" in message and "weights=PATH" in message
    # without cache_dir: huggingface_hub's own cache folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    message = one_line_error(get_model, "timm:resnet18", pretrained=True)
    assert str(tmp_path / "hf" / f"models--{repo_id.replace('/', '--')}") in message
    # the few timm weights with only a URL: torch.hub's checkpoints folder ($TORCH_HOME/hub/checkpoints)
    message = one_line_error(get_model, "timm:legacy_seresnet18", pretrained=True)
    assert f"expected {tmp_path / 'torch_home' / 'hub' / 'checkpoints'}/" in message and "weights=PATH" in message
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.pth"))


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_timm_pretrained_loads_the_hub_cache_offline(tmp_path, filename):
    state = randomized(get_model("timm:resnet18"))
    write_hub_cache(tmp_path, timm_hub_id("resnet18"), filename, state)
    model = get_model("timm:resnet18", pretrained=True, cache_dir=tmp_path)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


@pytest.mark.usefixtures("no_network")
def test_timm_pretrained_refuses_a_blob_whose_sha256_is_not_its_name(tmp_path):
    write_hub_cache(tmp_path, timm_hub_id("resnet18"), "model.safetensors",
                    get_model("timm:resnet18").state_dict(), blob_name="0" * 64)
    message = one_line_error(get_model, "timm:resnet18", pretrained=True, cache_dir=tmp_path)
    assert "are corrupt" in message and "weights=PATH" in message


@pytest.mark.usefixtures("no_network")
def test_timm_weights_path_takes_safetensors_and_names_mismatched_keys(tmp_path):
    from safetensors.torch import save_file

    state = randomized(get_model("timm:resnet18"))
    save_file(state, str(tmp_path / "w.safetensors"))
    model = get_model("timm:resnet18", weights=tmp_path / "w.safetensors")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    torch.save(state, tmp_path / "w.pt")
    message = one_line_error(get_model, "timm:resnet34", weights=tmp_path / "w.pt")
    assert "does not match model ResNet" in message and "missing" in message


@pytest.mark.usefixtures("no_network")
def test_timm_deit_builds_offline_and_its_layer_table_lists_every_linear(capsys):
    from hawq_ray.service.cli import main

    model = get_model("timm:deit_tiny_patch16_224")
    assert input_shape("timm:deit_tiny_patch16_224") == input_shape(model) == (3, 224, 224)
    assert models.num_classes(model) == 1000
    assert main(["layers", "--model", "timm:deit_tiny_patch16_224", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layers"]
    assert len(layers) == 1 + 12 * 4 + 1                          # patch embedding, 4 Linear a block, head
    assert layers[0]["layer"] == "patch_embed.proj" and layers[0]["fixed_bits"] == 8
    qkv = layers[1]
    assert qkv["layer"] == "blocks.0.attn.qkv" and qkv["macs"] == 197 * 192 * 576     # 197 tokens
    assert qkv["product_macs"] == qkv["narrow_product_macs"] == 197 * 197 * 192     # q k^T; p v
    assert layers[-1]["fixed_bits"] == 8


# --- the CLI ---

def test_cli_layers_on_a_torchvision_model(capsys):
    from hawq_ray.service.cli import main

    # resnet18 rather than mobilenet_v2: it needs nothing beyond ReLU, so this tests the model source alone
    assert main(["layers", "--model", "torchvision:resnet18", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    layers = obj["layers"]
    assert obj["model"] == "torchvision:resnet18" and len(layers) == 21
    assert layers[0]["layer"] == "conv1" and layers[0]["params"] == 3 * 64 * 49
    assert layers[0]["macs"] == 3 * 64 * 49 * 112 * 112  # stride-2 7x7 stem on 224x224
    assert layers[-1]["layer"] == "fc" and layers[-1]["kind"] == "linear" and layers[-1]["params"] == 512 * 1000


def test_cli_bad_torchvision_name_is_exit_2(capsys):
    from hawq_ray.service.cli import main

    assert main(["layers", "--model", "torchvision:fasterrcnn_resnet50_fpn"]) == 2
    err = capsys.readouterr().err.strip()
    assert "detection model" in err and len(err.splitlines()) == 1


def test_module_docstring_example_is_current():
    # keep the hand-written example file name in the module docstring honest
    assert models.torchvision_weights_filename("resnet18") in models.__doc__
