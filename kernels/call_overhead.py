"""Where the wall time of one chunked wkv6 forward+backward goes when its kernels are short; prints JSON.

    python -m kernels.call_overhead 64,512,2 [--calls 50] [--rounds 5] [--out FILE]

Three paths run the same chunked fwd+bwd at one shape (bf16, K = V = 64, one decay per channel, inputs as in
`kernels.bench`): `autograd` (`wkv6` then `torch.autograd.grad`, what a training step runs), `custom_ops` (the two
registered ops called directly, no autograd) and `extension` (the compiled extension's forward and backward). Each
path runs `--calls` times back to back, `--rounds` times (after 20 warm-up calls): per call, the host's time to
issue it (`perf_counter`, no sync inside the loop) and the wall time (CUDA events around the loop). When the host
time exceeds the kernels' time, the wall time is the host's: that difference is the framework's share.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .bench import _inputs, out_file, shape_arg
from .build import get_extension, write_json_atomic
from .wkv6 import wkv6

PATHS = ("autograd", "custom_ops", "extension")


def _calls(B: int, T: int, H: int) -> dict:
    """{path: fn} running one fwd+bwd each."""
    ops = importlib.import_module("kernels.wkv6")  # the module (the package exports the function under its name)
    xs, gy = _inputs(B, T, H, torch.bfloat16, "cuda")
    leaves = [x.clone().requires_grad_(True) for x in xs]
    r, k, v, w, u = xs
    gs = torch.zeros(B, H, r.shape[-1], v.shape[-1], device="cuda")
    ext = get_extension("cuda")

    def autograd_path():
        y, _ = wkv6(*leaves, impl="chunked")
        return torch.autograd.grad(y, leaves, gy)

    def custom_ops():
        _, _, scores = ops._wkv6_fwd(r, k, v, w, u, None, True, True)
        return ops._wkv6_bwd(r, k, v, w, u, None, gy, gs, True, scores)

    def extension():
        _, _, scores = ext.forward(r, k, v, w, u, None, True, True)
        return ext.backward(r, k, v, w, u, None, gy, gs, True, scores)

    return {"autograd": autograd_path, "custom_ops": custom_ops, "extension": extension}


def measure(fn, calls: int, rounds: int, warmup: int = 20) -> dict:
    """Median over rounds of the host time and the wall time per call of `calls` back-to-back calls of fn."""
    for _ in range(warmup):
        fn()
    host, wall = [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append(1e3 * (time.perf_counter() - t0) / calls)
        end.record()
        torch.cuda.synchronize()
        wall.append(start.elapsed_time(end) / calls)
    return {"host_ms_per_call": statistics.median(host), "wall_ms_per_call": statistics.median(wall)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", type=shape_arg, metavar="B,T,H")
    ap.add_argument("--calls", type=int, default=50, help="back-to-back calls per round (default 50)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; the medians are reported (default 5)")
    ap.add_argument("--out", type=out_file, default=None, help="also write the JSON document to FILE")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        ap.error(f"--calls and --rounds must be >= 1, got {args.calls} and {args.rounds}")
    if not torch.cuda.is_available():
        sys.exit("call_overhead: the chunked wkv6 kernels need a CUDA GPU; none is visible")
    B, T, H = args.shape
    fns = _calls(B, T, H)
    doc = {"benchmark": "wkv6_call_overhead", "device": torch.cuda.get_device_name(), "B": B, "T": T, "H": H,
           "calls": args.calls, "rounds": args.rounds, "paths": {}}
    for name in PATHS:
        doc["paths"][name] = measure(fns[name], args.calls, args.rounds)
        print(f"call_overhead {B},{T},{H} {name}: {doc['paths'][name]}", file=sys.stderr)
    text = json.dumps(doc, indent=2)
    if args.out:
        write_json_atomic(Path(args.out), doc)
    print(text)


if __name__ == "__main__":
    main()
