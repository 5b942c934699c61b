"""Data-parallel training: torchrun with 2 gloo ranks on CPU, the engine's DDP path and the trained_* asset's
torchrun + dagster-pipes launch.

This file is also the torchrun driver of the engine-level runs (`__main__` below): it calls `train()` on each
rank, records every checkpoint write, can crash one rank after a step, and saves each rank's final state.

Why the comparisons hold: a 2-rank run with batch B draws the same 2B windows per step as one process with
batch 2B, and as one process with batch B x grad_accum 2 (same generator, rows split in order). Against the
grad-accumulation run it is bit-identical on CPU: each rank's gradient is its B-row mean, DDP averages the two
((a + b) / 2) where accumulation adds a/2 + b/2, and halving is exact in binary floating point, as is a sum of
two terms in either order. Against the batch-2B run only the order of the fp32 reductions differs (a mean of
2B rows vs the mean of two B-row means), so per-step losses agree to a few ulp (tolerance: 8 ulp of fp32 at
the loss value, about 4e-6) and weights to 1e-4, a thirtieth of one Adam step's maximum update (lr 3e-3): the
same trajectory. The control run with batch B (half the global batch) lands far outside both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BASE = dict(model="GF-MH", size="demo", vocab_size=512, steps=8, batch_size=2, seq_len=32, lr=3e-3, min_lr=3e-4,
            eval_every=4, eval_batches=2, checkpoint_every=4)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


# ---------------------------------------------------------------------------------------------------------
# torchrun driver (each rank runs this file as a script)
# ---------------------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def _driver() -> None:
    import importlib

    engine = importlib.import_module("gt_pipeline.engine.train")  # the module (the package re-exports train())

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--crash-rank", type=int, default=-1)
    ap.add_argument("--crash-at-step", type=int, default=-1)
    ap.add_argument("--poison-rank", type=int, default=-1)
    ap.add_argument("--poison-at-step", type=int, default=-1)
    a = ap.parse_args()
    rank = int(os.environ["RANK"])
    real_save = engine.save_checkpoint

    def recording_save(root, step, *args, **kw):  # who writes checkpoints
        with open(a.work / "checkpoint_writes.txt", "a") as f:
            f.write(f"rank {rank} step {step}\n")
        return real_save(root, step, *args, **kw)

    def crash(step, model):
        if rank == a.crash_rank and step == a.crash_at_step:
            raise Stop(f"rank {rank} stops after step {step}")
        if rank == a.poison_rank and step == a.poison_at_step:  # NaN weights on this rank only
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    engine.save_checkpoint = recording_save
    try:
        res = engine.train(engine.TrainConfig(**json.loads(a.config)), a.shards, a.work, on_step_end=crash)
    except engine.TrainingDiverged as exc:  # record how each rank stopped, then exit cleanly
        (a.work / f"diverged_rank{rank}.txt").write_text(str(exc))
        return
    torch.save({"log": res.log, "state": res.model.state_dict(), "resumed_from_step": res.resumed_from_step,
                "world_size": res.world_size}, a.work / f"rank{rank}.pt")


def torchrun_driver(shards: Path, work: Path, cfg: dict, *extra: str) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           "0", __file__, "--config", json.dumps(cfg), "--shards", str(shards), "--work", str(work), *extra]
    try:
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:  # say how far the ranks got, not only that they hung
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        files = sorted(p.name for p in work.rglob("*")) if work.exists() else []
        pytest.fail(f"torchrun did not finish in 300 s; files in {work}: {files}\nstderr tail:\n{err[-4000:]}")


# ---------------------------------------------------------------------------------------------------------
# engine level
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(demo_shards) -> Path:
    return demo_shards


@pytest.fixture(scope="module")
def two_ranks(shards, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run (batch 2 per rank, global batch 4)."""
    work = tmp_path_factory.mktemp("two_ranks")
    p = torchrun_driver(shards, work, BASE)
    assert p.returncode == 0, p.stderr[-4000:]
    return work


