"""The advisor's three theory edges and the eigenvalue Langevin equation (THEORY.md §3-5, §9).

- **Noise edge** (§3-4): from per-sample gradients on a held-out batch, the drift
  ``K~ = mean_n D~_n`` and fluctuation ``V~_ij = var_n (D~_n)_ij`` of ``X = W W^T`` in its
  eigenbasis give ``T_c = Delta_MP * Dr / C`` per trainable layer; the network's
  ``T_c`` is the smallest over its layers.
- **Disorder** (§5): pre-activation variances, the tanh feature density and its
  jamming threshold ``s_z^2 = 1/2``, and forward-signal growth for ReLU.
- **Langevin** (§3): an Euler-Maruyama simulator of the eigenvalue dynamics.
- **Curvature edge** (§9): the top algebraic eigenvalue ``lambda_0`` of the training-loss
  Hessian, and the edges ``2/lambda_0`` (lazy) and ``c/lambda_0`` (catapult).

Functions take a stacked :class:`~advisor.models.Network` of ``P`` configurations and
return ``(P,)`` tensors; nothing here trains, logs or reads a config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from advisor.models import Network, forward, layer_io
from advisor.spectra import mp_mean_spacing
from advisor.train import loss_per_config

TANH_JAMMING = 0.5
"""Pre-activation variance ``s_z^2`` above which tanh features pile up at ``+-1`` (§5)."""

CATAPULT_FACTOR = 4.0
"""Default ``c`` of the catapult edge ``c / lambda_0``: plain GD is lazy below ``2/lambda_0``,
catapults up to roughly ``4/lambda_0`` and diverges beyond (Lewkowycz et al. 2020; up to
``~12/lambda_0`` reported for ReLU), THEORY.md §9."""


# --------------------------------------------------------------------------- noise edge


@dataclass(frozen=True)
class LayerNoise:
    """Pieces of the §4 criterion for one layer, levels in descending order (1 = top).

    ``drift``: diagonal of ``K~`` ``(P, n)``; ``fluctuation``: diagonal of ``V~``;
    ``fluctuation_top`` / ``fluctuation_bottom``: the first and last rows of ``V~``;
    ``dr``, ``c``, ``delta``, ``t_c``: ``(P,)``. ``n = min(K, L)``.
    """

    drift: Tensor
    fluctuation: Tensor
    fluctuation_top: Tensor
    fluctuation_bottom: Tensor
    dr: Tensor
    c: Tensor
    delta: Tensor
    t_c: Tensor


@dataclass(frozen=True)
class CriticalTemperature:
    """``T_c`` per trainable layer (by name) and for the network (min over layers)."""

    layers: dict[str, LayerNoise]
    network: Tensor

    @property
    def per_layer(self) -> dict[str, Tensor]:
        """``T_c`` ``(P,)`` by layer name."""
        return {name: layer.t_c for name, layer in self.layers.items()}


def critical_temperature(
    net: Network,
    x: Tensor,
    targets: Tensor,
    labels: Tensor | None,
    loss: str,
    sigma_w: Tensor | float,
) -> CriticalTemperature:
    """``T_c = Delta_MP(K, L, sigma_w) * Dr / C`` for every trainable layer (THEORY.md §4).

    Evaluated at the current weights on the held-out batch ``x`` ``(N, d)`` or
    ``(P, N, d)``; ``sigma_w`` is each configuration's *initial* ``sigma_w`` (scalar or
    ``(P,)``), which sets ``Delta_MP``. Per-sample gradients are ``G_n = -delta_n a_n^T``
    with ``a_n`` the layer input and ``delta_n`` the gradient of sample ``n``'s loss
    with respect to the layer's pre-activation (autograd of the sum of per-sample
    losses). Results are float64. A layer's ``T_c`` is NaN where it is undefined (a
    single level, or no gradient at all: ``Dr = 0 = C``); the network's ``T_c``
    skips those layers (NaN when all are).
    """
    p_count = net.n_configs
    sigma = torch.as_tensor(sigma_w, dtype=torch.float64, device=net.weights[0].device).expand(p_count)
    probe = replace(net, weights=[w.detach().requires_grad_(True) for w in net.weights])
    io = layer_io(probe, x)
    out = io[-1][1]
    n = out.shape[-2]
    if labels is not None:
        labels = labels.expand(p_count, n)
    total = loss_per_config(out, targets, labels, loss).sum() * n
    trained = [i for i, t in enumerate(net.trainable) if t]
    deltas = torch.autograd.grad(total, [io[i][1] for i in trained])
    layers = {
        net.names[i]: layer_noise(net.weights[i].detach(), io[i][0].detach(), delta, sigma)
        for i, delta in zip(trained, deltas)
    }
    t_c = torch.stack([layer.t_c for layer in layers.values()])
    network = torch.where(t_c.isnan(), math.inf, t_c).amin(0)
    return CriticalTemperature(layers, torch.where(t_c.isnan().all(0), math.nan, network))


def layer_noise(w: Tensor, a: Tensor, delta: Tensor, sigma_w: Tensor) -> LayerNoise:
    """Drift, fluctuation and ``T_c`` of one layer ``w`` ``(P, K, L)`` (THEORY.md §3-4).

    ``a`` ``(P, N, L)`` are the layer inputs, ``delta`` ``(P, N, K)`` the per-sample loss
    gradients at the pre-activation. With ``U`` the eigenvectors of ``W W^T``
    (descending), ``u_n = U^T delta_n`` and ``v_n = U^T W a_n``, each sample moves
    ``X`` by ``D~_n = -(v_n u_n^T + u_n v_n^T)``; for ``K > L`` the same holds for
    ``W^T W`` with ``u_n = U^T a_n``, ``v_n = U^T W^T delta_n``. Only the diagonal and
    the first and last rows of ``D~_n`` are formed. Then
    ``Dr = |K~_11| - |K~_nn|``, ``C = sum_{k=1}^{n-1} (V~_{1,1+k} + V~_{n,n-k}) / k``.
    Computed in float64 (the bottom eigenvectors of a float32 Gram matrix are unreliable).
    """
    w, a, delta, sigma_w = (t.to(torch.float64) for t in (w, a, delta, sigma_w))
    k, l = w.shape[-2:]
    if k <= l:
        gram, left, right = w @ w.transpose(-1, -2), delta, a @ w.transpose(-1, -2)
    else:
        gram, left, right = w.transpose(-1, -2) @ w, a, delta @ w
    basis = torch.linalg.eigh(gram).eigenvectors.flip(-1)
    u, v = left @ basis, right @ basis
    diag = -2 * u * v
    top = -(v[..., :1] * u + u[..., :1] * v)
    bottom = -(v[..., -1:] * u + u[..., -1:] * v)
    drift = diag.mean(-2)
    fluctuation_top = top.var(-2, correction=0)
    fluctuation_bottom = bottom.var(-2, correction=0)
    dr = drift[:, 0].abs() - drift[:, -1].abs()
    inv_k = 1.0 / torch.arange(1, min(k, l), dtype=w.dtype, device=w.device)
    c = (fluctuation_top[:, 1:] * inv_k).sum(-1) + (fluctuation_bottom[:, :-1].flip(-1) * inv_k).sum(-1)
    delta_mp = (mp_mean_spacing(k, l, 1.0) if min(k, l) > 1 else math.nan) * sigma_w.square()
    return LayerNoise(
        drift=drift,
        fluctuation=diag.var(-2, correction=0),
        fluctuation_top=fluctuation_top,
        fluctuation_bottom=fluctuation_bottom,
        dr=dr,
        c=c,
        delta=delta_mp,
        t_c=delta_mp * dr / c,
    )


@dataclass(frozen=True)
class Spread:
    """Per group (sorted group ids): median and the ``low``/``high`` quantiles."""

    groups: Tensor
    median: Tensor
    low: Tensor
    high: Tensor


def seed_spread(values: Tensor, groups: Tensor, quantiles: tuple[float, float] = (0.16, 0.84)) -> Spread:
    """Spread of ``values`` ``(P,)`` over the configurations sharing a group id (a grid
    point, all its seeds): median and ``quantiles``, NaN ignored (THEORY.md §4)."""
    ids, inverse = torch.unique(groups, return_inverse=True)
    q = torch.tensor([0.5, *quantiles], dtype=values.dtype, device=values.device)
    stats = torch.stack([torch.nanquantile(values[inverse == g], q) for g in range(len(ids))])
    return Spread(ids, stats[:, 0], stats[:, 1], stats[:, 2])


def ordered_fraction(temperature: Tensor, t_c: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted group ids and, per group, the fraction of its configurations with
    ``T <= T_c`` (the paper draws its boundary where this crosses 0.68, THEORY.md §4)."""
    ids, inverse = torch.unique(groups, return_inverse=True)
    ordered = (temperature <= t_c).to(t_c.dtype)
    counts = torch.zeros(len(ids), dtype=t_c.dtype, device=t_c.device)
    hits = counts.index_add(0, inverse, ordered)
    return ids, hits / counts.index_add(0, inverse, torch.ones_like(ordered))


