"""Text generation from a trained checkpoint: stateful, one token per call.

Every model reads the prompt once (in chunks, state carried) and then calls
`model(next_token, state=state)` one token at a time. For the recurrent models (every hybrid, RWKV6,
MAMBA2) the state is fixed-size: constant memory and compute per token, whatever the length. GPT's state
is a KV cache (`models.KVCache`, sized for prompt + new tokens): each token attends to the cached keys,
so its cost grows with the context. `stateful=False` recomputes the whole context for every new token
instead, which gives the same tokens at quadratic cost (the tests' reference).

From the shell, on a `trained_*` artifact directory (the tokenizer is found through the store's
manifests: trained -> token_shards -> bpe_tokenizer, under the same GT_HOME):

    python -m gt_pipeline.engine.generate --checkpoint .gt/trained_gf_mh/<fp> --prompt "The castle was"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import data
import models
from gt_pipeline.engine.checkpoint import load_model_weights
from gt_pipeline.engine.decode import DecodeStep, prefill
from gt_pipeline.store import ArtifactStore


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, *, top_k: int | None = 20,
             temperature: float = 1.0, seed: int = 0, greedy: bool = False, stateful: bool | None = None,
             chunk: int = 512) -> list[int]:
    """The `max_new_tokens` ids that follow `prompt_ids` (ints, at least one).

    Sampling: logits of the last position / temperature, restricted to the `top_k` largest (None: all),
    drawn from a CPU torch.Generator seeded with `seed` (same tokens on CPU and GPU given same logits);
    `greedy` takes the argmax instead. `stateful` (default True) feeds one token per call with the carried
    state (GPT: its KV cache) through `decode.DecodeStep`, CUDA-graphed for the recurrent models on CUDA;
    False recomputes the whole context each step.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token id (an empty prompt has nothing to continue)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    stateful = True if stateful is None else stateful
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)  # (1, T)
    out: list[int] = []
    try:
        if stateful:
            # GPT: a KV cache with room for the prompt and every new token (each is fed back)
            state = None if model.is_recurrent else model.kv_cache(1, len(prompt_ids) + max_new_tokens)
            state, last = prefill(model, ids, chunk=chunk, state=state)  # the prompt, `chunk` tokens per call
            last = last[0]  # (V,)
            # one token per step; on CUDA a recurrent model's step is a CUDA graph (decode.DecodeStep)
            step = DecodeStep(model, state) if max_new_tokens > 0 else None
            for _ in range(max_new_tokens):
                nxt = _pick(last, top_k, temperature, gen, greedy)
                out.append(nxt)
                last = step(torch.tensor([[nxt]], dtype=torch.int64, device=device))[0]  # (V,)
        else:
            ctx = ids
            for _ in range(max_new_tokens):
                last = model(ctx).logits[0, -1]  # (V,): the whole context again
                nxt = _pick(last, top_k, temperature, gen, greedy)
                out.append(nxt)
                ctx = torch.cat([ctx, torch.tensor([[nxt]], dtype=torch.int64, device=device)], dim=1)
    finally:
        model.train(was_training)
    return out


def _pick(logits: torch.Tensor, top_k: int | None, temperature: float, gen: torch.Generator, greedy: bool) -> int:
    """One id from last-position logits (V,)."""
    logits = logits.float().cpu()
    if greedy:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


# ------------------------------------------------------------------------------ artifacts and prompts
def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained_* artifact directory (model.safetensors + config.json) -> (model in eval mode, train config)."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a trained_* artifact directory (needs config.json and "
                                "model.safetensors): pass e.g. .gt/trained_gf_mh/<fingerprint>")
    cfg = json.loads(cfg_path.read_text())["train"]
    model = models.get_model(cfg["model"], cfg["vocab_size"], size=cfg["size"], **cfg.get("model_overrides", {}))
    load_model_weights(model, path / "model.safetensors")
    return model.to(device).eval(), cfg


