"""Data sets as in-memory tensors, and the batch iterator the trainers use.

Every source ends in a :class:`Dataset` whose inputs are float32, normalized with the
per-channel mean/std of the training split. Anything wrong with the data on disk becomes
a :class:`ConfigError` whose message starts with the config field (``data.path: ...``)
or with the offending file, so the command line can report it and exit 2.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .config import Cifar10Data, ConfigError, DataConfig, DigitsData, IdxData, ImageFolderData, SyntheticData

try:  # numpy >= 2 (and the 1.26 forward-compatibility shim)
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy < 1.26
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # float32, normalized with train statistics: (N, C, H, W) images or (N, D)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool  # training batches get random crop (pad 4) + horizontal flip

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def without_inputs(self) -> "Dataset":
        """Shapes, sizes and training labels only: what a stage that never reads the data needs."""
        return Dataset(self.name, self.train_x[:1].clone(), self.train_y, self.test_x[:1].clone(),
                       self.test_y[:0], self.num_classes, self.augment)


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load the data set ``cfg`` describes; ``seed`` fixes the digits split and the synthetic data."""
    if isinstance(cfg, DigitsData):
        train_x, train_y, test_x, test_y, num_classes = _load_digits(cfg, seed)
    elif isinstance(cfg, Cifar10Data):
        train_x, train_y, test_x, test_y, num_classes = _load_cifar10(cfg)
    elif isinstance(cfg, ImageFolderData):
        train_x, train_y, test_x, test_y, num_classes = _load_image_folder(cfg)
    elif isinstance(cfg, IdxData):
        train_x, train_y, test_x, test_y, num_classes = _load_idx(cfg)
    elif isinstance(cfg, SyntheticData):
        train_x, train_y, test_x, test_y, num_classes = _load_synthetic(cfg, seed)
    else:
        raise ConfigError(f"data.name: unsupported data config {type(cfg).__name__}")
    if cfg.augment and train_x.ndim != 4:
        raise ConfigError(
            "data.augment: random crop and flip need images (C, H, W), "
            f"but inputs have shape {tuple(train_x.shape[1:])}"
        )
    train_x, test_x = _normalize(train_x, test_x)
    return Dataset(cfg.name, train_x, train_y, test_x, test_y, num_classes, cfg.augment)


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    augment: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, y)`` batches; ``generator`` drives both the shuffle and the augmentation."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx.to(y.device)]
        if augment:
            xb = random_crop_flip(xb, generator=generator)
        yield xb, yb


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad each image by ``padding``, crop a random window of the original size, flip half of them."""
    if x.ndim != 4:
        raise ValueError(f"random_crop_flip expects (N, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    # draw on the generator's device (CPU by default), then move: x may live on a GPU
    gen_device = generator.device if generator is not None else x.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
    flip = (torch.rand(n, generator=generator, device=gen_device) < 0.5).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the window right to left
    # one gather for the whole batch: out[i, ch, r, q] = padded[i, ch, rows[i, r], cols[i, q]]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


# ------------------------------------------------------------------- shared helpers

_Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]

# Below this a channel counts as constant: float rounding leaves a tiny non-zero std there,
# and dividing by it would blow rounding noise up to unit scale.
_MIN_STD = 1e-6


def _normalize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardize both splits with train statistics per dim-1 entry (channel or feature), in place."""
    dims = [d for d in range(train.ndim) if d != 1]
    std, mean = torch.std_mean(train, dim=dims, keepdim=True, correction=0)
    std = torch.where(std > _MIN_STD, std, torch.ones_like(std))
    return train.sub_(mean).div_(std), test.sub_(mean).div_(std)


def _images_to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


# -------------------------------------------------------------------------- digits


def _load_digits(cfg: DigitsData, seed: int) -> _Split:
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=cfg.test_fraction, random_state=seed % 2**32, stratify=digits.target
    )
    return (
        torch.from_numpy(x_train[:, None]),
        torch.from_numpy(y_train.astype(np.int64)),
        torch.from_numpy(x_test[:, None]),
        torch.from_numpy(y_test.astype(np.int64)),
        10,
    )