# --------------------------------------------------------------------------- disorder


def preactivation_variances(net: Network, x: Tensor) -> dict[str, Tensor]:
    """Per layer, the variance ``s_z^2`` ``(P,)`` of its pre-activations on inputs ``x``,
    pooled over samples and units (THEORY.md §5)."""
    with torch.no_grad():
        return {
            name: z.reshape(net.n_configs, -1).var(-1, correction=0)
            for name, (_, z) in zip(net.names, layer_io(net, x))
        }


def tanh_feature_density(phi: Tensor, s2: Tensor | float) -> Tensor:
    """Density of ``phi = tanh(z)``, ``z ~ N(0, s2)`` (THEORY.md §5):
    ``exp(-artanh(phi)^2 / (2 s2)) / (sqrt(2 pi s2) (1 - phi^2))``; broadcasts."""
    s2 = torch.as_tensor(s2, dtype=phi.dtype, device=phi.device)
    gauss = torch.exp(-torch.atanh(phi).square() / (2 * s2)) / torch.sqrt(2 * math.pi * s2)
    return gauss / (1 - phi.square())


def tanh_density_is_bimodal(s2: Tensor, points: int = 4001) -> Tensor:
    """Whether the tanh feature density has more than one local maximum, for each ``s2``
    (any shape), read off a grid of ``points`` values of ``a = artanh(phi)`` in
    ``[-(2 s2 + 1), 2 s2 + 1]`` (``phi`` is monotone in ``a``, and every mode solves
    ``tanh(a) = a / (2 s2)``, so ``|a| < 2 s2``), using
    ``log p = -a^2 / (2 s2) + 2 log cosh(a) + const``. Analytically: exactly when
    ``s2 > TANH_JAMMING`` (THEORY.md §5)."""
    s2 = s2.to(torch.float64)[..., None]
    a = torch.linspace(-1, 1, points, dtype=torch.float64) * (2 * s2 + 1)
    log_cosh = a.abs() + torch.nn.functional.softplus(-2 * a.abs())
    log_p = -a.square() / (2 * s2) + 2 * log_cosh
    peaks = (log_p[..., 1:-1] > log_p[..., :-2]) & (log_p[..., 1:-1] > log_p[..., 2:])
    return peaks.sum(-1) > 1


