"""Batches from a token stream (a uint16 memmap from TokenShards.split, or any 1-D int array).

Two ways to read a split, both pure slicing of the memmap (nothing is loaded up front):

* `random_windows`: B windows at uniformly random offsets (nanoGPT's get_batch). Stateless models.
* `StatefulTracks`: the seeds' "stateful dataset". The split is cut into B contiguous tracks, one
  per batch row; batch i+1 continues batch i on every row, so a recurrent model can carry its state
  from step to step. `is_new_doc[b]` says that row b's window starts a new document (or the track
  starts), i.e. the carried state must be reset. A document boundary inside a window is not flagged:
  the model sees the EOT token there.

    tracks = StatefulTracks(shards.split("train"), shards.doc_starts("train"), batch_size=64, seq_len=128)
    for x, y, is_new_doc in tracks: ...      # x, y int64 [B, T]; is_new_doc bool [B]; endless
    ckpt["data"] = tracks.state_dict(); tracks.load_state_dict(ckpt["data"])   # exact resume

torch is imported inside the functions so that `import data` (and the encoding worker processes)
stay light (~350 MB saved per process).
"""
from __future__ import annotations

import numpy as np


def _check_stream(tokens, what: str) -> None:
    if getattr(tokens, "ndim", None) != 1:
        raise ValueError(f"{what} needs a 1-D token array (e.g. TokenShards.split('train')), "
                         f"got {type(tokens).__name__} with shape {getattr(tokens, 'shape', None)}")


def random_windows(tokens, batch_size: int, seq_len: int, generator=None):
    """B random windows of a token stream.

    Args:
        tokens: 1-D integer array [N] (np.memmap uint16 from TokenShards.split).
        batch_size: B; seq_len: T; needs N >= T + 1.
        generator: torch.Generator for the offsets (None: torch's global RNG).
    Returns (x, y): int64 tensors [B, T] with y[b, t] = tokens[i_b + t + 1] = x[b, t + 1] for t < T - 1.
    """
    import torch

    _check_stream(tokens, "random_windows")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    n = len(tokens)
    if n < seq_len + 1:
        raise ValueError(f"the token stream has {n} tokens, too few for windows of seq_len={seq_len} "
                         f"(need at least {seq_len + 1}): use a shorter seq_len or a larger split")
    ix = torch.randint(n - seq_len, (batch_size,), generator=generator).tolist()
    xy = np.stack([np.asarray(tokens[i:i + seq_len + 1], dtype=np.int64) for i in ix])  # (B, T+1)
    xy = torch.from_numpy(xy)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # (B, T), (B, T)


class StatefulTracks:
    """B contiguous parallel tracks over a token stream, iterated in order, resumable.

    Track b covers tokens[b * L : b * L + S * T + 1] with L = (N - 1) // B and S = L // T steps per
    epoch; step s of row b reads x = tokens[b*L + s*T : b*L + (s+1)*T], y shifted by one. The last
    L - S*T (< T) tokens of each track are not visited. After S steps the iterator wraps to step 0
    (epoch + 1) unless `loop=False`, in which case it stops.

    Args:
        tokens: 1-D integer array [N] (np.memmap uint16 from TokenShards.split).
        doc_starts: int array [D] of document start offsets (TokenShards.doc_starts), increasing.
        batch_size: B tracks; seq_len: T tokens per step; needs N >= B * T + 1.
    Yields (x, y, is_new_doc): int64 [B, T], int64 [B, T], bool [B].
    """

    def __init__(self, tokens, doc_starts, batch_size: int, seq_len: int, loop: bool = True):
        _check_stream(tokens, "StatefulTracks")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        n = len(tokens)
        if n < batch_size * seq_len + 1:
            raise ValueError(f"the split has {n} tokens, too few for {batch_size} tracks of at least one "
                             f"{seq_len}-token step (need batch_size * seq_len + 1 = {batch_size * seq_len + 1}): "
                             "use a smaller batch_size or seq_len, or a larger split")
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        if self.doc_starts.ndim != 1 or np.any(np.diff(self.doc_starts) <= 0):
            raise ValueError("doc_starts must be a 1-D increasing array of document offsets (TokenShards.doc_starts)")
        self.batch_size, self.seq_len, self.loop = batch_size, seq_len, loop
        self.track_len = (n - 1) // batch_size          # L
        self.steps_per_epoch = self.track_len // seq_len  # S
        self.track_starts = np.arange(batch_size, dtype=np.int64) * self.track_len  # (B,)
        self.step = 0
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch(self, step: int):
        """The batch of a given step in [0, steps_per_epoch), without moving the iterator."""
        import torch

        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} is outside [0, {self.steps_per_epoch})")
        T = self.seq_len
        pos = self.track_starts + step * T  # (B,) window start of each row
        xy = np.stack([np.asarray(self.tokens[p:p + T + 1], dtype=np.int64) for p in pos])  # (B, T+1)
        # a window starts a document iff its first position is one of doc_starts
        ds = self.doc_starts
        k = np.minimum(np.searchsorted(ds, pos), len(ds) - 1)
        starts_doc = ds[k] == pos if len(ds) else np.zeros(len(pos), dtype=bool)
        is_new = starts_doc | (step == 0)  # (B,)
        xy = torch.from_numpy(xy)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous(), torch.from_numpy(is_new)

    def __iter__(self):
        return self

    def __next__(self):
        if self.step >= self.steps_per_epoch:
            if not self.loop:
                raise StopIteration
            self.step, self.epoch = 0, self.epoch + 1
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        want = {"batch_size": self.batch_size, "seq_len": self.seq_len, "tokens": len(self.tokens)}
        got = {k: state.get(k) for k in want}
        if got != want:
            raise ValueError(f"cannot resume StatefulTracks: the saved position is for {got}, this one is {want}; "
                             "resume with the same split, batch_size and seq_len")
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"saved step {state['step']} is outside [0, {self.steps_per_epoch}]")
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
