"""engine.bench on the CPU: the pipeline's training step timed, its loss curve vs the reference path, and the
concurrent-trainings mode the sweep's K comes from."""

import json

import pytest

from gt_pipeline.engine import bench

TINY = ["--models", "GF-MH", "--size", "demo", "--vocab", "512", "--batch", "2", "--seq", "32", "--steps", "3",
        "--warmup", "1", "--device", "cpu"]


def run(capsys, argv):
    bench.main(argv)
    return json.loads(capsys.readouterr().out)


def test_compare_on_shards_reports_both_curves_from_the_same_batches(capsys, demo_shards):
    out = run(capsys, TINY + ["--shards", str(demo_shards), "--compare"])["results"][0]
    ref = out["reference_path"]
    assert ref["paths"]["rwkv_wkv6"] == "sequential" and ref["paths"]["mamba_ssd"] == "torch"
    assert len(out["losses"]) == len(ref["losses"]) == 4
    # CPU: both paths are the same math on the same batches, so the curves agree closely
    assert out["max_loss_diff_vs_reference"] < 1e-3
    assert out["timed_window_unix"][1] > out["timed_window_unix"][0]


def test_concurrent_workers_time_together_and_report_the_aggregate(capsys, tmp_path):
    out_file = tmp_path / "k.json"
    out = run(capsys, TINY + ["--concurrent", "1,2", "--out", str(out_file)])
    # --out holds the same document as stdout (only the parent writes it, not its workers)
    assert json.loads(out_file.read_text()) == out
    assert out["benchmark"] == "concurrent_training_throughput"
    k1, k2 = out["results"]
    assert (k1["k"], k2["k"], len(k2["per_process_tokens_per_s"])) == (1, 2, 2)
    assert k1["speedup_vs_k1"] == 1.0
    tokens = 2 * 32 * 3 * 2
    assert k2["aggregate_tokens_per_s"] == pytest.approx(tokens / k2["span_s"])
    # the barrier: the aggregate never exceeds the sum of the workers' own rates (their windows overlap)
    assert k2["aggregate_tokens_per_s"] <= sum(k2["per_process_tokens_per_s"]) * 1.0001


def test_concurrent_streams_run_as_threads_of_one_process(capsys):
    out = run(capsys, TINY + ["--concurrent", "2", "--streams"])
    (k2,) = out["results"]
    assert k2["workers"] == "CUDA streams of one process" and len(k2["per_process_tokens_per_s"]) == 2
    assert k2["aggregate_tokens_per_s"] == pytest.approx(2 * 32 * 3 * 2 / k2["span_s"])


@pytest.mark.parametrize("extra, match", [
    (["--streams"], "goes with --concurrent"),
    (["--concurrent", "0,2"], ">= 1"),
    (["--concurrent", "two"], "integers like 1,2,4,8"),
    (["--concurrent", "2", "--compare"], "one model"),
])
def test_concurrent_bad_input_is_named(extra, match):
    with pytest.raises(SystemExit, match=match):
        bench.main(TINY + extra)


def test_a_failing_stream_worker_fails_the_measurement_with_its_error():
    argv = TINY[:]
    argv[argv.index("GF-MH")] = "NO-SUCH-MODEL"
    with pytest.raises(RuntimeError, match=r"--streams: worker \d failed: .*NO-SUCH-MODEL"):
        bench.main(argv + ["--concurrent", "2", "--streams"])


def test_out_file_holds_every_finished_model_and_progress_goes_to_stderr(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    argv = TINY[:]
    argv[argv.index("GF-MH")] = "GF-MH,GPT"
    bench.main(argv + ["--out", str(out_file)])
    printed = capsys.readouterr()
    doc = json.loads(printed.out)
    assert json.loads(out_file.read_text()) == doc  # the file after the last model is the printed document
    assert [r["model"] for r in doc["results"]] == ["GF-MH", "GPT"]
    gfmh, gpt = doc["results"]
    assert gfmh["ratio_vs_first"] == 1.0 and gpt["ratio_vs_last"] == 1.0
    assert gpt["ratio_vs_first"] == pytest.approx(gpt["tokens_per_s"] / gfmh["tokens_per_s"])
    # progress on stderr, in order: each model's warm-up, its timing and its rate
    lines = [ln.split("] ", 1)[1] for ln in printed.err.splitlines() if ln.startswith("[bench ")]
    assert [ln.split(":")[0] for ln in lines] == ["GF-MH"] * 3 + ["GPT"] * 3
    assert lines[0].startswith("GF-MH: 1 warm-up steps") and lines[1].endswith("timing 3 steps")
    assert lines[5].startswith("GPT: ") and "tok/s" in lines[5]


def test_a_run_stopped_after_the_first_model_leaves_it_in_the_out_file(tmp_path, monkeypatch, capsys):
    out_file = tmp_path / "bench.json"
    real = bench.bench_model

    def fail_on_gpt(name, *a, **k):
        if name == "GPT":
            raise KeyboardInterrupt  # as a timeout's signal would stop it
        return real(name, *a, **k)

    monkeypatch.setattr(bench, "bench_model", fail_on_gpt)
    argv = TINY[:]
    argv[argv.index("GF-MH")] = "GF-MH,GPT"
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv + ["--out", str(out_file)])
    kept = json.loads(out_file.read_text())
    assert [r["model"] for r in kept["results"]] == ["GF-MH"] and kept["results"][0]["tokens_per_s"] > 0
    err = capsys.readouterr().err
    assert "GF-MH: warm-up done in" in err and "tok/s" in err


@pytest.mark.parametrize("argv", [
    ["--models", "GF-MH", "--concurrent", "1,2", "--out", "k.json", "--streams", "--steps", "3"],
    ["--concurrent=1,2", "--models", "GF-MH", "--out=k.json", "--steps", "3", "--streams"],
])
def test_concurrent_workers_get_neither_the_k_list_nor_the_out_file(argv):
    assert bench._without(argv, ("--concurrent", "--out"), ("--streams",)) == ["--models", "GF-MH", "--steps", "3"]


def test_gru_backend_switch_is_set_before_training(capsys, monkeypatch):
    from models import arbiter

    monkeypatch.setitem(arbiter._GRU_BACKEND, "prefer", "auto")   # restored after the test
    argv = TINY[:1] + ["GRU"] + TINY[2:] + ["--compile", "off"]
    out = run(capsys, argv + ["--gru-backend", "cudnn"])
    assert arbiter._GRU_BACKEND["prefer"] == "cudnn"
    assert out["results"][0]["paths"]["arbiter_gru"] == "cudnn"
    with pytest.raises(SystemExit):
        bench.main(argv + ["--gru-backend", "triton"])               # not a choice: argparse refuses it
    assert "invalid choice: 'triton'" in capsys.readouterr().err


@pytest.mark.parametrize("out, message", [
    ("{tmp}/missing/k.json", "the directory of '{tmp}/missing/k.json' does not exist"),
    ("{tmp}", "'{tmp}' is a directory; give a file name"),
])
def test_out_that_cannot_be_written_is_refused_before_anything_runs(out, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--out", out.format(tmp=tmp_path)])
    captured = capsys.readouterr()
    assert "--out: " + message.format(tmp=tmp_path) in captured.err
    assert "[bench" not in captured.err  # no model started
