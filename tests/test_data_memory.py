"""The data library stays light and its memory does not grow with the corpus.

Memory test design. Peak RSS (ru_maxrss) of a fresh subprocess is measured for BPE training and for
sharding on two corpora made of the same demo text, SMALL_MB and 6x that (the text repeated), so
the vocabulary, the merges and the tokenizer are identical and only the byte count changes.

Bound: the peak may grow by at most the added text itself (10 MB), i.e. less than 1 byte per added
byte. Anything that holds the text in memory grows by at least that; measured here with the
streaming switched off (one 12 MB chunk / one batch): train +841 MB, shard +275 MB. Streaming
holds a bounded amount (trainer buffer 256 x 16 KiB = 4 MiB, of which the small corpus fills 2 MiB;
encoder 2 * 2 batches of 256 KiB plus their Encoding objects); measured: +5 MB for each phase
(the buffer difference plus allocator noise). The 540 MB run of `python -m data.bench`
(BENCHMARKS_data.md) is the at-scale measurement.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data

REPO = Path(__file__).resolve().parents[1]
SMALL_MB = 2.0
REPEAT = 6
BOUND_MB = (REPEAT - 1) * SMALL_MB  # the added text, see above

PROBE = r"""
import resource, sys
from pathlib import Path
import data
phase, raw, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
tok = work / "tokenizer.json"
if phase == "train":
    data.train_bpe([raw / "train.txt"], work / "probe_tok.json", vocab_size=1024, chunk_bytes=16 << 10)
else:
    data.load_tokenizer(tok)  # imports and tokenizer loaded before the baseline is read
    data.write_token_shards(tok, raw, work / "shards", num_workers=2, batch_bytes=256 << 10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def _peak_mb(phase: str, raw: Path, work: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", PROBE, phase, str(raw), str(work)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1]) // 1024


def test_import_data_does_not_load_dagster_or_torch():
    code = "import sys, data; data.TokenShards; data.demo.facts(); print(sorted(m for m in ('dagster', 'torch') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    small, big = root / "small", root / "big"
    data.write_raw_corpus("demo", small, demo_size_mb=SMALL_MB)
    big.mkdir()
    for s in data.SPLITS:
        text = (small / f"{s}.txt").read_text(encoding="utf-8")
        (big / f"{s}.txt").write_text(text * (REPEAT if s == "train" else 1), encoding="utf-8")
    data.train_bpe([small / "train.txt"], root / "tokenizer.json", vocab_size=1024)
    for d in (small, big):
        (d / "work").mkdir()
        (d / "work" / "tokenizer.json").write_bytes((root / "tokenizer.json").read_bytes())
    return small, big


@pytest.mark.parametrize("phase", ["train", "shard"])
def test_peak_memory_does_not_grow_with_corpus_size(corpora, phase):
    small, big = corpora
    p_small = _peak_mb(phase, small, small / "work")
    p_big = _peak_mb(phase, big, big / "work")
    added_mb = (REPEAT - 1) * SMALL_MB
    assert p_big - p_small <= BOUND_MB, (
        f"{phase}: peak RSS {p_small} MB at {SMALL_MB} MB of text, {p_big} MB at {REPEAT * SMALL_MB} MB: grew by "
        f"{p_big - p_small} MB for {added_mb} MB more text (bound {BOUND_MB} MB)")
