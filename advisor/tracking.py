"""MLflow tracking: one parent run per advisor invocation, nested runs per probe group and trial.

This is the only module of the package that imports MLflow. It drives
:class:`mlflow.tracking.MlflowClient` with explicit run ids (no fluent, global
active-run state), so nesting is explicit and threads (Optuna ``n_jobs``) cannot
mix up runs.

API::

    Tracker(uri, experiment, run_name=None, params=None, tags=None)   # context manager
        .run_id  .experiment_id  .uri (absolute for sqlite)
        .child(name, params=None, tags=None) -> ChildRun              # context manager
    Tracker and ChildRun:
        .log_params(params)                       # flattened, see flatten
        .log_metrics(metrics, step)               # {key: value} at one step
        .log_series(series, steps)                # {key: values}, one value per step
        .log_artifact(path, artifact_path=None)   # a local file
        .log_dict(obj, name)                      # JSON text, e.g. name="advice.json"
        .log_text(text, name)
        .set_tags(tags)
    ChildRun.end(status="FINISHED")
    flatten(config) -> {"search.sampler._target_": "...", ...}
    ui_command(uri) -> "mlflow ui --backend-store-uri <uri>"

Status rules (for the parent and for a child used as a context manager): leaving
normally ends the run FINISHED; a ``KeyboardInterrupt`` ends it KILLED; any other
exception ends it FAILED (``SystemExit`` with code 0 or ``None`` counts as normal).
When the parent ends, children still open end with the parent's status. Exceptions
always propagate.

Stores: the default ``sqlite:///mlflow.db`` is relative to the working folder; the
tracker makes a sqlite path absolute (creating its folder) and gives a new experiment
the artifact location ``<folder of the db>/mlartifacts``, so runs started from any
working folder share artifacts with their store. (Left alone, MLflow 3 with a sqlite
store puts artifacts in ``<cwd>/mlruns/<experiment id>``.) Other stores
(``postgresql://``, ``http://``) keep MLflow's defaults.

MLflow limits a param value to 6000 characters (longer ones are cut and end in
``...``) and a batch to 100 params or tags and 1000 metrics (calls are chunked).
Non-finite metric values are skipped: MLflow would store ``inf`` as ``1.8e308``, and a
diverged run's curve simply ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shlex
import threading
from collections.abc import Iterator, Mapping, Sequence, Set
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

# an offline tool: no usage telemetry (MLflow 3 otherwise tries to reach its servers)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis
from sqlalchemy.engine import make_url

# Creating a sqlite store runs the schema migrations, which log INFO lines.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag value
MAX_PARAMS_PER_BATCH = 100  # params or tags per log_batch call
MAX_METRICS_PER_BATCH = 1000
PARENT_TAG = "mlflow.parentRunId"  # the tag by which the MLflow UI nests runs

__all__ = ["ChildRun", "Tracker", "flatten", "ui_command"]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into dotted keys with string values.

    ``{"search": {"sampler": {"_target_": "optuna.samplers.TPESampler"}}, "probe": {"lr":
    [0.1, 0.2]}}`` gives ``{"search.sampler._target_": "optuna.samplers.TPESampler",
    "probe.lr": "[0.1, 0.2]"}``: lists (and empty mappings) become their JSON text,
    other leaves ``str(value)``. Pass plain containers
    (``OmegaConf.to_container(cfg, resolve=True)``) so that interpolations are resolved.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, Mapping | Sequence | Set) and not isinstance(value, str):
            flat[name] = json.dumps(value, default=_jsonable)
        else:
            flat[name] = str(value)
    return flat


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on ``uri``."""
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


