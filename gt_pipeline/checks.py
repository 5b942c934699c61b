"""Gate checks on every `trained_*` asset: g1_forward, g2_init_entropy, g3_training_health,
g3_5_state_health, g4_component_balance; and `gate_report_no_failures` on gate_report.

Every gate is its own `@asset_check`, so it runs with the asset or alone (UI: the check's "Execute";
CLI: `dagster job execute -j gate_checks_only`) against the stored checkpoint of the materialization
it is attached to (resolved by the IO manager through the recorded data version),
never retraining. The five gates are measured together once per checkpoint and check code: the
results are stored in the artifact store (`gate_checks/<fingerprint>`) keyed by the checkpoint's
fingerprint and the checks' derived code version, so the other four checks of a run, and later runs,
re-emit them (metadata `reused: true`). `force: true` re-measures (once per run; the re-validation
schedule sets it). Thresholds come from `gt_pipeline.gates` only. G1 and G3 are blocking: an ERROR
there stops every downstream report. Verdicts map to Dagster as pass -> passed, warn -> failed with
WARN severity, fail -> failed with ERROR severity; G4 exists only on hybrids.
"""

import json
import math
from typing import Any, Callable

import dagster as dg
from pydantic import Field

from gt_pipeline import gates
from gt_pipeline.assets.training import HYBRIDS, VARIANTS, load_trained, validation_batch
from gt_pipeline.engine import metrics
from gt_pipeline.gates import Band, GateResult, Verdict
from gt_pipeline.resources import StoreResource
from gt_pipeline.store import Artifact, ArtifactStore, fingerprint, write_json_atomic
from gt_pipeline.versions import code_version

CHECKS_VERSION = code_version("gate_checks")


CHECKS = {
    "g1_forward": ("G1: a forward pass on a real validation batch gives finite logits of the right shape", True),
    "g2_init_entropy": ("G2: |initial cross-entropy - ln(vocab)| / ln(vocab) of the initialised model on real tokens", False),
    "g3_training_health": ("G3: loss down over training and median pre-clip grad norm of the last 10% in band", True),
    "g3_5_state_health": ("G3.5: state cosine t vs t+64, effective rank of states, activation saturation", False),
    "g4_component_balance": ("G4: RWKV/Mamba gradient-norm ratio, median over the last 10% of steps", False),
}


def banded(gate: str, band: Band, value: float, **detail: Any) -> GateResult:
    return GateResult(gate, band.classify(value), value, {**{f"band_{k}": v for k, v in band.describe().items()}, **detail})


def evaluate_gates(store: ArtifactStore, art: Artifact, variant: str, device: str = "cpu") -> list[GateResult]:
    """Every gate's raw value and verdict for one trained artifact (used by the checks and gate_report)."""
    m = art.metadata
    model, cfg = load_trained(art, device)
    shards = store.get("token_shards", art.inputs["token_shards"])
    if shards is None:
        raise FileNotFoundError(f"token_shards {art.inputs['token_shards']} used to train {art.asset} is gone; re-materialize it")
    x, y = validation_batch(shards, min(8, cfg["batch_size"]), cfg["seq_len"])
    g1 = metrics.g1_forward(model, x.to(device), cfg["vocab_size"])
    results = [GateResult("g1_forward", Verdict.PASS if g1["passed"] else Verdict.FAIL, float(g1["passed"]), g1)]
    results.append(g2(initial_model(cfg).to(device), x.to(device), y.to(device), cfg["vocab_size"]))
    g3, g3_detail = gates.g3_verdict(m["loss_first_10pct"], m["loss_last_10pct"], m["grad_norm_median_last_10pct"])
    results.append(GateResult("g3_training_health", g3, m["grad_norm_median_last_10pct"], g3_detail))
    results.append(g35(model, shards, device))
    if variant in HYBRIDS:
        results.append(banded("g4_component_balance", gates.G4_GRAD_RATIO, m["grad_ratio_median_last_10pct"]))
    else:
        results.append(GateResult("g4_component_balance", Verdict.NOT_APPLICABLE, None,
                                  {"reason": f"{VARIANTS[variant]} has no RWKV/Mamba branch pair"}))
    return results


def initial_model(cfg: dict[str, Any]):
    """The model exactly as training initialised it: the engine seeds torch with cfg["seed"] and builds the
    model on the CPU before anything else draws from the generator (engine/train.py); the global RNG
    state is restored afterwards."""
    import models
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        return models.get_model(cfg["model"], cfg["vocab_size"], size=cfg["size"], **cfg["model_overrides"])


def g2(model, x, y, vocab_size: int) -> GateResult:
    """G2 of an initialised model on real tokens x -> y (int64 (B, T)): its loss against ln(V)."""
    r = metrics.init_loss(model, x, y, vocab_size)
    return banded("g2_init_entropy", gates.G2_INIT_LOSS, r["deviation"], init_loss=r["init_loss"],
                  ln_vocab=r["ln_vocab"], init_entropy_ratio=r["entropy_ratio"])


