import math

import numpy as np
import pytest
import torch

from advisor import data, models
from advisor.boundary import crossing, edge_table, fit_boundary
from advisor.phases import Measures, Thresholds, classify, label, measure
from advisor.probe import ProbeGrid, run_probes


def measures(**over):
    base = dict(
        diverged=False, spectral_move=1.0, xmax_growth=0.0, spacing_growth=0.0, loss_ratio=0.01,
        loss_excess=0.0, loss_trend=-0.5, loss_cv=0.3, overlap=0.5,
    )
    base.update(over)
    return Measures(**{k: np.atleast_1d(np.asarray(v)) for k, v in base.items()})


@pytest.mark.parametrize(
    "over, phase",
    [
        ({}, "convergent"),
        ({"diverged": True, "loss_ratio": math.nan}, "divergent"),
        ({"spectral_move": 0.01, "loss_ratio": 0.9}, "frozen"),
        ({"spectral_move": 0.01, "loss_ratio": 0.1}, "convergent"),  # learnt with a still spectrum
        ({"loss_excess": 1.5}, "oscillatory"),
        ({"xmax_growth": 0.3, "loss_trend": 0.05}, "oscillatory"),  # spreading while not learning
        ({"xmax_growth": 0.3, "loss_trend": -0.5}, "convergent"),  # spreading while learning
        ({"spacing_growth": 0.2, "loss_trend": 0.0}, "oscillatory"),
    ],
)
def test_label_rules(over, phase):
    assert label(measures(**over)).tolist() == [phase]


def test_thresholds_move_the_labels():
    m = measures(loss_excess=0.8)
    assert label(m).tolist() == ["convergent"]
    assert label(m, Thresholds(excess=0.5)).tolist() == ["oscillatory"]


def test_measure_on_synthetic_trajectories():
    steps = np.arange(0, 301, 10)
    s = len(steps)
    # probe 0: x_max grows as exp(0.003 t), probe 1: constant; 3 levels with spacing 1 -> 2
    top = np.stack([np.exp(0.003 * steps), np.full(s, 4.0)], axis=1)
    levels = np.stack([top, top - 1, top - 2], axis=-1).astype(np.float32)
    heldout = np.stack([np.full(s, 1.0), np.where(steps > 200, 0.1, 1.0)], axis=1)
    heldout[:, 0] = np.where(steps > 150, 0.05, 1.0)
    losses = np.ones((2, 300))
    m = measure(losses, np.array([-1, 5]), steps, {"W": levels}, heldout, np.array([0.9, 0.2]), np.array([0, 0]))
    window = (300 - 0) / 3
    assert m.xmax_growth[0] == pytest.approx(0.003 * window, rel=1e-3)
    assert m.xmax_growth[1] == pytest.approx(0.0, abs=1e-9)
    assert m.spectral_move[0] == pytest.approx(0.9, rel=1e-3)
    assert m.loss_ratio[0] == pytest.approx(0.05)
    # probe 1 diverged: no final loss, excluded from the best of the group
    assert np.isnan(m.loss_ratio[1]) and np.isnan(m.loss_excess[1])
    assert m.loss_excess[0] == pytest.approx(0.0)
    both = measure(losses, np.array([-1, -1]), steps, {"W": levels}, heldout, np.array([0.9, 0.2]), np.array([0, 0]))
    assert both.loss_ratio[1] == pytest.approx(0.1)
    assert both.loss_excess.tolist() == pytest.approx([0.0, math.log10(0.1 / 0.05)])

    assert m.diverged.tolist() == [False, True]
    assert m.loss_cv.tolist() == [0.0, 0.0]


def test_crossing_interpolates_in_log_lr():
    lr = np.array([1.0, 2.0, 4.0, 8.0])
    edge, censored = crossing(lr, np.array([1.0, 1.0, 0.5, 0.0]), 0.68)
    assert edge == pytest.approx(2 * 2 ** ((1 - 0.68) / 0.5)) and not censored
    assert crossing(lr, np.array([1.0, 1.0, 1.0, 1.0]), 0.68) == (8.0, True)
    assert math.isnan(crossing(lr, np.zeros(4), 0.68)[0])


# an edge between a fully convergent lr and a fully divergent lr twice as large lies where
# the seed fraction, interpolated in log lr, crosses 0.68
F = 2 ** (1 - 0.68)


