"""Speed and memory of the vectorised probe engine (issue 4's performance goals).

Prints four figures, all on CPU in float32:

1. Vectorised against sequential: one :func:`run_probes` call on a grid against one
   call per configuration (P = 1 each), same grid, steps and recording (spectra and
   held-out losses at the default 33 snapshots), for the paper's teacher-student grid
   (12 sigma_w x 12 lr x 1 seed, B = 4, P = 144; goal >= 20x) and 16 digits MLPs
   (64-128-128-10 tanh, mse, B = 16, 4 sigma_w x 4 lr; goal >= 3x). Medians of
   ``--repeats`` runs, the two taking turns to go first.
2. The paper's full grid (12 x 12 x 10 seeds, P = 1440, B = 4) trained by
   :func:`advisor.train.sgd` alone for ``--full-steps`` steps: configuration-steps per
   second and the wall time, projected to 1e5 steps when fewer are run (goal <= 10
   minutes for 1e5 steps). Then :func:`run_probes` on the same grid for
   ``--short-steps`` steps beside ``sgd`` for as many, so the cost of recording shows.
3. The peak RSS of the process that trains the full grid, over the whole process and
   during training alone (the high-water mark is reset once the grid is built); when
   ``--full-steps`` is below 1e5 the latter is projected linearly in steps from the
   ``--short-steps`` runs.
4. The full-grid rate with ``torch.set_num_threads(1)`` against 2.

Every full-grid run is a fresh process (spawned), so its peak RSS is its own and
its thread count is set before torch does any work. Timings on a shared machine are
noisy: the load average is printed at the start and the end.

    .venv/bin/python benchmarks/probe_speed.py --quick          # smoke run, ~30 s
    .venv/bin/python benchmarks/probe_speed.py --full-steps 5000  # projected, ~4 min
    .venv/bin/python benchmarks/probe_speed.py                  # 1e5 steps, measured (~15 min)
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from advisor import data, models
from advisor.data import Dataset
from advisor.probe import NetworkFactory, ProbeGrid, Probes, StackedData, run_probes
from advisor.train import sgd

DTYPE = torch.float32
POWERS = tuple(2.0**k for k in range(-3, 9))  # the paper's 12 powers of two, 1/8..256
PAPER_SEEDS = 10
PAPER_STEPS = 100_000
PAPER_BLOWUP = 100.0  # the paper stops a run whose batch loss exceeds 100
GOAL_SECONDS = 600.0


@dataclass(frozen=True)
class Workload:
    """A probe grid with its data and model, as :func:`run_probes` takes them."""

    name: str
    grid: ProbeGrid
    datasets: list[Dataset]
    model: Callable[[Sequence[Dataset]], NetworkFactory]  # the build for these data sets
    loss: str
    blowup: float

    def probe(self, grid: ProbeGrid | None = None, datasets: list[Dataset] | None = None) -> Probes:
        grid, datasets = grid or self.grid, datasets or self.datasets
        return run_probes(grid, self.model(datasets), datasets, self.loss, dtype=DTYPE,
                          blowup=self.blowup, progress=False)

    def sequential(self) -> None:
        """One :func:`run_probes` call per configuration (P = 1), on its own data set."""
        for sigma, lr, batch_size, seed in self.grid.configurations():
            one = ProbeGrid((sigma,), (lr,), (batch_size,), (seed,), self.grid.steps)
            own = [self.datasets[self.grid.seeds.index(seed)]] if len(self.datasets) > 1 else self.datasets
            self.probe(one, own)

    def sgd_inputs(self) -> dict:
        """Keyword arguments of :func:`sgd` that train the whole grid at once, without
        recording (the stacking :func:`run_probes` does; a single batch size)."""
        (batch_size,) = self.grid.batch_size
        sigma, lr, _, seeds = (np.array(c) for c in zip(*self.grid.configurations()))
        source = torch.tensor([self.grid.seeds.index(s) if len(self.datasets) > 1 else 0 for s in seeds])
        stacked = StackedData(self.datasets, torch.device("cpu"), DTYPE)
        net = self.model(self.datasets)(torch.as_tensor(sigma, dtype=DTYPE), seeds.tolist(), source)
        return dict(net=net, x=stacked.x, targets=stacked.y, labels=stacked.labels,
                    lr=torch.as_tensor(lr, dtype=DTYPE), batch_size=batch_size, steps=self.grid.steps,
                    seeds=seeds.tolist(), loss=self.loss, blowup=self.blowup, source=source)


def teacher_student(seeds: int, steps: int) -> Workload:
    """The paper's grid (THEORY.md §7): 12 sigma_w x 12 lr x ``seeds``, B = 4, a fresh
    teacher and data set per seed."""
    grid = ProbeGrid(POWERS, POWERS, (4,), tuple(range(seeds)), steps)

    def model(datasets: Sequence[Dataset]) -> NetworkFactory:
        def build(sigma: torch.Tensor, seeds: list[int], source: torch.Tensor) -> models.Network:
            return models.teacher_student([datasets[i].teacher for i in source.tolist()], sigma, seeds, DTYPE)
        return build

    datasets = [data.teacher_student(s) for s in grid.seeds]
    return Workload(f"teacher-student 12 sigma_w x 12 lr x {seeds} seed(s), B=4",
                    grid, datasets, model, "mse", PAPER_BLOWUP)


def digits(steps: int) -> Workload:
    """64-128-128-10 tanh MLPs on digits, mse, B = 16, 4 sigma_w x 4 lr x 1 seed."""
    grid = ProbeGrid((0.5, 1.0, 2.0, 4.0), (2.0**-6, 2.0**-5, 2.0**-4, 2.0**-3), (16,), (0,), steps)

    def model(datasets: Sequence[Dataset]) -> NetworkFactory:
        def build(sigma: torch.Tensor, seeds: list[int], source: torch.Tensor) -> models.Network:
            return models.mlp(64, 10, [128, 128], "tanh", sigma, seeds, dtype=DTYPE)
        return build

    return Workload("digits 64-128-128-10 tanh, 4 sigma_w x 4 lr, B=16, mse",
                    grid, [data.digits()], model, "mse", 1e6)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss_mib(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident set size, in MiB.
    Read from /proc: ``getrusage``'s ``ru_maxrss`` would start a spawned process at its
    parent's RSS when it forked."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak_rss() -> float:
    """Hand freed heap back to the OS (else later allocations reuse it unseen) and reset
    the peak RSS to the current RSS (Linux's ``clear_refs``), in MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mib("VmRSS")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@dataclass(frozen=True)
class FullGridRun:
    seconds: float
    setup_peak_mib: float  # peak RSS up to the start of training (imports, data, grid)
    start_mib: float       # RSS when training starts
    train_peak_mib: float  # peak RSS during training

    @property
    def process_peak_mib(self) -> float:
        return max(self.setup_peak_mib, self.train_peak_mib)


def full_grid(recorded: bool, threads: int, steps: int) -> FullGridRun:
    """Train the paper's full grid once, by ``run_probes`` (``recorded``) or ``sgd``.
    Meant to run in a fresh process: see :func:`in_fresh_process`."""
    torch.set_num_threads(threads)
    work = teacher_student(PAPER_SEEDS, steps)
    run = work.probe if recorded else functools.partial(sgd, **work.sgd_inputs())
    setup_peak = rss_mib()
    start = reset_peak_rss()
    seconds = timed(run)
    return FullGridRun(seconds, setup_peak, start, rss_mib())


def in_fresh_process(recorded: bool, threads: int, steps: int) -> FullGridRun:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(full_grid, recorded, threads, steps).result()


def rate(configs: int, steps: int, seconds: float) -> str:
    return f"{configs * steps / seconds:,.0f} config-steps/s"


def compare_sequential(work: Workload, repeats: int, goal: float) -> None:
    """Figure 1: medians of the vectorised and the per-configuration runs, alternating."""
    vectorised, loop = [], []
    for r in range(repeats):
        runs = [(vectorised, work.probe), (loop, work.sequential)]
        for times, fn in runs if r % 2 == 0 else runs[::-1]:
            times.append(timed(fn))
    v, s = statistics.median(vectorised), statistics.median(loop)
    p = len(work.grid.configurations())
    print(f"   {work.name} (P={p}): vectorised {v:.2f} s, loop of {p} x P=1 {s:.2f} s "
          f"-> {s / v:.1f}x (goal >= {goal:.0f}x: {'met' if s / v >= goal else 'NOT met'})", flush=True)


def short_runs(threads: int, steps: int, repeats: int) -> dict[tuple[bool, int], list[FullGridRun]]:
    """Full-grid runs of ``steps`` steps keyed ``(recorded, threads)``, each once per
    repeat in rotating order: ``sgd`` at 1 and at 2 threads, ``run_probes`` at ``threads``."""
    kinds = [(False, 1), (False, 2), (True, threads)]
    runs: dict[tuple[bool, int], list[FullGridRun]] = {k: [] for k in kinds}
    for r in range(repeats):
        for kind in kinds[r % 3:] + kinds[:r % 3]:
            runs[kind].append(in_fresh_process(*kind, steps))
    return runs


def median_seconds(runs: list[FullGridRun]) -> float:
    return statistics.median(r.seconds for r in runs)


def report_full_grid(threads: int, full_steps: int, short_steps: int, repeats: int) -> None:
    """Figures 2-4 on the paper's full grid."""
    p = len(POWERS) ** 2 * PAPER_SEEDS
    print(f"2. full grid: 12 sigma_w x 12 lr x {PAPER_SEEDS} seeds (P={p}), B=4, teacher-student", flush=True)
    full = in_fresh_process(False, threads, full_steps)
    to_paper = full.seconds / full_steps * PAPER_STEPS
    label = "measured" if full_steps == PAPER_STEPS else f"PROJECTED from {full_steps} steps"
    print(f"   sgd, {threads} thread(s), {full_steps} steps, one run: {full.seconds:.1f} s, "
          f"{rate(p, full_steps, full.seconds)}")
    print(f"   1e5 steps: {to_paper:.0f} s = {to_paper / 60:.1f} min ({label}; goal <= "
          f"{GOAL_SECONDS / 60:.0f} min: {'met' if to_paper <= GOAL_SECONDS else 'NOT met'})", flush=True)

    runs = short_runs(threads, short_steps, repeats)
    plain = runs[(False, threads)]
    with_rec = median_seconds(runs[(True, threads)])
    without = median_seconds(plain)
    print(f"   recording, {short_steps} steps, {threads} thread(s), median of {repeats}: run_probes "
          f"{with_rec:.2f} s ({rate(p, short_steps, with_rec)}) vs sgd {without:.2f} s "
          f"({rate(p, short_steps, without)}) -> recording +{with_rec - without:.2f} s "
          f"({with_rec / without - 1:+.0%}; the snapshots and a final validation: mostly a fixed "
          f"cost, less per step in longer runs)")

    print(f"3. peak RSS of the full-grid sgd process, {full_steps} steps: {full.process_peak_mib:.0f} MiB "
          f"(setup {full.setup_peak_mib:.0f} MiB; during training {full.train_peak_mib:.0f} MiB, "
          f"from {full.start_mib:.0f} MiB at its start)")
    if full_steps != PAPER_STEPS:
        short_peak = statistics.median(r.train_peak_mib for r in plain)
        per_step = (full.train_peak_mib - short_peak) / (full_steps - short_steps)
        projected = full.train_peak_mib + per_step * (PAPER_STEPS - full_steps)
        print(f"   during training at {short_steps} steps: {short_peak:.0f} MiB -> "
              f"{per_step * 1024**2 / p:.1f} bytes per config-step; peak during training at 1e5 steps: "
              f"{projected:.0f} MiB PROJECTED (linear in steps)")

    print(f"4. torch threads, full-grid sgd, {short_steps} steps, median of {repeats} (runs in s):")
    for n in (1, 2):
        s = median_seconds(runs[(False, n)])
        each = ", ".join(f"{r.seconds:.2f}" for r in runs[(False, n)])
        print(f"   {n} thread(s): {s:.2f} s, {rate(p, short_steps, s)} ({each})")
    ratio = median_seconds(runs[(False, 2)]) / median_seconds(runs[(False, 1)])
    print(f"   time at 2 threads / time at 1 thread: {ratio:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps, one repeat")
    parser.add_argument("--loop-steps", type=int, default=1000, help="steps of figure 1 (both sides)")
    parser.add_argument("--full-steps", type=int, default=PAPER_STEPS,
                        help="steps of the full-grid sgd run (below 1e5: time and memory projected)")
    parser.add_argument("--short-steps", type=int, default=500,
                        help="steps of the repeated full-grid runs (recording cost, threads, memory slope)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2), help="torch threads for figures 1-3")
    args = parser.parse_args()
    if args.quick:
        args.loop_steps, args.full_steps, args.short_steps, args.repeats = 20, 60, 20, 1
    if args.short_steps >= args.full_steps:
        parser.error("--short-steps must be below --full-steps (the memory projection fits both)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {args.threads} thread(s), float32; "
          f"load average {load()}", flush=True)
    print(f"1. vectorised vs one run_probes per configuration, {args.loop_steps} steps, same recording, "
          f"median of {args.repeats}:", flush=True)
    compare_sequential(teacher_student(1, args.loop_steps), args.repeats, goal=20)
    compare_sequential(digits(args.loop_steps), args.repeats, goal=3)
    report_full_grid(args.threads, args.full_steps, args.short_steps, args.repeats)
    print(f"load average {load()}")


if __name__ == "__main__":
    main()
