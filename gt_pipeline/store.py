"""Content-addressed artifact store: the caching layer of every expensive asset.

Layout under the store root (``$GT_HOME``, default ``./.gt``)::

    <asset>/<fingerprint>/            payload files + manifest.json (written last, then the dir is renamed in)
    <asset>/<fingerprint>.lock        file lock: one builder per fingerprint, across processes
    <asset>/<fingerprint>.work/       scratch that survives a crash (training checkpoints), for resume
    <asset>/.tmp-<fingerprint>-<id>/  a build in progress; never read, removed by the next builder
    <asset>/.quarantine/              corrupt directories moved aside (kept for inspection, never used)
    <asset>/LATEST.json               pointer to the fingerprint of the newest successful build

LATEST is a convenience for people and for runs that have no lineage to follow (a CLI run without
DAGSTER_HOME): it moves when a build publishes a directory, never on a cache hit, so a run that hits
an older fingerprint cannot move it back. Runs with a Dagster instance resolve their inputs through
the recorded data versions instead (`gt_pipeline.resources.ArtifactIOManager`).

A directory counts only if its ``manifest.json`` lists the sha256 and size of every file in it and the
files match. The fingerprint is a hash of the asset's code version, its resolved config, its upstream
fingerprints and (for compiled or device-dependent assets) the toolchain, so it doubles as the Dagster
data version. This module knows nothing about Dagster.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
log = logging.getLogger(__name__)
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS or filesystem lacks it."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(
    asset: str,
    code_version: str,
    config: dict[str, Any],
    upstream: dict[str, str] | None = None,
    env: dict[str, Any] | None = None,
) -> str:
    """Hash of everything that determines an asset's content (16 hex chars).

    ``config`` holds only fields that change the result; ``upstream`` maps upstream asset names to
    their fingerprints, so keys chain like a Merkle tree.
    """
    payload = {
        "asset": asset,
        "code_version": code_version,
        "config": config,
        "upstream": dict(sorted((upstream or {}).items())),
        "env": env or {},
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside ``path``, fsync, then ``os.replace``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CorruptArtifactError(RuntimeError):
    """A published directory whose files do not match its manifest."""


@dataclass(frozen=True)
class Artifact:
    """A published, verified artifact directory."""

    asset: str
    fingerprint: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def metadata(self) -> dict[str, Any]:
        """What the builder returned when the artifact was made (metrics shown again on cache hits)."""
        return self.manifest.get("metadata", {})

    @property
    def inputs(self) -> dict[str, Any]:
        return self.manifest.get("inputs", {})

    def file(self, name: str) -> Path:
        p = self.path / name
        if not p.exists():
            raise FileNotFoundError(f"{self.asset} artifact {self.fingerprint} has no file {name!r} ({self.path})")
        return p


@dataclass
class BuildResult:
    artifact: Artifact
    cache_hit: bool
    seconds: float
    quarantined: Path | None = None  # set when a corrupt directory was found and moved aside


def verify_dir(path: Path) -> dict[str, Any]:
    """Check a published directory against its manifest; return the manifest or raise CorruptArtifactError."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CorruptArtifactError(f"{path} has no {MANIFEST} (an interrupted or foreign write)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptArtifactError(f"{mpath} is not valid JSON: {exc}") from exc
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptArtifactError(f"{mpath} lists no files")
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    missing = sorted(set(files) - on_disk)
    extra = sorted(on_disk - set(files))
    if missing or extra:
        raise CorruptArtifactError(f"{path}: files missing {missing[:5]} / unexpected {extra[:5]} vs manifest")
    for rel, entry in files.items():
        p = path / rel
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise CorruptArtifactError(f"{p}: {size} bytes on disk, manifest says {entry['bytes']}")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise CorruptArtifactError(f"{p}: sha256 {digest[:12]}... does not match manifest {entry['sha256'][:12]}...")
    return manifest