def forward_signal_grows(variances: dict[str, Tensor]) -> Tensor:
    """``(P,)``: whether pre-activation variance grows layer over layer (geometric-mean
    ratio of consecutive layers > 1), the ReLU disorder signal of THEORY.md §5
    (``sigma_w^2 > 2``: exploding forward signal). ``variances`` as from
    :func:`preactivation_variances`, in layer order."""
    v = torch.stack(list(variances.values()))
    return (v[1:].log() - v[:-1].log()).mean(0) > 0


# --------------------------------------------------------------------------- Langevin


@dataclass(frozen=True)
class LangevinPath:
    """Recorded ``times`` ``(R,)`` and ``levels`` ``(R, E, n)``, each row descending."""

    times: Tensor
    levels: Tensor


def simulate_langevin(
    x0: Tensor,
    drift: Callable[[Tensor], Tensor] | Tensor,
    fluctuation: Tensor,
    temperature: Tensor | float,
    dt: float,
    steps: int,
    generator: torch.Generator | None = None,
    record_every: int = 1,
) -> LangevinPath:
    """Euler-Maruyama for an ensemble ``x0`` ``(E, n)`` of spectra (THEORY.md §3):

    ``dx_i = [K_i(x) + T sum_{j != i} V_ij / (x_i - x_j)] dt + sqrt(T V_ii) dW_i``.

    ``drift`` is a callable ``(E, n) -> (E, n)`` or a constant ``(n,)``; ``fluctuation``
    is ``V`` ``(n, n)`` indexed by level rank (1 = top); ``temperature`` a scalar or one
    per ensemble member ``(E,)``. The repulsion of each pair is integrated exactly over
    the step (two levels at gap ``g`` alone obey ``d(g^2)/dt = 4 T V_ij``, so level ``i``
    moves by ``sign(x_i - x_j) (sqrt(g^2 + 4 T V_ij dt) - g) / 2``): equal to the Euler
    increment ``T V_ij dt / (x_i - x_j)`` to leading order for ``g^2 >> T V dt``, and
    bounded at near-collisions, where the plain Euler step flings levels far away.
    Levels are re-sorted (descending) after every step. Records step 0 and every
    ``record_every``-th step.
    """
    x = x0.sort(-1, descending=True).values
    temp = torch.as_tensor(temperature, dtype=x.dtype, device=x.device).reshape(-1, 1)
    eye = torch.eye(x.shape[-1], dtype=torch.bool, device=x.device)
    spread = 4 * dt * temp[..., None] * fluctuation.masked_fill(eye, 0.0)
    noise = torch.sqrt(temp * fluctuation.diagonal() * dt)
    times, levels = [0.0], [x]
    for step in range(1, steps + 1):
        gaps = x[..., :, None] - x[..., None, :]
        repulsion = gaps.sign() * (torch.sqrt(gaps.square() + spread) - gaps.abs()) / 2
        force = drift(x) if callable(drift) else drift
        kick = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + force * dt + repulsion.sum(-1) + noise * kick
        x = x.sort(-1, descending=True).values
        if step % record_every == 0:
            times.append(step * dt)
            levels.append(x)
    return LangevinPath(torch.tensor(times, dtype=x.dtype), torch.stack(levels))


