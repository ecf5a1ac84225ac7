"""The probe engine: short SGD runs of a whole grid of configurations at once.

Every ``(sigma_w, lr, batch_size, seed)`` of the grid is one configuration of a stacked
:class:`~advisor.models.Network`; one call of :func:`advisor.train.sgd` trains all
configurations of one batch size together (same data order per seed as a sequential
run). Recorded per configuration: batch loss and gradient norm at every step, the
squared singular values of every trained matrix on the spectra module's snapshot
schedule, the feature overlap with initialisation (THEORY.md §7) and the final
validation loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from advisor.data import Dataset
from advisor.errors import require
from advisor.models import ACTIVATIONS, Network, concat, layer_io
from advisor.spectra import SpectrumRecorder, snapshot_steps
from advisor.train import evaluate, sgd

HELD_OUT = 128  # held-out inputs for overlaps and the T_c estimator (the paper's 128)
NetworkFactory = Callable[[Tensor, list[int], Tensor], Network]


@dataclass(frozen=True)
class ProbeGrid:
    """The axes of the probe grid; configurations are their Cartesian product."""

    sigma_w: tuple[float, ...]
    lr: tuple[float, ...]
    batch_size: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int

    def __post_init__(self) -> None:
        for key in ("sigma_w", "lr"):
            values = getattr(self, key)
            require(len(values) > 0 and all(v > 0 for v in values), f"probe.{key}", "a non-empty list of numbers > 0", list(values))
        require(len(self.batch_size) > 0 and all(int(b) > 0 for b in self.batch_size), "probe.batch_size", "a non-empty list of positive integers", list(self.batch_size))
        require(len(self.seeds) > 0, "probe.seeds", "at least 1", len(self.seeds))
        require(self.steps > 0, "probe.steps", "a positive integer", self.steps)

    def configurations(self) -> list[tuple[float, float, int, int]]:
        """``(sigma_w, lr, batch_size, seed)`` in grid order (batch size outermost)."""
        return [
            (s, lr, b, seed)
            for b, s, lr, seed in itertools.product(self.batch_size, self.sigma_w, self.lr, self.seeds)
        ]

    @property
    def config_steps(self) -> int:
        """Total training cost of the grid, in configuration-steps."""
        return len(self.configurations()) * self.steps


@dataclass
class Probes:
    """Measurements of every probe configuration; arrays have a leading ``(P,)`` axis."""

    sigma_w: np.ndarray
    lr: np.ndarray
    batch_size: np.ndarray
    seed: np.ndarray
    source: np.ndarray          # (P,) index of the data set each configuration trained on
    losses: np.ndarray          # (P, steps) batch loss, NaN after divergence
    grad_norms: np.ndarray      # (P, steps)
    diverged_at: np.ndarray     # (P,) first bad step, -1 if none
    snapshot_steps: np.ndarray  # (S,)
    spectra: dict[str, np.ndarray]  # layer -> (S, P, levels), descending
    heldout_loss: np.ndarray    # (S, P) loss on the held-out batch at each snapshot
    overlap: np.ndarray         # (P,) normalised overlap of initial and final features
    val_loss: np.ndarray        # (P,) final validation loss, NaN when diverged
    networks: Network           # final weights, all configurations (for theory estimators)

    @property
    def temperature(self) -> np.ndarray:
        return self.lr / self.batch_size

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_at >= 0

    def __len__(self) -> int:
        return len(self.lr)


def features(net: Network, x: Tensor) -> Tensor:
    """The last hidden layer's activations ``(P, N, width)``: the paper's features ``phi``."""
    return ACTIVATIONS[net.activation](layer_io(net, x)[-2][1])


def feature_overlap(before: Tensor, after: Tensor) -> Tensor:
    """``q = mean phi0 phi1 / sqrt(mean phi0^2 mean phi1^2)`` per configuration, over
    inputs and features (THEORY.md §7's overlap, normalised to 1 for unchanged features)."""
    num = (before * after).mean((-1, -2))
    return num / (before.square().mean((-1, -2)) * after.square().mean((-1, -2))).sqrt().clamp_min(1e-30)


def run_probes(
    grid: ProbeGrid,
    build: NetworkFactory,
    datasets: Sequence[Dataset],
    loss: str,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    blowup: float = 1e6,
    schedule: np.ndarray | None = None,
    progress: bool = True,
    heldout: int = HELD_OUT,
) -> Probes:
    """Train every configuration of ``grid`` for ``grid.steps`` steps, one stacked run per
    batch size. ``datasets`` holds one data set shared by all seeds, or one per seed
    (the teacher-student); ``build(sigma_w (P,), seeds, source (P,))`` makes the stacked
    network, configuration ``p`` seeing ``datasets[source[p]]``; ``heldout`` validation
    inputs give the held-out loss at each snapshot and the feature overlap."""
    sigma, lrs, bs, seeds = (np.array(c) for c in zip(*grid.configurations()))
    per_seed = len(datasets) > 1
    source = torch.tensor([grid.seeds.index(s) if per_seed else 0 for s in seeds])
    data = StackedData(datasets, device, dtype)
    schedule = snapshot_steps(grid.steps) if schedule is None else schedule
    parts, rows_of = [], []
    for b in grid.batch_size:
        rows = np.flatnonzero(bs == b)
        net = build(torch.as_tensor(sigma[rows], dtype=dtype), seeds[rows].tolist(), source[rows]).to(device)
        parts.append(
            _probe_group(net, data, source[rows], lrs[rows], int(b), seeds[rows].tolist(), grid.steps,
                         loss, blowup, schedule, heldout, f"probes B={b}" if progress else None)
        )
        rows_of.append(rows)
    order = torch.as_tensor(np.argsort(np.concatenate(rows_of)))

    def cat(field: str, axis: int = 0) -> np.ndarray:
        return np.take(np.concatenate([getattr(p, field) for p in parts], axis=axis), order, axis=axis)

    return Probes(
        sigma_w=sigma, lr=lrs, batch_size=bs, seed=seeds, source=source.numpy(),
        losses=cat("losses"), grad_norms=cat("grad_norms"), diverged_at=cat("diverged_at"),
        snapshot_steps=parts[0].snapshot_steps,
        spectra={name: np.take(np.concatenate([p.spectra[name] for p in parts], 1), order, 1) for name in parts[0].spectra},
        heldout_loss=cat("heldout_loss", axis=1), overlap=cat("overlap"), val_loss=cat("val_loss"),
        networks=concat([p.networks for p in parts]).select(order),
    )


class StackedData:
    """Train/validation tensors of the data sets stacked ``(S, N, ...)`` on the device."""

    def __init__(self, datasets: Sequence[Dataset], device: torch.device, dtype: torch.dtype):
        def stack(field: str, float_: bool = True) -> Tensor | None:
            values = [getattr(d, field) for d in datasets]
            if values[0] is None:
                return None
            t = torch.stack(values).to(device)
            return t.to(dtype) if float_ else t

        self.x, self.y, self.labels = stack("x_train"), stack("y_train"), stack("labels_train", False)
        self.x_val, self.y_val, self.labels_val = stack("x_val"), stack("y_val"), stack("labels_val", False)

    def validation(self, source: Tensor, n: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validation inputs, targets, labels (the first ``n``) for configurations
        ``source``: shared ``(N, ...)`` when there is one data set, else ``(P, N, ...)``."""
        return self._pick(self.x_val, self.y_val, self.labels_val, source, n)

    def training(self, source: Tensor, n: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The first ``n`` training inputs, targets, labels, as :meth:`validation`."""
        return self._pick(self.x, self.y, self.labels, source, n)

    @staticmethod
    def _pick(x: Tensor, y: Tensor, labels: Tensor | None, source: Tensor, n: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        pick = (0 if len(x) == 1 else source, slice(None, n))
        return x[pick], y[pick], None if labels is None else labels[pick]


def _probe_group(
    net: Network, data: StackedData, source: Tensor, lr: np.ndarray, batch_size: int, seeds: list[int],
    steps: int, loss: str, blowup: float, schedule: np.ndarray, heldout: int, progress: str | None,
) -> Probes:
    """Train one batch-size group and record it (config columns are filled by the caller)."""
    held_out = data.validation(source, heldout)
    phi0 = features(net, held_out[0])
    recorder = SpectrumRecorder(schedule)
    heldout: list[Tensor] = []

    def observe(step: int, current: Network) -> None:
        if step in recorder.schedule:
            recorder(step, current)
            heldout.append(evaluate(current, *held_out, loss)[0])

    result = sgd(
        net, data.x, data.y, data.labels, torch.as_tensor(lr), batch_size, steps, seeds, loss,
        blowup=blowup, observe=observe, progress=progress, source=source,
    )
    final = result.network
    val_loss, _ = evaluate(final, *data.validation(source), loss)
    val_loss[result.diverged] = float("nan")
    track = recorder.track()
    empty = np.empty(0)
    return Probes(
        empty, empty, empty, empty, empty,
        losses=result.losses.numpy(), grad_norms=result.grad_norms.numpy(),
        diverged_at=result.diverged_at.numpy(), snapshot_steps=track.steps, spectra=track.levels,
        heldout_loss=torch.stack(heldout).numpy(),
        overlap=feature_overlap(phi0, features(final, held_out[0])).cpu().numpy(),
        val_loss=val_loss.numpy(), networks=final,
    )
