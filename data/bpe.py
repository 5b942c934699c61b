"""Byte-level BPE (HF `tokenizers`) trained chunk by chunk, with one `<|endoftext|>` special token.

Why chunked: the seeds read all 540 MB of WikiText-103 into one string and tokenised it in one call
(~5.3 GB, it crashed). Here the trainer is fed by a generator of whole-line text chunks of about
`chunk_bytes`; the Rust trainer only keeps word counts (distinct pre-tokens x frequency), so memory
grows with the corpus's vocabulary, not its size. `train_from_iterator` buffers up to 256 items of
the iterator, so the default chunk_bytes=64 KiB bounds the text in flight to ~16 MiB (measured on
40 MB of demo text: peak RSS 352 MB with 1 MiB chunks, 180 MB with 64 KiB, same speed). The merge
phase still keeps every distinct word: ~1.7 GB for a 540 MB corpus with ~1.6M of them, so large
corpora train on an evenly spread sample (`max_train_bytes`, e.g. 200 MB: 0.7 GB); see
BENCHMARKS_data.md.

Design: GPT-2-style byte-level pre-tokenizer (no prefix space, so `decode(encode(t)) == t` for any
UTF-8 text) and decoder, no normalizer, all 256 byte symbols in the initial alphabet (no unknown
token ever), the EOT token first so its id is 0. No post-processor: EOT is inserted between
documents by the shard writer, not by `encode`.

    python -m data.bpe OUT/tokenizer.json TEXT [TEXT ...] [--vocab-size 16000] [--max-train-bytes N]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from data import EOT_TOKEN
# Token ids are stored as uint16 in the shards. The project caps the vocabulary at 65535 (the same
# bound the Dagster config validates), which keeps every id, with room to spare, inside uint16.
MAX_VOCAB = 65535
MIN_VOCAB = 257  # 256 byte symbols + EOT


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too large: token shards store ids as uint16, so the vocabulary "
                         f"must be at most {MAX_VOCAB}. Use a smaller vocab_size (the seeds used 16000).")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs the 256 byte symbols plus "
                         f"{EOT_TOKEN}, so at least {MIN_VOCAB}.")


def iter_text_chunks(text_files: list[Path], chunk_bytes: int, max_bytes: int | None = None) -> Iterator[str]:
    """Whole-line chunks of about chunk_bytes (UTF-8 bytes) over the files, in order.

    With max_bytes below the files' total size, a deterministic sample spread evenly over all the
    files (not just their beginning): a chunk is kept while the kept bytes lag max_bytes/total of the
    bytes read so far, and never beyond max_bytes. Chunks are then at most max_bytes / 64 so that the
    sample is fine-grained."""
    total = sum(Path(p).stat().st_size for p in text_files)
    sampled = max_bytes is not None and max_bytes < total
    if sampled:
        chunk_bytes = max(1, min(chunk_bytes, max_bytes // 64))
    ratio = max_bytes / total if sampled else 1.0
    kept = read = 0
    for path in text_files:
        buf: list[str] = []
        size = 0
        with open(path, encoding="utf-8", newline="") as f:
            for line in f:
                buf.append(line)
                size += len(line.encode("utf-8"))
                if size >= chunk_bytes:
                    read += size
                    if not sampled or (kept + size <= max_bytes and kept < ratio * read):
                        kept += size
                        yield "".join(buf)
                    buf, size = [], 0
        if buf:
            read += size
            if not sampled or (kept + size <= max_bytes and kept < ratio * read):
                kept += size
                yield "".join(buf)


def new_tokenizer():
    """An untrained byte-level BPE tokenizer with this project's settings (shared with the bench peer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def new_trainer(vocab_size: int, min_frequency: int):
    from tokenizers import pre_tokenizers, trainers

    return trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )


