"""What `make demo` runs: Dagster's own `dagster asset materialize --select <the demo chain>`, then the run's
summary (`gt_pipeline.runinfo`: per-step time, and whether everything was a cache hit) and the wall time.

    python -m gt_pipeline.demo --select '*gate_report' [-c run_config.yaml ...]

One process for both, so a cached re-run pays one Python start (torch and dagster imports), not two.
The materialization is the CLI's (the click group behind the `dagster` command, `dagster._cli.cli`, called
as its entry point calls it), with the same arguments and environment a shell would give it; a failed run
exits with its code before any summary.
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    start = time.time()
    from dagster._cli import ENV_PREFIX, cli

    try:
        cli(["asset", "materialize", *argv], prog_name="dagster", auto_envvar_prefix=ENV_PREFIX)
    except SystemExit as done:  # click ends every command with SystemExit
        if done.code:
            return int(done.code) if isinstance(done.code, int) else 1
    from gt_pipeline import runinfo

    code = runinfo.main([])
    print(f"demo finished in {time.time() - start:.1f}s wall")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
