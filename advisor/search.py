"""The Optuna side: the search space restricted to the convergent region, storage, and the
spectral pruner.

Restricted mode (the default) keeps every distribution static for the whole study, as
TPE and CMA-ES need (DESIGN.md): it samples ``batch_size``, ``sigma_w`` inside the
non-frozen range and ``u = lr / lr_edge(batch_size, sigma_w)`` in ``[u_min, u_max]``,
with ``lr_edge`` the measured edge of the convergent region, and derives
``lr = u * lr_edge``. The optimum usually lies a few powers of two below the edge
(THEORY.md §8). Constrained mode samples the raw box and marks predicted
non-convergent points infeasible through ``trial.set_constraint``; full mode is the
unrestricted baseline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from optuna.pruners import BasePruner
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

from advisor.boundary import CONVERGENT, Boundary, nan_to_none
from advisor.errors import ConfigError, require, require_choice

MODES = ("restricted", "constrained", "full")
DIRECTIONS = ("minimize", "maximize")


@dataclass(frozen=True)
class SearchSpace:
    """Static Optuna distributions and how to turn a sampled point into hyperparameters."""

    mode: str
    distributions: dict[str, BaseDistribution]
    boundary: Boundary
    extra_keys: dict[str, str] = field(default_factory=dict)  # sampled name -> config key

    def hyperparameters(self, params: Mapping[str, object]) -> dict[str, object]:
        """``lr``, ``batch_size``, ``sigma_w`` (and the extra keys) of a sampled point."""
        b, s = int(params["batch_size"]), float(params["sigma_w"])
        lr = float(params["u"]) * self.boundary.lr_edge_at(b, s) if self.mode == "restricted" else float(params["lr"])
        return {"lr": lr, "batch_size": b, "sigma_w": s, **{k: params[k] for k in self.extra_keys}}

    def to_json(self) -> dict:
        """Each distribution in Optuna's JSON form, plus how ``lr`` is derived."""
        doc = {"mode": self.mode, "distributions": {k: distribution_to_json(d) for k, d in self.distributions.items()}}
        if self.mode == "restricted":
            doc["lr"] = "u * lr_edge(batch_size, sigma_w), lr_edge = min(T_c(sigma_w) * batch_size, lr_max(sigma_w))"
            doc["edge"] = {"sigma_w": self.boundary.sigma_w.tolist(), "t_c": nan_to_none(self.boundary.t_c),
                           "lr_max": nan_to_none(self.boundary.lr_max)}
        doc["extra_keys"] = self.extra_keys
        return doc

    def sweep_overrides(self, n_lr: int = 4) -> list[str]:
        """Hydra multirun override lines covering the space: per batch size and probed
        ``sigma_w``, ``n_lr`` geometric learning rates over the sampled lr range."""
        lines = []
        lo, hi = span(self.distributions["sigma_w"])
        for b in self.distributions["batch_size"].choices:  # type: ignore[attr-defined]
            for s in self.boundary.sigma_w:
                if not lo <= s <= hi:
                    continue
                lo, hi = self._lr_range(int(b), float(s))
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    continue
                lrs = ",".join(f"{v:.4g}" for v in np.geomspace(lo, hi, n_lr))
                lines.append(f"train.batch_size={b} model.sigma_w={s:g} train.lr={lrs}")
        return lines

    def _lr_range(self, b: int, s: float) -> tuple[float, float]:
        if self.mode == "restricted":
            edge = self.boundary.lr_edge_at(b, s)
            u_lo, u_hi = span(self.distributions["u"])
            return u_lo * edge, u_hi * edge
        return span(self.distributions["lr"])


def build_space(
    mode: str,
    boundary: Boundary,
    probe_lr: Sequence[float],
    u_range: tuple[float, float],
    extra: Mapping[str, BaseDistribution] | None = None,
    extra_keys: Mapping[str, str] | None = None,
) -> SearchSpace:
    """The study's static space. ``restricted``: batch size, ``sigma_w`` over the probed
    values with a convergent edge below the disorder limit, ``u``; ``constrained`` and
    ``full``: batch size, ``sigma_w`` and ``lr`` over the probed box."""
    require_choice(mode, "search.mode", MODES)
    u_min, u_max = u_range
    require(0 < u_min < u_max < 1, "search.u_min/search.u_max", "0 < u_min < u_max < 1", (u_min, u_max))
    batch = CategoricalDistribution([int(b) for b in boundary.batch_size])
    if mode == "restricted":
        ok = np.isfinite(boundary.t_c) & np.isfinite(boundary.lr_max)
        if boundary.disorder_limit is not None:
            ok &= boundary.sigma_w < boundary.disorder_limit
        if not ok.any():
            raise ConfigError(
                "probe: no probed sigma_w has a convergent learning rate; widen probe.lr "
                "(smaller values) or probe.sigma_w, or use search.mode=full"
            )
        dists: dict[str, BaseDistribution] = {
            "batch_size": batch,
            "sigma_w": _log_range(boundary.sigma_w[ok]),
            "u": FloatDistribution(u_min, u_max, log=True),
        }
    else:
        dists = {
            "batch_size": batch,
            "sigma_w": _log_range(boundary.sigma_w),
            "lr": FloatDistribution(min(probe_lr), max(probe_lr), log=True),
        }
    dists.update(extra or {})
    return SearchSpace(mode, dists, boundary, dict(extra_keys or {}))


