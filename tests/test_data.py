import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from advisor import data
from advisor.errors import ConfigError
from conftest import write_cifar


def test_teacher_student_shapes_and_statistics():
    ds = data.teacher_student(seed=3)
    assert ds.x_train.shape == (4000, 3) and ds.y_train.shape == (4000, 1)
    assert ds.x_val.shape == (1000, 3) and ds.x_train.dtype == torch.float64
    assert ds.teacher["M"].shape == (32, 3)
    assert ds.teacher["W_star"].shape == (16, 32)
    assert ds.teacher["Z"].shape == (1, 16)
    # entries N(0, 1/3), N(0, 1/L): sample variances within a few standard errors
    assert ds.teacher["M"].var().item() == pytest.approx(1 / 3, rel=0.35)
    assert ds.teacher["W_star"].var().item() == pytest.approx(1 / 32, rel=0.2)
    assert ds.x_train.var().item() == pytest.approx(1.0, rel=0.05)
    assert ds.labels_train is None and not ds.is_classification


def test_teacher_student_labels_are_the_teachers_noiseless_outputs():
    ds = data.teacher_student(seed=1)
    m, w, z = ds.teacher["M"], ds.teacher["W_star"], ds.teacher["Z"]
    x = ds.x_val
    expected = torch.stack([z[0] @ torch.tanh(w @ torch.tanh(m @ xi)) for xi in x])
    torch.testing.assert_close(ds.y_val[:, 0], expected, rtol=1e-12, atol=1e-12)


def test_teacher_student_is_deterministic_per_seed_and_fresh_across_seeds():
    a, b, c = data.teacher_student(7), data.teacher_student(7), data.teacher_student(8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.teacher["W_star"], b.teacher["W_star"])
    assert not torch.equal(a.teacher["W_star"], c.teacher["W_star"])
    assert not torch.equal(a.x_train, c.x_train)


def test_digits_split_standardised_and_one_hot():
    ds = data.digits()
    assert ds.x_train.shape == (1438, 64) and ds.x_val.shape == (359, 64)
    assert ds.y_train.shape == (1438, 10) and torch.equal(ds.y_train.argmax(1), ds.labels_train)
    mean, std = ds.x_train.mean(0), ds.x_train.std(0, unbiased=False)
    assert mean.abs().max() < 1e-5
    # constant pixels keep std 0, every other feature has unit training variance
    assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-6))
    assert set(ds.labels_val.tolist()) == set(range(10))
    again = data.digits()
    assert torch.equal(ds.x_val, again.x_val)


def test_digits_subsample():
    ds = data.digits(n_train=100)
    assert ds.x_train.shape == (100, 64)
    with pytest.raises(ConfigError, match=r"dataset.n_train must be in 1..1438"):
        data.digits(n_train=5000)


def test_cifar_reads_the_python_layout(tmp_path):
    write_cifar(tmp_path, per_batch=8, n_test=10)
    ds = data.cifar(tmp_path)
    assert ds.x_train.shape == (40, 3072) and ds.x_val.shape == (10, 3072)
    assert ds.y_train.shape == (40, 10) and ds.labels_train.dtype == torch.int64
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert ds.labels_train[:8].tolist() == raw[b"labels"]
    # standardisation uses training statistics, per feature
    assert ds.x_train.mean(0).abs().max() < 1e-5
    sub = data.cifar(tmp_path / "cifar-10-batches-py", n_train=12, n_val=4)
    assert sub.x_train.shape == (12, 3072) and sub.x_val.shape == (4, 3072)


def test_cifar_missing_folder_names_path_and_fixes(tmp_path):
    with pytest.raises(ConfigError) as err:
        data.cifar(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "dataset.download=true" in msg and "dataset.root" in msg


def test_cifar_folder_missing_files_or_bad_pickle(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(ConfigError, match="lacks test_batch"):
        data.cifar(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="is not a CIFAR pickle"):
        data.cifar(tmp_path)


def test_cifar_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = tmp_path / "archive.tar.gz"
    archive.write_bytes(buf.getvalue())
    monkeypatch.setattr(data, "CIFAR_URL", archive.as_uri())
    monkeypatch.setattr(data, "CIFAR_MD5", "0" * 32)
    with pytest.raises(ConfigError, match="expected 0000"):
        data.cifar(tmp_path / "bad", download=True)
    assert not (tmp_path / "bad" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    ds = data.cifar(tmp_path / "dl", download=True)
    assert ds.x_train.shape == (40, 3072)
    np.testing.assert_array_equal(ds.labels_val.numpy(), data.cifar(src).labels_val.numpy())
