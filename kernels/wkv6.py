"""`wkv6`: the public RWKV-6 op, an autograd Function over the compiled CPU and CUDA backends.

The backend follows the inputs' device: CPU tensors (float32, float64) run the C++ extension,
CUDA tensors (float32, bfloat16; float32 state and accumulation) the CUDA one. Both are JIT-built on
first use (kernels/build.py). On CUDA two implementations share the extension: the chunked
tensor-core kernels (csrc/wkv6_chunk.cu: bf16 r, k, v, head size 64) and the sequential ones
(csrc/wkv6_cuda.cu: every supported dtype and head size, the reference backend). `impl="auto"`
takes the chunked kernels where they apply (the faster ones at every measured shape, BENCHMARKS.md; their
gradients meet the sequential kernels' bounds, decay gradient at extreme decays included) and the sequential
ones elsewhere; `set_auto_impl("sequential")` changes that for a process.
If a build fails the call raises; it never falls back to the (much slower) references, which stay
available as `wkv6_ref` / `wkv6_chunked_ref`.
"""
from __future__ import annotations

import torch

from .build import HEAD_SIZES_CUDA, get_extension

__all__ = ["wkv6", "WKV6Function"]

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.bfloat16)


IMPLS = ("auto", "chunked", "sequential")
CHUNKED_HEAD_SIZE = 64
# What impl="auto" resolves to: the chunked kernels where they apply (chunked_applies), the sequential ones
# elsewhere. set_auto_impl changes it for a process; models choose per layer (pick_impl).
_AUTO = {"prefer": "chunked"}


def set_auto_impl(prefer: str) -> None:
    """Make impl="auto" resolve to `prefer` ("chunked": where it applies, or "sequential": always).
    For A/B comparisons of whole models, whose layers call wkv6 with the default impl."""
    if prefer not in ("chunked", "sequential"):
        raise ValueError(f"wkv6: set_auto_impl takes 'chunked' or 'sequential', got {prefer!r}")
    _AUTO["prefer"] = prefer


def chunked_applies(r: torch.Tensor) -> bool:
    """Whether the chunked CUDA kernels handle these (already validated) inputs."""
    return r.is_cuda and r.dtype == torch.bfloat16 and r.shape[-1] == CHUNKED_HEAD_SIZE


def check_impl(impl: str, what: str = "wkv6: impl") -> None:
    """ValueError "<what> must be one of IMPLS, got ..." unless `impl` is one of IMPLS."""
    if impl not in IMPLS:
        raise ValueError(f"{what} must be one of {IMPLS}, got {impl!r}")


def pick_impl(prefer: str, r: torch.Tensor) -> str:
    """The `impl` for a layer configured with `prefer`: "chunked" takes the chunked kernels where they apply to r
    (CUDA, bfloat16, head size 64) and the sequential ones elsewhere (CPU, fp32, other head sizes); "auto" and
    "sequential" pass through. ValueError naming the choices for anything else."""
    check_impl(prefer)
    return "sequential" if prefer == "chunked" and not chunked_applies(r) else prefer


def resolve_impl(impl: str, r: torch.Tensor) -> str:
    """'chunked' or 'sequential' for validated inputs; ValueError naming the problem otherwise."""
    check_impl(impl)
    if impl == "auto":
        return "chunked" if _AUTO["prefer"] == "chunked" and chunked_applies(r) else "sequential"
    if impl == "chunked" and not chunked_applies(r):
        raise ValueError(
            "wkv6: impl='chunked' needs CUDA bfloat16 r, k, v with head size K = V = "
            f"{CHUNKED_HEAD_SIZE}; got {r.device.type} {r.dtype}, K={r.shape[-1]} (use impl='auto')"
        )
    return impl


def _validate(r, k, v, w, u, initial_state) -> None:
    """Raise ValueError naming the problem; the kernels assume everything checked here."""
    named = {"r": r, "k": k, "v": v, "w": w, "u": u}
    if initial_state is not None:
        named["initial_state"] = initial_state
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"wkv6: {name} must be a torch.Tensor, got {type(t).__name__}")
    if r.dim() != 4:
        raise ValueError(f"wkv6: r must be [B, T, H, K], got shape {tuple(r.shape)}")
    B, T, H, K = r.shape
    if k.shape != r.shape:
        raise ValueError(f"wkv6: k must have r's shape [B, T, H, K] = {tuple(r.shape)}, got {tuple(k.shape)}")
    if w.shape != r.shape and w.shape != (B, T, H, 1):
        raise ValueError(f"wkv6: w must be [B, T, H, K] = {tuple(r.shape)} (one decay per channel) or "
                         f"[B, T, H, 1] = {(B, T, H, 1)} (one per head), got {tuple(w.shape)}")
    if v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(
            f"wkv6: v must be [B, T, H, V] with B, T, H = {B}, {T}, {H} (from r), got {tuple(v.shape)}"
        )
    V = v.shape[3]
    if u.shape != (H, K):
        raise ValueError(f"wkv6: u must be [H, K] = ({H}, {K}), got {tuple(u.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(
            f"wkv6: initial_state must be [B, H, K, V] = ({B}, {H}, {K}, {V}), got {tuple(initial_state.shape)}"
        )
    if min(B, T, H, K, V) < 1:
        raise ValueError(f"wkv6: every dimension must be >= 1, got B,T,H,K,V = {B},{T},{H},{K},{V}")
    dev = r.device
    for name, t in named.items():
        if t.device != dev:
            raise ValueError(f"wkv6: all inputs must be on one device; r is on {dev}, {name} on {t.device}")
        if not t.is_floating_point():
            raise ValueError(f"wkv6: {name} must be a floating-point tensor, got {t.dtype}")
    check_backend_support(dev.type, r.dtype, k.dtype, v.dtype, w.dtype, K, V)