# ------------------------------------------------------------------------ CIFAR-10

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_FILES = (*_CIFAR_TRAIN, _CIFAR_TEST)

# Everything the CIFAR-10 pickles reference (ndarray reconstruction; ``_codecs.encode`` is how
# Python 3 writes bytes at protocol <= 2). Any other global, e.g. os.system, is refused.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a data file must not be able to run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def _load_cifar10(cfg: Cifar10Data) -> _Split:
    folder = _find_cifar_folder(cfg.path)
    if folder is None:
        if cfg.download:
            try:
                _download_cifar10(cfg.path)
                reason = "the archive did not contain the batch files"
            except (OSError, tarfile.TarError, ValueError) as err:  # URLError and timeouts are OSErrors
                reason = f"{type(err).__name__}: {err}"
            folder = _find_cifar_folder(cfg.path)
            why = f"the download failed: {reason}"
        else:
            why = "download is false"
        if folder is None:
            raise ConfigError(
                f"data.path: CIFAR-10 not found in {cfg.path} (expected cifar-10-batches-py/data_batch_1..5, "
                f"test_batch) and {why}. Download cifar-10-python.tar.gz elsewhere and extract it into "
                f"{cfg.path}, or use name: image_folder with an extracted image tree."
            )
    train = [_read_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
    test_x, test_y = _read_cifar_batch(folder / _CIFAR_TEST)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return (
        _images_to_float(train_x),
        torch.from_numpy(train_y),
        _images_to_float(test_x),
        torch.from_numpy(test_y),
        10,
    )


def _find_cifar_folder(root: Path) -> Path | None:
    for folder in (root / "cifar-10-batches-py", root):
        if all((folder / name).is_file() for name in _CIFAR_FILES):
            return folder
    return None


def _download_cifar10(root: Path) -> None:
    """Fetch, checksum and extract the official archive into ``root``."""
    with urllib.request.urlopen(_CIFAR_URL, timeout=30) as response:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root) as archive:
            md5 = hashlib.md5(usedforsecurity=False)
            for chunk in iter(lambda: response.read(1 << 20), b""):
                md5.update(chunk)
                archive.write(chunk)
            if md5.hexdigest() != _CIFAR_MD5:
                raise ValueError(f"checksum mismatch for {_CIFAR_URL}: md5 {md5.hexdigest()}, expected {_CIFAR_MD5}")
            archive.seek(0)
            with tarfile.open(fileobj=archive, mode="r:gz") as tar:
                tar.extractall(root, filter="data")  # "data" refuses absolute paths, links out, devices


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    try:
        with path.open("rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a corrupt or hostile pickle can fail in almost any way
        raise ConfigError(f"{path}: not a CIFAR-10 python batch file: {type(err).__name__}: {err}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ConfigError(f"{path}: not a CIFAR-10 python batch file: expected a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ConfigError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {got}")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: b'labels' must be integers: {err}") from None
    if label_array.shape != (data.shape[0],):
        raise ConfigError(f"{path}: {data.shape[0]} images but b'labels' has shape {label_array.shape}")
    if label_array.size and (label_array.min() < 0 or label_array.max() > 9):
        raise ConfigError(f"{path}: labels must be in 0..9, got {label_array.min()}..{label_array.max()}")
    return data.reshape(-1, 3, 32, 32), label_array


# --------------------------------------------------------------------- image folder

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_DECODE_CHUNK = 256  # files per worker task: amortizes the task round trip
_PARALLEL_MIN_FILES = 2048  # below this, starting worker processes costs more than it saves
_CACHE_VERSION = 1


def _load_image_folder(cfg: ImageFolderData) -> _Split:
    train_dir, test_dir = cfg.path / cfg.train_split, cfg.path / cfg.test_split
    classes = _class_folders(train_dir, "data.train_split")
    test_classes = _class_folders(test_dir, "data.test_split")
    if test_classes != classes:
        missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise ConfigError(
            f"data.test_split: the classes in {test_dir} differ from those in {train_dir}: "
            f"missing {missing}, extra {extra}"
        )
    train_x, train_y = _load_split(cfg, train_dir, cfg.train_split, classes)
    test_x, test_y = _load_split(cfg, test_dir, cfg.test_split, classes)
    if test_x.shape[1:] != train_x.shape[1:]:
        raise ConfigError(
            f"{test_dir}: images are {test_x.shape[2]}x{test_x.shape[1]} but those in {train_dir} are "
            f"{train_x.shape[2]}x{train_x.shape[1]}; set data.image_size to resize both splits to one size"
        )
    # decoded as (N, H, W, 3); transposing before the float conversion keeps the copy in uint8
    return (
        _images_to_float(train_x.transpose(0, 3, 1, 2)),
        torch.from_numpy(train_y),
        _images_to_float(test_x.transpose(0, 3, 1, 2)),
        torch.from_numpy(test_y),
        len(classes),
    )


def _class_folders(split_dir: Path, field: str) -> list[str]:
    if not split_dir.is_dir():
        raise ConfigError(f"{field}: folder not found: {split_dir}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"data.path: no class folders in {split_dir} (expected {split_dir}/<class>/*.jpg)")
    return classes


def _load_split(cfg: ImageFolderData, split_dir: Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decoded uint8 images (N, H, W, 3) and labels of one split, from the cache when the files are unchanged."""
    entries: list[os.DirEntry] = []
    listing: list[list] = []  # (class, file, size, mtime) of each file: the cache key, so any change rebuilds
    labels: list[int] = []
    for label, name in enumerate(classes):
        # scandir knows each entry's type without a stat call: listing 60k files stays cheap.
        # Dot files are skipped: macOS leaves "._name.jpg" metadata files beside the images.
        with os.scandir(split_dir / name) as it:
            class_entries = sorted(
                (e for e in it if e.name.lower().endswith(_IMAGE_SUFFIXES) and e.name[0] != "." and e.is_file()),
                key=lambda e: e.name,
            )
        if not class_entries:
            raise ConfigError(f"data.path: class folder {split_dir / name} has no {'/'.join(_IMAGE_SUFFIXES)} images")
        class_entries = class_entries[: cfg.max_per_class]
        entries += class_entries
        listing += [[name, e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in class_entries]
        labels += [label] * len(class_entries)
    y = np.asarray(labels, dtype=np.int64)

    key = [_CACHE_VERSION, str(cfg.path.resolve()), split, cfg.image_size, cfg.max_per_class, listing]
    cache_file = _cache_dir() / f"image_folder-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]}.npz"
    x = _read_cache(cache_file, len(entries))
    if x is None:
        x = _decode_images([Path(e.path) for e in entries], cfg.image_size)
        _write_cache(cache_file, x)
    return x, y


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "decoupled"


def _read_cache(path: Path, count: int) -> np.ndarray | None:
    """The cached array, or None when it is absent, unreadable or of the wrong shape (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            x = archive["x"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[0] != count or x.shape[3] != 3:
        return None
    return x


def _write_cache(path: Path, x: np.ndarray) -> None:
    """Write atomically (temp file + rename) so a concurrent or interrupted run never sees half a file."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            tmp_name = tmp.name
            np.savez(tmp, x=x)
        os.replace(tmp_name, path)
    except OSError as err:  # the cache only saves time: a read-only home must not stop training
        warnings.warn(f"could not write the image cache {path}: {err}", stacklevel=2)
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def _decode_images(files: list[Path], image_size: int | None) -> np.ndarray:
    """Decode all files, in worker processes when there are many, and check that all sizes agree."""
    chunks = [files[i : i + _DECODE_CHUNK] for i in range(0, len(files), _DECODE_CHUNK)]
    workers = min(_usable_cpus(), len(chunks))
    if len(files) < _PARALLEL_MIN_FILES or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        images = _decode_chunk(files, image_size)
    else:
        # Processes, not threads: for small images Pillow spends most of its time in Python (header
        # parsing), so threads serialize on the GIL. fork starts workers without re-importing torch.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        try:
            decoded = pool.map(_decode_chunk, chunks, itertools.repeat(image_size))
            images = [image for chunk in decoded for image in chunk]
        finally:
            pool.shutdown(cancel_futures=True)  # after an error, skip the chunks not started yet
    ref_shape = images[0].shape
    for path, image in zip(files, images):
        if image.shape != ref_shape:
            raise ConfigError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]} but {files[0]} is "
                f"{ref_shape[1]}x{ref_shape[0]}; set data.image_size to resize all images to one size"
            )
    return np.stack(images)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cpuset limits
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _decode_chunk(files: list[Path], image_size: int | None) -> list[np.ndarray]:
    return [_decode_image(path, image_size) for path in files]


def _decode_image(path: Path, image_size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # decodes fully: a truncated file fails here, not later
        if image_size is not None and rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ConfigError(f"{path}: cannot decode image: {err}") from None


# ------------------------------------------------------------------------------ idx

# idx type byte -> element type (multi-byte types are big-endian)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _load_idx(cfg: IdxData) -> _Split:
    train_images, train_path = _read_idx(cfg.path, cfg.train_images)
    train_labels, train_labels_path = _read_idx(cfg.path, cfg.train_labels)
    test_images, test_path = _read_idx(cfg.path, cfg.test_images)
    test_labels, test_labels_path = _read_idx(cfg.path, cfg.test_labels)
    for images, path in ((train_images, train_path), (test_images, test_path)):
        if images.ndim != 3:
            raise ConfigError(f"{path}: expected images of shape (N, H, W), got {images.shape}")
    if test_images.shape[1:] != train_images.shape[1:]:
        raise ConfigError(
            f"{test_path}: images are {test_images.shape[1:]} but those in {train_path} are {train_images.shape[1:]}"
        )
    for labels, images, labels_path, images_path in (
        (train_labels, train_images, train_labels_path, train_path),
        (test_labels, test_images, test_labels_path, test_path),
    ):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ConfigError(f"{labels_path}: expected 1-d integer labels, got {labels.dtype} of shape {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise ConfigError(f"{labels_path}: {labels.shape[0]} labels but {images_path} has {images.shape[0]} images")
        if labels.size and labels.min() < 0:
            raise ConfigError(f"{labels_path}: labels must be >= 0, got {labels.min()}")
    num_classes = int(max(train_labels.max(initial=0), test_labels.max(initial=0))) + 1
    return (
        _idx_images_to_float(train_images),
        torch.from_numpy(train_labels.astype(np.int64)),
        _idx_images_to_float(test_images),
        torch.from_numpy(test_labels.astype(np.int64)),
        num_classes,
    )


def _idx_images_to_float(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) -> float32 (N, 1, H, W); uint8 pixels are scaled to [0, 1]."""
    if images.dtype == np.uint8:
        return _images_to_float(images[:, None])
    return torch.from_numpy(images[:, None].astype(np.float32))


def _read_idx(folder: Path, name: str) -> tuple[np.ndarray, Path]:
    """Parse ``folder/name`` or ``folder/name.gz``; returns the array (native byte order) and the path read."""
    path = folder / name
    if not path.is_file():
        path = folder / f"{name}.gz"
        if not path.is_file():
            raise ConfigError(f"data.path: missing {name} (or {name}.gz) in {folder}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise ConfigError(f"{path}: cannot read: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ConfigError(f"{path}: header says shape {dims} ({expected} bytes) but the file has {len(raw)} bytes")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("=")), path  # a copy: frombuffer's view of bytes is read-only


# ------------------------------------------------------------------------ synthetic


def _load_synthetic(cfg: SyntheticData, seed: int) -> _Split:
    generator = torch.Generator().manual_seed(seed)
    features = math.prod(cfg.shape)
    # unit-norm teacher columns: no class wins by a larger weight norm, so classes come out near balanced
    teacher = torch.randn(features, cfg.num_classes, generator=generator)
    teacher /= teacher.norm(dim=0, keepdim=True)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, *cfg.shape, generator=generator)
        return x, (x.reshape(n, -1) @ teacher).argmax(dim=1)

    train_x, train_y = draw(cfg.train_size)
    test_x, test_y = draw(cfg.test_size)
    return train_x, train_y, test_x, test_y, cfg.num_classes
