"""Token shards: each split encoded once into a flat uint16 memmap, read back by slicing (nanoGPT style).

Layout of a shards directory (the manifest is written last; without it the directory does not count):

    {split}.bin        uint16 token ids: doc_0, EOT, doc_1, EOT, ... (an EOT after every document)
    {split}.docs.npy   int64 [documents]: offset of each document's first token in {split}.bin
    shards.json        format version, dtype, vocab size, EOT id, per-split counts, sha256 of every file

Encoding is bounded: documents are streamed from {split}.txt (data.sources.iter_documents) and
encoded in batches of at most `batch_docs` documents / `batch_bytes` bytes; at most two batches per
worker are in flight, and finished batches are appended to the .bin (and hashed) in order.
Both cores: `encode_batch_fast` runs in Rust on tokenizers' rayon thread pool (all cores; set
RAYON_NUM_THREADS to cap it) with the GIL released, and `num_workers` Python threads keep it fed:
while one batch is in Rust, another thread turns the previous result into uint16 arrays. Threads,
not processes: no spawn start-up, no pickling of text, and no `if __name__ == "__main__"` trap for
callers' scripts. Literal "<|endoftext|>" text in a document is encoded as text, never as EOT.

    python -m data.shards TOKENIZER.json RAW_DIR OUT_DIR [--num-workers 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from data.bpe import EOT_TOKEN, load_tokenizer
from data.sources import SPLITS, iter_documents

FORMAT = "groundthink-token-shards"
FORMAT_VERSION = 1
DTYPE = "uint16"
MANIFEST = "shards.json"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------------------ encoding
def _encode_docs(tok, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens uint16 [sum(len_i + 1)] = doc_0 EOT doc_1 EOT ..., lengths int64 [n] incl. the EOT)."""
    encs = tok.encode_batch_fast(docs, add_special_tokens=False)  # Rust, GIL released, all cores
    eot = np.array([tok.token_to_id(EOT_TOKEN)], dtype=np.uint16)
    parts = []
    lengths = np.empty(len(encs), dtype=np.int64)
    for i, e in enumerate(encs):
        ids = np.array(e.ids, dtype=np.uint16)  # (len_i,)
        parts += [ids, eot]
        lengths[i] = len(ids) + 1
    return np.concatenate(parts), lengths


