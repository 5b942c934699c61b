"""Where a kernel's time goes, by phase, from Nsight Compute's per-instruction source page; prints JSON.

    ncu --set full --import-source yes -k regex:chunk_ --launch-skip 4 --launch-count 4 -o rep \\
        python -m kernels.profile_run 16,4096,8                                # on the GPU machine
    ncu -i rep.ncu-rep --page source --csv --print-source sass > rep.csv
    python -m kernels.ncu_phases rep.csv [--kernel REGEX] [--out FILE]       # anywhere (.csv or .csv.xz)

The chunked wkv6 kernels run each chunk as phases separated by barriers, so the SASS is split at every BAR
(and EXIT): each phase gets its share of the kernel's executed warp instructions and of its warp-stall samples,
its most executed opcodes, and the kernel gets its stall reasons. ncu prints each kernel's page twice when a
report holds several kernels; identical pages are counted once.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import lzma
import re
import sys
from pathlib import Path

from .bench import out_file
from .build import write_json_atomic

KERNEL = '"Kernel Name"'
HEADER = '"Address"'
SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
TOP_OPCODES = 6


def _int(x: str | None) -> int:
    return int(x) if x and x.strip() not in ("", "-") else 0


def opcode(sass: str) -> str:
    """`@!P0 FMUL.FTZ R1, R2, R3` -> `FMUL` (predicate and modifiers dropped)."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def read_pages(path: Path) -> list[tuple[str, list[dict]]]:
    """(kernel name, rows) per kernel page of an ncu source-page CSV export; identical repeated pages dropped."""
    if not path.is_file():
        raise FileNotFoundError(f"ncu_phases: no such file: {path}")
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", newline="") as f:
        lines = f.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(KERNEL)]
    if not starts:
        raise ValueError(f"ncu_phases: {path} is not an ncu source page export: no {KERNEL} line "
                         "(export with `ncu -i REPORT --page source --csv --print-source sass`)")
    pages, seen = [], set()
    for a, b in zip(starts, starts[1:] + [len(lines)]):
        name = next(csv.reader([lines[a]]))[1]
        body = lines[a + 1:b]
        if not body or not body[0].startswith(HEADER):
            raise ValueError(f"ncu_phases: the page of {name[:60]!r} in {path} has no {HEADER} header line")
        rows = list(csv.DictReader(body))
        missing = [c for c in ("Source", SAMPLES, EXECUTED) if rows and c not in rows[0]]
        if missing:
            raise ValueError(f"ncu_phases: the page of {name[:60]!r} lacks the columns {missing} "
                             "(profile with --set full so that the source counters are collected)")
        key = (name, tuple(body))
        if key in seen:
            continue
        seen.add(key)
        pages.append((name, rows))
    return pages


def phases(rows: list[dict]) -> dict:
    """The kernel's totals, stall reasons and per-phase shares (the SASS split after every BAR and EXIT)."""
    stall_cols = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c] if rows else []
    stalls = collections.Counter()
    groups, cur = [], []
    for n, r in enumerate(rows):
        cur.append((n, r))
        for c in stall_cols:
            stalls[c[len("stall_"):]] += _int(r[c])
        op = opcode(r["Source"])
        if op in ("BAR", "EXIT"):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    total_exec = sum(_int(r[EXECUTED]) for r in rows)
    total_smp = sum(_int(r[SAMPLES]) for r in rows)
    out = []
    for g in groups:
        ex = sum(_int(r[EXECUTED]) for _, r in g)
        smp = sum(_int(r[SAMPLES]) for _, r in g)
        if ex == 0 and smp == 0:
            continue
        ops = collections.Counter()
        for _, r in g:
            ops[opcode(r["Source"])] += _int(r[EXECUTED])
        out.append({
            "sass_lines": [g[0][0], g[-1][0]],
            "ends_with": opcode(g[-1][1]["Source"]),
            "executed_share": ex / total_exec if total_exec else 0.0,
            "samples_share": smp / total_smp if total_smp else 0.0,
            "top_opcodes": {o: round(v / ex, 3) for o, v in ops.most_common(TOP_OPCODES)} if ex else {},
        })
    s_total = sum(stalls.values())
    return {
        "sass_instructions": len(rows),
        "warp_instructions_executed": total_exec,
        "stall_samples": total_smp,
        "stall_reasons": {k: round(v / s_total, 4) for k, v in stalls.most_common() if v} if s_total else {},
        "phases": out,
    }


def report(path: Path, kernel: str | None = None) -> dict:
    pages = read_pages(path)
    if kernel:
        try:
            pat = re.compile(kernel)
        except re.error as e:
            raise ValueError(f"ncu_phases: --kernel {kernel!r} is not a regular expression: {e}") from None
        pages = [(n, r) for n, r in pages if pat.search(n)]
        if not pages:
            raise ValueError(f"ncu_phases: no kernel in {path} matches {kernel!r}")
    return {"source": str(path), "kernels": [{"name": n, **phases(r)} for n, r in pages]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", type=Path, help="ncu source page export (.csv or .csv.xz)")
    ap.add_argument("--kernel", default=None, help="regex on the kernel name")
    ap.add_argument("--out", type=out_file, default=None, metavar="FILE", help="also write the JSON here")
    args = ap.parse_args(argv)
    try:
        doc = report(args.csv, args.kernel)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    print(json.dumps(doc, indent=2))
    if args.out:
        write_json_atomic(Path(args.out), doc)
    for k in doc["kernels"]:
        top = ", ".join(f"{r} {v:.0%}" for r, v in list(k["stall_reasons"].items())[:5])
        print(f"{k['name'][:70]}: {k['warp_instructions_executed']:,} warp instructions; stalls: {top}", file=sys.stderr)
        for i, p in enumerate(k["phases"]):
            if p["executed_share"] >= 0.01 or p["samples_share"] >= 0.01:
                print(f"  phase {i:2d} (SASS {p['sass_lines'][0]}-{p['sass_lines'][1]}, ends {p['ends_with']}): "
                      f"{p['executed_share']:.1%} of instructions, {p['samples_share']:.1%} of stall samples",
                      file=sys.stderr)


if __name__ == "__main__":
    main()
