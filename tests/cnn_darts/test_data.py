"""Tests for cnn_darts.data on tiny CIFAR-format files written here, plus the real data when present."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn_darts import data
from shared.errors import ConfigError, DataError

PER_BATCH = 20
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- fake CIFAR-10 in the official pickle format

def _fake_objects(seed: int = 0) -> dict[str, dict]:
    """The seven official files as dicts with bytes keys, PER_BATCH random images per batch."""
    rng = np.random.default_rng(seed)
    objects = {}
    for index, name in enumerate(FILES[:-1]):
        objects[name] = {
            b"batch_label": f"batch {index}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, PER_BATCH)],
            b"data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
            b"filenames": [f"img_{index}_{i}.png".encode() for i in range(PER_BATCH)],
        }
    objects["batches.meta"] = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": PER_BATCH,
                               b"num_vis": 3072}
    return objects


def _pickled(objects: dict[str, dict]) -> dict[str, bytes]:
    return {name: pickle.dumps(obj, protocol=2) for name, obj in objects.items()}


def _write(root: Path, layout: str, raw: dict[str, bytes]) -> Path:
    """Write `raw` (file name -> bytes) into `root` in one of the three layouts; returns the file/folder written."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "tarball":
        target = root / "cifar-10-python.tar.gz"
        with tarfile.open(target, "w:gz") as archive:
            for name, payload in raw.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
        return target
    target = root / "cifar-10-batches-py" if layout == "folder" else root
    target.mkdir(exist_ok=True)
    for name, payload in raw.items():
        (target / name).write_bytes(payload)
    return target


@pytest.fixture
def objects() -> dict[str, dict]:
    return _fake_objects()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("layout", ["tarball", "folder", "files"])
def test_load_cifar10_reads_every_layout(tmp_path: Path, objects: dict, layout: str, offline: None) -> None:
    _write(tmp_path, layout, _pickled(objects))
    loaded = data.load_cifar10(tmp_path)
    train_rows = np.concatenate([objects[name][b"data"] for name in FILES[:5]])  # (100, 3072)
    train_labels = sum((objects[name][b"labels"] for name in FILES[:5]), [])
    assert loaded.train_images.shape == (5 * PER_BATCH, 3, 32, 32) and loaded.train_images.dtype == torch.uint8
    assert loaded.train_labels.dtype == torch.int64
    assert loaded.train_labels.tolist() == train_labels
    assert loaded.test_labels.tolist() == objects["test_batch"][b"labels"]
    # Row layout: 1024 red values, then green, then blue, each 32x32 row-major.
    assert torch.equal(loaded.train_images[7, 1], torch.from_numpy(train_rows[7, 1024:2048].reshape(32, 32)))
    assert torch.equal(loaded.train_images.flatten(1), torch.from_numpy(train_rows))
    assert torch.equal(loaded.test_images.flatten(1), torch.from_numpy(objects["test_batch"][b"data"]))
    assert loaded.classes == CLASSES
    assert loaded.source.startswith(layout + ":")


def test_load_cifar10_accepts_str_keys(tmp_path: Path, objects: dict) -> None:
    as_str = {name: {k.decode(): v for k, v in obj.items()} for name, obj in objects.items()}
    _write(tmp_path, "files", _pickled(as_str))
    assert data.load_cifar10(tmp_path).train_labels.tolist()[:PER_BATCH] == objects["data_batch_1"][b"labels"]


