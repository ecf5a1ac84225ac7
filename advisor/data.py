"""Datasets: the paper's teacher-student (THEORY.md §7), scikit-learn's digits, CIFAR-10.

Every loader returns a :class:`Dataset` of flattened float inputs, regression targets
(one-hot rows for classification, for the MSE loss) and, for classification, class ids.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from advisor.errors import ConfigError, require

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_FILES = [*CIFAR_TRAIN, "test_batch", "batches.meta"]


@dataclass(frozen=True)
class Dataset:
    """Train and validation arrays; ``teacher`` holds frozen weights a student shares."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    labels_train: Tensor | None = None
    labels_val: Tensor | None = None
    teacher: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.y_train.shape[1]

    @property
    def is_classification(self) -> bool:
        return self.labels_train is not None


def teacher_student(
    seed: int,
    n_train: int = 4000,
    n_val: int = 1000,
    n_inputs: int = 3,
    width_in: int = 32,
    width_out: int = 16,
) -> Dataset:
    """The paper's teacher (THEORY.md §7), drawn fresh for each seed.

    ``s0 = tanh(M x)`` with ``M`` (L x 3) ~ N(0, 1/3), ``y = Z tanh(W* s0)`` with
    ``W*`` (K x L) ~ N(0, 1/L) and ``Z`` (1 x K) ~ N(0, 1/K); ``x ~ N(0, I)``,
    noiseless labels. ``M`` and ``Z`` are shared with the student. float64.
    """
    require(n_train > 0, "dataset.n_train", "a positive integer", n_train)
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    m = torch.randn(width_in, n_inputs, generator=g, dtype=dt) / n_inputs**0.5
    w_star = torch.randn(width_out, width_in, generator=g, dtype=dt) / width_in**0.5
    z = torch.randn(1, width_out, generator=g, dtype=dt) / width_out**0.5
    x = torch.randn(n_train + n_val, n_inputs, generator=g, dtype=dt)
    y = torch.tanh(torch.tanh(x @ m.T) @ w_star.T) @ z.T
    return Dataset(
        name="teacher_student",
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_val=x[n_train:],
        y_val=y[n_train:],
        teacher={"M": m, "W_star": w_star, "Z": z},
    )


def digits(n_train: int | None = None, val_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), a fixed train/validation split,
    inputs standardised with training statistics."""
    from sklearn.datasets import load_digits

    require(0.0 < val_fraction < 1.0, "dataset.val_fraction", "in (0, 1)", val_fraction)
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(split_seed).permutation(len(x))
    n_val = int(round(val_fraction * len(x)))
    val, train = order[:n_val], order[n_val:]
    return _classification("digits", x[train], labels[train], x[val], labels[val], 10, n_train)


def cifar(
    root: str | Path,
    download: bool = False,
    n_train: int | None = None,
    n_val: int | None = None,
) -> Dataset:
    """CIFAR-10 in its python format (``cifar-10-batches-py/``) read from ``root``;
    the test batch is the validation set. Inputs flattened to 3072, standardised."""
    folder = _cifar_folder(Path(root), download)
    meta = _unpickle(folder / "batches.meta")
    n_classes = len(meta.get(b"label_names", range(10)))
    xs, ys = zip(*(_cifar_batch(folder / name) for name in CIFAR_TRAIN))
    x_val, y_val = _cifar_batch(folder / "test_batch")
    if n_val is not None:
        require(n_val > 0, "dataset.n_val", "a positive integer", n_val)
        x_val, y_val = x_val[:n_val], y_val[:n_val]
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    return _classification("cifar", x_train, y_train, x_val, y_val, n_classes, n_train)


def _classification(
    name: str,
    x_train: np.ndarray,
    labels_train: np.ndarray,
    x_val: np.ndarray,
    labels_val: np.ndarray,
    n_classes: int,
    n_train: int | None,
) -> Dataset:
    if n_train is not None:
        require(0 < n_train <= len(x_train), "dataset.n_train", f"in 1..{len(x_train)}", n_train)
        x_train, labels_train = x_train[:n_train], labels_train[:n_train]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0

    def standardise(x: np.ndarray) -> Tensor:
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    def one_hot(labels: np.ndarray) -> Tensor:
        return torch.nn.functional.one_hot(torch.from_numpy(labels), n_classes).float()

    return Dataset(
        name=name,
        x_train=standardise(x_train),
        y_train=one_hot(labels_train),
        x_val=standardise(x_val),
        y_val=one_hot(labels_val),
        labels_train=torch.from_numpy(labels_train),
        labels_val=torch.from_numpy(labels_val),
    )


def _cifar_folder(root: Path, download: bool) -> Path:
    folder = root if root.name == CIFAR_FOLDER else root / CIFAR_FOLDER
    if not folder.is_dir():
        if download:
            _download_cifar(root)
        else:
            raise ConfigError(
                f"dataset.root: no CIFAR-10 folder at {folder} (expected {CIFAR_FOLDER}/ "
                f"with {', '.join(CIFAR_FILES)}); extract cifar-10-python.tar.gz under "
                "dataset.root or set dataset.download=true"
            )
    missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"dataset.root must hold a CIFAR-10 python folder: {folder} lacks {', '.join(missing)}"
        )
    return folder


def _download_cifar(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    try:
        urllib.request.urlretrieve(CIFAR_URL, archive)
    except OSError as err:
        raise ConfigError(
            f"dataset.download=true could not fetch {CIFAR_URL} ({err}); "
            f"place {CIFAR_FOLDER}/ under dataset.root={root} instead"
        ) from None
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != CIFAR_MD5:
        archive.unlink()
        raise ConfigError(f"dataset.download: {CIFAR_URL} has MD5 {digest}, expected {CIFAR_MD5}")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ConfigError(
            f"dataset.root must hold a CIFAR-10 python folder: {path} is not a CIFAR pickle ({err})"
        ) from None


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or b"labels" not in batch:
        raise ConfigError(
            f"dataset.root must hold a CIFAR-10 python folder: {path} has no data/labels"
        )
    x = np.asarray(batch[b"data"], dtype=np.float64).reshape(len(batch[b"labels"]), -1) / 255.0
    return x, np.asarray(batch[b"labels"], dtype=np.int64)