class ArtifactStore:
    """Publishes and finds artifacts under ``root``; safe across concurrent processes."""

    def __init__(self, root: str | os.PathLike[str], lock_timeout_s: float = 6 * 3600):
        self.root = Path(root).expanduser().resolve()
        self.lock_timeout_s = lock_timeout_s

    # ---- paths -------------------------------------------------------------------------------
    def asset_dir(self, asset: str) -> Path:
        return self.root / asset

    def path_for(self, asset: str, fp: str) -> Path:
        return self.asset_dir(asset) / fp

    def work_dir(self, asset: str, fp: str) -> Path:
        """Persistent scratch for one fingerprint (checkpoints for resume); removed after publication."""
        d = self.asset_dir(asset) / f"{fp}.work"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def lock(self, asset: str, fp: str) -> FileLock:
        self.asset_dir(asset).mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.asset_dir(asset) / f"{fp}.lock"), timeout=self.lock_timeout_s)

    # ---- reading -----------------------------------------------------------------------------
    def get(self, asset: str, fp: str) -> Artifact | None:
        """The verified artifact, None if absent; raises CorruptArtifactError if present but broken."""
        path = self.path_for(asset, fp)
        if not path.exists():
            # A forced rebuild on a filesystem without RENAME_EXCHANGE replaces the directory with two
            # renames; a reader landing between them looks again once.
            time.sleep(0.05)
            if not path.exists():
                return None
        return Artifact(asset, fp, path, verify_dir(path))

    def latest(self, asset: str) -> Artifact:
        """The newest published artifact of ``asset`` (follows LATEST.json), verified."""
        pointer = self.asset_dir(asset) / "LATEST.json"
        if not pointer.is_file():
            raise FileNotFoundError(
                f"no materialized {asset!r} under {self.root}: materialize it first "
                f"(e.g. `dagster asset materialize --select +{asset}`), or set GT_HOME to the store that holds it"
            )
        fp = json.loads(pointer.read_text())["fingerprint"]
        art = self.get(asset, fp)
        if art is None:
            raise FileNotFoundError(f"{pointer} points to {fp}, which no longer exists; re-materialize {asset!r}")
        return art

    def set_latest(self, art: Artifact) -> None:
        write_json_atomic(
            self.asset_dir(art.asset) / "LATEST.json",
            {"asset": art.asset, "fingerprint": art.fingerprint, "path": str(art.path), "set_at": time.time()},
        )

    # ---- writing -----------------------------------------------------------------------------
    def build(
        self,
        asset: str,
        fp: str,
        builder: Callable[[Path], dict[str, Any]],
        *,
        inputs: dict[str, Any] | None = None,
        force: bool = False,
        on_event: Callable[[str], None] | None = None,
    ) -> BuildResult:
        """Return the artifact for ``fp``, building it with ``builder(tmp_dir) -> metadata`` on a miss.

        The builder writes its files into ``tmp_dir``; the store adds ``manifest.json`` (sha256 of every
        file, the builder's metadata, ``inputs``) and renames the directory into place. A builder that
        raises leaves nothing behind and changes no published artifact.
        """
        say = on_event or (lambda msg: None)
        t0 = time.perf_counter()
        quarantined = None
        with self.lock(asset, fp):
            final = self.path_for(asset, fp)
            replacing = False
            if final.exists():
                if force:
                    replacing = True
                    say(f"force rebuild of {asset}/{fp}: the published copy stays in place until the new one is built")
                else:
                    try:
                        art = Artifact(asset, fp, final, verify_dir(final))
                        if not (self.asset_dir(asset) / "LATEST.json").is_file():
                            self.set_latest(art)  # a store without a pointer gets one; a hit never moves it
                        return BuildResult(art, True, time.perf_counter() - t0)
                    except CorruptArtifactError as exc:
                        quarantined = self._quarantine(final, str(exc))
                        say(f"corrupt cached {asset}/{fp} ({exc}); moved to {quarantined} and rebuilding")
            self._clean_stale_tmp(asset, fp)
            tmp = self.asset_dir(asset) / f".tmp-{fp}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                t_build = time.perf_counter()
                metadata = dict(builder(tmp) or {})
                metadata.setdefault("build_s", round(time.perf_counter() - t_build, 3))
                manifest = self._write_manifest(tmp, asset, fp, metadata, inputs or {})
                if replacing:
                    quarantined = self._replace(tmp, final, say)
                else:
                    os.replace(tmp, final)
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if replacing and final.exists():
                    note = f"the rebuild of {asset}/{fp} failed; the published copy at {final} is unchanged"
                    exc.add_note(note)
                    say(note)
                raise
            art = Artifact(asset, fp, final, manifest)
            self.set_latest(art)
        work = self.asset_dir(asset) / f"{fp}.work"
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        return BuildResult(art, False, time.perf_counter() - t0, quarantined)

    def _replace(self, new: Path, final: Path, say: Callable[[str], None]) -> Path:
        """Publish `new` at `final` (which exists) and return where the replaced copy was kept."""
        if exchange_dirs(new, final):  # one atomic step: readers see the old or the new directory
            old = new
        else:
            msg = (f"renameat2(RENAME_EXCHANGE) unavailable under {final.parent}: replacing {final.name} with two "
                   "renames (readers retry once across the gap)")
            log.warning(msg)
            say(msg)
            old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(new, final)
        return self._quarantine(old, "replaced by a forced rebuild", name=final.name)

    def _write_manifest(self, d: Path, asset: str, fp: str, metadata: dict, inputs: dict) -> dict:
        files = {}
        for p in sorted(d.rglob("*")):
            if p.is_file():
                files[p.relative_to(d).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "asset": asset,
            "fingerprint": fp,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "files": files,
            "metadata": metadata,
            "inputs": inputs,
        }
        write_json_atomic(d / MANIFEST, manifest)  # last: the directory counts only from here on
        return manifest

    def _quarantine(self, path: Path, reason: str, name: str | None = None) -> Path:
        qdir = path.parent / ".quarantine"
        qdir.mkdir(exist_ok=True)
        dest = qdir / f"{name or path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}"
        os.replace(path, dest)
        (dest.parent / f"{dest.name}.reason.txt").write_text(reason + "\n")
        return dest

    def _clean_stale_tmp(self, asset: str, fp: str) -> None:
        # We hold the fingerprint's lock, so any temp dir for it belongs to a builder that died.
        for stale in self.asset_dir(asset).glob(f".tmp-{fp}-*"):
            shutil.rmtree(stale, ignore_errors=True)
