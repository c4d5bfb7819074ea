"""Tests for decoupled.data: every source is built small inside tmp_path; nothing touches the network."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import pickle
import shlex
import struct
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression

from decoupled import data as data_module
from decoupled.config import Cifar10Data, ConfigError, DigitsData, IdxData, ImageFolderData, SyntheticData
from decoupled.data import Dataset, iterate_batches, load_dataset, random_crop_flip


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the image cache inside the test's tmp_path, never in the real home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference normalization: per-channel (dim 1) mean/std of train, applied to both splits."""
    axes = tuple(d for d in range(train.ndim) if d != 1)
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True)
    return torch.from_numpy((train - mean) / std).float(), torch.from_numpy((test - mean) / std).float()


def assert_train_standardized(ds: Dataset) -> None:
    dims = [d for d in range(ds.train_x.ndim) if d != 1]
    assert torch.allclose(ds.train_x.mean(dim=dims), torch.zeros(ds.train_x.shape[1]), atol=1e-4)
    assert torch.allclose(ds.train_x.std(dim=dims, correction=0), torch.ones(ds.train_x.shape[1]), atol=1e-3)


# -------------------------------------------------------------------------- digits


def test_digits_shapes_classes_and_normalization() -> None:
    ds = load_dataset(DigitsData(name="digits", test_fraction=0.25), seed=0)
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert len(ds.train_x) + len(ds.test_x) == 1797
    assert len(ds.test_x) == pytest.approx(0.25 * 1797, abs=1)
    # stratified: every class in both splits
    assert set(ds.train_y.tolist()) == set(ds.test_y.tolist()) == set(range(10))
    assert_train_standardized(ds)
    # test uses train statistics, so it is not exactly standardized itself
    assert ds.test_x.mean().abs() > 0


def test_digits_split_is_deterministic_by_seed() -> None:
    cfg = DigitsData(name="digits")
    a, b, c = load_dataset(cfg, seed=1), load_dataset(cfg, seed=1), load_dataset(cfg, seed=2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_y, c.train_y)


# ------------------------------------------------------------------------ CIFAR-10


