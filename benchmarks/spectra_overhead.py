"""Cost of spectral tracking as a fraction of the training it accompanies.

Trains each case twice per repeat, side by side (without and with a
:class:`advisor.spectra.SpectrumRecorder` on the default :func:`snapshot_steps`
schedule, alternating which goes first), and prints the medians. The overhead is
given two ways: the difference of the two wall times, and the time spent inside the
recorder (less noisy on a shared machine), both over the untracked training time.
Then times the two ways of getting squared singular values on each case's layers.

    .venv/bin/python benchmarks/spectra_overhead.py [--repeats 3] [--threads 1] [--only CIFAR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from advisor import data, models
from advisor.spectra import SpectrumRecorder, snapshot_steps, squared_singular_values
from advisor.train import sgd


@dataclass
class Case:
    name: str
    sizes: list[int]
    activation: str
    configs: int
    batch_size: int
    steps: int
    lr: float
    loss: str
    dataset: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = data.digits()
    return d.x_train, d.y_train, d.labels_train


def cifar_shaped(n: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    return torch.randn(n, 3072, generator=g), torch.nn.functional.one_hot(labels, 10).float(), labels


CASES = [
    Case("digits 64-128-128-10, P=72 (probe grid)", [64, 128, 128, 10], "tanh", 72, 16, 300, 0.05, "mse", digits),
    Case("digits 64-128-128-10, P=1", [64, 128, 128, 10], "tanh", 1, 16, 3000, 0.05, "mse", digits),
    Case("digits 64-128-128-10, P=72", [64, 128, 128, 10], "tanh", 72, 16, 3000, 0.05, "mse", digits),
    Case("CIFAR-shaped 3072-512-512-10, P=1", [3072, 512, 512, 10], "relu", 1, 64, 300, 0.01, "cross_entropy", cifar_shaped),
    Case("CIFAR-shaped 3072-512-512-10, P=1", [3072, 512, 512, 10], "relu", 1, 64, 3000, 0.01, "cross_entropy", cifar_shaped),
]


def train_once(case: Case, xs: tuple, tracked: bool) -> tuple[float, float]:
    """Wall time of one training and the time spent inside the recorder."""
    seeds = list(range(case.configs))
    net = models.mlp(case.sizes[0], case.sizes[-1], case.sizes[1:-1], case.activation, 1.0, seeds)
    recorder = SpectrumRecorder(snapshot_steps(case.steps))
    spent = 0.0

    def observe(step: int, current: models.Network) -> None:
        nonlocal spent
        start = time.perf_counter()
        recorder(step, current)
        spent += time.perf_counter() - start

    start = time.perf_counter()
    sgd(net, *xs, lr=case.lr, batch_size=case.batch_size, steps=case.steps, seeds=seeds,
        loss=case.loss, observe=observe if tracked else None)
    return time.perf_counter() - start, spent


def overhead(case: Case, repeats: int) -> None:
    xs = case.dataset()
    plain, tracked, inside = [], [], []
    for r in range(repeats):
        for with_recorder in (r % 2 == 1, r % 2 == 0):
            wall, spent = train_once(case, xs, with_recorder)
            (tracked if with_recorder else plain).append(wall)
            if with_recorder:
                inside.append(spent)
    base, with_rec, rec = (statistics.median(v) for v in (plain, tracked, inside))
    n_snap = len(snapshot_steps(case.steps))
    print(
        f"{case.name}: {case.steps} steps, B={case.batch_size}, {n_snap} snapshots | "
        f"train {base:.2f} s, with recorder {with_rec:.2f} s -> overhead {with_rec / base - 1:+.1%} "
        f"(wall difference), {rec / base:.1%} (time inside recorder: {rec / n_snap * 1e3:.1f} ms/snapshot "
        f"= {rec / n_snap / (base / case.steps):.1f} training steps)",
        flush=True,
    )


def median_ms(fn: Callable[[], object], n: int = 7) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def methods(case: Case) -> None:
    """float64-Gram ``eigvalsh`` (what :func:`squared_singular_values` does) against ``svdvals``."""
    for fan_in, fan_out in zip(case.sizes, case.sizes[1:]):
        w = torch.randn(case.configs, fan_out, fan_in) / fan_in**0.5
        ours = median_ms(lambda: squared_singular_values(w))
        sv32 = median_ms(lambda: torch.linalg.svdvals(w))
        sv64 = median_ms(lambda: torch.linalg.svdvals(w.double()))
        print(f"  {case.configs} x {fan_out} x {fan_in}: eigvalsh(float64 Gram) {ours:.2f} ms, "
              f"svdvals float32 {sv32:.2f} ms, float64 {sv64:.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for case in CASES:
        if args.only in case.name:
            overhead(case, args.repeats)
    print("squared singular values of one snapshot, per layer:")
    for case in (CASES[0], CASES[-1]):
        methods(case)


if __name__ == "__main__":
    main()
