"""What every cached asset does at the end: turn a store BuildResult into a Dagster Output.

The fingerprint is the Dagster data version (so the UI's staleness follows the cache key), and the
builder's metrics are emitted again on cache hits so plots and checks stay populated. The profile
the run used is shown in the metadata and recorded as the store's profile ($GT_HOME/PROFILE).
"""

from __future__ import annotations

import warnings
from typing import Any

import dagster as dg

from gt_pipeline.profiles import record_store_profile
from gt_pipeline.store import Artifact, BuildResult

OWNER = "team:groundthink"


def to_metadata_value(v: Any) -> Any:
    if isinstance(v, dg.MetadataValue):
        return v
    if isinstance(v, bool) or isinstance(v, (int, float, str)):
        return v
    return dg.MetadataValue.json(v)


def artifact_output(
    context: dg.AssetExecutionContext,
    result: BuildResult,
    *,
    profile: str,
    headline: dict[str, Any] | None = None,
    preview_md: str | None = None,
) -> dg.Output[Artifact]:
    art = result.artifact
    if result.quarantined is not None:
        context.log.warning(f"a corrupt cached copy was moved to {result.quarantined} and rebuilt")
    context.log.info(
        f"{art.asset} {art.fingerprint}: {'cache hit' if result.cache_hit else 'built'} "
        f"in {result.seconds:.1f}s at {art.path}"
    )
    meta: dict[str, Any] = {
        "fingerprint": art.fingerprint,
        "cache_hit": result.cache_hit,
        "path": dg.MetadataValue.path(str(art.path)),
        "wall_s": round(result.seconds, 3),
        "build_s": float(art.metadata.get("build_s", result.seconds)),
        "profile": profile,
    }
    record_store_profile(art.path.parents[1], profile)
    for k, v in (headline or {}).items():
        meta[k] = to_metadata_value(v)
    if preview_md:
        meta["preview"] = dg.MetadataValue.md(preview_md)
    with warnings.catch_warnings():
        # User-provided data versions are "beta" in dagster 1.13; they are the point of the store.
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(art, data_version=dg.DataVersion(art.fingerprint), metadata=meta)


def md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|")
