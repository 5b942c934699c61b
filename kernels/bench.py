"""wkv6 benchmark; prints one JSON document on stdout.

    python -m kernels.bench                 # CUDA part if a GPU is visible, CPU part always
    python -m kernels.bench --skip-cpu      # GPU numbers only

CUDA part: bf16 inputs, K = V = 64, shapes (B, T, H) in SHAPES; for every shape, in one run and on
the same inputs: our chunked tensor-core kernel (`impl="chunked"`), our sequential kernel (the
official kernel's algorithm, `impl="sequential"`) and, when the bench-only extra is installed
(`pip install -e '.[bench]'`), FLA's `chunk_rwkv6` (given the log-decay -exp(w), computed before
timing, and scale 1). Forward (under no_grad) and
forward+backward (torch.autograd.grad with a fixed random gy) medians and p20/p80 from CUDA events,
one event pair per repetition, L2 flushed (256 MiB write) before each repetition, the extension built
before anything is timed and each contender warmed up (Triton autotune included) by a call just before its
timing. Shapes run in order, our kernels before the peers; `--out FILE` keeps the document so far on disk, so
a run stopped part-way keeps what it timed. FLA's Triton autotune results stay in Triton's on-disk cache
(`keep_autotune_results`), so only the first run on a machine pays for them. The sequential and chunked PyTorch references run
too, on the smallest shape.

Bytes bound, per shape (`wkv6_bytes_moved`): the bytes the op must read and write at least, each tensor
once, in its own dtype. Forward: read r, k, w [B,T,H,K], v [B,T,H,V], u [H,K] fp32; write y
[B,T,H,V]. Backward: read r, k, v, w, u and gy, write gr, gk, gv, gw, gu. Forward+backward = both (the
timed forward+backward runs the forward too). The final state (not requested here) and scratch are
not counted. `bytes_moved` / the device-to-device copy bandwidth measured at the start of the run
(`copy_bandwidth_GBps`, a 1 GiB copy timed with CUDA events, bytes read + written) is `bytes_bound_ms`,
the time the op would take if it only moved its bytes at copy speed; each contender's
`fraction_of_bytes_bound` = bytes_bound_ms / its median time (1.0 = as fast as a copy). The older
`*_fraction_of_hbm_bound` fields divide by the GPU's nominal HBM bandwidth instead.

Per shape, `ours_chunked.phases` splits our fwd+bwd GPU time by kernel (torch.profiler): the chunks' scores
(all chunks at once), the forward, the backward's two sweeps (one launch) and gw, each with its blocks,
resident blocks per SM and waves on this GPU, and for the forward and the sweeps the microseconds per 16-step
chunk of one block: they walk the chunks in order, so that latency times the chunk count is their floor. Each
kernel also gets the bytes it must move itself (`chunk_kernel_bytes`: its inputs read and outputs written once,
the scores and the backward's fp32 scratch for gw included) and its `fraction_of_bytes_bound` at the measured copy
bandwidth. `fla_chunk_rwkv6.kernels` lists FLA's top kernels.

CPU part: forward+backward of (B, T, H) = (4, 1024, 4), K = V = 64, float32, the C++ extension
vs the sequential PyTorch reference `wkv6_ref`, same process, ratio reported.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .build import build_extension, get_extension, write_json_atomic
from .reference import wkv6_chunked_ref, wkv6_ref
from .wkv6 import chunk_scores_numel, wkv6

SHAPES = [(16, 4096, 8), (8, 4096, 32), (64, 512, 2), (4, 2048, 32)]
PHASES = ("forward", "forward_backward")   # the two timings per contender, each with its bytes bound
IMPLS = ("chunked", "sequential")
HEAD = 64
# Nominal HBM bandwidth (bytes/s) by device-name fragment, most specific first.
NOMINAL_HBM = [("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("A100-SXM4-80GB", 2.039e12),
               ("A100", 1.555e12)]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _inputs(B, T, H, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    r, k, v = (mk(B, T, H, HEAD).to(device, dtype) for _ in range(3))
    w = (torch.rand(B, T, H, HEAD, generator=g) * 7 - 6).to(device, dtype)  # decays 0.9975 .. 0.07
    u = mk(H, HEAD).to(device, torch.float32)
    gy = mk(B, T, H, HEAD).to(device, dtype)
    return [r, k, v, w, u], gy


def _quantiles(ts: list[float]) -> dict:
    ts = sorted(ts)
    q = lambda p: ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(ts), "p20_ms": q(0.2), "p80_ms": q(0.8), "reps": len(ts)}


def _time_cuda(fn, reps: int, flush: torch.Tensor | None, warmup: int = 1) -> dict:
    """Quantiles (ms) of `reps` CUDA-event timings of fn() after `warmup` calls; `flush` (a large buffer, or
    None for no flush) is zeroed before each repetition."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in ev:
        if flush is not None:
            flush.zero_()  # evict L2 (50 MB on H100) so every repetition reads from HBM
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in ev])


