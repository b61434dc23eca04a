"""Models by name or as a module. A name is one of
- an embedded model for the 1x16x16 digits data: the default `digits_resnet` (a small residual CNN) or
  `digits_vit` (a tiny vision transformer, `hawq_ray.inputs.vit`); or any pytorchcv name;
- `torchvision:NAME`, a torchvision classification model (any of `list_models(module=torchvision.models)`);
- `timm:NAME`, a timm model (any of `timm.list_models()`), optionally `timm:NAME.TAG` for one set of its
  pretrained weights (`timm.list_pretrained()`); its input size is its pretrained config's `input_size`;
- `package.module:callable`, user code: the callable (a function or class) is called with no arguments.

Weights are only ever read from local files, never downloaded:
- `weights=PATH`: a state dict saved with `torch.save` (bare, or under "state_dict" / "model"), or a
  `.safetensors` file;
- `pretrained=True` with a pytorchcv name: the file pytorchcv itself caches, `{name}-{error}-{sha1[:8]}.pth` in
  `cache_dir` (default `~/.torch/models`), used only if the file's SHA1 starts with the 8 hex digits in its name;
- `pretrained=True` with `torchvision:NAME`: the file torch.hub caches, the basename of the default weights' URL
  (e.g. `resnet18-f37072fd.pth`) in `cache_dir` (default `torch.hub.get_dir()/checkpoints`), used only if its
  SHA256 starts with the hex digits after the name's last '-' (torch.hub's convention).
- `pretrained=True` with `timm:NAME`: the file timm itself would fetch, looked up in the local Hugging Face hub
  cache only, `models--timm--{arch}.{tag}/snapshots/<commit from refs/main>/model.safetensors` (or
  `pytorch_model.bin`) in `cache_dir` (default huggingface_hub's, `~/.cache/huggingface/hub` or $HF_HUB_CACHE);
  a cached file that links to a blob named by a SHA256 is used only if its content has that SHA256. The few timm
  weights with only a URL are looked for as torch.hub caches them (the URL's basename in
  `torch.hub.get_dir()/checkpoints`). timm loads the file (its own key remapping), never its hub client.
Every file is read with `torch.load(..., weights_only=True)` or safetensors, so a checkpoint crafted to run code
is refused.
"""

import difflib
import hashlib
import importlib
import re
from pathlib import Path

import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.inputs.attention import explicit_attention
from hawq_ray.inputs.vit import DigitsViT

DEFAULT_MODEL = "digits_resnet"
DIGITS_VIT = "digits_vit"
DIGITS_INPUT_SHAPE = (1, 16, 16)
DEFAULT_CACHE_DIR = Path("~/.torch/models")
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in its order
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


# The embedded models, all for the digits data (1x16x16, 10 classes), each with the keyword arguments of
# `hawq_ray.quant.finetune.train_fp32` (SGD, nesterov momentum 0.9, one-cycle) that train it from scratch
# (`fp32_recipe`). digits_vit's, on the seed-0 split's 360 held-out images: without augmentation its top-1 moved
# with the float arithmetic (98.1% with one CPU thread, 96.9% with two, at training seed 0; 95.6 and 96.1% at
# seed 1), so it moves each batch by up to one pixel (`shift`): 98.1, 98.3, 96.9% at training seeds 0-2 with two
# threads (label smoothing 0.1 instead: 97.5% at seed 0). 100 epochs overfit, lr 0.1 or 0.05 does worse on
# average, 0.2 diverges on one seed in three (measured without the shift).
EMBEDDED_MODELS = {DEFAULT_MODEL: DigitsResNet, DIGITS_VIT: DigitsViT}
FP32_RECIPES = {DEFAULT_MODEL: {"epochs": 8},
                DIGITS_VIT: {"epochs": 60, "lr": 0.07, "batch_size": 32, "weight_decay": 5e-4, "shift": 1}}


def fp32_recipe(name=None) -> dict:
    """The `train_fp32` keyword arguments (epochs, and any of lr, batch_size, weight_decay) that train embedded
    model `name` (None: the default) from scratch."""
    key = name or DEFAULT_MODEL
    if key not in FP32_RECIPES:
        raise HawqError(f"model {key!r} has no fp32 training recipe; valid: {', '.join(map(repr, FP32_RECIPES))} "
                        f"(any other model needs weights=PATH or pretrained=True)")
    return dict(FP32_RECIPES[key])


