"""CIFAR-10 (or any image-classification dataset) held as whole tensors, the search split, and batch augmentation.

The whole dataset lives in memory as tensors (CIFAR-10 train is 150 MB as uint8). Move it to the training device
once with `ImageData.to(device)`. After that a batch is one index gather plus a few tensor ops on that device. The
original DARTS code built a fresh DataLoader iterator every step for the architecture batch. That meant worker
start-up, per-image PIL transforms and a host-to-device copy each step. `batches` avoids all three.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pickle
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import ConfigError, DataError
from shared.hub import data_folder, load_hub_dataset
from shared.validation import check_fields

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_HUB_NAME = "uoft-cs/cifar10"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

_TARBALL = "cifar-10-python.tar.gz"
_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_FILES = (*_TRAIN_FILES, "test_batch", "batches.meta")
_PIXELS = 3 * 32 * 32  # one row of an official batch: 1024 R, 1024 G, 1024 B
_REDOWNLOAD = f"re-download {_TARBALL} from {CIFAR10_URL}"
# Globals the official pickles (and numpy 1.x/2.x re-pickles of them) need. Anything else is refused: a pickle can
# run arbitrary code, and a data folder is not a place to run code from.
_ALLOWED_GLOBALS = {(f"numpy.{core}.multiarray", name) for core in ("core", "_core")
                    for name in ("_reconstruct", "scalar")}
_ALLOWED_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """A train/test image-classification dataset as whole tensors (labels index `classes`)."""

    train_images: torch.Tensor  # (N, 3, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (M, 3, H, W) uint8
    test_labels: torch.Tensor  # (M,) int64
    classes: tuple[str, ...]
    source: str  # where it was read from, e.g. "folder:/data/cifar10/cifar-10-batches-py"

    def fingerprint(self) -> str:
        """'<N> training images, sha256 <12 hex digits>' of the training images and labels: what decides a split,
        and what a resumed run must share."""
        digest = hashlib.sha256(self.train_labels.cpu().numpy().tobytes())
        digest.update(self.train_images.cpu().numpy().tobytes())
        return f"{len(self.train_labels)} training images, sha256 {digest.hexdigest()[:12]}"

    def to(self, device: torch.device | str) -> ImageData:
        """The same data with all four tensors on `device` (one copy, done once before training)."""
        move = {f: getattr(self, f).to(device) for f in ("train_images", "train_labels", "test_images", "test_labels")}
        return dataclasses.replace(self, **move)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """`data_dir`; else `$DARTS_DATA_DIR` if it holds CIFAR-10, else `$DARTS_DATA_DIR/cifar10`; else ./data/cifar10."""
    return data_folder(data_dir, "cifar10", lambda root: _find_layout(root) is not None)


def load_cifar10(data_dir: str | os.PathLike[str] | None = None, hub_name: str | None = CIFAR10_HUB_NAME) -> ImageData:
    """CIFAR-10 from the official python-version files in `resolve_data_dir(data_dir)`, else from the hub.

    The folder may hold `cifar-10-python.tar.gz` (read in place), `cifar-10-batches-py/`, or that folder's files.
    `hub_name=None` turns the hub fallback off; it is also skipped under HF_HUB_OFFLINE / HF_DATASETS_OFFLINE.
    """
    root = resolve_data_dir(data_dir)
    start = time.perf_counter()
    layout = _find_layout(root)
    if layout is not None:
        data = _load_local(*layout)
    else:
        try:
            data = _load_hub(hub_name, None, None)
        except DataError as err:
            raise DataError(
                f"no CIFAR-10 in {root} (looked for {_FOLDER}/, its files or {_TARBALL}), and {err}. Fix: put "
                f"{_TARBALL} from {CIFAR10_URL} into {root} (or pass data_dir / set DARTS_DATA_DIR), or go online "
                f"with HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset to download {hub_name or CIFAR10_HUB_NAME}."
            ) from err
        if data.train_images.shape[1:] != (3, 32, 32) or len(data.classes) != 10:
            raise DataError(f"{data.source} is not CIFAR-10 (images {tuple(data.train_images.shape[1:])}, "
                            f"{len(data.classes)} classes); pass hub_name={CIFAR10_HUB_NAME!r} or local files")
    logger.info("CIFAR-10 loaded from %s in %.1f s: %d train, %d test images", data.source,
                time.perf_counter() - start, len(data.train_labels), len(data.test_labels))
    return data


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    """Which images a CNN experiment reads (the config keys of the same names)."""

    dataset: str = "cifar10"  # cifar10 (its python files, else the hub), or a `datasets` folder or hub name
    image_column: str | None = None  # None: the first Image column (else img, image)
    label_column: str | None = None  # None: the first ClassLabel column (else label, labels)
    train_split: str = "train"
    test_split: str | None = None  # None: test, else validation

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.dataset.strip() or not self.train_split.strip() or self.test_split == "":
            raise ConfigError(f"dataset, train_split and test_split must be non-empty, got {self.dataset!r}, "
                              f"{self.train_split!r}, {self.test_split!r}")


def load_images(config: ImageDataConfig, data_dir: str | os.PathLike[str] | None = None) -> ImageData:
    """CIFAR-10 (`load_cifar10(data_dir)`) for dataset=cifar10 with its default columns and splits, else the
    `datasets` image-classification dataset the config names (`load_image_dataset`)."""
    if config == ImageDataConfig():
        return load_cifar10(data_dir)
    start = time.perf_counter()
    data = load_image_dataset(config.dataset, config.image_column, config.label_column, config.train_split,
                              config.test_split)
    logger.info("%s loaded in %.1f s: %d classes, images %s, %d train, %d test", data.source,
                time.perf_counter() - start, len(data.classes), tuple(data.train_images.shape[1:]),
                len(data.train_labels), len(data.test_labels))
    return data


def load_image_dataset(path_or_name: str | os.PathLike[str], image_column: str | None = None,
                       label_column: str | None = None, train_split: str = "train",
                       test_split: str | None = None) -> ImageData:
    """Any image-classification dataset in `datasets` format: a `save_to_disk` folder or a hub name.

    It needs the split `train_split` and `test_split` (None: 'test', else 'validation'). Columns default to the
    first `Image` and `ClassLabel` features (else 'img'/'image' and 'label'/'labels'). Images are converted to
    RGB, not resized, so every image must have the same size.
    """
    columns = (image_column, label_column, train_split, test_split)
    path = Path(path_or_name).expanduser()
    if not path.exists():
        try:
            return _load_hub(str(path_or_name), *columns)
        except DataError as err:
            raise DataError(f"{str(path_or_name)!r} is no local folder, and {err}; pass an existing save_to_disk "
                            "folder, or go online with HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset") from err
    import datasets  # deferred: importing it costs about a second

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, arrow errors...
        raise DataError(f"{path} is not a readable `datasets` save_to_disk folder ({type(err).__name__}: {err}); "
                        "write it with DatasetDict.save_to_disk or pass a hub name") from err
    return _from_datasets(dataset, f"disk:{path}", *columns)


def synthetic_images(train: int, test: int, seed: int = 0, num_classes: int = 10) -> ImageData:
    """Random uint8 32x32 RGB images with random labels: a dataset of CIFAR-10's shape for benchmarks and tests."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
        return images, torch.randint(num_classes, (n,), generator=generator)

    (train_images, train_labels), (test_images, test_labels) = split(train), split(test)
    return ImageData(train_images, train_labels, test_images, test_labels,
                     tuple(f"class{i}" for i in range(num_classes)), source=f"synthetic:{train}+{test}")


