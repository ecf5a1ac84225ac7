"""Shared fixtures: a miniature CIFAR-10 folder in the real pickle layout, a CLI runner."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def write_cifar(root: Path, per_batch: int = 8, n_test: int = 10, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with 5 training batches, a test batch and the meta file."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int) -> dict:
        return {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, size=n).tolist(),
            b"batch_label": b"miniature",
        }

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return folder


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_cifar(tmp_path / "cifar")
    return tmp_path / "cifar"


def run_cli(module: str, *overrides: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <overrides>`` as a user would, outputs under ``cwd``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
