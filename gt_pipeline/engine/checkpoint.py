"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory `step_XXXXXXX/` holding `model.safetensors`, `optim.safetensors` (AdamW
moments, flattened), `rng.safetensors` (generator states) and `state.json`, which is written last:
a directory without `state.json` is an interrupted write and is ignored. Directories are written
under a temp name and renamed into place, so a crash never leaves a half checkpoint that counts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d{7})$")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict ready for safetensors: CPU, contiguous, tied weights stored once."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        ptr = (v.data_ptr(), v.shape, v.dtype)
        if v.numel() and ptr in seen:
            continue  # tied (e.g. embedding = lm head): safetensors refuses shared storage
        seen[ptr] = k
        out[k] = v.detach().cpu().contiguous().clone()
    return out


def save_model(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    save_file(model_tensors(model), str(tmp))
    os.replace(tmp, path)


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights; tied parameters stored once are filled from their twin."""
    tensors = load_file(str(path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]} for {type(model).__name__}")
    sd = model.state_dict()
    still_missing = []
    for k in missing:
        twin = next((t for t, v in sd.items() if t in tensors and v.data_ptr() == sd[k].data_ptr()), None)
        if twin is None:
            still_missing.append(k)
    if still_missing:
        raise ValueError(f"{path}: missing tensors {still_missing[:5]} for {type(model).__name__}")


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}_{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    save_file(model_tensors(model), str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, str(tmp / "optim.safetensors"))
    save_file({k: v.cpu().contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    with open(tmp / "state.json", "w") as f:  # last: the checkpoint counts from here on
        json.dump({"step": step, "optimizer": opt_meta, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found)


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model and optimizer in place; return (state.json contents, rng tensors)."""
    state = json.loads((path / "state.json").read_text())
    load_model_weights(model, path / "model.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optim.safetensors")), state["optimizer"]))
    return state, load_file(str(path / "rng.safetensors"))
