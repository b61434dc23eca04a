"""Data sets from local sources only: sklearn's digits (the default), an ImageFolder tree, a CIFAR-10 folder,
seed-deterministic synthetic images, or images distilled from the model's own BatchNorm statistics (`distilled`,
`inputs.distill`: no real data). Nothing is downloaded.

`load_data(spec, input_shape=(C, H, W))` gives train and test splits whose images are float tensors of that shape,
already normalized; `batches(dataset, batch_size, limit)` gives a fixed list of (x, y) for calibration and traces.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import pickle
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hawq_ray.contract import HawqError
from hawq_ray.contract.errors import brief

VALID_SPECS = ("'digits', 'synthetic', 'distilled' (from the model's BatchNorm statistics), a folder with train/ and "
               "val/ (or test/) class subfolders (ImageFolder), or a CIFAR-10 folder (cifar-10-batches-py, python "
               "version)")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SYNTHETIC_SIZES = (256, 64)  # train, test
FOLDER_VALID = "train/ and val/ (or test/), each with one subfolder of images per class"
IMAGE_VALID = "an image file PIL reads (JPEG, PNG, BMP, ...) of at most {pixels} pixels: remove or replace it"


@dataclass(frozen=True)
class DataSplits:
    train: Dataset
    test: Dataset
    num_classes: int
    name: str
    synthetic: bool = False
    distilled: bool = False     # images distilled from the model's BatchNorm statistics, labels its own predictions


DISTILLED = "distilled"
DISTILLED_NOTE = "data: distilled from BatchNorm statistics, no real images"
DISTILLED_TOP1 = "top-1 on it means agreement with the fp32 model (its predictions are the labels)"


def load_data(spec="digits", *, input_shape=(1, 16, 16), seed=0, test_fraction=0.2, num_classes=None, model=None,
              distill=None, cache_dir=None, log=None, model_name=None):
    """Train and test splits of `spec` with images of `input_shape` (C, H, W); see VALID_SPECS.

    `distilled` needs `model` (trained, with BatchNorm layers): its train split is `distill.train` images distilled
    from the model's BatchNorm statistics with `seed`, its test split `distill.test` images of another seed
    (`inputs.distill.DistillSettings`, a dict of its fields or None for the defaults), each labelled with the
    model's own predictions; both are kept in `cache_dir` when given (a rerun with the same weights and settings
    reads them). `log(line)` reports the distillation's progress; `model_name` names the model in errors."""
    shape = _checked_shape(input_shape)
    if spec == DISTILLED:
        splits = _distilled(model, shape, seed, distill, cache_dir, log, model_name)
    elif spec == "digits":
        splits = _digits(shape, seed, test_fraction)
    elif spec == "synthetic":
        count = num_classes if num_classes is not None else 10
        splits = DataSplits(SyntheticImages(SYNTHETIC_SIZES[0], shape, count, seed, split=0),
                            SyntheticImages(SYNTHETIC_SIZES[1], shape, count, seed, split=1),
                            count, "synthetic", synthetic=True)
    elif isinstance(spec, (str, Path)):
        splits = _from_folder(Path(spec).expanduser(), shape)
    else:
        raise HawqError(f"data {brief(spec)} is not valid; valid: {VALID_SPECS}")
    for split_name, split in (("train", splits.train), ("test", splits.test)):
        if len(split) == 0:
            raise HawqError(f"data {spec}: the {split_name} split is empty")
    if num_classes is not None and splits.num_classes > num_classes:
        raise HawqError(f"data {spec} has {splits.num_classes} classes but the model has only {num_classes} outputs")
    return splits


def check_source(spec) -> None:
    """What `load_data(spec)` checks before it reads any pixels, without building the splits: the folder's layout
    and, for an ImageFolder, every image's header (cheap: no pixel is decoded; the result is remembered, so
    load_data does not read the headers again); a one-line HawqError naming the folder or file."""
    if spec in ("digits", "synthetic", DISTILLED):
        return
    if not isinstance(spec, (str, Path)):
        raise HawqError(f"data {brief(spec)} is not valid; valid: {VALID_SPECS}")
    kind, *folders = _layout(Path(spec).expanduser())
    if kind == "imagefolder":
        for folder in folders:
            _split(folder, None)


def batches(dataset, batch_size, limit=None):
    """The first `limit` batches (all if None) of `dataset` in order, as a list of (x, y) tensors."""
    if batch_size < 1:
        raise HawqError(f"batch size {batch_size} is not valid; valid: a positive integer")
    if len(dataset) == 0:
        raise HawqError("cannot make batches of an empty data set")
    out = []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if limit is not None and len(out) >= limit:
            break
        out.append((x, y.long()))
    return out


