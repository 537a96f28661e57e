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
docs/stack.md §3); incomplete checkpoints are never resumed from.

Storage may be a local directory or an ``s3://`` prefix: ``problems``, ``find_latest``,
``meta_step`` and ``resolve_resume`` take either (S3: one listing, then small GETs for
meta.json and manifests), and ``local_copy`` gives a local directory to ``restore`` from
(an S3 checkpoint is downloaded into a temp dir of the calling process; given its rank, only
what that rank restores from).
"""
from __future__ import annotations

import functools
import json
import random
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

from hyperscale.storage.local import is_remote, join, location

import numpy as np
import torch

from hyperscale.train.step import Role

STATE = "state.pt"
META = "meta.json"
ENGINES = "engines"
MANIFESTS = "manifests"
FORMAT = 2  # 1: rank-0 state.pt only (no manifests)
SUBSET = "subset.json"  # only in a rank's local copy of an S3 checkpoint: {"ranks": [...], "source": url}

Where = Union[Path, str]  # a local checkpoint directory, or an s3:// prefix (a str)


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


def _problems(size: Callable[[str], int | None], read: Callable[[str], str]) -> list[str]:
    """``size(rel)``: a file's bytes, None when absent; ``read(rel)``: its text. A rank's copy of
    an S3 checkpoint (``local_copy``) holds the ranks its ``SUBSET`` names, checked complete."""
    if size(STATE) is None or size(META) is None:
        return [f"no {STATE} / {META}"]
    meta = json.loads(read(META))
    if meta.get("format", 1) < 2:
        return []
    out = []
    ranks = json.loads(read(SUBSET))["ranks"] if size(SUBSET) is not None else range(int(meta["world_size"]))
    for r in ranks:
        if size(_manifest(r)) is None:
            out.append(f"rank {r}: no manifest")
            continue
        for rel, n in json.loads(read(_manifest(r)))["files"].items():
            if size(rel) != n:
                out.append(f"rank {r}: {rel} missing or truncated")
    return out


def _s3_files(url: str, sizes: dict[str, int] | None = None) -> tuple[Callable, Callable]:
    """(size, read) over the checkpoint at the s3:// prefix ``url`` (``sizes``: its listing)."""
    from hyperscale.storage import s3

    if sizes is None:
        prefix = url.rstrip("/") + "/"
        sizes = {o.url[len(prefix):]: o.size for o in s3.list_objects(prefix)}
    return sizes.get, lambda rel: s3.read_text(join(url, rel))


def problems(directory: Where) -> list[str]:
    """What makes ``directory`` (local, or an s3:// prefix) not a complete checkpoint (empty
    list: complete)."""
    if is_remote(directory):
        return _problems(*_s3_files(location(directory)))
    directory = Path(directory)
    return _problems(lambda rel: (directory / rel).stat().st_size if (directory / rel).is_file() else None,
                     lambda rel: (directory / rel).read_text())


def read_checkpoint(directory: Path) -> dict:
    """The rank-0 state of a complete checkpoint (engine shards are loaded by the roles)."""
    directory = Path(directory)
    if not (directory / STATE).is_file():
        raise FileNotFoundError(f"{directory}: not a hyperscale checkpoint (no {STATE})")
    bad = problems(directory)
    if bad:
        raise FileNotFoundError(f"{directory}: incomplete checkpoint: {'; '.join(bad)}")
    return torch.load(directory / STATE, map_location="cpu", weights_only=False)


def restore(directory: Path, roles: dict[str, Role]) -> tuple[dict, float, list[str]]:
    """Load ``directory`` into ``roles`` (engine shards included, collective); returns the
    rank-0 state for the caller's part (EMA, counters, cursors, RNG), the seconds it took, and
    the optimizer settings of this run that differ from the checkpoint's ("fake_score: lr 5e-05 ->
    0.0001"): weights, moments and the schedule's position come from the checkpoint, the settings
    from the run's config."""
    t0 = time.perf_counter()
    state = read_checkpoint(directory)
    changed = []
    for name, role in roles.items():
        own = role.settings()
        role.load_state_dict(state["roles"][name])
        role.load_shards(Path(directory) / ENGINES)
        changed += [f"{name}: {c}" for c in role.use_settings(own)]
    return state, time.perf_counter() - t0, changed


def _read_meta(directory: Where) -> dict:
    if is_remote(directory):
        from hyperscale.storage.s3 import read_text

        return json.loads(read_text(join(directory, META)))
    return json.loads((Path(directory) / META).read_text())


def meta_step(directory: Where) -> int:
    return int(_read_meta(directory).get("step", -1))


def find_latest(root: Where, run_id: str | None = None) -> Where | None:
    """The complete checkpoint with the highest step anywhere under ``root`` (Ray's storage
    layout; a local directory, or an s3:// prefix: the result is then an s3:// URL); with
    ``run_id``, only those written by that run (one ``run_training`` call)."""
    if is_remote(root):
        return _find_latest_s3(location(root), run_id)
    complete, broken = _local_checkpoints(Path(root), run_id)
    best_step, best = complete[-1] if complete else (-1, None)
    _warn_skipped([b for b in broken if b[0] > best_step], best, best_step)
    return best


