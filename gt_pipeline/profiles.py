"""Run profiles: the one place where `full` and `demo` differ.

The active profile is resolved once, when the definitions load (`active_profile`): `GT_PROFILE` if set,
else the profile the artifact store was last materialized with (`$GT_HOME/PROFILE`, written by every
asset), else `full`. So `make demo` followed by `make dev` (or a bare `dagster asset materialize`)
on the same store stays on `demo` without anyone repeating it, and the UI, the Launchpad defaults
and the CLI agree. Every asset config field left unset takes its value from the profile; run config
overrides single fields, or the whole profile (`resources: {profile: {config: {name: full}}}`).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

PROFILE_ENV = "GT_PROFILE"
SOURCE_ENV = "GT_DATA_SOURCE"
WIKITEXT_DIR_ENV = "GT_WIKITEXT_DIR"
HOME_ENV = "GT_HOME"
PROFILE_FILE = "PROFILE"  # in the store root: the profile its artifacts were last materialized with
DEFAULT_PROFILE = "full"


@dataclass(frozen=True)
class TrainDefaults:
    size: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    min_lr: float
    warmup_frac: float
    eval_every: int
    eval_batches: int
    checkpoint_every: int


@dataclass(frozen=True)
class ReportDefaults:
    eval_seqs: int  # validation windows (spread over the split) for ablation / state tests; units of the CIs
    eval_len: int  # tokens per window for ablation
    lc_lengths: tuple[int, ...]  # long-context curve: context lengths
    lc_seqs: int
    niah_lengths: tuple[int, ...]
    niah_depths: tuple[float, ...]
    niah_trials: int  # per (length, depth) cell and for the no-needle control; >= 20 for a usable CI
    overfit_steps: int


@dataclass(frozen=True)
class Profile:
    name: str
    data_source: str  # default for GT_DATA_SOURCE
    demo_size_mb: float  # size of the generated corpus when the source is `demo`
    vocab_size: int
    bpe_max_train_bytes: int | None  # None = train the tokenizer on the whole train split
    train: TrainDefaults = field(repr=False, default=None)  # type: ignore[assignment]
    reports: ReportDefaults = field(repr=False, default=None)  # type: ignore[assignment]
    description: str = ""


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        data_source="hf",
        demo_size_mb=8.0,
        vocab_size=16000,
        bpe_max_train_bytes=200_000_000,  # the merge phase keeps every distinct word: bound its memory (BENCHMARKS.md)
        train=TrainDefaults(
            size="5m", steps=5000, batch_size=64, seq_len=512, lr=3e-4, min_lr=3e-5, warmup_frac=0.1,
            eval_every=100, eval_batches=20, checkpoint_every=500,
        ),
        reports=ReportDefaults(
            eval_seqs=64, eval_len=512, lc_lengths=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), lc_seqs=8,
            niah_lengths=(1024, 2048, 4096, 8192, 16384), niah_depths=(0.0, 0.25, 0.5, 0.75, 1.0), niah_trials=20,
            overfit_steps=500,
        ),
        description="the seeds' setup: WikiText-103, BPE 16K, 5M-class models, GPU if present",
    ),
    "demo": Profile(
        name="demo",
        data_source="demo",
        demo_size_mb=3.0,
        vocab_size=4096,
        bpe_max_train_bytes=None,
        train=TrainDefaults(
            size="demo", steps=300, batch_size=8, seq_len=64, lr=2e-3, min_lr=2e-4, warmup_frac=0.1,
            eval_every=50, eval_batches=4, checkpoint_every=100,
        ),
        reports=ReportDefaults(
            eval_seqs=16, eval_len=128, lc_lengths=(64, 128, 256, 512, 1024), lc_seqs=4,
            niah_lengths=(128, 512), niah_depths=(0.0, 0.5, 1.0), niah_trials=20, overfit_steps=300,
        ),
        description="embedded corpus, tiny models; the whole chain finishes on 2 CPU cores in minutes",
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"{PROFILE_ENV}={name!r} is not a profile; choose one of {sorted(PROFILES)}"
        ) from None


def stored_profile(home: str | os.PathLike[str]) -> str | None:
    """The profile recorded in the store at `home`, None if it has none (a new store)."""
    p = Path(home) / PROFILE_FILE
    if not p.is_file():
        return None
    name = p.read_text().strip()
    get_profile(name)  # a hand-edited file with a bad name fails here, naming the choices
    return name


def active_profile(environ: Mapping[str, str], home: str | os.PathLike[str]) -> tuple[Profile, str]:
    """(profile, why): GT_PROFILE, else the store's recorded profile, else `full`."""
    if environ.get(PROFILE_ENV):
        return get_profile(environ[PROFILE_ENV]), f"{PROFILE_ENV}={environ[PROFILE_ENV]}"
    stored = stored_profile(home)
    if stored is not None:
        return get_profile(stored), f"the store's profile ({Path(home) / PROFILE_FILE})"
    return get_profile(DEFAULT_PROFILE), f"default ({PROFILE_ENV} unset, no {PROFILE_FILE} in {home})"


def record_store_profile(home: str | os.PathLike[str], name: str) -> None:
    """Remember `name` as the store's profile (atomic; a no-op when it is already recorded)."""
    p = Path(home) / PROFILE_FILE
    if p.is_file() and p.read_text().strip() == name:
        return
    tmp = p.with_name(f".{PROFILE_FILE}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(name + "\n")
    os.replace(tmp, p)
