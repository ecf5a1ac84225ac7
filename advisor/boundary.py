"""The edge of the convergent region, measured from probe labels (THEORY.md §4, §8-9).

At each ``(sigma_w, batch_size)`` the fraction of seeds labelled ``convergent`` is read
along the learning-rate axis; the edge is the largest learning rate whose fraction
reaches ``confidence`` (the paper's 68% contour), interpolated in log-log towards the
next probed rate. Two edges explain a real network (§9): a noise edge in
``T = lr / B`` (small batches) and a curvature edge in ``lr`` alone (large batches).
From the measured edges ``lr_e(B)``, ``T_c = max_B lr_e(B) / B`` and
``lr_max = max_B lr_e(B)``, and the edge anywhere is ``min(T_c * B, lr_max)``: it
reproduces every measured point when the two-edge picture holds and is conservative
when only one batch size was probed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from advisor import theory
from advisor.probe import NetworkFactory, Probes, StackedData

CONVERGENT = "convergent"


def crossing(axis: np.ndarray, fraction: np.ndarray, confidence: float) -> tuple[float, bool]:
    """Largest ``axis`` value (sorted ascending) where ``fraction >= confidence``, moved
    log-linearly towards the next value by where the fraction crosses ``confidence``.
    Returns ``(edge, censored)``; censored when even the largest value is inside
    (the edge lies beyond the probed range); NaN when no value is inside."""
    ok = np.flatnonzero(fraction >= confidence)
    if len(ok) == 0:
        return math.nan, False
    i = ok[-1]
    if i == len(axis) - 1:
        return float(axis[i]), True
    t = (fraction[i] - confidence) / (fraction[i] - fraction[i + 1])
    return float(np.exp(np.log(axis[i]) + t * (np.log(axis[i + 1]) - np.log(axis[i])))), False


@dataclass(frozen=True)
class EdgeTable:
    """Edges of an ``inside`` region along one axis, per ``(sigma_w, batch_size)``."""

    sigma_w: np.ndarray   # (n_sigma,)
    batch_size: np.ndarray  # (n_batch,)
    edge: np.ndarray      # (n_sigma, n_batch), NaN where nothing is inside
    censored: np.ndarray  # (n_sigma, n_batch)


def edge_table(
    axis: np.ndarray, inside: np.ndarray, sigma_w: np.ndarray, batch_size: np.ndarray, confidence: float
) -> EdgeTable:
    """Per ``(sigma_w, batch_size)``: the seed fraction ``inside`` at each ``axis`` value
    (lr, or T for the theory edge) and its :func:`crossing`."""
    sigmas, batches = np.unique(sigma_w), np.unique(batch_size)
    edge = np.full((len(sigmas), len(batches)), math.nan)
    censored = np.zeros_like(edge, dtype=bool)
    for i, s in enumerate(sigmas):
        for j, b in enumerate(batches):
            at = (sigma_w == s) & (batch_size == b)
            values = np.unique(axis[at])
            fraction = np.array([inside[at & (axis == v)].mean() for v in values])
            edge[i, j], censored[i, j] = crossing(values, fraction, confidence)
    return EdgeTable(sigmas, batches, edge, censored)


@dataclass(frozen=True)
class Boundary:
    """The measured edge of the convergent region and what lies beyond it."""

    sigma_w: np.ndarray         # (n_sigma,)
    batch_size: np.ndarray      # (n_batch,)
    lr_edge: np.ndarray         # (n_sigma, n_batch) largest convergent lr, NaN: none
    censored: np.ndarray        # (n_sigma, n_batch) edge beyond the probed lrs
    confidence: float
    t_c: np.ndarray             # (n_sigma,) max_B lr_edge / B
    lr_max: np.ndarray          # (n_sigma,) max_B lr_edge
    beyond: list[str]           # (n_sigma,) majority phase of the probes above the edge
    disorder_limit: float | None  # smallest sigma_w from which no lr converges
    limit_phase: str | None     # what the probes show there (frozen or divergent)
    scaling: str                # temperature | lr | undetermined: what the edge follows in B

    def lr_edge_at(self, batch_size: float, sigma_w: float) -> float:
        """``min(T_c * B, lr_max)``, interpolated in log-log between probed ``sigma_w``
        (held constant outside their range); NaN at or past the disorder limit."""
        if self.disorder_limit is not None and sigma_w >= self.disorder_limit:
            return math.nan
        edges = np.minimum(self.t_c * batch_size, self.lr_max)
        ok = np.isfinite(edges)
        if not ok.any():
            return math.nan
        log_edge = np.interp(np.log(sigma_w), np.log(self.sigma_w[ok]), np.log(edges[ok]))
        return float(np.exp(log_edge))

    def phase_of(self, lr: float, batch_size: float, sigma_w: float, margin: float = 0.0) -> tuple[str, float]:
        """Predicted phase of ``(lr, batch_size, sigma_w)`` and its distance to the edge in
        octaves ``log2(lr_edge / lr)`` (positive inside). ``convergent`` needs at least
        ``margin`` octaves of room; beyond the edge, the phase the probes showed there."""
        edge = self.lr_edge_at(batch_size, sigma_w)
        if math.isnan(edge):
            return self.limit_phase or "divergent", math.nan
        octaves = math.log2(edge / lr)
        if octaves >= margin:
            return CONVERGENT, octaves
        nearest = int(np.argmin(np.abs(np.log(self.sigma_w) - math.log(sigma_w))))
        return self.beyond[nearest], octaves

    @classmethod
    def from_dict(cls, d: dict) -> Boundary:
        """Inverse of :meth:`to_dict` (a boundary stored with a study)."""

        def arr(key: str) -> np.ndarray:
            return np.array(d[key], dtype=float)

        return cls(
            arr("sigma_w"), np.array(d["batch_size"], dtype=int), arr("lr_edge"), np.array(d["censored"], dtype=bool),
            float(d["confidence"]), arr("t_c"), arr("lr_max"), list(d["beyond"]), d["disorder_limit"],
            d["limit_phase"], d["scaling"],
        )

    def to_dict(self) -> dict:
        return {
            "sigma_w": self.sigma_w.tolist(),
            "batch_size": self.batch_size.tolist(),
            "lr_edge": nan_to_none(self.lr_edge),
            "censored": self.censored.tolist(),
            "confidence": self.confidence,
            "t_c": nan_to_none(self.t_c),
            "lr_max": nan_to_none(self.lr_max),
            "beyond": self.beyond,
            "disorder_limit": self.disorder_limit,
            "limit_phase": self.limit_phase,
            "scaling": self.scaling,
        }


def fit_boundary(
    sigma_w: np.ndarray,
    lr: np.ndarray,
    batch_size: np.ndarray,
    phases: np.ndarray,
    confidence: float = 0.68,
) -> Boundary:
    """The convergent region's edge from probe labels (one row per probe)."""
    table = edge_table(lr, phases == CONVERGENT, sigma_w, batch_size, confidence)
    with np.errstate(all="ignore"):
        per_t = table.edge / table.batch_size[None, :]
        t_c = _nanmax(per_t)
        lr_max = _nanmax(table.edge)
    beyond = []
    for i, s in enumerate(table.sigma_w):
        edge_lr = np.nan_to_num(table.edge[i], nan=0.0)
        above = (sigma_w == s) & (lr > edge_lr[np.searchsorted(table.batch_size, batch_size)]) & (phases != CONVERGENT)
        labels, counts = np.unique(phases[above], return_counts=True)
        beyond.append(str(labels[np.argmax(counts)]) if len(labels) else "divergent")
    dead = np.all(np.isnan(table.edge), axis=1)
    k = len(dead)
    while k > 0 and dead[k - 1]:
        k -= 1
    limit, limit_phase = None, None
    if k < len(dead):
        limit = float(table.sigma_w[k])
        labels, counts = np.unique(phases[sigma_w >= limit], return_counts=True)
        limit_phase = str(labels[np.argmax(counts)])
    return Boundary(
        table.sigma_w, table.batch_size, table.edge, table.censored, confidence, t_c, lr_max,
        beyond, limit, limit_phase, _scaling(table),
    )


