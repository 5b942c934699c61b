"""The artifact store: fingerprints, cache hits, corruption, crashes and concurrent builders."""

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from gt_pipeline.store import ArtifactStore, CorruptArtifactError, fingerprint, verify_dir


def write_payload(d: Path, text: str = "hello") -> dict:
    (d / "a.txt").write_text(text)
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    return {"n": 1}


def test_fingerprint_is_stable_and_sensitive_to_each_input():
    base = dict(asset="x", code_version="v1", config={"a": 1, "b": [1, 2]}, upstream={"u": "f1"}, env={"cuda": "12"})
    fp = fingerprint(**base)
    assert fp == fingerprint(**{**base, "config": {"b": [1, 2], "a": 1}})  # key order irrelevant
    assert len(fp) == 16
    changed = [
        {**base, "asset": "y"},
        {**base, "code_version": "v2"},
        {**base, "config": {"a": 2, "b": [1, 2]}},
        {**base, "upstream": {"u": "f2"}},
        {**base, "env": {"cuda": "13"}},
    ]
    assert len({fingerprint(**c) for c in changed} | {fp}) == len(changed) + 1


def test_miss_then_hit_returns_same_artifact_without_rebuilding(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def builder(d):
        calls.append(d)
        return write_payload(d)

    r1 = store.build("asset", "fp1", builder)
    r2 = store.build("asset", "fp1", builder)
    assert (r1.cache_hit, r2.cache_hit) == (False, True)
    assert len(calls) == 1
    assert r2.artifact.path == r1.artifact.path == tmp_path / "asset" / "fp1"
    assert r2.artifact.metadata["n"] == 1 and "build_s" in r2.artifact.metadata
    assert store.latest("asset").fingerprint == "fp1"
    manifest = json.loads((r1.artifact.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"a.txt", "sub/b.bin"}


@pytest.mark.parametrize("damage", ["edit", "truncate", "delete_file", "extra_file", "no_manifest"])
def test_corrupt_artifact_is_detected_quarantined_and_rebuilt(tmp_path, damage):
    store = ArtifactStore(tmp_path)
    art = store.build("asset", "fp1", write_payload).artifact
    target = art.path / "a.txt"
    if damage == "edit":
        target.write_text("HELLO")
    elif damage == "truncate":
        target.write_text("he")
    elif damage == "delete_file":
        target.unlink()
    elif damage == "extra_file":
        (art.path / "stray.tmp").write_text("x")
    else:
        (art.path / "manifest.json").unlink()
    with pytest.raises(CorruptArtifactError):
        verify_dir(art.path)
    events = []
    r = store.build("asset", "fp1", write_payload, on_event=events.append)
    assert not r.cache_hit
    assert r.quarantined is not None and r.quarantined.exists()  # the broken copy is kept aside, not deleted
    assert events and "corrupt" in events[0]
    assert (r.artifact.path / "a.txt").read_text() == "hello"
    verify_dir(r.artifact.path)


def test_failed_build_leaves_earlier_artifacts_and_latest_intact(tmp_path):
    store = ArtifactStore(tmp_path)
    good = store.build("asset", "fp1", write_payload).artifact

    def broken(d):
        (d / "partial.bin").write_bytes(b"x" * 100)
        raise ValueError("bad input: vocab_size=70000")

    with pytest.raises(ValueError, match="vocab_size"):
        store.build("asset", "fp2", broken)
    assert not (tmp_path / "asset" / "fp2").exists()
    assert not list((tmp_path / "asset").glob(".tmp-*"))
    assert store.latest("asset").fingerprint == "fp1"
    verify_dir(good.path)


def test_half_written_temp_dir_from_a_crash_is_ignored_and_cleaned(tmp_path):
    store = ArtifactStore(tmp_path)
    crashed = tmp_path / "asset" / ".tmp-fp1-deadbeef"
    crashed.mkdir(parents=True)
    (crashed / "a.txt").write_text("half")
    assert store.get("asset", "fp1") is None
    r = store.build("asset", "fp1", write_payload)
    assert not r.cache_hit and not crashed.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_force_rebuilds_and_keeps_old_copy(tmp_path, monkeypatch, exchange):
    import gt_pipeline.store as store_mod

    if not exchange:  # a filesystem without RENAME_EXCHANGE: the two-rename path must give the same result
        monkeypatch.setattr(store_mod, "exchange_dirs", lambda a, b: False)
    store = ArtifactStore(tmp_path)
    store.build("asset", "fp1", write_payload)
    seen = []

    def rebuild(d):
        # while the new copy is being built, the published one is still there and verifies
        seen.append((tmp_path / "asset" / "fp1" / "a.txt").read_text())
        verify_dir(tmp_path / "asset" / "fp1")
        return write_payload(d, "again")

    r = store.build("asset", "fp1", rebuild, force=True)
    assert seen == ["hello"]
    assert not r.cache_hit and (r.artifact.path / "a.txt").read_text() == "again"
    verify_dir(r.artifact.path)
    assert r.quarantined is not None and (r.quarantined / "a.txt").read_text() == "hello"
    assert not list((tmp_path / "asset").glob(".tmp-*")) and not list((tmp_path / "asset").glob(".old-*"))


def test_failed_forced_rebuild_keeps_the_published_copy_and_says_so(tmp_path):
    store = ArtifactStore(tmp_path)
    good = store.build("asset", "fp1", write_payload).artifact
    events = []

    def broken(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="evaluation crashed") as info:
        store.build("asset", "fp1", broken, force=True, on_event=events.append)
    assert any("published copy" in n and "unchanged" in n for n in info.value.__notes__)
    assert any("unchanged" in e for e in events)
    assert (good.path / "a.txt").read_text() == "hello"
    verify_dir(good.path)
    assert store.latest("asset").fingerprint == "fp1"


def test_latest_moves_only_on_a_build_never_back_on_a_cache_hit(tmp_path):
    store = ArtifactStore(tmp_path)
    store.build("asset", "old", write_payload)
    store.build("asset", "new", lambda d: write_payload(d, "new"))
    assert store.latest("asset").fingerprint == "new"
    r = store.build("asset", "old", write_payload)  # e.g. a sweep re-running an older setting
    assert r.cache_hit and store.latest("asset").fingerprint == "new"
    (tmp_path / "asset" / "LATEST.json").unlink()  # a store without a pointer gets one from a hit
    store.build("asset", "old", write_payload)
    assert store.latest("asset").fingerprint == "old"


def test_latest_without_materialization_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize"):
        ArtifactStore(tmp_path).latest("bpe_tokenizer")


def _concurrent_builder(root: str, counter: str, barrier) -> str:
    import time

    store = ArtifactStore(root)

    def builder(d):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        (d / "big.bin").write_bytes(os.urandom(1 << 20))
        time.sleep(0.5)  # wide window for the other process to collide
        (d / "done.txt").write_text("ok")
        return {}

    barrier.wait()
    r = store.build("asset", "fp1", builder)
    return r.artifact.manifest["files"]["big.bin"]["sha256"]


def test_two_concurrent_builders_do_not_tear_the_directory(tmp_path):
    ctx = mp.get_context("spawn")
    counter = tmp_path / "calls.txt"
    with ctx.Manager() as mgr:
        barrier = mgr.Barrier(2)
        # close + join, not the context manager's terminate(): a worker that inherited an ignored SIGTERM (a
        # suite started from a nohup'd background shell) outlives terminate() and the join waits forever
        pool = ctx.Pool(2)
        try:
            digests = pool.starmap(_concurrent_builder, [(str(tmp_path / "store"), str(counter), barrier)] * 2)
        finally:
            pool.close()
            pool.join()
    assert len(counter.read_text().split()) == 1  # built once; the second waited on the lock and hit
    assert digests[0] == digests[1]
    verify_dir(tmp_path / "store" / "asset" / "fp1")