def did_you_mean(word: str, valid) -> str:
    """'did you mean a, b?' with the (at most three) names of `valid` closest to a wrong `word`, or ''."""
    close = difflib.get_close_matches(word, list(valid), n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else ""


def is_user_code(spec) -> bool:
    """Whether a model spec names Python code to import and call (`package.module:callable`)."""
    return isinstance(spec, str) and ":" in spec and not spec.startswith((TORCHVISION_PREFIX, TIMM_PREFIX))


def get_model(name=None, *, pretrained=False, weights=None, cache_dir=None):
    """A model by name (None: the default; an embedded or pytorchcv name, `torchvision:NAME`, `timm:NAME` or
    `package.module:callable`), or the module itself; weights from `weights` or, with `pretrained`, the local cache
    (see the module docstring). Its `nn.MultiheadAttention` modules are written out op by op
    (`inputs.attention`: same parameters and state_dict)."""
    return explicit_attention(_model(name, pretrained=pretrained, weights=weights, cache_dir=cache_dir))


def _model(name, *, pretrained, weights, cache_dir):
    if isinstance(name, nn.Module):
        if pretrained:
            raise HawqError("pretrained=True needs a pytorchcv model name, not a module object; pass weights=PATH")
        model = name
    elif name is None or (isinstance(name, str) and name in EMBEDDED_MODELS):
        name = name or DEFAULT_MODEL
        if pretrained and weights is None:
            raise HawqError(f"model {name!r} has no pretrained weights; train it or pass weights=PATH")
        model = EMBEDDED_MODELS[name]()
    elif isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name, pretrained=pretrained, weights=weights, cache_dir=cache_dir)
    elif isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return _timm_model(name, pretrained=pretrained, weights=weights, cache_dir=cache_dir)
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
        hint = did_you_mean(name.lower(), [*EMBEDDED_MODELS, *_models])
        raise HawqError(f"unknown model {name!r}: {hint + ' ' if hint else ''}valid: {', '.join(map(repr, EMBEDDED_MODELS))}, a pytorchcv "
                        f"name (e.g. resnet18, resnet50, inceptionv3, resnet20_cifar10), torchvision:NAME "
                        f"(e.g. torchvision:resnet18), timm:NAME (e.g. timm:resnet18) or package.module:callable")
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
        hint = did_you_mean(name, valid)
        problem = "is not a torchvision model" + (f" ({hint})" if hint else "")
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


def _timm_name(spec):
    """NAME of `timm:NAME` (an architecture, or ARCH.TAG for one set of its pretrained weights), checked to be in
    timm's list."""
    import timm

    name = spec[len(TIMM_PREFIX):].strip().lower()
    archs = timm.list_models()
    arch, dot, tag = name.partition(".")
    example = "(e.g. resnet18, efficientnet_b0, deit_tiny_patch16_224)"
    if arch in archs:
        if not dot:
            return name
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag in tags:
            return name
        hint = did_you_mean(tag, tags)
        known = f"its tags: {', '.join(tags[:6])}{', ...' if len(tags) > 6 else ''}" if tags else "it has none"
        raise HawqError(f"model {spec!r}: timm has no pretrained tag {tag!r} for {arch}"
                        f"{f' ({hint})' if hint else ''}; {known}; valid: "
                        f"timm:{arch} (its default weights) or timm:{arch}.TAG")
    hint = did_you_mean(arch, archs)
    problem = "is not a timm model" + (f" ({hint})" if hint else "")
    raise HawqError(f"model {spec!r} {problem}; valid: timm:NAME for one of {len(archs)} timm models {example}, "
                    f"optionally timm:NAME.TAG for one set of its pretrained weights")


def _timm_model(spec, *, pretrained, weights, cache_dir):
    import timm

    name = _timm_name(spec)
    if weights is None and pretrained:
        path, from_hub = timm_weights_file(name, cache_dir)
        cfg = _timm_pretrained_cfg(name)
        # `file` makes timm load this file instead of asking the hub; hub files are plain state dicts (timm reads
        # them so too), only a URL's file may need the model's own loader (custom_load, e.g. .npz)
        overlay = {"file": str(path), "custom_load": False if from_hub else cfg.custom_load}
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as exc:  # shape or key mismatch, unreadable file, refused pickle global
            raise HawqError(f"cannot load cached weights {path} into timm:{name}: {_load_failure(exc)}; replace "
                            f"the file or pass weights=PATH") from None
    model = timm.create_model(name, pretrained=False)
    if weights is not None:
        load_weights(model, weights)
    return model


def _timm_pretrained_cfg(name):
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


