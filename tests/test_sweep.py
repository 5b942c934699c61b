"""The research sweep: config matching and the comparison over seeds (engine), and a tiny demo sweep
(2 variants x 2 seeds, a few steps) through Dagster into fusion_comparison_report."""

import json
import math
from pathlib import Path

import dagster as dg
import pytest

from gt_pipeline.assets import data as data_assets
from gt_pipeline.assets import kernels as kernel_assets
from gt_pipeline.assets import sweep
from gt_pipeline.engine import compare, stats
from gt_pipeline.resources import DemoWikiTextSource, resources_from_env

RECIPE = {"model": "GF-MH", "size": "demo", "vocab_size": 512, "steps": 10, "batch_size": 2, "seq_len": 32,
          "lr": 1e-3, "seed": 0, "device": "cpu", "eval_every": 5}


def run(model, seed, loss, **recipe):
    cfg = {**RECIPE, "model": model, "seed": seed, **recipe}
    return compare.Run(f"r/{model}-{seed}-{recipe}", model, seed, cfg, "data1", loss, 1000, 10.0)


def test_match_runs_excludes_and_names_a_run_with_another_recipe_or_data():
    runs = [run("GF-MH", 0, 5.0), run("GF-MH", 1, 5.1), run("GPT", 0, 5.3), run("GPT", 1, 5.5),
            run("GPT", 2, 4.0, steps=20), run("GF-MH", 2, 4.0, device="cuda", eval_every=3)]
    other_data = run("GPT", 3, 1.0)
    other_data.data = "data2"
    matched, excluded, ref = compare.match_runs(runs + [other_data])
    assert {(r.model, r.seed) for r in matched} == {("GF-MH", 0), ("GF-MH", 1), ("GPT", 0), ("GPT", 1), ("GF-MH", 2)}
    reasons = {(e["model"], e["seed"]): e["reason"] for e in excluded}
    assert set(reasons) == {("GPT", 2), ("GPT", 3)}
    assert "steps=20" in reasons[("GPT", 2)] and "compared runs: 10" in reasons[("GPT", 2)]
    assert "data='data2'" in reasons[("GPT", 3)]
    assert ref["steps"] == 10 and "seed" not in ref and "device" not in ref


def test_match_runs_treats_model_changes_world_size_and_scoring_as_recipe_but_not_kernel_choices():
    base = [run("GF-MH", 0, 5.0, world_size=1, eval_windows=64), run("GPT", 0, 5.3, world_size=1, eval_windows=64),
            run("GPT", 1, 5.2, world_size=1, eval_windows=64)]
    kernel_choice = run("GF-MH", 1, 5.1, world_size=1, eval_windows=64,
                        model_overrides={"mamba_backend": "wkv6", "wkv6_impl": "chunked"})
    dropped = run("GF-MH", 2, 4.9, world_size=1, eval_windows=64, model_overrides={"rwkv_drop_prob": 0.1})
    residual = run("GF-MH", 3, 4.9, world_size=1, eval_windows=64, model_overrides={"mamba_residual": True})
    four_ranks = run("GPT", 2, 5.0, world_size=4, eval_windows=64)
    other_windows = run("GPT", 3, 5.0, world_size=1, eval_windows=16)
    matched, excluded, _ = compare.match_runs(base + [kernel_choice, dropped, residual, four_ranks, other_windows])
    assert {(r.model, r.seed) for r in matched} == {("GF-MH", 0), ("GPT", 0), ("GPT", 1), ("GF-MH", 1)}
    reasons = {(e["model"], e["seed"]): e["reason"] for e in excluded}
    assert "model_overrides.rwkv_drop_prob=0.1" in reasons[("GF-MH", 2)]
    assert "model_overrides.mamba_residual=True" in reasons[("GF-MH", 3)]
    assert "world_size=4 (compared runs: 1)" in reasons[("GPT", 2)]
    assert "eval_windows=16 (compared runs: 64)" in reasons[("GPT", 3)]


