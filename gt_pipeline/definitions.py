"""The code location: composes assets, checks, jobs, schedules and resources. Nothing else happens here.

Loaded by `dagster dev` (pyproject.toml / workspace.yaml) and by `dagster asset materialize` through
`-m gt_pipeline.definitions` or an exported DAGSTER_MODULE_NAME=gt_pipeline.definitions.
"""

import os

import dagster as dg

from gt_pipeline.assets import data as data_assets
from gt_pipeline.assets import kernels as kernel_assets
from gt_pipeline.assets import reports as report_assets
from gt_pipeline.assets import sweep as sweep_assets
from gt_pipeline.assets.training import trained_assets
from gt_pipeline.checks import gate_checks
from gt_pipeline.resources import resources_from_env
from gt_pipeline.schedules import DEFAULT_CRON, make_revalidation_schedule, revalidation_job

main_job = dg.define_asset_job(
    "groundthink_main",
    selection=dg.AssetSelection.assets("gate_report", "ablation_report", "long_context_report").upstream(),
    description="The main chain: data -> wkv6 kernel -> trained GF-MH (+ gate checks) -> the three reports.",
)

defs = dg.Definitions(
    assets=[*dg.load_assets_from_modules([data_assets, kernel_assets, report_assets, sweep_assets]), *trained_assets],
    asset_checks=gate_checks,
    jobs=[main_job, revalidation_job, sweep_assets.sweep_job],
    schedules=[make_revalidation_schedule(os.environ.get("GT_REVALIDATION_CRON", DEFAULT_CRON))],
    resources=resources_from_env(),
)
