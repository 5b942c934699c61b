"""Training-step throughput, ours vs a same-size peer in one run. Prints JSON.

    python -m gt_pipeline.engine.bench --models GF-MH,GPT --size 5m --vocab 16000 --batch 64 --seq 512
    python -m gt_pipeline.engine.bench --models GF-MH --shards .gt/token_shards/<fp> --steps 200 --compare

Each model runs the engine's own `train_step` (AdamW with component groups, pre-clip component grad
norms, clipping; bf16 autocast on CUDA) with the pipeline's defaults: the same compile setting
(`resolve_compile`), the same layer paths (`run_paths`, reported per model), unless flags override them.
Batches are random tokens (throughput does not depend on the text), or windows of a token_shards
artifact's train split drawn as training draws them (`--shards`). `--warmup` untimed steps, then
`--steps` timed ones; tokens/s counts input tokens per second. `--compare` also runs the reference path
(eager, sequential wkv6, PyTorch SSD and conv) from the same seed and reports both loss curves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import models
import data
from kernels.bench import out_file  # the --out argparse type of every benchmark here
from gt_pipeline.store import write_json_atomic
from gt_pipeline.engine.train import (BatchFeed, TrainConfig, build_optimizer, compile_label, resolve_compile, step_function,
                                      train_step)


def profile_steps(step, device: torch.device, n: int = 3, top: int = 20) -> dict:
    """torch.profiler over `n` calls of `step()`: the `top` kernels by total GPU (or CPU) time, per step."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
    rows = []
    for ev in prof.key_averages():
        t = ev.self_device_time_total if on_gpu else ev.self_cpu_time_total
        if t > 0 and (not on_gpu or ev.device_type.name == "CUDA"):
            rows.append({"name": ev.key[:120], "ms_per_step": t / 1e3 / n, "calls_per_step": ev.count / n})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    return {"steps": n, "clock": "gpu kernel time" if on_gpu else "cpu self time",
            "total_ms_per_step": total, "kernels_per_step": sum(r["calls_per_step"] for r in rows),
            "top": rows[:top]}


