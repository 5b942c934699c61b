"""Mamba-2 depthwise conv benchmark: kernels.conv against causal_conv1d and the compiled PyTorch conv; prints JSON.

    python -m gt_pipeline.engine.conv_bench          # d_model 512 (conv_dim 1152), B, T = 16, 1024, median of 50
    python -m gt_pipeline.engine.conv_bench --d-model 128 --B 64 --T 512
    python -m gt_pipeline.engine.conv_bench --sweep  # also the backward kernel's launch configurations (SWEEP)

Needs a CUDA GPU (it refuses to run otherwise). Every contender runs a Mamba-2 layer's own conv
(`models.Mamba2._conv`, d_state = headdim = --d-state) on the same bf16 xBC, a column slice of a wider tensor as
in the layer (the in_proj output), with its fp32 weights:
* "triton": conv_impl "triton", eager: kernels.conv.causal_conv1d_silu;
* "triton_compiled": conv_impl "auto" under torch.compile, the training step's path (Triton kernels, plus any
  copies Inductor puts around the custom op);
* "torch_compiled": conv_impl "torch" under torch.compile: the PyTorch conv Inductor fuses;
* "causal_conv1d": conv_impl "auto", eager, where the package is importable: its CUDA kernel on the layout copy
  the layer makes (`models.mamba2.causal_conv1d_layout`).
Each is timed forward (no_grad) and forward+backward (grads of xBC, weight and bias for a fixed cotangent) with
CUDA events after warm-up (compiles included there); medians and p20/p80 in ms, and `gpu_ms`, the summed time
of the call's kernels (torch.profiler): one eager layer call is host-bound, so `gpu_ms` is what ranks the paths
inside a compiled, CUDA-graphed training step, and the speedups are of it. `bytes_bound_ms` is the time to
read x and write y (forward), then read x and dy and write dx (backward) once at the measured copy rate;
`kernel_stats` gives registers and shared memory of the two Triton kernels as compiled here.
"""
import argparse
import datetime as dt
import json

import torch

from kernels import conv
from kernels.bench import (_copy_bandwidth, _log, bytes_bound_ms, gpu_machine, kernel_times, launch_config,
                           time_contenders, triton_kernel_stats)
from models.mamba2 import Mamba2, _mamba_ssm_ops

# Backward launch configurations --sweep times: (BT steps a tile, TILES tiles a program, num_warps).
SWEEP = [(16, 4, 8), (8, 8, 8), (8, 16, 8), (8, 32, 8), (16, 8, 8), (8, 8, 4)]


def _contenders(B: int, T: int, d_model: int, d_state: int) -> tuple[dict, int, int]:
    """(name -> (forward fn, forward+backward fn), conv_dim, d_conv)."""
    torch.manual_seed(0)
    layer = Mamba2(d_model, d_state=d_state, headdim=d_state).cuda()
    D = layer.conv_dim
    wide = torch.randn(B, T, D + 64, device="cuda", dtype=torch.bfloat16)
    xbc = wide[:, :, 32:32 + D].detach().requires_grad_()                 # strided like the in_proj column slice
    gy = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    wrt = [xbc, layer.conv1d.weight, layer.conv1d.bias]

    def run_with(impl, compiled):
        def conv_of(x):
            return layer._conv(x, None)[0]
        f = torch.compile(conv_of) if compiled else conv_of

        def run():
            layer.conv_impl = impl
            return f(xbc)
        return run

    def pair(run):
        def fwd():
            with torch.no_grad():
                run()

        def fwd_bwd():
            torch.autograd.grad(run(), wrt, gy)
        return fwd, fwd_bwd

    out = {"triton": pair(run_with("triton", False)),
           "triton_compiled": pair(run_with("auto", True)),
           "torch_compiled": pair(run_with("torch", True))}
    if _mamba_ssm_ops()[1] is not None:
        out["causal_conv1d"] = pair(run_with("auto", False))
    return out, D, layer.d_conv


