"""Search efficiency: Optuna TPE over the full box against the restricted space (THEORY.md §8).

1. Trains a table of full runs of the digits MLP (64-128-128-10 tanh, MSE, B = 16,
   3000 steps) over a grid of learning rates (half-octave steps) and sigma_w, all at
   once as one stacked run, and records each configuration's validation loss
   (diverged: none).
2. Runs probes shaped like the advisor's default (4 sigma_w x 9 lr x 2 seeds, 250
   steps) over the table's sigma_w range, labels them, fits the boundary and builds the
   restricted space (u in [1/8, 0.9], the defaults).
3. Simulates studies that look the validation loss up in the table (nearest grid point
   in log lr and log sigma_w): TPE on the full box, diverged trials told FAIL; TPE on
   the full box, diverged trials given the worst finite value; TPE on the restricted
   space. Prints, over ``--studies`` seeds, the median number of trials to reach the top
   3% of the table, the share of trials wasted on diverged points, and the median best
   value after 20 and ``--trials`` trials; and the probes' cost in full-run equivalents.

    .venv/bin/python benchmarks/search_efficiency.py [--studies 20] [--trials 60]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import optuna
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from advisor import data, models
from advisor.boundary import fit_boundary
from advisor.phases import classify
from advisor.probe import ProbeGrid, run_probes
from advisor.search import build_space
from advisor.train import evaluate, sgd

STEPS, BATCH = 3000, 16
LOG2_LR = np.arange(-6.0, 6.01, 0.5)
LOG2_SIGMA = np.arange(-1.5, 1.51, 0.5)


def table(ds: data.Dataset) -> np.ndarray:
    """Validation loss of a full run at every (sigma_w, lr) of the grid; inf: diverged."""
    sig, lr = np.meshgrid(2.0**LOG2_SIGMA, 2.0**LOG2_LR, indexing="ij")
    seeds = [0] * sig.size
    net = models.mlp(64, 10, [128, 128], "tanh", torch.tensor(sig.ravel(), dtype=torch.float32), seeds)
    result = sgd(net, ds.x_train, ds.y_train, None, torch.tensor(lr.ravel()), BATCH, STEPS, seeds, progress="table")
    val, _ = evaluate(result.network, ds.x_val, ds.y_val, None, "mse")
    val[result.diverged] = math.inf
    return val.numpy().reshape(sig.shape)


def lookup(values: np.ndarray, lr: float, sigma: float) -> float:
    i = int(np.argmin(np.abs(LOG2_SIGMA - math.log2(sigma))))
    j = int(np.argmin(np.abs(LOG2_LR - math.log2(lr))))
    return float(values[i, j])


def study(values: np.ndarray, mode: str, space, seed: int, trials: int, target: float) -> dict:
    """One simulated study; ``mode``: full-fail, full-worst or restricted."""
    sampler = optuna.samplers.TPESampler(seed=seed)
    st = optuna.create_study(sampler=sampler)
    worst = float(np.max(values[np.isfinite(values)]))
    box = {"lr": FloatDistribution(2.0 ** LOG2_LR[0], 2.0 ** LOG2_LR[-1], log=True),
           "sigma_w": FloatDistribution(2.0 ** LOG2_SIGMA[0], 2.0 ** LOG2_SIGMA[-1], log=True)}
    wasted, reached, best, best_value = 0, None, [], math.inf
    for n in range(trials):
        if mode == "restricted":
            trial = st.ask(space.distributions)
            hp = space.hyperparameters(trial.params)
        else:
            trial = st.ask(box)
            hp = trial.params
        value = lookup(values, hp["lr"], hp["sigma_w"])
        if math.isinf(value):
            wasted += 1
            if mode == "full-fail":
                st.tell(trial, state=TrialState.FAIL)
            else:
                st.tell(trial, worst)
        else:
            st.tell(trial, value)
            best_value = min(best_value, value)
        best.append(best_value)
        if reached is None and best_value <= target:
            reached = n + 1
    return {"reached": reached, "wasted": wasted / trials, "best20": best[min(19, trials - 1)], "best": best[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ds = data.digits()
    start = time.perf_counter()
    values = table(ds)
    finite = values[np.isfinite(values)]
    target = float(np.quantile(finite, 0.03))
    top = np.argwhere(values <= target)
    where = ", ".join(f"(sigma_w {2.0 ** LOG2_SIGMA[i]:.2g}, lr {2.0 ** LOG2_LR[j]:.2g})" for i, j in top)
    print(f"table: {values.size} full runs of {STEPS} steps in {time.perf_counter() - start:.1f} s; "
          f"{np.isinf(values).mean():.0%} diverge; best {finite.min():.4f}, top-3% threshold {target:.4f} at {where}")
    # the default probe grid's shape (4 sigma_w an octave apart x 9 lr x 2 seeds, 250 steps),
    # placed over the table's sigma_w range
    grid = ProbeGrid(tuple(2.0**k for k in (-1.5, -0.5, 0.5, 1.5)), tuple(2.0**k for k in range(-6, 3)), (BATCH,), (0, 1), 250)
    start = time.perf_counter()
    build = lambda s, seeds, src: models.mlp(64, 10, [128, 128], "tanh", s, seeds)  # noqa: E731
    probes = run_probes(grid, build, [ds], "mse", progress=False)
    boundary = fit_boundary(probes.sigma_w, probes.lr, probes.batch_size, classify(probes))
    space = build_space("restricted", boundary, grid.lr, (0.125, 0.9))
    print(f"probes: {len(probes)} x {grid.steps} steps in {time.perf_counter() - start:.1f} s = "
          f"{grid.config_steps / STEPS:.1f} full runs' worth of configuration-steps; "
          f"edge lr {', '.join(f'{v:.3g}' for v in boundary.lr_max)} at sigma_w {', '.join(f'{s:g}' for s in boundary.sigma_w)}")
    print(f"{'mode':<12} {'trials to top 3%':<17} {'reached':<9} {'wasted':<8} {'best@20':<9} best@{args.trials}")
    for mode in ("full-fail", "full-worst", "restricted"):
        runs = [study(values, mode, space, seed, args.trials, target) for seed in range(args.studies)]
        reached = [r["reached"] for r in runs if r["reached"] is not None]
        med = statistics.median(reached) if reached else math.nan
        print(f"{mode:<12} {med:<17} {f'{len(reached)}/{len(runs)}':<9} "
              f"{statistics.mean(r['wasted'] for r in runs):<8.0%} "
              f"{statistics.median(r['best20'] for r in runs):<9.4f} {statistics.median(r['best'] for r in runs):.4f}")


if __name__ == "__main__":
    main()
