"""kernels.bench's bytes bound: the byte count of the wkv6 op (forward, backward, both) and its time at a given
bandwidth, by hand-counted formulas (no GPU needed; the GPU run divides the same numbers by its measured copy
bandwidth); its per-kernel phases, from a given kernel list; `--out`, which keeps the document so far on disk;
and the Triton setting that keeps FLA's autotune results between runs."""
import json
import os

import pytest

import kernels.bench as kbench
from kernels.bench import bytes_bound_ms, wkv6_bytes_moved


def test_forward_bytes_of_the_issue_shape():
    # issue 19: the forward at (16, 4096, 8), K = V = 64 moves 5 x 33.5M bf16 values (r, k, v, w in; y out),
    # plus u (H x K fp32): 0.078 ms at the H200's measured copy bandwidth of about 4.3 TB/s
    E = 16 * 4096 * 8 * 64
    assert E == 33_554_432
    moved = wkv6_bytes_moved(16, 4096, 8, 64, 64)
    assert moved["forward"] == 5 * E * 2 + 8 * 64 * 4
    assert bytes_bound_ms(moved["forward"], 4.3e12) == pytest.approx(0.07804, rel=1e-3)


def test_backward_counts_every_input_and_gradient_once():
    B, T, H, K, V = 2, 3, 5, 4, 6                       # K != V: r, k, w are [B,T,H,K]; v, y, gy [B,T,H,V]
    rkw, vy, u = B * T * H * K * 2, B * T * H * V * 2, H * K * 4     # one bf16 tensor of each kind, u fp32
    forward = 3 * rkw + vy + u + vy                     # read r, k, w, v, u; write y
    backward = 3 * rkw + vy + u + vy + 3 * rkw + vy + u # read r, k, w, v, u, gy; write gr, gk, gw, gv, gu
    assert wkv6_bytes_moved(B, T, H, K, V) == {"forward": forward, "backward": backward,
                                                "forward_backward": forward + backward}
    # fp32 inputs: every tensor but u and gu doubles
    fp32 = wkv6_bytes_moved(B, T, H, K, V, io_bytes=4)
    assert fp32["forward_backward"] == 2 * (forward + backward) - 3 * u


def test_bytes_bound_ms_is_bytes_over_bandwidth():
    assert bytes_bound_ms(10**9, 10**12) == pytest.approx(1.0)       # 1 GB at 1 TB/s
    assert bytes_bound_ms(0, 4.3e12) == 0.0


def test_phases_sum_each_chunk_kernel_and_count_its_waves(monkeypatch):
    # a profile as kernel_times returns it (mangled names); the gw kernel ranks outside the top list but counts
    rows = [{"name": "_ZN..chunk_backward_kernelI13__nv_bfloat16EEvii..", "ms": 4.0, "calls": 1.0},
            {"name": "_ZN..chunk_forward_kernelI13__nv_bfloat16EEvii..", "ms": 1.2, "calls": 1.0},
            {"name": "void at::native::reduce_kernel<..>", "ms": 0.05, "calls": 1.0},
            {"name": "_ZN..chunk_gw_kernelI13__nv_bfloat16EEvii..", "ms": 0.3, "calls": 1.0},
            {"name": "_ZN..chunk_scores_kernelI13__nv_bfloat16EEvii..", "ms": 0.1, "calls": 1.0}]
    monkeypatch.setattr(kbench, "kernel_times", lambda fn: {"total_ms": 5.65, "kernels": rows[:2], "all": rows})
    out = kbench.chunked_phases(None, 8, 4096, 32, 132, {"forward": 2, "backward": 2, "gw": 2, "scores": 5},
                                bytes_per_s=4e12)
    k = out["kernels"]
    # each kernel against its own bytes at 4 TB/s (1 MB takes 0.25 us)
    nbytes = kbench.chunk_kernel_bytes(8, 4096, 32)
    for p, ms in (("scores", 0.1), ("forward", 1.2), ("backward_sweeps", 4.0), ("gw", 0.3)):
        assert k[p]["bytes"] == nbytes[p]
        assert k[p]["fraction_of_bytes_bound"] == pytest.approx(nbytes[p] / 4e12 * 1e3 / ms)
    assert [k[p]["ms"] for p in ("scores", "forward", "backward_sweeps", "gw")] == [0.1, 1.2, 4.0, 0.3]
    # the scores kernel: 65,536 chunks over a grid of 32 blocks per SM (each walks ~16), 5 resident: 7 waves by count
    assert (k["scores"]["blocks"], k["scores"]["waves"], k["scores"]["us_per_chunk_step"]) == (4224, 7, None)
    # 256 forward blocks fit 132 SMs x 2 at once; the backward's 512 (two sweeps per head) need two waves
    assert (k["forward"]["blocks"], k["forward"]["waves"]) == (256, 1)
    assert (k["backward_sweeps"]["blocks"], k["backward_sweeps"]["waves"]) == (512, 2)
    # 4096 / 16 = 256 chunk steps per block, twice over for two waves
    assert k["forward"]["us_per_chunk_step"] == pytest.approx(1e3 * 1.2 / 256)
    assert k["backward_sweeps"]["us_per_chunk_step"] == pytest.approx(1e3 * 4.0 / 512)
    assert out["other_ms"] == pytest.approx(0.05)
    # a kernel the GPU cannot hold (no resident block) has no wave count; without a bandwidth, no fraction
    lone = kbench.chunked_phases(None, 1, 17, 1, 132, {})["kernels"]["forward"]
    assert lone["waves"] is None and lone["fraction_of_bytes_bound"] is None