def _batches(docs: Iterable[str], batch_docs: int, batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)  # characters: close enough to bytes for bounding memory
        if len(batch) >= batch_docs or size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _SplitWriter:
    """Appends encoded batches to {split}.bin.tmp, hashing as it goes, and records document starts."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.tokens = 0
        self.starts: list[np.ndarray] = []

    def add(self, result: tuple[np.ndarray, np.ndarray]) -> None:
        toks, lengths = result
        buf = toks.tobytes()
        self.f.write(buf)
        self.sha.update(buf)
        self.starts.append(self.tokens + np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64))
        self.tokens += int(lengths.sum())

    def close(self) -> None:
        self.f.close()

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _encode_split(tok, src: Path, writer: _SplitWriter, pool: ThreadPoolExecutor, in_flight: int,
                  batch_docs: int, batch_bytes: int, on_batch: Callable[[int], None] | None = None) -> None:
    pending: deque[Future] = deque()
    for batch in _batches(iter_documents(src), batch_docs, batch_bytes):
        pending.append(pool.submit(_encode_docs, tok, batch))
        if on_batch is not None:
            on_batch(sum(len(d.encode("utf-8")) for d in batch))
        while len(pending) >= in_flight:
            writer.add(pending.popleft().result())
    while pending:
        writer.add(pending.popleft().result())


def write_token_shards(tokenizer_path: Path, raw_dir: Path, out_dir: Path, *, num_workers: int = 2,
                       batch_docs: int = 1000, batch_bytes: int = 1 << 20,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode raw_dir/{split}.txt with the tokenizer into out_dir/{split}.bin + {split}.docs.npy + shards.json.

    Args:
        tokenizer_path: tokenizer.json from train_bpe (must contain <|endoftext|>, vocab <= 65535).
        raw_dir: directory with train.txt, validation.txt, test.txt (write_raw_corpus).
        out_dir: created if needed; an existing shards.json there is removed first, so a directory
            left by an interrupted run never looks complete.
        num_workers: batches encoded concurrently (threads feeding the Rust encoder; 2 keeps 2 cores busy).
        batch_docs, batch_bytes: bounds of one encoding batch. At most 2 * num_workers batches are in
            flight, and a batch's Encoding objects cost ~70 bytes per token (~15 MB per 1 MiB of text),
            so memory stays around 60 MB whatever the corpus size.
        progress: called as progress(bytes_done, bytes_total) over all splits' raw text as batches are
            handed to the encoder, and with each split's end offset when it is written.
    Returns the manifest written to shards.json:
        {"format", "format_version", "dtype", "vocab_size", "eot_id", "eot_token", "tokenizer_sha256",
         "splits": {split: {"tokens", "documents", "bytes", "tokens_per_byte", "file", "docs_file"}},
         "files": {name: {"bytes", "sha256"}}}
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if batch_docs < 1 or batch_bytes < 1:
        raise ValueError(f"batch_docs and batch_bytes must be >= 1, got {batch_docs}, {batch_bytes}")
    tokenizer_path, raw_dir, out_dir = Path(tokenizer_path), Path(raw_dir), Path(out_dir)
    tok = load_tokenizer(tokenizer_path)  # validates EOT and the uint16 bound before any work
    vocab_size, eot_id = tok.get_vocab_size(), tok.token_to_id(EOT_TOKEN)
    sources = {s: raw_dir / f"{s}.txt" for s in SPLITS}
    for s, p in sources.items():
        if not p.is_file():
            raise ValueError(f"raw split file {p} does not exist: expected {', '.join(f'{x}.txt' for x in SPLITS)} "
                             f"in {raw_dir} (write them with data.write_raw_corpus)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete from here on

    tok.encode_special_tokens = True  # document text that spells <|endoftext|> stays text
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="gt-encode")
    splits, files = {}, {}
    total_bytes, done_bytes = sum(p.stat().st_size for p in sources.values()), 0

    def on_batch(n: int) -> None:
        nonlocal done_bytes
        done_bytes += n
        progress(min(done_bytes, total_bytes), total_bytes)

    try:
        for s, src in sources.items():
            writer = _SplitWriter(out_dir / f"{s}.bin")
            split_end = done_bytes + src.stat().st_size
            try:
                _encode_split(tok, src, writer, pool, 2 * num_workers, batch_docs, batch_bytes,
                              on_batch if progress is not None else None)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            if writer.tokens == 0:
                writer.abort()
                raise ValueError(f"split {s!r} ({src}) has no documents: expected WikiText articles. "
                                 "Rebuild the raw corpus (write_raw_corpus) or check the source files.")
            os.replace(writer.tmp, writer.path)
            files[writer.path.name] = {"bytes": writer.tokens * 2, "sha256": writer.sha.hexdigest()}
            starts = np.concatenate(writer.starts)
            docs_path = out_dir / f"{s}.docs.npy"
            tmp = docs_path.with_name(f"{s}.docs.tmp{os.getpid()}.npy")
            np.save(tmp, starts)
            os.replace(tmp, docs_path)
            files[docs_path.name] = {"bytes": docs_path.stat().st_size, "sha256": sha256_file(docs_path)}
            n_bytes = src.stat().st_size
            if progress is not None:
                done_bytes = split_end  # documents drop separators: count the whole file as done
                progress(done_bytes, total_bytes)
            splits[s] = {"tokens": writer.tokens, "documents": int(len(starts)), "bytes": n_bytes,
                         "tokens_per_byte": round(writer.tokens / max(n_bytes, 1), 4),
                         "file": writer.path.name, "docs_file": docs_path.name}
    finally:
        pool.shutdown(cancel_futures=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": DTYPE, "vocab_size": vocab_size,
                "eot_id": eot_id, "eot_token": EOT_TOKEN, "tokenizer_sha256": sha256_file(tokenizer_path),
                "splits": splits, "files": files}
    tmp = out_dir / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)  # last: from now on the directory counts
    return manifest


# ------------------------------------------------------------------------------------- reading
class TokenShards:
    """Read-only view of a shards directory: validates shards.json, then memory-maps the splits.

    `verify=True` (default) also checks every file's sha256 and the document offsets (a few seconds
    for WikiText-103's ~250 MB); `verify=False` checks presence and sizes only.

        shards = TokenShards(dir)
        train = shards.split("train")          # np.memmap uint16 [tokens]
        starts = shards.doc_starts("train")    # np.ndarray int64 [documents]
    """

    def __init__(self, path: Path, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise ValueError(f"{self.path} has no {MANIFEST}: the shards are missing or were not finished. "
                             "Run data.write_token_shards (or materialize token_shards) again.")
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath} is not valid JSON ({e}): rebuild the shards") from None
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION or m.get("dtype") != DTYPE:
            raise ValueError(f"{mpath} has format {m.get('format')!r} v{m.get('format_version')} dtype {m.get('dtype')!r}, "
                             f"expected {FORMAT!r} v{FORMAT_VERSION} {DTYPE!r}: rebuild the shards with this version")
        self.manifest = m
        for name, info in m["files"].items():
            p = self.path / name
            if not p.is_file():
                raise ValueError(f"shard file {p} listed in {MANIFEST} is missing: rebuild the shards")
            if p.stat().st_size != info["bytes"]:
                raise ValueError(f"shard file {p} has {p.stat().st_size} bytes, the manifest says {info['bytes']} "
                                 "(truncated or overwritten): rebuild the shards")
            if verify and sha256_file(p) != info["sha256"]:
                raise ValueError(f"shard file {p} does not match the sha256 in {MANIFEST} (corrupted or tampered): "
                                 "rebuild the shards")
        for s, info in m["splits"].items():
            if m["files"][info["file"]]["bytes"] != 2 * info["tokens"]:
                raise ValueError(f"{MANIFEST} is inconsistent: {info['file']} should hold {info['tokens']} uint16 tokens")
            if verify:
                self._check_docs(s)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.manifest["eot_id"])

    def _info(self, name: str) -> dict:
        if name not in self.manifest["splits"]:
            raise ValueError(f"unknown split {name!r}: {self.path} has {self.splits}")
        return self.manifest["splits"][name]

    def split(self, name: str) -> np.memmap:
        """Token ids of one split, memory-mapped read-only: uint16 [tokens]."""
        info = self._info(name)
        return np.memmap(self.path / info["file"], dtype=np.uint16, mode="r", shape=(info["tokens"],))

    def doc_starts(self, name: str) -> np.ndarray:
        """Offset of each document's first token in split(name): int64 [documents], increasing, [0] == 0."""
        return np.load(self.path / self._info(name)["docs_file"])

    def _check_docs(self, name: str) -> None:
        info, starts, toks = self._info(name), self.doc_starts(name), self.split(name)
        ok = (starts.ndim == 1 and starts.dtype == np.int64 and len(starts) == info["documents"] and len(starts) > 0
              and starts[0] == 0 and bool(np.all(np.diff(starts) > 0)) and starts[-1] < info["tokens"]
              and toks[-1] == self.eot_id and bool(np.all(toks[starts[1:] - 1] == self.eot_id)))
        if not ok:
            raise ValueError(f"document offsets of split {name!r} in {self.path} do not match its tokens "
                             "(each document must follow an EOT): rebuild the shards")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Encode raw splits into uint16 token shards")
    ap.add_argument("tokenizer", type=Path)
    ap.add_argument("raw_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--num-workers", type=int, default=2)
    a = ap.parse_args(argv)
    print(json.dumps(write_token_shards(a.tokenizer, a.raw_dir, a.out_dir, num_workers=a.num_workers), indent=1))


if __name__ == "__main__":
    main()