def _distilled(model, shape, seed, settings, cache_dir, log, name):
    """The distilled train and test splits (`inputs.distill`), labelled with `model`'s predictions."""
    from hawq_ray.inputs.distill import DistillSettings, distilled_images
    if model is None:
        raise HawqError("data distilled needs the model whose BatchNorm statistics the images are distilled from; "
                        "valid: load_data('distilled', model=MODEL, ...)")
    if settings is None or isinstance(settings, dict):
        unknown = sorted(set(settings or {}) - {f.name for f in dataclasses.fields(DistillSettings)})
        if unknown:
            raise HawqError(f"distilled: unknown setting {brief(unknown[0])}; valid: "
                            f"{', '.join(f.name for f in dataclasses.fields(DistillSettings))}")
        settings = DistillSettings(**(settings or {}))
    split_data = []
    for split, count in (("train", settings.train), ("test", settings.test)):
        images, _ = distilled_images(model, shape, count, seed, split, settings, cache_dir=cache_dir, name=name,
                                     log=log)
        logits = model_logits(model, images, settings.batch_size)
        split_data.append(TensorDataset(images, logits.argmax(1)))
    return DataSplits(*split_data, int(logits.shape[1]), DISTILLED, distilled=True)


@torch.no_grad()
def model_logits(model, images, batch_size=256):
    """`model`'s logits of `images` in eval mode (its mode restored after), on the CPU."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    was = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])
    finally:
        model.train(was)


def _checked_shape(input_shape):
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape) or shape[0] not in (1, 3):
        raise HawqError(f"input shape {input_shape!r} is not valid; valid: (C, H, W) with C 1 or 3, H and W > 0")
    return shape


def to_shape(images, shape):
    """Resize float NCHW `images` to (H, W) bilinearly and map their channels to C (repeat gray, average RGB)."""
    channels, height, width = shape
    if images.shape[-2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    if images.shape[1] != channels:
        images = images.repeat(1, channels, 1, 1) if images.shape[1] == 1 else images.mean(1, keepdim=True)
    return images


def _digits(shape, seed, test_fraction):
    """sklearn's digits scaled to [0, 1], normalized by the train split's mean and (population) std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise HawqError(f"test fraction {test_fraction} is not valid; valid: between 0 and 1, exclusive")
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed)
    mean, std = x_train.mean(), x_train.std()

    def prepared(x, y):
        x = torch.from_numpy((x - mean) / std).unsqueeze(1)
        return TensorDataset(to_shape(x, shape).contiguous(), torch.from_numpy(y).long())

    return DataSplits(prepared(x_train, y_train), prepared(x_test, y_test), 10, "digits")


class SyntheticImages(Dataset):
    """Random normal images and random labels, each made from (seed, split, index): deterministic, no storage."""

    def __init__(self, length, shape, num_classes, seed, split):
        self.length, self.shape, self.num_classes, self.seed, self.split = length, shape, num_classes, seed, split

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(hash((self.seed, self.split, index)) & (2**63 - 1))
        image = torch.randn(self.shape, generator=generator)
        label = torch.randint(self.num_classes, (), generator=generator)
        return image, label


class NormalizedImages(Dataset):
    """uint8 NCHW images kept as they are; each item is scaled to [0, 1], normalized per channel and reshaped."""

    def __init__(self, images, labels, mean, std, shape):
        self.images, self.labels, self.shape = images, labels, shape
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = (self.images[index].float() / 255 - self.mean) / self.std
        return to_shape(image.unsqueeze(0), self.shape)[0], self.labels[index]


