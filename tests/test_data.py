"""Datasets: MNIST and CIFAR-10 from the data directory, every CIFAR-10 layout the loader
reads (synthetic), the decoded-image cache, and errors."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import (
    add_bytes,
    color_of,
    find_data_dir,
    png_bytes,
    require,
    synthetic_cifar10,
    write_tarball,
)
from datasets import synthetic_members as _members
from PIL import Image

import rebasin.data as data_module
from rebasin.data import (
    CIFAR10_CLASSES,
    NORMALIZATION,
    LabeledData,
    decode_image_folder,
    load_dataset,
    resolve_cache_dir,
    resolve_data_dir,
)

DATA_DIR = find_data_dir()  # read before the fixture below hides $REBASIN_DATA_DIR
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the caller's data or cache settings, nor writes to the real home."""
    monkeypatch.delenv("REBASIN_DATA_DIR", raising=False)
    monkeypatch.delenv("REBASIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def mnist_train() -> LabeledData:
    require("mnist", DATA_DIR)
    return load_dataset("mnist", train=True, data_dir=DATA_DIR)


# ------------------------------------------------------------------------------------------
# MNIST from the data directory


def test_mnist_train_matches_known_counts_and_normalisation(mnist_train: LabeledData) -> None:
    assert len(mnist_train) == 60000
    assert mnist_train.images.shape == (60000, 1, 28, 28)
    assert mnist_train.images.dtype == torch.float32
    assert mnist_train.labels.dtype == torch.int64
    assert mnist_train.class_counts().tolist() == MNIST_TRAIN_COUNTS
    assert mnist_train.classes[0] == "0 - zero" and mnist_train.num_classes == 10
    assert abs(float(mnist_train.images.mean())) < 1e-3
    assert abs(float(mnist_train.images.std()) - 1.0) < 1e-2
    # Background pixels are exactly (0 - mean) / std.
    mean, std = NORMALIZATION["mnist"]
    assert float(mnist_train.images.min()) == pytest.approx(-mean[0] / std[0], abs=1e-6)


def test_mnist_test_split_through_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    require("mnist", DATA_DIR)
    monkeypatch.setenv("REBASIN_DATA_DIR", str(DATA_DIR))
    test = load_dataset("mnist", train=False)
    assert len(test) == 10000
    assert test.class_counts().tolist() == MNIST_TEST_COUNTS


def test_limit_per_class_keeps_the_first_examples(mnist_train: LabeledData) -> None:
    small = load_dataset("mnist", train=True, data_dir=DATA_DIR, limit_per_class=7)
    assert small.class_counts().tolist() == [7] * 10
    first_zeros = torch.nonzero(mnist_train.labels == 0).flatten()[:7]
    assert torch.equal(small.images[small.labels == 0], mnist_train.images[first_zeros])
    with pytest.raises(ValueError, match="limit_per_class must be >= 1"):
        load_dataset("mnist", train=True, data_dir=DATA_DIR, limit_per_class=0)


def test_subset_and_loader(mnist_train: LabeledData) -> None:
    part = mnist_train.subset(np.array([5, 0, 59999]))
    assert len(part) == 3
    assert torch.equal(part.labels, mnist_train.labels[[5, 0, 59999]])
    assert torch.equal(part.images[1], mnist_train.images[0])
    assert part.classes == mnist_train.classes
    assert len(mnist_train.subset([])) == 0

    small = mnist_train.subset(torch.arange(100))
    batches = list(small.loader(batch_size=32))
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    assert batches[0][0].shape == (32, 1, 28, 28)
    assert torch.equal(torch.cat([y for _, y in batches]), small.labels)

    def order(seed: int) -> torch.Tensor:
        return torch.cat([y for _, y in small.loader(batch_size=10, shuffle=True, seed=seed)])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == sorted(small.labels.tolist())


def test_subset_and_loader_reject_bad_arguments(mnist_train: LabeledData) -> None:
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 60000\), got \[0, 60000\]"):
        mnist_train.subset([0, 60000])
    with pytest.raises(ValueError, match="indices must be a 1-D integer sequence"):
        mnist_train.subset([0.5])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        mnist_train.loader(batch_size=0)


