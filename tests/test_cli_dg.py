"""`dg` from the repo root on the demo profile: it finds the code location through pyproject.toml's
[tool.dg] block alone (no DAGSTER_MODULE_NAME, no -m), lists the definitions and launches a run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DG = str(Path(sys.executable).with_name("dg"))


def dg_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "GT_PROFILE": "demo", "GT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "DAGSTER_HOME": str(tmp_path / "dagster_home"), "MLFLOW_TRACKING_URI": ""}
    env.pop("DAGSTER_MODULE_NAME", None)  # dg must not need it
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return env


def test_dg_list_defs_finds_the_code_location_from_pyproject(tmp_path):
    out = subprocess.run([DG, "list", "defs", "--json"], cwd=REPO, env=dg_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("wikitext103_raw", "trained_gf_mh", "gate_report", "groundthink_main", "revalidation_schedule",
                 "g1_forward"):
        assert f'"{name}' in out.stdout, f"{name} missing from `dg list defs`"


@pytest.mark.slow
def test_dg_launch_materializes_an_asset_into_the_store(tmp_path):
    env = dg_env(tmp_path)
    out = subprocess.run([DG, "launch", "--assets", "wikitext103_raw"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "RUN_SUCCESS" in out.stdout + out.stderr
    assert (tmp_path / "home" / "wikitext103_raw" / "LATEST.json").is_file()
    assert (tmp_path / "dagster_home" / "storage").is_dir()  # the run went into the given instance
