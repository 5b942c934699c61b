"""Generation: stateful one-token-per-call (GPT: KV cache) equals full-context recompute; the trained_* materialization
shows samples and logs an MLflow run; the generate CLI works on the published artifact."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch

import data
import models
from gt_pipeline.assets import data as data_assets
from gt_pipeline.assets import kernels as kernel_assets
from gt_pipeline.assets.training import trained_assets
from gt_pipeline.engine.generate import generate, load_checkpoint, upstream_dir
from gt_pipeline.resources import DemoWikiTextSource, resources_from_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["GF-MH", "MAMBA2", "GPT"])
def test_stateful_generation_equals_full_recompute(name, one_thread):
    torch.manual_seed(0)
    model = models.get_model(name, 97, size="demo")
    prompt = [5, 17, 3, 42, 8, 1, 60]
    greedy_state = generate(model, prompt, 12, greedy=True, stateful=True)
    greedy_full = generate(model, prompt, 12, greedy=True, stateful=False)
    assert greedy_state == greedy_full
    # sampled with one seed: the same draws, since the logits agree
    assert generate(model, prompt, 12, top_k=10, seed=3) == generate(model, prompt, 12, top_k=10, seed=3, stateful=False)
    # and the greedy tokens are the argmax of one full forward over prompt + generated (teacher forcing)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([prompt + greedy_state])).logits[0]
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == greedy_state


def test_gpt_generates_with_a_kv_cache_sized_for_the_text(one_thread, monkeypatch):
    model = models.get_model("GPT", 97, size="demo")
    made, kv_cache = [], model.kv_cache

    def recording(*args, **kwargs):
        made.append(args)
        return kv_cache(*args, **kwargs)

    monkeypatch.setattr(model, "kv_cache", recording)
    assert len(generate(model, [1, 2, 3], 4, greedy=True)) == 4
    assert made == [(1, 3 + 4)]          # one cache, batch 1, room for the prompt and the 4 new tokens


def test_bad_arguments_are_named(one_thread):
    model = models.get_model("GF-MH", 97, size="demo")
    with pytest.raises(ValueError, match="prompt_ids must hold at least one"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="top_k must be None or >= 1"):
        generate(model, [1], 3, top_k=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, [1], 3, temperature=0)


def test_samples_run_where_the_model_trained(monkeypatch):
    from gt_pipeline.assets.training_extras import sample_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [sample_device(d) for d in ("cpu", "cuda", "NVIDIA H200")] == ["cpu", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # "cuda" is the device type of a build; the metadata of a cache hit names the GPU
    assert [sample_device(d) for d in ("cpu", "cuda", "NVIDIA H200")] == ["cpu", "cuda", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["GF-MH", "GRU", "MINGRU", "HGF", "RWKV6", "MAMBA2", "GPT"])
def test_generation_on_cuda_gives_the_cpu_tokens(name, no_tf32):
    """Samples are generated on the training GPU: the same greedy tokens as the CPU, and the logits of every
    step within fp32 tolerance."""
    torch.manual_seed(0)
    cpu = models.get_model(name, 97, size="demo").eval()
    gpu = models.get_model(name, 97, size="demo").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    prompt = [5, 17, 3, 42, 8, 1, 60]
    assert generate(gpu, prompt, 16, greedy=True) == generate(cpu, prompt, 16, greedy=True)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want, got = cpu(ids).logits, gpu(ids.cuda()).logits.cpu()
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"{name}: CUDA logits differ from the CPU's by {err:.2e}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The data chain + kernel + a 6-step trained_gf_mh in a fresh store, tracking on (local SQLite): (GT_HOME, the
    materialization's metadata, the run's log messages)."""
    home = tmp_path_factory.mktemp("gt_home")
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    assets = [data_assets.wikitext103_raw, data_assets.bpe_tokenizer, data_assets.token_shards,
              kernel_assets.wkv6_kernel, *trained_assets]
    run_config = {"ops": {"bpe_tokenizer": {"config": {"vocab_size": 512}},
                          "trained_gf_mh": {"config": {"steps": 6, "eval_every": 3, "batch_size": 2, "seq_len": 32,
                                                       "experiment": "eco-test"}}}}
    instance = dg.DagsterInstance.ephemeral()
    res = dg.materialize(assets, selection=dg.AssetSelection.assets("trained_gf_mh").upstream(),
                         resources={**resources_from_env({"GT_PROFILE": "demo", "GT_HOME": str(home)}),
                                    "source": DemoWikiTextSource(size_mb=0.2)},
                         run_config=run_config, instance=instance, raise_on_error=False)
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old
    assert res.success, [e.event_specific_data.error.message for e in res.get_step_failure_events()]
    (mat,) = res.asset_materializations_for_node("trained_gf_mh")
    log = [e.user_message for e in instance.all_logs(res.run_id)]
    return home, {k: v.value for k, v in mat.metadata.items()}, log


@pytest.mark.slow
def test_materialization_shows_samples_of_held_out_prompts(trained):
    _, m, log = trained
    md = m["samples"]
    assert "**Samples** (held-out validation prompts; top-k 20, temperature 1.0, seed 0; stateful" in md
    assert md.count("\n> **") == 3
    # the run log says when the samples start and how long they took (a cold CPU kernel build shows there)
    said = [line for line in log if line.startswith("samples: ")]
    on = "cuda" if torch.cuda.is_available() else "cpu"        # the device the fixture's model trained on
    assert said[0].startswith(f"samples: continuing held-out prompts on {on}") and said[1].startswith("samples: done in")


@pytest.mark.slow
def test_materialization_logged_an_mlflow_run(trained):
    from mlflow.tracking import MlflowClient

    home, m, _ = trained
    c = MlflowClient(tracking_uri=f"sqlite:///{home.resolve() / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("eco-test").experiment_id])
    art = Path(m["path"])
    assert run.data.tags["checkpoint_path"] == str(art) and run.data.params["fingerprint"] == m["fingerprint"]
    assert run.data.params["model"] == "GF-MH" and run.data.params["steps"] == "6"
    with open(art / "train_log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    for key in ("train_loss", "lr", "grad_norm_rwkv", "grad_norm_mamba", "grad_norm_fusion", "tokens_per_s"):
        hist = sorted((h.step, h.value) for h in c.get_metric_history(run.info.run_id, key))
        assert hist == [(int(r["step"]), pytest.approx(float(r[key]))) for r in log], key
    assert [h.step for h in c.get_metric_history(run.info.run_id, "gate_mean")] == [3, 6]
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_generate_cli_on_the_trained_artifact(trained):
    _, m, _ = trained
    art = Path(m["path"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "gt_pipeline.engine.generate", "--checkpoint", str(art), "--prompt",
                          "The castle", "--max-new-tokens", "8", "--greedy"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tok = data.load_tokenizer(upstream_dir(art, "bpe_tokenizer") / "tokenizer.json")
    model, _ = load_checkpoint(art)
    want = "The castle" + tok.decode(generate(model, tok.encode("The castle").ids, 8, greedy=True))
    assert out.stdout.rstrip("\n") == want
