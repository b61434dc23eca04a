import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from hawq_ray.inputs.data import batches, check_source, load_data
from hawq_ray.contract import HawqError


@pytest.fixture(scope="module")
def digits_8x8():
    return load_data("digits", input_shape=(1, 8, 8))


def numpy_digits_split(seed=0):
    digits = load_digits()
    return train_test_split(digits.images / 16.0, digits.target, test_size=0.2, stratify=digits.target,
                            random_state=seed)


def test_digits_are_normalized_by_the_train_split(digits_8x8):
    x_train, x_test, y_train, y_test = numpy_digits_split()
    mean, std = x_train.mean(), x_train.std()
    got_train, got_y_train = digits_8x8.train.tensors
    got_test, got_y_test = digits_8x8.test.tensors
    assert got_train.shape == (1437, 1, 8, 8) and got_test.shape == (360, 1, 8, 8)
    np.testing.assert_allclose(got_train[:, 0].numpy(), (x_train - mean) / std, atol=1e-5)
    np.testing.assert_allclose(got_test[:, 0].numpy(), (x_test - mean) / std, atol=1e-5)
    assert np.array_equal(got_y_train.numpy(), y_train) and np.array_equal(got_y_test.numpy(), y_test)
    assert got_y_train.dtype == torch.int64
    assert digits_8x8.num_classes == 10 and digits_8x8.name == "digits" and not digits_8x8.synthetic


def test_digits_split_is_stratified(digits_8x8):
    test_counts = np.bincount(digits_8x8.test.tensors[1].numpy(), minlength=10)
    all_counts = np.bincount(load_digits().target, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)


