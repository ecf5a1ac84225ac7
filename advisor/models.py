"""Fully connected networks, stacked: P independent configurations in one set of tensors.

A :class:`Network` holds each layer's weight as a ``(P, fan_out, fan_in)`` tensor, so
one batched matmul per layer runs every configuration of a probe grid at once; the
sequential case is ``P = 1``. Hidden layers apply the activation, the read-out is
linear. Weights start as ``W ~ N(0, sigma_w^2 / fan_in)`` (THEORY.md §1), biases at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from advisor.errors import require, require_choice

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda z: z}
# d act / d z written in terms of the activation's output a = act(z)
ACTIVATION_SLOPES = {
    "tanh": lambda a: 1 - a.square(),
    "relu": lambda a: (a > 0).to(a.dtype),
    "identity": lambda a: torch.ones_like(a),
}


@dataclass
class Network:
    """Layer ``i`` maps ``h -> act(h @ weights[i]^T + biases[i])`` (no act on the last)."""

    names: list[str]
    weights: list[Tensor]
    biases: list[Tensor | None]
    trainable: list[bool]
    activation: str

    @property
    def n_configs(self) -> int:
        return self.weights[0].shape[0]

    def parameters(self) -> list[Tensor]:
        """Trainable tensors (weights, then their biases), each ``(P, ...)``."""
        params = [w for w, t in zip(self.weights, self.trainable) if t]
        return params + [b for b, t in zip(self.biases, self.trainable) if t and b is not None]

    def with_parameters(self, params: Sequence[Tensor]) -> Network:
        """The same network with its trainable tensors replaced, in ``parameters()`` order."""
        it = iter(params)
        weights = [next(it) if t else w for w, t in zip(self.weights, self.trainable)]
        biases = [
            next(it) if t and b is not None else b for b, t in zip(self.biases, self.trainable)
        ]
        return replace(self, weights=weights, biases=biases)

    def to(self, device: torch.device) -> Network:
        return replace(
            self,
            weights=[w.to(device) for w in self.weights],
            biases=[None if b is None else b.to(device) for b in self.biases],
        )

    def select(self, index: Tensor | slice | list[int]) -> Network:
        """The sub-stack of configurations ``index``."""
        return replace(
            self,
            weights=[w[index] for w in self.weights],
            biases=[None if b is None else b[index] for b in self.biases],
        )


def concat(nets: Sequence[Network]) -> Network:
    """The configurations of several stacks of one architecture, as one stack."""
    first = nets[0]
    return replace(
        first,
        weights=[torch.cat([n.weights[i] for n in nets]) for i in range(len(first.weights))],
        biases=[
            None if b is None else torch.cat([n.biases[i] for n in nets]) for i, b in enumerate(first.biases)
        ],
    )


def forward(net: Network, x: Tensor) -> Tensor:
    """Outputs ``(P, N, n_out)`` for inputs ``(N, d)`` (shared) or ``(P, N, d)``."""
    return layer_io(net, x)[-1][1]


def layer_io(net: Network, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer, its input ``a`` ``(P, N, fan_in)`` and pre-activation ``z = a W^T + b``
    ``(P, N, fan_out)``, in order; the last ``z`` is the network's output."""
    act = ACTIVATIONS[net.activation]
    a = x.expand(net.n_configs, *x.shape[-2:])
    io = []
    for i, (w, b) in enumerate(zip(net.weights, net.biases)):
        z = a @ w.transpose(-1, -2)
        if b is not None:
            z = z + b[:, None, :]
        io.append((a, z))
        if i < len(net.weights) - 1:
            a = act(z)
    return io


def trainable_weights(net: Network) -> dict[str, Tensor]:
    """The trained weight matrices by layer name, each ``(P, fan_out, fan_in)``."""
    return {n: w for n, w, t in zip(net.names, net.weights, net.trainable) if t}


def mlp(
    n_in: int,
    n_out: int,
    widths: Sequence[int],
    activation: str,
    sigma_w: Tensor | float,
    seeds: Sequence[int],
    bias: bool = True,
    train_layers: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Network:
    """An MLP ``n_in -> widths... -> n_out`` per seed; layers named ``fc1, fc2, ...``.

    ``train_layers`` names the layers that train (all when None).
    """
    require_choice(activation, "model.activation", ACTIVATIONS)
    require(all(int(w) > 0 for w in widths), "model.widths", "a list of positive integers", list(widths))
    sizes = [n_in, *map(int, widths), n_out]
    names = [f"fc{i + 1}" for i in range(len(sizes) - 1)]
    if train_layers is None:
        train_layers = names
    unknown = [n for n in train_layers if n not in names]
    require(not unknown, "model.train_layers", "a subset of " + ", ".join(names), list(train_layers))
    sigma = _sigma_per_config(sigma_w, len(seeds), dtype)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    weights = [_init(gens, fan_out, fan_in, sigma, dtype) for fan_in, fan_out in zip(sizes, sizes[1:])]
    biases = [torch.zeros(len(seeds), k, dtype=dtype) if bias else None for k in sizes[1:]]
    return Network(names, weights, biases, [n in train_layers for n in names], activation)


def teacher_student(
    teachers: Sequence[dict[str, Tensor]],
    sigma_w: Tensor | float,
    seeds: Sequence[int],
    dtype: torch.dtype = torch.float64,
) -> Network:
    """The paper's student ``y = Z tanh(W tanh(M x))`` (THEORY.md §7), one per teacher.

    ``M`` and ``Z`` are the teacher's, frozen; only ``W`` (K x L, no bias) trains.
    """
    sigma = _sigma_per_config(sigma_w, len(seeds), dtype)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    k, l = teachers[0]["W_star"].shape
    m = torch.stack([t["M"] for t in teachers]).to(dtype)
    z = torch.stack([t["Z"] for t in teachers]).to(dtype)
    w = _init(gens, k, l, sigma, dtype)
    return Network(["M", "W", "Z"], [m, w, z], [None, None, None], [False, True, False], "tanh")


def _sigma_per_config(sigma_w: Tensor | float, n: int, dtype: torch.dtype) -> Tensor:
    sigma = torch.as_tensor(sigma_w, dtype=dtype)
    sigma = sigma.expand(n) if sigma.ndim == 0 else sigma
    bad = sigma[~(sigma > 0)]
    require(len(bad) == 0, "model.sigma_w", "> 0", bad[0].item() if len(bad) else None)
    return sigma


def _init(gens: list[torch.Generator], fan_out: int, fan_in: int, sigma: Tensor, dtype: torch.dtype) -> Tensor:
    """``(P, fan_out, fan_in)`` with entries N(0, sigma_p^2 / fan_in), one generator per config."""
    raw = torch.stack([torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64) for g in gens])
    return (raw * (sigma.to(torch.float64) / fan_in**0.5)[:, None, None]).to(dtype)