def time_contenders(contenders: dict, reps: int) -> dict:
    """{name: {"forward", "forward_backward"}} timings of {name: (fwd, fwd_bwd)}, each logged to stderr as it
    finishes (kernels.gru_bench, gt_pipeline.engine.conv_bench): the wall medians of _time_cuda (3 warm-up calls)
    and "gpu_ms", the GPU time of the call's kernels (kernel_times). A short eager call spends more time on the
    host than on the GPU, so the wall median alone does not rank kernels that a compiled, CUDA-graphed step runs."""
    out = {}
    for name, (fwd, fwd_bwd) in contenders.items():
        out[name] = {phase: {**_time_cuda(fn, reps, None, warmup=3), "gpu_ms": kernel_times(fn)["total_ms"]}
                     for phase, fn in (("forward", fwd), ("forward_backward", fwd_bwd))}
        fb = out[name]["forward_backward"]
        _log(f"{name}: fwd+bwd {fb['median_ms']:.3f} ms wall, {fb['gpu_ms']:.3f} ms of kernels")
    return out


@contextlib.contextmanager
def launch_config(module, **values):
    """Inside: the module's private launch-configuration globals set to `values` (a benchmark's --sweep); the
    kernels read them at each call. Restored on exit, also after an error."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def gpu_machine() -> dict:
    """The GPU and software versions a Triton kernel benchmark records."""
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version()}


def triton_kernel_stats(k) -> dict:
    """Registers a thread, spilled registers and shared memory (bytes) of a launched Triton kernel (what a
    launch returns), None where this Triton version does not say."""
    return {"registers": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None),
            "shared_bytes": getattr(getattr(k, "metadata", None), "shared", None)}


def wkv6_bytes_moved(B: int, T: int, H: int, K: int, V: int, io_bytes: int = 2, u_bytes: int = 4) -> dict:
    """Bytes the wkv6 op must read and write (module docstring), r, k, v, w, y and their gradients in elements of
    `io_bytes` (bf16: 2), u and gu of `u_bytes` (fp32: 4): {"forward", "backward", "forward_backward"}."""
    rkw = 3 * B * T * H * K * io_bytes                    # r, k, w (or gr, gk, gw)
    vy = B * T * H * V * io_bytes                         # v, y, gy or gv: one of them
    u = H * K * u_bytes
    forward = rkw + vy + u + vy                           # read r, k, w, v, u; write y
    backward = (rkw + vy + u + vy) + (rkw + vy + u)       # read r, k, w, v, u, gy; write gr, gk, gw, gv, gu
    return {"forward": forward, "backward": backward, "forward_backward": forward + backward}


def bytes_bound_ms(nbytes: int, bytes_per_s: float) -> float:
    """Milliseconds to move `nbytes` at `bytes_per_s` (read + written bytes per second, as _copy_bandwidth)."""
    return 1e3 * nbytes / bytes_per_s


def _copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second (median of 10)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ts = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return 2 * a.numel() / (statistics.median(ts[2:]) * 1e-3)


def kernel_times(fn, n: int = 5, top: int = 8) -> dict:
    """GPU time per call of fn(), split by kernel (torch.profiler over `n` calls after one warm-up):
    {"total_ms", "kernels": [{"name", "ms", "calls"}] for the `top` kernels by time, "all": every kernel}."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = [{"name": ev.key[:100], "ms": ev.self_device_time_total / 1e3 / n, "calls": ev.count / n}
            for ev in prof.key_averages() if ev.device_type.name == "CUDA" and ev.self_device_time_total > 0]
    rows.sort(key=lambda r: -r["ms"])
    return {"total_ms": sum(r["ms"] for r in rows), "kernels": rows[:top], "all": rows}


