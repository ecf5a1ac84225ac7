import numpy as np
import pytest
import torch

from advisor import data, models
from advisor.errors import ConfigError
from advisor.probe import ProbeGrid, feature_overlap, run_probes
from advisor.spectra import squared_singular_values
from advisor.train import sgd


@pytest.fixture(scope="module")
def digits():
    return data.digits(n_train=400)


def digits_build(sigma, seeds, source):
    return models.mlp(64, 10, [24, 24], "tanh", sigma, seeds)


def test_grid_configurations_and_cost():
    grid = ProbeGrid((0.5, 1.0), (0.1, 0.2, 0.4), (8, 16), (0, 1), 50)
    configs = grid.configurations()
    assert len(configs) == 2 * 3 * 2 * 2 and grid.config_steps == 24 * 50
    assert configs[0] == (0.5, 0.1, 8, 0) and configs[-1] == (1.0, 0.4, 16, 1)
    with pytest.raises(ConfigError, match=r"probe.lr must be a non-empty list of numbers > 0 \(got \[0.1, -1.0\]\)"):
        ProbeGrid((1.0,), (0.1, -1.0), (8,), (0,), 10)


def test_probes_agree_with_the_sequential_trainer(digits):
    grid = ProbeGrid((0.5, 2.0), (0.05, 0.3), (8, 32), (3, 4), 60)
    probes = run_probes(grid, digits_build, [digits], "mse", progress=False)
    assert probes.losses.shape == (16, 60)
    for p in [0, 5, 10, 15]:
        s, lr, b, seed = probes.sigma_w[p], probes.lr[p], int(probes.batch_size[p]), int(probes.seed[p])
        alone = sgd(digits_build(float(s), [seed], None), digits.x_train, digits.y_train, None, float(lr), b, 60, [seed])
        np.testing.assert_allclose(probes.losses[p], alone.losses[0].numpy(), rtol=2e-5, atol=1e-6)
        for a, w in zip(alone.network.weights, probes.networks.weights):
            torch.testing.assert_close(a[0], w[p], rtol=1e-4, atol=1e-5)
        # the last snapshot is the spectrum of the final weights
        last = squared_singular_values(alone.network.weights[1][0]).numpy()
        np.testing.assert_allclose(probes.spectra["fc2"][-1, p], last, rtol=1e-4, atol=1e-6)


def test_diverging_probes_are_masked_without_disturbing_the_others(digits):
    grid = ProbeGrid((1.0,), (0.05, 1000.0), (16,), (0, 1), 40)
    probes = run_probes(grid, digits_build, [digits], "mse", progress=False)
    assert probes.diverged.tolist() == [False, False, True, True]
    assert np.isnan(probes.val_loss[2:]).all() and np.isfinite(probes.val_loss[:2]).all()
    assert all(np.isfinite(v).all() for v in probes.spectra.values())
    calm = run_probes(ProbeGrid((1.0,), (0.05,), (16,), (0, 1), 40), digits_build, [digits], "mse", progress=False)
    np.testing.assert_allclose(probes.losses[:2], calm.losses, rtol=1e-6)


def test_records_have_the_documented_shapes(digits):
    grid = ProbeGrid((1.0,), (0.1,), (16,), (0, 1, 2), 100)
    probes = run_probes(grid, digits_build, [digits], "cross_entropy", progress=False)
    s = len(probes.snapshot_steps)
    assert probes.snapshot_steps[0] == 0 and probes.snapshot_steps[-1] == 100
    assert probes.spectra["fc1"].shape == (s, 3, 24) and probes.spectra["fc3"].shape == (s, 3, 10)
    assert probes.heldout_loss.shape == (s, 3) and probes.grad_norms.shape == (3, 100)
    assert np.all(np.diff(probes.spectra["fc1"], axis=-1) <= 0)
    assert np.all((probes.overlap > 0) & (probes.overlap < 1))


def test_teacher_student_probes_use_each_seeds_teacher():
    dss = [data.teacher_student(s) for s in (0, 1)]

    def build(sigma, seeds, source):
        return models.teacher_student([dss[i].teacher for i in source.tolist()], sigma, seeds, torch.float64)

    grid = ProbeGrid((0.5,), (0.25,), (4,), (0, 1), 200)
    probes = run_probes(grid, build, dss, "mse", dtype=torch.float64, progress=False)
    assert probes.source.tolist() == [0, 1]
    for p, ds in enumerate(dss):
        torch.testing.assert_close(probes.networks.weights[0][p], ds.teacher["M"])
        alone = sgd(build(0.5, [p], torch.tensor([p])), ds.x_train, ds.y_train, None, 0.25, 4, 200, [p])
        torch.testing.assert_close(alone.network.weights[1][0], probes.networks.weights[1][p])


def test_feature_overlap_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    q = feature_overlap(a, b)
    for p in range(2):
        expected = (a[p] * b[p]).mean() / ((a[p] ** 2).mean() * (b[p] ** 2).mean()).sqrt()
        assert q[p].item() == pytest.approx(expected.item(), rel=1e-12)
    assert feature_overlap(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert feature_overlap(a, -a).tolist() == pytest.approx([-1.0, -1.0])
