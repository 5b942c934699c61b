"""Stateful decoding for every model: prompt prefill, then one token per step, CUDA-graphed for recurrent models.

    state, last = prefill(model, prompt, chunk=512)          # prompt (B, T) -> state, last logits (B, V)
    step = DecodeStep(model, state)                          # static buffers; a CUDA graph on CUDA
    for _ in range(n):
        tok = last.argmax(-1, keepdim=True)                  # (B, 1)
        last = step(tok)                                     # (B, V), the state advanced in place

Prefill is the model's parallel forward, which returns the final state (the chunked wkv6 / SSD scans of the
recurrent layers; causal attention writing a KV cache for GPT), run over the prompt in chunks of `chunk`
tokens with the state carried, so that the logits (B, chunk, V) and activations stay bounded at long
contexts; the result equals one call over the whole prompt (tests/test_models_lm.py, tests/test_decode_bench.py).

DecodeStep holds a fixed batch's input token, state and logits in static buffers. One step runs
`model(tok, state=state)` and copies the new state into the state buffers. For a recurrent model on CUDA that
step is captured once in a CUDA graph and replayed per token: the state has a fixed size, so every replay
reads and writes the same addresses, and one graph launch replaces the few hundred kernel launches of an eager
step. Elsewhere (CPU, or `graph=False`) the same `_run` executes eagerly. GPT's KV cache grows, so its step
(which slices the cache to the current length) runs eagerly; `DecodeStep(gpt, cache)` works with graph=False.
This module is a plain library: it imports models and torch only.
"""
from __future__ import annotations

import contextlib

import torch

import models


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    # the autocast weight cache must be off for CUDA graphs: cached casts made during capture would be freed
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype, cache_enabled=False)


@torch.no_grad()
def prefill(model: models.LM, prompt: torch.Tensor, chunk: int = 512, state: models.ModelState | None = None,
            amp_dtype: torch.dtype | None = None) -> tuple[models.ModelState, torch.Tensor]:
    """Read `prompt` (B, T) int64 in chunks of `chunk` tokens through the model's parallel forward.

    state: where to continue from: None (fresh start) for a recurrent model; for GPT an empty or partly filled
    KVCache (`model.kv_cache(B, capacity)`, capacity >= T + the tokens to generate), which is required.
    amp_dtype: run under autocast to this dtype (torch.bfloat16 on CUDA), None for the parameters' dtype.
    Returns the state after the prompt (a ModelState, or the KVCache) and the last position's logits (B, V).
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prefill: prompt must be (B, T) token ids with T >= 1, got shape {tuple(prompt.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill: chunk must be a positive int, got {chunk!r}")
    if not model.is_recurrent and not isinstance(state, models.KVCache):
        raise ValueError(f"prefill: {model.config.name} decodes with a KV cache; pass "
                         f"state=model.kv_cache(batch_size, capacity)")
    last = None
    with _autocast(prompt.device, amp_dtype):
        for s in range(0, prompt.shape[1], chunk):
            out = model(prompt[:, s:s + chunk], state=state)
            state, last = out.state, out.logits[:, -1]                                  # (B, V)
    return state, last


class DecodeStep:
    """One decoding step of `model` for a fixed batch: logits (B, V) = model(tok, state) with the state advanced
    in place, captured in a CUDA graph on CUDA (module docstring).

    state: the state to start from (prefill's), copied into this step's own buffers (`self.state`).
    graph: capture a CUDA graph (default: on CUDA for recurrent models); ValueError where it cannot apply.
    amp_dtype: autocast dtype of the step (torch.bfloat16 on CUDA, as prefill), None for the parameters' dtype.
    """

    def __init__(self, model: models.LM, state: models.ModelState, graph: bool | None = None,
                 amp_dtype: torch.dtype | None = None, warmup: int = 2):
        if not isinstance(state, models.ModelState):
            raise ValueError(f"DecodeStep: state must be the ModelState (or KVCache) that prefill returned, got "
                             f"{type(state).__name__}")
        if model.training:
            raise ValueError("DecodeStep: the model is in training mode (RWKV drop draws random numbers there); "
                             "call model.eval() first")
        self.model, self.amp_dtype = model, amp_dtype
        self.device = state.layers[0][next(iter(state.layers[0]))].device
        can_graph = self.device.type == "cuda" and model.is_recurrent
        graph = can_graph if graph is None else graph
        if graph and not can_graph:
            raise ValueError(f"DecodeStep: a CUDA graph needs a recurrent model on CUDA (fixed-size state); got "
                             f"{model.config.name} on {self.device.type}. Use graph=False")
        B = state.batch_size
        self.tok = torch.zeros(B, 1, dtype=torch.int64, device=self.device)               # (B, 1) static input
        if isinstance(state, models.KVCache):
            self.state = state    # the cache's buffers are written in place; only its length advances
        else:
            self.state = models.ModelState([{k: v.clone() for k, v in d.items()} for d in state.layers])
        self.logits: torch.Tensor | None = None                                           # (B, V) static output
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self._capture(warmup)

    @torch.no_grad()
    def _run(self) -> None:
        """The step itself: read self.tok and self.state, write self.state and self.logits."""
        with _autocast(self.device, self.amp_dtype):
            out = self.model(self.tok, state=self.state)
        if isinstance(self.state, models.KVCache):
            self.state = out.state
        else:
            for old, new in zip(self.state.layers, out.state.layers):
                if old.keys() != new.keys():
                    raise RuntimeError(f"DecodeStep: the step returned state keys {sorted(new)}, the start state "
                                       f"has {sorted(old)}")
                for k, v in new.items():
                    old[k].copy_(v)
        last = out.logits[:, -1]                                                          # (B, V)
        if self.logits is None:
            self.logits = torch.empty_like(last)
        self.logits.copy_(last)

    def _capture(self, warmup: int) -> None:
        # Warm-up runs (kernel builds, cuBLAS handles, lazy allocations) on a side stream, as torch.cuda.graphs
        # asks, then one captured run. Warm-up advances the state, so it runs on a saved copy that is restored.
        saved = [{k: v.clone() for k, v in d.items()} for d in self.state.layers]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()
        for d, keep in zip(self.state.layers, saved):       # capture records kernels; it does not run them
            for k, v in keep.items():
                d[k].copy_(v)

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (B, 1) int64 -> logits (B, V) of the next token; the returned tensor is overwritten by the next
        call (clone it to keep it)."""
        if tok.shape != self.tok.shape:
            raise ValueError(f"DecodeStep: tok must have shape {tuple(self.tok.shape)} (fixed batch), got "
                             f"{tuple(tok.shape)}")
        self.tok.copy_(tok)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        return self.logits