def span(d: BaseDistribution) -> tuple[float, float]:
    """Smallest and largest value a numeric distribution can give."""
    if isinstance(d, CategoricalDistribution):
        return min(d.choices), max(d.choices)  # type: ignore[type-var, return-value]
    return d.low, d.high  # type: ignore[attr-defined]


def _log_range(values: np.ndarray) -> BaseDistribution:
    lo, hi = float(np.min(values)), float(np.max(values))
    return FloatDistribution(lo, hi, log=True) if hi > lo else CategoricalDistribution([lo])


def extra_distribution(key: str, spec: Mapping[str, object]) -> BaseDistribution:
    """``search.params.<name>``: ``{type: int|float|categorical, low, high, log, choices}``."""
    kind = spec.get("type")
    require_choice(kind, f"search.params.{key}.type", ("int", "float", "categorical"))
    if kind == "categorical":
        return CategoricalDistribution(list(spec["choices"]))  # type: ignore[arg-type]
    cls = IntDistribution if kind == "int" else FloatDistribution
    return cls(spec["low"], spec["high"], log=bool(spec.get("log", False)))  # type: ignore[arg-type]


def storage_from(url: str | None) -> optuna.storages.BaseStorage | str | None:
    """``None``: in memory; ``*.log`` / ``journal:PATH``: a journal file; anything else
    (``sqlite:///...``, ``postgresql://...``): an RDB URL."""
    if url is None:
        return None
    if url.startswith("journal:") or url.endswith(".log"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    require("://" in url, "search.storage", "null, sqlite:///FILE, postgresql://..., journal:FILE or FILE.log", url)
    return url


# --------------------------------------------------------------------------- pruner


@dataclass(frozen=True)
class SpectralVerdict:
    """Why a running trial left the convergent phase."""

    phase: str
    reason: str


def spectral_verdict(
    history: Mapping[str, Sequence[float]],
    best_value: float | None,
    direction: str,
    warmup: int = 4,
    spreading: float = 0.1,
    loss_trend: float = 0.0,
    excess: float = 1.0,
) -> SpectralVerdict | None:
    """Phase signature of a trial so far (THEORY.md §6, the classifier's rules on one
    trajectory): ``history`` holds ``steps``, ``loss`` (held-out), ``x_max`` and
    ``spacing`` (largest over layers) at each report. After ``warmup`` reports:
    ``divergent`` on a non-finite loss; ``oscillatory`` when over the last third of the
    reports ``log x_max`` or ``log`` mean spacing grew by more than ``spreading`` while
    the loss did not fall (log-change above ``loss_trend``), or when the loss sits
    ``excess`` decades above the study's best (minimize only)."""
    loss = np.asarray(history["loss"], dtype=float)
    if len(loss) and not np.isfinite(loss[-1]):
        return SpectralVerdict("divergent", f"non-finite held-out loss at step {history['steps'][-1]}")
    if len(loss) <= warmup:
        return None
    k = max(2, len(loss) // 3)
    with np.errstate(all="ignore"):
        grow = max(np.log(history[key][-1] / history[key][-k]) for key in ("x_max", "spacing"))
        trend = math.log(loss[-1] / loss[-k])
    if grow > spreading and trend > loss_trend:
        return SpectralVerdict(
            "oscillatory", f"levels spread by {grow:.2f} (log) over the last {k} reports while the loss changed by {trend:+.2f}"
        )
    if direction == "minimize" and best_value is not None and best_value > 0:
        decades = math.log10(loss[-1] / best_value)
        if decades > excess:
            return SpectralVerdict("oscillatory", f"held-out loss {decades:.1f} decades above the study's best")
    return None


class SpectralPruner(BasePruner):
    """Prunes a trial whose spectral dynamics leave the convergent phase (see
    :func:`spectral_verdict`). The trial stores its history in the user attribute
    ``spectral``; the objective records the verdict's reason on the pruned trial."""

    def __init__(self, warmup: int = 4, spreading: float = 0.1, loss_trend: float = 0.0, excess: float = 1.0):
        self.settings = {"warmup": warmup, "spreading": spreading, "loss_trend": loss_trend, "excess": excess}

    def verdict(self, study: optuna.Study, user_attrs: Mapping[str, object]) -> SpectralVerdict | None:
        """The verdict on a trial with these user attributes (None: keep going)."""
        history = user_attrs.get("spectral")
        if not history:
            return None
        return spectral_verdict(history, _best_value(study), study.direction.name.lower(), **self.settings)  # type: ignore[arg-type]

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.verdict(study, trial.user_attrs) is not None


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:
        return None


def inside_fraction(space: SearchSpace, trials: Sequence[FrozenTrial], k: int) -> dict:
    """Theory check: of the top ``k`` complete trials, how many the boundary predicts
    convergent, and their distance to the edge in octaves (``log2(lr_edge / lr)``)."""
    rows = []
    for t in trials[:k]:
        hp = space.hyperparameters(t.params)
        phase, octaves = space.boundary.phase_of(hp["lr"], hp["batch_size"], hp["sigma_w"])
        rows.append({"number": t.number, "value": t.value, "predicted_phase": phase,
                     "octaves_below_edge": None if math.isnan(octaves) else octaves})
    inside = sum(r["predicted_phase"] == CONVERGENT for r in rows)
    return {"top_k": len(rows), "inside": inside, "trials": rows}
