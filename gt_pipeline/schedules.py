"""Re-validation: a schedule that re-measures the gate checks and recomputes the three reports against
the latest checkpoints. It never retrains: the trained_* assets are not in its selection, their
checkpoints are loaded from the artifact store. Every check and report gets `force: true`, so stored
results are not reused (the gates are measured once per run and shared by its five checks).

Cron: GT_REVALIDATION_CRON (default daily at 03:00 UTC), read once in definitions.py.
"""

import dagster as dg

from gt_pipeline.assets.training import VARIANTS
from gt_pipeline.checks import check_names
from gt_pipeline.resources import StoreResource

REPORTS = ("gate_report", "ablation_report", "long_context_report")
DEFAULT_CRON = "0 3 * * *"

revalidation_job = dg.define_asset_job(
    "revalidation",
    selection=dg.AssetSelection.assets(*REPORTS)
    | dg.AssetSelection.checks_for_assets(*[f"trained_{v}" for v in VARIANTS]),
    description="Gate checks on every trained_* checkpoint + the three reports recomputed (no training).",
)


def revalidation_run_config(variants=tuple(VARIANTS)) -> dg.RunConfig:
    """`force: true` for the three reports and every gate check of `variants` (asset-check op names are
    `<asset>_<check>`)."""
    checks = {f"trained_{v}_{name}": {"config": {"force": True}} for v in variants for name in check_names(v)}
    return dg.RunConfig(ops={**{r: {"config": {"force": True}} for r in REPORTS}, **checks})


def make_revalidation_schedule(cron: str = DEFAULT_CRON) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="revalidation_schedule",
        cron_schedule=cron,
        job=revalidation_job,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-run the gate checks and recompute the gate/ablation/long-context reports on the latest "
        "checkpoints (no training).",
    )
    def revalidation_schedule(context: dg.ScheduleEvaluationContext, store: StoreResource):
        st = store.get()
        present = [v for v in VARIANTS if (st.asset_dir(f"trained_{v}") / "LATEST.json").is_file()]
        if "gf_mh" not in present:
            return dg.SkipReason("no trained_gf_mh checkpoint in the store yet: materialize +trained_gf_mh first")
        checks = [dg.AssetCheckKey(dg.AssetKey(f"trained_{v}"), name) for v in present for name in check_names(v)]
        return dg.RunRequest(
            run_key=None,
            run_config=revalidation_run_config(present),
            asset_selection=[dg.AssetKey(r) for r in REPORTS],
            asset_check_keys=checks,
            tags={"groundthink/revalidation": "true", "groundthink/variants": ",".join(present)},
        )

    return revalidation_schedule