def one_process(shards: Path, work: Path, **kw):
    from gt_pipeline.engine.train import TrainConfig, train

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): same kernels, same blocking
    try:
        return train(TrainConfig(**{**BASE, **kw}), shards, work)
    finally:
        torch.set_num_threads(n)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_ranks_equal_one_process_with_the_same_global_batch(shards, two_ranks, tmp_path):
    ddp = torch.load(two_ranks / "rank0.pt")
    assert ddp["world_size"] == 2
    accum = one_process(shards, tmp_path / "accum", grad_accum=2)  # batch 2 x accum 2: exact twin
    big = one_process(shards, tmp_path / "big", batch_size=4, eval_batches=1)  # batch 4, same 4 eval windows
    half = one_process(shards, tmp_path / "half")  # batch 2: half the global batch (control)

    losses = lambda log: np.array([r["train_loss"] for r in log])  # noqa: E731
    ddp_loss = losses(ddp["log"])
    assert len(ddp_loss) == 8 and np.all(np.isfinite(ddp_loss))
    # Bit for bit equal to gradient accumulation over the same windows (module docstring).
    assert losses(accum.log).tolist() == ddp_loss.tolist()
    for k, v in accum.model.state_dict().items():
        assert torch.equal(v, ddp["state"][k]), f"{k}: max abs diff {(v - ddp['state'][k]).abs().max().item():.3g}"
    # Equal to the batch-4 run up to the order of fp32 reductions.
    loss_err = float(np.abs(losses(big.log) - ddp_loss).max())
    loss_tol = 8 * float(np.spacing(np.float32(ddp_loss.max())))
    w_err = max_diff(big.model.state_dict(), ddp["state"])
    val_err = max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(big.log, ddp["log"]) if not math.isnan(a["val_loss"]))
    print(f"2 ranks x batch 2 vs 1 process x batch 4: max |loss diff| {loss_err:.3g} (tol {loss_tol:.3g}), "
          f"max |val diff| {val_err:.3g}, max |weight diff| {w_err:.3g} (tol 1e-4)")
    assert loss_err <= loss_tol and val_err <= loss_tol, f"loss diff {loss_err:.3g} / val {val_err:.3g} > {loss_tol:.3g}"
    assert w_err <= 1e-4, f"weights differ by {w_err:.3g}"
    # The control: a different global batch is far outside both tolerances, so the comparison can fail.
    half_err = float(np.abs(losses(half.log) - ddp_loss)[1:].max())
    assert half_err > 100 * loss_tol and max_diff(half.model.state_dict(), ddp["state"]) > 1e-3, half_err


def test_only_rank_0_writes_checkpoints_and_every_rank_ends_with_the_same_weights(two_ranks):
    assert (two_ranks / "checkpoint_writes.txt").read_text().splitlines() == ["rank 0 step 4"]
    assert sorted(p.name for p in (two_ranks / "checkpoints").iterdir()) == ["step_0000004"]
    r0, r1 = torch.load(two_ranks / "rank0.pt"), torch.load(two_ranks / "rank1.pt")
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k} differs between ranks"
    assert [r["train_loss"] for r in r0["log"]] == [r["train_loss"] for r in r1["log"]]  # the all-reduced loss
    assert not any(k.startswith("module.") for k in r0["state"])  # the unwrapped model, not DDP's


def test_resumed_two_rank_run_equals_the_uninterrupted_one(shards, two_ranks, tmp_path):
    work = tmp_path / "broken"
    crashed = torchrun_driver(shards, work, BASE, "--crash-rank", "1", "--crash-at-step", "6")
    assert crashed.returncode != 0 and "rank 1 stops after step 6" in crashed.stderr
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step_0000004"]
    assert not (work / "rank0.pt").exists()
    resumed = torchrun_driver(shards, work, BASE)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = torch.load(two_ranks / "rank0.pt"), torch.load(work / "rank0.pt")
    assert b["resumed_from_step"] == 4 and torch.load(work / "rank1.pt")["resumed_from_step"] == 4
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"{k} differs after resume"
    assert [r["train_loss"] for r in a["log"]] == [r["train_loss"] for r in b["log"]]


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(shards, tmp_path):
    work = tmp_path / "nan"
    p = torchrun_driver(shards, work, BASE, "--poison-rank", "1", "--poison-at-step", "5")
    assert p.returncode == 0, p.stderr[-4000:]
    msgs = [(work / f"diverged_rank{r}.txt").read_text() for r in (0, 1)]
    for m in msgs:  # rank 0's weights are finite: it stops because the all-reduced loss is NaN
        assert m.startswith("loss is nan at step 6") and "step_0000004" in m, m
    assert not (work / "rank0.pt").exists() and not (work / "rank1.pt").exists()