def g35(model, shards: Artifact, device: str) -> GateResult:
    import data

    if not model.is_recurrent:
        return GateResult("g3_5_state_health", Verdict.NOT_APPLICABLE, None, {"reason": "no recurrent state"})
    h = metrics.state_health(model, data.TokenShards(shards.path, verify=False).split("validation"), device=device)
    parts = {
        "state_cosine": (gates.G35_STATE_COSINE, h["state_cosine"]),
        "effective_rank_ratio": (gates.G35_EFFECTIVE_RANK, h["effective_rank_ratio"]),
        "saturation": (gates.G35_SATURATION, h["saturation"]),
    }
    verdicts, detail = [], {"layers_measured": h["layers_measured"]}
    for key, (band, value) in parts.items():
        v = Verdict.NOT_APPLICABLE if math.isnan(value) else band.classify(value)
        verdicts.append(v)
        detail[key] = value
        detail[f"{key}_verdict"] = v.value
        detail[f"{key}_band"] = band.describe()
    return GateResult("g3_5_state_health", Verdict.worst(verdicts), h["state_cosine"], detail)


def _result_to_json(r: GateResult) -> dict[str, Any]:
    return {"gate": r.gate, "verdict": r.verdict.value, "value": r.value, "detail": r.detail}


def _result_from_json(d: dict[str, Any]) -> GateResult:
    return GateResult(d["gate"], Verdict(d["verdict"]), d["value"], d["detail"])


def gate_results(store: ArtifactStore, art: Artifact, variant: str, *, device: str = "cpu", force: bool = False,
                 run_id: str | None = None, say: Callable[[str], None] | None = None) -> tuple[list[GateResult], dict]:
    """The five gates of one checkpoint, measured once per (checkpoint, check code, device) and stored.

    Returns (results, provenance) where provenance says whether they were reused and which run measured
    them. `force` re-measures unless this same run (`run_id`) already did: one measurement serves every
    check of a forced run.
    """
    fp = fingerprint("gate_checks", CHECKS_VERSION, {"variant": variant, "device": device}, {art.asset: art.fingerprint})
    existing = store.get("gate_checks", fp)
    same_run = existing is not None and run_id is not None and existing.metadata.get("run_id") == run_id

    def build(d):
        results = evaluate_gates(store, art, variant, device=device)
        write_json_atomic(d / "results.json", [_result_to_json(r) for r in results])
        return {"run_id": run_id, "checkpoint": art.asset, "checkpoint_fingerprint": art.fingerprint,
                "check_code_version": CHECKS_VERSION}

    res = store.build("gate_checks", fp, build, inputs={art.asset: art.fingerprint}, force=force and not same_run,
                      on_event=say)
    results = [_result_from_json(d) for d in json.loads(res.artifact.file("results.json").read_text())]
    prov = {"reused": res.cache_hit, "measured_in_run": str(res.artifact.metadata.get("run_id")),
            "check_code_version": CHECKS_VERSION, "checkpoint_fingerprint": art.fingerprint}
    return results, prov


def to_check_result(asset_key: dg.AssetKey, r: GateResult, extra: dict[str, Any] | None = None) -> dg.AssetCheckResult:
    meta = {k: (v if isinstance(v, (int, float, str, bool)) else dg.MetadataValue.json(v))
            for k, v in {**r.as_metadata(), **(extra or {})}.items() if v is not None}
    if r.verdict is Verdict.PASS:
        return dg.AssetCheckResult(asset_key=asset_key, check_name=r.gate, passed=True, metadata=meta)
    severity = dg.AssetCheckSeverity.WARN if r.verdict is Verdict.WARN else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(asset_key=asset_key, check_name=r.gate, passed=False, severity=severity, metadata=meta)


class GateCheckConfig(dg.Config):
    force: bool = Field(default=False, description="Re-measure even when results for this checkpoint and check "
                        "code are stored (the re-validation schedule sets it)")


def build_gate_check(variant: str, name: str) -> dg.AssetChecksDefinition:
    key = dg.AssetKey(f"trained_{variant}")
    desc, blocking = CHECKS[name]

    @dg.asset_check(asset=key, name=name, description=desc, blocking=blocking)
    def _check(context: dg.AssetCheckExecutionContext, config: GateCheckConfig, store: StoreResource,
               checkpoint: Artifact) -> dg.AssetCheckResult:
        results, prov = gate_results(store.get(), checkpoint, variant, force=config.force, run_id=context.run.run_id,
                                     say=context.log.warning)
        context.log.info(f"{name} on {checkpoint.asset} {checkpoint.fingerprint}: "
                         + ("reused stored results" if prov["reused"] else "measured"))
        (r,) = [r for r in results if r.gate == name]
        return to_check_result(key, r, {"fingerprint": checkpoint.fingerprint, **prov})

    return _check


def check_names(variant: str) -> list[str]:
    return [n for n in CHECKS if n != "g4_component_balance" or variant in HYBRIDS]


gate_checks = [build_gate_check(v, n) for v in VARIANTS for n in check_names(v)]


@dg.asset_check(asset="gate_report", name="gate_report_no_failures",
                description="Every row of gate_report (gates, S-tests, graduation) passes or warns; a `fail` row "
                "fails this check with ERROR severity and names the rows.")
def gate_report_no_failures(gate_report: Artifact) -> dg.AssetCheckResult:
    rows = json.loads(gate_report.file("report.json").read_text())["rows"]
    failing = [r["check"] for r in rows if r["verdict"] == "fail"]
    warning = [r["check"] for r in rows if r["verdict"] == "warn"]
    meta = {"fingerprint": gate_report.fingerprint, "checks_fail": len(failing), "checks_warn": len(warning),
            "failing": ", ".join(failing) or "none", "warning": ", ".join(warning) or "none"}
    if failing:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata=meta,
                                   description=f"failing rows: {', '.join(failing)}")
    return dg.AssetCheckResult(passed=True, metadata=meta)


report_checks = [gate_report_no_failures]
