"""Models by name or as a module. A name is one of
- the embedded default `digits_resnet` (a small residual CNN for the digits data) or any pytorchcv name;
- `torchvision:NAME`, a torchvision classification model (any of `list_models(module=torchvision.models)`);
- `package.module:callable`, user code: the callable (a function or class) is called with no arguments.

Weights are only ever read from local files, never downloaded:
- `weights=PATH`: a state dict saved with `torch.save` (bare, or under "state_dict" / "model");
- `pretrained=True` with a pytorchcv name: the file pytorchcv itself caches, `{name}-{error}-{sha1[:8]}.pth` in
  `cache_dir` (default `~/.torch/models`), used only if the file's SHA1 starts with the 8 hex digits in its name;
- `pretrained=True` with `torchvision:NAME`: the file torch.hub caches, the basename of the default weights' URL
  (e.g. `resnet18-f37072fd.pth`) in `cache_dir` (default `torch.hub.get_dir()/checkpoints`), used only if its
  SHA256 starts with the hex digits after the name's last '-' (torch.hub's convention).
Every file is read with `torch.load(..., weights_only=True)`, so a checkpoint crafted to run code is refused.
"""

import difflib
import hashlib
import importlib
import re
from pathlib import Path

import torch
from torch import nn

from hawq_ray.contract import HawqError

