"""Dagster resources: the artifact store, the run profile and the WikiText source.

`resources_from_env()` is the single place that reads GT_PROFILE, GT_DATA_SOURCE, GT_WIKITEXT_DIR and
GT_HOME (STYLE guideline 9); assets receive the resulting resources and never read the environment.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import dagster as dg
from pydantic import Field

import data
from gt_pipeline.profiles import HOME_ENV, PROFILE_ENV, SOURCE_ENV, WIKITEXT_DIR_ENV, Profile, get_profile
from gt_pipeline.store import Artifact, ArtifactStore

DEFAULT_HOME = ".gt"
SOURCES = ("hf", "local", "demo")


class StoreResource(dg.ConfigurableResource):
    """Where content-addressed artifacts live (`$GT_HOME`, default ./.gt)."""

    root: str = Field(description="Artifact store root; every asset writes $root/<asset>/<fingerprint>/")

    def get(self) -> ArtifactStore:
        return ArtifactStore(self.root)


class ProfileResource(dg.ConfigurableResource):
    """The run profile (`GT_PROFILE`): defaults for every config field left unset."""

    name: str = Field(default="full", description="`full` (WikiText-103, 5M models) or `demo` (tiny, CPU)")

    def get(self) -> Profile:
        return get_profile(self.name)


class WikiTextSource(dg.ConfigurableResource):
    """Where raw WikiText-103 comes from; subclasses for HF `datasets`, a local directory and the demo corpus."""

    def identity(self) -> dict[str, Any]:
        """What enters the raw corpus fingerprint: a change here means different text."""
        raise NotImplementedError

    def write_raw(self, out_dir: Path) -> dict[str, Any]:
        """Write `{split}.txt` for every split into out_dir; return per-split stats."""
        raise NotImplementedError


class HFWikiTextSource(WikiTextSource):
    cache_dir: str | None = Field(default=None, description="HF datasets cache dir (default: HF's own)")

    def identity(self) -> dict[str, Any]:
        return {"source": "hf", "dataset": "Salesforce/wikitext", "config": "wikitext-103-raw-v1"}

    def write_raw(self, out_dir: Path) -> dict[str, Any]:
        return data.write_raw_corpus("hf", out_dir, hf_cache_dir=Path(self.cache_dir) if self.cache_dir else None)


class LocalWikiTextSource(WikiTextSource):
    directory: str = Field(description="Directory with wiki.{train,valid,test}.raw or {train,validation,test}-*.parquet")

    def _dir(self) -> Path:
        if not self.directory:
            raise ValueError(
                f"GT_DATA_SOURCE=local needs {WIKITEXT_DIR_ENV}: set it to a directory holding wiki.train.raw, "
                "wiki.valid.raw, wiki.test.raw (or train-*.parquet, validation-*.parquet, test-*.parquet)"
            )
        return Path(self.directory).expanduser().resolve()

    def identity(self) -> dict[str, Any]:
        # Name, size and mtime of every input file: cheap, and any edit changes the fingerprint.
        d = self._dir()
        if not d.is_dir():
            raise ValueError(f"{WIKITEXT_DIR_ENV}={self.directory!r} is not a directory")
        files = sorted(p for p in d.iterdir() if p.is_file() and (p.suffix in (".raw", ".parquet")))
        return {
            "source": "local",
            "directory": str(d),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }

    def write_raw(self, out_dir: Path) -> dict[str, Any]:
        return data.write_raw_corpus("local", out_dir, local_dir=self._dir())


class DemoWikiTextSource(WikiTextSource):
    seed: int = Field(default=0, description="Seed of the generated demo corpus")
    size_mb: float = Field(default=3.0, description="Approximate size of the generated corpus in MB")

    def identity(self) -> dict[str, Any]:
        # The generator's source enters the fingerprint: editing it means a different corpus.
        generator = hashlib.sha256(Path(data.demo.__file__).read_bytes()).hexdigest()[:16]
        return {"source": "demo", "seed": self.seed, "size_mb": self.size_mb, "generator": generator}

    def write_raw(self, out_dir: Path) -> dict[str, Any]:
        return data.write_raw_corpus("demo", out_dir, demo_seed=self.seed, demo_size_mb=self.size_mb)


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Passes `Artifact` handles between assets through the store's LATEST pointers.

    Outputs are already published by the store when the asset returns, so storing is a no-op; loading
    follows `<asset>/LATEST.json`, which works without the Dagster database (a CLI run without
    DAGSTER_HOME uses a throw-away instance).
    """

    root: str = Field(description="Artifact store root (same as the `store` resource)")

    def handle_output(self, context: dg.OutputContext, obj: Artifact) -> None:
        if not isinstance(obj, Artifact):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, expected an Artifact")

    def load_input(self, context: dg.InputContext) -> Artifact:
        asset = context.upstream_output.asset_key.path[-1]
        return ArtifactStore(self.root).latest(asset)


def make_source(name: str, profile: Profile, environ: Mapping[str, str]) -> WikiTextSource:
    if name == "hf":
        return HFWikiTextSource(cache_dir=environ.get("HF_DATASETS_CACHE"))
    if name == "local":
        return LocalWikiTextSource(directory=environ.get(WIKITEXT_DIR_ENV, ""))
    if name == "demo":
        return DemoWikiTextSource(size_mb=profile.demo_size_mb)
    raise ValueError(f"{SOURCE_ENV}={name!r} is not a data source; choose one of {list(SOURCES)}")


def resources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build every resource from the environment (GT_PROFILE, GT_DATA_SOURCE, GT_WIKITEXT_DIR, GT_HOME)."""
    env = os.environ if environ is None else environ
    profile = get_profile(env.get(PROFILE_ENV, "full"))
    root = str(Path(env.get(HOME_ENV, DEFAULT_HOME)).expanduser().resolve())
    return {
        "store": StoreResource(root=root),
        "profile": ProfileResource(name=profile.name),
        "source": make_source(env.get(SOURCE_ENV, profile.data_source), profile, env),
        "io_manager": ArtifactIOManager(root=root),
    }
