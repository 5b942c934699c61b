"""Experiment tracking on the local MLflow store: params, per-step metrics, grouping, gate means."""

import math

import pytest
import torch

import models
from gt_pipeline.engine.tracking import RunTracker, flatten, gate_means, row_metrics, tracking_uri

mlflow = pytest.importorskip("mlflow")  # a core dependency; importorskip only gives a clear message
from mlflow.tracking import MlflowClient  # noqa: E402


def rows(scale: float, n: int = 5):
    return [{"step": s, "train_loss": scale / s, "val_loss": math.nan if s % 2 else scale / (s + 1), "lr": 1e-3 * s,
             "grad_norm": 1.0 + s, "grad_norm_rwkv": 0.5 * s, "grad_norm_mamba": 0.25 * s, "grad_norm_fusion": 0.01 * s,
             "grad_norm_other": 0.1 * s, "tokens_per_s": 1000.0 + s} for s in range(1, n + 1)]


def test_uri_defaults_to_sqlite_under_gt_home_and_follows_the_env(tmp_path):
    assert tracking_uri(tmp_path, env={}) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri(tmp_path, env={"MLFLOW_TRACKING_URI": ""}).startswith("sqlite:///")
    assert tracking_uri(tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}) == "http://127.0.0.1:5000"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's schema migrations, seconds each)."""
    home = tmp_path_factory.mktemp("mlflow_home")
    return home, tracking_uri(home, env={})


def test_runs_of_one_sweep_log_params_metrics_and_checkpoint_and_read_back(store):
    tmp_path, uri = store
    runs = {}
    for name, scale in (("a", 4.0), ("b", 8.0)):
        t = RunTracker.start(uri, "sweep-1", f"run-{name}", params={"lr": 3e-4, "lr_mult": {"mamba": 0.5}},
                             tags={"asset": "trained_gf_mh"})
        live = rows(scale)
        t.log_row(live[0])          # a live row, then the whole log: step 1 must not be logged twice
        t.log_rows(live)
        t.log_metrics({"gate_mean": 0.3, "gate_mean_l0": 0.2, "gate_mean_l1": 0.4}, step=5)
        t.finish(checkpoint=tmp_path / f"ckpt-{name}")
        runs[name] = t.run_id
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("sweep-1")
    found = c.search_runs([exp.experiment_id])
    assert {r.info.run_id for r in found} == set(runs.values())  # grouped: one experiment, both runs
    run = c.get_run(runs["b"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run-b"
    assert run.data.params["lr"] == "0.0003" and run.data.params["lr_mult.mamba"] == "0.5"
    assert run.data.tags["checkpoint_path"] == str(tmp_path / "ckpt-b") and run.data.tags["asset"] == "trained_gf_mh"
    hist = {m.step: m.value for m in c.get_metric_history(runs["b"], "train_loss")}
    assert hist == {s: 8.0 / s for s in range(1, 6)}
    assert {m.step: m.value for m in c.get_metric_history(runs["b"], "val_loss")} == {2: 8.0 / 3, 4: 8.0 / 5}
    for key, f in (("lr", lambda s: 1e-3 * s), ("grad_norm_rwkv", lambda s: 0.5 * s), ("grad_norm_mamba", lambda s: 0.25 * s),
                   ("grad_norm_fusion", lambda s: 0.01 * s), ("grad_norm_other", lambda s: 0.1 * s),
                   ("tokens_per_s", lambda s: 1000.0 + s)):
        got = sorted((m.step, m.value) for m in c.get_metric_history(runs["b"], key))
        assert got == [(s, pytest.approx(f(s))) for s in range(1, 6)], key
    assert [m.value for m in c.get_metric_history(runs["b"], "gate_mean_l1")] == [0.4]


def test_a_failed_run_is_marked_failed(store):
    _, uri = store
    t = RunTracker.start(uri, "x", "broken")
    t.finish(failed=True)
    assert MlflowClient(tracking_uri=uri).get_run(t.run_id).info.status == "FAILED"


def test_empty_experiment_name_is_refused(store):
    with pytest.raises(ValueError, match="experiment must be a non-empty name"):
        RunTracker.start(store[1], " ", "r")


def test_flatten_and_row_metrics():
    assert flatten({"a": 1, "b": {"c": "x", "d": {"e": 2}}, "f": {}}) == {"a": "1", "b.c": "x", "b.d.e": "2", "f": "{}"}
    assert row_metrics({"step": 3, "train_loss": "2.5", "val_loss": math.nan, "device": "cpu", "ok": True}) == \
        {"train_loss": 2.5}


def test_gate_means_match_the_layer_states_and_leave_training_untouched(one_thread):
    torch.manual_seed(0)
    model = models.get_model("GF-MH", 97, size="demo").train()
    x = torch.randint(0, 97, (2, 16))
    g = gate_means(model, x)
    with torch.no_grad():
        states = model.eval()(x, return_states=True).layer_states
    model.train()
    want = [float(st["gate"].float().mean()) for st in states]
    assert [g[f"gate_mean_l{i}"] for i in range(len(want))] == want
    assert g["gate_mean"] == pytest.approx(sum(want) / len(want))
    assert model.training
    rng = torch.get_rng_state()
    gate_means(model, x)
    assert torch.equal(rng, torch.get_rng_state())
    assert gate_means(models.get_model("GPT", 97, size="demo"), x) == {}  # no gate


def _open_run(uri: str, name: str) -> str:
    t = RunTracker.start(uri, "sweep-concurrent", name, params={"seed": name})
    t.finish()
    return t.run_id


def test_concurrent_processes_on_a_fresh_store_all_open_their_runs_in_one_experiment(tmp_path):
    """A sweep's K processes start at once on a store nobody has used: the table creation and the
    experiment's creation are serialised, so every run opens, all in one experiment."""
    import concurrent.futures
    import multiprocessing

    uri = tracking_uri(tmp_path, env={})
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as ex:
        ids = list(ex.map(_open_run, [uri] * 3, ["r0", "r1", "r2"]))
    c = MlflowClient(tracking_uri=uri)
    exps = [e for e in c.search_experiments() if e.name == "sweep-concurrent"]
    assert len(exps) == 1
    assert {r.info.run_id for r in c.search_runs([exps[0].experiment_id])} == set(ids)


def test_a_missing_mlflow_is_named_with_the_two_ways_out(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if the package were absent
    with pytest.raises(ImportError, match=r"mlflow-skinny.*track: false"):
        RunTracker.start(tracking_uri(tmp_path, env={}), "exp", "run")
