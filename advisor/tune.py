"""``python -m advisor.tune``: probes -> predicted boundary -> Optuna search restricted to
the convergent region -> MLflow (DESIGN.md data flow).

Writes ``advice.json``, ``phase_diagram.png``, ``eigenvalue_flow.png``,
``search_space.json`` and ``sweep_overrides.txt`` in the Hydra run folder, logs one
MLflow parent run with nested runs per probe and per trial, and prints a summary.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import hydra
import numpy as np
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from tqdm.auto import tqdm

from advisor import search
from advisor.boundary import CONVERGENT, Boundary
from advisor.config import build_network, load_dataset, probe_grid, train_settings
from advisor.data import Dataset
from advisor.errors import exit_on_config_error, require, require_choice
from advisor.models import trainable_weights
from advisor.phase_diagram import draw, log_probes, phase_map_from_config, to_json
from advisor.plots import phase_diagram as draw_phase_diagram
from advisor.probe import ProbeGrid
from advisor.search import SearchSpace, SpectralPruner
from advisor.spectra import mean_spacing, snapshot_steps, squared_singular_values
from advisor.tracking import Tracker, ui_command
from advisor.train import evaluate, sgd

TRANSFER_LADDER = [2**k for k in range(0, 11)]


def fit_budget(grid: ProbeGrid, trial_steps: int, fraction: float) -> ProbeGrid:
    """Shorten the probes so that their configuration-steps stay within ``fraction`` of
    the search's total training steps (at least 20 steps a probe)."""
    budget = fraction * trial_steps
    if grid.config_steps <= budget:
        return grid
    return replace(grid, steps=max(20, int(budget // len(grid.configurations()))))


@dataclass
class TrialContext:
    """What every trial needs: config, data, space and the tracking run."""

    cfg: DictConfig
    data: Dataset
    space: SearchSpace
    tracker: Tracker
    pruner: optuna.pruners.BasePruner
    direction: str


def run_trial(ctx: TrialContext, study: optuna.Study, trial: optuna.Trial) -> tuple[TrialState, float | None]:
    """Train one full run at the trial's point; report spectra to the pruner as it goes."""
    hp = ctx.space.hyperparameters(trial.params)
    cfg = ctx.cfg.copy()
    for name, key in ctx.space.extra_keys.items():
        OmegaConf.update(cfg, key, hp[name])
    s = train_settings(cfg)
    seed = int(cfg.seed)
    net = build_network(cfg, [ctx.data], hp["sigma_w"], [seed], dtype=s.dtype).to(s.device)
    x, y = ctx.data.x_train.to(s.device, s.dtype), ctx.data.y_train.to(s.device, s.dtype)
    labels = None if ctx.data.labels_train is None else ctx.data.labels_train.to(s.device)
    xv, yv = ctx.data.x_val.to(s.device, s.dtype), ctx.data.y_val.to(s.device, s.dtype)
    lv = None if ctx.data.labels_val is None else ctx.data.labels_val.to(s.device)
    reports = set(snapshot_steps(s.steps, n_log=0, n_linear=int(cfg.search.reports)).tolist()) - {0}
    h = int(cfg.probe.heldout)
    history: dict[str, list[float]] = {"steps": [], "loss": [], "x_max": [], "spacing": []}
    with ctx.tracker.child(f"trial {trial.number}", params=hp, tags={"optuna.trial": trial.number}) as run:

        def observe(step: int, current) -> None:
            if step not in reports:
                return
            loss, acc = evaluate(current, xv[:h], yv[:h], None if lv is None else lv[:h], s.loss)
            loss = float(loss[0]) if math.isfinite(loss[0]) else float("nan")
            levels = {n: squared_singular_values(w[0]).cpu().numpy() for n, w in trainable_weights(current).items()}
            spacing = {n: float(mean_spacing(lev)) for n, lev in levels.items()}
            metrics = {"heldout_loss": loss}
            for n, lev in levels.items():
                metrics.update({f"x_max.{n}": lev[0], f"x_min.{n}": lev[-1], f"spacing.{n}": spacing[n]})
            run.log_metrics(metrics, step)
            history["steps"].append(step)
            history["loss"].append(loss)
            history["x_max"].append(max(float(lev[0]) for lev in levels.values()))
            history["spacing"].append(max(spacing.values()))
            # intermediate values follow the study's direction (other pruners compare them)
            trial.report(float(acc[0]) if ctx.direction == "maximize" else (loss if math.isfinite(loss) else math.inf), step)
            trial.set_user_attr("spectral", history)
            if trial.should_prune():
                raise optuna.TrialPruned(_prune_reason(ctx.pruner, study, trial))

        try:
            result = sgd(net, x, y, labels, hp["lr"], hp["batch_size"], s.steps, [seed], s.loss,
                         s.momentum, s.weight_decay, s.blowup, observe=observe)
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("pruned_reason", str(pruned))
            run.set_tags({"state": "PRUNED", "pruned_reason": str(pruned)})
            return TrialState.PRUNED, None
        if result.diverged[0]:
            reason = f"diverged at step {int(result.diverged_at[0])}"
            trial.set_user_attr("fail_reason", reason)
            run.set_tags({"state": "FAIL", "fail_reason": reason, "phase": "divergent"})
            return TrialState.FAIL, None
        val_loss, val_acc = evaluate(result.network, xv, yv, lv, s.loss)
        value = float(val_loss[0]) if ctx.direction == "minimize" else float(val_acc[0])
        run.log_metrics({"val_loss": float(val_loss[0]), **({} if val_acc is None else {"val_accuracy": float(val_acc[0])})}, s.steps)
        run.set_tags({"state": "COMPLETE"})
        return TrialState.COMPLETE, value


def _prune_reason(pruner: optuna.pruners.BasePruner, study: optuna.Study, trial: optuna.Trial) -> str:
    if isinstance(pruner, SpectralPruner):
        verdict = pruner.verdict(study, trial.user_attrs)
        if verdict is not None:
            return f"{verdict.phase}: {verdict.reason}"
    return f"pruned by {type(pruner).__name__}"


def run_study(ctx: TrialContext, study: optuna.Study, n_trials: int) -> None:
    """Ask/tell loop; an interrupted trial is told FAIL so the stored study stays consistent."""
    for _ in tqdm(range(n_trials), desc="trials"):
        trial = study.ask(fixed_distributions=ctx.space.distributions)
        try:
            if ctx.space.mode == "constrained":
                hp = ctx.space.hyperparameters(trial.params)
                phase, octaves = ctx.space.boundary.phase_of(hp["lr"], hp["batch_size"], hp["sigma_w"])
                trial.set_constraint("edge", -octaves if math.isfinite(octaves) else 1.0)
                if phase == "divergent":
                    trial.set_user_attr("fail_reason", "predicted divergent; not trained")
                    study.tell(trial, state=TrialState.FAIL)
                    continue
            state, value = run_trial(ctx, study, trial)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


def warm_start(study: optuna.Study, space: SearchSpace, points: list[dict], k: int) -> int:
    """Enqueue the ``k`` best convergent probes (by validation loss) as the first trials."""
    good = sorted((p for p in points if p["phase"] == CONVERGENT and p["val_loss"] is not None), key=lambda p: p["val_loss"])
    seen, queued = set(), 0
    for p in good:
        key = (p["sigma_w"], p["lr"], p["batch_size"])
        if key in seen or queued >= k:
            continue
        seen.add(key)
        params: dict[str, object] = {"batch_size": p["batch_size"], "sigma_w": p["sigma_w"]}
        if space.mode == "restricted":
            edge = space.boundary.lr_edge_at(p["batch_size"], p["sigma_w"])
            lo, hi = search.span(space.distributions["sigma_w"])
            if not math.isfinite(edge) or not lo <= p["sigma_w"] <= hi:
                continue
            params["u"] = float(np.clip(p["lr"] / edge, *search.span(space.distributions["u"])))
        else:
            params["lr"] = p["lr"]
        study.enqueue_trial(params, skip_if_exists=True)
        queued += 1
    return queued


def transfer_table(boundary: Boundary, sigma_w: float, u_range: tuple[float, float], n_train: int) -> list[dict]:
    """Convergent lr range per batch size on a power-of-two ladder: noise edge
    ``T_c * B``, curvature edge ``lr_max``, the binding one, and ``[u_min, u_max]`` below it."""
    i = int(np.argmin(np.abs(np.log(boundary.sigma_w) - math.log(sigma_w))))
    rows = []
    for b in (b for b in TRANSFER_LADDER if b <= n_train):
        noise, curve = boundary.t_c[i] * b, boundary.lr_max[i]
        edge = boundary.lr_edge_at(b, sigma_w)
        rows.append({
            "batch_size": b, "noise_edge_lr": _num(noise), "curvature_edge_lr": _num(curve),
            "binding": "noise" if noise <= curve else "curvature",
            "lr_low": _num(u_range[0] * edge), "lr_high": _num(u_range[1] * edge),
        })
    return rows


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def trial_counts(study: optuna.Study) -> dict[str, int]:
    return {state.name: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}


def best_trial(study: optuna.Study, space: SearchSpace) -> dict | None:
    try:
        t = study.best_trial
    except ValueError:
        return None
    return {"number": t.number, "value": t.value, "params": t.params, "hyperparameters": space.hyperparameters(t.params)}


def check_search(cfg: DictConfig, data: Dataset) -> None:
    """Validate against the data and the search section before any study, store or file
    is touched."""
    build_network(cfg, [data], float(cfg.model.sigma_w), [int(cfg.seed)])  # model keys, model/dataset match
    n = len(data.x_train)
    for key, values in (("train.batch_size", [cfg.train.batch_size]), ("probe.batch_size", cfg.probe.batch_size)):
        bad = [b for b in values if not 0 < b <= n]
        require(not bad, key, f"in 1..{n} (the training set size)", bad[0] if bad else None)
    require(cfg.search.direction == "minimize" or cfg.train.loss == "mse" or data.is_classification,
            "train.loss", "mse for a regression dataset", cfg.train.loss)
    sc = cfg.search
    require_choice(sc.mode, "search.mode", search.MODES)
    require_choice(sc.direction, "search.direction", search.DIRECTIONS)
    require(int(sc.n_trials) >= 0, "search.n_trials", "an integer >= 0", sc.n_trials)
    require(int(sc.reports) >= 1, "search.reports", "an integer >= 1", sc.reports)
    require(0 < sc.u_min < sc.u_max < 1, "search.u_min/search.u_max", "0 < u_min < u_max < 1", (sc.u_min, sc.u_max))
    require(sc.direction == "minimize" or data.is_classification, "search.direction",
            "minimize for a regression dataset", sc.direction)
    for name, spec in sc.params.items():
        require("key" in spec, f"search.params.{name}.key", "the config key the value sets (e.g. train.momentum)", None)


def extra_params(cfg: DictConfig) -> tuple[dict, dict]:
    specs = OmegaConf.to_container(cfg.search.params, resolve=True)
    dists = {name: search.extra_distribution(name, spec) for name, spec in specs.items()}
    return dists, {name: spec["key"] for name, spec in specs.items()}


def summary(advice: dict, folder: Path) -> str:
    """The terminal summary table."""
    b = advice["boundary"]["measured"]
    lines = ["", "== SGD phase advisor =="]
    if advice["probes"]["reused"]:
        lines.append(f"probes      reused the boundary stored with study {advice['study']['name']}")
    else:
        counts = ", ".join(f"{k} {v}" for k, v in advice["probes"]["phase_counts"].items() if v)
        lines.append(f"probes      {advice['probes']['count']} x {advice['probes']['steps']} steps "
                     f"({advice['probes']['budget_share']:.0%} of the search's steps): {counts}")
    lines.append("boundary    sigma_w      T_c=lr/B     lr_max")
    for s, t, m in zip(b["sigma_w"], b["t_c"], b["lr_max"]):
        lines.append(f"            {s:<12g} {_fmt(t):<12} {_fmt(m)}")
    if b["disorder_limit"] is not None:
        lines.append(f"            no convergent lr from sigma_w={b['disorder_limit']:g} ({b['limit_phase']})")
    space = advice["search_space"]
    lines.append(f"search      mode={space['mode']}: " + ", ".join(
        f"{k} {_dist(d)}" for k, d in space["distributions"].items()))
    lines.append("trials      " + ", ".join(f"{k} {v}" for k, v in advice["trials"].items() if v))
    best = advice["best_trial"]
    if best:
        hp = best["hyperparameters"]
        lines.append(f"best        #{best['number']} value={best['value']:.4g}  lr={hp['lr']:.4g} "
                     f"batch_size={hp['batch_size']} sigma_w={hp['sigma_w']:.4g}")
    check = advice["theory_check"]
    lines.append(f"theory      {check['inside']}/{check['top_k']} of the best trials inside the predicted region")
    lines.append(f"report      {folder / 'advice.json'}")
    lines.append(f"mlflow      run {advice['mlflow']['run_id']} in {advice['mlflow']['tracking_uri']}")
    lines.append(f"            {ui_command(advice['mlflow']['tracking_uri'])}")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _dist(d: str) -> str:
    a = json.loads(d)["attributes"]
    if "choices" in a:
        return "in {" + ", ".join(map(str, a["choices"])) + "}"
    return f"in [{a['low']:.4g}, {a['high']:.4g}]" + (" log" if a.get("log") else "")


@dataclass
class Job:
    """One invocation: its config, run folder, data, study and tracking run."""

    cfg: DictConfig
    folder: Path
    data: Dataset
    grid: ProbeGrid
    study: optuna.Study
    tracker: Tracker
    pruner: optuna.pruners.BasePruner
    extra: dict
    extra_keys: dict


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    folder = Path(HydraConfig.get().runtime.output_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = train_settings(cfg)
    data = load_dataset(cfg, int(cfg.seed))
    check_search(cfg, data)
    extra, extra_keys = extra_params(cfg)
    grid = fit_budget(probe_grid(cfg), int(cfg.search.n_trials) * settings.steps, float(cfg.probe.budget_fraction))
    storage = search.storage_from(cfg.search.storage)
    name = cfg.search.study_name or f"advisor-{cfg.model.name}-{cfg.dataset.name}-seed{cfg.seed}"
    sampler, pruner = instantiate(cfg.search.sampler), instantiate(cfg.search.pruner)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tags = {"optuna.study_name": name, "optuna.storage": str(cfg.search.storage), "advisor.mode": cfg.search.mode}
    try:
        with Tracker(cfg.tracking.uri, cfg.tracking.experiment, f"tune {name}", params=resolved, tags=tags) as tracker:
            study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=name,
                                        direction=cfg.search.direction, load_if_exists=True)
            advice = tune(Job(cfg, folder, data, grid, study, tracker, pruner, extra, extra_keys))
    except KeyboardInterrupt:
        print(f"interrupted: finished trials are kept in study {name}; open MLflow runs ended as KILLED", file=sys.stderr)
        sys.exit(130)
    print(summary(advice, folder))


def tune(job: Job) -> dict:
    """Probe (or reuse the boundary stored with the study), search, report."""
    cfg, study = job.cfg, job.study
    stored = study.user_attrs.get("phase_map")
    title = f"{cfg.model.name} on {cfg.dataset.name}"
    if stored is None:
        pm = phase_map_from_config(cfg, job.grid)
        doc = to_json(pm)
        draw(pm, job.folder, f"{title}, {job.grid.steps}-step probes")
        log_probes(job.tracker, pm)
        study.set_user_attr("phase_map", doc)
    else:
        doc = stored
        points = doc["points"]
        draw_phase_diagram(np.array([p["sigma_w"] for p in points]), np.array([p["temperature"] for p in points]),
                           np.array([p["phase"] for p in points]), Boundary.from_dict(doc["boundary"]), None,
                           job.folder / "phase_diagram.png", f"{title} (stored boundary)")
    u_range = (float(cfg.search.u_min), float(cfg.search.u_max))
    space = search.build_space(cfg.search.mode, Boundary.from_dict(doc["boundary"]), doc["grid"]["lr"], u_range,
                               job.extra, job.extra_keys)
    n_warm = min(int(cfg.search.warm_start), int(cfg.search.n_trials))
    queued = 0 if stored is not None else warm_start(study, space, doc["points"], n_warm)
    ctx = TrialContext(cfg, job.data, space, job.tracker, job.pruner, cfg.search.direction)
    interrupted = False
    try:
        run_study(ctx, study, int(cfg.search.n_trials))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        advice = write_advice(job, doc, space, queued, stored is not None, interrupted)
    return advice


def write_advice(job: Job, doc: dict, space: SearchSpace, queued: int, reused: bool, interrupted: bool) -> dict:
    """``advice.json`` and the exported space in the run folder, all logged to MLflow."""
    cfg, study, folder, tracker = job.cfg, job.study, job.folder, job.tracker
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: t.value, reverse=cfg.search.direction == "maximize")
    best = best_trial(study, space)
    sigma = best["hyperparameters"]["sigma_w"] if best else float(cfg.model.sigma_w)
    u_range = (float(cfg.search.u_min), float(cfg.search.u_max))
    trial_steps = int(cfg.search.n_trials) * int(cfg.train.steps)
    advice = {
        "boundary": {"measured": doc["boundary"], "theory": doc["theory"], "curvature": doc["curvature"],
                     "disorder_limit": doc["disorder_limit"]},
        "probes": {"reused": reused, "count": len(doc["points"]), "steps": doc["grid"]["steps"],
                   "config_steps": doc["grid"]["config_steps"],
                   "budget_share": doc["grid"]["config_steps"] / trial_steps if trial_steps else math.inf,
                   "phase_counts": doc["phase_counts"], "points": doc["points"]},
        "search_space": space.to_json(),
        "warm_start_trials": queued,
        "trials": trial_counts(study),
        "best_trial": best,
        "theory_check": search.inside_fraction(space, complete, int(cfg.search.top_k)),
        "batch_size_transfer": transfer_table(space.boundary, sigma, u_range, len(job.data.x_train)),
        "study": {"name": study.study_name, "storage": cfg.search.storage},
        "mlflow": {"run_id": tracker.run_id, "tracking_uri": tracker.uri, "experiment": cfg.tracking.experiment},
        "interrupted": interrupted,
    }
    (folder / "advice.json").write_text(json.dumps(advice, indent=1))
    (folder / "search_space.json").write_text(json.dumps(space.to_json(), indent=1))
    (folder / "sweep_overrides.txt").write_text(
        "# python -m advisor.tune -m <line>  (one line per batch size and sigma_w)\n" + "\n".join(space.sweep_overrides()) + "\n")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    for name in ("advice.json", "search_space.json", "sweep_overrides.txt", "config.yaml", "phase_diagram.png", "eigenvalue_flow.png"):
        if (folder / name).exists():
            tracker.log_artifact(folder / name)
    tracker.set_tags({"advisor.best_value": best["value"] if best else "none",
                      **{f"advisor.trials.{k}": v for k, v in advice["trials"].items()}})
    return advice


if __name__ == "__main__":
    main()