def check_backend_support(device_type: str, r_dtype, k_dtype, v_dtype, w_dtype, K: int, V: int) -> None:
    """Raise ValueError unless the backend for `device_type` handles these dtypes and head sizes."""
    named = {"k": k_dtype, "v": v_dtype}
    if device_type == "cpu":
        if r_dtype not in _CPU_DTYPES:
            raise ValueError(f"wkv6: the CPU backend supports float32 and float64 inputs, got r {r_dtype}")
        named["w"] = w_dtype
        for name, dt in named.items():
            if dt != r_dtype:
                raise ValueError(f"wkv6: {name} must have r's dtype {r_dtype}, got {dt}")
    elif device_type == "cuda":
        if r_dtype not in _CUDA_DTYPES:
            raise ValueError(f"wkv6: the CUDA backend supports float32 and bfloat16 inputs, got r {r_dtype}")
        for name, dt in named.items():
            if dt != r_dtype:
                raise ValueError(f"wkv6: {name} must have r's dtype {r_dtype}, got {dt}")
        if w_dtype != r_dtype and not (r_dtype == torch.bfloat16 and w_dtype == torch.float32):
            raise ValueError(f"wkv6: w must have r's dtype {r_dtype} (or float32 with bfloat16 r), got {w_dtype}")
        if not (K == V and K in HEAD_SIZES_CUDA):
            raise ValueError(
                f"wkv6: the CUDA backend supports head sizes K = V in {HEAD_SIZES_CUDA}, got K={K}, V={V}"
            )
    else:
        raise ValueError(f"wkv6: unsupported device type {device_type!r}; expected cpu or cuda")


