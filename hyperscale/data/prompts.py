"""Prompt-only sources for data-free text-to-image methods: prompt files and an exactly
resumable prompt stream.

Data-free methods (DMD-style, SIM) need conditions, not images: for class-conditional
models that is ``LabelStream``; for text-to-image it is ``PromptStream``, which batches
prompts loaded by ``load_prompts`` from a local file or an ``s3://`` object:

    .txt      one prompt per line; blank lines dropped
    .jsonl    one JSON object per line; the prompt is its first field of
              ``prompt``, ``text``, ``caption`` (LAION / COCO caption dumps work as they are)
    .parquet  the first column of ``prompt``, ``text``, ``caption``

Every prompt is stripped of surrounding whitespace and blank ones are dropped, in every
format. ``write_prompts`` writes the same formats (``jobs/make_shards.py --kind prompts``).

Streaming works like ``InMemoryStream``: every epoch is a permutation that depends only on
(seed, epoch); each rank takes its own contiguous slice, so ranks see disjoint positions
and the cursor (epoch, position) restores exactly. A set too small to give every rank a
full batch (fewer than ``world_size * batch_size`` prompts) is tiled: the epoch's
permutation is repeated until it is long enough, so prompts repeat within the epoch (and
within a batch if there are fewer than ``batch_size``) but each one is used a near-equal
number of times.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from hyperscale.storage import s3
from hyperscale.storage.local import atomic_file

log = logging.getLogger(__name__)

FIELDS = ("prompt", "text", "caption")  # the prompt is the first of these that is present
SUFFIXES = (".txt", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------- reading

def _suffix(source: str) -> str:
    suffix = Path(source).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{source}: unknown prompt file type {suffix or '(no suffix)'!r}; "
                         f"accepted suffixes: {', '.join(SUFFIXES)}")
    return suffix


def _read(source: str) -> bytes:
    if s3.is_s3_url(source):
        return s3.read_bytes(source)  # FileNotFoundError names the URL
    path = source[len("file://"):] if source.startswith("file://") else source
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: prompt file not found")
    return Path(path).read_bytes()


def _from_txt(data: bytes, source: str) -> list[str]:
    return data.decode("utf-8").splitlines()


def _from_jsonl(data: bytes, source: str) -> list[str]:
    prompts = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exn:
            raise ValueError(f"{source}, line {number}: not valid JSON ({exn})") from None
        field = next((f for f in FIELDS if isinstance(record, dict) and f in record), None)
        if field is None:
            raise ValueError(f"{source}, line {number}: no prompt field; each line must be a JSON "
                             f"object with one of the fields {', '.join(FIELDS)}")
        if not isinstance(record[field], str):
            raise ValueError(f"{source}, line {number}: field {field!r} is "
                             f"{type(record[field]).__name__}, not a string")
        prompts.append(record[field])
    return prompts


def _from_parquet(data: bytes, source: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    column = next((f for f in FIELDS if f in table.column_names), None)
    if column is None:
        raise ValueError(f"{source}: no prompt column (columns {table.column_names}); "
                         f"accepted column names: {', '.join(FIELDS)}")
    if not (pa.types.is_string(table.schema.field(column).type)
            or pa.types.is_large_string(table.schema.field(column).type)):
        raise ValueError(f"{source}: column {column!r} holds {table.schema.field(column).type}, "
                         f"not strings")
    return [p for p in table.column(column).to_pylist() if p is not None]  # nulls: no prompt


_READERS = {".txt": _from_txt, ".jsonl": _from_jsonl, ".parquet": _from_parquet}


def load_prompts(source: str | os.PathLike) -> list[str]:
    """The prompts of a local file or ``s3://bucket/key`` object, in file order, stripped,
    blank ones dropped. The format follows the suffix (.txt, .jsonl, .parquet).

    Raises FileNotFoundError (no such file or object), ValueError (unknown suffix, a bad
    line or column, or a source with no prompts at all).
    """
    source = os.fspath(source)
    reader = _READERS[_suffix(source)]
    prompts = [p.strip() for p in reader(_read(source), source)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{source}: no prompts (the file holds no non-blank prompt); "
                         f"write one prompt per line (.txt) or record (.jsonl, .parquet)")
    return prompts


# ----------------------------------------------------------------------------- writing

def write_prompts(prompts: Sequence[str], path: str | os.PathLike) -> Path:
    """Write ``prompts`` to a local file in the format of its suffix (.txt, .jsonl with a
    ``prompt`` field, .parquet with a ``prompt`` column), atomically. Returns the path."""
    path = Path(path)
    suffix = _suffix(str(path))
    if not prompts:
        raise ValueError(f"{path}: no prompts given; pass at least one")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()
           or (suffix == ".txt" and "\n" in p)]
    if bad:
        raise ValueError(f"{path}: prompt {bad[0]!r} is not a non-blank string"
                         + (" on one line (.txt)" if suffix == ".txt" else ""))
    with atomic_file(path) as tmp:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"prompt": pa.array(list(prompts), pa.string())}), tmp)
        else:
            lines = prompts if suffix == ".txt" else [json.dumps({"prompt": p}) for p in prompts]
            tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- streaming

class PromptStream:
    """Batches of prompts, ``(None, prompts)`` like ``LabelStream``'s ``(None, labels)``;
    each rank a disjoint slice of every epoch's permutation, exactly resumable.

    An epoch is the permutation of all prompts for (seed, epoch), tiled when shorter than
    ``world_size * batch_size``; rank r takes the r-th of ``world_size`` equal contiguous
    slices (the remainder of the division is left out of that epoch) and gives whole
    batches from it (a partial batch at the slice end is left out too: the next epoch
    begins, with another permutation, so what is left out differs every epoch).
    """

    def __init__(self, prompts: Sequence[str], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt, got an empty list")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size="
                             f"{batch_size}, rank={rank}, world_size={world_size}")
        self.prompts = list(prompts)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed = seed % 2**63
        n = len(self.prompts)
        self.tiles = -(-world_size * batch_size // n)  # 1 unless the set is too small
        self.per_rank = self.tiles * n // world_size    # >= batch_size
        if self.tiles > 1:
            log.info("%d prompts for %d ranks x %d: each epoch repeats the permutation %d times",
                     n, world_size, batch_size, self.tiles)
        self.epoch, self.position = 0, 0
        self._slice = self._epoch_slice(0)

    def _epoch_slice(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
        order = np.tile(perm, self.tiles)
        return order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[None, list[str]]:
        if self.position + self.batch_size > len(self._slice):
            self.epoch, self.position = self.epoch + 1, 0
            self._slice = self._epoch_slice(self.epoch)
        idx = self._slice[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return None, [self.prompts[i] for i in idx]

    def _layout(self) -> dict:
        """What the cursor's meaning depends on; a cursor from another layout is not exact."""
        digest = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]
        return {"prompts": digest, "count": len(self.prompts), "batch_size": self.batch_size,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed}

    def state_dict(self) -> dict:
        return {"kind": "prompts", "epoch": self.epoch, "position": self.position,
                "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "prompts":
            raise ValueError(f"not a prompt-stream cursor (keys {sorted(state)}); the checkpoint "
                             f"was written by a run with another data source")
        epoch, position = int(state["epoch"]), int(state["position"])
        if state["layout"] != self._layout():
            log.warning("prompt cursor from another layout (%s, now %s): exact resume is not "
                        "possible; starting epoch %d from its start", state["layout"],
                        self._layout(), epoch + 1)
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
        self._slice = self._epoch_slice(epoch)


def prompt_stream(source: str | os.PathLike, batch_size: int, rank: int = 0,
                  world_size: int = 1, seed: int = 0) -> PromptStream:
    """``PromptStream(load_prompts(source), ...)``: a prompt file's prompts as batches."""
    return PromptStream(load_prompts(source), batch_size, rank, world_size, seed)
