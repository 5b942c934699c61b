"""gt_pipeline.engine.mamba_bench on the CPU: rows per backend, the JSON on stdout and in --out, bad input."""
from __future__ import annotations

import json

import pytest

from gt_pipeline.engine import mamba_bench


def test_cpu_run_writes_one_row_per_shape_and_backend(tmp_path, capsys):
    out = tmp_path / "m.json"
    mamba_bench.main(["--device", "cpu", "--backends", "wkv6,torch,triton", "--shapes", "2,24,64;1,17,32",
                      "--reps", "1", "--warmup", "0", "--out", str(out)])
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    rows = {(r["B"], r["T"], r["d_model"], r["backend"]): r for r in doc["rows"]}
    assert len(rows) == 6
    for shape in ((2, 24, 64), (1, 17, 32)):
        for backend in ("wkv6", "torch"):
            row = rows[(*shape, backend)]
            assert row["path"] == backend
            assert row["layer_fwd_bwd_ms"] > 0 and row["scan_fwd_bwd_ms"] > 0
        assert "needs CUDA" in rows[(*shape, "triton")]["skipped"]


@pytest.mark.parametrize("args, match", [
    (["--shapes", "2,24"], "is not B,T,d_model"),
    (["--shapes", "2,24,50"], "is not B,T,d_model"),
    (["--backends", "wkv7"], "'wkv7' is not one of"),
    (["--reps", "0"], "--reps must be >= 1"),
])
def test_bad_arguments_are_refused_with_the_reason(args, match, capsys):
    with pytest.raises(SystemExit):
        mamba_bench.main(["--device", "cpu", *args])
    assert match in capsys.readouterr().err