def bilinear_matrix(size_in, size_out):
    """Half-pixel-centre bilinear interpolation as a (size_out, size_in) matrix, edges clamped."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        src = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(int(np.floor(src)), size_in - 1)
        high = min(low + 1, size_in - 1)
        matrix[i, low] += 1 - (src - low)
        matrix[i, high] += src - low
    return matrix


def test_digits_upsampled_bilinearly_and_channels_repeated(digits_8x8):
    splits = load_data("digits", input_shape=(3, 16, 12))
    small = digits_8x8.train.tensors[0][:5, 0].numpy()
    rows, cols = bilinear_matrix(8, 16), bilinear_matrix(8, 12)
    expected = np.einsum("hi,nij,wj->nhw", rows, small, cols)
    big = splits.train.tensors[0][:5].numpy()
    assert big.shape == (5, 3, 16, 12)
    for channel in range(3):
        np.testing.assert_allclose(big[:, channel], expected, atol=1e-5)


def test_digits_split_depends_on_seed_only(digits_8x8):
    again = load_data("digits", input_shape=(1, 8, 8), seed=0)
    other = load_data("digits", input_shape=(1, 8, 8), seed=1)
    assert torch.equal(again.train.tensors[0], digits_8x8.train.tensors[0])
    assert not torch.equal(other.train.tensors[1], digits_8x8.train.tensors[1])


def test_synthetic_is_deterministic_and_marked():
    first = load_data("synthetic", input_shape=(3, 32, 32), seed=3, num_classes=7)
    second = load_data("synthetic", input_shape=(3, 32, 32), seed=3, num_classes=7)
    other = load_data("synthetic", input_shape=(3, 32, 32), seed=4, num_classes=7)
    assert first.synthetic and first.name == "synthetic" and first.num_classes == 7
    x, y = batches(first.train, 64)[0]
    assert x.shape == (64, 3, 32, 32) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 7
    assert torch.equal(x, batches(second.train, 64)[0][0])
    assert not torch.equal(x, batches(other.train, 64)[0][0])
    assert not torch.equal(first.train[0][0], first.test[0][0])


def test_batches_keep_order_and_limit(digits_8x8):
    all_batches = batches(digits_8x8.test, 100)
    assert [len(y) for _, y in all_batches] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([x for x, _ in all_batches]), digits_8x8.test.tensors[0])
    assert len(batches(digits_8x8.test, 100, limit=2)) == 2
    with pytest.raises(HawqError, match="batch size 0"):
        batches(digits_8x8.test, 0)


COLORS = {"red": (255, 0, 0), "teal": (0, 128, 128)}


def make_image_folder(root, counts):
    for split, per_class in counts.items():
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 10), color).save(folder / f"{i}.png")
    return root


def test_image_folder_is_resized_and_imagenet_normalized(tmp_path):
    root = make_image_folder(tmp_path / "pics", {"train": 2, "val": 1})
    splits = load_data(root, input_shape=(3, 8, 6))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (4, 2, 2)
    assert splits.name.startswith("imagefolder:") and not splits.synthetic
    x, y = batches(splits.test, 2)[0]
    assert x.shape == (2, 3, 8, 6) and y.tolist() == [0, 1]  # classes sorted: red, teal
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for image, name in zip(x, ["red", "teal"]):
        expected = (np.array(COLORS[name]) / 255 - mean) / std
        np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


def test_image_folder_accepts_test_subfolder(tmp_path):
    root = make_image_folder(tmp_path / "pics", {"train": 1, "test": 1})
    assert len(load_data(root, input_shape=(1, 4, 4)).test[0][0]) == 1


def test_image_folder_with_empty_split_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "pics", {"train": 1})
    (root / "val").mkdir()
    with pytest.raises(HawqError, match=r"data path .*val"):
        load_data(root, input_shape=(3, 8, 8))


def test_unreadable_images_are_named_when_the_folder_loads(tmp_path):
    root = make_image_folder(tmp_path / "pics", {"train": 2, "val": 1})
    (root / "train" / "red" / "0.png").write_bytes(b"")
    (root / "train" / "teal" / "1.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(HawqError, match=r"^data image .*train/red/0.png: not an image PIL reads \(and 1 more bad "
                                        r"files in .*train\); valid: an image file PIL reads") as info:
        load_data(root, input_shape=(3, 8, 8))
    assert "\n" not in str(info.value)


def test_truncated_image_is_named_when_it_is_decoded(tmp_path):
    root = make_image_folder(tmp_path / "pics", {"train": 1, "val": 1})
    bad = root / "val" / "teal" / "0.png"
    Image.effect_noise((64, 64), 60).convert("RGB").save(bad)
    bad.write_bytes(bad.read_bytes()[:1500])           # the header is whole: the folder loads
    splits = load_data(root, input_shape=(3, 8, 8))
    assert len(batches(splits.train, 2)) == 1
    with pytest.raises(HawqError, match=r"^data image .*val/teal/0.png: cannot be decoded \(image file is "
                                        r"truncated.*\); valid: ") as info:
        batches(splits.test, 2)
    assert "\n" not in str(info.value)


def test_image_of_more_pixels_than_pil_allows_is_refused(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pics", {"train": 1, "val": 1})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)   # the images are 20 x 10
    with pytest.raises(HawqError, match=r"more pixels than PIL's limit .*valid: an image file PIL reads .* of at "
                                        r"most 150 pixels"):
        load_data(root, input_shape=(3, 8, 8))


def test_class_folder_named_in_other_bytes_than_utf8_loads(tmp_path):
    root = make_image_folder(tmp_path / "pics", {"train": 1, "val": 1})
    for split in ("train", "val"):
        os.rename(root / split / "red", os.fsencode(root / split) + b"/r\xffd")
    splits = load_data(root, input_shape=(3, 8, 8))
    assert splits.num_classes == 2 and "r\udcffd" in splits.train.classes


def test_headers_are_read_once_per_unchanged_folder(tmp_path, monkeypatch):
    from hawq_ray.inputs import data
    root = make_image_folder(tmp_path / "pics", {"train": 2, "val": 1})
    opened = []
    real = data._header_problem
    monkeypatch.setattr(data, "_header_problem", lambda path: opened.append(path) or real(path))
    check_source(root)
    assert len(opened) == 6
    load_data(root, input_shape=(3, 8, 8))
    assert len(opened) == 6                             # unchanged: not read again
    Image.new("RGB", (20, 10)).save(root / "val" / "red" / "1.png")
    load_data(root, input_shape=(3, 8, 8))
    assert len(opened) == 6 + 3                         # the val folder changed: read again
    for spec in ("digits", "synthetic"):
        check_source(spec)
    with pytest.raises(HawqError, match="data 3 is not valid"):
        check_source(3)


def write_cifar_batch(path, images, labels, legacy_numpy=False):
    batch = {"batch_label": "fake", "data": images.reshape(len(images), -1), "labels": labels,
             "filenames": [f"{i}.png" for i in range(len(labels))]}
    data = pickle.dumps(batch, protocol=2)
    if legacy_numpy:  # the real files name numpy 1's module path
        assert b"numpy._core.multiarray" in data
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)


def make_cifar(root, rng):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    parts = {"data_batch_1": 3, "data_batch_2": 2, "test_batch": 4}
    arrays = {}
    for name, n in parts.items():
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        write_cifar_batch(folder / name, images, labels, legacy_numpy=name == "data_batch_2")
        arrays[name] = (images, labels)
    return folder, arrays


def test_cifar10_folder_is_read_and_normalized(tmp_path):
    folder, arrays = make_cifar(tmp_path, np.random.default_rng(0))
    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616]).reshape(3, 1, 1)
    for spec in (tmp_path, folder):
        splits = load_data(spec, input_shape=(3, 32, 32))
        assert (len(splits.train), len(splits.test), splits.num_classes) == (5, 4, 10)
        x, y = batches(splits.train, 5)[0]
        train_images = np.concatenate([arrays["data_batch_1"][0], arrays["data_batch_2"][0]])
        np.testing.assert_allclose(x.numpy(), (train_images / 255 - mean) / std, atol=1e-5)
        assert y.tolist() == arrays["data_batch_1"][1] + arrays["data_batch_2"][1]
    assert load_data(folder, input_shape=(3, 16, 16)).test[0][0].shape == (3, 16, 16)


class CreatesFileOnLoad:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_cifar_batch_crafted_to_run_code_is_refused(tmp_path):
    folder, _ = make_cifar(tmp_path, np.random.default_rng(1))
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({"data": CreatesFileOnLoad(marker), "labels": [0]}))
    with pytest.raises(HawqError, match=r"cannot read CIFAR-10 batch .*test_batch: refused global .*open"):
        load_data(folder, input_shape=(3, 32, 32))
    assert not marker.exists()


def test_bad_specs_are_one_line_errors(tmp_path):
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch_1").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8)}))
    (tmp_path / "cifar" / "test_batch").write_bytes(b"")
    cases = [
        (dict(spec=tmp_path / "cifar"), r"CIFAR-10 batch .*data_batch_1: no key 'labels'"),
        (dict(spec=tmp_path / "missing"), r"data path .*missing does not exist; valid: 'digits'"),
        (dict(spec=tmp_path), r"neither an ImageFolder tree nor a CIFAR-10 folder; valid:"),
        (dict(spec=42), r"data 42 is not valid; valid:"),
        (dict(input_shape=(2, 8, 8)), r"input shape \(2, 8, 8\) is not valid"),
        (dict(input_shape=(8, 8)), r"input shape \(8, 8\) is not valid"),
        (dict(test_fraction=0.0), r"test fraction 0.0 is not valid"),
        (dict(num_classes=5), r"data digits has 10 classes but the model has only 5 outputs"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(HawqError, match=pattern) as info:
            load_data(**kwargs)
        assert "\n" not in str(info.value)
