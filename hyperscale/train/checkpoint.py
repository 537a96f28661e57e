"""Checkpoints that hold all state, written atomically.

Layout of one checkpoint directory:
  state.pt        roles' weights and optimizers, EMA, LR schedulers, counters, RNG, data cursor
  config.yaml     the resolved config of the run
  meta.json       {"step": ..., "samples": ...}: read without unpickling anything
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from hyperscale.io import atomic_dir

STATE = "state.pt"
META = "meta.json"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def write_checkpoint(directory: Path, state: dict, meta: dict, config_yaml: str) -> Path:
    """Write into a temp dir next to ``directory`` and rename it into place (atomic on POSIX)."""
    with atomic_dir(directory) as tmp:
        torch.save(state, tmp / STATE)
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / META).write_text(json.dumps(meta))
    return Path(directory)


def read_checkpoint(directory: Path) -> dict:
    directory = Path(directory)
    if not (directory / STATE).is_file():
        raise FileNotFoundError(f"{directory}: not a hyperscale checkpoint (no {STATE})")
    return torch.load(directory / STATE, map_location="cpu", weights_only=False)


def find_latest(root: Path) -> Path | None:
    """The checkpoint with the highest step anywhere under ``root`` (Ray's storage layout)."""
    best, best_step = None, -1
    for meta in Path(root).glob("**/" + META):
        if meta.parent.name.startswith(".tmp-") or not (meta.parent / STATE).is_file():
            continue
        step = json.loads(meta.read_text()).get("step", -1)
        if step > best_step:
            best, best_step = meta.parent, step
    return best


def resolve_resume(value: str | None, run_root: Path) -> Path | None:
    if not value:
        return None
    if value == "latest":
        return find_latest(run_root)  # nothing yet: a fresh start
    path = Path(value)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"train.resume_from_checkpoint: '{value}' is not a checkpoint directory "
                                f"(expected {STATE} inside), nor 'latest'")
    return path


def step_of(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1