# --------------------------------------------------------------------------- curvature edge


def hessian_top_eigenvalue(
    net: Network,
    x: Tensor,
    targets: Tensor,
    labels: Tensor | None,
    loss: str,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``lambda_0`` ``(P,)``: the top *algebraic* eigenvalue of the Hessian of the loss on
    the fixed batch ``x`` with respect to all trainable parameters (THEORY.md §9).

    Lanczos with full reorthogonalisation on Hessian-vector products (double backward),
    all configurations at once (their Hessians are independent blocks); the largest
    Ritz value of ``min(iters, n_params)`` steps (exact once ``iters >= n_params``).
    Unlike power iteration it does not lock onto a large negative eigenvalue. Memory:
    the Krylov basis, ``iters x P x n_params`` numbers, besides the double-backward graph.
    """
    p_count = net.n_configs
    params = [t.detach().requires_grad_(True) for t in net.parameters()]
    model = net.with_parameters(params)
    if labels is not None:
        labels = labels.expand(p_count, x.shape[-2])
    total = loss_per_config(forward(model, x), targets, labels, loss).sum()
    grads = torch.autograd.grad(total, params, create_graph=True)
    sizes = [t[0].numel() for t in params]

    def hvp(v: Tensor) -> Tensor:
        pieces = [s.view_as(t) for s, t in zip(v.split(sizes, -1), params)]
        dot = sum((g * s).sum() for g, s in zip(grads, pieces))
        hv = torch.autograd.grad(dot, params, retain_graph=True)
        return torch.cat([h.reshape(p_count, -1) for h in hv], -1)

    return _lanczos_top(hvp, p_count, sum(sizes), min(iters, sum(sizes)), params[0], generator)


def _lanczos_top(
    matvec: Callable[[Tensor], Tensor],
    batch: int,
    dim: int,
    steps: int,
    like: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Largest Ritz value ``(batch,)`` of ``steps`` Lanczos iterations of a batch of
    symmetric operators ``matvec: (batch, dim) -> (batch, dim)``, with full
    reorthogonalisation. An exhausted Krylov space (coupling below ``sqrt(eps)`` of the
    operator's scale) restarts from a fresh orthogonal vector with a zero coupling, so
    the Ritz values stay eigenvalues to that precision."""

    def fresh(basis: Tensor) -> Tensor:
        q = torch.randn(batch, dim, generator=generator, dtype=torch.float64).to(like)
        for _ in range(2):
            q = q - torch.einsum("bj,bjd->bd", torch.einsum("bjd,bd->bj", basis, q), basis)
        return q / q.norm(dim=-1, keepdim=True)

    q = fresh(torch.zeros(batch, 0, dim, dtype=like.dtype, device=like.device))
    basis = q[:, None]
    alphas, betas = [], []
    tol = math.sqrt(torch.finfo(like.dtype).eps)
    for j in range(steps):
        w = matvec(q)
        alphas.append((w * q).sum(-1))
        for _ in range(2):
            w = w - torch.einsum("bj,bjd->bd", torch.einsum("bjd,bd->bj", basis, w), basis)
        if j == steps - 1:
            break
        beta = w.norm(dim=-1)
        scale = torch.stack(alphas).abs().amax(0) + beta
        breakdown = beta <= tol * scale
        step = w / beta.clamp_min(torch.finfo(like.dtype).tiny)[:, None]
        q = torch.where(breakdown[:, None], fresh(basis), step)
        betas.append(torch.where(breakdown, torch.zeros_like(beta), beta))
        basis = torch.cat([basis, q[:, None]], 1)
    tri = torch.diag_embed(torch.stack(alphas, -1))
    if betas:
        off = torch.diag_embed(torch.stack(betas, -1), offset=1)
        tri = tri + off + off.transpose(-1, -2)
    return torch.linalg.eigvalsh(tri)[..., -1]


@dataclass(frozen=True)
class CurvatureEdges:
    """Learning-rate edges ``(P,)`` from ``lambda_0``: ``lazy = 2/lambda_0``,
    ``catapult = c/lambda_0``; ``inf`` where ``lambda_0 <= 0``."""

    lazy: Tensor
    catapult: Tensor


def curvature_edges(lambda_0: Tensor, catapult_factor: float = CATAPULT_FACTOR) -> CurvatureEdges:
    """``2/lambda_0`` (plain GD on the local quadratic stays lazy below it) and
    ``c/lambda_0`` (catapult, beyond which training diverges), THEORY.md §9. These are
    edges in ``lr``, not ``lr/B``."""
    positive = lambda_0 > 0
    inf = torch.full_like(lambda_0, math.inf)
    return CurvatureEdges(
        lazy=torch.where(positive, 2.0 / lambda_0, inf),
        catapult=torch.where(positive, catapult_factor / lambda_0, inf),
    )