def timm_weights_file(name, cache_dir=None):
    """The local copy of timm model `name`'s pretrained weights and whether it is a hub file: in the Hugging Face
    hub cache (`cache_dir`, default huggingface_hub's) for weights on the hub, as timm fetches nearly all; in
    torch.hub's checkpoints folder for the few with only a URL. Never downloads: a one-line error says where the
    file was expected."""
    cfg = _timm_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id if cfg is not None else None
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        folder = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
        repo_id, _, revision = hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else TIMM_HUB_FILES
        for filename in files:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=folder, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return _checked_hub_file(Path(found), name), True
        repo = folder / f"models--{repo_id.replace('/', '--')}"
        raise HawqError(f"no cached weights for timm:{name}: expected {repo}/snapshots/<commit in refs/"
                        f"{revision or 'main'}>/{files[0]} (the Hugging Face hub cache of {repo_id}); hawq-ray never "
                        f"downloads: fetch it where there is network (hf download {repo_id} {files[0]}), copy the "
                        f"cache folder there, or pass weights=PATH")
    if cfg is not None and cfg.url:
        folder = Path(cache_dir if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints").expanduser()
        path = folder / cfg.url.rsplit("/", 1)[-1]
        if not path.is_file():
            raise HawqError(f"no cached weights for timm:{name}: expected {path}; hawq-ray never downloads: copy "
                            f"the file there or pass weights=PATH")
        return path, False
    raise HawqError(f"model timm:{name} has no pretrained weights in timm; train it or pass weights=PATH")


def _checked_hub_file(path, name):
    """A hub-cache file, refused if it links to a blob named by a SHA256 (a file stored with git LFS, as weights
    are) that its content does not match."""
    blob = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and file_digest(blob, "sha256") != blob.name:
        raise HawqError(f"cached weights {path} for timm:{name} are corrupt: their SHA256 is not {blob.name[:12]}..., "
                        f"the name of the blob they link to; delete the file and fetch it again, or pass weights=PATH")
    return path


def _timm_input_shape(name):
    """The pretrained config's `input_size` (C, H, W), read without a build when timm has a config for the name."""
    cfg = _timm_pretrained_cfg(name)
    size = cfg.input_size if cfg is not None else None
    if not size:
        import timm

        size = timm.create_model(name, pretrained=False).pretrained_cfg.get("input_size")
    return tuple(int(d) for d in size) if size else DEFAULT_INPUT_SHAPE


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
            hint = did_you_mean(part, dir(target))
            raise HawqError(f"model {spec!r}: {module_name} has no attribute {attr!r}{'; ' + hint if hint else ''}")
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
    """A state dict from a file saved by torch.save (read without running code: weights_only=True) or a
    `.safetensors` file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HawqError(f"weights file {path} does not exist; valid: a state dict saved with torch.save, or a "
                        f".safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
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
    """(C, H, W) the model expects: from `in_size`/`in_channels` (pytorchcv and the embedded models set them), or
    a timm model's pretrained config."""
    if model_or_name is None or (isinstance(model_or_name, str) and model_or_name in EMBEDDED_MODELS):
        return DIGITS_INPUT_SHAPE
    model = model_or_name
    if isinstance(model, str) and model.startswith(TORCHVISION_PREFIX):
        return _torchvision_input_shape(_torchvision_name(model))
    if isinstance(model, str) and model.startswith(TIMM_PREFIX):
        return _timm_input_shape(_timm_name(model))
    if isinstance(model, str) and ":" in model:
        return _user_input_shape(model)
    if isinstance(model, str):
        model = _pytorchcv_model(model)
    if not isinstance(model, nn.Module):
        raise HawqError(f"model must be a name or a torch.nn.Module, got {type(model).__name__}")
    in_size = getattr(model, "in_size", None)
    channels = getattr(model, "in_channels", None) or _first_conv_channels(model, in_size)
    timm_cfg = getattr(model, "pretrained_cfg", None)              # a timm model object's
    timm_size = timm_cfg.get("input_size") if isinstance(timm_cfg, dict) else None
    if in_size is None and isinstance(timm_size, (tuple, list)) and len(timm_size) == 3:
        in_size, channels = timm_size[1:], channels or timm_size[0]
    if not (isinstance(in_size, (tuple, list)) and len(in_size) == 2 and channels):
        raise HawqError(f"cannot tell the input shape of {type(model).__name__} (no in_size attribute); "
                        f"give it explicitly as (C, H, W)")
    return (int(channels), int(in_size[0]), int(in_size[1]))


def _first_conv_channels(model: nn.Module, in_size):
    """The channels of the first conv, or, where the model does not run on them, its constructor's default
    `in_channels` (pytorchcv's i-RevNet: a space-to-depth step makes its first conv read 6 channels of a
    3-channel image, and it keeps no `in_channels` attribute)."""
    import inspect
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv else None
    default = inspect.signature(type(model).__init__).parameters.get("in_channels")
    default = default.default if default is not None and isinstance(default.default, int) else None
    if default is None or default == channels or not (isinstance(in_size, (tuple, list)) and len(in_size) == 2):
        return channels
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, *in_size))
        return channels
    except Exception:  # noqa: BLE001 -- any failure of forward says these are not its channels
        return default
    finally:
        model.train(was)


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
