"""advisor.tracking against real sqlite MLflow stores in temporary folders."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from advisor.tracking import PARENT_TAG, Tracker, flatten, ui_command


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one runs MLflow's migrations: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def experiment(request) -> str:
    """An experiment name of the test's own, so tests sharing the store stay apart."""
    return request.node.name


def statuses(client: MlflowClient, experiment_id: str) -> dict[str, str]:
    """Run name -> status for every run of the experiment."""
    runs = client.search_runs([experiment_id])
    return {run.info.run_name: run.info.status for run in runs}


def test_flatten_gives_dotted_keys_and_json_lists():
    config = {
        "seed": 0,
        "search": {
            "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": None},
            "mode": "restricted",
        },
        "probe": {"lr": [0.1, 0.2], "grid": (1, 2), "extra": {}},
        "model": {"widths": [{"w": 8}], "bias": True},
    }
    assert flatten(config) == {
        "seed": "0",
        "search.sampler._target_": "optuna.samplers.TPESampler",
        "search.sampler.seed": "None",
        "search.mode": "restricted",
        "probe.lr": "[0.1, 0.2]",
        "probe.grid": "[1, 2]",
        "probe.extra": "{}",
        "model.widths": '[{"w": 8}]',
        "model.bias": "True",
    }
    assert flatten({"a": {"b": 1}}, prefix="cfg.") == {"cfg.a.b": "1"}


def test_ui_command_names_the_store():
    uri = "sqlite:////tmp/x/mlflow.db"
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    assert ui_command("sqlite:////tmp/my runs/mlflow.db").endswith("'sqlite:////tmp/my runs/mlflow.db'")


def test_parent_run_holds_the_flattened_config(store, experiment):
    grid = {f"p{i:03d}": i for i in range(150)}  # more than one 100-param batch
    config = {"train": {"lr": 0.05, "steps": 200}, "grid": grid, "note": "x" * 7000}
    with Tracker(store, experiment, run_name="parent", params=config, tags={"stage": "test"}) as tracker:
        pass
    run = MlflowClient(store).get_run(tracker.run_id)
    params = run.data.params
    assert len(params) == 2 + 150 + 1
    assert params["train.lr"] == "0.05" and params["train.steps"] == "200"
    assert all(params[f"grid.p{i:03d}"] == str(i) for i in range(150))
    assert len(params["note"]) == 6000 and params["note"] == "x" * 5997 + "..."
    assert run.data.tags["stage"] == "test"
    assert run.info.run_name == "parent" and run.info.status == "FINISHED"


def test_children_are_nested_under_the_parent(store, experiment):
    with Tracker(store, experiment, run_name="parent") as tracker:
        with tracker.child("probe-0", params={"sigma_w": 1.5}, tags={"phase": "convergent"}) as probe:
            pass
        with tracker.child("trial-0", params={"train": {"lr": 0.1}}) as trial:
            trial.set_tags({"state": "COMPLETE"})
    client = MlflowClient(store)
    runs = client.search_runs([tracker.experiment_id])
    assert len(runs) == 3
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = {r.info.run_id: r for r in runs if PARENT_TAG in r.data.tags}
    assert [r.info.run_id for r in parents] == [tracker.run_id]
    assert set(children) == {probe.run_id, trial.run_id}
    assert all(r.data.tags[PARENT_TAG] == tracker.run_id for r in children.values())
    assert children[probe.run_id].data.params == {"sigma_w": "1.5"}
    assert children[probe.run_id].data.tags["phase"] == "convergent"
    assert children[trial.run_id].data.params == {"train.lr": "0.1"}
    assert children[trial.run_id].data.tags["state"] == "COMPLETE"
    assert set(statuses(client, tracker.experiment_id).values()) == {"FINISHED"}


def test_step_metrics_come_back_in_step_order(store, experiment):
    steps = list(range(2500))  # 2 x 2500 values: several 1000-metric batches
    loss = np.exp(-np.arange(2500) / 500.0)
    top = np.linspace(1.0, 3.0, 2500)
    top[[7, 8, 2000]] = [math.nan, math.inf, -math.inf]
    with Tracker(store, experiment) as tracker:
        with tracker.child("trial") as trial:
            trial.log_series({"loss": loss, "x_max": top.tolist()}, steps)
            trial.log_metrics({"spacing": 0.5}, step=3)
            trial.log_metrics({"spacing": float("nan")}, step=4)
            trial.log_metrics({"spacing": np.float32(0.25)}, step=5)
        tracker.log_metrics({"best": 0.1}, step=0)
        with pytest.raises(ValueError, match="3 values for 2 steps"):
            tracker.log_series({"bad": [1.0, 2.0, 3.0]}, [0, 1])
    client = MlflowClient(store)

    def history(run_id, key):
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.step for m in points], [m.value for m in points]

    assert history(trial.run_id, "loss") == (steps, loss.tolist())
    kept = [i for i in steps if i not in (7, 8, 2000)]
    assert history(trial.run_id, "x_max") == (kept, top[kept].tolist())
    assert history(trial.run_id, "spacing") == ([3, 5], [0.5, 0.25])
    assert history(tracker.run_id, "best") == ([0], [0.1])
    assert client.get_metric_history(tracker.run_id, "bad") == []


