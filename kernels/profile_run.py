"""Two forward+backward calls of the chunked wkv6 kernels at one shape, for a profiler to wrap.

    ncu --set full --import-source yes -k regex:chunk_ --launch-skip 4 --launch-count 4 -o rep \\
        python -m kernels.profile_run 16,4096,8 [--head] [--w-dtype fp32]

Each call launches the chunks' scores (one decay per channel only), the forward, the backward sweeps and gw, in
that order (`kernels_per_call`: 4, or 3 with `--head`): the first call warms up (the extension is built or loaded
before it), `--launch-skip 4 --launch-count 4` (`3` with `--head`) profiles the second. Inputs as in
`kernels.bench` (`_inputs`): bf16 r, k, v, gy, K = V = 64, raw decays w ~ U(-6, 1) (decays 0.07 .. 0.9975) in bf16,
one per channel, cast to fp32 with `--w-dtype fp32`; `--head` keeps channel 0's ([B, T, H, 1], fp32 by default:
Mamba-2's form).
"""
from __future__ import annotations

import argparse
import sys

import torch

from .bench import _inputs, shape_arg
from .wkv6 import wkv6


def kernels_per_call(head: bool) -> int:
    """Chunked kernels one forward+backward launches: the scores kernel (one decay per channel), the forward, the
    backward sweeps, gw."""
    return 3 if head else 4


def run(B: int, T: int, H: int, head: bool, w_dtype: torch.dtype, calls: int = 2) -> None:
    xs, gy = _inputs(B, T, H, torch.bfloat16, "cuda")
    w = xs[3][..., :1] if head else xs[3]  # one decay per head: channel 0's
    xs[3] = w.to(w_dtype).contiguous()
    xs = [t.requires_grad_() for t in xs]
    for _ in range(calls):
        y, _ = wkv6(*xs, impl="chunked")
        torch.autograd.grad(y, xs, gy)
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", type=shape_arg, metavar="B,T,H")
    ap.add_argument("--head", action="store_true", help="one decay per head, w [B, T, H, 1]")
    ap.add_argument("--w-dtype", choices=["bf16", "fp32"], default=None,
                    help="the decays' dtype (default: bf16 per channel, fp32 per head)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_run: the chunked wkv6 kernels need a CUDA GPU; none is visible")
    w_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.w_dtype or ("fp32" if args.head else "bf16")]
    run(*args.shape, head=args.head, w_dtype=w_dtype)
    B, T, H = args.shape
    n = kernels_per_call(args.head)
    print(f"profile_run: 2 forward+backward calls at B, T, H = {B}, {T}, {H}, "
          f"{'one decay per head' if args.head else 'one decay per channel'}, w {w_dtype}: {n} chunked kernels "
          f"a call (ncu --launch-skip {n} --launch-count {n} takes the second)", file=sys.stderr)


if __name__ == "__main__":
    main()