def write_cifar(folder: Path, per_batch: int, protocol: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write the six batch files in the python format; returns the raw train/test images and labels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"data": x, b"labels": y, b"filenames": [b"f.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(y))
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


@pytest.mark.parametrize(
    "subfolder, protocol",
    [("cifar-10-batches-py", 2), ("", pickle.HIGHEST_PROTOCOL)],  # protocol 2 like the official files
)
def test_cifar10_loads_python_batches(tmp_path: Path, subfolder: str, protocol: int) -> None:
    train_raw, train_y, test_raw, test_y = write_cifar(tmp_path / subfolder, per_batch=4, protocol=protocol)
    ds = load_dataset(Cifar10Data(name="cifar10", path=tmp_path, download=False))
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.augment
    assert len(ds.train_x) == 20 and len(ds.test_x) == 4
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == test_y.tolist()
    # rows are 1024 R, 1024 G, 1024 B values: a wrong reshape would not match the reference
    want_train, want_test = standardize(train_raw / 255.0, test_raw / 255.0)
    assert torch.allclose(ds.train_x, want_train, atol=1e-5)
    assert torch.allclose(ds.test_x, want_test, atol=1e-5)


class _RunsShell:
    """Unpickling this would call os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def test_cifar10_refuses_pickle_with_forbidden_global(tmp_path: Path) -> None:
    write_cifar(tmp_path, per_batch=2, protocol=2)
    marker = tmp_path / "executed"
    evil = {b"data": _RunsShell(f"touch {shlex.quote(str(marker))}"), b"labels": [0]}
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ConfigError, match=r"data_batch_3.*not allowed"):
        load_dataset(Cifar10Data(name="cifar10", path=tmp_path, download=False))
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2, 3], "expected a dict"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "0..9"),
    ],
)
def test_cifar10_rejects_wrong_format_batch(tmp_path: Path, content: object, message: str) -> None:
    write_cifar(tmp_path, per_batch=2, protocol=2)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(content))
    with pytest.raises(ConfigError, match=message) as err:
        load_dataset(Cifar10Data(name="cifar10", path=tmp_path, download=False))
    assert str(tmp_path / "test_batch") in str(err.value)


def test_cifar10_missing_without_download_fails_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="download is false"):
        Cifar10Data(name="cifar10", path=tmp_path / "absent", download=False)


def test_cifar10_empty_folder_without_download_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.path: CIFAR-10 not found.*download is false"):
        load_dataset(Cifar10Data(name="cifar10", path=tmp_path, download=False))


def test_cifar10_failed_download_is_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    path = tmp_path / "cifar"
    with pytest.raises(ConfigError, match=r"^data\.path: .*download failed.*no network in tests") as err:
        load_dataset(Cifar10Data(name="cifar10", path=path, download=True))
    assert "image_folder" in str(err.value)  # the message points at the offline alternative


def test_cifar10_download_checks_md5_then_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path / "src" / "cifar-10-batches-py", per_batch=2, protocol=2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buffer.getvalue()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(archive))
    path = tmp_path / "cifar"

    # a served file that is not the official archive is refused and nothing is extracted
    with pytest.raises(ConfigError, match="checksum mismatch"):
        load_dataset(Cifar10Data(name="cifar10", path=path, download=True))
    assert not (path / "cifar-10-batches-py").exists()

    monkeypatch.setattr(data_module, "_CIFAR_MD5", hashlib.md5(archive).hexdigest())
    ds = load_dataset(Cifar10Data(name="cifar10", path=path, download=True))
    assert len(ds.train_x) == 10 and (path / "cifar-10-batches-py" / "test_batch").is_file()


# --------------------------------------------------------------------- image folder


def write_image(path: Path, value: int, size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path, format=fmt)


def write_image_tree(root: Path, per_class: int = 3) -> None:
    """Classes created out of order; class k's images are gray level 60 * k (+ a little per image)."""
    for split in ("train", "test"):
        for name, k in (("dog", 2), ("ant", 0), ("cat", 1)):
            for i in range(per_class):
                fmt, suffix = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
                write_image(root / split / name / f"{i:02d}.{suffix}", 60 * k + 2 * i, fmt=fmt)


def test_image_folder_loads_sorted_classes_and_labels(tmp_path: Path) -> None:
    write_image_tree(tmp_path, per_class=3)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored
    ds = load_dataset(ImageFolderData(name="image_folder", path=tmp_path))
    assert ds.num_classes == 3 and ds.input_shape == (3, 8, 8)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.test_y.tolist() == ds.train_y.tolist()
    # sorted classes ant < cat < dog are also darkest to brightest: brightness must grow with the label
    brightness = ds.train_x.mean(dim=(1, 2, 3))
    for low, high in ((0, 1), (1, 2)):
        assert brightness[ds.train_y == low].max() < brightness[ds.train_y == high].min()
    assert_train_standardized(ds)


def test_image_folder_max_per_class_takes_first_sorted_files(tmp_path: Path) -> None:
    write_image_tree(tmp_path, per_class=3)
    ds = load_dataset(ImageFolderData(name="image_folder", path=tmp_path, max_per_class=2))
    assert ds.train_y.tolist() == [0, 0, 1, 1, 2, 2]
    full = load_dataset(ImageFolderData(name="image_folder", path=tmp_path))
    # files 00 and 01 of each class, in order: same brightness ranking as in the full set
    keep = torch.tensor([0, 1, 3, 4, 6, 7])
    assert torch.equal(ds.train_x.mean(dim=(1, 2, 3)).argsort(), full.train_x[keep].mean(dim=(1, 2, 3)).argsort())


def test_image_folder_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    write_image_tree(tmp_path)
    bad = tmp_path / "test" / "cat" / "zz.jpg"
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad, format="JPEG")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ConfigError, match="cannot decode") as err:
        load_dataset(ImageFolderData(name="image_folder", path=tmp_path, image_size=8))
    assert str(err.value).startswith(str(bad))


