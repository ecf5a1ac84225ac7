import json
import math

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution, json_to_distribution
from optuna.storages import JournalStorage

from advisor.boundary import Boundary
from advisor.errors import ConfigError
from advisor.search import (
    SpectralPruner,
    build_space,
    extra_distribution,
    inside_fraction,
    spectral_verdict,
    storage_from,
)


def boundary(frozen_from=None):
    sigma = np.array([0.5, 1.0, 2.0])
    t_c = np.array([0.05, 0.025, np.nan if frozen_from else 0.0125])
    lr_max = t_c * 16
    return Boundary(sigma, np.array([16]), lr_max[:, None], np.zeros((3, 1), bool), 0.68, t_c, lr_max,
                    ["divergent"] * 3, frozen_from, "frozen" if frozen_from else None, "undetermined")


def test_restricted_space_is_static_and_derives_lr_from_the_edge():
    space = build_space("restricted", boundary(), [0.01, 1.0], (0.125, 0.9))
    assert set(space.distributions) == {"batch_size", "sigma_w", "u"}
    assert space.distributions["sigma_w"] == FloatDistribution(0.5, 2.0, log=True)
    hp = space.hyperparameters({"batch_size": 16, "sigma_w": 1.0, "u": 0.5})
    assert hp == {"lr": pytest.approx(0.5 * 0.025 * 16), "batch_size": 16, "sigma_w": 1.0}
    # between probed sigma_w the edge is interpolated in log-log
    assert space.hyperparameters({"batch_size": 16, "sigma_w": 2**-0.5, "u": 1.0})["lr"] == pytest.approx(16 * 0.05 / 2**0.5)
    doc = space.to_json()
    assert json_to_distribution(doc["distributions"]["u"]) == FloatDistribution(0.125, 0.9, log=True)
    lines = space.sweep_overrides(n_lr=2)
    assert lines[0] == f"train.batch_size=16 model.sigma_w=0.5 train.lr={0.125 * 0.8:.4g},{0.9 * 0.8:.4g}"


def test_restricted_space_stops_at_the_disorder_limit():
    space = build_space("restricted", boundary(frozen_from=2.0), [0.01, 1.0], (0.125, 0.9))
    assert space.distributions["sigma_w"] == FloatDistribution(0.5, 1.0, log=True)
    everything_frozen = boundary(frozen_from=0.5)
    with pytest.raises(ConfigError, match="no probed sigma_w has a convergent learning rate"):
        build_space("restricted", everything_frozen, [0.01, 1.0], (0.125, 0.9))


def test_raw_modes_and_extra_parameters():
    extra = {"momentum": extra_distribution("momentum", {"type": "float", "low": 0.0, "high": 0.9})}
    space = build_space("full", boundary(), [0.01, 1.0], (0.125, 0.9), extra, {"momentum": "train.momentum"})
    assert space.distributions["lr"] == FloatDistribution(0.01, 1.0, log=True)
    assert space.hyperparameters({"batch_size": 16, "sigma_w": 1.0, "lr": 0.3, "momentum": 0.5}) == {
        "lr": 0.3, "batch_size": 16, "sigma_w": 1.0, "momentum": 0.5}
    with pytest.raises(ConfigError, match=r"search.params.width.type must be one of int, float, categorical"):
        extra_distribution("width", {"type": "list"})
    with pytest.raises(ConfigError, match="search.mode must be one of restricted, constrained, full"):
        build_space("greedy", boundary(), [0.01], (0.125, 0.9))


def test_storages(tmp_path):
    assert storage_from(None) is None
    assert storage_from("sqlite:///x.db") == "sqlite:///x.db"
    journal = storage_from(f"journal:{tmp_path / 'a' / 'optuna.log'}")
    assert isinstance(journal, JournalStorage) and isinstance(storage_from(str(tmp_path / "b.log")), JournalStorage)
    study = optuna.create_study(storage=journal, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.load_study(study_name="s", storage=storage_from(f"journal:{tmp_path / 'a' / 'optuna.log'}"))
    assert len(again.trials) == 2
    with pytest.raises(ConfigError, match="search.storage must be null, sqlite"):
        storage_from("optuna.db")


def history(x_max, loss):
    return {"steps": list(range(1, len(loss) + 1)), "loss": loss, "x_max": x_max, "spacing": x_max}


def test_spectral_verdicts():
    steady = history([1.0] * 9, [1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.1, 0.09, 0.08])
    assert spectral_verdict(steady, None, "minimize") is None
    spreading = history([1, 1.2, 1.5, 2, 3, 4, 6, 9, 14], [1.0, 0.5, 0.4, 0.4, 0.45, 0.4, 0.42, 0.44, 0.45])
    verdict = spectral_verdict(spreading, None, "minimize")
    assert verdict.phase == "oscillatory" and "levels spread by" in verdict.reason
    learning = history([1, 1.2, 1.5, 2, 3, 4, 6, 9, 14], [1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.03, 0.01])
    assert spectral_verdict(learning, None, "minimize") is None
    far_above = spectral_verdict(steady, 0.001, "minimize")
    assert far_above.phase == "oscillatory" and "1.9 decades above" in far_above.reason
    assert spectral_verdict(steady, 0.001, "maximize") is None
    blown = history([1.0, 2.0], [1.0, math.nan])
    assert spectral_verdict(blown, None, "minimize").phase == "divergent"
    assert spectral_verdict(history([1, 5, 25], [1, 1, 1]), None, "minimize") is None  # warm-up


def test_pruner_reads_the_trial_history():
    study = optuna.create_study(pruner=SpectralPruner(warmup=2))
    trial = study.ask()
    trial.set_user_attr("spectral", history([1, 2, 4, 8, 16], [1, 1, 1.1, 1.2, 1.3]))
    assert trial.should_prune()
    assert SpectralPruner().verdict(study, {}) is None


def test_theory_check_counts_top_trials_inside():
    space = build_space("full", boundary(), [0.01, 1.0], (0.125, 0.9))
    study = optuna.create_study()
    for lr, value in [(0.1, 0.1), (0.8, 0.2), (0.2, 0.3)]:
        study.add_trial(optuna.trial.create_trial(
            params={"batch_size": 16, "sigma_w": 1.0, "lr": lr}, distributions=space.distributions, value=value))
    check = inside_fraction(space, sorted(study.trials, key=lambda t: t.value), k=2)
    assert check["top_k"] == 2 and check["inside"] == 1
    assert check["trials"][0]["octaves_below_edge"] == pytest.approx(math.log2(0.4 / 0.1))
    assert check["trials"][1]["predicted_phase"] == "divergent"
    json.dumps(check)
