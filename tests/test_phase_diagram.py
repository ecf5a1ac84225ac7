"""`python -m advisor.phase_diagram` end to end on small grids."""

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

POINT_KEYS = {"sigma_w", "lr", "batch_size", "temperature", "seed", "phase", "val_loss", "t_c",
              "spectral_move", "xmax_growth", "spacing_growth", "loss_ratio", "loss_excess", "overlap"}


def test_teacher_student_diagram(tmp_path):
    res = run_cli(
        "advisor.phase_diagram", "probe.sigma_w=[0.125,2,256]", "probe.lr=[0.125,1,16,256]",
        "probe.steps=4000", "probe.seeds=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "24 probes x 4000 steps" in res.stdout
    doc = json.loads((tmp_path / "run" / "phase_diagram.json").read_text())
    assert len(doc["points"]) == 3 * 4 * 2 and POINT_KEYS <= set(doc["points"][0])
    by = {(p["sigma_w"], p["temperature"], p["seed"]): p["phase"] for p in doc["points"]}
    assert by[(0.125, 1 / 32, 0)] == "convergent" and by[(0.125, 64.0, 0)] == "oscillatory"
    assert doc["boundary"]["sigma_w"] == [0.125, 2.0, 256.0] and len(doc["boundary"]["t_c"]) == 3
    assert doc["boundary"]["confidence"] == 0.68
    # the measured edge at weak disorder lies between the convergent and the oscillatory T
    assert 1 / 32 <= doc["boundary"]["t_c"][0] <= 64
    assert set(doc["theory"]) >= {"sigma_w", "t_c", "octaves_from_measured"}
    assert all(v is None or v > 0 for v in doc["curvature"]["lambda_0"])
    assert doc["disorder_limit"]["rule"].startswith("tanh")
    for name in ("phase_diagram.png", "eigenvalue_flow.png"):
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("advisor").experiment_id], max_results=100)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and len(runs) == 1 + 24
    assert {"phase_diagram.json", "phase_diagram.png"} <= {a.path for a in client.list_artifacts(parent[0].info.run_id)}


def test_digits_mlp_diagram(tmp_path):
    res = run_cli(
        "advisor.phase_diagram", "model=mlp", "dataset=digits", "train=default", "model.widths=[32]",
        "probe.sigma_w=[0.5,2]", "probe.lr=[0.05,0.5,32]", "probe.batch_size=[8,32]", "probe.steps=200",
        "probe.seeds=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "run" / "phase_diagram.json").read_text())
    assert {p["phase"] for p in doc["points"] if p["lr"] == 32} == {"divergent"}
    assert doc["boundary"]["batch_size"] == [8, 32]
    assert doc["curvature"]["lambda_0"][0] > 0


def test_bad_probe_grid_is_one_line(tmp_path):
    res = run_cli("advisor.phase_diagram", "probe.lr=[]", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: probe.lr must be a non-empty list of numbers > 0 (got [])"


@pytest.mark.slow
def test_default_paper_grid_reproduces_the_rising_boundary(tmp_path):
    """THEORY.md §7: the critical temperature grows with disorder. The default run (12 x 12
    grid, 2 seeds, 2e4 steps) measured T_c 0.2-0.4 for sigma_w <= 2 and >= 12 from 16."""
    res = run_cli("advisor.phase_diagram", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((tmp_path / "run" / "phase_diagram.json").read_text())
    t_c = dict(zip(doc["boundary"]["sigma_w"], doc["boundary"]["t_c"]))
    weak = [t_c[s] for s in (0.125, 0.25, 0.5, 1.0, 2.0)]
    strong = [t_c[s] for s in (16.0, 32.0, 64.0)]
    assert max(weak) < 1.0 and min(strong) > 4.0
    counts = doc["phase_counts"]
    assert counts["convergent"] > 100 and counts["oscillatory"] > 100 and counts["frozen"] >= 5
    frozen = {(p["sigma_w"], p["temperature"]) for p in doc["points"] if p["phase"] == "frozen"}
    assert all(s >= 32 and t <= 1 for s, t in frozen)  # strong disorder, low T (THEORY.md §6)
    # the noise estimator's edge sits below the measured one where it crosses (THEORY.md §8)
    below = [o for o in doc["theory"]["octaves_from_measured"] if o is not None]
    assert sum(o < 0 for o in below) >= 0.75 * len(below)