def _nanmax(a: np.ndarray) -> np.ndarray:
    ok = np.isfinite(a).any(axis=1)
    out = np.full(a.shape[0], math.nan)
    out[ok] = np.nanmax(a[ok], axis=1)
    return out


def _scaling(table: EdgeTable) -> str:
    """Whether the edge keeps ``lr / B`` (noise) or ``lr`` (curvature) fixed across batch
    sizes: the one whose log spread over B is smaller, median over sigma_w."""
    usable = np.isfinite(table.edge).sum(axis=1) >= 2
    if len(table.batch_size) < 2 or not usable.any():
        return "undetermined"
    log_lr = np.log(table.edge[usable])
    log_t = log_lr - np.log(table.batch_size)[None, :]
    spread_lr = np.nanmedian(np.nanstd(log_lr, axis=1))
    spread_t = np.nanmedian(np.nanstd(log_t, axis=1))
    return "temperature" if spread_t < spread_lr else "lr"


def nan_to_none(a: np.ndarray) -> list:
    """``a.tolist()`` with NaN and inf as None (JSON)."""
    return np.where(np.isfinite(a), a, None).tolist()


@dataclass(frozen=True)
class TheoryEdges:
    """The three theory edges per probed ``sigma_w`` (THEORY.md §4, §5, §9)."""

    sigma_w: np.ndarray
    t_c: np.ndarray             # noise edge: T where the ordered fraction crosses confidence
    t_c_censored: np.ndarray    # (n_sigma,) the edge lies beyond the largest finite probe's T
    t_c_probes: np.ndarray      # (n_sigma, 3) 16/50/84% quantiles of the probes' network T_c
    lambda_0: np.ndarray        # median Hessian top eigenvalue at initialisation
    lazy_lr: np.ndarray         # 2 / lambda_0
    catapult_lr: np.ndarray     # c / lambda_0
    preactivation: np.ndarray   # median largest hidden pre-activation variance at init
    disorder_limit: float | None  # sigma_w where the disorder threshold is crossed
    disorder_rule: str
    probe_t_c: np.ndarray       # (P,) network T_c of every probe at its final weights

    def to_dict(self) -> dict:
        return {
            "sigma_w": self.sigma_w.tolist(),
            "t_c": nan_to_none(self.t_c),
            "t_c_censored": self.t_c_censored.tolist(),
            "t_c_probes": nan_to_none(self.t_c_probes),
            "lambda_0": nan_to_none(self.lambda_0),
            "lazy_lr": nan_to_none(self.lazy_lr),
            "catapult_lr": nan_to_none(self.catapult_lr),
            "preactivation": nan_to_none(self.preactivation),
            "disorder_limit": self.disorder_limit,
            "disorder_rule": self.disorder_rule,
        }


