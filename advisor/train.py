"""Plain SGD at a constant learning rate, for a stack of P configurations at once.

One step is ``W <- W - lr_p * grad_W L_p`` for every configuration ``p`` (THEORY.md §1),
with ``L_p`` the loss of configuration ``p`` on its own minibatch; the sequential
trainer is the case ``P = 1``. Data are visited in a fixed per-seed order, the same
every epoch (as in the paper, THEORY.md §7). A configuration whose loss turns
non-finite or exceeds ``blowup`` is stopped and reported, never raised: its weights
are set to zero and it takes no further steps, which leaves the others untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from advisor.errors import require, require_choice
from advisor.models import Network, forward

LOSSES = ("mse", "cross_entropy")
Observer = Callable[[int, Network], None]


@dataclass
class TrainResult:
    """Final network and per-step records, each ``(P, steps)``."""

    network: Network
    losses: Tensor
    grad_norms: Tensor
    diverged_at: Tensor

    @property
    def diverged(self) -> Tensor:
        return self.diverged_at >= 0


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def loss_per_config(out: Tensor, targets: Tensor, labels: Tensor | None, kind: str) -> Tensor:
    """``(P,)`` losses of outputs ``(P, B, O)``.

    ``mse``: ``1/2 * mean_batch sum_outputs (y - y_hat)^2`` (the paper's);
    ``cross_entropy``: batch mean of the softmax cross-entropy against class ids.
    """
    if kind == "mse":
        return 0.5 * (out - targets).square().sum(-1).mean(-1)
    p, b, o = out.shape
    return F.cross_entropy(out.reshape(p * b, o), labels.reshape(p * b), reduction="none").view(p, b).mean(-1)


def data_orders(n: int, seeds: Sequence[int], device: torch.device | None = None) -> Tensor:
    """``(P, n)`` fixed visiting order of the training set, one permutation per seed."""
    return torch.stack(
        [torch.randperm(n, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device)


def check_hyperparameters(lr: Tensor, batch_size: int, n_train: int, loss: str) -> None:
    """One-line errors for values no SGD run can use."""
    bad = lr[~(lr > 0)]
    require(len(bad) == 0, "train.lr", "> 0", bad[0].item() if len(bad) else None)
    require(0 < batch_size <= n_train, "train.batch_size", f"in 1..{n_train} (the training set size)", batch_size)
    require_choice(loss, "train.loss", LOSSES)


def sgd(
    net: Network,
    x: Tensor,
    targets: Tensor,
    labels: Tensor | None,
    lr: Tensor | float,
    batch_size: int,
    steps: int,
    seeds: Sequence[int],
    loss: str = "mse",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    blowup: float = 1e6,
    observe: Observer | None = None,
    progress: str | None = None,
) -> TrainResult:
    """Train every configuration of ``net`` for ``steps`` minibatch steps.

    ``x``/``targets``/``labels`` are shared ``(N, ...)`` or per configuration
    ``(P, N, ...)``; ``lr`` is a scalar or ``(P,)``; ``seeds`` fixes each configuration's
    data order. ``observe(step, net)`` is called before the first step (``step = 0``)
    and after every step. ``progress`` is the label of a progress bar (None: no bar).
    """
    p_count = net.n_configs
    n_train = x.shape[-2]
    dev = net.weights[0].device
    lr = torch.as_tensor(lr, dtype=net.weights[0].dtype, device=dev).expand(p_count).clone()
    check_hyperparameters(lr, batch_size, n_train, loss)
    require(loss == "mse" or labels is not None, "train.loss", "mse for a regression dataset", loss)
    orders = data_orders(n_train, seeds, dev)
    n_batches = n_train // batch_size
    configs = torch.arange(p_count, device=dev)[:, None]

    def rows(t: Tensor, idx: Tensor) -> Tensor:
        return t[idx] if x.ndim == 2 else t[configs, idx]

    params = [t.detach().clone().requires_grad_(True) for t in net.parameters()]
    velocity = [torch.zeros_like(t) for t in params] if momentum else []
    alive = torch.ones(p_count, dtype=torch.bool, device=dev)
    losses = torch.full((p_count, steps), float("nan"), dtype=torch.float32)
    grad_norms = torch.full((p_count, steps), float("nan"), dtype=torch.float32)
    diverged_at = torch.full((p_count,), -1, dtype=torch.long)
    current = net.with_parameters(params)
    if observe:
        observe(0, current)
    for step in tqdm(range(steps), desc=progress, disable=progress is None, leave=False):
        k = step % n_batches
        idx = orders[:, k * batch_size : (k + 1) * batch_size]
        out = forward(current, rows(x, idx))
        lp = loss_per_config(out, rows(targets, idx), None if labels is None else rows(labels, idx), loss)
        grads = torch.autograd.grad(torch.where(alive, lp, 0.0).sum(), params)
        with torch.no_grad():
            bad = alive & (~torch.isfinite(lp) | (lp > blowup))
            if bad.any():
                alive &= ~bad
                diverged_at[bad.cpu()] = step
            sq = sum(g.reshape(p_count, -1).square().sum(-1) for g in grads)
            live = alive.cpu()
            losses[live, step] = lp.detach().float().cpu()[live]
            grad_norms[live, step] = sq.sqrt().float().cpu()[live]
            for i, (t, g) in enumerate(zip(params, grads)):
                if weight_decay:
                    g = g + weight_decay * t
                if momentum:
                    velocity[i].mul_(momentum).add_(g)
                    g = velocity[i]
                shape = (-1,) + (1,) * (t.ndim - 1)
                t.sub_(lr.view(shape) * g)
                t.masked_fill_(~alive.view(shape), 0.0)
        if observe:
            observe(step + 1, current)
    final = net.with_parameters([t.detach() for t in params])
    return TrainResult(final, losses, grad_norms, diverged_at)


@torch.no_grad()
def evaluate(
    net: Network, x: Tensor, targets: Tensor, labels: Tensor | None, loss: str, chunk: int = 4096
) -> tuple[Tensor, Tensor | None]:
    """Loss ``(P,)`` over the whole set (and accuracy ``(P,)`` when labels are given)."""
    total = torch.zeros(net.n_configs, dtype=torch.float64)
    correct = torch.zeros(net.n_configs, dtype=torch.float64)
    n = x.shape[-2]
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        xs, ys = x[..., sl, :], targets[..., sl, :]
        out = forward(net, xs)
        ls = None if labels is None else labels[..., sl].expand(net.n_configs, -1)
        total += loss_per_config(out, ys, ls, loss).double().cpu() * (sl.stop - sl.start)
        if labels is not None:
            correct += (out.argmax(-1) == ls).double().sum(-1).cpu()
    return total / n, None if labels is None else correct / n