def split_search(n: int, seed: int, fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint sorted indices covering range(n): floor(n * fraction) for the weights, the rest for the architecture."""
    n_weights = int(n * fraction)
    if not 0 < n_weights < n:
        raise ConfigError(f"split_search(n={n}, fraction={fraction}) leaves one half empty; "
                          "use 0 < fraction < 1 and n >= 2")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)  # (n,)
    return order[:n_weights].sort().values, order[n_weights:].sort().values


def normalize(images: torch.Tensor, mean: tuple[float, ...] = CIFAR10_MEAN,
              std: tuple[float, ...] = CIFAR10_STD) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W): scaled to [0, 1], then per-channel (x - mean) / std."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(f"normalize expects uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}; "
                        "pass the raw ImageData tensors")
    shift = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255.0  # (1, C, 1, 1)
    scale = 1.0 / (torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255.0)
    return images.float().sub_(shift).mul_(scale)  # (x / 255 - mean) / std in two in-place passes


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Zero-pad by `padding`, take a random H x W window per image, and flip half the images left-right.

    Works on any dtype and device; the random draws happen on `generator`'s device. No loop over images.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, Hp, Wp), Hp = H + 2p
    top = _randint(generator, 2 * padding + 1, batch, images.device)  # (B,)
    left = _randint(generator, 2 * padding + 1, batch, images.device)
    flip = _randint(generator, 2, batch, images.device).bool()  # (B,)
    rows = top[:, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=images.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its window right to left
    flat = rows[:, :, None] * padded.shape[3] + cols[:, None, :]  # (B, H, W) offsets into one padded plane
    flat = flat.view(batch, 1, height * width).expand(batch, channels, height * width)
    return padded.flatten(2).gather(2, flat).view(batch, channels, height, width)


def cutout(images: torch.Tensor, generator: torch.Generator, size: int = 16) -> torch.Tensor:
    """Zero a size x size square at a uniformly random centre per image (clipped at the borders)."""
    if size <= 0:
        return images
    batch, _, height, width = images.shape
    top = _randint(generator, height, batch, images.device) - size // 2  # (B,) may be < 0: clipped below
    left = _randint(generator, width, batch, images.device) - size // 2
    ys = torch.arange(height, device=images.device)  # (H,)
    xs = torch.arange(width, device=images.device)
    in_rows = (ys >= top[:, None]) & (ys < top[:, None] + size)  # (B, H)
    in_cols = (xs >= left[:, None]) & (xs < left[:, None] + size)  # (B, W)
    hole = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
    return images.masked_fill(hole[:, None], 0)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
            shuffle: bool = True, drop_last: bool = True, augment: bool = True,
            cutout_size: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (normalized float images (B, 3, H, W), labels (B,)) from tensors already on the device.

    Why not a DataLoader: see the module docstring. Per step this only gathers rows and runs a few
    tensor ops on the device. `augment` = random crop (padding 4) + flip on the uint8 images, before normalization
    (pads are black, as in torchvision). `cutout_size` > 0 cuts out after normalization (as in DARTS), even
    without `augment`.
    """
    n = len(labels)
    if images.shape[0] != n or images.device != labels.device:
        raise DataError(f"images {tuple(images.shape)} on {images.device} do not match labels ({n},) on "
                        f"{labels.device}; pass tensors of one dataset on one device")
    if batch_size <= 0 or (drop_last and batch_size > n):
        raise ConfigError(f"batch_size={batch_size} yields no batch from {n} examples (drop_last={drop_last}); "
                          f"use 1 <= batch_size <= {n} or drop_last=False")
    if shuffle:
        order = torch.randperm(n, generator=generator, device=generator.device).to(images.device)
    else:
        order = torch.arange(n, device=images.device)
    end = n - n % batch_size if drop_last else n
    for start in range(0, end, batch_size):
        index = order[start:start + batch_size]  # (B,)
        batch = images[index]  # (B, 3, H, W) uint8
        if augment:
            batch = random_crop_flip(batch, generator)
        batch = normalize(batch)
        if cutout_size > 0:
            batch = cutout(batch, generator, cutout_size)
        yield batch, labels[index]


def _randint(generator: torch.Generator, high: int, count: int, device: torch.device) -> torch.Tensor:
    """`count` ints in [0, high) drawn on the generator's device, then moved to `device`."""
    return torch.randint(high, (count,), generator=generator, device=generator.device).to(device)


def _find_layout(root: Path) -> tuple[str, Path] | None:
    """('folder' | 'files' | 'tarball', path) for the first CIFAR-10 layout found in `root`, else None."""
    if (root / _FOLDER).is_dir():
        return "folder", root / _FOLDER
    if any((root / name).is_file() for name in _FILES):
        return "files", root
    if (root / _TARBALL).is_file():
        return "tarball", root / _TARBALL
    return None


def _load_local(layout: str, path: Path) -> ImageData:
    """Parse the six batch files and the meta file of one local layout into an ImageData."""
    if layout == "tarball":
        parsed = dict(_read_tarball(path))  # name -> (unpickled dict, where it came from)
    else:
        parsed = {name: (_unpickle((path / name).read_bytes(), str(path / name)), str(path / name))
                  for name in _FILES if (path / name).is_file()}
    missing = [name for name in _FILES if name not in parsed]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (incomplete download or extraction); {_REDOWNLOAD}")
    meta, where = parsed["batches.meta"]
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{where} has no 'label_names' list; {_REDOWNLOAD}")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    train = [_parse_batch(*parsed[name], len(classes)) for name in _TRAIN_FILES]
    test_images, test_labels = _parse_batch(*parsed["test_batch"], len(classes))
    return ImageData(torch.cat([images for images, _ in train]), torch.cat([labels for _, labels in train]),
                     test_images, test_labels, classes, f"{layout}:{path}")


def _read_tarball(tarball: Path) -> Iterator[tuple[str, tuple[dict[str, Any], str]]]:
    """Members read straight from the gzip stream, in archive order (nothing is written to disk)."""
    try:
        with tarfile.open(tarball, mode="r|gz") as archive:
            for member in archive:
                name = Path(member.name).name
                if member.isfile() and name in _FILES:
                    where = f"{tarball}:{member.name}"
                    raw = archive.extractfile(member).read()  # type: ignore[union-attr]  # isfile() checked
                    yield name, (_unpickle(raw, where), where)
    except (tarfile.TarError, EOFError, OSError) as err:  # truncated gzip, bad header, CRC error
        raise DataError(f"{tarball} is truncated or corrupt ({type(err).__name__}: {err}); {_REDOWNLOAD}") from err


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(raw: bytes, where: str) -> dict[str, Any]:
    """The pickled dict of one official file, with its bytes keys decoded to str."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # damaged pickles raise nearly any exception type
        raise DataError(f"cannot unpickle {where} ({type(err).__name__}: {err}); the file is truncated or "
                        f"corrupt, {_REDOWNLOAD}") from err
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}, not the CIFAR-10 dict; {_REDOWNLOAD}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(batch: dict[str, Any], where: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, 32, 32) uint8 and labels (n,) int64 of one batch file, checked."""
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' is {got}, expected uint8 (n, {_PIXELS}); {_REDOWNLOAD}")
    labels = np.asarray(batch.get("labels"))
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: 'labels' is {labels.dtype} {labels.shape}, expected {len(data)} integers; "
                        f"{_REDOWNLOAD}")
    _check_label_range(labels, num_classes, where)
    data = data if data.flags.writeable else data.copy()  # torch.from_numpy warns on read-only arrays
    images = torch.from_numpy(data).view(-1, 3, 32, 32)  # each row: 32x32 R plane, then G, then B
    return images, torch.from_numpy(labels.astype(np.int64))