def test_resolve_data_dir(tmp_path: Path, objects: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.resolve_data_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("DARTS_DATA_DIR", raising=False)
    assert data.resolve_data_dir(None) == Path("data/cifar10")
    monkeypatch.setenv("DARTS_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path / "cifar10"  # no CIFAR directly in it
    _write(tmp_path, "tarball", _pickled(objects))
    assert data.resolve_data_dir(None) == tmp_path  # holds the tarball itself
    assert data.load_cifar10().source.startswith("tarball:")


# ---------------------------------------------------------------- error cases

def test_missing_data_offline_names_both_remedies(tmp_path: Path, offline: None) -> None:
    with pytest.raises(DataError) as err:
        data.load_cifar10(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "the hub was skipped: HF_HUB_OFFLINE is set" in message  # skipped without trying the network
    assert "put cifar-10-python.tar.gz" in message and "go online" in message  # both remedies


def test_unreachable_hub_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(DataError, match="no CIFAR-10 in"):
        data.load_cifar10(tmp_path)
    assert time.perf_counter() - start < 15


def test_hub_off_by_argument(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="hub_name=None"):
        data.load_cifar10(tmp_path, hub_name=None)


@pytest.mark.parametrize("layout", ["folder", "files"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_pickle_names_the_file(tmp_path: Path, objects: dict, layout: str, damage: str) -> None:
    raw = _pickled(objects)
    raw["data_batch_3"] = b"not a pickle at all" if damage == "garbage" else raw["data_batch_3"][:5000]
    _write(tmp_path, layout, raw)
    with pytest.raises(DataError, match="data_batch_3.*truncated or corrupt"):
        data.load_cifar10(tmp_path, hub_name=None)


def test_pickle_with_foreign_code_is_refused(tmp_path: Path, objects: dict) -> None:
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    raw = _pickled(objects)
    raw["test_batch"] = pickle.dumps({b"data": Evil()}, protocol=2)
    _write(tmp_path, "files", raw)
    with pytest.raises(DataError, match="test_batch.*refusing global"):
        data.load_cifar10(tmp_path, hub_name=None)


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_tarball(tmp_path: Path, objects: dict, keep: float) -> None:
    tarball = _write(tmp_path, "tarball", _pickled(objects))
    payload = tarball.read_bytes()
    tarball.write_bytes(payload[: int(len(payload) * keep)])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        data.load_cifar10(tmp_path, hub_name=None)


def test_missing_batch_file(tmp_path: Path, objects: dict) -> None:
    raw = _pickled(objects)
    del raw["data_batch_5"]
    _write(tmp_path, "folder", raw)
    with pytest.raises(DataError, match="lacks data_batch_5"):
        data.load_cifar10(tmp_path, hub_name=None)


def test_wrong_array_shape(tmp_path: Path, objects: dict) -> None:
    objects["data_batch_2"][b"data"] = np.zeros((PER_BATCH, 3, 32, 32), dtype=np.uint8)
    _write(tmp_path, "folder", _pickled(objects))
    with pytest.raises(DataError, match=r"data_batch_2.*\(20, 3, 32, 32\).*3072"):
        data.load_cifar10(tmp_path, hub_name=None)


def test_wrong_label_count(tmp_path: Path, objects: dict) -> None:
    objects["test_batch"][b"labels"] = objects["test_batch"][b"labels"][:-1]
    _write(tmp_path, "files", _pickled(objects))
    with pytest.raises(DataError, match="test_batch.*'labels'"):
        data.load_cifar10(tmp_path, hub_name=None)


@pytest.mark.parametrize("bad", [10, -1])
def test_label_out_of_range(tmp_path: Path, objects: dict, bad: int) -> None:
    objects["data_batch_4"][b"labels"][3] = bad
    _write(tmp_path, "tarball", _pickled(objects))
    with pytest.raises(DataError, match=rf"data_batch_4: label {bad} is outside 0..9"):
        data.load_cifar10(tmp_path, hub_name=None)


# ---------------------------------------------------------------- datasets format

def _save_image_dataset(path: Path, sizes: list[tuple[int, int]], columns: tuple[str, str] = ("img", "label")):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    labels = [i % 3 for i in range(len(arrays))]
    features = datasets.Features({columns[0]: datasets.Image(), columns[1]: datasets.ClassLabel(names=["a", "b", "c"])})
    split = datasets.Dataset.from_dict({columns[0]: [Image.fromarray(a) for a in arrays], columns[1]: labels},
                                       features=features)
    datasets.DatasetDict(train=split.select(range(4)), test=split.select(range(4, len(arrays)))).save_to_disk(path)
    return arrays, labels


@pytest.mark.parametrize("columns", [("img", "label"), ("picture", "target")])
def test_load_image_dataset_from_disk(tmp_path: Path, columns: tuple[str, str]) -> None:
    arrays, labels = _save_image_dataset(tmp_path / "ds", [(8, 8)] * 6, columns)
    loaded = data.load_image_dataset(tmp_path / "ds")  # columns found from the Image / ClassLabel features
    assert loaded.train_images.shape == (4, 3, 8, 8) and loaded.test_images.shape == (2, 3, 8, 8)
    assert torch.equal(loaded.train_images[2], torch.from_numpy(arrays[2]).permute(2, 0, 1))
    assert torch.equal(loaded.test_images[1], torch.from_numpy(arrays[5]).permute(2, 0, 1))
    assert loaded.train_labels.tolist() == labels[:4] and loaded.test_labels.dtype == torch.int64
    assert loaded.classes == ("a", "b", "c") and loaded.source.startswith("disk:")
    explicit = data.load_image_dataset(str(tmp_path / "ds"), image_column=columns[0], label_column=columns[1])
    assert torch.equal(explicit.train_images, loaded.train_images)


def test_load_image_dataset_errors(tmp_path: Path, offline: None) -> None:
    _save_image_dataset(tmp_path / "mixed", [(8, 8)] * 3 + [(8, 9)] + [(8, 8)] * 2)
    with pytest.raises(DataError, match=r"image 3 is \(8, 9, 3\).*resize"):
        data.load_image_dataset(tmp_path / "mixed")
    _save_image_dataset(tmp_path / "ok", [(8, 8)] * 6)
    with pytest.raises(DataError, match="column 'nope'"):
        data.load_image_dataset(tmp_path / "ok", image_column="nope")
    with pytest.raises(DataError, match="save_to_disk"):
        data.load_image_dataset(tmp_path)  # a folder, but not a saved dataset
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        data.load_image_dataset("someone/not-here")


def test_load_image_dataset_plain_int_labels(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    image = Image.fromarray(np.zeros((4, 4), dtype=np.uint8))  # grayscale: converted to RGB
    train = datasets.Dataset.from_dict({"image": [image] * 3, "label": [0, 2, 1]})
    for test_labels, name in (([1, 2], "good"), ([1, -1], "bad")):  # -1: the usual "unlabelled" marker
        test = datasets.Dataset.from_dict({"image": [image] * 2, "label": test_labels})
        datasets.DatasetDict(train=train, test=test).save_to_disk(tmp_path / name)
    loaded = data.load_image_dataset(tmp_path / "good")
    assert loaded.classes == ("0", "1", "2") and loaded.train_images.shape == (3, 3, 4, 4)
    with pytest.raises(DataError, match=r"\[test\].*label -1 is outside 0..2"):
        data.load_image_dataset(tmp_path / "bad")


# ---------------------------------------------------------------- search split

def test_split_search_disjoint_covering_deterministic() -> None:
    weights, arch = data.split_search(50_000, seed=3)
    assert len(weights) == len(arch) == 25_000
    assert torch.equal(torch.cat([weights, arch]).sort().values, torch.arange(50_000))  # disjoint and covering
    again = data.split_search(50_000, seed=3)
    assert torch.equal(again[0], weights) and torch.equal(again[1], arch)
    assert not torch.equal(data.split_search(50_000, seed=4)[0], weights)
    small_w, small_a = data.split_search(10, seed=0, fraction=0.3)
    assert (len(small_w), len(small_a)) == (3, 7)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.01])
def test_split_search_rejects_empty_half(fraction: float) -> None:
    with pytest.raises(ConfigError):
        data.split_search(10, seed=0, fraction=fraction)


# ---------------------------------------------------------------- augmentation

def _random_images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)


def test_flip_without_padding_is_exact() -> None:
    images = _random_images(64)
    out = data.random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    same = (out == images).flatten(1).all(1)
    flipped = (out == torch.flip(images, dims=[3])).flatten(1).all(1)
    assert bool((same ^ flipped).all())  # every image exactly kept or exactly mirrored
    assert 0 < int(flipped.sum()) < 64


def test_crop_is_a_shifted_window_of_the_padded_input() -> None:
    images, padding = _random_images(48, seed=1), 4
    out = data.random_crop_flip(images, torch.Generator().manual_seed(5), padding=padding)
    padded = torch.nn.functional.pad(images, (padding,) * 4)  # (B, 3, 40, 40)
    offsets, flips = set(), set()
    for b in range(len(images)):
        unflipped = {False: out[b], True: torch.flip(out[b], dims=[2])}  # a flipped crop, flipped back
        matches = [(dy, dx, flip) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   for flip in (False, True) if torch.equal(unflipped[flip], padded[b, :, dy:dy + 32, dx:dx + 32])]
        assert len(matches) == 1, f"image {b} is not exactly one window of its padded input"
        offsets.add(matches[0][:2])
        flips.add(matches[0][2])
    assert len(offsets) > 10 and flips == {False, True}  # the offsets and flips really vary


def test_crop_flip_deterministic_per_generator_and_float() -> None:
    images = _random_images(16).float()
    first = data.random_crop_flip(images, torch.Generator().manual_seed(9))
    second = data.random_crop_flip(images, torch.Generator().manual_seed(9))
    assert first.dtype == torch.float32 and torch.equal(first, second)


def test_cutout_zeroes_exactly_a_clipped_square() -> None:
    images, size = torch.ones(200, 3, 32, 32), 16
    out = data.cutout(images, torch.Generator().manual_seed(0), size=size)
    zero = out == 0  # (B, 3, H, W)
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same hole in every channel
    assert torch.equal(out[~zero], images[~zero])  # nothing else changed
    full, clipped_low, clipped_high = 0, 0, 0
    for hole in zero[:, 0]:
        rows = hole.any(1).nonzero().flatten()
        cols = hole.any(0).nonzero().flatten()
        assert int(hole.sum()) == len(rows) * len(cols)  # a rectangle ...
        for span in (rows, cols):  # ... of contiguous rows/cols, shorter than `size` only at a border
            assert torch.equal(span, torch.arange(int(span[0]), int(span[0]) + len(span)))
            assert len(span) == size or int(span[0]) == 0 or int(span[-1]) == 31
        full += int(hole.sum()) == size * size
        clipped_low += len(rows) < size and int(rows[0]) == 0
        clipped_high += len(rows) < size and int(rows[-1]) == 31
    # Uniform centres: some squares lie inside the image, some are clipped at the top, some at the bottom.
    assert full > 0 and clipped_low > 0 and clipped_high > 0
    assert data.cutout(images, torch.Generator(), size=0) is images


def test_normalize_matches_closed_form() -> None:
    images = _random_images(4)
    mean = torch.tensor(data.CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean) / std
    out = data.normalize(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(DataError, match="uint8"):
        data.normalize(images.float())


# ---------------------------------------------------------------- batches

def _indexed_dataset(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is constant with value i (mod 256), label i: a batch shows which examples it holds."""
    labels = torch.arange(n)
    return (labels % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous(), labels


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_cover_each_example_once(drop_last: bool) -> None:
    images, labels = _indexed_dataset(103)
    seen = []
    for x, y in data.batches(images, labels, 10, torch.Generator().manual_seed(0), drop_last=drop_last,
                             augment=False):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and len(x) == len(y)
        torch.testing.assert_close(x, data.normalize(images[y]))  # images stay paired with their labels
        seen.append(y)
    assert [len(y) for y in seen] == [10] * 10 + ([] if drop_last else [3])
    all_seen = torch.cat(seen)
    assert len(set(all_seen.tolist())) == len(all_seen)  # nothing twice
    assert len(all_seen) == (100 if drop_last else 103)


def test_batches_shuffle_and_order() -> None:
    images, labels = _indexed_dataset(40)
    generator = torch.Generator().manual_seed(0)
    epoch1 = torch.cat([y for _, y in data.batches(images, labels, 8, generator)])
    epoch2 = torch.cat([y for _, y in data.batches(images, labels, 8, generator)])
    replay = torch.cat([y for _, y in data.batches(images, labels, 8, torch.Generator().manual_seed(0))])
    assert torch.equal(epoch1, replay) and not torch.equal(epoch1, epoch2)
    ordered = [y for _, y in data.batches(images, labels, 8, generator, shuffle=False, augment=False)]
    assert torch.equal(torch.cat(ordered), torch.arange(40))


def test_batches_augment_and_cutout() -> None:
    images, labels = _indexed_dataset(16)
    images = images + 1  # no zero pixels, so padding and the cutout hole are visible
    x, _ = next(data.batches(images, labels, 16, torch.Generator().manual_seed(2), cutout_size=8))
    black = data.normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))  # zero padding, normalized
    assert bool((x == black).any()) and bool((x == 0).any())


def test_batches_bad_arguments() -> None:
    images, labels = _indexed_dataset(5)
    with pytest.raises(ConfigError, match="batch_size=8"):
        next(data.batches(images, labels, 8, torch.Generator()))
    assert len(list(data.batches(images, labels, 8, torch.Generator(), drop_last=False))) == 1
    with pytest.raises(DataError, match="do not match"):
        next(data.batches(images, labels[:4], 2, torch.Generator()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_images_with_cpu_generator() -> None:
    images, labels = _indexed_dataset(64)
    images, labels = images.cuda(), labels.cuda()
    generator = torch.Generator().manual_seed(0)
    x, y = next(data.batches(images, labels, 32, generator, cutout_size=16))
    assert x.is_cuda and y.is_cuda and x.shape == (32, 3, 32, 32)
    cpu = data.random_crop_flip(_random_images(8), torch.Generator().manual_seed(1))
    gpu = data.random_crop_flip(_random_images(8).cuda(), torch.Generator().manual_seed(1))
    assert torch.equal(cpu, gpu.cpu())  # same draws, same result, whatever the device


# ---------------------------------------------------------------- real CIFAR-10

def _real_dir() -> Path:
    env = os.environ.get("DARTS_TEST_DATA")
    return Path(env) / "cifar10" if env else REPO_ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="module")
def real() -> data.ImageData:
    if data._find_layout(_real_dir()) is None:
        pytest.skip(f"no CIFAR-10 at {_real_dir()}")
    return data.load_cifar10(_real_dir(), hub_name=None)


@pytest.mark.real_data
def test_real_cifar10_counts(real: data.ImageData) -> None:
    assert real.train_images.shape == (50_000, 3, 32, 32) and real.test_images.shape == (10_000, 3, 32, 32)
    assert torch.equal(torch.bincount(real.train_labels, minlength=10), torch.full((10,), 5_000))
    assert torch.equal(torch.bincount(real.test_labels, minlength=10), torch.full((10,), 1_000))
    assert real.classes == CLASSES
    channel_means = data.normalize(real.train_images[:5000]).mean(dim=(0, 2, 3))
    assert channel_means.abs().max() < 0.1  # the published statistics fit this data


@pytest.mark.real_data
def test_real_cifar10_split(real: data.ImageData) -> None:
    weights, arch = data.split_search(len(real.train_labels), seed=0)
    assert len(weights) == len(arch) == 25_000
    assert not set(weights[:1000].tolist()) & set(arch.tolist())
