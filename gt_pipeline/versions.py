"""Code versions derived from the code: one hash per asset over the source files it depends on.

A Python file enters the hash as its syntax tree with docstrings removed (`ast.dump`), so editing a
comment, a docstring or the layout leaves the version unchanged while any change to what the code
does changes it. Other files (C++/CUDA sources) enter byte for byte. The version is computed once at
import (about 50 files, tens of milliseconds) and becomes both the Dagster `code_version` (so the UI
marks the asset and its dependants stale) and part of every artifact fingerprint (so the cache misses).

`DEPENDS` lists, per asset family, the paths (files or packages, relative to the repository root)
whose code determines the artifact's bytes. Presentation code (markdown previews, metadata) is left
out on purpose: changing how a result is shown does not make the stored result wrong.
This module knows nothing about Dagster.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Engine modules every trained model depends on (the training loop, its metrics, checkpoint format).
_TRAIN_ENGINE = ("gt_pipeline/engine/train.py", "gt_pipeline/engine/metrics.py", "gt_pipeline/engine/checkpoint.py",
                 "gt_pipeline/engine/artifact.py", "gt_pipeline/engine/distributed.py", "gt_pipeline/engine/worker.py",
                 "gt_pipeline/engine/objectives.py")

DEPENDS: dict[str, tuple[str, ...]] = {
    "wikitext103_raw": ("data/sources.py", "data/demo.py"),
    "bpe_tokenizer": ("data/bpe.py",),
    "token_shards": ("data/shards.py", "data/bpe.py"),
    # The compiled sources are keyed separately (kernels.build.source_hash enters the toolchain); the
    # Python side decides how the extension is built and smoke-tested.
    "wkv6_kernel": ("kernels/build.py", "kernels/smoke.py", "kernels/reference.py", "kernels/csrc"),
    "trained": ("models", "kernels/wkv6.py", "kernels/reference.py", "data/shards.py", "data/batching.py",
                *_TRAIN_ENGINE),
    # Gate checks: what they measure (metrics), where the thresholds are (gates) and how (checks).
    "gate_checks": ("gt_pipeline/checks.py", "gt_pipeline/gates.py", "gt_pipeline/engine/metrics.py", "models",
                    "kernels/wkv6.py"),
    "reports": ("gt_pipeline/assets/reports.py", "gt_pipeline/engine/evaluate.py", "gt_pipeline/engine/metrics.py",
                "gt_pipeline/engine/stats.py", "gt_pipeline/checks.py", "gt_pipeline/gates.py", "models",
                "kernels/wkv6.py", "data/shards.py", "data/demo.py"),
    # The sweep's runs (training + the held-out evaluation every run shares) and their comparison report.
    "sweep": ("gt_pipeline/assets/sweep.py", "gt_pipeline/engine/evaluate.py", "gt_pipeline/engine/stats.py",
              "gt_pipeline/engine/compare.py", "models", "kernels/wkv6.py", "kernels/reference.py", "data/shards.py",
              "data/batching.py", *_TRAIN_ENGINE),
}

_SOURCE_SUFFIXES = {".py", ".cpp", ".cu", ".cuh", ".h", ".hpp"}


class _StripDocstrings(ast.NodeTransformer):
    """Drop the leading string expression of modules, classes and functions."""

    def _strip(self, node):
        self.generic_visit(node)
        body = getattr(node, "body", None)
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


def normalized_source(path: Path) -> bytes:
    """What of a file enters its hash: the docstring-free AST for Python, the raw bytes otherwise."""
    raw = path.read_bytes()
    if path.suffix != ".py":
        return raw
    try:
        tree = ast.parse(raw, filename=str(path))
    except SyntaxError as exc:
        raise ValueError(f"cannot derive a code version from {path}: {exc}") from exc
    return ast.dump(_StripDocstrings().visit(tree), include_attributes=False).encode()


def _files(rel: str, repo: Path) -> list[Path]:
    p = repo / rel
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _SOURCE_SUFFIXES
                      and "__pycache__" not in f.parts)
    raise ValueError(f"versions.DEPENDS names {rel!r}, which is not a file or directory under {repo}")


def source_version(paths: tuple[str, ...] | list[str], repo: Path = REPO) -> str:
    """12 hex chars over the normalized contents (and repo-relative names) of every file under `paths`."""
    h = hashlib.sha256()
    for rel in sorted(set(paths)):
        for f in _files(rel, repo):
            h.update(f.relative_to(repo).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(normalized_source(f)).digest())
    return h.hexdigest()[:12]


@lru_cache(maxsize=None)
def code_version(family: str) -> str:
    """The derived code version of one asset family (a key of DEPENDS), e.g. 'trained' -> '3fa2b1c0d4e5'."""
    if family not in DEPENDS:
        raise ValueError(f"no code version for {family!r}; known: {sorted(DEPENDS)}")
    return source_version(DEPENDS[family])
