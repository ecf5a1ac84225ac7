"""Hydra config -> validated plain values. Only the entry points and this module read config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from advisor import data, models
from advisor.errors import ConfigError, require, require_choice
from advisor.models import Network
from advisor.phases import Thresholds
from advisor.probe import NetworkFactory, ProbeGrid
from advisor.train import LOSSES, resolve_device

DATASETS = ("teacher_student", "digits", "cifar")
MODELS = ("mlp", "teacher_student")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TrainSettings:
    """The ``train`` section as values."""

    lr: float
    batch_size: int
    steps: int
    loss: str
    momentum: float
    weight_decay: float
    device: torch.device
    dtype: torch.dtype
    blowup: float


def train_settings(cfg: DictConfig) -> TrainSettings:
    t = cfg.train
    require(t.lr > 0, "train.lr", "> 0", t.lr)
    require(t.batch_size > 0, "train.batch_size", "a positive integer", t.batch_size)
    require(t.steps > 0, "train.steps", "a positive integer", t.steps)
    require_choice(t.loss, "train.loss", LOSSES)
    require_choice(t.dtype, "train.dtype", DTYPES)
    require(t.momentum >= 0, "train.momentum", ">= 0", t.momentum)
    require(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    require_choice(t.device, "train.device", ("auto", "cpu", "cuda"))
    require(t.device != "cuda" or torch.cuda.is_available(), "train.device", "auto or cpu here (no CUDA device)", t.device)
    return TrainSettings(
        float(t.lr), int(t.batch_size), int(t.steps), t.loss, float(t.momentum),
        float(t.weight_decay), resolve_device(t.device), DTYPES[t.dtype], float(t.blowup),
    )


def load_dataset(cfg: DictConfig, seed: int) -> data.Dataset:
    """The configured dataset (the teacher-student draws a new teacher per seed)."""
    d = cfg.dataset
    require_choice(d.name, "dataset", DATASETS)
    if d.name == "teacher_student":
        return data.teacher_student(seed, d.n_train, d.n_val, d.n_inputs, d.width_in, d.width_out)
    if d.name == "digits":
        return data.digits(d.n_train, d.val_fraction)
    return data.cifar(Path(d.root), d.download, d.n_train, d.n_val)


def load_datasets(cfg: DictConfig, seeds: Sequence[int]) -> list[data.Dataset]:
    """One dataset per seed for the teacher-student, one shared otherwise."""
    if cfg.dataset.name == "teacher_student":
        return [load_dataset(cfg, s) for s in seeds]
    return [load_dataset(cfg, seeds[0])]


def build_network(
    cfg: DictConfig,
    datasets: Sequence[data.Dataset],
    sigma_w: torch.Tensor | float,
    seeds: Sequence[int],
    dataset_index: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Network:
    """The configured model, one configuration per seed; configuration ``p`` sees
    ``datasets[dataset_index[p]]`` (default: the first)."""
    m = cfg.model
    require_choice(m.name, "model", MODELS)
    index = dataset_index if dataset_index is not None else [0] * len(seeds)
    first = datasets[index[0]]
    if m.name == "teacher_student":
        if first.name != "teacher_student":
            raise ConfigError(f"model=teacher_student needs dataset=teacher_student (got dataset={first.name})")
        return models.teacher_student([datasets[i].teacher for i in index], sigma_w, seeds, dtype)
    return models.mlp(
        first.n_features, first.n_outputs, list(m.widths), m.activation, sigma_w, seeds,
        bias=bool(m.bias), train_layers=None if m.train_layers is None else list(m.train_layers),
        dtype=dtype,
    )


def probe_grid(cfg: DictConfig) -> ProbeGrid:
    """The ``probe`` section's grid; seeds are ``seed, seed + 1, ...``."""
    p = cfg.probe
    require(int(p.seeds) > 0, "probe.seeds", "a positive integer", p.seeds)
    return ProbeGrid(
        tuple(float(s) for s in p.sigma_w), tuple(float(v) for v in p.lr),
        tuple(int(b) for b in p.batch_size), tuple(int(cfg.seed) + i for i in range(int(p.seeds))),
        int(p.steps),
    )


def thresholds(cfg: DictConfig) -> Thresholds:
    return Thresholds(**{k: float(v) for k, v in cfg.probe.thresholds.items()})


def network_factory(cfg: DictConfig, datasets: Sequence[data.Dataset], dtype: torch.dtype) -> NetworkFactory:
    """``build(sigma_w (P,), seeds, source (P,))`` for the configured model."""

    def build(sigma_w: torch.Tensor, seeds: list[int], source: torch.Tensor) -> Network:
        return build_network(cfg, datasets, sigma_w, seeds, source.tolist(), dtype)

    return build