def distance_octaves(theory: np.ndarray, measured: np.ndarray) -> list:
    """``log2(theory / measured)`` per entry (None where either is missing)."""
    with np.errstate(all="ignore"):
        return nan_to_none(np.log2(np.asarray(theory, float) / np.asarray(measured, float)))


def theory_edges(
    probes: Probes,
    build: NetworkFactory,
    data: StackedData,
    loss: str,
    confidence: float = 0.68,
    catapult_factor: float = theory.CATAPULT_FACTOR,
    heldout: int = 128,
    curvature_samples: int = 512,
) -> TheoryEdges:
    """Evaluate the theory on the probes.

    Noise (§4): the network ``T_c`` of every probe that did not diverge, at its final
    weights on ``heldout`` validation inputs; a probe is *ordered* when ``T <= T_c``, and
    the edge is where the seed fraction of ordered probes crosses ``confidence`` along
    ``T`` (as the paper). It is *censored* where every probe that stayed finite is
    ordered: the estimator then only says "at least the largest finite probe's T".
    Curvature (§9) and disorder (§5): at initialisation, per ``sigma_w`` and seed.
    """
    source = torch.as_tensor(probes.source)
    dtype = probes.networks.weights[0].dtype
    x, y, labels = data.validation(source, heldout)
    sigma_t = torch.as_tensor(probes.sigma_w, dtype=dtype)
    t_c = theory.critical_temperature(probes.networks, x, y, labels, loss, sigma_t).network.cpu().numpy()
    t_c[probes.diverged] = math.nan
    finite = ~probes.diverged
    sigmas = np.unique(probes.sigma_w)
    noise, noise_censored = np.full(len(sigmas), math.nan), np.zeros(len(sigmas), dtype=bool)
    if finite.any():
        ordered = probes.temperature <= np.nan_to_num(t_c, nan=-np.inf)
        table = edge_table(probes.temperature[finite], ordered[finite], probes.sigma_w[finite],
                           probes.batch_size[finite], confidence)
        for i, s in enumerate(table.sigma_w):
            if np.isfinite(table.edge[i]).any():
                k = int(np.nanargmax(table.edge[i]))
                j = int(np.searchsorted(sigmas, s))
                noise[j], noise_censored[j] = table.edge[i, k], table.censored[i, k]
    spread = theory.seed_spread(torch.as_tensor(t_c), torch.as_tensor(np.searchsorted(sigmas, probes.sigma_w)))
    quantiles = torch.stack([spread.low, spread.median, spread.high], 1).numpy()

    seeds = np.unique(probes.seed)
    sig = np.repeat(sigmas, len(seeds))
    seed_col = np.tile(seeds, len(sigmas))
    src = torch.as_tensor([int(probes.source[probes.seed == sd][0]) for sd in seed_col])
    init = build(torch.as_tensor(sig, dtype=dtype), seed_col.tolist(), src).to(x.device)
    xc, yc, lc = data.training(src, curvature_samples)
    lam = theory.hessian_top_eigenvalue(init, xc, yc, lc, loss).cpu().numpy()
    edges = theory.curvature_edges(torch.as_tensor(lam), catapult_factor)
    variances = theory.preactivation_variances(init, xc)
    hidden = [v for v, trained in list(zip(variances.values(), init.trainable))[:-1] if trained]
    s2 = torch.stack(hidden).amax(0).cpu().numpy() if hidden else np.full(len(sig), math.nan)
    grows = theory.forward_signal_grows(variances).cpu().numpy()

    def per_sigma(values: np.ndarray) -> np.ndarray:
        return np.array([np.nanmedian(values[sig == s]) if np.isfinite(values[sig == s]).any() else math.nan for s in sigmas])

    preact = per_sigma(s2)
    limit, rule = _disorder_limit(sigmas, preact, per_sigma(grows.astype(float)), probes.networks.activation)
    return TheoryEdges(
        sigmas, noise, noise_censored, quantiles, per_sigma(lam), per_sigma(edges.lazy.numpy()),
        per_sigma(edges.catapult.numpy()), preact, limit, rule, t_c,
    )


