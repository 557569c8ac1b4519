"""Training checkpoints: ``checkpoints/step_<n>/`` plus a ``latest.json`` pointer written last.

Each checkpoint contains the draft in Hugging Face layout (``draft/``: config.json
and safetensors), the optimizer state (``optimizer.pt``, tensors and plain
values only, loaded with ``weights_only=True``) and ``state.json``. A
checkpoint directory is built under a temporary name and renamed into place, so
``latest.json`` only ever points at a complete one. Older checkpoints beyond
``train.keep_last`` are deleted after the pointer moves; keep_last >= 2 means a
crash while writing the newest still leaves the previous one usable.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepspec.drafts.checkpoint import load_draft, save_draft
from deepspec.manifest import StageError, atomic_write_json, fsync_dir

logger = logging.getLogger(__name__)

LATEST = "latest.json"


@dataclass
class TrainState:
    step: int
    samples_seen: int
    tokens_seen: int
    skipped_steps: int


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, keep_last: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    staging = root / f".{checkpoint_name(state.step)}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_draft(model, staging / "draft")
    torch.save({"optimizer": optimizer.state_dict()}, staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps(state.__dict__, indent=2) + "\n", encoding="utf-8")
    fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    fsync_dir(root)
    atomic_write_json(root / LATEST, {"step": state.step, "path": final.name})
    _rotate(root, keep_last)
    logger.info("saved checkpoint %s", final)
    return final


def _rotate(root: Path, keep_last: int) -> None:
    checkpoints = sorted(path for path in root.glob("step_*") if path.is_dir())
    for old in checkpoints[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / json.loads(pointer.read_text(encoding="utf-8"))["path"]
    if not path.is_dir():
        raise StageError(f"{pointer} points at {path}, which does not exist; delete {pointer} to start over")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load weights and optimizer state into ``model`` and ``optimizer``; return the saved progress."""
    saved = load_draft(path / "draft")
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise StageError(
            f"checkpoint {path} does not match the configured draft: missing {missing}, unexpected {unexpected}. "
            "The draft settings changed since it was written; use a new storage.root or delete the checkpoint."
        )
    payload: dict[str, Any] = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(payload["optimizer"])
    return TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
