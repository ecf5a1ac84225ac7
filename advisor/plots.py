"""Figures: the phase diagram over (1/sigma_w, T) and eigenvalue trajectories (THEORY.md §6-7)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from advisor.boundary import Boundary, TheoryEdges  # noqa: E402

COLOURS = {"convergent": "#2a9d8f", "oscillatory": "#e9c46a", "divergent": "#e76f51", "frozen": "#457b9d"}


def phase_diagram(
    sigma_w: np.ndarray,
    temperature: np.ndarray,
    phases: np.ndarray,
    boundary: Boundary,
    edges: TheoryEdges | None,
    path: Path,
    title: str = "",
) -> Path:
    """Majority phase of every probed ``(1/sigma_w, T)`` (marker size: its seed share),
    the measured edge, the noise-theory ``T_c``, the curvature edge and the disorder lines."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    points = {(s, t) for s, t in zip(sigma_w, temperature)}
    for s, t in points:
        at = (sigma_w == s) & (temperature == t)
        labels, counts = np.unique(phases[at], return_counts=True)
        k = int(np.argmax(counts))
        ax.scatter(1 / s, t, s=40 + 160 * counts[k] / at.sum(), marker="s", color=COLOURS[labels[k]], edgecolors="none")
    inv = 1 / boundary.sigma_w
    for j, b in enumerate(boundary.batch_size):
        ax.plot(inv, boundary.lr_edge[:, j] / b, "k-", lw=2, label=f"measured edge (B={b}, {boundary.confidence:.0%} of seeds)")
    if edges is not None:
        ax.plot(1 / edges.sigma_w, edges.t_c, "b--", lw=1.8, label="noise theory T_c (ordered fraction)")
        b0 = boundary.batch_size[0]
        ax.plot(1 / edges.sigma_w, edges.catapult_lr / b0, "r:", lw=1.8, label=f"curvature edge c/lambda_0 / B (B={b0})")
        if edges.disorder_limit is not None:
            ax.axvline(1 / edges.disorder_limit, color="g", ls="--", lw=1.2, label=f"disorder theory ({edges.disorder_rule})")
    if boundary.disorder_limit is not None:
        ax.axvline(1 / boundary.disorder_limit, color="g", lw=1.8, label=f"measured disorder limit ({boundary.limit_phase})")
    for name, colour in COLOURS.items():
        ax.scatter([], [], marker="s", color=colour, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    t_lo, t_hi = np.min(temperature), np.max(temperature)
    ax.set_ylim(t_lo / 2, t_hi * 2)
    ax.set_xlabel("1 / sigma_w  (weak disorder to the right)")
    ax.set_ylabel("T = learning rate / batch size")
    ax.set_title(title or "SGD phase diagram")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def eigenvalue_flow(
    steps: np.ndarray, levels: np.ndarray, phases: np.ndarray, labels: list[str], layer: str, path: Path
) -> Path:
    """One panel per example probe: its squared singular values ``levels`` ``(S, n)``
    against the step, like the paper's eigenvalue-flow figure."""
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.4), squeeze=False)
    for ax, lev, phase, label in zip(axes[0], levels, phases, labels):
        ax.plot(np.maximum(steps, 1), lev, color=COLOURS[phase], lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{phase}\n{label}", fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel(f"squared singular values of {layer}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
