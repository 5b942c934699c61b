"""Stateful decoding throughput, ours vs GPT with a KV cache in one run. Prints one JSON object on stdout.

    python -m gt_pipeline.engine.decode_bench                                  # GF-MH vs GPT, 5m, the defaults below
    python -m gt_pipeline.engine.decode_bench --models GF-MH,GPT --batch 1,64 --contexts 1024,16384,65536
    python -m gt_pipeline.engine.decode_bench --models GF-MH,MAMBA2 --size tiny --new-tokens 128

For every model, batch size B and context N (random prompt tokens, random-init weights: the speed does not
depend on either): read the prompt (`gt_pipeline.engine.decode.prefill`: the model's parallel forward, which
returns the final state, in calls of at most --prefill-tokens tokens over the batch, state or KV cache
carried), then generate greedily, one token per step: --warmup untimed steps, then --new-tokens timed ones
(host-side clock around a synchronised loop, so launch overhead counts as it does in real decoding).
tokens/s = B * steps / time. Modes per cell:
    eager       `model(tok, state=state)` per token (the state API); GPT with its KV cache (LM.kv_cache)
    cuda_graph  recurrent models on CUDA: the same step captured once in a CUDA graph and replayed
                (`decode.DecodeStep`); GPT's cache grows per token, so it has no graphed mode here
Memory: `state_bytes_per_seq` is measured from the state tensors after decoding (GPT: the K and V buffers for
N + warmup + steps positions); `peak_cuda_bytes` is torch's peak allocation over the cell (weights included).
A cell whose estimated memory (state + the prefill working set) exceeds the free device memory (or
--memory-budget-gb) is not run; its row says `skipped` and why. GPT, the peer, always runs.
CUDA runs under bf16 autocast (GPT's KV cache in bf16), as training does; the CPU in fp32.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from collections.abc import Callable

import psutil
import torch

import models
from gt_pipeline.engine.bench import machine_name, note, out_file, parse_int_list, write_partial
from gt_pipeline.engine.decode import DecodeStep, prefill

PEER = "GPT"


def parse_models(text: str) -> list[str]:
    """'gf_mh,GPT' -> ['GF-MH', 'GPT'] (canonical names, GPT appended when absent); ValueError naming an
    unknown name and the valid ones."""
    names = [models.canonical_name(n) for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--models: give at least one model name, e.g. GF-MH,GPT")
    names = list(dict.fromkeys(names))
    return names if PEER in names else names + [PEER]


def state_bytes(state: models.ModelState) -> int:
    """Bytes of every tensor of a state (a recurrent ModelState or GPT's KVCache), all sequences."""
    return sum(v.numel() * v.element_size() for d in state.layers for v in d.values())


def per_token_bytes(model: models.LM, device: torch.device, amp_dtype: torch.dtype | None) -> tuple[int, int]:
    """(fixed, per position) state bytes of one sequence, measured from real tensors: a recurrent model's state
    after one token (its size does not depend on the context), GPT's KV cache of one position."""
    tok = torch.zeros(1, 1, dtype=torch.int64, device=device)
    if model.is_recurrent:
        state, _ = prefill(model, tok, amp_dtype=amp_dtype)
        return state_bytes(state), 0
    return 0, state_bytes(model.kv_cache(1, 1, dtype=amp_dtype))


def prefill_chunk(batch: int, context: int, prefill_tokens: int) -> int:
    """Prompt tokens per sequence in one prefill call: at most `prefill_tokens` over the batch (at least 1), at
    most the whole prompt of `context` tokens."""
    return min(context, max(1, prefill_tokens // batch))


def estimate_bytes(model: models.LM, batch: int, positions: int, chunk: int, per_seq: tuple[int, int]) -> dict:
    """Memory a cell needs beyond the weights: the state (`per_seq` = (fixed, per position) bytes, for
    `positions` positions) and the prefill working set of one call: the logits (B, chunk, V) in fp32 and one
    cast copy (8 bytes each), and one layer's activations, bounded by 256 bytes per hidden channel and token
    (the hybrid block's fp32 temporaries measure below half that)."""
    fixed, per_pos = per_seq
    state = batch * (fixed + per_pos * positions)
    cfg = model.config
    work = batch * chunk * (8 * cfg.vocab_size + 256 * cfg.hidden_size)
    return {"state": state, "prefill_working_set": work, "total": state + work}


def free_memory(device: torch.device) -> int:
    """Bytes free for a new cell: free device memory on CUDA (after returning the cached blocks), available
    RAM on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_decode(step, last: torch.Tensor, warmup: int, steps: int, device: torch.device) -> dict:
    """Greedy decoding through `step` (tok (B, 1) -> logits (B, V)) from last-position logits `last`."""
    tok = last.argmax(-1, keepdim=True)                                                   # (B, 1)
    for _ in range(warmup):
        tok = step(tok).argmax(-1, keepdim=True)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = step(tok).argmax(-1, keepdim=True)
    _sync(device)
    sec = time.perf_counter() - t0
    B = last.shape[0]
    return {"ms_per_step": 1e3 * sec / steps, "tokens_per_s": B * steps / sec}


@torch.no_grad()
def bench_cell(model: models.LM, batch: int, context: int, *, new_tokens: int, warmup: int, prefill_tokens: int,
               device: torch.device, amp_dtype: torch.dtype | None, graph: bool, budget: int | None,
               per_seq: tuple[int, int], seed: int = 0) -> dict:
    """One (model, batch, context) row: prefill, then each decoding mode; or a skipped row (module docstring)."""
    name = model.config.name
    row = {"model": name, "batch": batch, "context": context}
    positions = context + warmup + new_tokens
    chunk = prefill_chunk(batch, context, prefill_tokens)
    est = estimate_bytes(model, batch, positions, chunk, per_seq)
    free = free_memory(device) if budget is None else budget
    row["estimate_bytes"] = est
    if est["total"] > free:
        what = "budget (--memory-budget-gb)" if budget is not None else f"free {device.type} memory"
        row["skipped"] = True
        row["reason"] = (f"estimated {est['total'] / 2**30:.2f} GiB (state {est['state'] / 2**30:.2f} + prefill "
                         f"working set {est['prefill_working_set'] / 2**30:.2f}) > {free / 2**30:.2f} GiB {what}")
        note(f"{name} B={batch} N={context}: skipped, {row['reason']}")
        return row
    row["skipped"] = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)   # (B, N)
    start = None if model.is_recurrent else model.kv_cache(batch, positions, dtype=amp_dtype)
    _sync(device)
    t0 = time.perf_counter()
    state, last = prefill(model, prompt, chunk=chunk, state=start, amp_dtype=amp_dtype)
    _sync(device)
    row["prefill_ms"] = 1e3 * (time.perf_counter() - t0)
    row["prefill_chunk"] = chunk
    modes = {"eager": False}
    if graph and model.is_recurrent and device.type == "cuda":
        modes["cuda_graph"] = True
    decode, end_state = {}, state
    for mode, captured in modes.items():
        step = DecodeStep(model, state, graph=captured, amp_dtype=amp_dtype)   # its own copy of the start state
        decode[mode] = _time_decode(step, last, warmup, new_tokens, device)
        end_state = step.state
        note(f"{name} B={batch} N={context} {mode}: {decode[mode]['tokens_per_s']:.0f} tok/s, "
             f"{decode[mode]['ms_per_step']:.3f} ms/step")
        del step
    row["decode"] = decode
    row["steps"] = {"warmup": warmup, "timed": new_tokens}
    row["state_bytes_per_seq"] = state_bytes(end_state) // batch
    row["state_positions"] = None if model.is_recurrent else end_state.capacity
    row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return row


def run(model_names: list[str], batches: list[int], contexts: list[int], *, size: str = "5m", vocab: int = 16000,
        new_tokens: int = 64, warmup: int = 4, prefill_tokens: int = 32768, device: str | torch.device = "cpu",
        graph: bool = True, memory_budget_bytes: int | None = None,
        on_cell: Callable[[dict], None] | None = None) -> dict:
    """The whole benchmark as a dict (what main prints). Arguments as the command-line flags; names are
    canonicalised and GPT added (parse_models); ValueError naming a bad value. `on_cell` gets the document
    so far after every cell (main's --out)."""
    names = parse_models(",".join(model_names))
    for flag, values in (("--batch", batches), ("--contexts", contexts)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{flag}: every value must be an int >= 1, got {values!r}")
    for flag, v, lo in (("--new-tokens", new_tokens, 1), ("--warmup", warmup, 0),
                        ("--prefill-tokens", prefill_tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{flag}: must be an int >= {lo}, got {v!r}")
    device = torch.device(device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    info: dict[str, dict] = {}
    rows: list[dict] = []
    doc = {
        "benchmark": "decode_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": machine_name(device), "cpu_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "shapes": {"size": size, "vocab": vocab, "batches": batches, "contexts": contexts,
                   "new_tokens": new_tokens, "warmup": warmup, "prefill_tokens_per_call": prefill_tokens,
                   "dtype": "bfloat16 autocast" if amp_dtype is not None else "float32",
                   "prefill": "parallel forward returning the final state, chunked, state / KV cache carried"},
        "models": info,
        "results": rows,
    }
    for name in names:
        torch.manual_seed(0)
        model = models.get_model(name, vocab, size=size).to(device).eval()
        per_seq = per_token_bytes(model, device, amp_dtype)
        info[name] = {"params": model.num_params(), "n_layer": model.config.n_layer,
                      "hidden_size": model.config.hidden_size,
                      "paths": models.describe_paths(model, device, amp=amp_dtype is not None),
                      "state_bytes_per_seq_fixed": per_seq[0], "kv_bytes_per_seq_per_position": per_seq[1]}
        for B in batches:
            for N in contexts:
                try:
                    rows.append(bench_cell(model, B, N, new_tokens=new_tokens, warmup=warmup,
                                           prefill_tokens=prefill_tokens, device=device, amp_dtype=amp_dtype,
                                           graph=graph, budget=memory_budget_bytes, per_seq=per_seq))
                except torch.cuda.OutOfMemoryError as e:   # the estimate was short: record it, go on with the next cell
                    rows.append({"model": name, "batch": B, "context": N, "skipped": True,
                                 "reason": f"out of memory despite the estimate: {str(e).splitlines()[0]}"})
                    note(f"{name} B={B} N={N}: out of memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                _compare_to_peer(rows)
                if on_cell is not None:
                    on_cell(doc)
        del model
    return doc


def _compare_to_peer(rows: list[dict]) -> None:
    """Add `speedup_vs_gpt` to every run row: each mode's tokens/s over GPT's (eager, KV cache) in the same cell."""
    peer = {(r["batch"], r["context"]): r["decode"]["eager"]["tokens_per_s"]
            for r in rows if r["model"] == PEER and not r["skipped"]}
    for r in rows:
        base = peer.get((r["batch"], r["context"]))
        if r["model"] != PEER and not r["skipped"] and base:
            r["speedup_vs_gpt"] = {m: d["tokens_per_s"] / base for m, d in r["decode"].items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="GF-MH,GPT", help="comma-separated model names (GPT, the peer, is added)")
    ap.add_argument("--size", default="5m", help="size preset (models.list_sizes())")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--batch", default="1,64", help="batch sizes, comma-separated")
    ap.add_argument("--contexts", default="1024,16384,65536", help="prompt lengths N, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64, help="timed decoding steps per cell")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decoding steps before them")
    ap.add_argument("--prefill-tokens", type=int, default=32768,
                    help="prompt tokens per prefill call over the whole batch (bounds the logits' memory)")
    ap.add_argument("--no-graph", action="store_true", help="leave the CUDA-graphed mode out")
    ap.add_argument("--memory-budget-gb", type=float, default=None,
                    help="skip cells estimated above this many GiB (default: the free device memory)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, metavar="FILE", type=out_file,
                    help="also write the JSON to FILE, rewritten after every cell (a run stopped part-way keeps "
                         "the cells it finished)")
    a = ap.parse_args(argv)
    try:
        out = run(a.models.split(","), parse_int_list(a.batch, "--batch"), parse_int_list(a.contexts, "--contexts"),
                  size=a.size, vocab=a.vocab, new_tokens=a.new_tokens, warmup=a.warmup,
                  prefill_tokens=a.prefill_tokens, device=a.device, graph=not a.no_graph,
                  memory_budget_bytes=None if a.memory_budget_gb is None else int(a.memory_budget_gb * 2**30),
                  on_cell=lambda doc: write_partial(a.out, doc))
    except ValueError as e:
        ap.error(str(e))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
