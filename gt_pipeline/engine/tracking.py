"""Experiment tracking in MLflow: one MLflow run per training run, one MLflow experiment per sweep.

No Dagster here. The `trained_*` assets open a `RunTracker` per training (their config fields
`experiment`, `run_name`, `track`) and a sweep script does the same around `engine.train.train`:

    tracker = RunTracker.start(tracking_uri(gt_home), "sweep-lr", "gf_mh-lr3e-4-s0", params=asdict(cfg))
    res = train(cfg, shards, work, on_log=tracker.log_row)   # live curves (throttled rows)
    tracker.log_rows(res.log)                                 # every step (rows already sent are skipped)
    tracker.finish(checkpoint="/path/to/artifact")

What a run holds: the training config as params (nested dicts flattened to `a.b`), per-step metrics
(train_loss, val_loss when measured, lr, grad_norm and grad_norm_rwkv/mamba/fusion/other, tokens_per_s,
and gate_mean / gate_mean_l<i> from `gate_means`), the checkpoint path as tag and param. Runs of one
experiment overlay in the MLflow UI's chart view (select runs, "Compare").

Where: `MLFLOW_TRACKING_URI` when set (a tracking server, `http://host:5000`, or any MLflow store URI),
else a SQLite store at `<GT_HOME>/mlflow.db`. View it with `mlflow ui --backend-store-uri
sqlite:///<GT_HOME>/mlflow.db` (the `tracking-ui` extra installs the UI; the client here is mlflow-skinny).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from filelock import FileLock

DEFAULT_EXPERIMENT = "groundthink"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def tracking_uri(gt_home: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set and non-empty, else the SQLite store `<gt_home>/mlflow.db`."""
    env = os.environ if env is None else env
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    home = Path(gt_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"lr_mult": {"mamba": 0.5}} -> {"lr_mult.mamba": "0.5"}; values as MLflow params (strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_CHARS]
    return out


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a training log row, without `step` (NaN val_loss = not measured)."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


@torch.no_grad()
def gate_means(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Mean fusion gate per layer (`gate_mean_l<i>`) and over layers (`gate_mean`) on a probe batch
    x (B, T) int64, for models that report a gate (GF family (B, T, 1), WS alpha, HY g_r (C,)); {} for
    the rest. Runs in eval mode and restores the mode and the RNG streams, so a training run that
    calls it between steps continues bit for bit as without it."""
    was_training = model.training
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            out = model(x, return_states=True)
        finally:
            model.train(was_training)
    per_layer = {}
    for i, st in enumerate(out.layer_states or []):
        g = st.get("gate")
        if torch.is_tensor(g):
            per_layer[f"gate_mean_l{i}"] = float(g.float().mean())
    if per_layer:
        per_layer["gate_mean"] = sum(per_layer.values()) / len(per_layer)
    return per_layer


class RunTracker:
    """One MLflow run; `start` opens it, `finish` closes it (FINISHED, or FAILED with `failed=True`)."""

    def __init__(self, client, run_id: str, experiment_id: str, uri: str):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri
        self.logged_steps: set[int] = set()

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None) -> "RunTracker":
        """Open a run named `run_name` in `experiment` (created if missing) at the store `uri`."""
        if not experiment or not experiment.strip():
            raise ValueError("experiment must be a non-empty name (runs of one sweep share it), got "
                             f"{experiment!r}")
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:  # mlflow-skinny is a core dependency; a hand-assembled environment may lack it
            raise ImportError(f"experiment tracking needs mlflow-skinny ({e}): `pip install 'mlflow-skinny>=3.4,<4'`, "
                              "or turn tracking off for this run (TrainingConfig track: false)") from e

        # The first use of a SQLite store creates its tables, and the first run of an experiment creates it:
        # concurrent sweep processes do both one at a time under a file lock beside the database.
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(db.with_name(db.name + ".lock"))) if db is not None else contextlib.nullcontext():
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if db is not None:  # keep run artifacts next to the store, not in the cwd's ./mlruns
                    location = (db.parent / "mlflow-artifacts").as_uri()
                exp_id = client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
        tracker = cls(client, run.info.run_id, exp_id, uri)
        flat = flatten(params or {})
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(tracker.run_id, params=items[i : i + 100])
        return tracker

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_row(self, row: Mapping[str, Any]) -> None:
        """One training log row (engine.train's: step, train_loss, val_loss, lr, grad_norm*, tokens_per_s)."""
        step = int(float(row["step"]))
        if step in self.logged_steps:
            return
        self.log_metrics(row_metrics(row), step)
        self.logged_steps.add(step)

    def log_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Every row not yet logged (so live rows from `on_log` and the final log do not double up)."""
        from mlflow.entities import Metric

        now, items = int(time.time() * 1000), []
        for row in rows:
            step = int(float(row["step"]))
            if step in self.logged_steps:
                continue
            items += [Metric(k, v, now, step) for k, v in row_metrics(row).items()]
            self.logged_steps.add(step)
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def finish(self, checkpoint: str | os.PathLike[str] | None = None, failed: bool = False) -> None:
        """Record the checkpoint path (tag and param `checkpoint_path`) and close the run."""
        if checkpoint is not None:
            self.client.set_tag(self.run_id, "checkpoint_path", str(checkpoint))
            self.client.log_param(self.run_id, "checkpoint_path", str(checkpoint))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    @property
    def url(self) -> str:
        """Where the run is shown: the server's run page, or the store URI with the run id."""
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"{self.uri} (experiment {self.experiment_id}, run {self.run_id})"
