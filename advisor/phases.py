"""Label each probe with its phase from its loss and spectral trajectories (THEORY.md §6, §8).

Measured per probe (the late window is the last ``late_fraction`` of the probe):

- ``spectral_move``: ``max |log(v_end / v_0)|`` over layers for ``v = x_max`` and the
  mean level spacing: how far the spectrum moved from its Marchenko-Pastur start;
- ``xmax_growth`` / ``spacing_growth``: the late-window change of ``log x_max`` and of
  ``log <dx>`` (late growth rate times the window length), largest over layers: ~0
  once a convergent probe has learnt, > 0 while levels keep spreading;
- ``loss_ratio``: held-out loss at the end (mean of the last snapshots) over its value
  at initialisation;
- ``loss_excess``: ``log10`` of the final held-out loss over the best final held-out
  loss among the probes of the same group (seed, batch size and sigma_w: the
  probes that differ only in learning rate): how far the probe
  ended above what this model reaches on these data;
- ``loss_trend``: late-window change of the log held-out loss (< 0: still falling);
- ``loss_cv``: coefficient of variation of the batch loss in the late window (reported;
  it scales with the batch size and the loss level, so no rule uses it);
- ``overlap``: normalised overlap of initial and final features (1: unchanged).

Rules, in order: ``divergent`` if the loss went non-finite or past the blow-up bound;
``frozen`` if the spectrum barely moved and the held-out loss did not fall below
``plateau`` of its start; ``oscillatory`` if the spectrum moved and either the held-out
loss ended ``excess`` decades or more above the best probe of its group, or the levels
keep spreading late (growth above ``spreading``) while the held-out loss no longer
falls (trend above ``loss_trend``): noise-dominated, levels spread without learning
(THEORY.md §6); ``convergent`` otherwise.

Why these signals (measured on the teacher-student, 3000- and 20000-step probes): at
batch size 4 the batch loss and even the 128-input held-out loss fluctuate by tens of
percent in *every* phase, and a student that starts tiny spreads its levels while it
learns, so neither a late trend nor a late spectral growth rate separates the phases
on its own in short probes; the loss level a moved spectrum ends at does (convergent
probes end within a few times the best loss, noise-dominated ones 10-100x above it).
The growth rates, trend and fluctuation are still measured and reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from advisor.probe import Probes
from advisor.spectra import late_growth_rate, mean_spacing

PHASES = ("convergent", "oscillatory", "divergent", "frozen")


@dataclass(frozen=True)
class Thresholds:
    """Classifier thresholds (config ``probe.thresholds``); defaults calibrated on the
    teacher-student and the digits MLP (README, "Phase classifier")."""

    late_fraction: float = 1 / 3
    plateau: float = 0.1           # final / initial held-out loss above this: little was learnt
    excess: float = 1.0            # decades above the group's best final loss: noise-dominated
    spreading: float = 0.1         # late log-growth of x_max or <dx>: levels still spreading
    loss_trend: float = 0.0        # late log-change of the held-out loss above this: not learning
    frozen_move: float = 0.05      # spectral_move below this: the spectrum did not move


@dataclass(frozen=True)
class Measures:
    """Phase signatures of every probe, each ``(P,)`` (see the module docstring)."""

    diverged: np.ndarray
    spectral_move: np.ndarray
    xmax_growth: np.ndarray
    spacing_growth: np.ndarray
    loss_ratio: np.ndarray
    loss_excess: np.ndarray
    loss_trend: np.ndarray
    loss_cv: np.ndarray
    overlap: np.ndarray

    def row(self, p: int) -> dict[str, float]:
        return {k: (bool(v[p]) if v.dtype == bool else float(v[p])) for k, v in asdict(self).items()}


def measure(
    losses: np.ndarray,
    diverged_at: np.ndarray,
    snapshot_steps: np.ndarray,
    spectra: dict[str, np.ndarray],
    heldout_loss: np.ndarray,
    overlap: np.ndarray,
    groups: np.ndarray,
    late_fraction: float = 1 / 3,
) -> Measures:
    """Signatures from batch losses ``(P, steps)``, spectra ``layer -> (S, P, n)`` and
    held-out losses ``(S, P)`` on ``snapshot_steps`` ``(S,)``, feature overlaps ``(P,)``;
    ``groups`` ``(P,)`` says which probes differ only in learning rate (for ``loss_excess``)."""
    steps = losses.shape[1]
    window = late_fraction * (snapshot_steps[-1] - snapshot_steps[0])
    move, xmax_growth, spacing_growth = [], [], []
    with np.errstate(all="ignore"):
        for levels in spectra.values():
            top, spacing = levels[..., 0].astype(np.float64), mean_spacing(levels)
            move += [np.abs(np.log(top[-1] / top[0])), np.abs(np.log(spacing[-1] / spacing[0]))]
            xmax_growth.append(late_growth_rate(top, snapshot_steps, late_fraction) * window)
            spacing_growth.append(late_growth_rate(spacing, snapshot_steps, late_fraction) * window)
        late = losses[:, int(round((1 - late_fraction) * steps)) :]
        final = heldout_loss[-3:].mean(0)
        final[diverged_at >= 0] = np.nan
        best = {g: np.nanmin(final[groups == g], initial=np.inf) for g in np.unique(groups)}
        return Measures(
            diverged=diverged_at >= 0,
            spectral_move=np.max(move, axis=0),
            xmax_growth=np.max(xmax_growth, axis=0),
            spacing_growth=np.max(spacing_growth, axis=0),
            loss_ratio=final / heldout_loss[0],
            loss_excess=np.log10(final / np.array([best[g] for g in groups])),
            loss_trend=late_growth_rate(heldout_loss, snapshot_steps, late_fraction) * window,
            loss_cv=late.std(1) / late.mean(1),
            overlap=np.asarray(overlap, dtype=np.float64),
        )


def label(m: Measures, t: Thresholds = Thresholds()) -> np.ndarray:
    """Phase of every probe from its :class:`Measures` (rules in the module docstring)."""
    divergent = m.diverged
    still = m.spectral_move < t.frozen_move
    frozen = ~divergent & still & ~(m.loss_ratio <= t.plateau)
    spreading = (np.maximum(m.xmax_growth, m.spacing_growth) > t.spreading) & ~(m.loss_trend < t.loss_trend)
    oscillatory = ~divergent & ~still & (~(m.loss_excess < t.excess) | spreading)
    phases = np.full(len(divergent), "convergent", dtype=object)
    phases[oscillatory] = "oscillatory"
    phases[frozen] = "frozen"
    phases[divergent] = "divergent"
    return phases.astype(str)


def measure_probes(probes: Probes, late_fraction: float = 1 / 3) -> Measures:
    """:func:`measure` on a probe run; groups are the probes that differ only in lr."""
    return measure(
        probes.losses, probes.diverged_at, probes.snapshot_steps, probes.spectra,
        probes.heldout_loss, probes.overlap, _groups(probes.seed, probes.batch_size, probes.sigma_w),
        late_fraction,
    )


def classify(probes: Probes, thresholds: Thresholds = Thresholds()) -> np.ndarray:
    """Phase label of every probe (THEORY.md §6): measure, then :func:`label`."""
    return label(measure_probes(probes, thresholds.late_fraction), thresholds)


def _groups(*keys: np.ndarray) -> np.ndarray:
    """One integer id per distinct combination of the key columns."""
    return np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)[1].ravel()
