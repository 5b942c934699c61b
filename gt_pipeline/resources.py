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
from gt_pipeline.profiles import HOME_ENV, SOURCE_ENV, WIKITEXT_DIR_ENV, Profile, active_profile, get_profile
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

    name: str = Field(default="full", description="`full` (WikiText-103, 5M models) or `demo` (tiny, CPU); the "
                      "default shown is the profile active when the code location loaded")

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


def recorded_fingerprint(instance: dg.DagsterInstance, run_id: str | None, key: dg.AssetKey,
                         step_context: Any = None) -> tuple[str | None, str]:
    """The fingerprint (data version) of `key` that a step of run `run_id` belongs to, and where it came from.

    In order: the materialization of `key` in this run (a chain run binds every step to what it built);
    else the input data version Dagster records for this step's provenance (the latest materialization
    when the step started; for a check, the materialization it is attached to); else None (an instance
    that never saw `key`, e.g. a CLI run without DAGSTER_HOME).
    """
    if run_id is not None:
        conn = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, ascending=False)
        for rec in conn.records:
            ev = rec.event_log_entry.dagster_event
            if ev is not None and ev.asset_key == key:
                fp = _data_version(rec.event_log_entry)
                if fp:
                    return fp, f"materialized in this run ({run_id[:8]})"
    info = None
    if step_context is not None:
        info = step_context.maybe_fetch_and_get_input_asset_version_info(key)
    if info is not None and info.data_version is not None:
        return info.data_version.value, f"recorded materialization of run {info.run_id[:8]}"
    entry = instance.get_latest_materialization_event(key)
    if entry is not None and _data_version(entry):
        return _data_version(entry), f"latest materialization (run {entry.run_id[:8]})"
    return None, "no materialization recorded in this Dagster instance"


def _data_version(entry) -> str | None:
    mat = entry.asset_materialization
    if mat is None:
        return None
    fp = mat.tags.get("dagster/data_version") if mat.tags else None
    if not fp and "fingerprint" in mat.metadata:
        fp = mat.metadata["fingerprint"].value
    return fp


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Passes `Artifact` handles between assets and checks, resolved through lineage.

    Outputs are already published by the store when the asset returns, so storing only validates.
    Loading an input binds the step to the exact upstream fingerprint it belongs to (see
    `recorded_fingerprint`). Only when the Dagster instance has no record of the upstream (a CLI run
    without DAGSTER_HOME uses a throw-away instance) does it follow `<asset>/LATEST.json`, and it says so.
    """

    root: str = Field(description="Artifact store root (same as the `store` resource)")

    def handle_output(self, context: dg.OutputContext, obj: Artifact) -> None:
        if not isinstance(obj, Artifact):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, expected an Artifact")

    def load_input(self, context: dg.InputContext) -> Artifact:
        key = context.asset_key
        asset = key.path[-1]
        store = ArtifactStore(self.root)
        instance = step = None
        try:  # both are absent when the context was built outside a run (build_input_context)
            instance = context.instance
            step = context.step_context
        except dg.DagsterInvariantViolationError:
            pass
        fp, how = (None, "no Dagster instance") if instance is None else \
            recorded_fingerprint(instance, step.run_id if step is not None else None, key, step)
        if fp is None:
            art = store.latest(asset)
            context.log.info(f"{asset}: {how}; following LATEST.json -> {art.fingerprint}")
            return art
        art = store.get(asset, fp)
        if art is None:
            raise FileNotFoundError(
                f"{asset} {fp} ({how}) is not in the artifact store {store.root}: it was removed, or this run "
                f"uses another GT_HOME than the one that built it; re-materialize {asset} (e.g. `--select +{asset}`)"
            )
        context.log.info(f"{asset}: {fp} ({how})")
        return art


def make_source(name: str, profile: Profile, environ: Mapping[str, str]) -> WikiTextSource:
    if name == "hf":
        return HFWikiTextSource(cache_dir=environ.get("HF_DATASETS_CACHE"))
    if name == "local":
        return LocalWikiTextSource(directory=environ.get(WIKITEXT_DIR_ENV, ""))
    if name == "demo":
        return DemoWikiTextSource(size_mb=profile.demo_size_mb)
    raise ValueError(f"{SOURCE_ENV}={name!r} is not a data source; choose one of {list(SOURCES)}")


def resources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build every resource from the environment (GT_PROFILE, GT_DATA_SOURCE, GT_WIKITEXT_DIR, GT_HOME) and the
    store's recorded profile (see `gt_pipeline.profiles.active_profile`)."""
    env = os.environ if environ is None else environ
    root = str(Path(env.get(HOME_ENV, DEFAULT_HOME)).expanduser().resolve())
    profile, _ = active_profile(env, root)
    return {
        "store": StoreResource(root=root),
        "profile": ProfileResource(name=profile.name),
        "source": make_source(env.get(SOURCE_ENV, profile.data_source), profile, env),
        "io_manager": ArtifactIOManager(root=root),
    }