def test_resume_refuses_a_checkpoint_of_another_world_size(shards, two_ranks, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(two_ranks / "checkpoints", work / "checkpoints")
    with pytest.raises(ValueError, match="2-rank run, this one has 1 ranks"):
        one_process(shards, work)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_by_rendezvous_equal_one_node_with_two_ranks(shards, two_ranks, tmp_path):
    """The README's several-machines recipe, both 'nodes' on localhost: the worker launched twice with
    static rendezvous (node 0 holds rank 0 and writes the artifact) trains the same bits as one node x 2."""
    from safetensors.torch import load_file

    from gt_pipeline.engine.worker import torchrun_command

    launch = dict(nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{_free_port()}")
    cfg = BASE
    work, out = tmp_path / "work", tmp_path / "out"
    nodes = [subprocess.Popen(torchrun_command(cfg, shards, work, node_rank=k, out=out if k == 0 else None, **launch),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 0)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[1][-3000:] + logs[0][-3000:]
    assert "step 8/8 loss" in logs[1] and "world_size 2" in logs[1]  # node 0 prints the progress lines
    ref = torch.load(two_ranks / "rank0.pt")["state"]
    got = load_file(str(out / "model.safetensors"))
    for k, v in got.items():
        assert torch.equal(v, ref[k]), f"{k} differs between 2 nodes x 1 and 1 node x 2"
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 4


# ---------------------------------------------------------------------------------------------------------
# asset level: trained_gf_mh with nproc_per_node 2 through torchrun + dagster-pipes
# ---------------------------------------------------------------------------------------------------------
DP_TRAIN = {"steps": 8, "batch_size": 2, "seq_len": 32, "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4,
            "nproc_per_node": 2}


def _run_config(train: dict) -> dict:
    return {"ops": {"bpe_tokenizer": {"config": {"vocab_size": 1024}}, "trained_gf_mh": {"config": train}}}


def _materialize(home: Path, train: dict, instance=None):
    import dagster as dg

    from gt_pipeline import checks
    from gt_pipeline.assets import data as data_assets
    from gt_pipeline.assets import kernels as kernel_assets
    from gt_pipeline.assets.training import trained_assets
    from gt_pipeline.resources import DemoWikiTextSource, resources_from_env

    assets = [data_assets.wikitext103_raw, data_assets.bpe_tokenizer, data_assets.token_shards,
              kernel_assets.wkv6_kernel, *trained_assets, *checks.gate_checks]
    resources = {**resources_from_env({"GT_PROFILE": "demo", "GT_HOME": str(home)}),
                 "source": DemoWikiTextSource(size_mb=0.4)}
    sel = dg.AssetSelection.assets("trained_gf_mh").upstream()
    return dg.materialize(assets, selection=sel, resources=resources, run_config=_run_config(train),
                          instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False)


def _meta(res, asset="trained_gf_mh") -> dict:
    (mat,) = res.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


def _failure_text(res) -> str:
    err = res.get_step_failure_events()[0].event_specific_data.error
    out = []
    while err is not None:
        out.append(err.message)
        err = err.cause
    return "\n".join(out)


@pytest.fixture(scope="module")
def dp_asset(tmp_path_factory):
    import dagster as dg

    home = tmp_path_factory.mktemp("gt_home_dp")
    instance = dg.DagsterInstance.ephemeral()
    res = _materialize(home, DP_TRAIN, instance)
    assert res.success, _failure_text(res)
    logs = [e.user_message for e in instance.all_logs(res.run_id)]
    return home, res, logs


def test_asset_trains_on_two_ranks_through_pipes(dp_asset):
    from gt_pipeline.assets.training import load_trained
    from gt_pipeline.store import ArtifactStore

    home, res, logs = dp_asset
    m = _meta(res)
    assert m["cache_hit"] is False and m["world_size"] == 2 and m["global_batch_size"] == 4 and m["steps"] == 8
    assert math.isfinite(m["final_train_loss"]) and math.isfinite(m["final_val_loss"])
    assert m["final_val_loss"] < math.log(1024)
    # The worker's progress lines (rank 0, over dagster-pipes) are in the run's log.
    assert any(line.startswith("step 8/8 loss") and " val " in line for line in logs), logs[-20:]
    assert any("launching 2 data-parallel ranks" in line for line in logs)
    art = ArtifactStore(home).latest("trained_gf_mh")
    assert art.fingerprint == m["fingerprint"] and not (home / "trained_gf_mh" / f"{art.fingerprint}.work").exists()
    model, cfg = load_trained(art)  # loads like a one-process artifact: no DDP `module.` prefixes
    assert cfg["batch_size"] == 2 and json.loads(art.file("config.json").read_text())["distributed"]["world_size"] == 2
    x = torch.randint(0, 1024, (1, 16))
    assert torch.isfinite(model(x).logits).all()
    evals = {e.check_name: e.passed for e in res.get_asset_check_evaluations()}
    assert evals["g1_forward"] is True


def test_asset_one_process_with_the_same_global_batch_trains_the_same_model(dp_asset):
    from safetensors.torch import load_file

    home, dp, _ = dp_asset
    one = _materialize(home, {**DP_TRAIN, "nproc_per_node": 1, "batch_size": 4, "eval_batches": 1})
    assert one.success, _failure_text(one)
    a, b = _meta(dp), _meta(one)
    assert b["world_size"] == 1 and b["global_batch_size"] == 4 and a["fingerprint"] != b["fingerprint"]
    loss_err = abs(a["final_train_loss"] - b["final_train_loss"])
    assert loss_err <= 8 * float(np.spacing(np.float32(a["final_train_loss"]))), loss_err
    wa, wb = load_file(str(Path(a["path"]) / "model.safetensors")), load_file(str(Path(b["path"]) / "model.safetensors"))
    assert wa.keys() == wb.keys() and max_diff(wa, wb) <= 1e-4


def test_asset_rematerialization_of_a_two_rank_run_is_a_cache_hit(dp_asset):
    home, first, _ = dp_asset
    res = _materialize(home, {**DP_TRAIN, "rdzv_endpoint": "10.0.0.1:29400"})  # how ranks meet is not in the key
    assert res.success and _meta(res)["cache_hit"] is True
    assert _meta(res)["fingerprint"] == _meta(first)["fingerprint"]


def test_a_failing_worker_fails_the_materialization_with_its_message(dp_asset):
    home, _, _ = dp_asset
    res = _materialize(home, {**DP_TRAIN, "seq_len": 10**7})
    assert not res.success
    text = _failure_text(res)
    assert "data-parallel training on 2 ranks failed" in text and "seq_len=10000000 is beyond" in text, text


@pytest.mark.parametrize("fields, match", [
    ({"nproc_per_node": 0}, "nproc_per_node must be a positive integer"),
    ({"nnodes": 0}, "nnodes must be a positive integer"),
    ({"nnodes": 2}, "rdzv_endpoint must be 'host:port'"),
    ({"nnodes": 2, "rdzv_endpoint": "node0"}, "rdzv_endpoint must be 'host:port'"),
])
def test_bad_launch_config_fails_before_compute(dp_asset, fields, match):
    home, _, _ = dp_asset
    before = sorted(p.name for p in (home / "trained_gf_mh").iterdir())
    res = _materialize(home, {**DP_TRAIN, **fields, "force": True})
    assert not res.success
    assert match in _failure_text(res)
    assert sorted(p.name for p in (home / "trained_gf_mh").iterdir()) == before  # nothing started


def test_more_ranks_than_gpus_names_nproc_per_node(monkeypatch):
    from gt_pipeline.assets.training import TrainingConfig
    from gt_pipeline.engine.train import TrainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = TrainConfig(**{**BASE, "device": "cuda"})
    with pytest.raises(ValueError, match=r"nproc_per_node=2 but this machine has 1 GPU"):
        TrainingConfig(nproc_per_node=2, device="cuda").world_size(cfg)
    assert TrainingConfig(nproc_per_node=1, device="cuda").world_size(cfg) == 1
    cpu = TrainConfig(**{**BASE, "device": "cpu"})  # gloo ranks on CPU: no GPU count applies
    assert TrainingConfig(nproc_per_node=3, nnodes=2, rdzv_endpoint="h:1", device="cpu").world_size(cpu) == 6


def test_world_size_enters_the_fingerprint_and_one_rank_keeps_the_old_key():
    from gt_pipeline.assets.training import TRAIN_VERSION, training_fingerprint
    from gt_pipeline.store import fingerprint

    resolved, up, env = {"lr": 1e-3}, {"token_shards": "a"}, {"torch": "x"}
    assert training_fingerprint("trained_gf_mh", resolved, up, env, 1) == fingerprint(
        "trained_gf_mh", TRAIN_VERSION, resolved, up, env=env)
    assert training_fingerprint("trained_gf_mh", resolved, up, env, 2) != training_fingerprint(
        "trained_gf_mh", resolved, up, env, 1)


def test_the_worker_and_the_engine_do_not_import_dagster():
    code = ("import sys, gt_pipeline.engine.worker, gt_pipeline.engine.train, gt_pipeline.engine.artifact; "
            "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


if __name__ == "__main__":
    _driver()
