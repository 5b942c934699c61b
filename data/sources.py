"""WikiText-103 raw text from one of three sources, written as {split}.txt in the wiki.*.raw format.

    hf     Hugging Face `datasets`: Salesforce/wikitext, config wikitext-103-raw-v1 (downloads ~300 MB
           of parquet into the HF cache, then streams the memory-mapped Arrow table in row batches)
    local  a directory with the official wiki.train.raw / wiki.valid.raw / wiki.test.raw, or the HF
           parquet files train-*.parquet / validation-*.parquet / test-*.parquet (also looked for in
           a wikitext-103-raw/ or wikitext-103-raw-v1/ subdirectory, as the archives unpack)
    demo   the generated corpus of data/demo.py

Every source is streamed line by line into out_dir/{split}.txt (temp name + os.replace), so memory
stays flat whatever the corpus size. The HF rows are the lines of wiki.*.raw with blank lines stored
as "" (the loader script's convention); we write those back as " \\n", so the hf and local sources
give the same bytes. A document is a top-level article: from a ` = Title = ` line to the next one.

    python -m data.sources {hf,local,demo} OUT_DIR [--local-dir DIR]     # prints the stats as JSON
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from data import demo

from data import SPLITS
SOURCES = ("hf", "local", "demo")
HF_DATASET = ("Salesforce/wikitext", "wikitext-103-raw-v1")
RAW_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
SUBDIRS = ("", "wikitext-103-raw", "wikitext-103-raw-v1")

LOCAL_HINT = (
    "To use local files instead, set GT_DATA_SOURCE=local and GT_WIKITEXT_DIR=/path/to/dir, where the directory "
    "holds the official wiki.train.raw, wiki.valid.raw and wiki.test.raw (from wikitext-103-raw-v1.zip) or the HF "
    "parquet files train-*.parquet, validation-*.parquet, test-*.parquet (from the Salesforce/wikitext dataset "
    "repo, folder wikitext-103-raw-v1/); or use GT_DATA_SOURCE=demo for the embedded demo corpus."
)


def is_title(line: str) -> bool:
    """True for a top-level article heading ` = Title = ` (not ` = = Section = = `)."""
    return line.startswith(" = ") and not line.startswith(" = = ") and line.rstrip("\r\n").endswith(" = ")


def iter_documents(path: Path) -> Iterator[str]:
    """Yield whole articles (title line through the line before the next title) from a {split}.txt.

    Text before the first title is yielded as a document of its own only if it holds non-blank text.
    Only one article is held in memory at a time."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such split file {path}: expected a {{split}}.txt written by write_raw_corpus")
    buf: list[str] = []
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            if is_title(line) and buf:
                if any(x.strip() for x in buf):
                    yield "".join(buf)
                buf = []
            buf.append(line)
    if any(x.strip() for x in buf):
        yield "".join(buf)