def complete_checkpoints(root: Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under the local ``root``, oldest first."""
    return _local_checkpoints(Path(root), run_id)[0]


def _local_checkpoints(root: Path, run_id: str | None) -> tuple[list[tuple[int, Path]], list[tuple[int, Path, str]]]:
    """Complete checkpoints under ``root`` as sorted (step, dir), and the incomplete ones as
    (step, dir, first problem); with ``run_id``, only that run's."""
    complete, broken = [], []
    for meta in root.glob("**/" + META):
        d = meta.parent
        if d.name.startswith(".tmp-"):
            continue
        info = json.loads(meta.read_text())
        if run_id is not None and info.get("run_id") != run_id:
            continue
        wrong = problems(d)
        if wrong:
            broken.append((info.get("step", -1), d, wrong[0]))
        else:
            complete.append((info.get("step", -1), d))
    return sorted(complete, key=lambda c: c[0]), broken


def _warn_skipped(broken: list[tuple[int, Where, str]], chosen: Where | None, step: int) -> None:
    """Say which newer checkpoints were incomplete (a truncated or half-written write) and which
    one is used instead."""
    for n, d, why in sorted(broken, key=lambda b: -b[0]):
        instead = f"using {chosen} (step {step})" if chosen is not None else "no complete one to use"
        print(f"[hyperscale] warning: checkpoint {d} (step {n}) is incomplete ({why}); {instead}", flush=True)


def _find_latest_s3(root: str, run_id: str | None) -> str | None:
    """``find_latest`` on S3: one listing; meta.json of each candidate, then the manifests of
    the newest candidates until one is complete."""
    from hyperscale.storage import s3

    prefix = root.rstrip("/") + "/"
    objects = {o.url: o.size for o in s3.list_objects(prefix)}
    candidates = []
    for url in objects:
        if not url.endswith("/" + META):
            continue
        d = url[:-len(META)]  # with its trailing slash
        if d.rstrip("/").rsplit("/", 1)[-1].startswith(".tmp-"):
            continue
        info = json.loads(s3.read_text(url))
        if run_id is None or info.get("run_id") == run_id:
            candidates.append((info.get("step", -1), d))
    broken = []
    for step, d in sorted(candidates, reverse=True):
        sizes = {u[len(d):]: size for u, size in objects.items() if u.startswith(d)}
        wrong = _problems(*_s3_files(d, sizes))
        if not wrong:
            _warn_skipped(broken, d.rstrip("/"), step)
            return d.rstrip("/")
        broken.append((step, d.rstrip("/"), wrong[0]))
    _warn_skipped(broken, None, -1)
    return None


def resolve_resume(value: str | None, run_root: Where) -> Where | None:
    if not value:
        return None
    if value == "latest":
        return find_latest(run_root)  # nothing yet: a fresh start
    if is_remote(value):
        from hyperscale.storage.s3 import missing_objects

        url = value.rstrip("/")
        if missing_objects([join(url, STATE)]):
            raise FileNotFoundError(f"train.resume_from_checkpoint: '{value}' is not a checkpoint "
                                    f"(expected {STATE} under that prefix), nor 'latest'")
        return url
    path = Path(value)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"train.resume_from_checkpoint: '{value}' is not a checkpoint directory "
                                f"(expected {STATE} inside), nor 'latest'")
    return path


@contextmanager
def local_copy(checkpoint: Where | None, rank: int | None = None) -> Iterator[Path | None]:
    """The checkpoint as a local directory for ``restore``: a local one as it is; an s3:// one
    downloaded into a temp dir of this process (every worker its own copy), removed after.

    With ``rank``, an S3 copy holds what that rank restores from: the rank-0 state, every
    manifest, and the files in rank 0's and this rank's manifests (DeepSpeed's non-elastic
    ZeRO load reads only its own optimizer partition), not every rank's shards. The whole
    checkpoint is checked complete on S3 first; the copy's ``SUBSET`` names the ranks it holds."""
    if checkpoint is None or not is_remote(checkpoint):
        yield None if checkpoint is None else Path(checkpoint)
        return
    from hyperscale.storage import s3

    url = location(checkpoint).rstrip("/")
    objects = s3.list_objects(url + "/")
    ranks = None
    if rank is not None:
        sizes = {o.url[len(url) + 1:]: o.size for o in objects}
        size, read = _s3_files(url, sizes)
        read = functools.lru_cache(maxsize=None)(read)  # the manifests serve the check and the split
        bad = _problems(size, read)
        if bad:
            raise FileNotFoundError(f"{url}: incomplete checkpoint: {'; '.join(bad)}")
        meta = json.loads(read(META))
        if meta.get("format", 1) >= 2:
            world = set(range(int(meta["world_size"])))
            ranks = sorted({0, rank} & world)  # a rank past the checkpoint's world (a larger run) has no files
            others = set()
            for r in world - set(ranks):
                others |= set(json.loads(read(_manifest(r)))["files"])
            objects = [o for o in objects if o.url[len(url) + 1:] not in others]
    with tempfile.TemporaryDirectory(prefix="hs-restore-") as tmp:
        local = s3.download_dir(url, Path(tmp) / "checkpoint", objects=objects)
        if ranks is not None:
            (local / SUBSET).write_text(json.dumps({"ranks": ranks, "source": url}))
        yield local


def step_of(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1
