"""Models by name: the embedded default (a small residual CNN for the digits data), any pytorchcv model, or a module.

Weights are only ever read from local files, never downloaded:
- `weights=PATH`: a state dict saved with `torch.save` (bare, or under "state_dict" / "model");
- `pretrained=True` with a pytorchcv name: the file pytorchcv itself caches, `{name}-{error}-{sha1[:8]}.pth` in
  `cache_dir` (default `~/.torch/models`), used only if the file's SHA1 starts with the 8 hex digits in its name.
Every file is read with `torch.load(..., weights_only=True)`, so a checkpoint crafted to run code is refused.
"""

import difflib
import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from hawq_ray.contract import HawqError

DEFAULT_MODEL = "digits_resnet"
DEFAULT_CACHE_DIR = Path("~/.torch/models")


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

    stem 3x3 conv 1->16, then blocks 16->16 (16x16), 16->32 stride 2 (8x8), 32->48 stride 2 (4x4); the last two
    have a strided 1x1 downsample conv on the shortcut. Global average pool, flatten, linear 48->10.
    56,250 parameters. Plain modules and `+`, so torch.fx traces it. Initialised from `seed` without touching the
    global random state, so two builds are identical.
    """

    def __init__(self, in_channels=1, in_size=(16, 16), num_classes=10, widths=(16, 32, 48), seed=0):
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


def get_model(name=None, *, pretrained=False, weights=None, cache_dir=None):
    """A model by name (None: the default), or the module itself; weights from `weights` or the local cache."""
    if isinstance(name, nn.Module):
        if pretrained:
            raise HawqError("pretrained=True needs a pytorchcv model name, not a module object; pass weights=PATH")
        model = name
    elif name is None or name == DEFAULT_MODEL:
        if pretrained and weights is None:
            raise HawqError(f"model {DEFAULT_MODEL!r} has no pretrained weights; train it or pass weights=PATH")
        model = DigitsResNet()
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
        raise HawqError(f"unknown model {name!r}: {hint}valid: {DEFAULT_MODEL!r} or a pytorchcv name "
                        f"(e.g. resnet18, resnet50, inceptionv3, resnet20_cifar10)")
    return pytorchcv_get_model(name, pretrained=False)


def file_sha1(path):
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha1.update(chunk)
    return sha1.hexdigest()


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