# The chunked kernels by the fragment of their (mangled) names: the chunks' scores, the forward, both backward
# sweeps in one launch, gw.
CHUNK_KERNELS = (("scores", "chunk_scores_kernel"), ("forward", "chunk_forward_kernel"),
                 ("backward_sweeps", "chunk_backward_kernel"), ("gw", "chunk_gw_kernel"))
# The kernels that walk a sequence's chunks in order, one block per sequence (or sweep)
WALKS = ("forward", "backward_sweeps")
SCORES_BLOCKS_PER_SM = 32   # chunk_scores_kernel's grid: min(chunks of all sequences, 32 x the SMs)


def chunk_kernel_bytes(B: int, T: int, H: int, K: int = 64, io_bytes: int = 2, w_bytes: int = 2) -> dict:
    """Bytes each chunked kernel must read and write (one decay per channel, each tensor once; r, k, v, y and
    their gradients of `io_bytes`, w and gw of `w_bytes`, the gw terms fp32; the scores, 2 x 16 x 16 bf16 per
    16 x K chunk of one sequence, K = 64: one byte per element):
      scores: read r, k, w (and u), write the scores;
      forward: read r, k, v, w, u and the scores, write y;
      backward_sweeps: each of the two sweeps reads r, k, v, w, gy, sweep 2 also the scores; sweep 1 writes gr
        and its fp32 gw terms, sweep 2 gk, gv and its own;
      gw: read both sweeps' fp32 terms and w, write gw."""
    E = B * T * H * K
    inputs = 3 * E * io_bytes + E * w_bytes                  # r, k, v, w
    scores = 2 * chunk_scores_numel(B, T, H)                   # bf16
    return {"scores": 2 * E * io_bytes + E * w_bytes + H * K * 4 + scores,
            "forward": inputs + H * K * 4 + scores + E * io_bytes,
            "backward_sweeps": 2 * (inputs + E * io_bytes) + scores + 3 * E * io_bytes + 2 * 4 * E,
            "gw": 2 * 4 * E + 2 * E * w_bytes}


