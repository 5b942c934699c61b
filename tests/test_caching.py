"""Derived code versions, the active profile, lineage-bound inputs and the kernel build cache (issues 15, 20)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from gt_pipeline import profiles, versions
from gt_pipeline.resources import ArtifactIOManager, recorded_fingerprint, resources_from_env
from gt_pipeline.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


# ---- 1. code versions derived from the code -----------------------------------------------------------------------

def _fake_repo(tmp_path: Path, body: str) -> Path:
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "m.py").write_text(body)
    return tmp_path


def test_code_version_ignores_comments_and_docstrings_but_not_code(tmp_path):
    base = 'def f(x):\n    """Double x."""\n    return 2 * x\n'
    v0 = versions.source_version(["pkg"], _fake_repo(tmp_path, base))
    commented = '"""Module doc."""\n# a comment\ndef f(x):\n    """Twice x, reworded."""\n\n    return 2 * x  # why\n'
    assert versions.source_version(["pkg"], _fake_repo(tmp_path, commented)) == v0
    assert versions.source_version(["pkg"], _fake_repo(tmp_path, base.replace("2 * x", "3 * x"))) != v0
    (tmp_path / "pkg" / "kernel.cu").write_text("// c\n")
    v1 = versions.source_version(["pkg"], _fake_repo(tmp_path, base))
    (tmp_path / "pkg" / "kernel.cu").write_text("// d\n")  # non-Python sources count byte for byte
    assert versions.source_version(["pkg"], tmp_path) != v1 != v0


def test_every_asset_family_has_a_derived_version_and_model_code_reaches_training_and_reports():
    for family, paths in versions.DEPENDS.items():
        assert len(versions.code_version(family)) == 12
        for rel in paths:
            assert (REPO / rel).exists(), f"{family} depends on missing {rel}"
    assert "models" in versions.DEPENDS["trained"] and "models" in versions.DEPENDS["reports"]
    assert "gt_pipeline/engine/evaluate.py" in versions.DEPENDS["reports"]
    from gt_pipeline.assets import reports, training

    assert training.TRAIN_VERSION == versions.code_version("trained")
    assert reports.REPORT_VERSION == versions.code_version("reports")
    with pytest.raises(ValueError, match="known"):
        versions.code_version("nope")


def test_a_model_source_change_changes_the_training_and_report_versions(tmp_path):
    copy = tmp_path / "repo"
    for rel in {p.split("/")[0] for ps in versions.DEPENDS.values() for p in ps}:
        shutil.copytree(REPO / rel, copy / rel, ignore=shutil.ignore_patterns("__pycache__"))
    before = {f: versions.source_version(p, copy) for f, p in versions.DEPENDS.items()}
    assert before == {f: versions.code_version(f) for f in versions.DEPENDS}
    lm = copy / "models" / "lm.py"
    lm.write_text(lm.read_text() + "\n_EXTRA_CONSTANT = 1\n")
    after = {f: versions.source_version(p, copy) for f, p in versions.DEPENDS.items()}
    changed = {f for f in before if before[f] != after[f]}
    assert changed == {"trained", "gate_checks", "reports", "sweep"}


# ---- 4. the active profile ----------------------------------------------------------------------------------------

def test_profile_comes_from_env_then_the_store_then_full(tmp_path):
    assert profiles.active_profile({}, tmp_path)[0].name == "full"
    profiles.record_store_profile(tmp_path, "demo")
    prof, why = profiles.active_profile({}, tmp_path)
    assert prof.name == "demo" and "PROFILE" in why
    assert profiles.active_profile({"GT_PROFILE": "full"}, tmp_path)[0].name == "full"
    res = resources_from_env({"GT_HOME": str(tmp_path)})
    assert res["profile"].name == "demo" and type(res["source"]).__name__ == "DemoWikiTextSource"
    (tmp_path / "PROFILE").write_text("tiny\n")
    with pytest.raises(ValueError, match="GT_PROFILE='tiny'"):
        profiles.active_profile({}, tmp_path)


def test_definitions_show_the_profile_and_carry_it_in_the_code_version(tmp_path):
    code = ("import json; from gt_pipeline.definitions import defs; import dagster as dg; "
            "n = defs.resolve_asset_graph().get(dg.AssetKey('trained_gf_mh')); "
            "print(json.dumps([n.code_version, n.description, sorted(k.name for k in defs.resolve_asset_graph()"
            ".asset_check_keys if k.asset_key.to_user_string() == 'trained_gf_mh')]))")
    profiles.record_store_profile(tmp_path, "demo")
    env = {**os.environ, "GT_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("GT_PROFILE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    cv, desc, checks = json.loads(out.stdout.strip().splitlines()[-1])
    assert cv == f"demo-{versions.code_version('trained')}"
    assert "Profile: `demo`" in desc
    assert checks == sorted(["g1_forward", "g2_init_entropy", "g3_training_health", "g3_5_state_health",
                             "g4_component_balance"])


# ---- 2. lineage: inputs are the recorded fingerprints ----------------------------------------------------------------

def _publish(store: ArtifactStore, fp: str, text: str):
    def b(d):
        (d / "x.txt").write_text(text)
        return {}
    return store.build("up", fp, b).artifact




def test_io_manager_loads_the_recorded_fingerprint_not_latest(tmp_path):
    store = ArtifactStore(tmp_path / "gt")
    _publish(store, "aaaa", "old")
    _publish(store, "bbbb", "new")
    assert store.latest("up").fingerprint == "bbbb"
    instance = dg.DagsterInstance.ephemeral()
    key = dg.AssetKey("up")
    # No record in the instance: fall back to LATEST.
    assert recorded_fingerprint(instance, None, key) == (None, "no materialization recorded in this Dagster instance")
    # A materialization recorded with data version aaaa (e.g. run A) binds loaders to aaaa, whatever LATEST says.
    instance.report_runless_asset_event(dg.AssetMaterialization(key, tags={"dagster/data_version": "aaaa"}))
    fp, how = recorded_fingerprint(instance, None, key)
    assert fp == "aaaa" and "latest materialization" in how
    io = ArtifactIOManager(root=str(store.root))
    ctx = dg.build_input_context(asset_key=key, instance=instance)
    art = io.load_input(ctx)
    assert art.fingerprint == "aaaa" and (art.path / "x.txt").read_text() == "old"
    # A recorded fingerprint that is not in the store is an error naming the fix, not a silent LATEST.
    instance.report_runless_asset_event(dg.AssetMaterialization(key, tags={"dagster/data_version": "cccc"}))
    with pytest.raises(FileNotFoundError, match="re-materialize up"):
        io.load_input(dg.build_input_context(asset_key=key, instance=instance))


# ---- issue 20 item 2: one kernel build for two checkouts ---------------------------------------------------------------

@pytest.mark.slow
def test_two_checkouts_share_one_kernel_build(tmp_path):
    """Two copies of the kernels package, one GT_KERNEL_CACHE: the second loads the first's build, and the
    compiled library is not rebuilt (same inode and mtime), whichever checkout loads it afterwards."""
    cache = tmp_path / "cache"
    copies = []
    for name in ("checkout_a", "checkout_b"):
        shutil.copytree(REPO / "kernels", tmp_path / name / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
        copies.append(tmp_path / name)
    code = ("import json, kernels; from kernels import build; info = kernels.build_extension('cpu'); "
            "so = next(p for p in __import__('pathlib').Path(info['build_dir']).glob('*.so')); st = so.stat(); "
            "print(json.dumps({'dir': info['build_dir'], 'hit': info['cache_hit'], 'so': [st.st_ino, st.st_mtime_ns], "
            "'file': build.__file__}))")

    def load(checkout: Path) -> dict:
        env = {**os.environ, "GT_KERNEL_CACHE": str(cache), "PYTHONPATH": str(checkout)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=checkout)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    a = load(copies[0])
    assert a["file"].startswith(str(copies[0])) and a["hit"] is False
    b = load(copies[1])
    assert b["file"].startswith(str(copies[1]))
    assert b["dir"] == a["dir"] and b["hit"] is True and b["so"] == a["so"]
    assert load(copies[0])["so"] == a["so"]
    ninja = (Path(a["dir"]) / "build.ninja").read_text()
    assert str(copies[0]) not in ninja and str(copies[1]) not in ninja