def train_bpe(text_files: list[Path], out_path: Path, *, vocab_size: int = 16000, min_frequency: int = 2,
              chunk_bytes: int = 1 << 16, max_train_bytes: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """Train a byte-level BPE on text_files (streamed in chunks) and write tokenizer.json atomically.

    Args:
        text_files: UTF-8 text files (e.g. [raw_dir / "train.txt"]), read in order.
        out_path: where tokenizer.json goes (temp name + os.replace; parents created).
        vocab_size: final vocabulary including the 256 byte symbols and EOT; 257..65535.
        min_frequency: a pair must occur this often to be merged.
        chunk_bytes: size of the text pieces handed to the trainer (x 256 = text in flight).
        max_train_bytes: train on a sample of at most this many bytes, spread evenly over the text
            (None: everything). Bounds the trainer's memory, which grows with the distinct words seen.
        progress: called as progress(bytes_read, bytes_to_read) as the text is streamed into the trainer
            (the merge phase that follows reading is not metered).
    Returns {"vocab_size", "train_bytes", "seconds", "eot_id", "corpus_bytes"}.
    """
    check_vocab_size(vocab_size)
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if max_train_bytes is not None and max_train_bytes < 1:
        raise ValueError(f"max_train_bytes must be None (all) or >= 1, got {max_train_bytes}")
    files = [Path(p) for p in text_files]
    if not files:
        raise ValueError("train_bpe needs at least one text file, got none")
    for p in files:
        if not p.is_file():
            raise ValueError(f"training text {p} does not exist: expected a {{split}}.txt from write_raw_corpus")
    t0 = time.perf_counter()
    seen = 0
    corpus = sum(p.stat().st_size for p in files)
    to_read = corpus if max_train_bytes is None else min(corpus, max_train_bytes)

    def chunks() -> Iterator[str]:
        nonlocal seen
        for c in iter_text_chunks(files, chunk_bytes, max_train_bytes):
            seen += len(c.encode("utf-8"))
            if progress is not None and to_read > 0:
                progress(min(seen, to_read), to_read)
            yield c

    tok = new_tokenizer()
    tok.train_from_iterator(chunks(), trainer=new_trainer(vocab_size, min_frequency))
    if seen == 0:
        raise ValueError(f"training text {', '.join(map(str, files))} is empty: nothing to learn a BPE from")
    eot_id = tok.token_to_id(EOT_TOKEN)
    assert eot_id is not None, "EOT must be in the vocabulary (it is a trainer special token)"
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out_path)
    return {"vocab_size": tok.get_vocab_size(), "train_bytes": seen, "seconds": round(time.perf_counter() - t0, 3),
            "eot_id": eot_id, "corpus_bytes": sum(p.stat().st_size for p in files)}


def load_tokenizer(path: Path):
    """Load a tokenizer.json written by train_bpe, checking that it has the EOT token and fits uint16."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no tokenizer at {path}: expected a tokenizer.json written by train_bpe")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
        raise ValueError(f"cannot load tokenizer {path} ({e}): expected a tokenizer.json written by train_bpe; "
                         "delete it and train again") from None
    if tok.token_to_id(EOT_TOKEN) is None:
        raise ValueError(f"tokenizer {path} has no {EOT_TOKEN} token: documents could not be separated. "
                         "Train it with data.train_bpe.")
    if tok.get_vocab_size() > MAX_VOCAB:
        raise ValueError(f"tokenizer {path} has {tok.get_vocab_size()} tokens, more than the {MAX_VOCAB} that uint16 "
                         "shards allow. Train one with a smaller vocab_size.")
    return tok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a byte-level BPE chunk by chunk")
    ap.add_argument("out", type=Path)
    ap.add_argument("texts", type=Path, nargs="+")
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--max-train-bytes", type=int)
    a = ap.parse_args(argv)
    print(json.dumps(train_bpe(a.texts, a.out, vocab_size=a.vocab_size, min_frequency=a.min_frequency,
                               max_train_bytes=a.max_train_bytes)))


if __name__ == "__main__":
    main()
