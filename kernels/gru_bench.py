"""GRU recurrence benchmark: kernels.gru.gru_scan against cuDNN's nn.GRU; prints one JSON object on stdout.

    python -m kernels.gru_bench                       # B, T, C = 64, 512, 128, median of 50
    python -m kernels.gru_bench --B 64 --T 2048 --C 64 --reps 20
    python -m kernels.gru_bench --sweep               # also time other launch configurations (num_warps, BLOCK_B)

Needs a CUDA GPU (it refuses to run otherwise). Contenders, all on the same inputs and weights:
* "cudnn_fp32": nn.GRU's fused call (torch._VF.gru, cuDNN, fp32, TF32 off as in the tests) on x (B, T, 2C),
  the input projection inside it;
* "gru_scan_<precision>" for precision in kernels.gru.PRECISIONS: gi = x @ W_ih^T + b_ih (a torch matmul) and
  gru_scan, the same layer;
* "gru_scan_<precision>_scan_only": gru_scan alone on a precomputed gi (the recurrence the kernels replace).
Each is timed forward (under no_grad) and forward+backward (torch.autograd.grad of every input and weight
with a fixed random cotangent) with CUDA events, one event pair per repetition, after warm-up (Triton's JIT
compile included); medians and p20/p80 in ms, and `gpu_ms`, the summed time of the call's kernels (torch.profiler).
`kernel_stats` gives the registers, spills and shared memory of the forward and backward kernels as compiled for
this GPU. `--sweep` repeats the forward+backward of "bf16_scan_only" for every (num_warps, BLOCK_B) in SWEEP (it
sets kernels.gru's private launch config).
"""
import argparse
import datetime as dt
import json

import torch

from . import gru
from .bench import _log, _time_cuda, gpu_machine, launch_config, time_contenders, triton_kernel_stats
from .gru import PRECISIONS, gru_scan

SWEEP = [(4, 16), (8, 16), (4, 32), (8, 32)]          # (num_warps, BLOCK_B)


def _contenders(B: int, T: int, C: int) -> dict:
    """name -> (forward fn, forward+backward fn), all on one set of inputs and nn.GRU weights."""
    torch.manual_seed(0)
    net = torch.nn.GRU(2 * C, C, batch_first=True).cuda()
    x = torch.randn(B, T, 2 * C, device="cuda", requires_grad=True)
    h0 = torch.tanh(torch.randn(B, C, device="cuda")).requires_grad_()
    gy, gT = torch.randn(B, T, C, device="cuda"), torch.randn(B, C, device="cuda")
    w_ih, b_ih, w_hh, b_hh = net.weight_ih_l0, net.bias_ih_l0, net.weight_hh_l0, net.bias_hh_l0
    with torch.no_grad():
        gi0 = torch.nn.functional.linear(x, w_ih, b_ih)
    gi_leaf = gi0.clone().requires_grad_()

    def cudnn():
        hs, hT = torch._VF.gru(x, h0[None], [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, True, False, True)
        return hs, hT[0], [x, h0, w_ih, b_ih, w_hh, b_hh]

    def layer(precision):
        gi = torch.nn.functional.linear(x, w_ih, b_ih)                                   # (B, T, 3C)
        hs, hT = gru_scan(gi, h0, w_hh, b_hh, precision)
        return hs, hT, [x, h0, w_ih, b_ih, w_hh, b_hh]

    def scan_only(precision):
        hs, hT = gru_scan(gi_leaf, h0, w_hh, b_hh, precision)
        return hs, hT, [gi_leaf, h0, w_hh, b_hh]

    def pair(run):
        def fwd():
            with torch.no_grad():
                run()

        def fwd_bwd():
            hs, hT, wrt = run()
            torch.autograd.grad([hs, hT], wrt, [gy, gT])
        return fwd, fwd_bwd

    out = {"cudnn_fp32": pair(cudnn)}
    for p in PRECISIONS:
        out[f"gru_scan_{p}"] = pair(lambda p=p: layer(p))
        out[f"gru_scan_{p}_scan_only"] = pair(lambda p=p: scan_only(p))
    return out


def kernel_stats(B: int, T: int, C: int) -> dict:
    """Registers a thread, spilled registers and shared memory (bytes) of the two kernels, bf16 precision,
    as compiled here (one direct launch each, kernels.gru's launch configuration)."""
    import triton

    dev = dict(device="cuda", dtype=torch.float32)
    gi, h0 = torch.randn(B, T, 3 * C, **dev), torch.zeros(B, C, **dev)
    w, b = torch.randn(3 * C, C, **dev) * C ** -0.5, torch.zeros(3 * C, **dev)
    hs, hT, gates = torch.empty(B, T, C, **dev), torch.empty(B, C, **dev), torch.empty(B, T, 4, C, **dev)
    dgi, dghn, dh0 = torch.empty(B, T, 3 * C, **dev), torch.empty(B, T, C, **dev), torch.empty(B, C, **dev)
    grid = (triton.cdiv(B, gru._BLOCK_B),)
    cfg = dict(C=C, BLOCK_B=gru._BLOCK_B, DOT="bf16", IP="ieee", num_warps=gru._num_warps(C))
    kf = gru._gru_fwd_kernel[grid](gi, h0, w, b, hs, hT, gates, B, T, **cfg)
    kb = gru._gru_bwd_kernel[grid](hs, hT, hs, gates, w, dgi, dghn, dh0, B, T, **cfg)
    return {"forward": triton_kernel_stats(kf), "backward": triton_kernel_stats(kb), "num_warps": gru._num_warps(C),
            "BLOCK_B": gru._BLOCK_B}


def sweep(B: int, T: int, C: int, reps: int) -> list[dict]:
    """Forward+backward of gru_scan (bf16, scan only) for each (num_warps, BLOCK_B) in SWEEP."""
    rows = []
    for nw, bb in SWEEP:
        with launch_config(gru, _BLOCK_B=bb, _num_warps=lambda C, nw=nw: nw):
            _, fwd_bwd = _contenders(B, T, C)["gru_scan_bf16_scan_only"]
            rows.append({"num_warps": nw, "BLOCK_B": bb, "forward_backward": _time_cuda(fwd_bwd, reps, None, warmup=3),
                         **{k: v for k, v in kernel_stats(B, T, C).items() if k in ("forward", "backward")}})
        _log(f"sweep num_warps={nw} BLOCK_B={bb}: {rows[-1]['forward_backward']['median_ms']:.3f} ms")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--C", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions per contender and phase")
    ap.add_argument("--sweep", action="store_true", help="also time the launch configurations in SWEEP")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.gru_bench: needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "the kernels' CPU tests are `pytest tests/test_gru_kernel.py` (Triton's interpreter)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    B, T, C = args.B, args.T, args.C
    out = {
        "benchmark": "kernels.gru",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": gpu_machine(),
        "shape": {"B": B, "T": T, "C": C},
        "kernel_stats": kernel_stats(B, T, C),
        "timings": time_contenders(_contenders(B, T, C), args.reps),
    }
    base = out["timings"]["cudnn_fp32"]["forward_backward"]["median_ms"]
    out["speedup_vs_cudnn_forward_backward"] = {
        name: base / t["forward_backward"]["median_ms"] for name, t in out["timings"].items() if name != "cudnn_fp32"}
    if args.sweep:
        out["sweep"] = sweep(B, T, C, args.reps)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