def bench_model(name: str, size: str, vocab: int, batch: int, seq: int, steps: int, warmup: int,
                device: torch.device, compile: bool | str = "auto", profile: int = 0, overrides: dict | None = None,
                shards=None, barrier=None, warmup_lock=None) -> dict:
    """One model's timed steps. `barrier()` (when given) runs between warm-up and the timed steps: the
    concurrent workers of `--concurrent` start timing together. `warmup_lock` (threads of one process) lets one
    worker at a time warm up, so torch.compile never traces two workers at once."""
    torch.manual_seed(0)
    model = models.get_model(name, vocab, size=size, **(overrides or {})).to(device)
    cfg = TrainConfig(model=name, size=size, vocab_size=vocab, steps=steps + warmup, batch_size=batch, seq_len=seq,
                      compile=compile, model_overrides=overrides or {})
    resolved = resolve_compile(compile, device)
    paths = {"compile": compile_label(resolved),
             **models.describe_paths(model, device, amp=device.type == "cuda", compiled=resolved is not False)}
    opt = build_optimizer(model, cfg)
    fwd = step_function(model, resolved)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    g = torch.Generator(device="cpu").manual_seed(0)
    if shards is not None:
        train_tokens = data.TokenShards(shards, verify=False).split("train")

        feed = BatchFeed(lambda: [data.random_windows(train_tokens, batch, seq, g)], device, g)
        next_batches, prefetch = feed.next, feed.prefetch  # as training draws and copies them
    else:
        x = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
        fixed = [(x[:, :-1], x[:, 1:])]

        def next_batches():
            return fixed
        prefetch = None
    if device.type == "cuda":
        # peak over warm-up and timed steps: CUDA-graph pools ("reduce-overhead") are allocated in warm-up
        torch.cuda.reset_peak_memory_stats(device)
    t_warm = time.perf_counter()
    losses = []
    note(f"{name}: {warmup} warm-up steps ({paths['compile']})")
    with warmup_lock if warmup_lock is not None else contextlib.nullcontext():
        for _ in range(warmup):
            losses.append(train_step(model, fwd, opt, next_batches(), 1.0, autocast, before_sync=prefetch)[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t_warm  # includes compilation under --compile
    note(f"{name}: warm-up done in {warmup_s:.1f} s; timing {steps} steps")
    if barrier is not None:
        barrier()
    wall0 = time.time()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = train_step(model, fwd, opt, next_batches(), 1.0, autocast, before_sync=prefetch)
        losses.append(loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    wall1 = time.time()
    prof = profile_steps(lambda: train_step(model, fwd, opt, next_batches(), 1.0, autocast, before_sync=prefetch), device, profile) if profile else None
    return {
        "model": name, "size": size, "overrides": overrides or {}, "paths": paths, "profile": prof,
        "data": "token_shards train split" if shards is not None else "random tokens (one fixed batch)",
        "losses": losses, "params": sum(p.numel() for p in model.parameters()),
        "batch": batch, "seq_len": seq, "vocab": vocab, "steps_timed": steps, "warmup_steps": warmup,
        "warmup_s": warmup_s,
        "ms_per_step": 1000 * dt / steps, "tokens_per_s": batch * seq * steps / dt,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "final_loss": loss, "timed_window_unix": [wall0, wall1],
    }


def note(msg: str) -> None:
    """Progress on stderr (stdout carries the JSON): a long cold compilation shows where it is."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_partial(path: str | None, doc: dict) -> None:
    """`--out`: the JSON document so far, replaced atomically after every model, so a run stopped part-way
    keeps the models it finished."""
    if path is not None:
        write_json_atomic(Path(path), doc)


REFERENCE_PATH = {"mamba_backend": "torch", "mamba_conv": "torch", "wkv6_impl": "sequential"}


def file_barrier(directory: str, worker: int, workers: int, timeout_s: float = 900.0):
    """A barrier across processes through files: worker i writes `ready.i`, then waits for all `workers`."""
    from pathlib import Path

    def wait() -> None:
        d = Path(directory)
        (d / f"ready.{worker}").touch()
        t_end = time.monotonic() + timeout_s
        while len(list(d.glob("ready.*"))) < workers:
            if time.monotonic() > t_end:
                raise TimeoutError(f"bench barrier in {d}: {len(list(d.glob('ready.*')))} of {workers} workers "
                                   f"ready after {timeout_s:.0f} s (did a worker fail? see its stderr)")
            time.sleep(0.05)
    return wait


def _process_workers(argv: list[str], k: int) -> list[dict]:
    """k bench processes (each its own CUDA context, as the sweep's K runs are), meeting at a file barrier."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gt_bench_barrier_") as d:
        procs = [subprocess.Popen([sys.executable, "-m", "gt_pipeline.engine.bench", *argv, "--barrier", d,
                                   "--worker", f"{i}/{k}"], stdout=subprocess.PIPE, text=True) for i in range(k)]
        outs = [p.communicate()[0] for p in procs]
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"--concurrent {k}: worker(s) {bad} failed (exit codes "
                           f"{[procs[i].returncode for i in bad]}); their stderr is above")
    return [json.loads(o)["results"][0] for o in outs]


def _stream_workers(bench_kwargs: dict, k: int) -> list[dict]:
    """k trainings as threads of this process, each on its own CUDA stream (one context: the GPU may run their
    kernels side by side), meeting at a threading barrier. A failing thread fails the whole measurement."""
    import threading

    device = bench_kwargs["device"]
    meet, one_at_a_time = threading.Barrier(k, timeout=900), threading.Lock()
    out: list[dict | BaseException | None] = [None] * k

    def work(i: int) -> None:
        try:
            ctx = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
            with ctx:
                out[i] = bench_model(**bench_kwargs, barrier=meet.wait, warmup_lock=one_at_a_time)
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's index
            out[i] = e
            meet.abort()

    threads = [threading.Thread(target=work, args=(i,), name=f"bench-stream-{i}") for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [(i, r) for i, r in enumerate(out) if isinstance(r, BaseException)]
    real = [(i, r) for i, r in failed if not isinstance(r, threading.BrokenBarrierError)]
    if failed:
        i, e = (real or failed)[0]
        raise RuntimeError(f"--concurrent {k} --streams: worker {i} failed: {type(e).__name__}: {e}") from e
    return out  # type: ignore[return-value]


def concurrent_runs(argv: list[str], ks: list[int], steps: int, streams: dict | None = None,
                    on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """For each k, k trainings of one model at once: k processes (`argv`: the bench's own arguments), or with
    `streams` (bench_model's keyword arguments) k threads of this process on their own CUDA streams. They warm
    up, meet at a barrier, then time `steps` steps. The aggregate is all their tokens over the span from the
    first start to the last end of the timed windows. `on_row` gets the rows so far after every k."""
    rows: list[dict] = []
    for k in ks:
        note(f"--concurrent {k}: {'threads on CUDA streams' if streams is not None else 'processes'}")
        res = _stream_workers(streams, k) if streams is not None else _process_workers(argv, k)
        start = min(r["timed_window_unix"][0] for r in res)
        end = max(r["timed_window_unix"][1] for r in res)
        tokens = sum(r["batch"] * r["seq_len"] * r["steps_timed"] for r in res)
        rows.append({"k": k, "aggregate_tokens_per_s": tokens / (end - start), "span_s": end - start,
                     "per_process_tokens_per_s": [r["tokens_per_s"] for r in res],
                     "peak_memory_mib_per_process": [r["peak_memory_mib"] for r in res],
                     "warmup_s": [r["warmup_s"] for r in res], "paths": res[0]["paths"], "model": res[0]["model"],
                     "workers": "CUDA streams of one process" if streams is not None else "processes"})
        single = next((r["aggregate_tokens_per_s"] for r in rows if r["k"] == 1), None)
        for r in rows:
            r["speedup_vs_k1"] = r["aggregate_tokens_per_s"] / single if single else None
        note(f"--concurrent {k}: {rows[-1]['aggregate_tokens_per_s']:,.0f} tok/s aggregate")
        if on_row is not None:
            on_row(rows)
    return rows


def _overrides(a: argparse.Namespace) -> dict:
    return {k: v for k, v in (("hidden_size", a.hidden), ("n_layer", a.layers), ("mamba_backend", a.mamba_backend),
                              ("mamba_conv", a.mamba_conv), ("wkv6_impl", a.wkv6_impl)) if v is not None}


def _without(argv: list[str], valued: tuple[str, ...], bare: tuple[str, ...]) -> list[str]:
    """argv less the options in `valued` (as `--flag V` or `--flag=V`) and the switches in `bare`."""
    out, skip = [], False
    for v in argv:
        if skip:
            skip = False
        elif v in valued:
            skip = True
        elif v not in bare and not v.startswith(tuple(f + "=" for f in valued)):
            out.append(v)
    return out


def parse_int_list(text: str, flag: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]; ValueError naming the flag and the bad entry unless every entry is an int >= 1."""
    out = []
    for part in text.split(","):
        try:
            v = int(part)
        except ValueError:
            raise ValueError(f"{flag}: {part.strip()!r} is not an integer (give comma-separated integers like "
                             f"1,2,4,8)") from None
        if v < 1:
            raise ValueError(f"{flag}: every value must be >= 1, got {v}")
        out.append(v)
    return out


def machine_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's (for the benchmarks' JSON)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="GF-MH,GPT")
    ap.add_argument("--size", default="5m")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", nargs="?", const=True, default="auto", metavar="MODE",
                    help="torch.compile mode of the step: auto (the pipeline's default: reduce-overhead on CUDA, off "
                         "on CPU), off, or a torch.compile mode (default mode if the flag has no value)")
    ap.add_argument("--shards", default=None, help="a token_shards artifact directory: train on its windows")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N more steps and report the top kernels")
    ap.add_argument("--mamba-backend", default=None, help="Mamba2 SSD path: auto (default), wkv6, triton or torch")
    ap.add_argument("--mamba-conv", default=None, help="Mamba2 depthwise conv: auto (default), triton or torch")
    ap.add_argument("--wkv6-impl", default=None, choices=["auto", "chunked", "sequential"],
                    help="the models' wkv6 kernels (ModelConfig.wkv6_impl; default auto: chunked where it applies)")
    ap.add_argument("--compare", action="store_true",
                    help="also run each model on the reference path (eager, sequential wkv6, PyTorch SSD) from "
                         "the same seed and report both loss curves and their largest difference")
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gru-backend", default=None, choices=["auto", "cudnn"],
                    help="the GRU arbiter's recurrence: auto (default: the Triton kernels on CUDA under autocast) "
                         "or cudnn (nn.GRU, a graph break under compile): A/B of models.arbiter.set_gru_backend")
    ap.add_argument("--concurrent", default=None, metavar="K[,K...]",
                    help="aggregate throughput of K processes training the (one) model at once, for each K "
                         "(e.g. 1,2,4,8: several small trainings sharing one GPU)")
    ap.add_argument("--streams", action="store_true",
                    help="with --concurrent: the K trainings as threads of one process, each on its own CUDA "
                         "stream, instead of K processes (whose contexts the GPU time-slices)")
    ap.add_argument("--out", default=None, metavar="FILE", type=out_file,
                    help="also write the JSON to FILE, rewritten after every model (a run stopped part-way keeps "
                         "the finished models there)")
    ap.add_argument("--barrier", default=None, help=argparse.SUPPRESS)  # set by --concurrent for its workers
    ap.add_argument("--worker", default="0/1", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.gru_backend is not None:   # before any training (--streams threads run in this process)
        from models.arbiter import set_gru_backend

        set_gru_backend(a.gru_backend)
    if a.concurrent is not None:
        if "," in a.models or a.compare or a.profile:
            raise SystemExit("--concurrent takes one model and neither --compare nor --profile")
        try:
            ks = parse_int_list(a.concurrent, "--concurrent")
        except ValueError as e:
            raise SystemExit(str(e)) from None
        # each worker is one training: not --concurrent or --streams, and not --out (only this process writes it)
        worker_argv = _without(list(argv) if argv is not None else sys.argv[1:], ("--concurrent", "--out"),
                               ("--streams",))
        streams = None
        if a.streams:
            streams = dict(name=a.models, size=a.size, vocab=a.vocab, batch=a.batch, seq=a.seq, steps=a.steps,
                           warmup=a.warmup, device=torch.device(a.device), compile=False if a.compile == "off" else a.compile,
                           overrides=_overrides(a), shards=a.shards)
        doc = {"benchmark": "concurrent_training_throughput", "date": time.strftime("%Y-%m-%d"),
               "machine": machine_name(torch.device(a.device)), "torch": torch.__version__,
               "batch": a.batch, "seq_len": a.seq, "steps_timed": a.steps, "results": []}
        doc["results"] = concurrent_runs(worker_argv, ks, a.steps, streams,
                                         on_row=lambda rows: write_partial(a.out, {**doc, "results": rows}))
        print(json.dumps(doc, indent=2))
        return
    if a.streams:
        raise SystemExit("--streams goes with --concurrent K[,K...]")
    barrier = None
    if a.barrier is not None:
        w, n = (int(v) for v in a.worker.split("/"))
        barrier = file_barrier(a.barrier, w, n)
    device = torch.device(a.device)
    over = _overrides(a)
    compile = False if a.compile == "off" else a.compile
    results = []
    doc = {"benchmark": "train_step_throughput", "date": time.strftime("%Y-%m-%d"), "machine": machine_name(device),
           "torch": torch.__version__, "results": results}
    for m in a.models.split(","):
        res = bench_model(m, a.size, a.vocab, a.batch, a.seq, a.steps, a.warmup, device, compile, a.profile, over,
                          a.shards, barrier)
        if a.compare:
            ref = bench_model(m, a.size, a.vocab, a.batch, a.seq, a.steps, a.warmup, device, False, 0,
                              {**over, **REFERENCE_PATH}, a.shards)
            res["reference_path"] = {k: ref[k] for k in ("paths", "ms_per_step", "tokens_per_s", "losses")}
            diffs = [abs(x - y) for x, y in zip(res["losses"], ref["losses"])]
            res["max_loss_diff_vs_reference"] = max(diffs)
            res["mean_loss_diff_vs_reference_last_50"] = sum(diffs[-50:]) / len(diffs[-50:])
        results.append(res)
        note(f"{m}: {res['tokens_per_s']:,.0f} tok/s ({res['ms_per_step']:.2f} ms/step, {res['params']:,} params)")
        first, last = results[0]["tokens_per_s"], results[-1]["tokens_per_s"]  # the peers: first and last so far
        for r in results:
            r["ratio_vs_first"], r["ratio_vs_last"] = r["tokens_per_s"] / first, r["tokens_per_s"] / last
        write_partial(a.out, doc)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