def chunked_phases(fwd_bwd, B: int, T: int, H: int, sms: int, occupancy: dict, bytes_per_s: float | None = None,
                   io_bytes: int = 2, w_bytes: int = 2) -> dict:
    """Where the chunked fwd+bwd spends its GPU time: per kernel, its ms, the µs per 16-step chunk of one block
    (the kernels walk the chunks in order), its blocks and the waves they need on this GPU, its bytes
    (`chunk_kernel_bytes`) and, given the copy bandwidth `bytes_per_s`, its fraction of that bytes bound."""
    prof = kernel_times(fwd_bwd)
    nbytes = chunk_kernel_bytes(B, T, H, io_bytes=io_bytes, w_bytes=w_bytes)
    chunks = -(-T // 16)
    blocks = {"scores": min(B * H * chunks, SCORES_BLOCKS_PER_SM * sms), "forward": B * H,
              "backward_sweeps": 2 * B * H, "gw": B * H}
    out = {"total_ms": prof["total_ms"], "kernels": {}}
    for phase, frag in CHUNK_KERNELS:
        ms = sum(r["ms"] for r in prof["all"] if frag in r["name"])
        per_sm = occupancy.get("backward" if phase == "backward_sweeps" else phase, 0)
        waves = -(-blocks[phase] // (sms * per_sm)) if per_sm > 0 else None
        out["kernels"][phase] = {"ms": ms, "blocks": blocks[phase], "blocks_per_sm": per_sm, "waves": waves,
                                 "us_per_chunk_step": 1e3 * ms / (chunks * (waves or 1)) if phase in WALKS else None,
                                 "bytes": nbytes[phase],
                                 "fraction_of_bytes_bound": (bytes_bound_ms(nbytes[phase], bytes_per_s) / ms
                                                             if bytes_per_s and ms > 0 else None)}
    out["other_ms"] = prof["total_ms"] - sum(k["ms"] for k in out["kernels"].values())
    return out


def keep_autotune_results(environ=None) -> bool:
    """Have Triton keep its autotune results on disk beside its compiled kernels (TRITON_CACHE_AUTOTUNING=1;
    TRITON_CACHE_DIR, default ~/.triton/cache), unless the caller set the variable. FLA's autotune at the
    default shapes takes about 200 s on a fresh H200; later runs read the results back. Triton keys them by
    its version, the GPU target, the kernel's source and the shapes' tuning key. Returns whether
    results are kept (TRITON_CACHE_AUTOTUNING=0 re-tunes every run)."""
    environ = os.environ if environ is None else environ
    environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    return environ["TRITON_CACHE_AUTOTUNING"].lower() in ("1", "true", "on")  # as Triton reads it


def _fla_chunk():
    """FLA's chunk_rwkv6 (bench-only extra), or None when it is not installed."""
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
    except ImportError:
        return None
    return chunk_rwkv6


def _contenders(xs, gy, fla: bool = True):
    """name -> (forward fn, forward+backward fn) on the same inputs."""
    r, k, v, w, u = xs
    out = {}
    for impl in IMPLS:
        def fwd(impl=impl):
            with torch.no_grad():
                wkv6(*xs, impl=impl)

        def fwd_bwd(impl=impl):
            y, _ = wkv6(*xs, impl=impl)
            torch.autograd.grad(y, xs, gy)

        out[f"ours_{impl}"] = (fwd, fwd_bwd)
    chunk_rwkv6 = _fla_chunk() if fla else None
    if chunk_rwkv6 is not None:
        g = (-torch.exp(w.detach().float())).requires_grad_(True)   # FLA takes the log-decay
        fla_in = [r, k, v, g, u]

        def fla_fwd():
            with torch.no_grad():
                chunk_rwkv6(r, k, v, g, u, scale=1.0)

        def fla_fwd_bwd():
            y, _ = chunk_rwkv6(r, k, v, g, u, scale=1.0)
            torch.autograd.grad(y, fla_in, gy)

        out["fla_chunk_rwkv6"] = (fla_fwd, fla_fwd_bwd)
    return out


def bench_cuda(reps: int, fla: bool = True, refs: bool = True, shapes=SHAPES, progress=None) -> dict:
    """The CUDA part (module docstring). `progress(doc)`, if given, receives the document so far after every timed
    contender, so a run stopped part-way (a peer's long Triton autotune, a call's time limit) keeps what it timed."""
    name = torch.cuda.get_device_name()
    peak = next((bw for frag, bw in NOMINAL_HBM if frag in name), None)
    info = build_extension("cuda")
    occupancy = dict(get_extension("cuda").chunk_occupancy())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _log(f"cuda {name}: {sms} SMs; resident blocks per SM of the chunked kernels {occupancy}")
    copy_bw = _copy_bandwidth()   # before the inputs exist: the 2 GiB of copy buffers are freed again
    _log(f"cuda device-to-device copy: {copy_bw / 1e9:.0f} GB/s")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    cases = {}
    for s in shapes:
        xs, gy = _inputs(*s, torch.bfloat16, "cuda")
        xs = [x.requires_grad_(True) for x in xs]
        cases[s] = (xs, gy, _contenders(xs, gy, fla))
    fla_fn = _fla_chunk() if fla else None
    rows, peers = [], {}
    doc = {"device": name, "sms": sms, "chunked_blocks_per_sm": occupancy, "nominal_hbm_bytes_per_s": peak,
           "measured_copy_bytes_per_s": copy_bw, "build": info,
           "fla_version": getattr(__import__("fla"), "__version__", "?") if fla_fn else None,
           "triton_autotune_cached": os.environ.get("TRITON_CACHE_AUTOTUNING") if fla_fn else None,
           "shapes": rows, "peers_same_run": peers}
    report = progress or (lambda d: None)
    for (B, T, H), (xs, gy, cont) in cases.items():
        E = B * T * H * HEAD
        moved = wkv6_bytes_moved(B, T, H, HEAD, HEAD, io_bytes=xs[0].element_size(), u_bytes=xs[4].element_size())
        row = {"B": B, "T": T, "H": H, "K": HEAD, "V": HEAD, "dtype": "bfloat16",
               "forward_bytes": 5 * E * 2, "forward_backward_bytes": 14 * E * 2,
               "bytes_moved": {p: moved[p] for p in PHASES},
               "bytes_bound_ms": {p: bytes_bound_ms(moved[p], copy_bw) for p in PHASES}}
        if peak:
            row["forward_bound_ms"] = 1e3 * row["forward_bytes"] / peak
            row["forward_backward_bound_ms"] = 1e3 * row["forward_backward_bytes"] / peak
        rows.append(row)
        for cname, (f_fn, fb_fn) in cont.items():   # each warmed up (build, autotune) by its first timing
            f, fb = _time_cuda(f_fn, reps, flush), _time_cuda(fb_fn, reps, flush)
            res = {"forward": f, "forward_backward": fb, "forward_us_per_step": 1e3 * f["median_ms"] / T,
                   "forward_backward_tokens_per_s": B * T / (fb["median_ms"] * 1e-3)}
            if peak:
                res["forward_fraction_of_hbm_bound"] = row["forward_bound_ms"] / f["median_ms"]
                res["forward_backward_fraction_of_hbm_bound"] = row["forward_backward_bound_ms"] / fb["median_ms"]
            frac = {p: row["bytes_bound_ms"][p] / t["median_ms"] for p, t in zip(PHASES, (f, fb))}
            res["fraction_of_bytes_bound"] = frac
            row[cname] = res
            _log(f"cuda {B},{T},{H} {cname}: fwd {f['median_ms']:.3f} ms ({frac['forward']:.1%} of the bytes bound), "
                 f"fwd+bwd {fb['median_ms']:.3f} ms ({frac['forward_backward']:.1%})")
            report(doc)
        phases = chunked_phases(cont["ours_chunked"][1], B, T, H, sms, occupancy, copy_bw,
                                io_bytes=xs[0].element_size(), w_bytes=xs[3].element_size())
        row["ours_chunked"]["phases"] = phases
        _log(f"cuda {B},{T},{H} ours_chunked kernels: " + ", ".join(
            f"{p} {k['ms']:.3f} ms ({k['fraction_of_bytes_bound']:.1%} of its bytes bound)"
            for p, k in phases["kernels"].items() if k["fraction_of_bytes_bound"] is not None))
        if "fla_chunk_rwkv6" in cont:
            fla_prof = kernel_times(cont["fla_chunk_rwkv6"][1])
            row["fla_chunk_rwkv6"]["kernels"] = {k: fla_prof[k] for k in ("total_ms", "kernels")}
        ours = row["ours_chunked"]["forward_backward"]["median_ms"]
        row["chunked_speedup_fwd_bwd"] = {c: row[c]["forward_backward"]["median_ms"] / ours
                                          for c in cont if c != "ours_chunked"}
        report(doc)
    # the PyTorch references on the smallest shape (same protocol, fewer repetitions: they are slow)
    (B, T, H) = min(shapes, key=lambda s: s[0] * s[1] * s[2])
    xs, gy, _ = cases[(B, T, H)]
    for pname, fn in (("wkv6_ref_sequential", wkv6_ref), ("wkv6_chunked_ref", wkv6_chunked_ref)) if refs else ():
        def peer_fb(fn=fn):
            y, _ = fn(*xs)
            torch.autograd.grad(y, xs, gy)

        def peer_f(fn=fn):
            with torch.no_grad():
                fn(*xs)

        peers[pname] = {"shape": [B, T, H], "forward": _time_cuda(peer_f, 3, flush),
                        "forward_backward": _time_cuda(peer_fb, 3, flush)}
        _log(f"cuda peer {pname}: fwd+bwd {peers[pname]['forward_backward']['median_ms']:.1f} ms")
        report(doc)
    return doc


def bench_cpu(reps: int) -> dict:
    build_extension("cpu")
    B, T, H = 4, 1024, 4
    xs, gy = _inputs(B, T, H, torch.float32, "cpu")
    leaves = [x.requires_grad_(True) for x in xs]

    def timed(fn, n):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        return _quantiles(ts)

    def fb(op):
        y, _ = op(*leaves)
        torch.autograd.grad(y, leaves, gy)

    def f(op):
        with torch.no_grad():
            op(*leaves)

    ours_fb = timed(lambda: fb(wkv6), reps)
    ours_f = timed(lambda: f(wkv6), reps)
    _log(f"cpu ours: fwd+bwd {ours_fb['median_ms']:.1f} ms")
    ref_fb = timed(lambda: fb(wkv6_ref), 3)
    ref_f = timed(lambda: f(wkv6_ref), 3)
    _log(f"cpu wkv6_ref: fwd+bwd {ref_fb['median_ms']:.1f} ms")
    return {"shape": {"B": B, "T": T, "H": H, "K": HEAD, "V": HEAD}, "dtype": "float32",
            "threads": torch.get_num_threads(),
            "ours": {"forward": ours_f, "forward_backward": ours_fb},
            "wkv6_ref_sequential": {"forward": ref_f, "forward_backward": ref_fb},
            "speedup_forward_backward": ref_fb["median_ms"] / ours_fb["median_ms"],
            "speedup_forward": ref_f["median_ms"] / ours_f["median_ms"]}


def shape_arg(text: str) -> tuple[int, int, int]:
    """argparse type of one B,T,H shape (here and in kernels.profile_run)."""
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected B,T,H (three positive integers), got {text!r}")
    return dims


def shapes_arg(text: str) -> list[tuple[int, int, int]]:
    """argparse type of `--shapes B,T,H;B,T,H;...`: each entry as `shape_arg` takes it."""
    return [shape_arg(part) for part in text.split(";")]


def out_file(text: str) -> str:
    """argparse type of `--out FILE` (here and in the pipeline's benchmarks): refused at the start, not after the
    first result, when FILE's directory does not exist or FILE is a directory."""
    p = Path(text)
    if not p.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory of {text!r} does not exist ({p.parent})")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per CUDA measurement")
    ap.add_argument("--cpu-reps", type=int, default=10)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-cuda", action="store_true")
    ap.add_argument("--no-fla", action="store_true", help="leave FLA's chunk_rwkv6 out (its Triton autotune is slow)")
    ap.add_argument("--no-refs", action="store_true", help="leave the (slow) PyTorch references out")
    ap.add_argument("--out", default=None, metavar="FILE", type=out_file,
                    help="also write the JSON to FILE, replaced after every timed contender (a run stopped "
                         "part-way keeps what it timed, marked \"partial\": true)")
    ap.add_argument("--shapes", default=None, type=shapes_arg, help="B,T,H;B,T,H;... (default: %s)" % ";".join(",".join(map(str, s)) for s in SHAPES))
    args = ap.parse_args(argv)
    out = {
        "benchmark": "kernels.wkv6",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    out["copy_bandwidth_GBps"] = None    # measured by the CUDA part; the CPU part has no bytes bound
    if torch.cuda.is_available() and not args.skip_cuda:
        if not args.no_fla:
            kept = keep_autotune_results()
            _log("FLA's Triton autotune results " + ("are kept in Triton's cache (TRITON_CACHE_AUTOTUNING=1; set it "
                 "to 0 to re-tune)" if kept else "are not kept (TRITON_CACHE_AUTOTUNING is off): FLA re-tunes"))

        def progress(cuda: dict) -> None:
            write_json_atomic(Path(args.out), {**out, "partial": True, "cuda": cuda,
                                               "copy_bandwidth_GBps": cuda["measured_copy_bytes_per_s"] / 1e9})

        out["cuda"] = bench_cuda(args.reps, fla=not args.no_fla, refs=not args.no_refs, shapes=args.shapes or SHAPES,
                                 progress=progress if args.out else None)
        out["copy_bandwidth_GBps"] = out["cuda"]["measured_copy_bytes_per_s"] / 1e9
    if not args.skip_cpu:
        out["cpu"] = bench_cpu(args.cpu_reps)
    if args.out:
        write_json_atomic(Path(args.out), out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