def upstream_dir(checkpoint: str | Path, asset: str) -> Path:
    """The artifact directory of `asset` ("token_shards" or "bpe_tokenizer") that a trained_* artifact was
    built from, found through the manifests' input fingerprints in the same store (GT_HOME)."""
    ckpt = Path(checkpoint).resolve()
    store = ArtifactStore(ckpt.parents[1])
    manifest = json.loads((ckpt / "manifest.json").read_text()) if (ckpt / "manifest.json").is_file() else {}
    shards_fp = manifest.get("inputs", {}).get("token_shards")
    if shards_fp is None:
        raise FileNotFoundError(f"{ckpt}/manifest.json names no token_shards input: is it a trained_* artifact "
                                "published by the store? Pass --tokenizer explicitly.")
    shards = store.get("token_shards", shards_fp)
    if shards is None:
        raise FileNotFoundError(f"token_shards {shards_fp} (the data {ckpt.name} was trained on) is not in "
                                f"{store.root}: re-materialize token_shards or pass --tokenizer")
    if asset == "token_shards":
        return shards.path
    tok = store.get("bpe_tokenizer", shards.inputs.get("bpe_tokenizer", ""))
    if tok is None:
        raise FileNotFoundError(f"the bpe_tokenizer of token_shards {shards_fp} is not in {store.root}: "
                                "re-materialize bpe_tokenizer or pass --tokenizer")
    return tok.path


def held_out_prompts(shards_dir: str | Path, tokenizer, n: int = 3, prompt_tokens: int = 12) -> list[list[int]]:
    """`n` prompts of `prompt_tokens` ids from the validation split: the first tokens of documents spread
    evenly over it (deterministic; the model never trained on them)."""
    shards = data.TokenShards(Path(shards_dir), verify=False)
    toks, starts = shards.split("validation"), shards.doc_starts("validation")
    eot = shards.eot_id
    picks = np.linspace(0, len(starts) - 1, n).astype(np.int64) if len(starts) else []
    prompts = []
    for i in picks:
        s = int(starts[i])
        ids = [int(t) for t in toks[s : s + prompt_tokens] if int(t) != eot]
        if ids:
            prompts.append(ids)
    if not prompts:
        raise ValueError(f"no held-out prompt could be taken from {shards_dir} (empty validation split)")
    return prompts


def samples(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int = 40, *,
            top_k: int = 20, temperature: float = 1.0, seed: int = 0) -> list[dict[str, str]]:
    """[{"prompt", "continuation"}] for each prompt, each drawn with generator seed `seed`."""
    return [{"prompt": tokenizer.decode(p),
             "continuation": tokenizer.decode(generate(model, p, max_new_tokens, top_k=top_k,
                                                       temperature=temperature, seed=seed))}
            for p in prompts]


def samples_markdown(rows: list[dict[str, str]], *, top_k: int, temperature: float, seed: int,
                     stateful: bool) -> str:
    how = ("stateful, one token per call (recurrent state or KV cache)" if stateful
           else "full-context recompute per token")
    head = f"**Samples** (held-out validation prompts; top-k {top_k}, temperature {temperature}, seed {seed}; {how})\n\n"
    # the prompt in bold (markdown needs no space just inside the ** markers), then the continuation
    body = "\n\n".join(f"> **{_md_escape(r['prompt']).strip()}** {_md_escape(r['continuation']).strip()}" for r in rows)
    return head + body


def _md_escape(text: str) -> str:
    return text.replace("\n", " ").replace("*", "\\*").replace("_", "\\_").replace("<", "&lt;")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Continue a prompt with a trained_* checkpoint (stateful generation).")
    ap.add_argument("--checkpoint", type=Path, required=True, help="a trained_* artifact dir, e.g. .gt/trained_gf_mh/<fp>")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer.json (default: the bpe_tokenizer the checkpoint's token_shards came from)")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    tok_path = args.tokenizer or upstream_dir(args.checkpoint, "bpe_tokenizer") / "tokenizer.json"
    tok = data.load_tokenizer(tok_path)
    model, _ = load_checkpoint(args.checkpoint, args.device)
    ids = tok.encode(args.prompt).ids
    out = generate(model, ids, args.max_new_tokens, top_k=args.top_k, temperature=args.temperature,
                   seed=args.seed, greedy=args.greedy)
    print(args.prompt + tok.decode(out))


if __name__ == "__main__":
    main()