DEFAULT_MODEL = "digits_resnet"
DEFAULT_CACHE_DIR = Path("~/.torch/models")
TORCHVISION_PREFIX = "torchvision:"
DEFAULT_INPUT_SHAPE = (3, 224, 224)  # ImageNet's, for torchvision and user models that say nothing else
# torchvision builds these with auxiliary heads (a namedtuple output in training mode) and, unless told, a slow
# scipy-based init that warns; hawq-ray wants one output, and random init is replaced by weights anyway.
# transform_input stays off (torchvision turns it on with its weights): its per-channel slicing does not quantize,
# so their pretrained weights want inputs normalised with mean = std = 0.5 rather than ImageNet's statistics.
TORCHVISION_SINGLE_OUTPUT = {"googlenet": {"aux_logits": False, "init_weights": False},
                             "inception_v3": {"aux_logits": False, "init_weights": False}}


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Downsample(nn.Module):
    """The shortcut of a block that changes shape: a strided 1x1 conv and BN, beside the block's conv1."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        reshapes = stride != 1 or in_channels != out_channels
        self.downsample = Downsample(in_channels, out_channels, stride) if reshapes else None

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class DigitsResNet(nn.Module):
    """The default model: a small ResNet for 1x16x16 digits (sklearn's 8x8 digits upsampled), 10 classes.

    stem 3x3 conv 1->8, then blocks 8->8 (16x16), 8->16 stride 2 (8x8), 16->24 stride 2 (4x4); the last two
    have a strided 1x1 downsample conv on the shortcut. Global average pool, flatten, linear 24->10.
    14,370 parameters: narrow enough that 4-bit weights and activations cost it accuracy (uniform4 after
    post-training quantization loses clearly more than the mixed configs), so the default run shows the
    trade-off that bit allocation is for. Plain modules and `+`, so torch.fx traces it. Initialised from `seed`
    without touching the global random state, so two builds are identical.
    """

    def __init__(self, in_channels=1, in_size=(16, 16), num_classes=10, widths=(8, 16, 24), seed=0):
        super().__init__()
        self.in_channels = in_channels
        self.in_size = tuple(in_size)
        self.num_classes = num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = ConvBNReLU(in_channels, widths[0])
            self.block1 = BasicBlock(widths[0], widths[0])
            self.block2 = BasicBlock(widths[0], widths[1], stride=2)
            self.block3 = BasicBlock(widths[1], widths[2], stride=2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def is_user_code(spec) -> bool:
    """Whether a model spec names Python code to import and call (`package.module:callable`)."""
    return isinstance(spec, str) and ":" in spec and not spec.startswith(TORCHVISION_PREFIX)


def get_model(name=None, *, pretrained=False, weights=None, cache_dir=None):
    """A model by name (None: the default; a pytorchcv name, `torchvision:NAME` or `package.module:callable`), or
    the module itself; weights from `weights` or, with `pretrained`, the local cache (see the module docstring)."""
    if isinstance(name, nn.Module):
        if pretrained:
            raise HawqError("pretrained=True needs a pytorchcv model name, not a module object; pass weights=PATH")
        model = name
    elif name is None or name == DEFAULT_MODEL:
        if pretrained and weights is None:
            raise HawqError(f"model {DEFAULT_MODEL!r} has no pretrained weights; train it or pass weights=PATH")
        model = DigitsResNet()
    elif isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name, pretrained=pretrained, weights=weights, cache_dir=cache_dir)
    elif is_user_code(name):
        if pretrained and weights is None:
            raise HawqError(f"model {name!r} is user code with no pretrained weights; pass weights=PATH")
        model = _user_model(name)
    elif isinstance(name, str):
        model = _pytorchcv_model(name)
        if pretrained and weights is None:
            path = cached_weights_file(name.lower(), cache_dir)
            load_weights(model, path, ignore_unexpected=True)  # as pytorchcv does with its own files
            return model
    else:
        raise HawqError(f"model must be a name or a torch.nn.Module, got {type(name).__name__}")
    if weights is not None:
        load_weights(model, weights)
    return model


def _pytorchcv_model(name):
    from pytorchcv.model_provider import _models, get_model as pytorchcv_get_model

    if name.lower() not in _models:
        close = difflib.get_close_matches(name.lower(), [DEFAULT_MODEL, *_models], n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise HawqError(f"unknown model {name!r}: {hint}valid: {DEFAULT_MODEL!r}, a pytorchcv name "
                        f"(e.g. resnet18, resnet50, inceptionv3, resnet20_cifar10), torchvision:NAME "
                        f"(e.g. torchvision:resnet18) or package.module:callable")
    return pytorchcv_get_model(name, pretrained=False)


def _torchvision_name(spec):
    """NAME of `torchvision:NAME`, checked to be a torchvision classification model."""
    from torchvision import models as tv

    name = spec[len(TORCHVISION_PREFIX):].lower()
    valid = tv.list_models(module=tv)  # the top-level package holds exactly the classification models
    if name in valid:
        return name
    if name in tv.list_models():  # the builder's subpackage says which kind: detection, segmentation, ...
        kind = tv.get_model_builder(name).__module__.split(".")[2]
        problem = f"is a {kind} model; hawq-ray takes classification models only"
    else:
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        problem = "is not a torchvision model" + (f" (did you mean {', '.join(close)}?)" if close else "")
    raise HawqError(f"model {spec!r} {problem}; valid: torchvision:NAME for one of {len(valid)} classification "
                    f"models (e.g. resnet18, mobilenet_v2, efficientnet_b0, inception_v3)")


def _torchvision_model(spec, *, pretrained, weights, cache_dir):
    from torchvision import models as tv

    name = _torchvision_name(spec)
    single = TORCHVISION_SINGLE_OUTPUT.get(name, {})
    model = tv.get_model(name, weights=None, **single)
    if weights is None and pretrained:
        weights = torchvision_weights_file(name, cache_dir)
    if weights is not None:
        load_weights(model, weights, ignore_unexpected=bool(single))  # the aux heads we left out have weights
    return model


def torchvision_weights_filename(name):
    """The name torch.hub caches torchvision model `name`'s default weights under: the basename of their URL."""
    from torchvision import models as tv

    return tv.get_model_weights(name).DEFAULT.url.rsplit("/", 1)[-1]


def torchvision_weights_file(name, cache_dir=None):
    """torch.hub's cache file for torchvision model `name`'s default weights, checked against its hash prefix."""
    folder = Path(cache_dir if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints").expanduser()
    path = folder / torchvision_weights_filename(name)
    if not path.is_file():
        raise HawqError(f"no cached weights for torchvision:{name}: expected {path}; hawq-ray never downloads: "
                        f"copy the file there or pass weights=PATH")
    prefix = re.fullmatch(r".+-([0-9a-f]+)\.pth", path.name)
    if prefix and not file_digest(path, "sha256").startswith(prefix.group(1)):
        raise HawqError(f"cached weights {path} are corrupt or not torchvision's: their SHA256 does not start "
                        f"with {prefix.group(1)} as the file name says; replace the file or pass weights=PATH")
    return path


def _user_callable(spec):
    """The module and the callable named by `package.module:callable` (the callable may be dotted: Class.build)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise HawqError(f"model {spec!r} is not package.module:callable (e.g. mypkg.nets:build_net)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, SyntaxError, or whatever the module raises at import
        raise HawqError(f"model {spec!r}: cannot import {module_name}: {_first_line(exc)}") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            close = difflib.get_close_matches(part, dir(target), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HawqError(f"model {spec!r}: {module_name} has no attribute {attr!r}{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise HawqError(f"model {spec!r}: {attr} is a {type(target).__name__}, not a callable")
    return module, target


def _user_model(spec, factory=None):
    factory = factory or _user_callable(spec)[1]
    try:
        model = factory()
    except Exception as exc:  # user code: any failure becomes one line naming the spec
        raise HawqError(f"model {spec!r}: calling it raised {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise HawqError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_line(exc):
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def file_digest(path, algorithm):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha1(path):
    return file_digest(path, "sha1")


def cached_weights_file(name, cache_dir=None):
    """The pytorchcv cache file `{name}-{error}-{sha1[:8]}.pth` in `cache_dir` whose content matches its sha1."""
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    pattern = re.compile(re.escape(name) + r"-[^-]+-([0-9a-f]{8})\.pth")
    candidates = sorted(p for p in folder.glob(f"{name}-*.pth") if pattern.fullmatch(p.name))
    mismatched = []
    for path in candidates:
        if file_sha1(path).startswith(pattern.fullmatch(path.name).group(1)):
            return path
        mismatched.append(path.name)
    found = f"; found {', '.join(mismatched)} but its SHA1 does not match its name" if mismatched else ""
    raise HawqError(f"no cached weights for {name!r} in {folder}: expected a file {name}-<error>-<sha1[:8]>.pth"
                    f"{found}; nothing is downloaded: copy the file there or pass weights=PATH")


def read_state_dict(path):
    """A state dict from a file saved by torch.save, read without running code (weights_only=True)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HawqError(f"weights file {path} does not exist; valid: a state dict saved with torch.save")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated files, refused globals
        raise HawqError(f"cannot load weights file {path}: {_load_failure(exc)}") from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise HawqError(f"weights file {path} holds no state dict (a dict of tensors, bare or under "
                        f"'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _load_failure(exc):
    """One line saying why torch.load failed: the refused global if weights_only refused one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"refused to unpickle {refused.group(1)} (weights_only=True; the file would run code)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_weights(model, path, *, ignore_unexpected=False):
    """Load a state dict file into `model`, with a one-line error naming the first few mismatched keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [] if ignore_unexpected else [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [(label, items) for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
    if problems:
        detail = "; ".join(f"{label} {len(items)}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                           for label, items in problems)
        raise HawqError(f"weights file {path} does not match model {type(model).__name__}: {detail}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model


def input_shape(model_or_name=None):
    """(C, H, W) the model expects: from `in_size`/`in_channels` (pytorchcv and the default model set them)."""
    if model_or_name is None or model_or_name == DEFAULT_MODEL:
        return (1, 16, 16)
    model = model_or_name
    if isinstance(model, str) and model.startswith(TORCHVISION_PREFIX):
        return _torchvision_input_shape(_torchvision_name(model))
    if isinstance(model, str) and ":" in model:
        return _user_input_shape(model)
    if isinstance(model, str):
        model = _pytorchcv_model(model)
    if not isinstance(model, nn.Module):
        raise HawqError(f"model must be a name or a torch.nn.Module, got {type(model).__name__}")
    in_size = getattr(model, "in_size", None)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = getattr(model, "in_channels", None) or (first_conv.in_channels if first_conv else None)
    if not (isinstance(in_size, (tuple, list)) and len(in_size) == 2 and channels):
        raise HawqError(f"cannot tell the input shape of {type(model).__name__} (no in_size attribute); "
                        f"give it explicitly as (C, H, W)")
    return (int(channels), int(in_size[0]), int(in_size[1]))


def _torchvision_input_shape(name):
    """(3, S, S) with S the default weights' eval crop (299 for inception_v3, 224 for most), read without a build."""
    from torchvision import models as tv

    crop = tv.get_model_weights(name).DEFAULT.transforms().crop_size
    return (3, int(crop[0]), int(crop[-1]))


def _user_input_shape(spec):
    """The module's `input_shape`, else the model's (`input_shape`, or pytorchcv's `in_size`), else 3x224x224."""
    module, factory = _user_callable(spec)
    shape = getattr(module, "input_shape", None)
    if shape is None:  # only then build the model: user code may be slow to build
        model = _user_model(spec, factory)
        shape = getattr(model, "input_shape", None)
        if shape is None and getattr(model, "in_size", None) is not None:
            return input_shape(model)
    if shape is None:
        return DEFAULT_INPUT_SHAPE
    if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(type(d) is int and d > 0 for d in shape)):
        raise HawqError(f"model {spec!r}: input_shape must be a (C, H, W) tuple of positive ints, got {shape!r}")
    return tuple(shape)


def num_classes(model):
    """Number of outputs: the `num_classes` attribute, else the last Linear layer's out_features."""
    count = getattr(model, "num_classes", None)
    if isinstance(count, int):
        return count
    last_linear = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last_linear = module
    if last_linear is None:
        raise HawqError(f"cannot tell the number of classes of {type(model).__name__}: no num_classes, no Linear")
    return last_linear.out_features