def test_compare_reports_t_cis_over_seeds_and_paired_differences():
    runs = [run("GF-MH", 0, 5.0), run("GF-MH", 1, 5.2), run("GF-MH", 2, 5.1),
            run("GPT", 0, 5.3), run("GPT", 1, 5.6), run("GPT", 2, 5.35), run("HY", 0, 5.0)]
    res = compare.compare(runs)
    by = {r["model"]: r for r in res["variants"]}
    half = stats.t_quantile(0.975, 2) * 0.1 / math.sqrt(3)  # GF-MH: mean 5.1, s = 0.1
    assert by["GF-MH"]["val_loss"] == pytest.approx(5.1) and by["GF-MH"]["val_loss_hi"] == pytest.approx(5.1 + half)
    assert by["GF-MH"]["ppl"] == pytest.approx(math.exp(5.1)) and by["GF-MH"]["ppl_lo"] == pytest.approx(math.exp(5.1 - half))
    assert math.isnan(by["HY"]["val_loss_lo"])  # one seed: no interval
    d = {(r["model"], r["vs"]): r for r in res["differences"]}
    gpt = d[("GPT", "GF-MH")]  # diffs .3 .4 .25: mean .31667, s = .07638
    assert gpt["diff"] == pytest.approx(0.316667, abs=1e-5) and gpt["seeds_paired"] == 3
    assert gpt["diff_lo"] == pytest.approx(0.316667 - stats.t_quantile(0.975, 2) * 0.076376 / math.sqrt(3), abs=1e-4)
    assert gpt["verdict"].startswith("higher")
    assert d[("HY", "GF-MH")]["verdict"].startswith("unknown") and d[("GF-MH", "GPT")]["diff"] < 0
    for r, dz in zip(runs[:3], (0.2, 0.25, 0.15)):  # mean .2, s = .05
        r.ablation = {"zero_mamba": dz}
    (ab,) = compare.compare(runs)["ablation"]
    assert (ab["model"], ab["ablation"], ab["branch"], ab["seeds"]) == ("GF-MH", "zero", "mamba", 3)
    assert ab["delta_loss"] == pytest.approx(0.2) and ab["delta_lo"] == pytest.approx(0.2 - half / 2)
    assert ab["verdict"].startswith("loss higher without it")
    lone = compare.compare(runs + [run("WS", 7, 5.0)])  # seed 7: no reference model trained it
    md = sweep.comparison_markdown(lone, [], {}, b"")
    assert "Not compared (no seed trained by both): WS vs GF-MH, WS vs GPT." in md
    assert "WS vs" not in md.split("Inside the noise")[1].split("\n")[0]


TINY = {"steps": 6, "batch_size": 2, "seq_len": 32, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 6,
        "device": "cpu", "eval_windows": 8}
ASSETS = [data_assets.wikitext103_raw, data_assets.bpe_tokenizer, data_assets.token_shards, kernel_assets.wkv6_kernel,
          sweep.sweep_run, sweep.fusion_comparison_report]


def test_tiny_demo_sweep_reports_every_variant_over_seeds_and_names_a_mismatched_run(tmp_path, one_thread):
    res_ = {**resources_from_env({"GT_PROFILE": "demo", "GT_HOME": str(tmp_path)}), "source": DemoWikiTextSource(size_mb=0.3)}
    inst = dg.DagsterInstance.ephemeral()
    base = {"ops": {"bpe_tokenizer": {"config": {"vocab_size": 512}}}}
    r = dg.materialize(ASSETS, selection=dg.AssetSelection.assets("token_shards", "wkv6_kernel").upstream(),
                       resources=res_, run_config=base, instance=inst)
    assert r.success
    sweep_cfg = lambda **kw: {"ops": {"sweep_run": {"config": {**TINY, **kw}}}}  # noqa: E731
    for variant in ("gf_mh", "gpt"):
        for seed in ("0", "1"):
            r = dg.materialize(ASSETS, selection=["sweep_run"], partition_key=f"{seed}|{variant}", resources=res_,
                               run_config=sweep_cfg(), instance=inst)
            assert r.success
            (mat,) = r.asset_materializations_for_node("sweep_run")
            assert mat.metadata["seed"].value == int(seed)
    r = dg.materialize(ASSETS, selection=["sweep_run"], partition_key="2|gpt", resources=res_,
                       run_config=sweep_cfg(steps=7), instance=inst)
    assert r.success
    r = dg.materialize(ASSETS, selection=["fusion_comparison_report"], resources=res_, instance=inst)
    assert r.success
    (mat,) = r.asset_materializations_for_node("fusion_comparison_report")
    m = {k: v.value for k, v in mat.metadata.items()}
    assert m["runs_compared"] == 4 and m["runs_excluded"] == 1
    report = json.loads((Path(m["path"]) / "report.json").read_text())
    (ex,) = report["excluded"]
    assert ex["model"] == "GPT" and ex["seed"] == 2 and "steps=7" in ex["reason"]
    rows = {v["model"]: v for v in report["result"]["variants"]}
    assert set(rows) == {"GF-MH", "GPT"} and all(v["seeds"] == 2 for v in rows.values())
    assert all(v["val_loss_lo"] < v["val_loss"] < v["val_loss_hi"] for v in rows.values())
    abl = {(a["ablation"], a["branch"]): a for a in report["result"]["ablation"] if a["model"] == "GF-MH"}
    assert set(abl) == {("zero", "rwkv"), ("zero", "mamba"), ("mean", "rwkv"), ("mean", "mamba")}
    assert all(a["seeds"] == 2 for a in abl.values())
    assert not any(a["model"] == "GPT" for a in report["result"]["ablation"])  # no branches to ablate
    diffs = {(d["model"], d["vs"]) for d in report["result"]["differences"]}
    assert diffs == {("GPT", "GF-MH"), ("GF-MH", "GPT")}
    md = m["preview"]
    assert "data:image/png;base64," in md and "Excluded runs" in md and ex["run"] in md
    assert "inside the noise" in md.lower() or "outside the noise" in md.lower()
    assert "a cost of this sweep rather than the model's own speed" in md   # what steady_tokens_per_s is
    # the canonical per-seed numbers are the runs' own held-out evaluations
    losses = sorted(a.metadata["eval_val_loss"] for a in sweep.published_runs(sweep.ArtifactStore(tmp_path))
                    if a.inputs["config"]["model"] == "GF-MH")
    assert rows["GF-MH"]["val_loss"] == pytest.approx(sum(losses) / 2)


