"""``python -m advisor.phase_diagram``: probe a grid, label every probe, draw the diagram.

Writes ``phase_diagram.json`` (points, measured boundary, the three theory edges) and
``phase_diagram.png`` plus ``eigenvalue_flow.png`` in the Hydra run folder, and logs
them to an MLflow parent run with one nested run per probe.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from advisor import plots
from advisor.boundary import Boundary, TheoryEdges, distance_octaves, fit_boundary, theory_edges
from advisor.config import load_datasets, network_factory, probe_grid, thresholds, train_settings
from advisor.data import Dataset
from advisor.errors import exit_on_config_error
from advisor.phases import PHASES, Measures, Thresholds, label, measure_probes
from advisor.probe import NetworkFactory, ProbeGrid, Probes, StackedData, run_probes
from advisor.spectra import mean_spacing
from advisor.tracking import Tracker, ui_command


@dataclass
class PhaseMap:
    """Probes, their phases and measurements, the measured boundary, the theory edges."""

    grid: ProbeGrid
    probes: Probes
    measures: Measures
    phases: np.ndarray
    boundary: Boundary
    theory: TheoryEdges
    seconds: float


def map_phases(
    grid: ProbeGrid,
    build: NetworkFactory,
    datasets: Sequence[Dataset],
    loss: str,
    device: torch.device,
    dtype: torch.dtype,
    blowup: float,
    rules: Thresholds,
    confidence: float,
    catapult_factor: float,
    heldout: int,
    curvature_samples: int,
    progress: bool = True,
) -> PhaseMap:
    """Train the grid's probes, classify them and fit the boundary and theory edges."""
    start = time.perf_counter()
    probes = run_probes(grid, build, datasets, loss, device, dtype, blowup, progress=progress, heldout=heldout)
    measures = measure_probes(probes, rules.late_fraction)
    phases = label(measures, rules)
    boundary = fit_boundary(probes.sigma_w, probes.lr, probes.batch_size, phases, confidence)
    edges = theory_edges(
        probes, build, StackedData(datasets, device, dtype), loss, confidence, catapult_factor,
        heldout, curvature_samples,
    )
    return PhaseMap(grid, probes, measures, phases, boundary, edges, time.perf_counter() - start)


def to_json(pm: PhaseMap) -> dict:
    """The ``phase_diagram.json`` document (DESIGN.md contract)."""
    p = pm.probes
    points = [
        {
            "sigma_w": float(p.sigma_w[i]), "lr": float(p.lr[i]), "batch_size": int(p.batch_size[i]),
            "temperature": float(p.temperature[i]), "seed": int(p.seed[i]), "phase": str(pm.phases[i]),
            "val_loss": _finite(p.val_loss[i]), "t_c": _finite(pm.theory.probe_t_c[i]),
            **{k: (v if isinstance(v, bool) else _finite(v)) for k, v in pm.measures.row(i).items()},
        }
        for i in range(len(p))
    ]
    b, th = pm.boundary, pm.theory.to_dict()
    return {
        "grid": {"sigma_w": list(pm.grid.sigma_w), "lr": list(pm.grid.lr), "batch_size": list(pm.grid.batch_size),
                 "seeds": list(pm.grid.seeds), "steps": pm.grid.steps, "config_steps": pm.grid.config_steps},
        "seconds": pm.seconds,
        "phase_counts": {ph: int((pm.phases == ph).sum()) for ph in PHASES},
        "points": points,
        "boundary": b.to_dict(),
        "theory": {key: th[key] for key in ("sigma_w", "t_c", "t_c_censored", "t_c_probes")}
        | {"octaves_from_measured": distance_octaves(np.where(pm.theory.t_c_censored, np.nan, pm.theory.t_c), b.t_c)},
        "curvature": {key: th[key] for key in ("sigma_w", "lambda_0", "lazy_lr", "catapult_lr")}
        | {"octaves_from_measured": distance_octaves(pm.theory.catapult_lr, b.lr_max)},
        "disorder_limit": {"measured": b.disorder_limit, "measured_phase": b.limit_phase,
                           "theory": th["disorder_limit"], "rule": th["disorder_rule"],
                           "preactivation_variance": th["preactivation"]},
    }