def test_image_folder_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    write_image_tree(tmp_path)
    odd = tmp_path / "train" / "dog" / "99.png"
    write_image(odd, 200, size=(10, 12))
    with pytest.raises(ConfigError, match="image_size") as err:
        load_dataset(ImageFolderData(name="image_folder", path=tmp_path))
    assert str(err.value).startswith(str(odd))
    ds = load_dataset(ImageFolderData(name="image_folder", path=tmp_path, image_size=6))
    assert ds.input_shape == (3, 6, 6) and len(ds.train_x) == 10


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda root: (root / "test" / "cat").rename(root / "test" / "cow"), r"^data\.test_split: .*missing \['cat'\]"),
        (lambda root: [p.unlink() for p in (root / "train" / "ant").iterdir()], r"^data\.path: .*ant has no"),
    ],
    ids=["different-classes", "empty-class"],
)
def test_image_folder_rejects_bad_trees(tmp_path: Path, change: Callable[[Path], object], message: str) -> None:
    write_image_tree(tmp_path)
    change(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_dataset(ImageFolderData(name="image_folder", path=tmp_path))


def test_image_folder_parallel_decode_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large trees are decoded in worker processes: same arrays, same error naming a bad file."""
    data_root = tmp_path / "images"
    write_image_tree(data_root, per_class=4)
    cfg = ImageFolderData(name="image_folder", path=data_root)
    serial = load_dataset(cfg)

    pools: list[object] = []

    class RecordingPool(data_module.ProcessPoolExecutor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            pools.append(self)

    # make this small tree count as large, on any number of CPUs, and bypass the cache
    monkeypatch.setattr(data_module, "ProcessPoolExecutor", RecordingPool)
    monkeypatch.setattr(data_module, "_PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(data_module, "_DECODE_CHUNK", 5)
    monkeypatch.setattr(data_module, "_usable_cpus", lambda: 2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    parallel = load_dataset(cfg)
    assert len(pools) == 2  # one per split
    assert torch.equal(serial.train_x, parallel.train_x) and torch.equal(serial.test_x, parallel.test_x)

    bad = data_root / "train" / "dog" / "02.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ConfigError, match="cannot decode") as err:
        load_dataset(cfg)
    assert str(err.value).startswith(str(bad))


def test_image_folder_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_root = tmp_path / "images"
    write_image_tree(data_root)
    cfg = ImageFolderData(name="image_folder", path=data_root)
    first = load_dataset(cfg)
    assert len(list((tmp_path / "xdg-cache" / "decoupled").glob("*.npz"))) == 2  # one per split

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise RuntimeError("decoded although cached")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = load_dataset(cfg)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)

    # a new file changes the key, so the split is decoded again (and hits the patched open)
    write_image(data_root / "train" / "ant" / "new.bmp", 5, fmt="BMP")
    with pytest.raises(RuntimeError, match="decoded although cached"):
        load_dataset(cfg)


def test_image_folder_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    data_root = tmp_path / "images"
    write_image_tree(data_root)
    cfg = ImageFolderData(name="image_folder", path=data_root)
    first = load_dataset(cfg)
    for cached in (tmp_path / "xdg-cache" / "decoupled").glob("*.npz"):
        cached.write_bytes(b"not an npz archive")
    again = load_dataset(cfg)
    assert torch.equal(first.train_x, again.train_x)
    assert all(np.load(p)["x"].shape[0] == 9 for p in (tmp_path / "xdg-cache" / "decoupled").glob("*.npz"))


# ------------------------------------------------------------------------------ idx

_IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """idx format: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, _IDX_TYPE_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_mnist_like(folder: Path, gz: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, size=(12, 5, 4), dtype=np.uint8)
    test_x = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    train_y = np.arange(12, dtype=np.uint8) % 4
    test_y = (np.arange(6) % 5).astype(">i4")  # a big-endian int32 file: byte order must be honoured
    write_idx(folder / "train-images-idx3-ubyte", train_x, gz)
    write_idx(folder / "train-labels-idx1-ubyte", train_y, gz)
    write_idx(folder / "t10k-images-idx3-ubyte", test_x, gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", test_y, gz)
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize("gz", [False, True])
def test_idx_parses_plain_and_gzipped(tmp_path: Path, gz: bool) -> None:
    train_x, train_y, test_x, test_y = write_mnist_like(tmp_path, gz)
    ds = load_dataset(IdxData(name="idx", path=tmp_path))
    assert ds.input_shape == (1, 5, 4) and ds.num_classes == 5
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == test_y.tolist()
    want_train, want_test = standardize(train_x[:, None] / 255.0, test_x[:, None] / 255.0)
    assert torch.allclose(ds.train_x, want_train, atol=1e-5) and torch.allclose(ds.test_x, want_test, atol=1e-5)


def test_idx_rejects_bad_magic_truncation_and_count_mismatch(tmp_path: Path) -> None:
    write_mnist_like(tmp_path)
    cfg = IdxData(name="idx", path=tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()

    images.write_bytes(b"\x08\x03" + good[2:])
    with pytest.raises(ConfigError, match="bad magic") as err:
        load_dataset(cfg)
    assert str(err.value).startswith(str(images))

    images.write_bytes(good[:-7])
    with pytest.raises(ConfigError, match=r"bytes") as err:
        load_dataset(cfg)
    assert str(err.value).startswith(str(images))

    images.write_bytes(good)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(ConfigError, match="5 labels but .* has 6 images"):
        load_dataset(cfg)


def test_idx_missing_file(tmp_path: Path) -> None:
    write_mnist_like(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"^data\.path: missing t10k-images-idx3-ubyte"):
        load_dataset(IdxData(name="idx", path=tmp_path))


# ------------------------------------------------------------------------ synthetic


@pytest.mark.parametrize("shape", [[7], [2, 5], [3, 6, 6]])
def test_synthetic_shapes_and_determinism(shape: list[int]) -> None:
    cfg = SyntheticData(name="synthetic", shape=shape, num_classes=4, train_size=64, test_size=16)
    ds = load_dataset(cfg, seed=3)
    assert ds.input_shape == tuple(shape) and len(ds.train_x) == 64 and len(ds.test_x) == 16
    assert ds.train_y.dtype == torch.int64 and 0 <= ds.train_y.min() and ds.train_y.max() < 4
    assert torch.equal(ds.train_x, load_dataset(cfg, seed=3).train_x)
    assert not torch.equal(ds.train_x, load_dataset(cfg, seed=4).train_x)


def test_synthetic_labels_are_learnable() -> None:
    cfg = SyntheticData(name="synthetic", shape=[16], num_classes=4, train_size=2000, test_size=500)
    ds = load_dataset(cfg, seed=0)
    counts = torch.bincount(ds.train_y, minlength=4)
    assert (counts > 200).all()  # every class present in a real share, not one dominant class
    model = LogisticRegression(max_iter=500).fit(ds.train_x.numpy(), ds.train_y.numpy())
    assert model.score(ds.test_x.numpy(), ds.test_y.numpy()) > 0.8  # chance is 0.25


def test_augment_needs_image_shaped_inputs() -> None:
    with pytest.raises(ConfigError, match=r"^data\.augment"):
        load_dataset(SyntheticData(name="synthetic", shape=[10], augment=True, train_size=8, test_size=8))


# ---------------------------------------------------------------- batches, augment


def test_iterate_batches_covers_every_sample_once() -> None:
    x = torch.arange(10).float()[:, None]
    y = torch.arange(10) * 2
    batches = list(iterate_batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(xb) for xb, _ in batches] == [3, 3, 3, 1]
    seen = torch.cat([xb[:, 0] for xb, _ in batches]).long()
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(yb, xb[:, 0].long() * 2) for xb, yb in batches)  # pairs stay together


def test_iterate_batches_drop_last_and_order() -> None:
    x, y = torch.arange(10)[:, None], torch.arange(10)
    dropped = list(iterate_batches(x, y, 4, shuffle=True, drop_last=True))
    assert [len(yb) for _, yb in dropped] == [4, 4] and len(set(torch.cat([yb for _, yb in dropped]).tolist())) == 8
    in_order = torch.cat([yb for _, yb in iterate_batches(x, y, 4, shuffle=False)])
    assert in_order.tolist() == list(range(10))


def test_iterate_batches_generator_is_deterministic() -> None:
    x = torch.randn(20, 3, 8, 8)
    y = torch.arange(20)

    def epoch(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [xb for xb, _ in iterate_batches(x, y, 6, shuffle=True, generator=gen, augment=True)]

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert a[0].shape == (6, 3, 8, 8)


def find_window(padded: torch.Tensor, out: torch.Tensor, padding: int) -> tuple[int, int, bool] | None:
    """The (top, left, flipped) crop of one padded image that equals ``out``, if any."""
    h, w = out.shape[-2:]
    for top, left, flipped in itertools.product(range(2 * padding + 1), range(2 * padding + 1), (False, True)):
        window = padded[:, top : top + h, left : left + w]
        if torch.equal(window.flip(-1) if flipped else window, out):
            return top, left, flipped
    return None


def test_random_crop_flip_outputs_are_padded_windows() -> None:
    x = torch.rand(200, 2, 6, 5) + 1.0  # no zeros in the input: padding is told apart from pixels
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (2, 2, 2, 2))
    windows = [find_window(padded[i], out[i], 2) for i in range(len(x))]
    assert all(wnd is not None for wnd in windows)
    assert len({(top, left) for top, left, _ in windows}) > 10  # crops vary, not one fixed offset
    assert 60 < sum(flipped for _, _, flipped in windows) < 140  # flip with p = 0.5


def test_random_crop_flip_without_padding_only_flips() -> None:
    x = torch.randn(1000, 1, 4, 4)
    out = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ kept).all()
    assert 430 < flipped.sum() < 570


def test_without_inputs_keeps_shapes_and_labels_only() -> None:
    data = load_dataset(DigitsData(name="digits"), seed=0)
    light = data.without_inputs()
    assert light.input_shape == data.input_shape and light.num_classes == data.num_classes
    assert torch.equal(light.train_y, data.train_y)
    assert light.train_x.shape[0] == 1 and light.test_y.numel() == 0
