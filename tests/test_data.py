"""Data loaders: each reads small fixture files written here in the real format."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ttakit.data.fashion_mnist as fm
import ttakit.data.registry as registry
from ttakit.data import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    dataset_sha256,
    ensure_fashion_mnist,
    has_own_test_split,
    list_datasets,
    list_image_files,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_images,
    load_npz,
    load_split,
    make_splits,
    normalization_stats,
    register_dataset,
    train_val_split,
)
from ttakit.errors import DataError, DataNotFoundError, InvalidInputError, UnknownNameError

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding of a uint8 array: big-endian magic, dimensions, then the bytes."""
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    data = idx_bytes(array, magic)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def fashion_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def write_fashion_dir(folder: Path, gz_train: bool = True, gz_test: bool = False) -> dict:
    """Train split (20 images) and test split (10 images), gzipped or not as asked."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": fashion_arrays(20, 0), "test": fashion_arrays(10, 1)}
    for split, gz in (("train", gz_train), ("test", gz_test)):
        images_stem, labels_stem = fm.SPLIT_FILES[split]
        ext = ".gz" if gz else ""
        write_idx(folder / f"{images_stem}{ext}", arrays[split][0], 2051)
        write_idx(folder / f"{labels_stem}{ext}", arrays[split][1], 2049)
    return arrays


@pytest.fixture
def no_default_fashion_dirs(tmp_path, monkeypatch):
    """Hide the system folder, the env var and the user cache, so only the fixtures count."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-dir")
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fm.default_cache_dir() == tmp_path / "home" / ".cache" / "ttakit" / "fashion-mnist"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network must not be used here")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fixture batch",
        b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


CIFAR_NAMES = [
    b"plane",
    b"car",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


def write_cifar_dir(
    folder: Path, per_batch: int = 4, protocol: int = pickle.DEFAULT_PROTOCOL
) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batches[name] = cifar_batch(per_batch, seed=i)
        with open(folder / name, "wb") as handle:
            pickle.dump(batches[name], handle, protocol=protocol)
    meta = {b"label_names": CIFAR_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=protocol)
    return batches


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def gray(value: int, size=(8, 8)) -> np.ndarray:
    return np.full(size, value, dtype=np.uint8)


def rgb(color, size=(8, 8)) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (*size, 3)).copy()


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_reads_gzipped_and_raw_idx(tmp_path, no_network):
    arrays = write_fashion_dir(tmp_path, gz_train=True, gz_test=False)
    for split, n in (("train", 20), ("test", 10)):
        ds = load_fashion_mnist(split, data_dir=tmp_path)
        images, labels = arrays[split]
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images.astype(np.float32) / 255))
        assert ds.labels.dtype == torch.int64
        assert ds.labels.tolist() == labels.tolist()
        assert ds.classes == list(FASHION_MNIST_CLASSES) and ds.classes[9] == "Ankle boot"
        assert ds.name == f"fashion-mnist/{split}"


def test_fashion_mnist_returns_fresh_tensors(tmp_path, no_network):
    write_fashion_dir(tmp_path)
    first = load_fashion_mnist("train", tmp_path)
    expected = first.images.clone()
    first.images.zero_()
    first.labels.fill_(3)
    second = load_fashion_mnist("train", tmp_path)
    assert torch.equal(second.images, expected)
    assert second.labels.tolist() == (np.arange(20) % 10).tolist()


def test_fashion_mnist_rereads_a_rewritten_file(tmp_path, no_network):
    write_fashion_dir(tmp_path, gz_test=False)
    assert load_fashion_mnist("test", tmp_path).labels[0] == 0
    labels_path = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(labels_path, np.full(10, 7, np.uint8), 2049)
    os.utime(labels_path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert load_fashion_mnist("test", tmp_path).labels.tolist() == [7] * 10


def test_fashion_mnist_truncated_file(tmp_path, no_network):
    write_fashion_dir(tmp_path, gz_test=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as info:
        load_fashion_mnist("test", tmp_path)
    assert str(path) in str(info.value) and "7856" in str(info.value)  # 16 + 10*28*28 bytes


def test_fashion_mnist_truncated_gzip(tmp_path, no_network):
    write_fashion_dir(tmp_path, gz_train=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="gzip") as info:
        load_fashion_mnist("train", tmp_path)
    assert str(path) in str(info.value)


def test_fashion_mnist_wrong_magic(tmp_path, no_network):
    write_fashion_dir(tmp_path, gz_test=False)
    # a labels file where the images file should be
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros(10, np.uint8), 2049)
    with pytest.raises(DataError, match=r"magic number 2049, expected 2051"):
        load_fashion_mnist("test", tmp_path)


def test_fashion_mnist_count_mismatch(tmp_path, no_network):
    write_fashion_dir(tmp_path, gz_test=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8), 2049)
    with pytest.raises(DataError, match="10 images but .* 9 labels"):
        load_fashion_mnist("test", tmp_path)


