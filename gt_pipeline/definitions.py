"""The code location: composes assets, checks, jobs, schedules and resources. Nothing else happens here.

Loaded by `dagster dev` (pyproject.toml / workspace.yaml) and by `dagster asset materialize` through
`-m gt_pipeline.definitions` or an exported DAGSTER_MODULE_NAME=gt_pipeline.definitions.

Steps run in the run's own process (`in_process_executor`): a cached chain then pays one Python start
(torch + dagster imports) per run instead of one per step, and a cancelled run stops at the next
Python instruction of the step in flight. Data-parallel training (nproc_per_node x nnodes > 1) runs
its ranks in torchrun's processes, so a crashed rank fails the step, not the run's process.

The active profile (gt_pipeline.profiles.active_profile) is shown in every asset's description and is
part of its Dagster code version (`<profile>-<source hash>`), so artifacts built under another profile
show as stale with the reason "code version changed"; the artifact fingerprints use the source hash only.
"""

import os
import warnings

import dagster as dg

from gt_pipeline.assets import data as data_assets
from gt_pipeline.assets import kernels as kernel_assets
from gt_pipeline.assets import reports as report_assets
from gt_pipeline.assets import sweep as sweep_assets
from gt_pipeline.assets.training import VARIANTS, trained_assets
from gt_pipeline.checks import gate_checks, report_checks
from gt_pipeline.profiles import active_profile
from gt_pipeline.resources import resources_from_env
from gt_pipeline.schedules import DEFAULT_CRON, make_revalidation_schedule, revalidation_job

RESOURCES = resources_from_env()
PROFILE, PROFILE_WHY = active_profile(os.environ, RESOURCES["store"].root)

main_job = dg.define_asset_job(
    "groundthink_main",
    selection=dg.AssetSelection.assets("gate_report", "ablation_report", "long_context_report").upstream(),
    description="The main chain: data -> wkv6 kernel -> trained GF-MH (+ gate checks) -> the three reports.",
)

gate_checks_job = dg.define_asset_job(
    "gate_checks_only",
    selection=dg.AssetSelection.checks_for_assets(*[f"trained_{v}" for v in VARIANTS], "gate_report"),
    description="Every gate check against the stored checkpoints, nothing materialized (`force: true` per check "
    "re-measures).",
)


def with_profile(spec: dg.AssetSpec) -> dg.AssetSpec:
    note = (f"\n\n**Profile: `{PROFILE.name}`** ({PROFILE_WHY}): {PROFILE.description}. Code version = "
            f"`<profile>-<hash of the sources it depends on>`.")
    return spec.replace_attributes(description=(spec.description or "") + note,
                                   code_version=f"{PROFILE.name}-{spec.code_version}")


with warnings.catch_warnings():  # AssetsDefinition.map_asset_specs is "preview" in dagster 1.13
    warnings.simplefilter("ignore", dg.PreviewWarning)
    ASSETS = [a.map_asset_specs(with_profile)
              for a in [*dg.load_assets_from_modules([data_assets, kernel_assets, report_assets, sweep_assets]),
                        *trained_assets]]

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=[*gate_checks, *report_checks],
    jobs=[main_job, revalidation_job, gate_checks_job, sweep_assets.sweep_job],
    schedules=[make_revalidation_schedule(os.environ.get("GT_REVALIDATION_CRON", DEFAULT_CRON))],
    resources=RESOURCES,
    executor=dg.in_process_executor,
)