def kernel_stats(B: int, T: int, D: int, W: int) -> dict:
    """Registers a thread and shared memory (bytes) of the forward and backward kernels as compiled here (one direct
    launch each, kernels.conv's launch configuration)."""
    dev = dict(device="cuda", dtype=torch.float32)
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    w_t, b = torch.randn(W, D, **dev), torch.randn(D, **dev)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    grid, bwd_grid = conv._grid(B, T, D), conv._bwd_grid(B, T, D)
    part = torch.empty(B * bwd_grid[0], W + 1, D, **dev)
    kf = conv._fwd_kernel[grid](x, w_t, b, y, T, D, x.stride(0), x.stride(1),
                                HAS_BIAS=True, W=W, BT=conv._BT, BD=conv._BD, num_warps=conv._WARPS)
    kb = conv._bwd_kernel[bwd_grid](x, w_t, b, y, dx, part, T, D, x.stride(0), x.stride(1), HAS_BIAS=True, W=W,
                                    BT=conv._BWD_BT, BD=conv._BD, TILES=conv._BWD_TILES, num_warps=conv._BWD_WARPS)
    return {"forward": {**triton_kernel_stats(kf), "tile": [conv._BT, conv._BD], "num_warps": conv._WARPS},
            "backward": {**triton_kernel_stats(kb), "tile": [conv._BWD_BT, conv._BD], "tiles_per_program":
                         conv._BWD_TILES, "num_warps": conv._BWD_WARPS}}


def sweep(B: int, T: int, D: int, W: int) -> list[dict]:
    """The backward kernel's GPU time (kernel_times of the backward op alone, its partials' sum included) for each
    configuration in SWEEP, on one bf16 input; `max_abs_diff` compares its dx and weight/bias gradients with the
    configuration kernels.conv ships. It sets kernels.conv's private launch configuration (launch_config)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, D + 64, device="cuda", generator=g).to(torch.bfloat16)[:, :, 32:32 + D]
    w_t, b = torch.randn(W, D, device="cuda", generator=g) * W ** -0.5, torch.randn(D, device="cuda", generator=g)
    dy = torch.randn(B, T, D, device="cuda", generator=g).to(torch.bfloat16)
    dx0, dwb0 = conv._conv_bwd(x, w_t, b, dy)                  # the shipped configuration
    rows = []
    for bt, tiles, nw in SWEEP:
        with launch_config(conv, _BWD_BT=bt, _BWD_TILES=tiles, _BWD_WARPS=nw):
            dx, dwb = conv._conv_bwd(x, w_t, b, dy)
            diff = max(float((dx.float() - dx0.float()).abs().max()), float((dwb - dwb0).abs().max()))
            rows.append({"tile": [bt, conv._BD], "tiles_per_program": tiles, "num_warps": nw,
                         "gpu_ms": kernel_times(lambda: conv._conv_bwd(x, w_t, b, dy), n=20)["total_ms"],
                         "max_abs_diff": diff, "backward": kernel_stats(B, T, D, W)["backward"]})
        _log(f"sweep BT={bt} TILES={tiles} num_warps={nw}: {rows[-1]['gpu_ms']:.3f} ms")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-state", type=int, default=64,
                    help="Mamba-2 d_state (= headdim); conv_dim = 2 d_model + 2 d_state")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions per contender and phase")
    ap.add_argument("--sweep", action="store_true", help="also time the backward's launch configurations in SWEEP")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gt_pipeline.engine.conv_bench: needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "the kernels' CPU tests are `pytest tests/test_conv_kernel.py` (Triton's interpreter)")
    contenders, D, W = _contenders(args.B, args.T, args.d_model, args.d_state)
    rate = _copy_bandwidth()
    elems = args.B * args.T * D
    out = {
        "benchmark": "gt_pipeline.engine.conv_bench",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": gpu_machine(),
        "shape": {"B": args.B, "T": args.T, "conv_dim": D, "width": W, "dtype": "bfloat16"},
        "copy_GBps": rate / 1e9,
        "bytes_bound_ms": {"forward": bytes_bound_ms(2 * 2 * elems, rate),
                           "forward_backward": bytes_bound_ms(5 * 2 * elems, rate)},
        "kernel_stats": kernel_stats(args.B, args.T, D, W),
        "timings": time_contenders(contenders, args.reps),
    }
    base = out["timings"]["torch_compiled"]["forward_backward"]["gpu_ms"]
    out["gpu_speedup_vs_torch_compiled_forward_backward"] = {
        name: base / t["forward_backward"]["gpu_ms"]
        for name, t in out["timings"].items() if name != "torch_compiled"}
    if args.sweep:
        out["sweep"] = sweep(args.B, args.T, D, W)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
