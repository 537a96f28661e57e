"""Checkpoints that hold all state, with every rank's shards, checked for completeness.

Every rank writes its part into its own local directory and reports it through
``ray.train.report``; Ray merges the ranks' directories into one checkpoint in the run's
storage (local or S3), so no shared filesystem is needed. Layout of a merged checkpoint:

  state.pt                   rank 0: plain-torch roles' weights and optimizers, LR schedules,
                             EMA, counters, every rank's RNG state and data cursor
  config.yaml                rank 0: the resolved config of the run
  meta.json                  rank 0: {"step", "samples", "world_size", "run_id", "format"},
                             read without unpickling anything
  engines/<role>/state/...   DeepSpeed engine shards, each rank its own files
                             (ZeRO: zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank)
  manifests/rank-<r>.json    every rank: {relative path: bytes} of the files it wrote

A checkpoint is complete when rank 0's meta.json names ``world_size`` and every rank's
manifest is there with all its files at their sizes (Ray's merge once lost a shard,
STACK.md §3); incomplete checkpoints are never resumed from.
"""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from hyperscale.train.step import Role

STATE = "state.pt"
META = "meta.json"
ENGINES = "engines"
MANIFESTS = "manifests"
FORMAT = 2  # 1: rank-0 state.pt only (no manifests)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _manifest(rank: int) -> str:
    return f"{MANIFESTS}/rank-{rank:05d}.json"


def write_rank(directory: Path, rank: int, roles: Iterable[Role], state: dict | None = None,
               meta: dict | None = None, config_yaml: str | None = None) -> Path:
    """Collective: every rank writes its engine shards into ``directory`` (its own, empty),
    rank 0 also ``state``, ``meta`` and the config; then the rank's manifest, last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for role in roles:
        role.save_shards(directory / ENGINES)
    if rank == 0:
        torch.save(state, directory / STATE)
        (directory / "config.yaml").write_text(config_yaml or "")
        (directory / META).write_text(json.dumps(meta | {"format": FORMAT}))
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / _manifest(rank)).parent.mkdir(exist_ok=True)
    (directory / _manifest(rank)).write_text(json.dumps({"rank": rank, "files": files}))
    return directory


def problems(directory: Path) -> list[str]:
    """What makes ``directory`` not a complete checkpoint (empty list: complete)."""
    directory = Path(directory)
    if not (directory / STATE).is_file() or not (directory / META).is_file():
        return [f"no {STATE} / {META}"]
    meta = json.loads((directory / META).read_text())
    if meta.get("format", 1) < 2:
        return []
    out = []
    for r in range(int(meta["world_size"])):
        path = directory / _manifest(r)
        if not path.is_file():
            out.append(f"rank {r}: no manifest")
            continue
        for rel, size in json.loads(path.read_text())["files"].items():
            f = directory / rel
            if not f.is_file() or f.stat().st_size != size:
                out.append(f"rank {r}: {rel} missing or truncated")
    return out


def read_checkpoint(directory: Path) -> dict:
    """The rank-0 state of a complete checkpoint (engine shards are loaded by the roles)."""
    directory = Path(directory)
    if not (directory / STATE).is_file():
        raise FileNotFoundError(f"{directory}: not a hyperscale checkpoint (no {STATE})")
    bad = problems(directory)
    if bad:
        raise FileNotFoundError(f"{directory}: incomplete checkpoint: {'; '.join(bad)}")
    return torch.load(directory / STATE, map_location="cpu", weights_only=False)


def restore(directory: Path, roles: dict[str, Role]) -> tuple[dict, float]:
    """Load ``directory`` into ``roles`` (engine shards included, collective); returns the
    rank-0 state for the caller's part (EMA, counters, cursors, RNG) and the seconds it took."""
    t0 = time.perf_counter()
    state = read_checkpoint(directory)
    for name, role in roles.items():
        role.load_state_dict(state["roles"][name])
        role.load_shards(Path(directory) / ENGINES)
    return state, time.perf_counter() - t0


def meta_step(directory: Path) -> int:
    return int(json.loads((Path(directory) / META).read_text()).get("step", -1))


def find_latest(root: Path, run_id: str | None = None) -> Path | None:
    """The complete checkpoint with the highest step anywhere under ``root`` (Ray's storage
    layout); with ``run_id``, only those written by that run (one ``run_training`` call)."""
    best, best_step = None, -1
    for meta in Path(root).glob("**/" + META):
        d = meta.parent
        if d.name.startswith(".tmp-") or problems(d):
            continue
        info = json.loads(meta.read_text())
        if run_id is not None and info.get("run_id") != run_id:
            continue
        if info.get("step", -1) > best_step:
            best, best_step = d, info.get("step", -1)
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
