"""Print the parameter-count table of every preset as markdown: `python -m models.params [--vocab 16000]`.

models/PARAMS.md is this output (regenerate it when a preset changes; tests/test_models_lm.py pins the numbers).
"""
from __future__ import annotations

import argparse

from .config import HYBRID_NAMES, SIZE_PRESETS
from .registry import get_model, list_models

# The seeds' recorded counts (shared/SEEDS.md, shared/notes/seeds-inventory.md section 1.1), hidden 128 x 8
# unless noted. Their "RWKV-6" branch was not RWKV-6 (static decay, internal LN + FFN), so they differ from ours.
SEEDS_16K = {"GF-MH": "5,618,920", "GF-RH": "5,618,920", "GF": "5,618,920", "HY": "5,620,960",
             "WS": "5,616,872", "RF": "5,747,936", "CP": "5,879,008", "GPT": "6,814,080 (GPT-2, 192 x 8)",
             "RWKV6": "5,631,120 (144 x 8; docs said 4.46M)", "MAMBA2": "-",
             "GF-XM": "5,618,920", "GF-XR": "5,618,920", "HGF": "5,880,032", "HGF-MH": "5,880,032",
             "HGF-RH": "5,880,032", "GRU": "6,804,720",
             "MINGRU": "- (notebook only, never in a registered model)",
             "LINREC": "- (notebook pilot: 5,261,592 with linear stand-in branches, 256 x 8, vocab 16384)"}


def table(vocab_size: int = 16000) -> str:
    sizes = list(SIZE_PRESETS)
    head = "| model | " + " | ".join(f"{s} (layers / params)" for s in sizes) + " | seeds, hidden 128 x 8 |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for name in list_models():
        cells = []
        for s in sizes:
            m = get_model(name, vocab_size, size=s)
            cells.append(f"{m.config.n_layer} / {m.num_params():,}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {SEEDS_16K[name]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=16000)
    args = ap.parse_args()
    print(f"Parameters at vocab {args.vocab} (tied embedding counted once). Hybrids: {', '.join(HYBRID_NAMES)}.")
    print()
    print(table(args.vocab))


if __name__ == "__main__":
    main()