def _layout(path):
    """("imagefolder", train folder, test folder) or ("cifar", the folder of the batches)."""
    if not path.exists():
        raise HawqError(f"data path {path} does not exist; valid: {VALID_SPECS}")
    if (path / "train").is_dir() and ((path / "val").is_dir() or (path / "test").is_dir()):
        return "imagefolder", path / "train", path / "val" if (path / "val").is_dir() else path / "test"
    for folder in (path, path / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return "cifar", folder
    raise HawqError(f"data path {path} is neither an ImageFolder tree nor a CIFAR-10 folder; valid: {VALID_SPECS}")


def _from_folder(path, shape):
    kind, *folders = _layout(path)
    return _image_folder(path, *folders, shape) if kind == "imagefolder" else _cifar10(folders[0], shape)


def _image_folder(path, train_dir, test_dir, shape):
    from torchvision import transforms

    channels, height, width = shape
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
    transform = transforms.Compose([
        transforms.Resize((height, width)),
        *([transforms.Grayscale(1)] if channels == 1 else []),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])
    train, test = (_split(folder, transform) for folder in (train_dir, test_dir))
    if train.classes != test.classes:
        raise HawqError(f"data path {path}: train classes {train.classes[:5]} differ from {test_dir.name} classes "
                        f"{test.classes[:5]}; both need the same class subfolders")
    return DataSplits(train, test, len(train.classes), f"imagefolder:{path}")


def _split(folder, transform):
    """One ImageFolder split whose every image has a readable header; its images are decoded by `decoded_image`,
    so one that fails later (truncated data) is a one-line error naming the file too."""
    from torchvision import datasets
    try:
        split = datasets.ImageFolder(str(folder), transform=transform, loader=decoded_image)
    except (FileNotFoundError, RuntimeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise HawqError(f"data path {folder}: {reason}; valid: {FOLDER_VALID}") from None
    _check_headers([path for path, _ in split.samples], folder)
    return split


_HEADERS_CHECKED = set()     # digests of (folder, every file's path, size and mtime) whose headers were read


def _check_headers(paths, folder) -> None:
    """Every file of `paths` is a regular file whose header PIL reads, of at most Image.MAX_IMAGE_PIXELS pixels
    (no pixel is decoded); a one-line error naming the first bad file, in path order."""
    from PIL import Image
    digest = hashlib.sha256(os.fsencode(str(folder)))
    problems = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            problems[path] = exc.strerror or str(exc)
            continue
        if not stat.S_ISREG(st.st_mode):
            problems[path] = "not a regular file"
        digest.update(b"\0%s\0%d\0%d" % (os.fsencode(path), st.st_size, st.st_mtime_ns))
    if not problems and digest.digest() in _HEADERS_CHECKED:
        return
    with warnings.catch_warnings():   # a picture of more pixels than PIL's bomb limit: a bad file, not a warning
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with concurrent.futures.ThreadPoolExecutor(min(32, 4 * (os.cpu_count() or 1))) as pool:
            good = [p for p in paths if p not in problems]
            for path, problem in zip(good, pool.map(_header_problem, good, chunksize=64)):
                if problem:
                    problems[path] = problem
    if problems:
        first = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more bad files in {folder})" if len(problems) > 1 else ""
        raise HawqError(f"data image {first}: {problems[first]}{more}; valid: {_image_valid()}")
    _HEADERS_CHECKED.add(digest.digest())


def _header_problem(path) -> str:
    from PIL import Image
    try:
        with Image.open(path) as image:   # the header only
            image.size
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises on a file: the file is bad
        return _image_reason(exc)
    return ""


def decoded_image(path):
    """ImageFolder's loader: the image at `path` as RGB, or a one-line HawqError naming the file."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises on a file: the file is bad
        raise HawqError(f"data image {path}: {_image_reason(exc)}; valid: {_image_valid()}") from None


def _image_reason(exc) -> str:
    from PIL import Image, UnidentifiedImageError
    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL reads"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "more pixels than PIL's limit (a decompression bomb?)"
    return "cannot be decoded (" + brief((str(exc).splitlines() or [type(exc).__name__])[0], 100).strip("'\"") + ")"


def _image_valid() -> str:
    from PIL import Image
    return IMAGE_VALID.format(pixels=Image.MAX_IMAGE_PIXELS)


def _cifar10(folder, shape):
    """The python-version CIFAR-10 batches, unpickled with only the numpy globals they need (no code runs)."""
    train_files = sorted(folder.glob("data_batch_*"), key=lambda p: p.name)
    train_x, train_y = zip(*(_cifar_batch(p) for p in train_files))
    test_x, test_y = _cifar_batch(folder / "test_batch")

    def dataset(x, y):
        return NormalizedImages(torch.from_numpy(x), torch.from_numpy(y), CIFAR10_MEAN, CIFAR10_STD, shape)

    return DataSplits(dataset(np.concatenate(train_x), np.concatenate(train_y)), dataset(test_x, test_y),
                      10, f"cifar10:{folder}")


def _cifar_batch(path):
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as exc:  # a refused global, a truncated file, missing keys, a wrong size
        reason = f"no key {exc}" if isinstance(exc, KeyError) else (str(exc).splitlines() or [repr(exc)])[0]
        raise HawqError(f"cannot read CIFAR-10 batch {path}: {reason}") from None
    if len(images) != len(labels):
        raise HawqError(f"CIFAR-10 batch {path} has {len(images)} images but {len(labels)} labels")
    return images, labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}

    def find_class(self, module, name):
        module = module.replace("numpy.core.", "numpy._core.", 1) if module.startswith("numpy.core.") else module
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)
