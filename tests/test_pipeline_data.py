"""The Dagster layer over the data chain: definitions, caching across instances, bad input, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from gt_pipeline.assets.data import bpe_tokenizer, token_shards, wikitext103_raw
from gt_pipeline.resources import DemoWikiTextSource, LocalWikiTextSource, make_source, resources_from_env
from gt_pipeline.profiles import get_profile

REPO = Path(__file__).resolve().parents[1]
DATA_ASSETS = [wikitext103_raw, bpe_tokenizer, token_shards]
SMALL = dg.RunConfig(ops={"bpe_tokenizer": {"config": {"vocab_size": 1024}}})


def resources(home: Path, **over):
    env = {"GT_PROFILE": "demo", "GT_HOME": str(home)}
    return {**resources_from_env(env), "source": DemoWikiTextSource(size_mb=0.4), **over}


def run(home, run_config=SMALL, **over):
    return dg.materialize(DATA_ASSETS, resources=resources(home, **over), run_config=run_config,
                          instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


def failure_text(res) -> str:
    """The step failure's message with its whole cause chain (the user's error sits in a cause)."""
    out, err = [], res.get_step_failure_events()[0].event_specific_data.error
    while err is not None:
        out.append(err.message)
        err = err.cause
    return "\n".join(out)


def meta(res, asset):
    (mat,) = res.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}, mat.tags["dagster/data_version"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    home = tmp_path_factory.mktemp("gt_home")
    res = run(home)
    assert res.success
    return home, res


def test_definitions_load_with_contract_names():
    from gt_pipeline.definitions import defs

    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    expected = {"wikitext103_raw", "bpe_tokenizer", "token_shards", "wkv6_kernel", "trained_gf_mh", "trained_gf",
                "trained_gf_rh", "trained_hy", "trained_ws", "trained_rf", "trained_cp", "trained_gpt",
                "trained_rwkv6", "trained_mamba2", "trained_gf_xm", "trained_gf_xr", "trained_hgf", "trained_hgf_mh",
                "trained_hgf_rh", "trained_gru", "trained_mingru", "trained_linrec"}
    assert expected <= keys
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.code_version, f"{key.to_user_string()} has no code_version: caching would never hit"
    groups = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups["token_shards"] == "data" and groups["wkv6_kernel"] == "kernels" and groups["trained_gf_mh"] == "training"
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    for name in ("g1_forward", "g2_init_entropy", "g3_training_health", "g3_5_state_health", "g4_component_balance"):
        assert ("trained_gf_mh", name) in checks


def test_chain_materializes_with_useful_metadata(built):
    home, res = built
    raw, _ = meta(res, "wikitext103_raw")
    tok, _ = meta(res, "bpe_tokenizer")
    shards, _ = meta(res, "token_shards")
    assert raw["cache_hit"] is False and raw["documents"] > 10 and raw["bytes"] > 100_000
    assert tok["vocab_size"] == 1024
    assert shards["tokens"] > 50_000 and 0.1 < shards["tokens_per_byte"] < 1.0
    assert "preview" in shards and "wall_s" in shards
    for asset in ("wikitext103_raw", "bpe_tokenizer", "token_shards"):
        pointer = json.loads((home / asset / "LATEST.json").read_text())
        assert (home / asset / pointer["fingerprint"] / "manifest.json").is_file()


def test_second_materialization_is_a_cache_hit_in_a_fresh_instance(built):
    home, first = built
    mtimes = {p: p.stat().st_mtime_ns for p in home.rglob("*.bin")}
    second = run(home)  # a new ephemeral instance: no Dagster history, only the store
    assert second.success
    for asset in ("wikitext103_raw", "bpe_tokenizer", "token_shards"):
        m2, v2 = meta(second, asset)
        _, v1 = meta(first, asset)
        assert m2["cache_hit"] is True, asset
        assert v1 == v2 == m2["fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*.bin")} == mtimes


def test_downstream_alone_resolves_upstream_from_the_store(built):
    home, _ = built
    res = dg.materialize(DATA_ASSETS, resources=resources(home), instance=dg.DagsterInstance.ephemeral(),
                         selection=[token_shards])
    assert meta(res, "token_shards")[0]["cache_hit"] is True


def test_changed_config_misses_downstream_only(built, tmp_path):
    home, first = built
    res = run(home, dg.RunConfig(ops={"bpe_tokenizer": {"config": {"vocab_size": 1100}}}))
    assert res.success
    assert meta(res, "wikitext103_raw")[0]["cache_hit"] is True
    assert meta(res, "bpe_tokenizer")[0]["cache_hit"] is False
    assert meta(res, "token_shards")[0]["cache_hit"] is False
    assert meta(res, "token_shards")[1] != meta(first, "token_shards")[1]


def test_corrupted_shard_is_detected_and_rebuilt(tmp_path):
    home = tmp_path / "home"
    assert run(home).success
    fp = json.loads((home / "token_shards" / "LATEST.json").read_text())["fingerprint"]
    shard = home / "token_shards" / fp / "train.bin"
    blob = bytearray(shard.read_bytes())
    blob[100] ^= 0xFF
    shard.write_bytes(bytes(blob))
    res = run(home)
    assert res.success
    m, _ = meta(res, "token_shards")
    assert m["cache_hit"] is False and m["fingerprint"] == fp
    assert list((home / "token_shards" / ".quarantine").iterdir())
    assert shard.read_bytes() != bytes(blob)


def test_vocab_beyond_uint16_fails_before_compute_and_keeps_earlier_artifacts(built):
    home, _ = built
    before = (home / "bpe_tokenizer" / "LATEST.json").read_text()
    res = run(home, dg.RunConfig(ops={"bpe_tokenizer": {"config": {"vocab_size": 70000}}}))
    assert not res.success
    err = failure_text(res)
    assert "vocab_size=70000" in err and "65535" in err
    assert (home / "bpe_tokenizer" / "LATEST.json").read_text() == before
    assert not list((home / "bpe_tokenizer").glob(".tmp-*"))


def test_unknown_config_field_is_rejected_by_name(built):
    home, _ = built
    with pytest.raises(dg.DagsterInvalidConfigError, match="vocab_sise"):
        run(home, dg.RunConfig(ops={"bpe_tokenizer": {"config": {"vocab_sise": 1000}}}))


def test_unknown_source_names_the_variable_and_choices():
    with pytest.raises(ValueError, match=r"GT_DATA_SOURCE='s3'.*hf.*local.*demo"):
        make_source("s3", get_profile("demo"), {})


def test_local_source_without_directory_names_the_fix(tmp_path):
    res = run(tmp_path / "home", source=LocalWikiTextSource(directory=""))
    assert not res.success
    assert "GT_WIKITEXT_DIR" in failure_text(res)


def test_libraries_do_not_import_dagster():
    code = "import sys, kernels, models, data; print([m for m in sys.modules if m.split('.')[0] == 'dagster'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_cli_materializes_the_data_chain_from_repo_root_and_with_module_flag(tmp_path):
    env = {**os.environ, "GT_PROFILE": "demo", "GT_HOME": str(tmp_path / "home"),
           "DAGSTER_MODULE_NAME": "gt_pipeline.definitions", "PYTHONPATH": str(REPO)}
    env.pop("DAGSTER_HOME", None)
    cfg = tmp_path / "small.yaml"
    cfg.write_text("ops:\n  bpe_tokenizer:\n    config:\n      vocab_size: 1024\n")
    dagster = str(Path(sys.executable).with_name("dagster"))
    first = subprocess.run([dagster, "asset", "materialize", "--select", "+token_shards", "-c", str(cfg)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "home" / "token_shards" / "LATEST.json").is_file()
    env.pop("DAGSTER_MODULE_NAME")
    second = subprocess.run([dagster, "asset", "materialize", "-m", "gt_pipeline.definitions", "--select",
                             "token_shards", "-c", str(cfg)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cache hit" in second.stderr + second.stdout