def test_fashion_mnist_label_out_of_range(tmp_path, no_network):
    write_fashion_dir(tmp_path, gz_test=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 12, np.uint8), 2049)
    with pytest.raises(DataError, match="label 12"):
        load_fashion_mnist("test", tmp_path)


def test_fashion_mnist_missing_folder_says_how_to_fix(tmp_path, no_network):
    with pytest.raises(DataNotFoundError) as info:
        load_fashion_mnist("test", data_dir=tmp_path / "empty")
    message = str(info.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "train-images-idx3-ubyte.gz" in message
    assert isinstance(info.value, FileNotFoundError)


def test_fashion_mnist_bad_split(tmp_path):
    with pytest.raises(InvalidInputError, match="'validation'"):
        load_fashion_mnist("validation", tmp_path)  # type: ignore[arg-type]


def test_fashion_mnist_search_order_uses_env_var(
    tmp_path, monkeypatch, no_default_fashion_dirs, no_network
):
    with pytest.raises(DataNotFoundError):
        ensure_fashion_mnist(download=False)
    write_fashion_dir(tmp_path / "cache-like" / "fm")
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "cache-like" / "fm"))
    assert ensure_fashion_mnist(download=False) == tmp_path / "cache-like" / "fm"
    assert len(load_fashion_mnist("test")) == 10
    # the user cache is the last fallback
    monkeypatch.delenv(fm.ENV_VAR)
    write_fashion_dir(fm.default_cache_dir())
    assert ensure_fashion_mnist(download=False) == fm.default_cache_dir()


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _trust_files(monkeypatch, folder: Path) -> None:
    """Make ``folder``'s .gz files the "official" ones for the download checks."""
    import hashlib

    files = {p.name: p.read_bytes() for p in folder.glob("*.gz")}
    monkeypatch.setattr(fm, "OFFICIAL_SHA256", {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    monkeypatch.setattr(fm, "OFFICIAL_MD5", {n: hashlib.md5(b).hexdigest() for n, b in files.items()})


def test_official_checksums_are_the_published_ones():
    # MD5 as published in the zalandoresearch/fashion-mnist README; SHA-256 of the same files
    assert fm.OFFICIAL_MD5["train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert fm.OFFICIAL_MD5["t10k-labels-idx1-ubyte.gz"] == "bb300cfdad3c16e7a12a480ee83cd310"
    assert sorted(fm.OFFICIAL_SHA256) == sorted(fm.OFFICIAL_MD5) == sorted(f"{s}.gz" for s in fm.ALL_FILES)
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in fm.OFFICIAL_SHA256.values())


def test_a_download_with_the_wrong_sha256_is_refused(tmp_path, monkeypatch, no_default_fashion_dirs):
    source = tmp_path / "server"
    write_fashion_dir(source, gz_train=True, gz_test=True)
    _trust_files(monkeypatch, source)
    # the server now sends a well-formed IDX file with other images: only the hash can tell
    other = fashion_arrays(10, 99)[0]
    write_idx(source / "t10k-images-idx3-ubyte.gz", other, 2051)
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: _FakeResponse((source / url.rsplit("/", 1)[1]).read_bytes())
    )
    with pytest.raises(DataNotFoundError) as info:
        ensure_fashion_mnist(tmp_path / "target")
    message = str(info.value)
    assert "is not the official t10k-images-idx3-ubyte.gz: SHA-256" in message
    assert fm.OFFICIAL_SHA256["t10k-images-idx3-ubyte.gz"] in message and "\n" not in message
    assert not (tmp_path / "target" / "t10k-images-idx3-ubyte.gz").exists()
    # the real files' hashes are checked too (no stand-in): a fake payload never matches them
    monkeypatch.undo()
    with pytest.raises(DataError, match="not the official train-labels-idx1-ubyte.gz"):
        fm.verify_download("train-labels-idx1-ubyte.gz", b"fake", "http://example/x")


def test_ensure_fashion_mnist_downloads_atomically(tmp_path, monkeypatch, no_default_fashion_dirs):
    source = tmp_path / "server"
    arrays = write_fashion_dir(source, gz_train=True, gz_test=True)
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        assert timeout <= 30
        return _FakeResponse((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    _trust_files(monkeypatch, source)
    folder = ensure_fashion_mnist()
    assert folder == fm.default_cache_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.gz" for s in fm.ALL_FILES)
    assert all(
        url.startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
        for url in requested
    )
    assert len(requested) == 4
    ds = load_fashion_mnist("test")
    assert ds.labels.tolist() == arrays["test"][1].tolist()
    # already there: no second download
    ensure_fashion_mnist()
    assert len(requested) == 4


def test_ensure_fashion_mnist_download_failure(tmp_path, monkeypatch, no_default_fashion_dirs):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError) as info:
        ensure_fashion_mnist(tmp_path / "target")
    message = str(info.value)
    assert "download failed: Name or service not known" in message
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message
    assert not any((tmp_path / "target").glob("*.gz"))


def test_ensure_fashion_mnist_rejects_a_bad_payload(tmp_path, monkeypatch, no_default_fashion_dirs):
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"<html>moved</html>")
    )
    with pytest.raises(DataNotFoundError, match="is not the official train-images-idx3-ubyte.gz: SHA-256"):
        ensure_fashion_mnist(tmp_path / "target")
    assert not any((tmp_path / "target").glob("*.gz"))
    # a payload that passes the hash (a stand-in "official" file) is still parsed before saving
    import hashlib

    for table, algo in (("OFFICIAL_SHA256", hashlib.sha256), ("OFFICIAL_MD5", hashlib.md5)):
        monkeypatch.setattr(fm, table, {n: algo(b"<html>moved</html>").hexdigest() for n in fm.OFFICIAL_MD5})
    with pytest.raises(DataNotFoundError, match="not a valid gzip"):
        ensure_fashion_mnist(tmp_path / "target")
    assert not any((tmp_path / "target").glob("*.gz"))


@pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist to run this test",
)
def test_real_fashion_mnist_test_split(no_network):
    ds = load_fashion_mnist("test", data_dir=REAL_FASHION_MNIST)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    assert ds.labels.bincount().tolist() == [1000] * 10  # the test split is balanced
    assert ds.labels[:3].tolist() == [9, 2, 1]  # ankle boot, pullover, trouser
    assert 0.27 < float(ds.images.mean()) < 0.30  # the well-known mean pixel ~0.286


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar10_train_and_test(tmp_path, protocol):
    batches = write_cifar_dir(tmp_path, per_batch=4, protocol=protocol)
    train = load_cifar10(tmp_path, "train")
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.float32
    expected_labels = sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels
    assert train.classes == [n.decode() for n in CIFAR_NAMES]
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32
    row = batches["data_batch_2"][b"data"][1]  # the 6th image overall
    assert float(train.images[5, 1, 3, 7]) == pytest.approx(row[1024 + 3 * 32 + 7] / 255)
    assert float(train.images[5, 2, 31, 0]) == pytest.approx(row[2048 + 31 * 32] / 255)
    test = load_cifar10(tmp_path, "test")
    assert len(test) == 4 and test.name == "cifar10/test"
    assert test.labels.tolist() == batches["test_batch"][b"labels"]


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), as the real CIFAR-10 batches are."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def test_cifar10_python2_numpy1_pickles_and_parent_folder(tmp_path):
    """Like the real files: Python 2 strings (loaded as bytes, even the dtype code 'u1') and
    NumPy 1's numpy.core.multiarray._reconstruct; data_dir may be the parent folder."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    files = {
        "test_batch": {
            "batch_label": "testing batch 1 of 1",
            "labels": [4, 0, 9],
            "data": data,
            "filenames": ["a.png", "b.png", "c.png"],
        },
        "batches.meta": {"label_names": [n.decode() for n in CIFAR_NAMES], "num_vis": 3072},
    }
    for name, obj in files.items():
        buffer = io.BytesIO()
        _Python2Pickler(buffer, protocol=2).dump(obj)
        raw = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
    raw = (folder / "test_batch").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"U\x04data" in raw
    ds = load_cifar10(tmp_path, "test")
    assert ds.labels.tolist() == [4, 0, 9] and ds.classes[1] == "car"
    expected = data.reshape(3, 3, 32, 32).astype(np.float32) / 255
    assert torch.equal(ds.images, torch.from_numpy(expected))


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_malicious_pickle(tmp_path):
    write_cifar_dir(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(marker), b"labels": [0]})
    assert b"system" in payload
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(DataError, match=r"refusing to load (posix|os)\.system") as info:
        load_cifar10(tmp_path, "test")
    assert str(tmp_path / "test_batch") in str(info.value)
    assert not marker.exists()


def test_cifar10_refuses_other_globals(tmp_path):
    write_cifar_dir(tmp_path)
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [Path("x")]}))
    with pytest.raises(DataError, match="pathlib"):
        load_cifar10(tmp_path, "test")


def test_cifar10_wrong_folder_lists_expected_files(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(tmp_path, "train")
    message = str(info.value)
    assert "data_batch_2, data_batch_3, data_batch_4, data_batch_5" in message
    assert "batches.meta" in message and "test_batch" not in message.split("lacks")[1].split(";")[0]
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere", "test")


def test_cifar10_corrupt_files(tmp_path):
    write_cifar_dir(tmp_path)
    good = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="not a readable CIFAR-10 pickle"):
        load_cifar10(tmp_path, "test")
    bad = cifar_batch(2, 0)
    bad[b"data"] = bad[b"data"][:, :100]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(
        DataError, match=r"\(N, 3072\) uint8 array, found uint8 array of shape \(2, 100\)"
    ):
        load_cifar10(tmp_path, "test")
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": [1]}))
    with pytest.raises(DataError, match="no 'data' entry"):
        load_cifar10(tmp_path, "test")


# --------------------------------------------------------------------------- image folders


def test_image_folder_grayscale_png_and_jpeg(tmp_path):
    save_png(tmp_path / "shoe" / "a.png", gray(200))
    save_png(tmp_path / "shoe" / "b.png", gray(10))
    save_png(tmp_path / "bag" / "c.png", gray(128))
    Image.fromarray(gray(60)).save(tmp_path / "bag" / "d.jpg", quality=95)
    (tmp_path / "bag" / "notes.txt").write_text("not an image")
    (tmp_path / "bag" / ".hidden.png").write_bytes(b"junk")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["bag", "shoe"]
    assert ds.images.shape == (4, 1, 8, 8) and ds.skipped == []
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert float(ds.images[0].mean()) == pytest.approx(128 / 255)
    assert abs(float(ds.images[1].mean()) - 60 / 255) < 2 / 255  # JPEG, lossy
    assert torch.all(ds.images[2] == 200 / 255) and torch.all(ds.images[3] == 10 / 255)


def test_image_folder_colour_channels_and_resizing(tmp_path):
    save_png(tmp_path / "red" / "a.png", rgb((255, 0, 0)))
    save_png(tmp_path / "red" / "b.png", rgb((255, 0, 0), size=(16, 16)))
    save_png(tmp_path / "gray" / "c.png", gray(100))
    ds = load_image_folder(tmp_path)  # one RGB image makes the set RGB; 8x8 is the common size
    assert ds.images.shape == (3, 3, 8, 8)
    assert ds.images[0].mean(dim=(1, 2)).tolist() == pytest.approx([100 / 255] * 3)
    assert ds.images[2].mean(dim=(1, 2)).tolist() == pytest.approx([1.0, 0.0, 0.0])  # resized 16->8
    as_gray = load_image_folder(tmp_path, image_size=4, channels=1)
    assert as_gray.images.shape == (3, 1, 4, 4)
    assert float(as_gray.images[1, 0, 0, 0]) == pytest.approx(76 / 255)  # ITU-R 601 luma of red
    wide = load_image_folder(tmp_path, image_size=(4, 6), classes=["red"])
    assert wide.images.shape == (2, 3, 4, 6) and wide.classes == ["red"]
    assert wide.labels.tolist() == [0, 0]


def test_image_folder_skips_and_lists_corrupt_files(tmp_path):
    save_png(tmp_path / "a" / "ok.png", gray(50))
    save_png(tmp_path / "b" / "ok.png", gray(150))
    (tmp_path / "b" / "garbage.png").write_bytes(b"definitely not a png")
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(
        full, "PNG"
    )
    (tmp_path / "b" / "truncated.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\).*garbage\.png"):
        ds = load_image_folder(tmp_path)
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1]
    assert len(ds.skipped) == 2
    assert ds.skipped[0].startswith(f"{tmp_path / 'b' / 'garbage.png'}: ")
    assert ds.skipped[1].startswith(f"{tmp_path / 'b' / 'truncated.png'}: ")


def test_image_folder_errors(tmp_path):
    save_png(tmp_path / "full" / "a.png", gray(1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'empty'} holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "empty" / "bad.png").write_bytes(b"xx")
    with (
        pytest.warns(UserWarning),
        pytest.raises(DataError, match="holds no readable images; skipped: .*bad.png"),
    ):
        load_image_folder(tmp_path)
    with pytest.raises(DataNotFoundError, match="no class folder.*missing"):
        load_image_folder(tmp_path, classes=["full", "missing"])
    flat = tmp_path / "flat"
    save_png(flat / "x.png", gray(1))
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_image_folder(flat)
    with pytest.raises(DataNotFoundError):
        load_image_folder(tmp_path / "nowhere")
    with pytest.raises(InvalidInputError, match="channels must be 1 .* got 4"):
        load_image_folder(tmp_path, channels=4, classes=["full"])
    with pytest.raises(InvalidInputError, match=r"image_size must be .* got \(4, 0\)"):
        load_image_folder(tmp_path, image_size=(4, 0), classes=["full"])


def test_load_images_plain_folder(tmp_path):
    save_png(tmp_path / "b.png", gray(20))
    Image.fromarray(gray(40)).save(tmp_path / "a.bmp")
    Image.fromarray(rgb((0, 0, 255))).save(tmp_path / "c.webp", lossless=True)
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "sub").mkdir()
    files = list_image_files(tmp_path)
    assert [p.name for p in files] == ["a.bmp", "b.png", "c.webp"]
    images, loaded, skipped = load_images(files, image_size=(2, 3))
    assert images.shape == (3, 3, 2, 3) and loaded == files and skipped == []
    assert images[0].unique().tolist() == pytest.approx([40 / 255])
    assert images[2].mean(dim=(1, 2)).tolist() == pytest.approx([0.0, 0.0, 1.0])
    with pytest.raises(DataError, match="no readable images"):
        load_images([])
    with (
        pytest.warns(UserWarning, match="missing.png"),
        pytest.raises(DataError, match="no readable"),
    ):
        load_images([tmp_path / "missing.png"])


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize(
    "layout, shape",
    [("NHW", (5, 6, 7)), ("NHWC", (5, 6, 7, 3)), ("NCHW", (5, 3, 6, 7)), ("NHWC1", (5, 6, 7, 1))],
)
def test_npz_layouts(tmp_path, layout, shape):
    x = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_npz(tmp_path / "d.npz")
    channels = 1 if layout in ("NHW", "NHWC1") else 3
    assert ds.images.shape == (5, channels, 6, 7)
    nchw = x[:, None] if layout == "NHW" else x if layout == "NCHW" else x.transpose(0, 3, 1, 2)
    assert torch.equal(ds.images, torch.from_numpy(nchw.astype(np.float32) / 255))
    assert ds.labels.tolist() == [0, 1, 2, 1, 0] and ds.classes == ["0", "1", "2"]


def test_npz_float_and_class_names(tmp_path):
    x = np.linspace(0, 1, 4 * 2 * 2, dtype=np.float64).reshape(4, 2, 2)
    np.savez(
        tmp_path / "f.npz",
        x=x,
        y=np.array([1, 0, 1, 1], np.int32),
        classes=np.array(["cat", "dog"]),
    )
    ds = load_npz(tmp_path / "f.npz")
    assert ds.classes == ["cat", "dog"] and ds.images.dtype == torch.float32
    assert torch.allclose(ds.images[:, 0], torch.from_numpy(x).float())
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [1, 0, 1, 1]


def test_npz_errors(tmp_path):
    x = np.zeros((3, 4, 4), np.uint8)
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(DataError, match="lacks the array\\(s\\) 'y'.*found: x"):
        load_npz(tmp_path / "noy.npz")
    np.savez(tmp_path / "range.npz", x=np.full((3, 4, 4), 2.5), y=np.zeros(3, int))
    with pytest.raises(
        DataError, match=r"must already lie in \[0, 1\], found values in \[2.5, 2.5\]"
    ):
        load_npz(tmp_path / "range.npz")
    np.savez(tmp_path / "shape.npz", x=np.zeros((3, 16), np.uint8), y=np.zeros(3, int))
    with pytest.raises(DataError, match=r"'x' must have shape .* found shape \(3, 16\)"):
        load_npz(tmp_path / "shape.npz")
    np.savez(tmp_path / "count.npz", x=x, y=np.zeros(2, int))
    with pytest.raises(DataError, match="3 images but 'y' holds 2 labels"):
        load_npz(tmp_path / "count.npz")
    np.savez(tmp_path / "names.npz", x=x, y=np.array([0, 1, 2]), classes=np.array(["a", "b"]))
    with pytest.raises(DataError, match="label 2 but 'classes' names only 2"):
        load_npz(tmp_path / "names.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DataError, match="cannot read the arrays"):
        load_npz(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(DataNotFoundError):
        load_npz(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- registry


def build_fashion_mnist(root: Path) -> Path:
    write_fashion_dir(root / "fm", gz_train=True, gz_test=True)
    return root / "fm"


def build_cifar10(root: Path) -> Path:
    write_cifar_dir(root / "cifar", per_batch=2)
    return root / "cifar"


# every registered data set must have a fixture builder here: a new entry is tested by default
BUILDERS = {"fashion-mnist": build_fashion_mnist, "cifar10": build_cifar10}


@pytest.mark.parametrize("name", list_datasets())
def test_every_registered_dataset_loads(tmp_path, name, no_network):
    assert name in BUILDERS, f"add a fixture builder for the new data set {name!r}"
    data_dir = BUILDERS[name](tmp_path)
    for split in ("train", "test"):
        ds = load_dataset(name, split=split, data_dir=data_dir)
        assert isinstance(ds, ImageDataset) and len(ds) > 0
        assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    resized = load_dataset(name.upper(), split="test", data_dir=data_dir, image_size=12)
    assert resized.image_size == (12, 12)


def test_load_dataset_paths(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((2, 4, 4), 255, np.uint8), y=np.array([0, 1]))
    ds = load_dataset(str(tmp_path / "d.npz"), image_size=(8, 6))
    assert ds.images.shape == (2, 1, 8, 6) and torch.allclose(ds.images, torch.ones(1))
    for split, value in (("train", 30), ("test", 90)):
        save_png(tmp_path / "split" / split / "a" / "x.png", gray(value))
        save_png(tmp_path / "split" / split / "b" / "y.png", gray(value))
    test = load_dataset(tmp_path / "split", split="test")
    assert test.classes == ["a", "b"] and torch.allclose(test.images, torch.tensor(90 / 255))
    whole = load_dataset(tmp_path / "split" / "train", split="test")  # no split folders: used whole
    assert torch.allclose(whole.images, torch.tensor(30 / 255))
    with pytest.raises(DataNotFoundError, match="no val/"):
        load_dataset(tmp_path / "split", split="val")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_load_dataset_unknown_name():
    with pytest.raises(UnknownNameError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert "'mnist'" in message and "cifar10, fashion-mnist" in message
    assert ".npz" in message and "folder" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_cifar10_needs_data_dir():
    with pytest.raises(DataNotFoundError, match="cifar10 data set needs data_dir"):
        load_dataset("cifar10", split="test")


def test_register_dataset(monkeypatch):
    monkeypatch.setattr(registry, "_DATASETS", dict(registry._DATASETS))

    @register_dataset("Tiny_Set")
    def tiny(split, data_dir):
        return ImageDataset(
            torch.full((2, 1, 3, 3), 0.5), torch.tensor([0, 1]), ["a", "b"], name=split
        )

    assert "tiny-set" in list_datasets()
    assert load_dataset("tiny-set", split="test").name == "test"
    with pytest.raises(InvalidInputError, match="already registered"):
        register_dataset("tiny_set")(lambda split, data_dir: None)


# --------------------------------------------------------------------------- splits and stats


def tagged_dataset(per_class: int = 20, num_classes: int = 10) -> ImageDataset:
    """Row ``i`` is a constant image of value ``i``: rows can be traced through a split."""
    n = per_class * num_classes
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    labels = torch.arange(n) % num_classes
    return ImageDataset(images, labels, [str(c) for c in range(num_classes)], name="tagged")


def test_train_val_split_disjoint_stratified_reproducible():
    ds = tagged_dataset()
    train, val = train_val_split(ds, val_fraction=0.25, seed=3)
    train_ids = set(train.images[:, 0, 0, 0].long().tolist())
    val_ids = set(val.images[:, 0, 0, 0].long().tolist())
    assert train_ids.isdisjoint(val_ids) and train_ids | val_ids == set(range(200))
    assert len(val) == 50 and val.labels.bincount().tolist() == [5] * 10  # 25% of 20 per class
    assert train.labels.bincount().tolist() == [15] * 10
    for part in (train, val):  # labels still match their rows
        assert torch.equal(part.labels, part.images[:, 0, 0, 0].long() % 10)
    again = train_val_split(ds, val_fraction=0.25, seed=3)[1]
    other = train_val_split(ds, val_fraction=0.25, seed=4)[1]
    assert torch.equal(again.images, val.images)
    assert not torch.equal(other.images, val.images)
    assert train.name == "tagged[train]" and val.name == "tagged[val]"
    with pytest.raises(InvalidInputError, match="val_fraction"):
        train_val_split(ds, val_fraction=1.5)


def test_normalization_stats_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.random((6, 3, 5, 4)).astype(np.float32)
    images[:, 2] = 0.25  # a constant channel: std is clamped, never 0
    mean, std = normalization_stats(torch.from_numpy(images))
    per_channel = images.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    assert mean == pytest.approx(per_channel.mean(axis=1).tolist(), abs=1e-6)
    assert std[:2] == pytest.approx(per_channel[:2].std(axis=1, ddof=1).tolist(), abs=1e-6)
    assert mean[2] == pytest.approx(0.25) and std[2] == pytest.approx(1e-6)
    with pytest.raises(InvalidInputError, match=r"\(N, C, H, W\)"):
        normalization_stats(torch.zeros(3, 4, 4))


# --------------------------------------------------------------------------- held-out splits


def _distinct_npz(path: Path, n: int = 90, classes: int = 3) -> Path:
    rng = np.random.default_rng(4)
    np.savez(path, x=rng.integers(0, 256, size=(n, 6, 6), dtype=np.uint8), y=np.arange(n) % classes)
    return path


def _rows(ds: ImageDataset) -> set[bytes]:
    return {img.numpy().tobytes() for img in ds.images}


def test_make_splits_carves_a_recorded_stratified_test_split(tmp_path):
    data = _distinct_npz(tmp_path / "d.npz")
    splits = make_splits(str(data), val_fraction=0.2, test_fraction=0.2, seed=3)
    recipe = splits.recipe
    assert recipe["test_source"] == "carved" and recipe["n_images"] == 90
    assert recipe["sha256"] == dataset_sha256(load_npz(data))
    assert len(recipe["test_index"]) == 18 and torch.bincount(splits.test.labels).tolist() == [6, 6, 6]
    assert len(splits.val) == 15 and len(splits.train) == 57  # 20% of the 72 left, per class
    parts = [_rows(splits.train), _rows(splits.val), _rows(splits.test)]
    assert sum(map(len, parts)) == 90 and len(set.union(*parts)) == 90  # disjoint, complete
    # the recipe rebuilds each split exactly, and the same seed draws the same split
    for split, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        assert torch.equal(load_split(recipe, split).images, ds.images)
    assert make_splits(str(data), val_fraction=0.2, test_fraction=0.2, seed=3).recipe == recipe
    assert make_splits(str(data), val_fraction=0.2, test_fraction=0.2, seed=4).recipe["test_index"] != recipe["test_index"]


def test_make_splits_keeps_a_data_sets_own_test_split(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "imgs" / split / name).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((4, 4), 40 * i + (split == "test") * 7, np.uint8)).save(
                    tmp_path / "imgs" / split / name / f"{i}.png"
                )
    assert has_own_test_split(tmp_path / "imgs") and has_own_test_split("fashion-mnist")
    assert not has_own_test_split(tmp_path / "imgs" / "train")
    splits = make_splits(str(tmp_path / "imgs"), val_fraction=0.5)
    assert splits.test is None and splits.recipe["test_source"] == "own" and "test_index" not in splits.recipe
    test = load_split(splits.recipe, "test")
    assert len(test) == 12 and test.files == [f"{c}/{i}.png" for c in "ab" for i in range(6)]
    assert len(splits.train) == 6 and len(load_split(splits.recipe, "val")) == 6


def test_folder_splits_record_the_held_out_files(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((4, 4), 10 * i + (name == "dog"), np.uint8)).save(tmp_path / "pets" / name / f"{i}.png")
    splits = make_splits(str(tmp_path / "pets"), val_fraction=0.0, test_fraction=0.3)
    files = splits.recipe["test_files"]
    assert len(files) == 6 and sorted(f.split("/")[0] for f in files) == ["cat"] * 3 + ["dog"] * 3
    assert splits.test.files == files and not set(files) & set(splits.train.files)
    # renaming held-out files changes nothing in the pixels but is caught
    first = tmp_path / "pets" / files[0]
    first.rename(first.with_name("renamed.png"))
    with pytest.raises(DataError):
        load_split(splits.recipe, "test")


def test_split_arguments_are_checked(tmp_path):
    data = _distinct_npz(tmp_path / "d.npz")
    with pytest.raises(InvalidInputError, match=r"test_fraction \(--test-fraction\) must lie strictly between 0 and 1, got 1.5"):
        make_splits(str(data), test_fraction=1.5)
    with pytest.raises(InvalidInputError, match=r"val_fraction \(--val-fraction\) must lie in \[0, 1\)"):
        make_splits(str(data), val_fraction=-0.1)
    with pytest.raises(InvalidInputError, match="split must be one of train, val, test, got 'bogus'"):
        load_split({"spec": str(data)}, "bogus")
    with pytest.raises(DataError, match="leaves an empty split"):
        make_splits(str(_distinct_npz(tmp_path / "tiny.npz", n=3)), test_fraction=0.1)


def test_dataset_sha256_sees_every_change():
    base = ImageDataset(torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1]), ["a", "b"])
    digest = dataset_sha256(base)
    assert dataset_sha256(ImageDataset(base.images.clone(), base.labels.clone(), ["a", "b"])) == digest
    pixel = base.images.clone()
    pixel[2, 0, 1, 1] += 1e-6
    changed = [
        ImageDataset(pixel, base.labels, ["a", "b"]),
        ImageDataset(base.images, torch.tensor([0, 1, 1, 1]), ["a", "b"]),
        ImageDataset(base.images, base.labels, ["b", "a"]),
        base.subset([1, 0, 2, 3]),
    ]
    assert len({digest, *(dataset_sha256(d) for d in changed)}) == 5


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("val_fraction", "x", "'val_fraction' must be a number in [0, 1), got 'x'"),
        ("test_fraction", 2, "'test_fraction' must be null or a number strictly between 0 and 1, got 2"),
        ("split_seed", -1, "'split_seed' must be a non-negative integer, got -1"),
        ("test_source", "mine", "'test_source' must be 'own' or 'carved', got 'mine'"),
        ("spec", 5, "'spec' must be a string or null, got 5"),
        ("test_index", [0, 0], "'test_index' must list distinct row indices below 90"),
        ("test_index", "all", "'test_index' must list distinct row indices below 90"),
        ("test_files", [1], "'test_files' must be a list of file names, got [1]"),
    ],
)
def test_a_malformed_recipe_is_one_data_error(tmp_path, field, value, fragment):
    recipe = make_splits(str(_distinct_npz(tmp_path / "d.npz"))).recipe
    recipe[field] = value
    with pytest.raises(DataError) as info:
        load_split(recipe, "test")
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist to run this test",
)
def test_fashion_mnist_keeps_its_test_split_and_the_same_validation_split(no_network):
    splits = make_splits("fashion-mnist", REAL_FASHION_MNIST, val_fraction=0.1)
    assert splits.test is None and splits.recipe["test_source"] == "own"
    assert "test_index" not in splits.recipe and splits.recipe["n_images"] == 60_000
    assert len(splits.train) == 54_000 and len(splits.val) == 6_000
    # the validation split checkpoints trained before recorded splits used: unchanged
    _, old_val = train_val_split(load_fashion_mnist("train", REAL_FASHION_MNIST), 0.1, seed=0)
    assert torch.equal(splits.val.labels, old_val.labels) and torch.equal(splits.val.images, old_val.images)
    assert len(load_split(splits.recipe, "test")) == 10_000


def test_npz_and_file_list_with_a_test_split_of_their_own(tmp_path):
    """The cleaned copies ``audit --write-clean`` writes keep a test split of their own."""
    x, y = np.arange(6, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8), np.array([0, 1, 0, 1, 0, 1])
    np.savez(tmp_path / "own.npz", x=x[:4], y=y[:4], x_test=x[4:], y_test=y[4:])
    assert has_own_test_split(str(tmp_path / "own.npz"))
    assert load_dataset(tmp_path / "own.npz", split="test").labels.tolist() == [0, 1]
    assert len(load_dataset(tmp_path / "own.npz", split="train")) == 4
    np.savez(tmp_path / "half.npz", x=x, y=y, x_test=x[4:])
    with pytest.raises(DataError, match="y_test"):
        load_dataset(tmp_path / "half.npz")
    lines = []
    for i in range(4):
        Image.fromarray(x[i]).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png\t{'ab'[y[i]]}" + ("\ttest" if i >= 2 else ""))
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    assert has_own_test_split(str(tmp_path / "list.txt"))
    test = load_dataset(tmp_path / "list.txt", split="test")
    assert [Path(f).name for f in test.files] == ["2.png", "3.png"] and test.classes == ["a", "b"]
    assert [Path(f).name for f in load_dataset(tmp_path / "list.txt").files] == ["0.png", "1.png"]
