"""Benchmark: BPE training + sharding of a generated WikiText-format corpus, ours vs a naive peer.

    python -m data.bench --size-mb 540 --peer naive          # the issue's measurement
    python -m data.bench --size-mb 40                        # ours only
    options: --vocab-size 16000 --max-train-bytes N --num-workers 2 --corpus-dir DIR --work-dir DIR

Corpus: train.txt of --size-mb MB made of demo articles (data/demo.py), one new generated world
every 16 MB (so names, and the vocabulary, keep growing with size as in real text), plus ~1.1 MB
validation/test splits (WikiText-103's sizes). It is generated once into --corpus-dir
(default /tmp/gt_bench_corpus_<N>mb) and reused; generation is not part of the timings.

Each contender runs in its own subprocess (`--worker ours|naive`), so peak RSS is measured
separately: the parent polls the RSS of the worker's whole process tree (psutil, every 50 ms) and
also reports the kernel's ru_maxrss of that child (os.wait4). Wall time includes interpreter start.

    ours   data.train_bpe (chunked, streaming) + data.write_token_shards (bounded batches, 2 threads)
    naive  Tokenizer.train([train.txt]) with the same trainer settings, then encode_batch of all
           lines of the three splits in one call, concatenated into one uint16 array and written

Prints one JSON object (machine, corpus, config, ours, naive, ratios) on stdout.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from data import demo

REPO = Path(__file__).resolve().parents[1]
BLOCK_BYTES = 16_000_000   # one generated world per block
HELDOUT_BYTES = 1_100_000  # WikiText-103 validation/test are ~1.1 MB each
RSS_LIMIT_MIB = 1536       # the bound for ours at 540 MB
POLL_S = 0.05
GEN_VERSION = "bench-corpus-v3"


# ---------------------------------------------------------------------------------- corpus
def make_corpus(out_dir: Path, size_mb: float) -> dict:
    """Generate (or reuse) the benchmark corpus; returns its description incl. generation seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / "corpus.json"
    want = {"version": GEN_VERSION, "size_mb": size_mb}
    if marker.is_file():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in want} == want and all((out_dir / f"{s}.txt").is_file() for s in demo.SPLITS):
            return {**info, "reused": True}
    t0 = time.perf_counter()
    target = int(size_mb * 1_000_000)
    n_bytes = n_docs = 0
    tmp = out_dir / "train.txt.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(" \n")
        block = 0
        while n_bytes < target:
            block_end = min(target, n_bytes + BLOCK_BYTES)
            for art in demo.iter_articles(1000 + block, "train"):
                f.write(art)
                n_bytes += len(art.encode("utf-8"))
                n_docs += 1
                if n_bytes >= block_end:
                    break
            block += 1
    os.replace(tmp, out_dir / "train.txt")
    held = {s: demo.write_split(out_dir / f"{s}.txt", 1000, s, HELDOUT_BYTES) for s in ("validation", "test")}
    info = {**want, "train_bytes": n_bytes, "train_documents": n_docs, "worlds": block,
            "total_bytes": n_bytes + sum(h["bytes"] for h in held.values()),
            "generation_s": round(time.perf_counter() - t0, 2)}
    marker.write_text(json.dumps(info))
    return {**info, "reused": False}


# --------------------------------------------------------------------------------- workers
def run_ours(corpus: Path, work: Path, vocab_size: int, max_train_bytes: int | None, num_workers: int) -> dict:
    import data

    t0 = time.perf_counter()
    tok = data.train_bpe([corpus / "train.txt"], work / "tokenizer.json", vocab_size=vocab_size,
                         max_train_bytes=max_train_bytes)
    t1 = time.perf_counter()
    m = data.write_token_shards(work / "tokenizer.json", corpus, work / "shards", num_workers=num_workers)
    t2 = time.perf_counter()
    return {"train_s": round(t1 - t0, 2), "shard_s": round(t2 - t1, 2), "train_bytes": tok["train_bytes"],
            "vocab_size": tok["vocab_size"], "tokens": sum(v["tokens"] for v in m["splits"].values())}


def run_naive(corpus: Path, work: Path, vocab_size: int, max_train_bytes: int | None, num_workers: int) -> dict:
    from data.bpe import new_tokenizer, new_trainer

    t0 = time.perf_counter()
    tok = new_tokenizer()
    tok.train([str(corpus / "train.txt")], trainer=new_trainer(vocab_size, 2))
    t1 = time.perf_counter()
    lines: list[str] = []
    for s in demo.SPLITS:
        with open(corpus / f"{s}.txt", encoding="utf-8") as f:
            lines += f.readlines()
    encs = tok.encode_batch(lines)  # everything at once: the memory-hungry part
    ids = np.concatenate([np.array(e.ids, dtype=np.uint16) for e in encs])
    ids.tofile(work / "naive.bin")
    t2 = time.perf_counter()
    return {"train_s": round(t1 - t0, 2), "shard_s": round(t2 - t1, 2), "train_bytes": (corpus / "train.txt").stat().st_size,
            "vocab_size": tok.get_vocab_size(), "tokens": int(len(ids))}


WORKERS = {"ours": run_ours, "naive": run_naive}