def draw(pm: PhaseMap, folder: Path, title: str) -> list[Path]:
    """``phase_diagram.png`` and ``eigenvalue_flow.png`` (one example probe per phase:
    the best convergent probe, the median probe of each other phase)."""
    p = pm.probes
    figure = plots.phase_diagram(p.sigma_w, p.temperature, pm.phases, pm.boundary, pm.theory, folder / "phase_diagram.png", title)
    layer = next(iter(p.spectra))
    examples = []
    for ph in PHASES:
        members = np.flatnonzero(pm.phases == ph)
        if len(members):
            best = members[np.nanargmin(p.val_loss[members])] if ph == "convergent" else members[len(members) // 2]
            examples.append(int(best))
    flow = plots.eigenvalue_flow(
        p.snapshot_steps, [p.spectra[layer][:, i] for i in examples], [pm.phases[i] for i in examples],
        [f"sigma_w={p.sigma_w[i]:g}, lr={p.lr[i]:g}, B={p.batch_size[i]}" for i in examples],
        layer, folder / "eigenvalue_flow.png",
    )
    return [figure, flow]


def log_probes(tracker: Tracker, pm: PhaseMap) -> None:
    """One nested MLflow run per probe: its point, phase and step metrics."""
    p = pm.probes
    steps = p.snapshot_steps.tolist()
    for i in range(len(p)):
        params = {"sigma_w": p.sigma_w[i], "lr": p.lr[i], "batch_size": int(p.batch_size[i]), "seed": int(p.seed[i])}
        with tracker.child(f"probe {i}", params=params, tags={"phase": pm.phases[i], "kind": "probe"}) as run:
            series = {"heldout_loss": p.heldout_loss[:, i], "batch_loss": p.losses[i, np.minimum(np.maximum(p.snapshot_steps, 1), p.losses.shape[1]) - 1]}
            for name, levels in p.spectra.items():
                series[f"x_max.{name}"] = levels[:, i, 0]
                series[f"x_min.{name}"] = levels[:, i, -1]
                series[f"spacing.{name}"] = mean_spacing(levels[:, i])
            run.log_series(series, steps)


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def phase_map_from_config(cfg: DictConfig, grid: ProbeGrid | None = None, progress: bool = True) -> PhaseMap:
    """:func:`map_phases` with everything read from the config (``grid``: instead of the
    config's probe grid)."""
    s = train_settings(cfg)
    grid = grid or probe_grid(cfg)
    datasets = load_datasets(cfg, list(grid.seeds))
    p = cfg.probe
    return map_phases(
        grid, network_factory(cfg, datasets, s.dtype), datasets, s.loss, s.device, s.dtype, s.blowup,
        thresholds(cfg), float(p.confidence), float(p.catapult_factor), int(p.heldout),
        int(p.curvature_samples), progress,
    )


@hydra.main(config_path="../conf", config_name="phase_diagram", version_base="1.3")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    folder = Path(HydraConfig.get().runtime.output_dir)
    pm = phase_map_from_config(cfg)
    (folder / "phase_diagram.json").write_text(json.dumps(to_json(pm), indent=1))
    figures = draw(pm, folder, f"{cfg.model.name} on {cfg.dataset.name}, {pm.grid.steps} steps")
    name = f"phase_diagram {cfg.model.name}-{cfg.dataset.name}-seed{cfg.seed}"
    with Tracker(cfg.tracking.uri, cfg.tracking.experiment, name, params=OmegaConf.to_container(cfg, resolve=True),
                 tags={"kind": "phase_diagram"}) as tracker:
        log_probes(tracker, pm)
        for path in [folder / "phase_diagram.json", *figures]:
            tracker.log_artifact(path)
    counts = ", ".join(f"{ph} {int((pm.phases == ph).sum())}" for ph in PHASES)
    rate = pm.grid.config_steps / pm.seconds
    print(f"{len(pm.probes)} probes x {pm.grid.steps} steps in {pm.seconds:.1f} s ({rate:,.0f} configuration-steps/s): {counts}")
    for s, t in zip(pm.boundary.sigma_w, pm.boundary.t_c):
        print(f"  sigma_w={s:<8g} measured T_c={t:.4g}")
    print(f"wrote {folder / 'phase_diagram.json'} and {folder / 'phase_diagram.png'}")
    print(f"mlflow run {tracker.run_id}: {ui_command(tracker.uri)}")


if __name__ == "__main__":
    main()
