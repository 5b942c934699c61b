"""What a run did, read from its events: per-step wall time, cache hits, reused check results.

    python -m gt_pipeline.runinfo            # the newest run in $DAGSTER_HOME
    python -m gt_pipeline.runinfo RUN_ID

Prints one line per step (seconds, and what it did: `cache hit`, `built`, `reused` / `measured`) and
a verdict line: "everything was cached" when every materialization was a cache hit and every gate
check re-emitted stored results, else what was built or measured. `make demo` calls it after the run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import dagster as dg


@dataclass
class RunSummary:
    run_id: str
    status: str
    wall_s: float  # RUN_START -> RUN_SUCCESS / RUN_FAILURE
    steps: dict[str, float] = field(default_factory=dict)  # step key -> seconds (STEP_START -> end)
    cache_hit: dict[str, bool] = field(default_factory=dict)  # asset -> metadata cache_hit
    extension_loaded: dict[str, bool] = field(default_factory=dict)  # wkv6_kernel -> loaded/compiled this run
    check_reused: dict[str, bool] = field(default_factory=dict)  # "asset:check" -> results re-emitted
    check_fingerprint: dict[str, str] = field(default_factory=dict)  # "asset:check" -> fingerprint it evaluated
    fingerprints: dict[str, str] = field(default_factory=dict)  # asset -> data version of this run

    @property
    def built(self) -> list[str]:
        return [a for a, hit in self.cache_hit.items() if not hit]

    @property
    def measured(self) -> list[str]:
        return [c for c, reused in self.check_reused.items() if not reused]

    @property
    def everything_cached(self) -> bool:
        return self.status == "SUCCESS" and not self.built and not self.measured \
            and not any(self.extension_loaded.values())


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def summarize_run(instance: dg.DagsterInstance, run_id: str) -> RunSummary:
    run = instance.get_run_by_id(run_id)
    if run is None:
        raise ValueError(f"run {run_id!r} is not in this Dagster instance ({instance.root_directory})")
    s = RunSummary(run_id, run.status.value, float("nan"))
    starts: dict[str, float] = {}
    run_start = None
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None:
            continue
        t = entry.timestamp
        kind = ev.event_type
        if kind == dg.DagsterEventType.RUN_START:
            run_start = t
        elif kind in (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE) and run_start is not None:
            s.wall_s = t - run_start
        elif kind == dg.DagsterEventType.STEP_START:
            starts[ev.step_key] = t
        elif kind in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE) and ev.step_key in starts:
            s.steps[ev.step_key] = t - starts[ev.step_key]
        elif kind == dg.DagsterEventType.ASSET_MATERIALIZATION:
            mat = ev.event_specific_data.materialization
            asset = mat.asset_key.to_user_string()
            md = {k: _value(v) for k, v in mat.metadata.items()}
            if "cache_hit" in md:
                s.cache_hit[asset] = bool(md["cache_hit"])
            if "extension_loaded_this_run" in md:
                s.extension_loaded[asset] = bool(md["extension_loaded_this_run"])
            if mat.tags and "dagster/data_version" in mat.tags:
                s.fingerprints[asset] = mat.tags["dagster/data_version"]
        elif kind == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            data = ev.event_specific_data
            md = {k: _value(v) for k, v in data.metadata.items()}
            name = f"{data.asset_key.to_user_string()}:{data.check_name}"
            if "reused" in md:
                s.check_reused[name] = bool(md["reused"])
            if "fingerprint" in md:
                s.check_fingerprint[name] = str(md["fingerprint"])
    return s


def format_summary(s: RunSummary) -> str:
    lines = [f"run {s.run_id[:8]} {s.status}: {s.wall_s:.1f}s from run start to end"]
    for step, sec in sorted(s.steps.items(), key=lambda kv: -kv[1]):
        asset = step
        what = ""
        if asset in s.cache_hit:
            what = "cache hit" if s.cache_hit[asset] else "built"
        lines.append(f"  {sec:7.2f}s  {step} {what}".rstrip())
    n_checks = len(s.check_reused)
    if s.everything_cached:
        lines.append(f"everything was cached: {len(s.cache_hit)} assets were cache hits, {n_checks} check results "
                     "re-emitted, nothing trained, compiled or measured")
    else:
        lines.append(f"built: {', '.join(s.built) or 'nothing'}; checks measured: {', '.join(s.measured) or 'none'}"
                     + ("; wkv6 extension loaded" if any(s.extension_loaded.values()) else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    instance = dg.DagsterInstance.get()
    if argv:
        run_id = argv[0]
    else:
        runs = instance.get_runs(limit=1)
        if not runs:
            print(f"no runs in {instance.root_directory}", file=sys.stderr)
            return 1
        run_id = runs[0].run_id
    print(format_summary(summarize_run(instance, run_id)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