def _prep(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the CUDA kernels use vector loads)."""
    t = t.contiguous()
    if t.data_ptr() % 16 != 0:
        t = t.clone()
    return t


def _state_dtype(r: torch.Tensor) -> torch.dtype:
    """The state (and u, h0 as the kernels take them): float32, float64 on the float64 CPU path."""
    return torch.float64 if r.dtype == torch.float64 else torch.float32


CHUNK = 16  # the chunked kernels' chunk length


def chunk_scores_numel(B: int, T: int, H: int) -> int:
    """Values (bf16) of the scores the chunked forward hands to its backward: 2 x 16 x 16 per (b, h) and chunk."""
    return B * H * -(-T // CHUNK) * 2 * CHUNK * CHUNK


def check_scores(scores: torch.Tensor, r: torch.Tensor) -> None:
    """ValueError unless `scores` is what the chunked forward returns with save_scores for inputs shaped like r."""
    B, T, H, _ = r.shape
    want = chunk_scores_numel(B, T, H)
    if scores.dtype != torch.bfloat16 or scores.shape != (want,) or scores.device != r.device:
        raise ValueError(
            f"wkv6: the chunked backward needs the scores its forward saved (save_scores=True): bfloat16 [{want}] on "
            f"{r.device} for B, T, H = {B}, {T}, {H}; got {scores.dtype} {list(scores.shape)} on {scores.device}")


# The extension calls are registered as torch.library custom ops, so torch.compile traces a model
# through wkv6 (WKV6Function's forward and backward call them) instead of breaking its graph here.
# With `chunked` and `save_scores` the forward also returns each chunk's intra-chunk scores, which the chunked
# backward reads instead of forming them again; otherwise that output is empty.
@torch.library.custom_op("groundthink::wkv6_fwd", mutates_args=())
def _wkv6_fwd(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
              h0: torch.Tensor | None, chunked: bool, save_scores: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, k, v, w, u = (_prep(x) for x in (r, k, v, w, u))
    h0 = None if h0 is None else _prep(h0)
    if r.is_cuda:
        return tuple(get_extension("cuda").forward(r, k, v, w, u, h0, chunked, save_scores))
    y, state = get_extension("cpu").forward(r, k, v, w, u, h0)
    return y, state, r.new_empty((0,))


@_wkv6_fwd.register_fake
def _(r, k, v, w, u, h0, chunked, save_scores):
    B, T, H, K = r.shape
    scores = r.new_empty((chunk_scores_numel(B, T, H) if chunked and save_scores else 0,))
    return torch.empty_like(v), r.new_empty((B, H, K, v.shape[-1]), dtype=_state_dtype(r)), scores


@torch.library.custom_op("groundthink::wkv6_bwd", mutates_args=())
def _wkv6_bwd(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
              h0: torch.Tensor | None, gy: torch.Tensor, gs: torch.Tensor, chunked: bool,
              scores: torch.Tensor) -> list[torch.Tensor]:
    r, k, v, w, u, gy, gs = (_prep(x) for x in (r, k, v, w, u, gy, gs))
    h0 = None if h0 is None else _prep(h0)
    if chunked:
        check_scores(scores, r)
    if r.is_cuda:
        out = get_extension("cuda").backward(r, k, v, w, u, h0, gy, gs, chunked, scores)
    else:
        out = get_extension("cpu").backward(r, k, v, w, u, h0, gy, gs)
    return list(out)


@_wkv6_bwd.register_fake
def _(r, k, v, w, u, h0, gy, gs, chunked, scores):
    gh0 = torch.empty_like(h0) if h0 is not None else u.new_empty((0,), dtype=_state_dtype(r))
    return [torch.empty_like(r), torch.empty_like(k), torch.empty_like(v), torch.empty_like(w),
            torch.empty_like(u), gh0]


class WKV6Function(torch.autograd.Function):
    """forward(r, k, v, w, u, initial_state, chunked, save_scores) -> (y, final_state); inputs validated by `wkv6`,
    u and initial_state already in the state dtype (`wkv6` casts them; autograd casts their gradients back);
    save_scores: a backward will run (the chunked kernels then keep their scores for it).

    Saves the inputs and, on the chunked kernels, each chunk's 16 x 16 intra-chunk scores (1 KiB per (b, h)
    and chunk, half of r's size in bf16); the backward recomputes the states (no [T, K, V] history is kept).
    """

    @staticmethod
    def forward(ctx, r, k, v, w, u, initial_state, chunked=False, save_scores=False):
        y, state, scores = _wkv6_fwd(r, k, v, w, u, initial_state, chunked, save_scores)
        ctx.chunked = chunked
        ctx.save_for_backward(r, k, v, w, u, initial_state, scores)
        return y, state

    @staticmethod
    def backward(ctx, gy, gstate):
        r, k, v, w, u, h0, scores = ctx.saved_tensors
        gr, gk, gv, gw, gu, gh0 = _wkv6_bwd(r, k, v, w, u, h0, gy.to(v.dtype), gstate.to(u.dtype), ctx.chunked,
                                            scores)
        return gr, gk, gv, gw, gu, (gh0 if h0 is not None else None), None, None


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-6 wkv: y_t = r_t (diag(u) k_t^T v_t + S_{t-1}),  S_t = diag(exp(-exp(w_t))) S_{t-1} + k_t^T v_t.

    Args:
        r: `[B, T, H, K]` receptance.
        k: `[B, T, H, K]` key.
        v: `[B, T, H, V]` value.
        w: `[B, T, H, K]` raw decay (RWKV-LM convention: decay = exp(-exp(w)), computed in fp32), or
            `[B, T, H, 1]`: one decay per head, shared by its K channels (Mamba-2's scalar decay). The
            chunked kernels read it as is and sum its gradient over the channels in fp64; the other
            backends run it expanded to `[B, T, H, K]` (autograd sums the gradient).
        u: `[H, K]` bonus for the current token (any float dtype).
        initial_state: optional `[B, H, K, V]` state S_{-1}; differentiable.
        output_final_state: also return S_{T-1}.
        impl: CUDA implementation: "auto" (chunked where it applies, else sequential; see
            `set_auto_impl`), "chunked" (CUDA bf16 r, k, v, K = V = 64; ValueError
            otherwise) or "sequential" (the only one on CPU).
    dtypes: CPU float32/float64 (all of r, k, v, w alike); CUDA float32 or bfloat16 for r, k, v, and
        w in r's dtype or float32; CUDA needs K = V in (32, 64, 128). Accumulation is float32 (float64
        on the float64 CPU path).
    Returns:
        y `[B, T, H, V]` in r's dtype, and the final state `[B, H, K, V]` (float32; float64 on the
        float64 CPU path) or None. Differentiable in r, k, v, w, u and initial_state.
    """
    _validate(r, k, v, w, u, initial_state)
    chunked = resolve_impl(impl, r) == "chunked"
    if w.shape[-1] != r.shape[-1] and not chunked:
        w = w.expand(r.shape)
    sd = _state_dtype(r)
    h0 = None if initial_state is None else initial_state.to(sd)
    u = u.to(sd)
    # the chunked backward reads scores its forward keeps: only worth keeping when a backward can follow
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (r, k, v, w, u, h0))
    y, state = WKV6Function.apply(r, k, v, w, u, h0, chunked, chunked and grads)
    return y, (state if output_final_state else None)
