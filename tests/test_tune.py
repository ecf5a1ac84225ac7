"""`python -m advisor.tune` end to end on small settings, against real Optuna and MLflow stores."""

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from advisor.boundary import Boundary
from conftest import run_cli

SMALL = [
    "probe.sigma_w=[0.5,2]", "probe.lr=[0.03,0.25,2,16]", "probe.seeds=1", "probe.steps=150",
    "probe.budget_fraction=1.0", "train.steps=300", "model.widths=[32]", "search.reports=6",
]


def tune(tmp_path, *overrides, run="run"):
    res = run_cli("advisor.tune", *SMALL, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                  f"hydra.run.dir={tmp_path / run}", *overrides, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res, json.loads((tmp_path / run / "advice.json").read_text())


def runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("advisor")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_tune_end_to_end(tmp_path):
    res, advice = tune(tmp_path, "search.n_trials=4")
    assert "== SGD phase advisor ==" in res.stdout and "mlflow ui --backend-store-uri sqlite:///" in res.stdout
    assert advice["probes"]["count"] == 8 and not advice["probes"]["reused"]
    assert sum(advice["probes"]["phase_counts"].values()) == 8
    assert {p["phase"] for p in advice["probes"]["points"] if p["lr"] == 16} == {"divergent"}
    assert sum(advice["trials"].values()) == 4 and advice["trials"]["RUNNING"] == 0 == advice["trials"]["WAITING"]
    assert advice["search_space"]["mode"] == "restricted"
    assert set(advice["search_space"]["distributions"]) == {"batch_size", "sigma_w", "u"}
    assert advice["best_trial"]["value"] > 0 and advice["theory_check"]["top_k"] <= 5
    assert [row["batch_size"] for row in advice["batch_size_transfer"]][:3] == [1, 2, 4]
    for row in advice["batch_size_transfer"]:
        assert row["lr_low"] < row["lr_high"] <= min(row["noise_edge_lr"], row["curvature_edge_lr"])
        assert row["binding"] == ("noise" if row["noise_edge_lr"] <= row["curvature_edge_lr"] else "curvature")
    assert 1 <= advice["warm_start_trials"] <= 3
    assert advice["mlflow"]["tracking_uri"].startswith("sqlite:///")
    for name in ("phase_diagram.png", "eigenvalue_flow.png", "search_space.json", "sweep_overrides.txt", "config.yaml"):
        assert (tmp_path / "run" / name).exists(), name
    assert "train.batch_size=16 model.sigma_w=" in (tmp_path / "run" / "sweep_overrides.txt").read_text()

    client, all_runs = runs(tmp_path)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == advice["mlflow"]["run_id"]]
    assert len(parents) == 1 and parents[0].info.run_id == advice["mlflow"]["run_id"]
    assert parents[0].info.status == "FINISHED" and parents[0].data.params["search.mode"] == "restricted"
    probes = [r for r in children if r.data.tags.get("kind") == "probe"]
    trials = [r for r in children if "optuna.trial" in r.data.tags]
    assert len(probes) == 8 and len(trials) == 4 and len(children) == 12
    history = client.get_metric_history(probes[0].info.run_id, "x_max.fc1")
    assert len(history) > 5 and [m.step for m in history] == sorted(m.step for m in history)
    trial_history = client.get_metric_history(trials[0].info.run_id, "heldout_loss")
    assert len(trial_history) >= 1 and trial_history[0].step > 0
    artifacts = {a.path for a in client.list_artifacts(advice["mlflow"]["run_id"])}
    assert {"advice.json", "phase_diagram.png", "config.yaml"} <= artifacts
    # restricted mode never samples a point the boundary calls non-convergent
    boundary = Boundary.from_dict(advice["boundary"]["measured"])
    for r in trials:
        p = r.data.params
        assert boundary.phase_of(float(p["lr"]), int(p["batch_size"]), float(p["sigma_w"]))[0] == "convergent"


def test_second_invocation_resumes_the_study_without_probing(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ("search.n_trials=2", f"search.storage={storage}", "search.study_name=resume-me")
    _, first = tune(tmp_path, *common, run="one")
    _, second = tune(tmp_path, *common, run="two")
    assert not first["probes"]["reused"] and second["probes"]["reused"]
    assert second["boundary"]["measured"] == first["boundary"]["measured"]
    study = optuna.load_study(study_name="resume-me", storage=storage)
    assert len(study.trials) == 4
    _, all_runs = runs(tmp_path)
    second_children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == second["mlflow"]["run_id"]]
    assert all(r.data.tags.get("kind") != "probe" for r in second_children) and len(second_children) == 2


