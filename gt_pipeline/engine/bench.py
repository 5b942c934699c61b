"""Training-step throughput, ours vs a same-size peer in one run. Prints JSON.

    python -m gt_pipeline.engine.bench --models GF-MH,GPT --size 5m --vocab 16000 --batch 64 --seq 512

Each model runs the engine's own `train_step` (AdamW with component groups, pre-clip component grad
norms, clipping; bf16 autocast on CUDA) on random token batches (throughput does not depend on the
text), `--warmup` untimed steps then `--steps` timed ones; tokens/s counts input tokens per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import models
from gt_pipeline.engine.train import TrainConfig, build_optimizer, train_step


def bench_model(name: str, size: str, vocab: int, batch: int, seq: int, steps: int, warmup: int,
                device: torch.device, compile: bool = False) -> dict:
    torch.manual_seed(0)
    model = models.get_model(name, vocab, size=size).to(device)
    cfg = TrainConfig(model=name, size=size, vocab_size=vocab, steps=steps + warmup, batch_size=batch, seq_len=seq)
    opt = build_optimizer(model, cfg, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile else model

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    batches = [(x[:, :-1], x[:, 1:])]
    for _ in range(warmup):
        train_step(model, fwd, opt, batches, 1.0, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = train_step(model, fwd, opt, batches, 1.0, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {
        "model": name, "size": size, "params": sum(p.numel() for p in model.parameters()),
        "batch": batch, "seq_len": seq, "vocab": vocab, "steps_timed": steps, "compile": compile,
        "ms_per_step": 1000 * dt / steps, "tokens_per_s": batch * seq * steps / dt,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "final_loss": loss,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="GF-MH,GPT")
    ap.add_argument("--size", default="5m")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    results = [bench_model(m, a.size, a.vocab, a.batch, a.seq, a.steps, a.warmup, device, a.compile)
               for m in a.models.split(",")]
    base = results[-1]["tokens_per_s"]
    for r in results:
        r["ratio_vs_last"] = r["tokens_per_s"] / base
    print(json.dumps({
        "benchmark": "train_step_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
