"""Mamba-2 layer and SSD scan, forward+backward per SSD backend in one run. Prints one JSON object on stdout.

    python -m gt_pipeline.engine.mamba_bench                                   # wkv6 vs triton, the shapes below
    python -m gt_pipeline.engine.mamba_bench --backends wkv6 --shapes 16,1024,512

For every shape (B, T, d_model) and backend: one `models.Mamba2(d_model, d_state=64, headdim=64, backend=...)`
(same seed, so the same weights), forward+backward of mean(y^2) under bf16 autocast on CUDA (fp32 on the CPU),
eager; then the scan alone (`ssd_wkv6` for "wkv6", mamba_ssm's `mamba_chunk_scan_combined` for "triton",
`models.ssd.ssd_chunked` for "torch", on the same random inputs). Medians of --reps timings after --warmup
calls: CUDA events on CUDA, a host clock on the CPU. "triton" needs CUDA and mamba_ssm; a backend that cannot
run says why in its row. The cold Triton autotune of mamba_ssm's kernels runs in the warm-up and takes minutes
per new shape.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gt_pipeline.engine.bench import machine_name, note, out_file, write_partial
from models.mamba2 import BACKENDS, Mamba2, _mamba_ssm_ops, ssd_wkv6
from models.ssd import ssd_chunked

SHAPES = [(64, 512, 128), (16, 1024, 512), (8, 4096, 512)]
HEAD = 64   # d_state = headdim: what backend "wkv6" needs


def time_ms(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of fn() over `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'B,T,D;B,T,D' -> [(B, T, D), ...]; ValueError naming the bad entry (three ints >= 1, D a multiple of 32)."""
    out = []
    for part in text.split(";"):
        try:
            shape = tuple(int(x) for x in part.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1 or shape[2] % (HEAD // 2):
            raise ValueError(f"--shapes: {part!r} is not B,T,d_model (ints >= 1, d_model a multiple of {HEAD // 2})")
        out.append(shape)
    return out


def bench_shape(B: int, T: int, d: int, backend: str, device: torch.device, reps: int, warmup: int) -> dict:
    """Layer and scan fwd+bwd milliseconds of one backend at one shape, or {"skipped": why}."""
    scan_triton = _mamba_ssm_ops()[0]
    if backend == "triton" and (device.type != "cuda" or scan_triton is None):
        return {"skipped": "backend 'triton' needs CUDA and an importable mamba_ssm"}
    amp = device.type == "cuda"
    torch.manual_seed(0)
    layer = Mamba2(d_model=d, d_state=HEAD, headdim=HEAD, backend=backend).to(device)
    x = torch.randn(B, T, d, device=device, requires_grad=True)

    def layer_fb():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = layer(x)
        y.float().square().mean().backward()

    H = layer.nheads
    g = torch.Generator(device="cpu").manual_seed(1)
    io = torch.bfloat16 if amp else torch.float32
    mk = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    xs, Bm, Cm = mk(B, T, H, HEAD, dtype=io), mk(B, T, 1, HEAD, dtype=io), mk(B, T, 1, HEAD, dtype=io)
    dt_raw = (torch.randn(B, T, H, generator=g) - 3).to(device).requires_grad_()
    dt_bias, D = torch.zeros(H, device=device, requires_grad=True), torch.ones(H, device=device, requires_grad=True)
    A_log = torch.log(torch.linspace(1, 16, H, device=device)).requires_grad_()
    gy = torch.randn(B, T, H, HEAD, generator=g).to(device, io)

    def scan_fb():
        if backend == "triton":
            y, _ = scan_triton(xs, dt_raw, -torch.exp(A_log), Bm, Cm, chunk_size=layer.chunk_size, D=D,
                               dt_bias=dt_bias, dt_softplus=True, return_final_states=True)
        elif backend == "wkv6":
            y, _ = ssd_wkv6(xs, F.softplus(dt_raw + dt_bias), A_log, Bm, Cm, D=D)
        else:
            y, _ = ssd_chunked(xs, F.softplus(dt_raw + dt_bias), -torch.exp(A_log), Bm, Cm, D=D,
                               chunk_size=min(layer.chunk_size, T))
        torch.autograd.backward(y, gy)

    return {"layer_fwd_bwd_ms": time_ms(layer_fb, device, reps, warmup),
            "scan_fwd_bwd_ms": time_ms(scan_fb, device, reps, warmup),
            "path": layer.ssd_path(x)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="wkv6,triton", help="comma-separated, of " + ", ".join(BACKENDS[1:]))
    ap.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES), help="B,T,d_model;...")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, metavar="FILE", type=out_file, help="also write the JSON here")
    a = ap.parse_args(argv)
    backends = a.backends.split(",")
    for b in backends:
        if b not in BACKENDS[1:]:
            ap.error(f"--backends: {b!r} is not one of {', '.join(BACKENDS[1:])}")
    try:
        shapes = parse_shapes(a.shapes)
    except ValueError as e:
        ap.error(str(e))
    if a.reps < 1 or a.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    device = torch.device(a.device)
    doc = {"benchmark": "mamba2_layer_and_scan", "date": dt.date.today().isoformat(), "machine": machine_name(device),
           "torch": torch.__version__, "command": " ".join(sys.argv), "rows": []}
    for B, T, d in shapes:
        for backend in backends:
            note(f"B={B} T={T} d_model={d} backend={backend}")
            row = {"B": B, "T": T, "d_model": d, "backend": backend,
                   **bench_shape(B, T, d, backend, device, a.reps, a.warmup)}
            doc["rows"].append(row)
            write_partial(a.out, doc)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