def test_artifacts_are_listed_and_readable(store, experiment, tmp_path):
    figure = tmp_path / "phase_diagram.png"
    figure.write_bytes(b"\x89PNG fake")
    report = {"boundary": np.array([0.5, 1.5]), "best": np.float64(0.25), "grid": (1, 2), "dir": tmp_path}
    with Tracker(store, experiment) as tracker:
        tracker.log_artifact(figure)
        tracker.log_dict(report, "advice.json")
        tracker.log_text("seed: 0\n", "config/config.yaml")
        with tracker.child("probe") as probe:
            probe.log_artifact(figure, artifact_path="figures")
    client = MlflowClient(store)
    listed = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert listed == {"phase_diagram.png", "advice.json", "config"}
    assert [a.path for a in client.list_artifacts(probe.run_id, "figures")] == ["figures/phase_diagram.png"]
    out = tmp_path / "out"
    out.mkdir()

    def read(name: str) -> bytes:
        return Path(client.download_artifacts(tracker.run_id, name, str(out))).read_bytes()

    advice = json.loads(read("advice.json"))
    assert advice == {"boundary": [0.5, 1.5], "best": 0.25, "grid": [1, 2], "dir": str(tmp_path)}
    assert read("config/config.yaml") == b"seed: 0\n"
    assert read("phase_diagram.png") == b"\x89PNG fake"
    # artifacts live next to the database file, not in the working folder
    store_folder = Path(store.removeprefix("sqlite:///")).parent
    artifact_uri = client.get_run(tracker.run_id).info.artifact_uri
    assert artifact_uri.startswith((store_folder / "mlartifacts").as_uri())


def test_keyboard_interrupt_kills_the_parent_and_open_children(store, experiment):
    with pytest.raises(KeyboardInterrupt):
        with Tracker(store, experiment, run_name="parent") as tracker:
            with tracker.child("done"):
                pass
            tracker.child("open")  # its caller never ends it
            with tracker.child("interrupted"):
                raise KeyboardInterrupt
    assert statuses(MlflowClient(store), tracker.experiment_id) == {
        "parent": "KILLED",
        "done": "FINISHED",
        "open": "KILLED",
        "interrupted": "KILLED",
    }


def test_an_exception_fails_the_parent_and_open_children(store, experiment):
    with pytest.raises(ValueError, match="boom"):
        with Tracker(store, experiment, run_name="parent") as tracker:
            tracker.child("open")
            raise ValueError("boom")
    assert statuses(MlflowClient(store), tracker.experiment_id) == {"parent": "FAILED", "open": "FAILED"}


def test_child_statuses_are_their_own(store, experiment):
    with Tracker(store, experiment, run_name="parent") as tracker:
        with pytest.raises(RuntimeError):
            with tracker.child("failed"):
                raise RuntimeError
        pruned = tracker.child("pruned")
        pruned.end("KILLED")
        pruned.end("FINISHED")  # already ended: no effect
        tracker.child("left-open")
    assert statuses(MlflowClient(store), tracker.experiment_id) == {
        "parent": "FINISHED",
        "failed": "FAILED",
        "pruned": "KILLED",
        "left-open": "FINISHED",
    }


def test_concurrent_trackers_share_the_experiment(store, experiment):
    ids, errors = {}, []

    def worker(i: int) -> None:
        try:
            with Tracker(store, experiment, run_name=f"worker-{i}") as tracker:
                with tracker.child(f"trial-{i}") as trial:
                    trial.log_metrics({"loss": float(i)}, step=0)
            ids[i] = tracker.experiment_id
        except Exception as exc:  # reported below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ids[0] == ids[1]
    assert statuses(MlflowClient(store), ids[0]) == {
        "worker-0": "FINISHED", "trial-0": "FINISHED", "worker-1": "FINISHED", "trial-1": "FINISHED"
    }


def test_losing_the_experiment_creation_race_reuses_the_winner(store, experiment, monkeypatch):
    """Another process creates the experiment between our look-up and our create."""
    with Tracker(store, experiment):  # the other process
        pass
    lookup = MlflowClient.get_experiment_by_name
    calls = []

    def stale_first_lookup(self, name):
        calls.append(name)
        return None if len(calls) == 1 else lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first_lookup)
    with Tracker(store, experiment) as tracker:
        pass
    assert len(calls) == 2
    assert MlflowClient(store).get_experiment_by_name(experiment).experiment_id == tracker.experiment_id


def test_relative_store_resolves_against_cwd_quietly(tmp_path):
    """A fresh relative store prints nothing; its runs and artifacts sit under the cwd's folder."""
    script = (
        "from advisor.tracking import Tracker\n"
        "with Tracker('sqlite:///runs/mlflow.db', 'e') as t:\n"
        "    t.log_text('hi', 'note.txt')\n"
        "print(t.uri)\n"
        "print(t._client.get_run(t.run_id).info.artifact_uri)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    uri, artifact_uri = res.stdout.split()
    db = tmp_path / "runs" / "mlflow.db"
    assert uri == f"sqlite:///{db}" and db.is_file()
    assert artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    assert list((tmp_path / "runs" / "mlartifacts").glob("*/artifacts/note.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_processes_starting_on_one_new_store_at_once_all_succeed(tmp_path):
    """Hydra's joblib launcher starts jobs together: the new store's migrations run once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"from advisor.tracking import Tracker\nwith Tracker({uri!r}, 'race') as t: print(t.run_id)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outs]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(out.strip() for out, _ in outs)