def measure(kind: str, corpus: Path, work: Path, args, mem_limit_bytes: int | None = None) -> dict:
    """Run one contender in a subprocess; poll its process tree's RSS; return timings and peaks.

    mem_limit_bytes: address-space limit (RLIMIT_AS) of the worker, so that a peer that needs more
    memory than the machine has fails alone instead of waking the OOM killer on other processes."""
    import psutil
    import resource

    work.mkdir(parents=True, exist_ok=True)
    result_file = work / f"{kind}.result.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "data.bench", "--worker", kind, "--corpus-dir", str(corpus), "--work-dir", str(work),
           "--vocab-size", str(args.vocab_size), "--num-workers", str(args.num_workers)]
    if args.max_train_bytes:
        cmd += ["--max-train-bytes", str(args.max_train_bytes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    def limit():
        if mem_limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit_bytes, mem_limit_bytes))

    p = subprocess.Popen(cmd, env=env, cwd=str(REPO), preexec_fn=limit)
    proc = psutil.Process(p.pid)
    peak = 0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        rss = 0
        try:
            for q in [proc] + proc.children(recursive=True):
                rss += q.memory_info().rss
        except psutil.Error:
            pass  # a process ended between listing and reading
        peak = max(peak, rss)
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        why = f"exit code {p.returncode} (see its stderr)"
        if mem_limit_bytes:
            why += f"; it ran under a {mem_limit_bytes / 2**30:.1f} GiB address-space limit, likely exhausted"
        return {"failed": why, "wall_s_until_failure": round(wall, 2), "peak_rss_mib": round(peak / 2**20, 1),
                "ru_maxrss_mib": round(ru.ru_maxrss / 1024, 1)}
    out = json.loads(result_file.read_text())
    total = json.loads((corpus / "corpus.json").read_text())["total_bytes"]
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2**20, 1),
            "ru_maxrss_mib": round(ru.ru_maxrss / 1024, 1), "mb_per_s": round(total / 1e6 / wall, 3), **out}


def machine() -> dict:
    import psutil
    import tokenizers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "tokenizers": tokenizers.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Benchmark chunked BPE training + sharding against a naive peer")
    ap.add_argument("--size-mb", type=float, default=40.0)
    ap.add_argument("--peer", choices=["naive"], help="also measure the naive peer (needs ~35x the corpus in RAM)")
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument("--max-train-bytes", type=int, help="train the BPE on the first N bytes only (ours)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--corpus-dir", type=Path)
    ap.add_argument("--work-dir", type=Path)
    ap.add_argument("--peer-mem-limit-gib", type=float,
                    help="address-space cap for the peer (default: available RAM minus 1 GiB at its start)")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # inside the measured subprocess
        out = WORKERS[args.worker](args.corpus_dir, args.work_dir, args.vocab_size, args.max_train_bytes,
                                   args.num_workers)
        (args.work_dir / f"{args.worker}.result.json").write_text(json.dumps(out))
        return

    size_tag = f"{args.size_mb:g}mb"
    corpus_dir = args.corpus_dir or Path(f"/tmp/gt_bench_corpus_{size_tag}")
    work_dir = args.work_dir or Path(f"/tmp/gt_bench_work_{size_tag}")
    corpus = make_corpus(corpus_dir, args.size_mb)
    how = "reused" if corpus["reused"] else f"generated in {corpus['generation_s']} s"
    print(f"[data.bench] corpus {corpus_dir}: {corpus['total_bytes'] / 1e6:.1f} MB ({how})", file=sys.stderr)
    report = {"benchmark": "data.bench", "date": dt.date.today().isoformat(), "command": "python -m data.bench "
              + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine(), "corpus": corpus,
              "config": {"vocab_size": args.vocab_size, "max_train_bytes": args.max_train_bytes,
                         "num_workers": args.num_workers}}
    print("[data.bench] running ours ...", file=sys.stderr)
    report["ours"] = measure("ours", corpus_dir, work_dir, args)
    report["ours"]["peak_rss_limit_mib"] = RSS_LIMIT_MIB
    report["ours"]["within_rss_limit"] = report["ours"]["peak_rss_mib"] <= RSS_LIMIT_MIB
    print(f"[data.bench] ours: {report['ours']}", file=sys.stderr)
    if args.peer:
        import psutil

        avail = psutil.virtual_memory().available
        limit = int(args.peer_mem_limit_gib * 2**30) if args.peer_mem_limit_gib else avail - 2**30
        print(f"[data.bench] running naive (available {avail / 2**30:.1f} GiB, cap {limit / 2**30:.1f} GiB) ...",
              file=sys.stderr)
        report["naive"] = measure("naive", corpus_dir, work_dir, args, mem_limit_bytes=limit)
        report["naive"]["available_gib_at_start"] = round(avail / 2**30, 1)
        report["naive"]["mem_limit_gib"] = round(limit / 2**30, 1)
        if "failed" not in report["naive"]:
            report["ours_vs_naive"] = {
                "speedup": round(report["naive"]["wall_s"] / report["ours"]["wall_s"], 3),
                "peak_rss_ratio": round(report["naive"]["peak_rss_mib"] / report["ours"]["peak_rss_mib"], 2),
                "ours_not_slower": report["ours"]["wall_s"] <= report["naive"]["wall_s"],
            }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
