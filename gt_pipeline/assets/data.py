"""Data assets: raw WikiText-103 -> chunked BPE tokenizer -> uint16 token shards.

Each asset resolves its config against the profile, hashes it into a fingerprint, and asks the store
for that artifact, building it with one `data` library call on a miss.
"""


import time
from pathlib import Path

import dagster as dg
from pydantic import Field

import data
from gt_pipeline.assets.common import OWNER, artifact_output, md_table
from gt_pipeline.engine.progress import Progress
from gt_pipeline.resources import ProfileResource, StoreResource, WikiTextSource
from gt_pipeline.store import Artifact, fingerprint
from gt_pipeline.versions import code_version

GROUP = "data"
# Derived from the data library's sources (gt_pipeline.versions.DEPENDS)
RAW_VERSION = code_version("wikitext103_raw")
BPE_VERSION = code_version("bpe_tokenizer")
SHARDS_VERSION = code_version("token_shards")


class RawCorpusConfig(dg.Config):
    force: bool = Field(default=False, description="Rebuild even when a verified cached copy exists")


class BpeTokenizerConfig(dg.Config):
    vocab_size: int | None = Field(default=None, description="BPE vocabulary incl. <|endoftext|> (profile: 16000 full, 4096 demo); at most 65535 (uint16 shards)")
    min_frequency: int = Field(default=2, description="Minimum pair frequency for a merge")
    max_train_bytes: int | None = Field(default=None, description="Train on at most this many bytes of the train split (None = profile default: all)")
    force: bool = Field(default=False, description="Rebuild even when a verified cached copy exists")


class TokenShardsConfig(dg.Config):
    num_workers: int = Field(default=2, description="Encoding threads/processes")
    force: bool = Field(default=False, description="Rebuild even when a verified cached copy exists")


@dg.asset(
    group_name=GROUP,
    kinds={"huggingface"},
    owners=[OWNER],
    tags={"stage": "data"},
    code_version=RAW_VERSION,
)
def wikitext103_raw(
    context: dg.AssetExecutionContext, config: RawCorpusConfig, profile: ProfileResource, store: StoreResource,
    source: WikiTextSource,
) -> dg.Output[Artifact]:
    """Raw WikiText-103 text per split (train/validation/test) in the official wiki.*.raw format,
    from the configured source (GT_DATA_SOURCE = hf | local | demo). Articles keep their boundaries."""
    identity = source.identity()
    fp = fingerprint("wikitext103_raw", RAW_VERSION, identity)
    context.log.info(f"source {identity.get('source')}: fingerprint {fp}")
    result = store.get().build(
        "wikitext103_raw", fp, lambda d: {"splits": source.write_raw(d)},
        inputs={"source": identity}, force=config.force, on_event=context.log.warning,
    )
    splits = result.artifact.metadata["splits"]
    rows = [{"split": s, **v} for s, v in splits.items()]
    sample = _first_lines(result.artifact.path / "train.txt", 12)
    preview = md_table(rows) + "\n\n**train.txt, first lines**\n\n```\n" + sample + "\n```"
    return artifact_output(
        context, result, profile=profile.name,
        headline={
            "bytes": sum(v["bytes"] for v in splits.values()),
            "documents": sum(v["documents"] for v in splits.values()),
            "train_bytes": splits["train"]["bytes"],
            "source": identity.get("source", "?"),
        },
        preview_md=preview,
    )


