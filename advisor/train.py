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
from advisor.models import ACTIVATION_SLOPES, Network, forward, layer_io

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


def loss_and_grads(
    net: Network, x: Tensor, targets: Tensor, labels: Tensor | None, kind: str
) -> tuple[Tensor, list[Tensor]]:
    """Losses ``(P,)`` and their gradients, in ``net.parameters()`` order, by batched
    backpropagation written out (no autograd graph: the per-step cost of a probe grid is
    dominated by the number of tensor operations, not by their size)."""
    io = layer_io(net, x)
    out = io[-1][1]
    lp = loss_per_config(out, targets, labels, kind)
    # d loss / d out: mse -> (out - y) / B; cross-entropy -> (softmax(out) - onehot) / B
    g = (out - targets if kind == "mse" else out.softmax(-1) - targets) / out.shape[1]
    first = net.trainable.index(True)
    slope = ACTIVATION_SLOPES[net.activation]
    w_grads: dict[int, Tensor] = {}
    b_grads: dict[int, Tensor] = {}
    for i in reversed(range(first, len(io))):
        a = io[i][0]
        if net.trainable[i]:
            w_grads[i] = g.transpose(-1, -2) @ a
            if net.biases[i] is not None:
                b_grads[i] = g.sum(1)
        if i > first:
            g = (g @ net.weights[i]) * slope(a)
    return lp, [w_grads[i] for i in sorted(w_grads)] + [b_grads[i] for i in sorted(b_grads)]


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
    source: Tensor | None = None,
) -> TrainResult:
    """Train every configuration of ``net`` for ``steps`` minibatch steps.

    ``x``/``targets``/``labels`` are one shared data set ``(N, ...)`` or a stack of data
    sets ``(S, N, ...)``, configuration ``p`` using ``source[p]``; ``targets`` are the
    regression targets (one-hot rows for classification). ``lr`` is a scalar or ``(P,)``;
    ``seeds`` fixes each configuration's data order. ``observe(step, net)`` is called
    before the first step (``step = 0``) and after every step. ``progress`` labels a
    progress bar (None: no bar).
    """
    p_count = net.n_configs
    n_train = x.shape[-2]
    dev, dtype = net.weights[0].device, net.weights[0].dtype
    lr = torch.as_tensor(lr, dtype=dtype, device=dev).expand(p_count).clone()
    check_hyperparameters(lr, batch_size, n_train, loss)
    require(loss == "mse" or labels is not None, "train.loss", "mse for a regression dataset", loss)
    stacked = x.ndim == 3
    if not stacked:
        x, targets = x[None], targets[None]
    src = (source if source is not None else torch.zeros(p_count, dtype=torch.long)).to(dev)[:, None]
    orders = data_orders(n_train, seeds, dev)
    n_batches = n_train // batch_size
    params = [t.detach().clone() for t in net.parameters()]
    velocity = [torch.zeros_like(t) for t in params] if momentum else []
    alive = torch.ones(p_count, dtype=torch.bool, device=dev)
    losses = torch.empty(p_count, steps, dtype=torch.float32, device=dev)
    grad_sq = torch.zeros(p_count, steps, dtype=torch.float32, device=dev)
    current = net.with_parameters(params)
    if observe:
        observe(0, current)
    for step in tqdm(range(steps), desc=progress, disable=progress is None, leave=False):
        k = step % n_batches
        idx = orders[:, k * batch_size : (k + 1) * batch_size]
        lb = None if labels is None else labels[idx] if not stacked else labels[src, idx]
        lp, grads = loss_and_grads(current, x[src, idx], targets[src, idx], lb, loss)
        losses[:, step] = lp
        bad = ~(lp <= blowup) & alive
        any_bad = bool(bad.any())
        if any_bad:
            alive &= ~bad
            lr.masked_fill_(bad, 0.0)
        for i, (t, g) in enumerate(zip(params, grads)):
            grad_sq[:, step] += g.reshape(p_count, -1).square().sum(-1)
            if weight_decay:
                g = g + weight_decay * t
            if momentum:
                velocity[i].mul_(momentum).add_(g)
                g = velocity[i]
            shape = (-1,) + (1,) * (t.ndim - 1)
            t.sub_(lr.view(shape) * g)
            if any_bad:
                t.masked_fill_(bad.view(shape), 0.0)
        if observe:
            observe(step + 1, current)
    losses, grad_norms = losses.cpu(), grad_sq.sqrt_().cpu()
    failed = ~(losses <= blowup)
    diverged_at = torch.where(failed.any(1), failed.float().argmax(1), -1)
    after = torch.arange(steps)[None, :] >= torch.where(diverged_at >= 0, diverged_at, steps)[:, None]
    losses[after], grad_norms[after] = float("nan"), float("nan")
    return TrainResult(net.with_parameters(params), losses, grad_norms, diverged_at)


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