def _check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {int(bad[0])} is outside 0..{num_classes - 1}; the labels are corrupt, "
                        "re-create or re-download the data")


def _load_hub(name: str | None, image_column: str | None, label_column: str | None, train_split: str = "train",
              test_split: str | None = None) -> ImageData:
    """`name` from the Hugging Face hub; a DataError saying why not is left to the caller to complete."""
    if name is None:
        raise DataError("the hub was skipped: the hub fallback is off (hub_name=None)")
    return _from_datasets(load_hub_dataset(name), f"hub:{name}", image_column, label_column, train_split,
                          test_split)


def _from_datasets(dataset: Any, source: str, image_column: str | None, label_column: str | None,
                   train_split: str = "train", test_split: str | None = None) -> ImageData:
    import datasets

    splits = list(dataset) if isinstance(dataset, datasets.DatasetDict) else []
    test_name = test_split or ("test" if "test" in splits else "validation")
    if train_split not in splits or test_name not in splits:
        wanted = f"'{test_name}'" if test_split else "a 'test' (or 'validation')"
        raise DataError(f"{source} needs a '{train_split}' and {wanted} split, found {splits or 'one'}; pass "
                        f"train_split= and test_split=, or save a DatasetDict(train=..., test=...)")
    train = dataset[train_split]
    image_column = image_column or _pick_column(train, datasets.Image, ("img", "image"), source, "image_column")
    label_column = label_column or _pick_column(train, datasets.ClassLabel, ("label", "labels"), source,
                                                "label_column")
    for column in (image_column, label_column):
        if column not in train.column_names:
            raise DataError(f"{source}: column {column!r} not in {train.column_names}; pass the right column name")
    feature = train.features[label_column]
    classes = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else tuple(
        str(i) for i in range(int(np.max(train[label_column], initial=0)) + 1))
    train_images, train_labels = _split_to_tensors(train, image_column, label_column, len(classes),
                                                   f"{source}[{train_split}]")
    test_images, test_labels = _split_to_tensors(dataset[test_name], image_column, label_column, len(classes),
                                                 f"{source}[{test_name}]")
    if test_images.shape[1:] != train_images.shape[1:]:
        raise DataError(f"{source}: test images are {tuple(test_images.shape[1:])} but train images "
                        f"{tuple(train_images.shape[1:])}; resize them to one size first")
    return ImageData(train_images, train_labels, test_images, test_labels, classes, source)