def test_labeled_data_validates_its_fields() -> None:
    images = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        LabeledData(images, torch.zeros(3, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        LabeledData(images, torch.tensor([0, 1]), ["a"])
    with pytest.raises(ValueError, match="images must be a float32 tensor"):
        LabeledData(images.double(), torch.tensor([0, 0]), ["a"])


# ------------------------------------------------------------------------------------------
# directories and errors


def test_resolve_data_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv("REBASIN_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def test_resolve_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_cache_dir() == Path(".cache") / "rebasin"  # never the data directory
    monkeypatch.setenv("REBASIN_CACHE_DIR", str(tmp_path / "env-cache"))
    assert resolve_cache_dir() == tmp_path / "env-cache"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_missing_mnist_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", train=True, data_dir=tmp_path)
    message = str(info.value)
    assert f"MNIST not found in data directory {tmp_path}" in message
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "MNIST" / "raw") in message
    assert "download=True" in message and "`rebasin simulate --download`" in message


def test_missing_cifar10_names_everything_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", train=False, data_dir=tmp_path)
    message = str(info.value)
    assert f"CIFAR-10 not found in data directory {tmp_path}" in message
    for looked_for in ("cifar-10-batches-py", "cifar10-jpeg/{train,test}", "cifar10-jpeg.tar.gz"):
        assert looked_for in message
    assert "`rebasin simulate --download`" in message and "--data-dir" in message


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", train=True, data_dir=DATA_DIR)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# CIFAR-10 from an ImageFolder tarball or directory (synthetic, small)


PER_CLASS = {"train": 3, "test": 2}


def synthetic_members(prefix: str = "") -> dict[str, bytes]:
    return _members(PER_CLASS, prefix)


def assert_synthetic_split(data: LabeledData, split: str) -> None:
    count = PER_CLASS[split]
    assert len(data) == 10 * count
    assert data.images.shape == (10 * count, 3, 32, 32)
    assert data.classes == list(CIFAR10_CLASSES)
    assert data.labels.tolist() == [c for c in range(10) for _ in range(count)]
    mean, std = NORMALIZATION["cifar10"]
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    pixels = torch.round((data.images * s + m) * 255).to(torch.int64)
    expected = [color_of(split, c, i) for c in range(10) for i in range(count)]
    assert pixels[:, :, 0, 0].tolist() == [list(rgb) for rgb in expected]
    assert (pixels == pixels[:, :, :1, :1]).all(), "solid images stay solid"


@pytest.mark.parametrize("prefix", ["", "cifar10-jpeg/"])
def test_cifar10_from_tarball_is_decoded_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_tarball(data_dir / "cifar10-jpeg.tar.gz", synthetic_members(prefix))
    monkeypatch.setenv("REBASIN_CACHE_DIR", str(tmp_path / "cache"))

    train = load_dataset("cifar10", train=True, data_dir=data_dir)
    assert_synthetic_split(train, "train")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["cifar10-jpeg-test.safetensors", "cifar10-jpeg-train.safetensors"]

    def must_not_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data_module, "decode_image_folder", must_not_decode)
    assert_synthetic_split(load_dataset("cifar10", train=False, data_dir=data_dir), "test")
    again = load_dataset("cifar10", train=True, data_dir=data_dir)
    assert torch.equal(again.images, train.images)


def test_changed_tarball_invalidates_the_cache(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tarball = data_dir / "cifar10-jpeg.tar.gz"
    members = synthetic_members()
    write_tarball(tarball, members)
    first = load_dataset("cifar10", train=True, data_dir=data_dir, cache_dir=tmp_path / "c")
    members["train/airplane/0000.png"] = png_bytes((1, 2, 3))
    write_tarball(tarball, members)
    second = load_dataset("cifar10", train=True, data_dir=data_dir, cache_dir=tmp_path / "c")
    assert not torch.equal(first.images[0], second.images[0])
    assert torch.equal(first.images[1:], second.images[1:])


def test_cache_never_goes_into_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = synthetic_cifar10(tmp_path / "data", PER_CLASS, layout="tarball")
    monkeypatch.chdir(tmp_path)
    assert_synthetic_split(load_dataset("cifar10", train=True, data_dir=data_dir), "train")
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar10-jpeg.tar.gz"]
    cached = sorted(p.name for p in (tmp_path / ".cache" / "rebasin").iterdir())
    assert cached == ["cifar10-jpeg-test.safetensors", "cifar10-jpeg-train.safetensors"]


def test_cifar10_from_torchvision_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third layout: torchvision's pickle batches (``cifar-10-batches-py``), read by
    torchvision itself; its checksum test of the real files is bypassed for this copy."""
    import torchvision.datasets.cifar as cifar_module

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    splits = {}
    for name, count in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        pixels = rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).tolist()
        splits[name] = (pixels, labels)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": pixels, "labels": labels}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, handle)
    monkeypatch.setattr(cifar_module, "check_integrity", lambda *args, **kwargs: True)

    test = load_dataset("cifar10", train=False, data_dir=tmp_path)
    pixels, labels = splits["test_batch"]
    assert test.labels.tolist() == labels and test.classes == list(CIFAR10_CLASSES)
    mean, std = NORMALIZATION["cifar10"]
    restored = test.images * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    expected = torch.from_numpy(pixels).view(3, 3, 32, 32).float() / 255
    torch.testing.assert_close(restored, expected, atol=1e-6, rtol=0)
    train = load_dataset("cifar10", train=True, data_dir=tmp_path)
    assert len(train) == 10
    assert train.labels.tolist() == sum((splits[f"data_batch_{i}"][1] for i in range(1, 6)), [])


def test_cifar10_from_image_folder_directory(tmp_path: Path) -> None:
    for name, payload in synthetic_members("cifar10-jpeg/").items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    data = load_dataset("cifar10", train=False, data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert_synthetic_split(data, "test")


def test_jpeg_images_decode_close_to_their_colour(tmp_path: Path) -> None:
    tarball = tmp_path / "jpeg.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        for label, name in enumerate(CIFAR10_CLASSES):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (20 * label, 90, 160)).save(buffer, format="JPEG")
            add_bytes(archive, f"train/{name}/0.jpg", buffer.getvalue())
    pixels, labels = decode_image_folder(tarball, CIFAR10_CLASSES, (32, 32), splits=["train"])[
        "train"
    ]
    assert pixels.dtype == torch.uint8 and pixels.shape == (10, 3, 32, 32)
    assert labels.tolist() == list(range(10))
    expected = torch.tensor([[20 * c, 90, 160] for c in range(10)]).view(10, 3, 1, 1)
    assert (pixels.to(torch.int64) - expected).abs().max() <= 3


@pytest.mark.parametrize(
    "evil_name",
    ["../evil.png", "train/cat/../../../evil.png", "/tmp/evil.png", "train/../../evil.png"],
)
def test_tarball_with_path_traversal_is_refused(tmp_path: Path, evil_name: str) -> None:
    members = synthetic_members()
    members[evil_name] = png_bytes((0, 0, 0))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_tarball(data_dir / "cifar10-jpeg.tar.gz", members)
    with pytest.raises(ValueError, match="unsafe member name"):
        load_dataset("cifar10", train=True, data_dir=data_dir, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()
    assert not (tmp_path / "cache").exists(), "nothing is cached from a refused archive"


def test_tarball_with_a_link_member_is_refused(tmp_path: Path) -> None:
    tarball = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, payload in synthetic_members().items():
            add_bytes(archive, name, payload)
        link = tarfile.TarInfo("train/cat/9999.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(ValueError, match="'train/cat/9999.png' is a link or special file"):
        decode_image_folder(tarball, CIFAR10_CLASSES, (32, 32))


def test_missing_class_folder_and_wrong_size_are_reported(tmp_path: Path) -> None:
    members = {k: v for k, v in synthetic_members().items() if "/truck/" not in k}
    write_tarball(tmp_path / "a.tar.gz", members)
    with pytest.raises(ValueError, match="split 'train' must hold the class folders"):
        decode_image_folder(tmp_path / "a.tar.gz", CIFAR10_CLASSES, (32, 32))

    members = synthetic_members()
    members["test/dog/0001.png"] = png_bytes((0, 0, 0), size=(28, 28))
    write_tarball(tmp_path / "b.tar.gz", members)
    with pytest.raises(ValueError, match=r"test/dog/0001.png: expected a \(32, 32\) image"):
        decode_image_folder(tmp_path / "b.tar.gz", CIFAR10_CLASSES, (32, 32))

    members = synthetic_members()
    members["test/dog/0001.png"] = b"garbage"
    write_tarball(tmp_path / "c.tar.gz", members)
    with pytest.raises(ValueError, match="test/dog/0001.png: not a readable image"):
        decode_image_folder(tmp_path / "c.tar.gz", CIFAR10_CLASSES, (32, 32))


# ------------------------------------------------------------------------------------------
# CIFAR-10 from the real copy, where present (CI has it): 60,000 JPEGs, decoded once, about
# 20-30 s


def test_cifar10_from_the_real_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("cifar10", DATA_DIR)
    monkeypatch.setenv("REBASIN_CACHE_DIR", str(tmp_path / "cache"))
    train = load_dataset("cifar10", train=True, data_dir=DATA_DIR)
    assert train.images.shape == (50000, 3, 32, 32)
    assert train.class_counts().tolist() == [5000] * 10
    assert train.classes == list(CIFAR10_CLASSES)
    # JPEG decoding shifts the statistics a little from the ones of the lossless originals.
    assert train.images.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (train.images.std(dim=(0, 2, 3)) - 1.0).abs().max() < 0.05
    test = load_dataset("cifar10", train=False, data_dir=DATA_DIR)  # from the cache
    assert test.images.shape == (10000, 3, 32, 32)
    assert test.class_counts().tolist() == [1000] * 10