def test_sweep_is_registered_partitioned_by_seed_and_variant_in_its_pool():
    from gt_pipeline.assets.training import VARIANTS
    from gt_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey("sweep_run"))
    assert node.group_name == "sweep" and node.pools == {"sweep_gpu"}
    keys = node.partitions_def.get_partition_keys()
    assert len(keys) == len(VARIANTS) * len(sweep.SEEDS) and "0|gf_mh" in keys and "4|mamba2" in keys
    assert graph.get(dg.AssetKey("fusion_comparison_report")).group_name == "reports"
    assert {k.to_user_string() for k in defs.resolve_job_def("sweep").asset_layer.selected_asset_keys} == {"sweep_run"}


# ------------------------------------------------------------------------------- `make sweep SWEEP_MPS=1`
# The Makefile's MPS wiring, with stand-ins for the two programs it drives (this machine has neither a GPU
# nor the driver's MPS control): each appends what it was called with, and under which MPS pipe, to a log.
MPS_CONTROL = """#!/bin/sh
if [ "$1" = -d ]; then echo "mps -d $CUDA_MPS_PIPE_DIRECTORY" >> "$LOG"; else echo "mps $(cat)" >> "$LOG"; fi
"""
DAGSTER = """#!/bin/sh
echo "dagster pipe=${CUDA_MPS_PIPE_DIRECTORY:-none} $*" >> "$LOG"
case "$*" in *fusion_comparison_report*)
  [ -n "$FAIL_REPORT" ] && exit 3
  mkdir -p "$GT_HOME/fusion_comparison_report" && echo '{"fingerprint": "f"}' > "$GT_HOME/fusion_comparison_report/LATEST.json";;
esac
"""
REPO = Path(__file__).resolve().parents[1]


def make_sweep(tmp_path, *args, mps_on_path=True, **env):
    import os
    import subprocess

    venv, tools = tmp_path / "venv", tmp_path / "tools"
    (venv / "bin").mkdir(parents=True)
    tools.mkdir()
    (venv / "bin" / "dagster").write_text(DAGSTER)
    (venv / ".installed").touch()  # newer than pyproject.toml: make installs nothing
    if mps_on_path:
        (tools / "nvidia-cuda-mps-control").write_text(MPS_CONTROL)
    for f in [*tools.iterdir(), venv / "bin" / "dagster"]:
        f.chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "LOG": str(log), "GT_HOME": str(tmp_path / "gt"),
           **env}
    p = subprocess.run(["make", "-s", "-C", str(REPO), "sweep", f"VENV={venv}", "SWEEP_VARIANTS=gf_mh gpt",
                        "SWEEP_SEEDS=0", "SWEEP_K=2", *args], env=env, capture_output=True, text=True, timeout=120)
    return p, log.read_text().splitlines() if log.exists() else []


def test_make_sweep_mps_runs_every_training_under_one_daemon_and_stops_it(tmp_path):
    p, log = make_sweep(tmp_path, "SWEEP_MPS=1")
    assert p.returncode == 0, p.stderr
    assert log[0].startswith("mps -d /tmp/gt_mps_pipe.") and log[-1] == "mps quit"
    pipe = log[0].split()[-1]
    calls = log[1:-1]
    assert len(calls) == 4 and all(c.startswith(f"dagster pipe={pipe} ") for c in calls)  # data, 2 partitions, report
    assert sorted(c.split("--partition ")[1].split()[0] for c in calls if "--partition" in c) == ["0|gf_mh", "0|gpt"]
    assert "MPS control daemon up" in p.stdout


def test_make_sweep_mps_stops_the_daemon_when_the_sweep_fails(tmp_path):
    p, log = make_sweep(tmp_path, "SWEEP_MPS=1", FAIL_REPORT="1")
    assert p.returncode != 0
    assert log[0].startswith("mps -d ") and log[-1] == "mps quit"


def test_make_sweep_without_mps_starts_no_daemon(tmp_path):
    p, log = make_sweep(tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(log) == 4 and all(c.startswith("dagster pipe=none ") for c in log)


@pytest.mark.parametrize("arg, on_path, message", [
    ("SWEEP_MPS=1", False, "nvidia-cuda-mps-control is not on PATH"),
    ("SWEEP_MPS=yes", True, "SWEEP_MPS must be 0 or 1, got 'yes'"),
])
def test_make_sweep_mps_bad_setting_stops_before_anything_runs(tmp_path, arg, on_path, message):
    p, log = make_sweep(tmp_path, arg, mps_on_path=on_path)
    assert p.returncode != 0 and message in p.stderr
    assert log == []
