"""One rank of a data-parallel `trained_*` build, launched by torchrun (from the asset or by hand).

    torchrun --standalone --nproc-per-node 2 -m gt_pipeline.engine.worker \\
        --config '{"model": "GF-MH", "size": "demo", ...}' --shards .gt/token_shards/<fp> \\
        --work-dir .gt/trained_gf_mh/<fp>.work --out /tmp/trained_out

Every rank runs `train()` (DDP inside the engine). Rank 0 writes the artifact files into `--out` with
the same writer as the one-process path (`write_training_artifact`) and, when Dagster launched the job
(dagster-pipes environment present), opens `open_dagster_pipes()`: the engine's log rows go to the
Dagster run as log lines and the artifact's metadata comes back as a custom message. The other ranks
never open pipes (the Pipes bootstrap variables are inherited by every rank; one writer only).
A rank that fails writes `rank<R>.txt` (exception and traceback) into `--error-dir`, so the asset can
fail the materialization with the worker's own message rather than torchrun's exit code.

Plain PyTorch plus `dagster_pipes` (the small protocol package; this module never imports `dagster`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from gt_pipeline.engine.artifact import write_training_artifact
from gt_pipeline.engine.train import TrainConfig, format_log_row, run_paths, train


def torchrun_command(
    config: dict[str, Any],
    shards: Path,
    work_dir: Path,
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    out: Path | None = None,
    error_dir: Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The torchrun command line of one node. One node: `--standalone` (a free local port). Several:
    static rendezvous at `rdzv_endpoint` = host:port of node 0, which holds global rank 0 (the writer);
    nodes 1..nnodes-1 run the same command with their `node_rank` and without `out`."""
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        if not rdzv_endpoint or ":" not in rdzv_endpoint:
            raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint='host:port' (node 0's address), got {rdzv_endpoint!r}")
        host, port = rdzv_endpoint.rsplit(":", 1)
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", host, "--master-port", port]
    cmd += ["-m", "gt_pipeline.engine.worker", "--config", json.dumps(config, sort_keys=True),
            "--shards", str(shards), "--work-dir", str(work_dir)]
    if out is not None:
        cmd += ["--out", str(out)]
    if error_dir is not None:
        cmd += ["--error-dir", str(error_dir)]
    return cmd


def read_errors(error_dir: Path) -> str:
    """The failed ranks' messages, first failure first, each distinct error once with its traceback
    ('' if no rank wrote one)."""
    files = sorted(error_dir.glob("rank*.txt"), key=lambda p: p.stat().st_mtime) if error_dir.is_dir() else []
    by_error: dict[str, tuple[list[str], str]] = {}
    for f in files:
        head, _, tb = f.read_text().strip().partition("\n")
        rank, _, error = head.partition(": ")
        by_error.setdefault(error, ([], tb))[0].append(rank.removeprefix("rank "))
    return "\n".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(r)}: {e}\n{tb}" for e, (r, tb) in by_error.items())


def run(args: argparse.Namespace, pipes=None) -> dict[str, Any] | None:
    cfg = TrainConfig(**json.loads(args.config))
    say = pipes.log.info if pipes is not None else (lambda msg: print(msg, flush=True))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 and args.out is None:
        raise ValueError("the node holding rank 0 writes the artifact: pass --out DIR")
    if rank0:
        say(f"training {cfg.model} ({cfg.size}) on {os.environ.get('WORLD_SIZE', '1')} ranks for {cfg.steps} steps; "
            f"checkpoints in {args.work_dir}")
    res = train(cfg, args.shards, args.work_dir, on_log=lambda row: say(format_log_row(row, cfg.steps)),
                on_event=say, verify_shards=False)
    if res.rank != 0:
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    meta = write_training_artifact(args.out, cfg, res, args.shards, run_paths(cfg, res.world_size))
    if pipes is not None:
        pipes.report_custom_message({"metadata": meta})
    say(f"rank 0 wrote the artifact into {args.out}: world_size {res.world_size}, "
        f"{res.tokens_per_s:,.0f} tok/s over all ranks")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="TrainConfig as JSON (the asset's resolved config)")
    ap.add_argument("--shards", type=Path, required=True, help="token_shards directory (verified by the store)")
    ap.add_argument("--work-dir", type=Path, required=True, help="checkpoints; shared by every node for resume")
    ap.add_argument("--out", type=Path, default=None, help="artifact directory, written by rank 0")
    ap.add_argument("--error-dir", type=Path, default=None, help="a failing rank writes rank<R>.txt here")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        if rank == 0 and PipesEnvVarParamsLoader().is_dagster_pipes_process():
            with open_dagster_pipes() as pipes:
                run(args, pipes)
        else:
            run(args)
    except Exception as exc:
        if args.error_dir is not None:
            args.error_dir.mkdir(parents=True, exist_ok=True)
            tb = "".join(traceback.format_exception(exc)[-6:])
            (args.error_dir / f"rank{rank}.txt").write_text(f"rank {rank}: {type(exc).__name__}: {exc}\n{tb}")
        raise


if __name__ == "__main__":
    main()
