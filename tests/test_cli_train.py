"""`python -m advisor.tune` as a user runs it: config printing, help, bad input."""

import pytest

from conftest import run_cli


def test_cfg_job_prints_the_composed_config(tmp_path):
    res = run_cli("advisor.tune", "--cfg", "job", "model=mlp", "dataset=cifar", "dataset.root=/x", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "name: cifar" in res.stdout and "root: /x" in res.stdout and "activation: tanh" in res.stdout


def test_help_lists_the_groups(tmp_path):
    res = run_cli("advisor.tune", "--help", cwd=tmp_path)
    assert "dataset: cifar, digits, teacher_student" in res.stdout
    assert "model: mlp, teacher_student" in res.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr=-0.1"], "error: train.lr must be > 0 (got -0.1)"),
        (["train.batch_size=0"], "error: train.batch_size must be a positive integer (got 0)"),
        (["dataset.n_train=100", "train.batch_size=101"], "error: train.batch_size must be in 1..100 (the training set size) (got 101)"),
        (["dataset.n_train=100", "probe.batch_size=[8,200]"], "error: probe.batch_size must be in 1..100 (the training set size) (got 200)"),
        (["model.sigma_w=0"], "error: model.sigma_w must be > 0 (got 0.0)"),
        (["model.activation=gelu"], "error: model.activation must be one of tanh, relu, identity (got 'gelu')"),
        (["model=teacher_student"], "error: model=teacher_student needs dataset=teacher_student (got dataset=digits)"),
        (["train.loss=hinge"], "error: train.loss must be one of mse, cross_entropy (got 'hinge')"),
        (["train.device=tpu"], "error: train.device must be one of auto, cpu, cuda (got 'tpu')"),
    ],
)
def test_bad_input_is_one_line_nonzero_no_traceback(tmp_path, overrides, message):
    res = run_cli("advisor.tune", *overrides, "train.steps=5", cwd=tmp_path)
    assert res.returncode != 0
    assert res.stderr.strip() == message
    assert "Traceback" not in res.stdout + res.stderr


def test_cifar_root_that_is_not_cifar(tmp_path):
    (tmp_path / "notcifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "notcifar" / "cifar-10-batches-py" / "readme.txt").write_text("hello")
    res = run_cli("advisor.tune", "dataset=cifar", f"dataset.root={tmp_path / 'notcifar'}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset.root must hold a CIFAR-10 python folder")
    assert "lacks data_batch_1" in lines[0]


def test_tune_runs_on_a_local_cifar_root(tmp_path, cifar_root):
    res = run_cli(
        "advisor.tune", "model=mlp", "dataset=cifar", f"dataset.root={cifar_root}", "train.steps=100",
        "probe.batch_size=[8]", "probe.sigma_w=[1]", "probe.lr=[0.01,0.1,10]", "probe.seeds=1",
        "probe.steps=30", "probe.budget_fraction=1", "search.n_trials=2", "model.widths=[16]",
        "probe.curvature_samples=16", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "== SGD phase advisor ==" in res.stdout and "probes      3 x 30 steps" in res.stdout
    assert (tmp_path / "run" / "advice.json").exists()