@dg.asset(
    group_name=GROUP,
    kinds={"huggingface"},
    owners=[OWNER],
    tags={"stage": "data"},
    code_version=BPE_VERSION,
)
def bpe_tokenizer(
    context: dg.AssetExecutionContext,
    config: BpeTokenizerConfig,
    profile: ProfileResource,
    store: StoreResource,
    wikitext103_raw: Artifact,
) -> dg.Output[Artifact]:
    """Byte-level BPE (HF `tokenizers`, tokenizer.json) trained chunk by chunk on the train split,
    with an <|endoftext|> special token between documents."""
    prof = profile.get()
    resolved = {
        "vocab_size": config.vocab_size or prof.vocab_size,
        "min_frequency": config.min_frequency,
        "max_train_bytes": config.max_train_bytes if config.max_train_bytes is not None else prof.bpe_max_train_bytes,
    }
    data.check_vocab_size(resolved["vocab_size"])  # fail before any compute: shards hold uint16 ids
    fp = fingerprint("bpe_tokenizer", BPE_VERSION, resolved, {"wikitext103_raw": wikitext103_raw.fingerprint})

    def build(d: Path) -> dict:
        context.log.info(f"training BPE vocab {resolved['vocab_size']} on {wikitext103_raw.path / 'train.txt'}")
        p = Progress("bpe: reading text", 1, context.log.info, unit="B")
        out = data.train_bpe([wikitext103_raw.file("train.txt")], d / "tokenizer.json", **resolved, progress=p)
        p.finish()
        return out

    result = store.get().build(
        "bpe_tokenizer", fp, build, inputs={"config": resolved, "wikitext103_raw": wikitext103_raw.fingerprint},
        force=config.force, on_event=context.log.warning,
    )
    meta = result.artifact.metadata
    return artifact_output(
        context, result, profile=prof.name,
        headline={"vocab_size": int(meta["vocab_size"]), "train_bytes": int(meta.get("train_bytes", 0)),
                  "eot_id": int(meta["eot_id"])},
        preview_md=_tokenizer_preview(result.artifact.path / "tokenizer.json", wikitext103_raw.path / "validation.txt"),
    )


@dg.asset(
    group_name=GROUP,
    kinds={"python"},
    owners=[OWNER],
    tags={"stage": "data"},
    code_version=SHARDS_VERSION,
)
def token_shards(
    context: dg.AssetExecutionContext,
    config: TokenShardsConfig,
    profile: ProfileResource,
    store: StoreResource,
    wikitext103_raw: Artifact,
    bpe_tokenizer: Artifact,
) -> dg.Output[Artifact]:
    """uint16 token shards per split ({split}.bin, memory-mappable) with document start offsets and a
    manifest (token counts, documents, sha256); EOT between documents."""
    if config.num_workers < 1:
        raise ValueError(f"token_shards.num_workers must be >= 1, got {config.num_workers}")
    upstream = {"wikitext103_raw": wikitext103_raw.fingerprint, "bpe_tokenizer": bpe_tokenizer.fingerprint}
    # num_workers changes speed, not content: it stays out of the fingerprint.
    fp = fingerprint("token_shards", SHARDS_VERSION, {}, upstream)

    def build(d: Path) -> dict:
        t0 = time.perf_counter()
        p = Progress("tokenize", 1, context.log.info, unit="B")
        manifest = data.write_token_shards(
            bpe_tokenizer.file("tokenizer.json"), wikitext103_raw.path, d, num_workers=config.num_workers, progress=p
        )
        p.finish()
        context.log.info(f"sharded in {time.perf_counter() - t0:.1f}s")
        return {"shards": manifest}

    result = store.get().build("token_shards", fp, build, inputs=upstream, force=config.force,
                               on_event=context.log.warning)
    shards = result.artifact.metadata["shards"]
    splits = shards["splits"]
    rows = [
        {"split": s, "tokens": v["tokens"], "documents": v["documents"], "bytes": v["bytes"],
         "tokens/byte": v["tokens_per_byte"]}
        for s, v in splits.items()
    ]
    total_tokens = sum(v["tokens"] for v in splits.values())
    total_bytes = sum(v["bytes"] for v in splits.values())
    return artifact_output(
        context, result, profile=profile.name,
        headline={
            "tokens": total_tokens,
            "train_tokens": splits["train"]["tokens"],
            "documents": sum(v["documents"] for v in splits.values()),
            "tokens_per_byte": round(total_tokens / max(total_bytes, 1), 4),
            "vocab_size": int(shards["vocab_size"]),
        },
        preview_md=md_table(rows),
    )


def _first_lines(path: Path, n: int) -> str:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(line.rstrip("\n")[:160])
            if len(out) >= n:
                break
    return "\n".join(out)


def _tokenizer_preview(tok_path: Path, text_path: Path) -> str:
    tok = data.load_tokenizer(tok_path)
    sample = " ".join(_first_lines(text_path, 3).split("\n"))[:300] or "The quick brown fox."
    enc = tok.encode(sample)
    pieces = " ".join(f"`{t}`" for t in enc.tokens[:60])
    return (f"**Sample** ({len(sample.encode())} bytes -> {len(enc.ids)} tokens)\n\n> {sample}\n\n{pieces}")
