"""MLflow tracking: one run per job (nested runs per Tune trial), logged from the driver and
from rank 0 of the training workers.

    tracker = Tracker(config.tracking)
    run_id = tracker.start_run(run_name="finetune")          # driver (or parent_run_id=...)
    tracker.log_config(config)                               # flat params + config.yaml
    ...   # workers get run_id and resolved_config(config.tracking):
    worker = Tracker.attach(resolved_cfg, run_id)            # rank 0, another process
    worker.log_metrics({"loss": 2.3}, step=10)
    worker.close()                                           # the run stays open
    ...
    tracker.log_loss_curve([(10, 2.3), (20, 2.1)])
    tracker.end_run("FINISHED")                              # or FAILED / KILLED

Everything goes through an explicit ``mlflow.MlflowClient(tracking_uri)``: no fluent API, no
active-run stack, no global tracking URI, so another library or test that changed
MLflow's globals changes nothing here. System metrics (CPU, memory, disk, network, GPU when
present) are MLflow's own ``SystemMetricsMonitor`` started on the run with the same explicit
URI (what ``mlflow.start_run(log_system_metrics=True)`` does, without the global state);
it needs ``psutil``.

Metric names are longtune's own inside (what Ray Train reports and Ray Tune's scheduler
reads: ``loss``, ``eval_loss``, ``ppl_1024``, ...); ``log_metrics`` writes them under the
names ``metric_name`` gives (``train/loss``, ``eval/loss``, ``eval/ppl_1024``, ...), so the
MLflow UI shows one chart section per group instead of one alphabetical list. The
experiment is tagged ``mlflow.experimentKind=finetuning`` (the kind MLflow's UI files under
"Model training") and a run's description (``mlflow.note.content``) says what was trained.

With ``tracking.enabled: false`` every method is a no-op that does not import MLflow.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longtune.config import TrackingConfig
from longtune.errors import LongtuneError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from longtune.config import Config

DEFAULT_EXPERIMENT = "longtune"
DEFAULT_DB_NAME = "mlflow.db"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_RUN_TAG = "mlflow.parentRunId"
JOB_TAG = "longtune.job"  # finetune, evaluate, replicate, tune, tune-trial, ...
RUN_NAME_TAG = "longtune.run_name"
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
TRUNCATED = "...[truncated]"
MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "finetuning"  # one of the kinds MLflow's UI knows; its "Model training" view
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in MLflow's UI (markdown)


# ---------------------------------------------------------------- where to log


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """``cfg.tracking_uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<abs cwd>/mlflow.db``.

    A local SQLite path is made absolute (against this process's working directory), so
    Ray workers that run in another directory write the same store."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.strip():
        return f"sqlite:///{Path.cwd().absolute() / DEFAULT_DB_NAME}"
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute() and str(db) != ":memory:":
        return f"sqlite:///{Path.cwd().absolute() / db}"
    return uri


def resolve_experiment(cfg: TrackingConfig) -> str:
    """``cfg.experiment_name``, else $MLFLOW_EXPERIMENT_NAME, else ``longtune``."""
    return cfg.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def resolved_config(cfg: TrackingConfig) -> TrackingConfig:
    """A copy of ``cfg`` with the tracking URI and experiment written in: send this to the
    workers, whose working directory and environment may differ from the driver's."""
    if not cfg.enabled:
        return cfg.model_copy()
    return cfg.model_copy(
        update={"tracking_uri": resolve_tracking_uri(cfg), "experiment_name": resolve_experiment(cfg)}
    )


# ---------------------------------------------------------------- the tracker


class Tracker:
    """One MLflow run, seen from one process. ``start_run`` creates (or resumes) a run this
    tracker owns and will end; ``Tracker.attach`` joins a run another process owns and never
    ends it. Use as a context manager to end (owner) or close (attached) on exit; an
    exception ends an owned run as FAILED (KILLED for Ctrl-C)."""

    def __init__(self, cfg: TrackingConfig, *, system_metrics_interval: float = 10.0) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.tracking_uri = resolve_tracking_uri(cfg) if cfg.enabled else None
        self.experiment_name = resolve_experiment(cfg) if cfg.enabled else None
        self.system_metrics_interval = system_metrics_interval
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.owns_run = False
        self.ended = False  # run_id stays readable after end_run/close
        self._client: MlflowClient | None = None
        self._monitor = None

    # ------------------------------------------------------------ runs

    def start_run(
        self,
        run_name: str | None = None,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        node_id: str | None = None,
    ) -> str | None:
        """Create a run (nested under ``parent_run_id`` when given) and return its id, or,
        with ``run_id``, resume that run (status back to RUNNING). This tracker owns the run.
        System metrics start when ``cfg.system_metrics``. Returns None when disabled."""
        if not self.enabled:
            return None
        if self.run_id is not None and not self.ended:
            raise RuntimeError(f"this tracker already has run {self.run_id}; end it first")
        client = self.client
        if run_id is not None:
            run = self._get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            self.experiment_id = run.info.experiment_id
            if tags:
                self._set_tags(run_id, tags)
            resumed = True
        else:
            self.experiment_id = self._experiment_id()
            all_tags = _context_tags()
            if parent_run_id is not None:
                self._get_run(parent_run_id)  # a clear error for a wrong parent id
                all_tags[PARENT_RUN_TAG] = parent_run_id
            all_tags.update({k: _to_str(v) for k, v in (tags or {}).items()})
            run = client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
            run_id = run.info.run_id
            resumed = False
        self.run_id = run_id
        self.owns_run = True
        self.ended = False
        if self.cfg.system_metrics:
            self._start_system_metrics(resume=resumed, node_id=node_id)
        return run_id

    @classmethod
    def attach(
        cls,
        cfg: TrackingConfig,
        run_id: str | None,
        *,
        node_id: str | None = "worker",
        system_metrics: bool | None = None,
        system_metrics_interval: float = 10.0,
    ) -> "Tracker":
        """Join the existing run ``run_id`` (started by another process, e.g. the driver)
        without taking it over: ``close``/exit never end it. Pass the driver's
        ``resolved_config(cfg)`` so this process writes to the same store. System metrics
        (default: ``cfg.system_metrics``) go under ``system/<node_id>/...`` so they do not
        collide with the driver's. ``run_id=None`` or a disabled cfg gives a no-op tracker."""
        tracker = cls(cfg, system_metrics_interval=system_metrics_interval)
        if not tracker.enabled or run_id is None:
            tracker.enabled = False
            return tracker
        run = tracker._get_run(run_id)
        tracker.run_id = run_id
        tracker.experiment_id = run.info.experiment_id
        if cfg.system_metrics if system_metrics is None else system_metrics:
            tracker._start_system_metrics(resume=True, node_id=node_id)
        return tracker

    def end_run(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run FINISHED, FAILED or KILLED; only the first
        call counts. ``run_id`` stays set. On an attached tracker this does end the other
        process's run: use ``close`` there."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        if not self.enabled or self.run_id is None or self.ended:
            return
        self._stop_system_metrics()
        self.client.set_terminated(self.run_id, status)
        self.ended = True

    def close(self, status: str = "FINISHED") -> None:
        """End the run if this tracker owns it (with ``status``), else only stop this
        process's system metrics and detach."""
        if self.owns_run:
            self.end_run(status)
        else:
            self._stop_system_metrics()
            self.ended = True

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.close(status)

    # ------------------------------------------------------------ params and tags

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log params (values made strings: str as is, anything else JSON; over 6000
        characters truncated). MLflow params are immutable: keys already logged with the
        same value are skipped (so a resumed run re-logs its config safely); a key logged
        before with another value keeps its first value, with a warning, and the new value is
        recorded as tag ``changed_param.<key>``. Returns the params as logged."""
        if not self._active():
            return {}
        from mlflow.entities import Param, RunTag

        values = {_key(k): param_value(v) for k, v in params.items()}
        existing = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in values.items() if k in existing and existing[k] != v}
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        for chunk in _chunks(new, PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)
        if changed:
            warnings.warn(
                f"MLflow params cannot change; run {self.run_id} keeps its first values for "
                f"{sorted(changed)} (new values are in tags changed_param.<key>)",
                stacklevel=2,
            )
            tags = [RunTag(_key(f"changed_param.{k}"), v) for k, v in changed.items()]
            for chunk in _chunks(tags, PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=chunk)
        return values

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._active():
            self._set_tags(self.run_id, tags)

    def _set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entities = [RunTag(_key(k), _to_str(v)[:8000]) for k, v in tags.items()]
        for chunk in _chunks(entities, PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def log_config(self, config: "Config", artifact_file: str = "config.yaml") -> None:
        """The flattened config as params and the whole config as a YAML artifact."""
        if not self._active():
            return
        self.log_params(config.flat())
        self.log_config_yaml(config, artifact_file)

    def log_config_yaml(self, config: "Config | str", artifact_file: str = "config.yaml") -> None:
        """The config (a Config or YAML text) as the artifact ``artifact_file``."""
        if not self._active():
            return
        text = config if isinstance(config, str) else config.to_yaml()
        self.client.log_text(self.run_id, text, artifact_file)

    def set_description(self, text: str) -> None:
        """The run's description (markdown), shown on its Overview page in MLflow's UI; cut
        to MLflow's 8000 characters for a tag, with a visible marker."""
        if not self._active():
            return
        if len(text) > MAX_TAG_VALUE:
            text = text[: MAX_TAG_VALUE - len(TRUNCATED)] + TRUNCATED
        self.client.set_tag(self.run_id, DESCRIPTION_TAG, text)

    # ------------------------------------------------------------ metrics

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None
    ) -> None:
        """Log numeric metrics at ``step`` under their MLflow names (``metric_name``: ``loss``
        is logged as ``train/loss``; a name with a ``/`` as it is; table-only figures not at
        all). Values pass through float(): tensors, numpy scalars and Python numbers all work;
        None values are skipped. Two keys that land on one MLflow name are refused."""
        if not self._active():
            return
        from mlflow.entities import Metric

        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        named: dict[str, tuple[str, Any]] = {}
        for key, value in metrics.items():
            name = metric_name(str(key))
            if value is None or name is None:
                continue
            if name in named:
                raise ValueError(
                    f"metrics {named[name][0]!r} and {key!r} would both be logged as MLflow metric {name!r}; "
                    "rename one of them"
                )
            named[name] = (str(key), value)
        entities = [Metric(_key(name), float(v), ts, int(step)) for name, (_, v) in named.items()]
        for chunk in _chunks(entities, METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def last_step(self, name: str) -> int:
        """The highest step at which the run has metric ``name`` (an MLflow name), 0 if none."""
        if not self._active():
            return 0
        history = self.client.get_metric_history(self.run_id, name)
        return max((m.step for m in history), default=0)

    # ------------------------------------------------------------ artifacts

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file or a directory. A file lands as ``<artifact_path>/<name>``; a
        directory's contents land under ``artifact_path`` (default: the directory's name),
        so ``log_artifact("outputs/adapter")`` gives ``adapter/adapter_config.json``, ..."""
        if not self._active():
            return
        local = Path(path)
        if local.is_dir():
            self.client.log_artifacts(self.run_id, str(local), artifact_path or local.name)
        elif local.is_file():
            self.client.log_artifact(self.run_id, str(local), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log artifact {str(local)!r}: no such file or directory")

    def log_table(self, columns: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """A table (column name -> values, all columns the same length) as MLflow's table
        artifact ``artifact_file`` (``.json``): MLflow's UI shows it as a table, and
        ``MlflowClient.load_table`` reads it back as a DataFrame. Logging to a file that
        already holds a table appends the rows (MLflow's behaviour)."""
        if not self._active():
            return
        if not artifact_file.endswith(".json"):
            raise ValueError(f"a table artifact's file must end in .json, got {artifact_file!r}")
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"table columns must have one length, got {lengths}")
        self.client.log_table(self.run_id, {k: list(v) for k, v in columns.items()}, artifact_file)

    def log_loss_curve(
        self,
        points: Sequence[tuple[int, float]] | Mapping[str, Sequence[tuple[int, float]]],
        artifact_file: str = "loss_curve.png",
        artifact_path: str | None = "plots",
        title: str = "loss",
    ) -> None:
        """Plot (step, loss) points — or several named curves, e.g. {"train": [...],
        "eval": [...]} — to a PNG in a temporary directory and log it."""
        if not self._active():
            return
        with tempfile.TemporaryDirectory(prefix="longtune-plot-") as tmp:
            png = plot_loss_curve(points, Path(tmp) / artifact_file, title=title)
            if png is not None:
                self.client.log_artifact(self.run_id, str(png), artifact_path)

    # ------------------------------------------------------------ internals

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self.run_id is None:
            raise RuntimeError("no MLflow run: call start_run() or Tracker.attach() first")
        return True

    def _get_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            raise ValueError(f"MLflow run {run_id!r} not found in {self.tracking_uri}") from exc

    def _experiment_id(self) -> str:
        """Get or create the experiment (safe when several processes race to create it),
        tagged as a fine-tuning experiment unless someone chose another kind for it."""
        from mlflow.exceptions import MlflowException

        name = self.experiment_name
        for _ in range(3):
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage != "active":
                    raise ValueError(
                        f"MLflow experiment {name!r} is deleted in {self.tracking_uri}: restore it "
                        "(`mlflow experiments restore`) or set tracking.experiment_name"
                    )
                if _kind_to_set(experiment.tags.get(EXPERIMENT_KIND_TAG)):
                    # an experiment made before longtune tagged its experiments, or by hand
                    self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return experiment.experiment_id
            try:
                return self.client.create_experiment(
                    name, artifact_location=self._artifact_location(name),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            except MlflowException:
                time.sleep(0.2)  # another process created it first: read it back
        raise RuntimeError(f"could not get or create MLflow experiment {name!r} in {self.tracking_uri}")

    def _artifact_location(self, name: str) -> str | None:
        """For a local SQLite store, artifacts live beside the database
        (``<db dir>/mlruns/<experiment>``), not in whatever directory the creating process
        ran in; other stores choose their own."""
        db = _sqlite_path(self.tracking_uri or "")
        if db is None or not db.is_absolute():
            return None
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
        return (db.parent / "mlruns" / slug).as_uri()

    def _start_system_metrics(self, resume: bool, node_id: str | None) -> None:
        import importlib.util

        if importlib.util.find_spec("psutil") is None:
            warnings.warn(
                "tracking.system_metrics needs psutil (pip install psutil); not logging them",
                stacklevel=3,
            )
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.system_metrics_interval,
            resume_logging=resume,
            node_id=node_id,
            tracking_uri=self.tracking_uri,
        )
        self._monitor.start()

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


# ---------------------------------------------------------------- a job's run


class TrackingError(LongtuneError, RuntimeError):
    """The tracking server cannot be used as configured; the message says why."""


def _refusal(exc: BaseException) -> str | None:
    """What an MLflow server's refusal of our request means, or None for any other error."""
    status = getattr(exc, "get_http_status_code", lambda: None)()
    text = str(exc)
    if status == 401 or "401" in text.split("\n", 1)[0] and "Unauthorized" in text:
        given = os.environ.get("MLFLOW_TRACKING_USERNAME")
        who = f"the account {given!r}" if given else "a request without an account"
        return (f"refused {who} (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                "to the server's account (clusters/README.md, 'MLflow credentials')")
    if status == 403 or "PERMISSION_DENIED" in text:
        return "denied the account MLFLOW_TRACKING_USERNAME names access to this experiment (HTTP 403)"
    return None


def redact_uri(uri: str) -> str:
    """A URI as it may be printed: a password in it (http://user:password@host) is masked."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", uri)


def start_job_run(
    config: "Config",
    run_name: str,
    *,
    job: str,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    system_metrics: bool | None = None,
    log_config: bool = True,
) -> Tracker | None:
    """The one way a longtune job starts its MLflow run (None with tracking off): on the
    driver, in the store and experiment resolved here (absolute SQLite path), tagged with
    the job and run name, with the job's config logged (``log_config``). ``parent_run_id``
    nests it (a Tune trial under its search, a model under its comparison); ``run_id``
    resumes that run. Workers attach with ``Tracker.attach(tracker.cfg, tracker.run_id)``."""
    if not config.tracking.enabled:
        return None
    cfg = resolved_config(config.tracking)
    if system_metrics is not None:
        cfg = cfg.model_copy(update={"system_metrics": system_metrics})
    tracker = Tracker(cfg)
    try:
        tracker.start_run(
            run_name, parent_run_id=parent_run_id, run_id=run_id,
            tags={JOB_TAG: job, RUN_NAME_TAG: run_name, **(tags or {})},
        )
    except Exception as exc:
        refused = _refusal(exc)
        if refused is None:
            raise
        raise TrackingError(f"the MLflow server at {redact_uri(tracker.tracking_uri or '')} {refused}") from None
    if log_config:
        tracker.log_config(config)
    return tracker


def read_table(client: "MlflowClient", run_id: str, artifact_file: str):
    """A table artifact of ``run_id`` (``Tracker.log_table``) as a pandas DataFrame. What
    ``MlflowClient.load_table`` does, without its search through the *global* tracking URI
    (MLflow 3.17 looks the runs up with the fluent ``mlflow.search_runs``, which misses a
    client's own store)."""
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="longtune-table-") as tmp:
        local = client.download_artifacts(run_id, artifact_file, tmp)
        return pd.read_json(local, orient="split")


def find_run(cfg: TrackingConfig, tags: Mapping[str, str]) -> str | None:
    """The newest run of ``cfg``'s experiment carrying every one of ``tags`` (e.g. a search's
    run found again on resume), or None."""
    probe = Tracker(resolved_config(cfg))
    experiment = probe.client.get_experiment_by_name(probe.experiment_name)
    if experiment is None:
        return None
    wanted = {k: str(v) for k, v in tags.items()}
    # MLflow's filter strings cannot quote a quote: such values are matched here instead
    plain = {k: v for k, v in wanted.items() if "'" not in v and "`" not in k}
    runs = probe.client.search_runs(
        [experiment.experiment_id],
        filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in plain.items()),
        order_by=["attributes.start_time DESC"],
        max_results=1 if plain == wanted else 1000,
    )
    for run in runs:
        if all(run.data.tags.get(k) == v for k, v in wanted.items()):
            return run.info.run_id
    return None


def loss_curves(tracker: Tracker) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of train and eval loss, from the run's MLflow history (Ray
    Train V2's Result keeps only the metrics reported with checkpoints)."""
    out = {}
    for name, metric in (("train", "loss"), ("eval", "eval_loss")):
        history = tracker.client.get_metric_history(tracker.run_id, metric_name(metric))
        if history:
            out[name] = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
    return out


# ---------------------------------------------------------------- MLflow's names


# What one training run reports (train/loop.py, the adapters' training hooks): its own
# section of charts in MLflow's UI.
TRAIN_METRICS = frozenset({
    "loss", "lr", "tokens_per_s", "step_time_s", "data_wait_s", "peak_memory_mb", "tokens_seen", "epoch",
    "loss_scale", "skipped_steps", "resumed_from_step", "redone_steps", "rank_budget", "ranks_kept", "orth_loss",
})
# A search's figures (tune/mlflow_runs.py): final_<tune.metric> and steps_run on a trial,
# best_<tune.metric> and the trial counts on the search.
TUNE_METRICS = re.compile(r"(final_|best_).+|trials_(completed|stopped_early|failed)|steps_run")
EVAL_METRICS = {
    "eval_loss": "eval/loss",  # the held-out loss the training loop scores at checkpoints
    "eval_ppl": "eval/ppl",
    "ppl_vs_length": "eval/ppl_vs_length",  # longtune evaluate: step = the length
    "passkey_acc_vs_length": "eval/passkey_vs_length",
    "response_loss": "eval/response_loss",  # data.format sft (longtune/eval/sft.py)
    "exact_match": "eval/exact_match",
}
_BY_LENGTH = ((re.compile(r"ppl_(\d+)"), "eval/ppl_{}"), (re.compile(r"passkey_acc_(\d+)"), "eval/passkey_{}"))
# ln(ppl_<L>) and the scored-token count, the same at every length and before and after
# training: columns of the run's tables (before_after.json, eval/results.json, ...), not charts
TABLE_ONLY = re.compile(r"eval_(nll|tokens)_\d+|exact_match_trials")


def metric_name(key: str) -> str | None:
    """The MLflow name of longtune's metric ``key``; the part before the ``/`` is the section
    MLflow's UI puts its chart in (sections in alphabetical order: eval, train, tune).

    ``loss``, ``lr``, ``tokens_per_s``, ... -> ``train/<key>``; ``eval_loss`` -> ``eval/loss``,
    ``eval_ppl`` -> ``eval/ppl``; ``ppl_<L>`` -> ``eval/ppl_<L>``; ``passkey_acc_<L>`` ->
    ``eval/passkey_<L>``; ``train_<key>`` (a compared model's training figures) -> the name
    of ``<key>``; ``final_*``, ``best_*``, ``trials_*``, ``steps_run`` -> ``tune/<key>``;
    ``eval_nll_<L>`` and ``eval_tokens_<L>`` -> None (not logged: they are in the tables).
    A key that already has a ``/`` (MLflow's ``system/...``, a caller's own group) and any
    other key are kept as they are."""
    if "/" in key:
        return key
    if key in TRAIN_METRICS:
        return f"train/{key}"
    if key in EVAL_METRICS:
        return EVAL_METRICS[key]
    for pattern, name in _BY_LENGTH:
        match = pattern.fullmatch(key)
        if match:
            return name.format(match.group(1))
    if TABLE_ONLY.fullmatch(key):
        return None
    if key.startswith("train_"):
        inner = key.removeprefix("train_")
        if inner in TRAIN_METRICS or inner in EVAL_METRICS:
            return metric_name(inner)
    if TUNE_METRICS.fullmatch(key):
        return f"tune/{key}"
    return key


def _kind_to_set(kind: str | None) -> bool:
    """Whether an experiment whose kind tag is ``kind`` should get ours: no kind, or one
    MLflow's UI only guessed (``*_inferred``, ``no_inferred_type``); a kind a person chose
    is kept."""
    return not kind or kind == "no_inferred_type" or kind.endswith("_inferred")


# ---------------------------------------------------------------- helpers


UI_PORT = 5000  # `mlflow ui`'s default port


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """The page of a run's metric charts in MLflow's UI at ``base_url``. MLflow 3's UI opens
    in its GenAI view (traces, latency, token usage) unless told otherwise: the
    ``workflowType`` parameter asks for the "Model training" view."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
            "?workflowType=machine_learning")


def ui_hint(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to look at runs in ``tracking_uri``: a store is opened with `mlflow ui`; a
    tracking server already is the UI. With the run's ids, the link to its charts too."""
    tracking_uri = redact_uri(tracking_uri)
    server = tracking_uri.startswith(("http://", "https://"))
    base = tracking_uri if server else f"http://127.0.0.1:{UI_PORT}"
    link = f"{run_url(base, experiment_id, run_id)}" if experiment_id and run_id else None
    if server:
        return f"Open it at: {link or tracking_uri}"
    hint = f"Open it with: mlflow ui --backend-store-uri {tracking_uri} --port {UI_PORT}"
    return f"{hint}\nthen open: {link}" if link else hint


def param_value(value: Any) -> str:
    """An MLflow param value: strings as they are, anything else (numbers, bools, None,
    lists, dicts) as JSON; cut to 6000 characters with a visible marker."""
    text = _to_str(value)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
    return text


def plot_loss_curve(
    points: Sequence[tuple[int, float]] | Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    title: str = "loss",
) -> Path | None:
    """Write a PNG of one or several (step, value) curves; None when there is nothing to
    plot. Uses matplotlib's object API on an Agg canvas: no pyplot, no global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = dict(points) if isinstance(points, Mapping) else {"train": points}
    curves = {name: [(int(s), float(v)) for s, v in pts] for name, pts in curves.items() if pts}
    if not curves:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, pts in curves.items():
        finite = [(s, v) for s, v in pts if math.isfinite(v)]
        ax.plot([s for s, _ in finite], [v for _, v in finite], label=name, marker="." if len(finite) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(title)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)


def _key(key: Any) -> str:
    return str(key)[:MAX_KEY]


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _sqlite_path(uri: str) -> Path | None:
    """The database path of a ``sqlite:///...`` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path else None


def _context_tags() -> dict[str, str]:
    """MLflow's usual run tags (user, source, git commit) for runs made through the client."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return dict(resolve_tags())
    except Exception:  # context providers are best-effort
        return {}


__all__ = [
    "DEFAULT_EXPERIMENT",
    "DESCRIPTION_TAG",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "PARENT_RUN_TAG",
    "RUN_STATUSES",
    "Tracker",
    "find_run",
    "loss_curves",
    "metric_name",
    "param_value",
    "plot_loss_curve",
    "read_table",
    "resolve_experiment",
    "resolve_tracking_uri",
    "resolved_config",
    "run_url",
    "start_job_run",
    "ui_hint",
]
