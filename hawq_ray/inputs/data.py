"""Data sets from local sources only: sklearn's digits (the default), an ImageFolder tree, a CIFAR-10 folder, or
seed-deterministic synthetic images. Nothing is downloaded.

`load_data(spec, input_shape=(C, H, W))` gives train and test splits whose images are float tensors of that shape,
already normalized; `batches(dataset, batch_size, limit)` gives a fixed list of (x, y) for calibration and traces.
"""

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hawq_ray.contract import HawqError

VALID_SPECS = ("'digits', 'synthetic', a folder with train/ and val/ (or test/) class subfolders (ImageFolder), "
               "or a CIFAR-10 folder (cifar-10-batches-py, python version)")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SYNTHETIC_SIZES = (256, 64)  # train, test


@dataclass(frozen=True)
class DataSplits:
    train: Dataset
    test: Dataset
    num_classes: int
    name: str
    synthetic: bool = False


def load_data(spec="digits", *, input_shape=(1, 16, 16), seed=0, test_fraction=0.2, num_classes=None):
    """Train and test splits of `spec` with images of `input_shape` (C, H, W); see VALID_SPECS."""
    shape = _checked_shape(input_shape)
    if spec == "digits":
        splits = _digits(shape, seed, test_fraction)
    elif spec == "synthetic":
        count = num_classes if num_classes is not None else 10
        splits = DataSplits(SyntheticImages(SYNTHETIC_SIZES[0], shape, count, seed, split=0),
                            SyntheticImages(SYNTHETIC_SIZES[1], shape, count, seed, split=1),
                            count, "synthetic", synthetic=True)
    elif isinstance(spec, (str, Path)):
        splits = _from_folder(Path(spec).expanduser(), shape)
    else:
        raise HawqError(f"data {spec!r} is not valid; valid: {VALID_SPECS}")
    for split_name, split in (("train", splits.train), ("test", splits.test)):
        if len(split) == 0:
            raise HawqError(f"data {spec}: the {split_name} split is empty")
    if num_classes is not None and splits.num_classes > num_classes:
        raise HawqError(f"data {spec} has {splits.num_classes} classes but the model has only {num_classes} outputs")
    return splits


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


def _from_folder(path, shape):
    if not path.exists():
        raise HawqError(f"data path {path} does not exist; valid: {VALID_SPECS}")
    if (path / "train").is_dir() and ((path / "val").is_dir() or (path / "test").is_dir()):
        return _image_folder(path, shape)
    for folder in (path, path / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return _cifar10(folder, shape)
    raise HawqError(f"data path {path} is neither an ImageFolder tree nor a CIFAR-10 folder; valid: {VALID_SPECS}")


def _image_folder(path, shape):
    from torchvision import datasets, transforms

    channels, height, width = shape
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
    transform = transforms.Compose([
        transforms.Resize((height, width)),
        *([transforms.Grayscale(1)] if channels == 1 else []),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])
    test_dir = path / "val" if (path / "val").is_dir() else path / "test"
    splits = []
    for folder in (path / "train", test_dir):
        try:
            splits.append(datasets.ImageFolder(str(folder), transform=transform))
        except (FileNotFoundError, RuntimeError) as exc:
            raise HawqError(f"data path {folder}: {str(exc).splitlines()[0]}") from None
    train, test = splits
    if train.classes != test.classes:
        raise HawqError(f"data path {path}: train classes {train.classes[:5]} differ from {test_dir.name} classes "
                        f"{test.classes[:5]}; both need the same class subfolders")
    return DataSplits(train, test, len(train.classes), f"imagefolder:{path}")


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