class _Run:
    """Logging methods shared by the parent run and its children."""

    _client: MlflowClient
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``flatten(params)``; a key already logged must keep its value (MLflow rule)."""
        items = [Param(k, _truncate(v, MAX_PARAM_LENGTH)) for k, v in flatten(params).items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags (values are ``str``-ed and cut at MLflow's 8000 characters)."""
        items = [RunTag(k, _truncate(str(v), MAX_TAG_LENGTH)) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log each value of ``metrics`` at ``step``; non-finite values are skipped."""
        self.log_series({key: [value] for key, value in metrics.items()}, [step])

    def log_series(self, series: Mapping[str, Sequence[float]], steps: Sequence[int]) -> None:
        """Log whole curves: ``series[key][i]`` at step ``steps[i]``; non-finite values skipped.

        Values may be lists, numpy arrays or CPU tensors; one timestamp for the call.
        """
        steps = [int(s) for s in steps]
        now = get_current_time_millis()
        metrics = []
        for key, values in series.items():
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            if len(values) != len(steps):
                raise ValueError(f"metric {key!r}: {len(values)} values for {len(steps)} steps")
            metrics += [
                Metric(key, v, now, s) for v, s in zip(values.tolist(), steps) if math.isfinite(v)
            ]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy the local file ``path`` into the run's artifacts (under ``artifact_path``)."""
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """Store ``obj`` as indented JSON in the artifact file ``name`` (e.g. ``"advice.json"``).

        numpy arrays and scalars, tensors, tuples and sets become lists or numbers;
        anything else JSON cannot hold becomes its ``str``.
        """
        self.log_text(json.dumps(obj, indent=2, default=_jsonable), name)

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` in the artifact file ``name`` (e.g. ``"config.yaml"``)."""
        self._client.log_text(self.run_id, text, name)

    def _end(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status)


class ChildRun(_Run):
    """A run nested under a :class:`Tracker`'s parent run; made by :meth:`Tracker.child`."""

    def __init__(self, parent: Tracker, run_id: str) -> None:
        self._client = parent._client
        self.run_id = run_id
        self._parent = parent

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        if self._parent._forget(self.run_id):
            self._end(status)

    def __enter__(self) -> ChildRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.end(_status(exc))
        return False


class Tracker(_Run):
    """One parent run, as a context manager; ``run_id`` and ``experiment_id`` exist inside.

    Entering creates the experiment if missing, starts the parent run named
    ``run_name`` and logs ``flatten(params)`` and ``tags``.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self.uri = _absolute_sqlite(uri)
        self.experiment = experiment
        self.run_name = run_name
        self._params = dict(params or {})
        self._tags = dict(tags or {})
        self._open: set[str] = set()  # run ids of children not ended yet
        self._lock = threading.Lock()

    def __enter__(self) -> Tracker:
        with _store_lock(self.uri):  # a new store's migrations must not run twice at once
            self._client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = _experiment_id(self._client, self.experiment, _artifact_location(self.uri))
        self.run_id = self._client.create_run(self.experiment_id, run_name=self.run_name).info.run_id
        try:
            self.log_params(self._params)
            self.set_tags(self._tags)
        except BaseException as exc:
            self._end(_status(exc))
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        status = _status(exc)
        with self._lock:
            children, self._open = self._open, set()
        for run_id in children:
            self._client.set_terminated(run_id, status)
        self._end(status)
        return False

    def child(
        self, name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
    ) -> ChildRun:
        """Start a nested run named ``name`` and log ``flatten(params)`` and ``tags``."""
        run = self._client.create_run(self.experiment_id, run_name=name, tags={PARENT_TAG: self.run_id})
        child = ChildRun(self, run.info.run_id)
        with self._lock:
            self._open.add(child.run_id)
        try:
            child.log_params(params or {})
            child.set_tags(tags or {})
        except BaseException as exc:
            child.end(_status(exc))
            raise
        return child

    def _forget(self, run_id: str) -> bool:
        """Drop ``run_id`` from the open children; whether it was open."""
        with self._lock:
            was_open = run_id in self._open
            self._open.discard(run_id)
        return was_open


def _status(exc: BaseException | None) -> str:
    """The MLflow status of a run left with ``exc`` (``None``: left normally)."""
    if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _jsonable(obj: Any) -> Any:
    """JSON stand-in for what ``json`` cannot encode (the ``default`` hook)."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, Sequence | Set) and not isinstance(obj, str):
        return list(obj)
    return str(obj)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite ``uri`` (``None`` for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` for a sqlite store (Hydra's joblib launcher starts
    several jobs on one new store at once); nothing for other stores."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    with open(f"{path}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _absolute_sqlite(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute (against the cwd) and its folder made."""
    path = _sqlite_path(uri)
    if path is None:
        return uri
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_url(uri).set(database=str(path)).render_as_string(hide_password=False)


def _artifact_location(uri: str) -> str | None:
    """``<folder of the db>/mlartifacts`` for a sqlite store, else ``None`` (MLflow's default)."""
    path = _sqlite_path(uri)
    return None if path is None else (path.parent / "mlartifacts").as_uri()


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if missing (a concurrent creator may win)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id
