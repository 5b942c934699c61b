"""The profiling tools. kernels.ncu_phases on small source-page exports written the way ncu writes them (one page
per kernel, repeated pages, quoted CSV), and its errors on what is not such an export; kernels.profile_run's
argument errors, its refusal without CUDA and (on a GPU) its two calls; kernels.call_overhead likewise."""
from __future__ import annotations

import csv
import io
import json
import lzma

import pytest

import torch

from kernels import call_overhead, ncu_phases, profile_run

COLS = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
        "Instructions Executed", "stall_wait", "stall_barrier", "stall_wait (Not Issued)"]


def page(name, rows):
    """One kernel page: rows of (sass, samples, executed, wait, barrier)."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(["Kernel Name", name])
    w.writerow(COLS)
    for n, (sass, smp, ex, wait, bar) in enumerate(rows):
        w.writerow([hex(0x1000 + 16 * n), sass, smp, smp, ex, wait, bar, 99])
    return buf.getvalue()


FWD = [("LDS R1, [R2]", 10, 100, 10, 0), ("@!P0 FMUL.FTZ R1, R1, R3", 30, 300, 30, 0), ("BAR.SYNC.DEFER_BLOCKING 0x0", 20, 100, 0, 20),
       ("HMMA.16816.F32.BF16 R4, R8, R12, R4", 40, 400, 40, 0), ("EXIT", 0, 100, 0, 0)]


def write(tmp_path, text, name="rep.csv"):
    p = tmp_path / name
    if name.endswith(".xz"):
        with lzma.open(p, "wt") as f:
            f.write(text)
    else:
        p.write_text(text)
    return p


def test_phases_split_at_barriers_with_shares_and_stalls(tmp_path):
    p = write(tmp_path, page("chunk_forward_kernel<bf16>", FWD))
    (k,) = ncu_phases.report(p)["kernels"]
    assert k["sass_instructions"] == 5 and k["warp_instructions_executed"] == 1000 and k["stall_samples"] == 100
    assert k["stall_reasons"] == {"wait": 0.8, "barrier": 0.2}  # the "(Not Issued)" columns are not counted
    first, second = k["phases"]
    assert first["sass_lines"] == [0, 2] and first["ends_with"] == "BAR"
    assert first["executed_share"] == pytest.approx(0.5) and first["samples_share"] == pytest.approx(0.6)
    assert first["top_opcodes"] == {"FMUL": 0.6, "LDS": 0.2, "BAR": 0.2}  # predicate and modifiers dropped
    assert second["sass_lines"] == [3, 4] and second["ends_with"] == "EXIT"
    assert second["top_opcodes"] == {"HMMA": 0.8, "EXIT": 0.2}


def test_repeated_pages_count_once_and_kernels_filter(tmp_path):
    bwd = [("FADD R1, R2, R3", 5, 50, 5, 0), ("EXIT", 5, 50, 0, 5)]
    text = page("fwd_kernel", FWD) + page("fwd_kernel", FWD) + page("bwd_kernel", bwd) + page("bwd_kernel", bwd)
    p = write(tmp_path, text, "rep.csv.xz")
    names = [k["name"] for k in ncu_phases.report(p)["kernels"]]
    assert names == ["fwd_kernel", "bwd_kernel"]
    (k,) = ncu_phases.report(p, kernel="bwd")["kernels"]
    assert k["warp_instructions_executed"] == 100
    with pytest.raises(ValueError, match="no kernel in .* matches 'gw'"):
        ncu_phases.report(p, kernel="gw")


def test_cli_prints_json_and_writes_out(tmp_path, capsys):
    p = write(tmp_path, page("k", FWD))
    out = tmp_path / "phases.json"
    ncu_phases.main([str(p), "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["kernels"][0]["warp_instructions_executed"] == 1000


@pytest.mark.parametrize("text,match", [
    ("a,b\n1,2\n", "not an ncu source page export"),
    ('"Kernel Name","k"\n"Line","Source"\n"1","x"\n', 'has no "Address" header'),
    ('"Kernel Name","k"\n"Address","Source"\n"0x0","EXIT"\n', "lacks the columns"),
], ids=["not-ncu", "cuda-page", "no-source-counters"])
def test_bad_exports_are_refused_by_name(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        ncu_phases.report(write(tmp_path, text))


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file"):
        ncu_phases.main([str(tmp_path / "missing.csv")])
    p = write(tmp_path, page("k", FWD))
    with pytest.raises(SystemExit, match=r"--kernel 'chunk_\(' is not a regular expression"):
        ncu_phases.main([str(p), "--kernel", "chunk_("])
    with pytest.raises(SystemExit):
        ncu_phases.main([str(p), "--out", str(tmp_path)])
    assert "is a directory; give a file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ncu_phases.main([str(p), "--out", str(tmp_path / "no-such-dir" / "phases.json")])
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("arg", ["16,4096", "16,x,8", "0,16,1", "1,2,3,4"])
def test_profile_run_refuses_bad_shapes(arg, capsys):
    with pytest.raises(SystemExit):
        profile_run.main([arg])
    assert "expected B,T,H (three positive integers)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_profile_run_needs_cuda():
    with pytest.raises(SystemExit, match="need a CUDA GPU; none is visible"):
        profile_run.main(["1,16,1"])


@pytest.mark.gpu
@pytest.mark.parametrize("head", [False, True], ids=["channel", "head"])
def test_profile_run_launches_the_chunked_kernels_in_order(head):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        profile_run.run(2, 40, 2, head=head, w_dtype=torch.float32 if head else torch.bfloat16)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    chunked = [n for n in names if "chunk_" in n]
    kinds = [next(k for k in ("scores", "forward", "backward", "gw") if f"chunk_{k}" in n) for n in chunked]
    per_call = ["forward", "backward", "gw"] if head else ["scores", "forward", "backward", "gw"]
    assert kinds == per_call * 2, chunked
    assert len(per_call) == profile_run.kernels_per_call(head)


@pytest.mark.parametrize("argv, message", [(["64,512"], "expected B,T,H (three positive integers)"),
                                           (["1,16,1", "--calls", "0"], "--calls and --rounds must be >= 1")])
def test_call_overhead_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        call_overhead.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_call_overhead_needs_cuda():
    with pytest.raises(SystemExit, match="need a CUDA GPU; none is visible"):
        call_overhead.main(["1,16,1"])


@pytest.mark.gpu
def test_call_overhead_times_every_path(tmp_path, capsys):
    out = tmp_path / "calls.json"
    call_overhead.main(["2,40,2", "--calls", "3", "--rounds", "2", "--out", str(out)])
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    assert set(doc["paths"]) == set(call_overhead.PATHS)
    for p in doc["paths"].values():
        assert p["host_ms_per_call"] > 0 and p["wall_ms_per_call"] > 0

