"""Spectra of weight matrices and their random-matrix references (THEORY.md §2, §7, §8).

The levels of a ``K x L`` weight ``W`` are the eigenvalues ``x_1 >= ... >= x_n`` of its
smaller Gram matrix (``n = min(K, L)``), the squared singular values of ``W``. This
module computes them, records them along an SGD run (:class:`SpectrumRecorder`, an
``observe`` callback of :func:`advisor.train.sgd`), and compares them with random
matrix theory: the Marchenko-Pastur law at initialisation, GOE level statistics
(spacing ratio, Wigner surmise) under SGD, and the late growth rates of ``log x_max``
and of the mean spacing that separate the phases (THEORY.md §6, §8).

Level statistics take levels on the last axis, in any order, and vectorise over the
leading axes (snapshots, configurations); they return float64 numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from advisor.models import Network, trainable_weights


def squared_singular_values(w: Tensor) -> Tensor:
    """Eigenvalues of the smaller Gram matrix of ``w`` (``W W^T`` or ``W^T W``), descending.

    Works on a single ``(K, L)`` matrix or a stack ``(..., K, L)``; these are the squared
    singular values of ``W``, returned in ``w``'s dtype. The Gram matrix and its
    eigenvalues are computed in float64: the error of each level is then ~1e-14 x_max,
    while float32 loses the small levels of square layers (at initialisation a 512 x 512
    layer has x_min / x_max ~ 1e-9; float32 got its bottom levels wrong by 30x).

    Timings on this 2-core CPU, one torch thread, float32 weights, median ms
    (``benchmarks/spectra_overhead.py``): ``eigvalsh`` of the float64 Gram matrix against
    float32 ``svdvals``: 512 x 3072: 30 vs 261 (float64 svdvals 386); 512 x 512: 13 vs 16;
    a stack of 72 128 x 128: 32 vs 41; 72 x 128 x 64: 8 vs 14. It is the fastest route
    and the accurate one (float32 ``svdvals`` squared is 3e-3 off on the smallest
    512 x 512 levels, float32 ``eigvalsh`` of the Gram matrix up to 30x).
    """
    w = w.detach()
    w64 = w.to(torch.float64)
    gram = w64 @ w64.transpose(-1, -2) if w.shape[-2] <= w.shape[-1] else w64.transpose(-1, -2) @ w64
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0).to(w.dtype)


def marchenko_pastur_edges(k: int, l: int, sigma_w: float) -> tuple[float, float]:
    """Support ``sigma_w^2 (1 -+ sqrt(c))^2`` of the eigenvalues of ``W W^T`` for a
    ``K x L`` matrix with entries N(0, sigma_w^2 / L); ``c = min(K, L) / max(K, L)``,
    scaled by ``max(K, L) / L`` when ``K > L`` (the Gram side is then ``W^T W``)."""
    small, large = min(k, l), max(k, l)
    c = small / large
    scale = sigma_w**2 * large / l
    return scale * (1 - math.sqrt(c)) ** 2, scale * (1 + math.sqrt(c)) ** 2


def mp_mean_spacing(k: int, l: int, sigma_w: float) -> float:
    """``Delta_MP``: the Marchenko-Pastur support width over ``n - 1`` levels,
    ``4 sigma_w^2 sqrt(c) / (K - 1)`` for ``K <= L`` (THEORY.md §2)."""
    lo, hi = marchenko_pastur_edges(k, l, sigma_w)
    return (hi - lo) / (min(k, l) - 1)


def marchenko_pastur_density(x: ArrayLike, k: int, l: int, sigma_w: float) -> np.ndarray:
    """Density of the ``min(K, L)`` levels of a ``K x L`` matrix with entries
    N(0, sigma_w^2 / L) (THEORY.md §2): with ``c = min/max`` and ``s = sigma_w^2 max/L``,

        p(x) = sqrt((x_+ - x)(x - x_-)) / (2 pi s c x)   on [x_-, x_+] (0 outside),

    ``x_-+`` from :func:`marchenko_pastur_edges`; it integrates to 1.
    """
    x = np.asarray(x, dtype=np.float64)
    lo, hi = marchenko_pastur_edges(k, l, sigma_w)
    c = min(k, l) / max(k, l)
    scale = sigma_w**2 * max(k, l) / l
    inside = (x > lo) & (x < hi)
    xi = x[inside]
    density = np.zeros_like(x)
    density[inside] = np.sqrt((hi - xi) * (xi - lo)) / (2 * math.pi * scale * c * xi)
    return density


def mean_spacing(levels: ArrayLike | Tensor) -> np.ndarray:
    """Mean nearest-neighbour spacing ``(x_max - x_min) / (n - 1)`` over the last axis
    (THEORY.md §2; its growth rate is a phase signature, §7-§8)."""
    x = _float64(levels)
    return np.ptp(x, axis=-1) / (x.shape[-1] - 1)


def spacing_ratio(levels: ArrayLike | Tensor) -> np.ndarray:
    """``<min(s_i, s_{i+1}) / max(s_i, s_{i+1})>`` over consecutive spacings ``s_i`` of
    the levels on the last axis (THEORY.md §2). Scale-free, so no unfolding: about
    0.531 for large GOE matrices, ``2 ln 2 - 1 = 0.386`` for independent levels.
    NaN where two spacings in a row are zero (e.g. the zeroed weights of a diverged run).
    """
    s = np.diff(np.sort(_float64(levels), axis=-1), axis=-1)
    a, b = s[..., :-1], s[..., 1:]
    with np.errstate(invalid="ignore"):
        return (np.minimum(a, b) / np.maximum(a, b)).mean(axis=-1)


def wigner_surmise(s: ArrayLike) -> np.ndarray:
    """GOE nearest-neighbour spacing density at unit mean spacing,
    ``P(s) = (pi s / 2) exp(-pi s^2 / 4)`` (THEORY.md §2)."""
    s = np.asarray(s, dtype=np.float64)
    return 0.5 * math.pi * s * np.exp(-0.25 * math.pi * s**2)


def unfolded_spacings(levels: ArrayLike | Tensor, degree: int = 7) -> np.ndarray:
    """Spacings ``N(x_{i+1}) - N(x_i)`` of the ascending levels on the last axis, ``N`` a
    least-squares polynomial (Chebyshev basis, ``degree``) fit to the cumulative level
    count ``i = 1..n``: the unfolded spectrum has unit mean density, so the spacings have
    mean ~1 and compare directly with :func:`wigner_surmise` (THEORY.md §2). A
    polynomial does not follow square-root spectral edges: pass the bulk.
    Returns ``(..., n - 1)``.
    """
    x = np.sort(_float64(levels), axis=-1)
    lo, hi = x[..., :1], x[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (2 * x - lo - hi) / (hi - lo)
    basis = np.polynomial.chebyshev.chebvander(u, degree)
    count = np.arange(1, x.shape[-1] + 1, dtype=np.float64)[:, None]
    q, r = np.linalg.qr(basis)
    coef = np.linalg.solve(r, np.swapaxes(q, -1, -2) @ count)
    return np.diff((basis @ coef)[..., 0], axis=-1)


def late_growth_rate(values: ArrayLike | Tensor, steps: ArrayLike, late_fraction: float = 1 / 3) -> np.ndarray:
    """Least-squares slope of ``log(values)`` against ``steps`` over the late part of a
    trajectory: the snapshots with ``step >= step_0 + (1 - late_fraction)(step_S - step_0)``
    (at least the last two). ``values`` is ``(S, ...)``, ``steps`` ``(S,)``; returns ``(...)``.

    For ``x_max`` and the mean spacing this is the late-time form of THEORY.md §7's
    ``log(<dx>_t / <dx>_0) / t``: ~0 once a convergent run has learnt, > 0 while an
    oscillatory one keeps spreading (§8). Per step; divide by ``lr`` for Langevin time
    ``t = lr * steps``. NaN where a late value is not positive and finite.
    """
    if not 0 < late_fraction <= 1:
        raise ValueError(f"late_fraction must be in (0, 1] (got {late_fraction})")
    t = np.asarray(steps, dtype=np.float64)
    v = _float64(values)
    if t.ndim != 1 or len(t) < 2 or v.shape[:1] != t.shape:
        raise ValueError(f"values (S, ...) and steps (S,) with S >= 2 (got {v.shape} and {t.shape})")
    late = t >= t[0] + (1 - late_fraction) * (t[-1] - t[0])
    late[-2:] = True
    t = t[late] - t[late].mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.log(v[late])
        slope = np.tensordot(t, y - y.mean(axis=0), axes=(0, 0)) / (t @ t)
    return np.where(np.isfinite(y).all(axis=0), slope, np.nan)


def snapshot_steps(steps: int, n_log: int = 8, n_linear: int = 24) -> np.ndarray:
    """Steps at which to record spectra: 0, ``n_log`` log-spaced steps from 1 to the first
    linear step (the fast early motion), then ``n_linear`` equal intervals up to ``steps``
    (the late trend, THEORY.md §8); rounded, sorted, unique. The defaults give at most
    33 snapshots, 8 of them in the last third.

    Cost: on this CPU a snapshot of the digits MLP costs ~4 training steps at P = 1 and
    ~10 at P = 72 (the 3072-512-512 MLP: ~7), so the overhead is about
    ``len(schedule) * that / steps`` (``benchmarks/spectra_overhead.py`` measures it).
    """
    if steps < 0 or n_log < 0 or n_linear < 1:
        raise ValueError(f"need steps >= 0, n_log >= 0, n_linear >= 1 (got {steps}, {n_log}, {n_linear})")
    linear = np.linspace(0, steps, n_linear + 1)
    early = np.geomspace(1, max(linear[1], 1), n_log) if steps else np.zeros(0)
    return np.unique(np.rint(np.concatenate([linear, early])).astype(np.int64))


@dataclass
class SpectrumTrack:
    """Recorded spectra: ``steps`` ``(S,)`` and, per trained layer, ``levels[name]``
    ``(S, P, n)`` float32, descending on the last axis (``n = min(fan_out, fan_in)``)."""

    steps: np.ndarray
    levels: dict[str, np.ndarray]


class SpectrumRecorder:
    """``observe`` callback for :func:`advisor.train.sgd` that records, at the scheduled
    steps only, the squared singular values of every trainable weight of all P
    configurations; :meth:`track` returns them as a :class:`SpectrumTrack`."""

    def __init__(self, schedule: Iterable[int]):
        self.schedule = frozenset(int(s) for s in schedule)
        self._steps: list[int] = []
        self._levels: dict[str, list[np.ndarray]] = {}

    def __call__(self, step: int, net: Network) -> None:
        if step not in self.schedule:
            return
        self._steps.append(step)
        for name, w in trainable_weights(net).items():
            levels = squared_singular_values(w).to(torch.float32).cpu().numpy()
            self._levels.setdefault(name, []).append(levels)

    def track(self) -> SpectrumTrack:
        """The snapshots recorded so far."""
        return SpectrumTrack(
            steps=np.asarray(self._steps, dtype=np.int64),
            levels={name: np.stack(snaps) for name, snaps in self._levels.items()},
        )


def _float64(a: ArrayLike | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)
