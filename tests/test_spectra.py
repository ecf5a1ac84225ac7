"""Spectra against numpy and random-matrix theory (THEORY.md §2, §7-§8), and the recorder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from advisor import data, models
from advisor.spectra import (
    SpectrumRecorder,
    late_growth_rate,
    marchenko_pastur_density,
    marchenko_pastur_edges,
    mean_spacing,
    mp_mean_spacing,
    snapshot_steps,
    spacing_ratio,
    squared_singular_values,
    unfolded_spacings,
    wigner_surmise,
)
from advisor.train import sgd

GOE_RATIO = 0.5307  # Atas et al., PRL 110, 084101 (2013), large-N GOE
POISSON_RATIO = 2 * math.log(2) - 1


def ks_distance(sample: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov distance between a sample's empirical CDF and ``cdf``."""
    x = np.sort(sample)
    n = len(x)
    f = cdf(x)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def mp_cdf(k: int, l: int, sigma_w: float):
    """The Marchenko-Pastur CDF, our density integrated on a fine grid."""
    lo, hi = marchenko_pastur_edges(k, l, sigma_w)
    grid = np.linspace(lo, hi, 100_001)
    dens = marchenko_pastur_density(grid, k, l, sigma_w)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))])
    return lambda x: np.interp(x, grid, cum)


def gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machine two OpenMP threads made this module
    10x slower (58 s against 4.5 s) whenever another process held a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def goe_bulk() -> np.ndarray:
    """Levels of 40 GOE matrices (400 x 400), the central 80% of each: (40, 320)."""
    a = gaussian((40, 400, 400), seed=1)
    return torch.linalg.eigvalsh((a + a.mT) / 2).numpy()[:, 40:360]


# --- squared singular values -------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 5, 40, 60), (3, 60, 40)])
def test_squared_singular_values_match_numpy_svd(shape):
    w = gaussian(shape, seed=0)
    ours = squared_singular_values(w).numpy()
    ref = np.linalg.svd(w.numpy(), compute_uv=False) ** 2
    assert ours.shape == ref.shape
    assert np.all(np.diff(ours, axis=-1) <= 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=0)


def test_squared_singular_values_square_and_float32():
    # A square matrix has levels near 0 (x_min / x_max ~ 1e-6 here): the Gram route is
    # accurate to ~1e-15 x_max absolutely, so compare on that scale.
    w = gaussian((128, 128), seed=3)
    ref = np.linalg.svd(w.numpy(), compute_uv=False) ** 2
    assert np.max(np.abs(squared_singular_values(w).numpy() - ref)) < 1e-12 * ref[0]
    # float32 weights go through float64: their bottom levels stay accurate per level.
    w32 = w.float()
    ref32 = np.linalg.svd(w32.double().numpy(), compute_uv=False) ** 2
    got = squared_singular_values(w32)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref32, rtol=1e-5)


# --- Marchenko-Pastur --------------------------------------------------------------


@pytest.mark.parametrize("k, l", [(256, 1024), (1024, 256), (128, 128)])
def test_marchenko_pastur_density_integrates_to_one(k, l):
    lo, hi = marchenko_pastur_edges(k, l, 1.7)
    total, _ = integrate.quad(lambda x: marchenko_pastur_density(x, k, l, 1.7), lo, hi, limit=200)
    assert total == pytest.approx(1.0, abs=1e-6)
    assert marchenko_pastur_density([lo - 1e-3, hi + 1e-3], k, l, 1.7).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("k, l", [(256, 1024), (1024, 256)])
def test_random_matrix_levels_follow_marchenko_pastur(k, l):
    sigma = 1.3
    w = gaussian((16, k, l), seed=7) * sigma / l**0.5
    levels = squared_singular_values(w).numpy()  # (16, 256)
    lo, hi = marchenko_pastur_edges(k, l, sigma)
    # Edges: the extreme levels fluctuate on the Tracy-Widom scale, which here is ~1% of
    # the top edge and ~2.5% of the bottom one per draw (and sits ~2.4% inside the bottom
    # edge on average); the mean over 16 draws is within 5% of each edge with margin.
    assert levels[:, 0].mean() == pytest.approx(hi, rel=0.05)
    assert levels[:, -1].mean() == pytest.approx(lo, rel=0.05)
    # Bulk: levels are rigid (each within O(1/n) of its quantile), so the KS distance of
    # the pooled 4096 levels to the MP law is ~0.004, far below the 0.02 of i.i.d. draws.
    # 0.015 passes that with room and fails a 5% error in sigma_w (KS 0.065) or the
    # wrong aspect ratio (KS 0.14).
    assert ks_distance(levels.ravel(), mp_cdf(k, l, sigma)) < 0.015
    assert ks_distance(levels.ravel(), mp_cdf(k, l, 1.05 * sigma)) > 0.05
    np.testing.assert_allclose(mean_spacing(levels), mp_mean_spacing(k, l, sigma), rtol=0.1)


# --- level statistics --------------------------------------------------------------


def test_spacing_ratio_of_goe_bulk(goe_bulk):
    # 40 x 318 ratios, standard error ~0.002: 0.01 is ~5 standard errors.
    assert spacing_ratio(goe_bulk).shape == (40,)
    assert spacing_ratio(goe_bulk).mean() == pytest.approx(GOE_RATIO, abs=0.01)


def test_spacing_ratio_of_independent_levels():
    # P(r) = 2 / (1 + r)^2, std 0.28: 20000 levels give a standard error of 0.002.
    levels = np.random.default_rng(0).random(20_000)
    assert spacing_ratio(levels) == pytest.approx(POISSON_RATIO, abs=0.01)
    # order of the levels does not matter; descending tensors are accepted
    assert spacing_ratio(torch.from_numpy(np.sort(levels)[::-1].copy())) == pytest.approx(spacing_ratio(levels))