def _disorder_limit(sigma: np.ndarray, preact: np.ndarray, grows: np.ndarray, activation: str) -> tuple[float | None, str]:
    """tanh: the ``sigma_w`` where the largest hidden pre-activation variance crosses
    1/2 (log-log interpolation; THEORY.md §5); relu: the first ``sigma_w`` whose forward
    signal grows layer over layer; identity: none."""
    if activation == "tanh":
        above = np.flatnonzero(preact > theory.TANH_JAMMING)
        if len(above) == 0:
            return None, "tanh: s_z^2 > 1/2 nowhere on the grid"
        i = above[0]
        if i == 0:
            return float(sigma[0]), "tanh: s_z^2 > 1/2 from the smallest sigma_w"
        t = (np.log(theory.TANH_JAMMING) - np.log(preact[i - 1])) / (np.log(preact[i]) - np.log(preact[i - 1]))
        return float(np.exp(np.log(sigma[i - 1]) + t * (np.log(sigma[i]) - np.log(sigma[i - 1])))), "tanh: s_z^2 = 1/2"
    if activation == "relu":
        grows_at = np.flatnonzero(grows > 0.5)
        return (float(sigma[grows_at[0]]), "relu: forward signal grows") if len(grows_at) else (None, "relu: no growth on the grid")
    return None, f"{activation}: no disorder threshold"