def test_constrained_mode_fails_predicted_divergent_points_without_training(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    _, advice = tune(tmp_path, "search.mode=constrained", "search.n_trials=6", "search.warm_start=0",
                     f"search.storage={storage}", "search.study_name=c")
    study = optuna.load_study(study_name="c", storage=storage)
    skipped = [t for t in study.trials if t.user_attrs.get("fail_reason") == "predicted divergent; not trained"]
    assert all(t.state == TrialState.FAIL for t in skipped)
    boundary = Boundary.from_dict(advice["boundary"]["measured"])
    for t in study.trials:
        phase, _ = boundary.phase_of(t.params["lr"], t.params["batch_size"], t.params["sigma_w"])
        assert (t in skipped) == (phase == "divergent")
        assert "constraints:edge" in t.system_attrs


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"])
def test_multirun_gives_one_parent_per_job(tmp_path, launcher):
    res = run_cli("advisor.tune", "-m", *launcher, "dataset=digits,teacher_student", *SMALL, "search.n_trials=1",
                  f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.sweep.dir={tmp_path / 'multi'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _, all_runs = runs(tmp_path)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.params["dataset.name"] for r in parents) == ["digits", "teacher_student"]
    assert (tmp_path / "multi" / "0" / "advice.json").exists() and (tmp_path / "multi" / "1" / "advice.json").exists()


def test_sigint_mid_search_leaves_study_and_store_consistent(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "advisor.tune", *SMALL, "train.steps=3000", "search.n_trials=50",
           "search.pruner._target_=optuna.pruners.NopPruner", "~search.pruner.warmup", "~search.pruner.spreading",
           "~search.pruner.loss_trend", "~search.pruner.excess",
           f"search.storage={storage}", "search.study_name=sig", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(1)
        try:
            done = [t for t in optuna.load_study(study_name="sig", storage=storage).trials if t.state.is_finished()]
        except (KeyError, Exception):
            done = []
        if len(done) >= 2:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    study = optuna.load_study(study_name="sig", storage=storage)
    assert len(study.trials) >= 2
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    _, all_runs = runs(tmp_path)
    assert all(r.info.status != "RUNNING" for r in all_runs)
    parent = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.info.status == "KILLED"
    advice = json.loads((tmp_path / "run" / "advice.json").read_text())
    assert advice["interrupted"] is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.mode=greedy", "error: search.mode must be one of restricted, constrained, full (got 'greedy')"),
        ("search.direction=up", "error: search.direction must be one of minimize, maximize (got 'up')"),
        ("search.storage=nowhere", "error: search.storage must be null, sqlite:///FILE, postgresql://..., journal:FILE or FILE.log (got 'nowhere')"),
    ],
)
def test_bad_search_input_touches_nothing(tmp_path, override, message):
    res = run_cli("advisor.tune", override, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == message
    assert not (tmp_path / "mlflow.db").exists()


def test_maximize_validation_accuracy_with_cross_entropy(tmp_path):
    _, advice = tune(tmp_path, "search.direction=maximize", "train.loss=cross_entropy", "search.n_trials=2")
    assert advice["trials"]["COMPLETE"] + advice["trials"]["PRUNED"] == 2
    best = advice["best_trial"]
    assert 0.5 < best["value"] <= 1.0  # an accuracy, not a loss
    complete = [t for t in advice["theory_check"]["trials"]]
    assert [t["value"] for t in complete] == sorted((t["value"] for t in complete), reverse=True)


@pytest.mark.slow
def test_default_run_finds_a_good_point_inside_the_region(tmp_path):
    """`python -m advisor.tune` as `make run` runs it (digits MLP, 40 trials)."""
    res = run_cli("advisor.tune", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    advice = json.loads((tmp_path / "run" / "advice.json").read_text())
    assert advice["probes"]["budget_share"] <= 0.15 + 1e-9
    assert advice["trials"]["FAIL"] == 0 and advice["trials"]["COMPLETE"] >= 30
    assert advice["best_trial"]["value"] < 0.06  # validation MSE; measured 0.0399
    assert advice["theory_check"]["inside"] == advice["theory_check"]["top_k"] == 5