def test_unfolded_goe_spacings_follow_wigner_surmise(goe_bulk):
    s = unfolded_spacings(goe_bulk)
    assert s.shape == (40, 319)
    assert s.mean() == pytest.approx(1.0, abs=0.01)
    np.testing.assert_allclose(s.mean(axis=1), 1.0, atol=0.02)
    wigner_cdf = lambda x: 1 - np.exp(-math.pi * x**2 / 4)  # noqa: E731
    poisson_cdf = lambda x: 1 - np.exp(-x)  # noqa: E731
    # ~12800 spacings: sampling KS ~0.01, the surmise is within ~0.005 of the exact GOE
    # law; Poisson spacings are 0.21 away.
    assert ks_distance(s.ravel(), wigner_cdf) < 0.03
    assert ks_distance(s.ravel(), poisson_cdf) > 0.15
    hist, edges = np.histogram(s.ravel(), bins=30, range=(0, 3), density=True)
    centres = 0.5 * (edges[1:] + edges[:-1])
    assert np.abs(hist - wigner_surmise(centres)).sum() * 0.1 < 0.05  # L1 over [0, 3]


def test_wigner_surmise_is_normalised_with_unit_mean():
    total, _ = integrate.quad(wigner_surmise, 0, np.inf)
    mean, _ = integrate.quad(lambda s: s * wigner_surmise(s), 0, np.inf)
    assert (total, mean) == pytest.approx((1.0, 1.0), abs=1e-9)


def test_mean_spacing_is_width_over_gaps():
    levels = np.array([[9.0, 5.0, 4.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(mean_spacing(levels), [8 / 3, 0.0])


# --- growth rates ------------------------------------------------------------------


def test_late_growth_rate_recovers_exponential_and_constant():
    steps = snapshot_steps(3000)
    rates = np.array([0.0, 1e-3, -2e-4])
    values = 2.5 * np.exp(np.outer(steps, rates))  # (S, 3)
    np.testing.assert_allclose(late_growth_rate(values, steps), rates, rtol=1e-9, atol=1e-14)
    # only the late part counts: a trajectory that grows early and then flattens
    flattening = np.minimum(np.exp(1e-3 * steps), np.exp(1.0))
    assert late_growth_rate(flattening, steps) == pytest.approx(0.0, abs=1e-14)
    assert late_growth_rate(flattening, steps, late_fraction=1.0) > 1e-4
    # vectorised over (P, layers); zero levels (diverged, weights zeroed) give NaN
    stacked = np.broadcast_to(values[:, :, None], (len(steps), 3, 2)).copy()
    stacked[-1, 0, 1] = 0.0
    got = late_growth_rate(stacked, steps)
    assert got.shape == (3, 2) and np.isnan(got[0, 1])
    np.testing.assert_allclose(got[1:], np.repeat(rates[1:, None], 2, axis=1), rtol=1e-9)


# --- snapshot schedule and recorder ------------------------------------------------


@pytest.mark.parametrize("steps", [0, 1, 7, 32, 300, 3000, 10**6])
def test_snapshot_steps_schedule(steps):
    s = snapshot_steps(steps)
    assert s.dtype.kind == "i" and s[0] == 0 and s[-1] == steps
    assert np.all(np.diff(s) > 0)
    assert len(s) <= 8 + 24 + 1
    if steps >= 3000:
        gaps = np.diff(s)
        # log-spaced early (gaps grow), equal gaps over the linear part
        assert gaps[0] == 1 and gaps[-1] == pytest.approx(steps / 24, abs=1)
        assert np.sum(s <= steps / 24) >= 8
        assert np.ptp(gaps[-23:]) <= 1


def test_snapshot_steps_linear_only_and_no_steps():
    assert snapshot_steps(100, n_log=0, n_linear=4).tolist() == [0, 25, 50, 75, 100]
    assert snapshot_steps(0).tolist() == [0]


def test_snapshot_steps_rejects_bad_arguments():
    with pytest.raises(ValueError):
        snapshot_steps(-1)
    with pytest.raises(ValueError):
        snapshot_steps(100, n_linear=0)


def test_recorder_records_scheduled_spectra_during_sgd():
    d = data.digits(n_train=256)
    seeds = [0, 1, 2]
    net = models.mlp(64, 10, [32, 16], "tanh", torch.tensor([0.5, 1.0, 2.0]), seeds)
    initial = {name: w.clone() for name, w in models.trainable_weights(net).items()}
    schedule = snapshot_steps(20, n_log=4, n_linear=4)
    recorder = SpectrumRecorder(schedule)
    sgd(net, d.x_train, d.y_train, d.labels_train, lr=0.1, batch_size=16, steps=20, seeds=seeds, observe=recorder)
    track = recorder.track()
    np.testing.assert_array_equal(track.steps, schedule)
    assert set(track.levels) == {"fc1", "fc2", "fc3"}
    sizes = {"fc1": 32, "fc2": 16, "fc3": 10}
    for name, levels in track.levels.items():
        assert levels.shape == (len(schedule), 3, sizes[name]) and levels.dtype == np.float32
        assert np.all(np.diff(levels, axis=-1) <= 0)
        np.testing.assert_array_equal(levels[0], squared_singular_values(initial[name]).numpy())
        assert not np.array_equal(levels[-1], levels[0])  # training moved the spectrum


def test_recorder_ignores_unscheduled_steps():
    recorder = SpectrumRecorder([0, 5])
    net = models.mlp(4, 2, [3], "tanh", 1.0, [0])
    for step in range(4):
        recorder(step, net)
    track = recorder.track()
    assert track.steps.tolist() == [0] and track.levels["fc1"].shape == (1, 1, 3)
