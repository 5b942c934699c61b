"""GroundThink data library: WikiText-103 (HF, local files or a generated demo corpus) -> chunked
byte-level BPE -> uint16 token shards -> batches. Plain Python: never imports Dagster, and torch only
when a batch is built.

    import data
    data.write_raw_corpus("demo", raw_dir)                       # or "hf", or "local" with local_dir=
    data.train_bpe([raw_dir / "train.txt"], tok_dir / "tokenizer.json", vocab_size=4096)
    data.write_token_shards(tok_dir / "tokenizer.json", raw_dir, shard_dir)
    shards = data.TokenShards(shard_dir)
    tracks = data.StatefulTracks(shards.split("train"), shards.doc_starts("train"), 8, 64)

Command lines: python -m data.demo | data.sources | data.bpe | data.shards | data.bench (see each module).

Names are resolved lazily (PEP 562), so `import data` is cheap and `python -m data.<module>` runs
each module once.
"""
import importlib

SPLITS = ("train", "validation", "test")
EOT_TOKEN = "<|endoftext|>"

_EXPORTS = {
    "SOURCES": "data.sources", "write_raw_corpus": "data.sources", "iter_documents": "data.sources",
    "MAX_VOCAB": "data.bpe", "check_vocab_size": "data.bpe", "train_bpe": "data.bpe", "load_tokenizer": "data.bpe",
    "write_token_shards": "data.shards", "TokenShards": "data.shards",
    "random_windows": "data.batching", "StatefulTracks": "data.batching",
    "Fact": "data.demo",
}
_SUBMODULES = ("demo", "sources", "bpe", "shards", "batching", "bench")

__all__ = ["SPLITS", "EOT_TOKEN", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"data.{name}")
    else:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