def test_each_chunk_kernel_counts_its_own_bytes():
    B, T, H, K = 16, 4096, 8, 64
    E = B * T * H * K
    b = kbench.chunk_kernel_bytes(B, T, H)
    A = B * H * (T // 16) * 2 * 16 * 16 * 2                         # the scores: hi and lo bf16, 16 x 16 a chunk
    assert A == E                                                  # one byte per element at K = 64
    assert b["scores"] == 3 * E * 2 + H * K * 4 + A                # r, k, w in (bf16), u fp32; scores out
    assert b["forward"] == 5 * E * 2 + H * K * 4 + A               # r, k, v, w and scores in, y out; u fp32
    assert b["backward_sweeps"] == 2 * 5 * E * 2 + A + 3 * E * 2 + 2 * 4 * E   # two sweeps read r, k, v, w, gy,
    # sweep 2 the scores; gr, gk, gv out; each sweep's fp32 gw terms
    assert b["gw"] == 2 * 4 * E + 2 * E * 2
    # fp32 decays: only what reads w or writes gw grows, by 2 bytes an element each time
    b32 = kbench.chunk_kernel_bytes(B, T, H, w_bytes=4)
    assert {p: b32[p] - b[p] for p in b} == {"scores": 2 * E, "forward": 2 * E, "backward_sweeps": 4 * E,
                                             "gw": 4 * E}
    # a partial last chunk still has a full chunk of scores
    assert kbench.chunk_kernel_bytes(1, 17, 1)["scores"] - 3 * 17 * 64 * 2 - 64 * 4 == 2 * 1024


def test_out_keeps_what_a_stopped_run_timed(monkeypatch, tmp_path):
    # the CUDA part reports after its first contender, then stops (a peer's autotune past a time limit, say)
    def stopped(reps, fla, refs, shapes, progress):
        progress({"measured_copy_bytes_per_s": 4.2e12, "shapes": [{"B": 16, "T": 4096, "H": 8,
                                                                    "ours_chunked": {"forward": {"median_ms": 0.8}}}]})
        raise RuntimeError("stopped part-way")

    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "1")
    monkeypatch.setattr(kbench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kbench.torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(kbench, "bench_cuda", stopped)
    out = tmp_path / "kb.json"
    with pytest.raises(RuntimeError, match="stopped part-way"):
        kbench.main(["--skip-cpu", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["machine"]["gpu"] == "Test GPU"
    assert doc["cuda"]["shapes"][0]["ours_chunked"]["forward"]["median_ms"] == 0.8
    assert doc["copy_bandwidth_GBps"] == pytest.approx(4200.0)
    assert not (tmp_path / "kb.json.tmp").exists()


def test_out_holds_the_finished_document(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(kbench, "bench_cpu", lambda reps: {"speedup_forward_backward": 3.0})
    out = tmp_path / "kb.json"
    kbench.main(["--skip-cuda", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed and "partial" not in printed
    assert printed["cpu"]["speedup_forward_backward"] == 3.0


def test_out_in_a_missing_directory_is_refused_at_the_start(tmp_path, capsys):
    with pytest.raises(SystemExit):
        kbench.main(["--skip-cuda", "--skip-cpu", "--out", str(tmp_path / "nope" / "kb.json")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kbench.main(["--skip-cuda", "--skip-cpu", "--out", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("arg", ["16,4096", "16,x,8;1,2,3", "1,2,3;0,16,1", "1,2,3,4"])
def test_bad_shapes_are_refused_by_entry(arg, capsys):
    with pytest.raises(SystemExit):
        kbench.main(["--skip-cuda", "--skip-cpu", "--shapes", arg])
    bad = next(p for p in arg.split(";") if p != "1,2,3")
    assert f"expected B,T,H (three positive integers), got {bad!r}" in capsys.readouterr().err


def test_autotune_results_are_kept_unless_the_caller_says_no():
    env = {}
    assert kbench.keep_autotune_results(env) is True and env == {"TRITON_CACHE_AUTOTUNING": "1"}
    env = {"TRITON_CACHE_AUTOTUNING": "0"}
    assert kbench.keep_autotune_results(env) is False and env == {"TRITON_CACHE_AUTOTUNING": "0"}


def test_the_cuda_part_runs_with_fla_autotune_results_kept(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "")  # recorded first, so whatever the test sets is undone
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING")
    seen = []

    def fake(reps, fla, refs, shapes, progress):
        seen.append(os.environ.get("TRITON_CACHE_AUTOTUNING"))
        return {"measured_copy_bytes_per_s": 4.2e12}

    monkeypatch.setattr(kbench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kbench.torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(kbench, "bench_cuda", fake)
    kbench.main(["--skip-cpu", "--no-fla"])  # no peer, no Triton: the environment stays as it was
    assert seen == [None] and "autotune" not in capsys.readouterr().err
    kbench.main(["--skip-cpu"])
    assert seen == [None, "1"] and "kept in Triton's cache" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    kbench.main(["--skip-cpu"])
    assert seen[-1] == "0" and "FLA re-tunes" in capsys.readouterr().err


def test_launch_config_sets_and_restores_even_after_an_error():
    import types

    from kernels.bench import launch_config
    mod = types.SimpleNamespace(_BT=32, _WARPS=8)
    with launch_config(mod, _BT=8, _WARPS=4):
        assert (mod._BT, mod._WARPS) == (8, 4)
    assert (mod._BT, mod._WARPS) == (32, 8)
    with pytest.raises(RuntimeError, match="mid-sweep"):
        with launch_config(mod, _BT=16):
            raise RuntimeError("mid-sweep")
    assert (mod._BT, mod._WARPS) == (32, 8)
