"""Gate checks on every `trained_*` asset: g1_forward, g2_init_entropy, g3_training_health,
g3_5_state_health, g4_component_balance.

One multi-asset check per trained asset runs all five in one step, reading the latest published
checkpoint (so a scheduled re-validation re-evaluates them without retraining). Thresholds come from
`gt_pipeline.gates` only. G1 and G3 are blocking: an ERROR there stops every downstream report.
Verdicts map to Dagster as pass -> passed, warn -> failed with WARN severity, fail -> failed with
ERROR severity; G4 on a single-mixer baseline is not applicable and emits no result.
"""

import math
from typing import Any, Iterator

import dagster as dg

from gt_pipeline import gates
from gt_pipeline.assets.training import HYBRIDS, VARIANTS, load_trained, validation_batch
from gt_pipeline.engine import metrics
from gt_pipeline.gates import Band, GateResult, Verdict
from gt_pipeline.resources import StoreResource
from gt_pipeline.store import Artifact, ArtifactStore

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


def to_check_result(asset_key: dg.AssetKey, r: GateResult) -> dg.AssetCheckResult:
    meta = {k: (v if isinstance(v, (int, float, str, bool)) else dg.MetadataValue.json(v))
            for k, v in r.as_metadata().items() if v is not None}
    if r.verdict is Verdict.PASS:
        return dg.AssetCheckResult(asset_key=asset_key, check_name=r.gate, passed=True, metadata=meta)
    severity = dg.AssetCheckSeverity.WARN if r.verdict is Verdict.WARN else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(asset_key=asset_key, check_name=r.gate, passed=False, severity=severity, metadata=meta)


def build_gate_checks(variant: str) -> dg.AssetChecksDefinition:
    key = dg.AssetKey(f"trained_{variant}")
    specs = [dg.AssetCheckSpec(name, asset=key, description=desc, blocking=blocking)
             for name, (desc, blocking) in CHECKS.items()
             if name != "g4_component_balance" or variant in HYBRIDS]

    @dg.multi_asset_check(specs=specs, name=f"gates_trained_{variant}")
    def _gates(context: dg.AssetCheckExecutionContext, store: StoreResource) -> Iterator[dg.AssetCheckResult]:
        st = store.get()
        art = st.latest(key.path[-1])
        context.log.info(f"evaluating gates on {art.asset} {art.fingerprint}")
        for r in evaluate_gates(st, art, variant):
            if r.verdict is Verdict.NOT_APPLICABLE and r.gate == "g4_component_balance":
                continue
            yield to_check_result(key, r)

    return _gates


gate_checks = [build_gate_checks(v) for v in VARIANTS]