def _pick_column(split: Any, kind: type, fallbacks: tuple[str, ...], source: str, argument: str) -> str:
    """The first column with a `kind` feature, else the first of `fallbacks` present."""
    names = [name for name, feature in split.features.items() if isinstance(feature, kind)]
    names += [name for name in fallbacks if name in split.column_names]
    if not names:
        raise DataError(f"{source}: no {kind.__name__} column among {split.column_names}; pass {argument}=...")
    return names[0]


def _split_to_tensors(split: Any, image_column: str, label_column: str, num_classes: int,
                      where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) uint8 images (converted to RGB) and (N,) int64 labels of one split, checked."""
    arrays: list[np.ndarray] = []  # each (H, W, 3) uint8
    for chunk in split.select_columns([image_column]).iter(batch_size=1024):
        for image in chunk[image_column]:
            array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
            expected = arrays[0].shape if arrays else "(H, W, 3)"
            if array.ndim != 3 or array.shape[2] != 3 or (arrays and array.shape != expected):
                raise DataError(f"{where}: image {len(arrays)} is {array.shape}, expected {expected}; "
                                "resize all images to one size first")
            arrays.append(array)
    labels = np.asarray(split[label_column])
    if not arrays or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: {len(arrays)} images, labels {labels.dtype}; a split needs images and integer "
                        "labels (pass label_column= if the wrong column was picked)")
    _check_label_range(labels, num_classes, f"{where} ({label_column!r})")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    return images, torch.from_numpy(labels.astype(np.int64))
