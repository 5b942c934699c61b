"""trained_* assets, gate checks, reports and the re-validation schedule on the demo profile."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
from safetensors.torch import load_file

from gt_pipeline import checks, gates
from gt_pipeline.assets import data as data_assets
from gt_pipeline.assets import kernels as kernel_assets
from gt_pipeline.assets import reports as report_assets
from gt_pipeline.assets.training import trained_assets
from gt_pipeline.gates import GateResult, Verdict
from gt_pipeline.resources import DemoWikiTextSource, resources_from_env
from gt_pipeline.schedules import make_revalidation_schedule

REPO = Path(__file__).resolve().parents[1]
ALL = [data_assets.wikitext103_raw, data_assets.bpe_tokenizer, data_assets.token_shards, kernel_assets.wkv6_kernel,
       *trained_assets, report_assets.gate_report, report_assets.ablation_report, report_assets.long_context_report,
       *checks.gate_checks, *checks.report_checks]
TRAIN = {"steps": 24, "eval_every": 8, "checkpoint_every": 8, "batch_size": 4}
TRAIN_CONFIG = {"ops": {"bpe_tokenizer": {"config": {"vocab_size": 1024}}, "trained_gf_mh": {"config": TRAIN}}}
RUN_CONFIG = {"ops": {**TRAIN_CONFIG["ops"], "gate_report": {"config": {"overfit_steps": 40}}}}


def resources(home: Path):
    return {**resources_from_env({"GT_PROFILE": "demo", "GT_HOME": str(home)}), "source": DemoWikiTextSource(size_mb=0.4)}


def materialize(home: Path, targets: list[str], run_config=RUN_CONFIG, **kw):
    sel = dg.AssetSelection.assets(*targets).upstream()
    return dg.materialize(ALL, selection=sel, resources=resources(home), run_config=run_config,
                          instance=dg.DagsterInstance.ephemeral(), raise_on_error=False, **kw)


def meta(res, asset):
    (mat,) = res.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    home = tmp_path_factory.mktemp("gt_home")
    res = materialize(home, ["gate_report", "ablation_report", "long_context_report"])
    assert res.success, [e.event_specific_data.error.message for e in res.get_step_failure_events()]
    return home, res


def test_main_chain_trains_checks_and_reports(chain):
    home, res = chain
    m = meta(res, "trained_gf_mh")
    assert m["cache_hit"] is False and m["steps"] == 24
    assert m["final_val_loss"] < 6.9  # below ln(1024): it learned something
    assert m["n_params"] > 0 and m["tokens_per_s"] > 0 and "loss curve" in m["preview"]
    art = Path(m["path"])
    assert {"model.safetensors", "config.json", "train_log.csv", "manifest.json"} <= {p.name for p in art.iterdir()}
    evals = {e.check_name: e for e in res.get_asset_check_evaluations() if e.asset_key.to_user_string() == "trained_gf_mh"}
    assert set(evals) == {"g1_forward", "g2_init_entropy", "g3_training_health", "g3_5_state_health", "g4_component_balance"}
    assert evals["g1_forward"].passed and evals["g2_init_entropy"].passed
    for e in evals.values():
        md = {k: v.value for k, v in e.metadata.items()}
        assert "verdict" in md and "value" in md
    gate = json.loads((home / "gate_report" / meta(res, "gate_report")["fingerprint"] / "report.json").read_text())
    names = {r["check"] for r in gate["rows"]}
    assert {"g1_forward", "S0", "S4", "grad_overfit_10", "grad_beats_uniform", "grad_checkpoint_roundtrip"} <= names
    assert gate["provenance"]["checkpoint_fingerprint"] == m["fingerprint"]
    assert {r["check"]: r["verdict"] for r in gate["rows"]}["g2_init_entropy"] == "pass"
    abl = meta(res, "ablation_report")
    assert abl["baseline_loss_lo"] < abl["baseline_loss"] < abl["baseline_loss_hi"] < 6.9
    assert abl["eval_windows"] == 16  # the demo profile's spread windows
    assert abs(abl["rwkv_share_zero"] + abl["mamba_share_zero"] - 1) < 1e-9  # trained: removing a branch costs
    ab = json.loads((home / "ablation_report" / abl["fingerprint"] / "report.json").read_text())
    kinds = {(r["kind"], r["layers"]) for r in ab["runs"]}
    assert {("zero", "all"), ("mean", "all"), ("zero", "0"), ("mean", "1"), ("gate", "all")} <= kinds
    assert [g["layer"] for g in ab["gates"]] == [0, 1]
    lc = meta(res, "long_context_report")
    assert lc["max_context"] >= 512 and lc["degradation_ppl_512_over_64"] > 0
    assert lc["niah_chance"] == 0.1 and 0 <= lc["niah_control_accuracy"] <= 1
    rep = json.loads((home / "long_context_report" / lc["fingerprint"] / "report.json").read_text())
    assert {r["trials"] for r in rep["niah"]} == {20}
    assert sum(r["depth"] == "no needle" for r in rep["niah"]) == len({r["haystack_tokens"] for r in rep["niah"]})
    assert all(b["loss_lo"] <= b["loss"] <= b["loss_hi"] for b in rep["curve"]["buckets"])


def test_cached_rematerialization_does_not_train_again(chain):
    home, first = chain
    t0 = time.perf_counter()
    res = materialize(home, ["trained_gf_mh"], run_config=TRAIN_CONFIG)
    assert res.success
    m = meta(res, "trained_gf_mh")
    assert m["cache_hit"] is True and m["fingerprint"] == meta(first, "trained_gf_mh")["fingerprint"]
    assert not list((home / "trained_gf_mh").glob("*.work"))
    assert time.perf_counter() - t0 < 60


def test_blocking_g3_failure_stops_the_reports(chain, monkeypatch):
    home, _ = chain
    monkeypatch.setattr(checks.gates, "g3_verdict", lambda *a: (Verdict.FAIL, {"loss_down": False}))
    res = materialize(home, ["gate_report"], run_config={"ops": {
        **TRAIN_CONFIG["ops"], "gate_report": {"config": {"force": True}},
        "trained_gf_mh_g3_training_health": {"config": {"force": True}}}})
    assert not res.success
    (g3,) = [e for e in res.get_asset_check_evaluations()
             if e.check_name == "g3_training_health" and e.asset_key.to_user_string() == "trained_gf_mh"]
    assert not g3.passed and g3.severity == dg.AssetCheckSeverity.ERROR
    assert not res.asset_materializations_for_node("gate_report")


@pytest.mark.parametrize("verdict, passed, severity", [
    (Verdict.PASS, True, None), (Verdict.WARN, False, dg.AssetCheckSeverity.WARN),
    (Verdict.FAIL, False, dg.AssetCheckSeverity.ERROR)])
def test_verdicts_map_to_check_results(verdict, passed, severity):
    r = checks.to_check_result(dg.AssetKey("trained_gf_mh"), GateResult("g4_component_balance", verdict, 0.2, {"x": 1}))
    assert r.passed is passed
    if severity is not None:
        assert r.severity == severity
    assert r.metadata["verdict"].value == verdict.value and r.metadata["value"].value == 0.2


def test_g4_is_not_applicable_for_single_mixer_baselines():
    spec_names = lambda v: {c.check_key.name for c in checks.gate_checks  # noqa: E731
                            if c.check_key.asset_key.to_user_string() == f"trained_{v}"}
    assert "g4_component_balance" in spec_names("gf_mh")
    assert "g4_component_balance" not in spec_names("gpt")
    assert "g1_forward" in spec_names("gpt")


def test_unknown_and_impossible_training_config_fail_before_compute(chain):
    home, _ = chain
    bad = {"ops": {**TRAIN_CONFIG["ops"], "trained_gf_mh": {"config": {**TRAIN, "batch_size": 0}}}}
    res = materialize(home, ["trained_gf_mh"], run_config=bad)
    assert not res.success
    err = res.get_step_failure_events()[0].event_specific_data.error
    text = "".join(e.message for e in (err, err.cause) if e is not None)
    assert "batch_size" in text
    huge = {"ops": {**TRAIN_CONFIG["ops"], "trained_gf_mh": {"config": {**TRAIN, "seq_len": 10**7}}}}
    res = materialize(home, ["trained_gf_mh"], run_config=huge)
    err = res.get_step_failure_events()[0].event_specific_data.error
    assert "seq_len" in "".join(e.message for e in (err, err.cause) if e is not None)
    with pytest.raises(dg.DagsterInvalidConfigError, match="stepz"):
        materialize(home, ["trained_gf_mh"], run_config={"ops": {"trained_gf_mh": {"config": {"stepz": 3}}}})


def test_revalidation_schedule_requests_checks_and_forced_reports(chain):
    home, _ = chain
    sched = make_revalidation_schedule("0 4 * * *")
    assert sched.cron_schedule == "0 4 * * *"
    ctx = dg.build_schedule_context(resources={"store": resources(home)["store"]})
    (req,) = sched.evaluate_tick(ctx).run_requests
    assert {k.to_user_string() for k in req.asset_selection} == {"gate_report", "ablation_report", "long_context_report"}
    assert {(k.asset_key.to_user_string(), k.name) for k in req.asset_check_keys} >= {("trained_gf_mh", "g1_forward"),
                                                                                      ("trained_gf_mh", "g4_component_balance")}
    assert all(req.run_config["ops"][r]["config"]["force"] is True for r in ("gate_report", "ablation_report"))


def test_revalidation_schedule_skips_without_a_checkpoint(tmp_path):
    sched = make_revalidation_schedule()
    ctx = dg.build_schedule_context(resources={"store": resources(tmp_path)["store"]})
    result = sched.evaluate_tick(ctx)
    assert not result.run_requests and "trained_gf_mh" in result.skip_message


def test_revalidation_rerun_recomputes_reports_without_training(chain):
    home, first = chain
    from gt_pipeline.schedules import REPORTS, revalidation_run_config

    rc = revalidation_run_config(["gf_mh"]).to_config_dict()
    rc["ops"]["gate_report"]["config"]["overfit_steps"] = 40
    sel = dg.AssetSelection.assets(*REPORTS) | dg.AssetSelection.checks_for_assets("trained_gf_mh")
    res = dg.materialize(ALL, selection=sel, resources=resources(home), run_config=rc,
                         instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert res.success
    assert not res.asset_materializations_for_node("trained_gf_mh")
    assert {e.check_name for e in res.get_asset_check_evaluations()} >= {"g1_forward", "g3_training_health"}
    for report in REPORTS:
        assert meta(res, report)["cache_hit"] is False
    assert meta(res, "gate_report")["checkpoint_fingerprint"] == meta(first, "trained_gf_mh")["fingerprint"]


@pytest.mark.slow
def test_cli_interrupted_training_resumes_and_equals_an_uninterrupted_run(tmp_path):
    """Kill `dagster asset materialize` after the first checkpoint, run it again: it resumes, and the
    weights equal those of an uninterrupted run bit for bit (CPU)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("ops:\n  bpe_tokenizer: {config: {vocab_size: 1024}}\n"
                   "  trained_gf_mh: {config: {steps: 24, eval_every: 8, checkpoint_every: 6, batch_size: 4}}\n")
    dagster = str(Path(sys.executable).with_name("dagster"))

    def cli(home, select):
        env = {**os.environ, "GT_PROFILE": "demo", "GT_HOME": str(home), "PYTHONPATH": str(REPO),
               "DAGSTER_MODULE_NAME": "gt_pipeline.definitions"}
        env.pop("DAGSTER_HOME", None)
        return subprocess.Popen([dagster, "asset", "materialize", "--select", select, "-c", str(cfg)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    home = tmp_path / "gt"
    p = cli(home, "+token_shards,wkv6_kernel")
    assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
    p = cli(home, "trained_gf_mh")
    deadline = time.time() + 600
    while not list(home.glob("trained_gf_mh/*.work/checkpoints/step_*/state.json")):
        assert p.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not list(home.glob("trained_gf_mh/*/manifest.json"))  # nothing published by the killed run
    resumed = cli(home, "trained_gf_mh")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    # said when it happens: before the resumed run logs its last step
    assert 0 < out.index("resumed from the checkpoint at step") < out.index("step 24/24")
    # the uninterrupted run in the same store, on the same data: the resumed artifact and its checkpoints moved
    # out of the store first, so this one trains from step 0
    shutil.move(home / "trained_gf_mh", tmp_path / "resumed")
    uninterrupted = cli(home, "trained_gf_mh")
    out2 = uninterrupted.communicate(timeout=600)[0]
    assert uninterrupted.returncode == 0, out2[-3000:]
    assert "resumed from the checkpoint" not in out2
    (a,) = home.glob("trained_gf_mh/*/model.safetensors")
    (b,) = (tmp_path / "resumed").glob("*/model.safetensors")
    assert a.parent.name == b.parent.name  # same fingerprint
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    losses = lambda p: [row.split(",")[1] for row in (p.parent / "train_log.csv").read_text().splitlines()[1:]]  # noqa: E731
    assert losses(a) == losses(b) and len(losses(a)) == 24


def test_verdict_changes_name_each_changed_check(tmp_path):
    from gt_pipeline.assets.reports import previous_verdicts, verdict_changes
    from gt_pipeline.store import ArtifactStore, write_json_atomic

    store = ArtifactStore(tmp_path)
    assert previous_verdicts(store, "gate_report") == {}
    rows = [{"check": "g1_forward", "verdict": "pass"}, {"check": "g4_component_balance", "verdict": "warn"}]
    store.build("gate_report", "fp1", lambda d: write_json_atomic(d / "report.json", {"rows": rows}) or {})
    before = previous_verdicts(store, "gate_report")
    now = [{"check": "g1_forward", "verdict": "pass"}, {"check": "g4_component_balance", "verdict": "fail"},
           {"check": "S4", "verdict": "fail"}]
    assert verdict_changes(before, now) == ["g4_component_balance: warn -> fail"]


def test_training_config_maps_compile_mode_and_mamba_backend_and_keeps_defaults_unchanged():
    """The asset's compile / compile_mode / mamba_backend / mamba_conv / wkv6_impl reach TrainConfig; left unset,
    compile is "auto" (the device's default) and the model config gets no overrides (the layers' own "auto")."""
    from gt_pipeline.assets.training import TrainingConfig
    from gt_pipeline.engine.train import resolve_compile
    from gt_pipeline.profiles import PROFILES

    demo = PROFILES["demo"].train
    base = TrainingConfig().resolve("gf_mh", demo, 512)
    assert base.compile == "auto" and base.model_overrides == {}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu) is False and resolve_compile("auto", cuda) == "reduce-overhead"
    assert resolve_compile("auto", cuda, grad_accum=2) is True and resolve_compile("auto", cuda, world_size=2) is True
    assert TrainingConfig(compile=False).resolve("gf_mh", demo, 512).compile is False
    assert TrainingConfig(compile=True).resolve("gf_mh", demo, 512).compile is True
    assert TrainingConfig(compile_mode="default").resolve("gf_mh", demo, 512).compile is True
    fast = TrainingConfig(compile=True, compile_mode="reduce-overhead", mamba_backend="wkv6").resolve("gf_mh", demo, 512)
    assert fast.compile == "reduce-overhead" and fast.model_overrides == {"mamba_backend": "wkv6"}
    with pytest.raises(ValueError, match="compile"):
        TrainingConfig(compile=True, compile_mode="fastest").resolve("gf_mh", demo, 512)
    with pytest.raises(ValueError, match="mamba_backend"):
        TrainingConfig(mamba_backend="cuda").resolve("gf_mh", demo, 512)
    with pytest.raises(ValueError, match="mamba_conv"):
        TrainingConfig(mamba_conv="cuda").resolve("gf_mh", demo, 512)
    fastest = TrainingConfig(mamba_backend="wkv6", wkv6_impl="chunked").resolve("gf_mh", demo, 512)
    assert fastest.model_overrides == {"mamba_backend": "wkv6", "wkv6_impl": "chunked"}
    assert TrainingConfig(wkv6_impl="sequential").resolve("gf_mh", demo, 512).model_overrides == {"wkv6_impl": "sequential"}
    with pytest.raises(ValueError, match="wkv6_impl"):
        TrainingConfig(wkv6_impl="fastest").resolve("gf_mh", demo, 512)


def test_cached_chain_run_trains_compiles_and_measures_nothing(chain):
    """Issue 20: the same chain again, read back from the run's own events: every asset a cache hit, the
    wkv6 extension neither compiled nor loaded, every gate check re-emitted from the stored results."""
    from gt_pipeline.runinfo import summarize_run

    home, first = chain
    instance = dg.DagsterInstance.ephemeral()
    sel = dg.AssetSelection.assets("trained_gf_mh", "gate_report").upstream()
    res = dg.materialize(ALL, selection=sel, resources=resources(home), run_config=RUN_CONFIG, instance=instance,
                         raise_on_error=False)
    assert res.success
    s = summarize_run(instance, res.run_id)
    assert set(s.cache_hit) >= {"wikitext103_raw", "bpe_tokenizer", "token_shards", "wkv6_kernel", "trained_gf_mh",
                                "gate_report"}
    assert not s.built, s.built  # no training, no report recomputed
    assert s.extension_loaded == {"wkv6_kernel": False}  # no compile, no load
    assert len(s.check_reused) == 5 and not s.measured, s.check_reused  # the five gates, re-emitted
    assert "gate_report:gate_report_no_failures" in s.check_fingerprint  # reads the stored report.json
    assert s.everything_cached
    assert s.fingerprints["trained_gf_mh"] == meta(first, "trained_gf_mh")["fingerprint"]
    assert set(s.check_fingerprint.values()) >= {s.fingerprints["trained_gf_mh"]}


def test_checks_run_alone_against_the_attached_materialization(chain):
    """Issue 15 item 5: the gate checks execute without materializing anything and evaluate the checkpoint
    of the materialization they are attached to (the instance's record), not LATEST."""
    from gt_pipeline.store import ArtifactStore

    home, first = chain
    fp = meta(first, "trained_gf_mh")["fingerprint"]
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(dg.AssetMaterialization("trained_gf_mh", tags={"dagster/data_version": fp}))
    latest = home / "trained_gf_mh" / "LATEST.json"
    saved = latest.read_text()
    latest.write_text(json.dumps({"asset": "trained_gf_mh", "fingerprint": "0000000000000000"}))  # a decoy
    try:
        res = dg.materialize(ALL, selection=dg.AssetSelection.checks_for_assets("trained_gf_mh"),
                             resources=resources(home), instance=instance, raise_on_error=False)
    finally:
        latest.write_text(saved)
    assert res.success and not res.get_asset_materialization_events()
    evals = res.get_asset_check_evaluations()
    assert {e.check_name for e in evals} == set(checks.check_names("gf_mh"))
    assert {e.metadata["fingerprint"].value for e in evals} == {fp}
    assert ArtifactStore(home).get("trained_gf_mh", fp) is not None


def test_gate_report_failures_show_as_a_failing_check(tmp_path):
    from gt_pipeline.store import ArtifactStore, write_json_atomic

    rows = [{"check": "g1_forward", "verdict": "pass"}, {"check": "S2", "verdict": "fail"},
            {"check": "S4", "verdict": "fail"}, {"check": "g4_component_balance", "verdict": "warn"}]
    art = ArtifactStore(tmp_path).build("gate_report", "fp", lambda d: write_json_atomic(d / "report.json",
                                                                                      {"rows": rows}) or {}).artifact
    r = checks.gate_report_no_failures(art)
    assert r.passed is False and r.severity == dg.AssetCheckSeverity.ERROR
    assert r.metadata["failing"].value == "S2, S4" and r.metadata["checks_fail"].value == 2
    rows = [r for r in rows if r["verdict"] != "fail"]
    art = ArtifactStore(tmp_path).build("gate_report", "fp2", lambda d: write_json_atomic(d / "report.json",
                                                                                       {"rows": rows}) or {}).artifact
    assert checks.gate_report_no_failures(art).passed


@pytest.mark.slow
def test_concurrent_cli_materializations_are_each_bound_to_their_own_checkpoint(chain, tmp_path):
    """Issue 15 item 6: two `dagster asset materialize` processes on one store and one Dagster instance at
    once, with different training settings (seed). No torn directory; every check and gate_report of a
    run evaluates that run's own checkpoint, although both materialize trained_gf_mh at the same time.
    (Same settings at once: one builds, the other waits on the lock and hits; test_store covers it.)"""
    from gt_pipeline.runinfo import summarize_run
    from gt_pipeline.store import verify_dir

    home, _ = chain
    dhome = tmp_path / "dagster_home"
    dhome.mkdir()
    instance = dg.DagsterInstance.local_temp(str(dhome))
    # record the data chain's materializations (all cache hits) so the CLI runs resolve them by lineage
    pre = dg.materialize(ALL, selection=dg.AssetSelection.assets("token_shards", "wkv6_kernel").upstream(),
                         resources=resources(home), run_config={"ops": {"bpe_tokenizer": TRAIN_CONFIG["ops"]["bpe_tokenizer"]}},
                         instance=instance)
    assert pre.success
    dagster = str(Path(sys.executable).with_name("dagster"))
    procs = []
    for i, seed in enumerate((11, 12)):
        cfg = tmp_path / f"cfg{i}.yaml"
        small = {**TRAIN, "steps": 8, "eval_every": 4, "checkpoint_every": 4, "batch_size": 2, "seed": seed}
        cfg.write_text(json.dumps({"ops": {"trained_gf_mh": {"config": small},
                                           "gate_report": {"config": {"overfit_steps": 10}}}}))
        env = {**os.environ, "GT_PROFILE": "demo", "GT_HOME": str(home), "DAGSTER_HOME": str(dhome),
               "PYTHONPATH": str(REPO), "DAGSTER_MODULE_NAME": "gt_pipeline.definitions"}
        procs.append(subprocess.Popen([dagster, "asset", "materialize", "--select", "trained_gf_mh,gate_report",
                                       "-c", str(cfg)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    runs = [r for r in instance.get_runs() if "trained_gf_mh" in r.run_config.get("ops", {})]
    assert len(runs) == 2
    by_seed: dict[int, list] = {}
    for run in runs:
        s = summarize_run(instance, run.run_id)
        fp = s.fingerprints["trained_gf_mh"]
        by_seed.setdefault(run.run_config["ops"]["trained_gf_mh"]["config"]["seed"], []).append((s, fp))
        assert len(s.check_fingerprint) == 6
        gate_checks = {k: v for k, v in s.check_fingerprint.items() if k.startswith("trained_gf_mh:")}
        assert set(gate_checks.values()) == {fp}, (fp, gate_checks)
        report = json.loads((home / "gate_report" / s.fingerprints["gate_report"] / "report.json").read_text())
        assert report["provenance"]["checkpoint_fingerprint"] == fp
        assert s.check_fingerprint["gate_report:gate_report_no_failures"] == s.fingerprints["gate_report"]
        verify_dir(home / "trained_gf_mh" / fp)
    ((a, fa),), ((b, fb),) = by_seed[11], by_seed[12]
    assert fa != fb and a.fingerprints["gate_report"] != b.fingerprints["gate_report"]
    assert not a.cache_hit["trained_gf_mh"] and not b.cache_hit["trained_gf_mh"]  # both trained, at once
    assert not list((home / "trained_gf_mh").glob(".tmp-*"))


def test_training_config_maps_the_issue_17_options_and_keeps_default_fingerprints():
    """mamba_residual / rwkv_drop_prob reach the model overrides, lambda_div / lambda_arb / stateful the TrainConfig;
    left off they are absent from the resolved record, so the fingerprints of earlier runs stay valid."""
    import dataclasses

    from gt_pipeline.assets.training import VARIANTS, TrainingConfig
    from gt_pipeline.engine.objectives import without_default_objectives
    from gt_pipeline.profiles import PROFILES

    demo = PROFILES["demo"].train
    base = TrainingConfig().resolve("gru", demo, 512)
    assert base.model == "GRU" and base.model_overrides == {}
    assert set(without_default_objectives(dataclasses.asdict(base))) == {f.name for f in dataclasses.fields(base)} \
        - {"lambda_div", "lambda_arb", "stateful"}
    on = TrainingConfig(mamba_residual=True, rwkv_drop_prob=0.1, lambda_div=0.1, lambda_arb=0.2, stateful=True)
    cfg = on.resolve("hgf_mh", demo, 512)
    assert cfg.model_overrides == {"mamba_residual": True, "rwkv_drop_prob": 0.1}
    assert (cfg.lambda_div, cfg.lambda_arb, cfg.stateful) == (0.1, 0.2, True)
    assert without_default_objectives(dataclasses.asdict(cfg))["lambda_arb"] == 0.2
    with pytest.raises(ValueError, match="lambda_arb"):
        TrainingConfig(lambda_arb=0.1).resolve("hy", demo, 512)
    assert {"gf_xm", "gf_xr", "hgf", "hgf_mh", "hgf_rh", "gru", "mingru", "linrec"} <= set(VARIANTS)