def synthetic_grid(edge_of):
    """Labels convergent below ``edge_of(sigma, B)``, divergent above; 2 seeds."""
    rows = [(s, lr, b, seed) for s in (0.5, 1.0, 2.0) for b in (4, 16) for lr in 2.0 ** np.arange(-4, 5) for seed in (0, 1)]
    sigma, lr, b, _ = (np.array(c) for c in zip(*rows))
    phases = np.where(lr <= np.array([edge_of(si, bi) for si, bi in zip(sigma, b)]), "convergent", "divergent")
    return sigma, lr, b, phases


def test_boundary_follows_temperature_when_the_edge_scales_with_b():
    sigma, lr, b, phases = synthetic_grid(lambda s, bs: 0.125 * bs / s)
    bd = fit_boundary(sigma, lr, b, phases)
    assert bd.scaling == "temperature"
    np.testing.assert_allclose(bd.t_c, np.array([0.25, 0.125, 0.0625]) * F)
    assert bd.lr_edge_at(8, 1.0) == pytest.approx(F)
    assert bd.lr_edge_at(8, 2 ** -0.5) == pytest.approx(F * 2 ** 0.5)  # log-log between 0.5 and 1
    assert bd.phase_of(0.5, 8, 1.0) == ("convergent", pytest.approx(1.32))
    assert bd.phase_of(0.5, 8, 1.0, margin=1.5)[0] == "divergent"
    assert bd.phase_of(4.0, 8, 1.0) == ("divergent", pytest.approx(-1.68))
    assert bd.disorder_limit is None


def test_boundary_follows_lr_when_the_edge_is_curvature():
    sigma, lr, b, phases = synthetic_grid(lambda s, bs: 1.0 / s)
    bd = fit_boundary(sigma, lr, b, phases)
    assert bd.scaling == "lr"
    np.testing.assert_allclose(bd.lr_max, np.array([2.0, 1.0, 0.5]) * F)
    assert bd.lr_edge_at(64, 1.0) == pytest.approx(F)  # min(T_c * B, lr_max) keeps lr fixed


def test_disorder_limit_and_confidence():
    sigma, lr, b, phases = synthetic_grid(lambda s, bs: 0.0 if s >= 2.0 else 1.0)
    phases[(sigma >= 2.0)] = "frozen"
    bd = fit_boundary(sigma, lr, b, phases)
    assert bd.disorder_limit == 2.0 and bd.limit_phase == "frozen"
    assert bd.phase_of(0.01, 4, 3.0) == ("frozen", pytest.approx(math.nan, nan_ok=True))
    # one of two seeds convergent at lr = 2: inside at confidence 0.5, outside at 0.68
    table = edge_table(np.array([1.0, 1.0, 2.0, 2.0]), np.array([True, True, True, False]),
                       np.ones(4), np.full(4, 4), 0.5)
    assert table.edge[0, 0] == 2.0 and table.censored[0, 0]


def test_teacher_student_phases():
    """THEORY.md §6-7: weak disorder and low T learn, high T is noise-dominated, strong
    disorder at low T is frozen (the phase diagram's 2e4-step probes, float32)."""
    seeds = (0, 1)
    dss = [data.teacher_student(s) for s in seeds]

    def build(sigma, sd, source):
        return models.teacher_student([dss[i].teacher for i in source.tolist()], sigma, sd, torch.float32)

    grid = ProbeGrid((0.125, 256.0), (0.125, 0.5, 256.0), (4,), seeds, 20000)
    probes = run_probes(grid, build, dss, "mse", progress=False)
    phases = dict(zip(zip(probes.sigma_w, probes.temperature, probes.seed), classify(probes)))
    for seed in seeds:
        assert phases[(0.125, 1 / 32, seed)] == "convergent"
        assert phases[(0.125, 64.0, seed)] == "oscillatory"
        assert phases[(256.0, 1 / 32, seed)] == "frozen"


def test_digits_large_lr_diverges():
    ds = data.digits()
    grid = ProbeGrid((1.0,), (0.05, 16.0), (16,), (0, 1), 300)
    probes = run_probes(grid, lambda s, sd, src: models.mlp(64, 10, [64, 64], "tanh", s, sd), [ds], "mse", progress=False)
    assert classify(probes).tolist() == ["convergent", "convergent", "divergent", "divergent"]