# ------------------------------------------------------------------------------------- writing
def _write_lines(lines: Iterable[str], path: Path, origin: str) -> dict:
    """Stream lines to path (temp + os.replace) and count bytes, lines and documents."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n_bytes = n_lines = n_docs = n_text = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            for line in lines:
                if not line.endswith("\n"):
                    line += "\n"
                f.write(line)
                n_bytes += len(line.encode("utf-8"))
                n_lines += 1
                n_docs += is_title(line)
                n_text += bool(line.strip())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if n_text == 0:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"split {path.stem!r} from {origin} is empty (no text lines): expected WikiText articles. "
                         f"Check that the file is complete, or re-download it. {LOCAL_HINT}")
    os.replace(tmp, path)
    # Text without any ` = Title = ` heading is still one document (iter_documents agrees).
    return {"bytes": n_bytes, "documents": max(n_docs, 1), "lines": n_lines}


def _raw_lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            yield from f
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}): expected the official wiki.*.raw file. "
                         "Re-download wikitext-103-raw-v1.zip and unpack it again.") from None


def _parquet_lines(files: list[Path]) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for p in files:
        try:
            pf = pq.ParquetFile(p)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"cannot read parquet file {p} ({type(e).__name__}: {e}): expected a parquet file "
                             "of the Salesforce/wikitext dataset. Delete it and download it again.") from None
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"parquet file {p} has columns {pf.schema_arrow.names}, expected a 'text' column "
                             "(Salesforce/wikitext, wikitext-103-raw-v1)")
        try:
            for batch in pf.iter_batches(batch_size=8192, columns=["text"]):
                for t in batch.column(0).to_pylist():
                    yield t if t else " \n"
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"parquet file {p} is corrupt ({type(e).__name__}: {e}). "
                             "Delete it and download it again.") from None


def find_local_layout(local_dir: Path) -> tuple[str, dict[str, list[Path]]]:
    """Return ("raw" | "parquet", {split: [files]}) for a local WikiText directory, or raise ValueError."""
    if local_dir is None:
        raise ValueError(f"source 'local' needs local_dir (GT_WIKITEXT_DIR). {LOCAL_HINT}")
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ValueError(f"WikiText directory {local_dir} does not exist (GT_WIKITEXT_DIR). {LOCAL_HINT}")
    for sub in SUBDIRS:
        d = local_dir / sub
        if any((d / name).is_file() for name in RAW_FILES.values()):
            missing = [str(d / n) for n in RAW_FILES.values() if not (d / n).is_file()]
            if missing:
                raise ValueError(f"WikiText directory {d} lacks {', '.join(missing)}: all three of "
                                 f"{', '.join(RAW_FILES.values())} are needed. Unpack the whole wikitext-103-raw-v1.zip.")
            return "raw", {s: [d / n] for s, n in RAW_FILES.items()}
        found = {s: sorted(d.glob(f"{s}-*.parquet")) for s in SPLITS}
        if any(found.values()):
            missing = [f"{s}-*.parquet" for s, v in found.items() if not v]
            if missing:
                raise ValueError(f"WikiText directory {d} has parquet files but none matching {', '.join(missing)}: "
                                 "download all three splits of Salesforce/wikitext wikitext-103-raw-v1.")
            return "parquet", found
    raise ValueError(f"WikiText directory {local_dir} holds neither wiki.train.raw/wiki.valid.raw/wiki.test.raw nor "
                     f"train-*.parquet/validation-*.parquet/test-*.parquet. {LOCAL_HINT}")


def _hf_split_lines(hf_cache_dir: Path | None) -> dict[str, Iterator[str]]:
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"source 'hf' needs the `datasets` package ({e}): pip install datasets. {LOCAL_HINT}") from None
    name, config = HF_DATASET
    try:
        ds = datasets.load_dataset(name, config, cache_dir=str(hf_cache_dir) if hf_cache_dir else None)
    except Exception as e:  # network, offline mode, hub or cache errors all mean the same to the user
        raise RuntimeError(f"could not load {name} ({config}) from the Hugging Face Hub "
                           f"({type(e).__name__}: {e}). {LOCAL_HINT}") from e
    missing = [s for s in SPLITS if s not in ds]
    if missing:
        raise RuntimeError(f"{name} ({config}) has splits {list(ds)}, expected {SPLITS}. {LOCAL_HINT}")

    def lines(split: str) -> Iterator[str]:
        for batch in ds[split].iter(batch_size=8192):
            for t in batch["text"]:
                yield t if t else " \n"
    return {s: lines(s) for s in SPLITS}


def write_raw_corpus(source: str, out_dir: Path, *, local_dir: Path | None = None, hf_cache_dir: Path | None = None,
                     demo_seed: int = 0, demo_size_mb: float = 4.0) -> dict:
    """Write out_dir/{train,validation,test}.txt in WikiText raw format from `source` (hf | local | demo).

    Streams (never holds a split in memory). Returns {split: {"bytes", "documents", "lines"}}.
    Raises ValueError for an unknown source, a missing directory or split, an empty split or an unreadable
    parquet file, and RuntimeError when the HF Hub cannot be reached; each says how to fix it."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}: expected one of {SOURCES} (GT_DATA_SOURCE)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source == "demo":
        return demo.write_corpus(out_dir, seed=demo_seed, size_mb=demo_size_mb)
    if source == "local":
        layout, files = find_local_layout(local_dir)
        stats = {}
        for s in SPLITS:
            lines = _raw_lines(files[s][0]) if layout == "raw" else _parquet_lines(files[s])
            stats[s] = _write_lines(lines, out_dir / f"{s}.txt", ", ".join(map(str, files[s])))
        return stats
    per_split = _hf_split_lines(hf_cache_dir)
    return {s: _write_lines(per_split[s], out_dir / f"{s}.txt", f"{HF_DATASET[0]} split {s}") for s in SPLITS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write WikiText-103 raw splits as {split}.txt")
    ap.add_argument("source", choices=SOURCES)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--local-dir", type=Path, default=os.environ.get("GT_WIKITEXT_DIR"))
    ap.add_argument("--hf-cache-dir", type=Path)
    ap.add_argument("--demo-seed", type=int, default=0)
    ap.add_argument("--demo-size-mb", type=float, default=4.0)
    a = ap.parse_args(argv)
    print(json.dumps(write_raw_corpus(a.source, a.out_dir, local_dir=a.local_dir, hf_cache_dir=a.hf_cache_dir,
                                      demo_seed=a.demo_seed, demo_size_mb=a.demo_size_mb), indent=1))


if __name__ == "__main__":
    main()
