"""Exactly resumable batch streams: from an in-memory set, from WebDataset shards (any
sample format: class-label or caption shards), and class labels only (data-free methods;
prompts are ``hyperscale.data.prompts.PromptStream``).

Each keeps a small cursor (counters, or the state of its own RNG), so ``state_dict()``
/ ``load_state_dict()`` restore a stream that yields exactly what the uninterrupted one
would have yielded next.

In memory: each rank sees a disjoint slice of every epoch's permutation; the
permutation depends only on (seed, epoch), so the cursor (epoch, position) restores
exactly.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0  # index into this rank's slice of the epoch's permutation


class InMemoryStream:
    def __init__(self, images: Tensor, labels: Tensor, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if len(images) < world_size * batch_size:
            raise ValueError(f"{len(images)} samples cannot fill a batch of {batch_size} on {world_size} ranks")
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.cursor = Cursor()
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.labels), generator=g)
        per_rank = len(perm) // self.world_size
        return perm[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.cursor.position + self.batch_size > len(self._order):
            self.cursor = Cursor(self.cursor.epoch + 1, 0)
            self._order = self._epoch_order(self.cursor.epoch)
        idx = self._order[self.cursor.position:self.cursor.position + self.batch_size]
        self.cursor.position += self.batch_size
        return self.images[idx], self.labels[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.cursor.epoch, "position": self.cursor.position}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = Cursor(int(state["epoch"]), int(state["position"]))
        self._order = self._epoch_order(self.cursor.epoch)


class LabelStream:
    """Conditioning only, for data-free methods: uniform class labels, exactly resumable.

    Each rank draws from its own generator seeded by (seed, rank); the generator's
    state is the cursor.
    """

    def __init__(self, batch_size: int, num_classes: int, rank: int = 0, seed: int = 0):
        self.batch_size, self.num_classes = batch_size, num_classes
        self.generator = torch.Generator().manual_seed(seed * 100_003 + 7919 * (rank + 1))
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[None, Tensor]:
        self.batches += 1
        return None, torch.randint(0, self.num_classes, (self.batch_size,), generator=self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches = int(state["batches"])


@dataclass
class ShardCursor:
    """Where a shard stream stands; enough to continue it exactly, with no buffer or RNG
    state (every random draw is seeded from these counters).

    epoch: pass over this rank's shard order (a pass's order depends on (seed, epoch));
    shard: index in that order of the first shard of the current window;
    offset: raw samples of that window already consumed, in window order;
    batch: batches given so far in the current ``epoch_samples`` epoch.
    """
    epoch: int = 0
    shard: int = 0
    offset: int = 0
    batch: int = 0


class ShardStream(torch.utils.data.IterableDataset):
    """An exactly resumable batch stream over shards (build it with
    ``hyperscale.data.shards.shard_dataset``, which supplies the sample format:
    ``read_shard(url)`` -> raw samples, ``decode(raw)`` -> sample, raising on corrupt
    data, ``collate(samples)`` -> batch; ``skipped`` is the ``SkipCounter``; optionally
    ``compatible(first, sample)``, raising when ``sample`` may not share a batch with the
    batch's first sample: it is then skipped and counted like a corrupt one).

    For class-label shards it yields (images float in [-1, 1] (B, 1, H, W), labels long
    (B,)); for caption shards (``hyperscale.data.captions``) ``CaptionBatch`` es.
    ``iter(stream)``
    gives the rest of the current epoch (one pass over this rank's shards, or
    ``epoch_samples`` worth of batches); ``next(stream)`` gives batches forever, across
    passes (never partial). ``state_dict()`` / ``load_state_dict()`` save and restore
    the ``ShardCursor`` (plus the skip counts): a restored stream yields exactly what
    the original would have yielded next. For DataLoader workers hand it over as
    ``stream.dataset`` (``batch_size=None``); each worker then streams its own share
    (its cursor stays in the worker, so exact resume is for in-process iteration).

    Shuffling works on windows: a window is the run of whole shards, from the cursor's
    shard on, that holds at least ``shuffle_buffer`` samples (one shard when not
    shuffling, streamed without buffering). Its samples are permuted by an RNG seeded
    from (seed, epoch, shard, rank, loader worker), so a restore re-reads at most one
    window. ``skipped`` counts what was skipped in this process.
    """

    def __init__(self, urls: list[str], read_shard: Callable[[str], Iterator[dict]],
                 decode: Callable[[dict], Any], collate: Callable[[list], Any], skipped,
                 batch_size: int, shuffle_buffer: int = 0, seed: int = 0, resampled: bool = False,
                 epoch_samples: int | None = None, split_by_node: bool = True,
                 split_by_worker: bool = True, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1,
                 compatible: Callable[[Any, Any], None] | None = None):
        self.urls, self.read_shard, self.decode, self.collate = urls, read_shard, decode, collate
        self.compatible = compatible
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed, self.resampled, self.drop_last = seed % 2**63, resampled, drop_last
        self.epoch_batches = None if epoch_samples is None else epoch_samples // batch_size
        self.split_by_node, self.split_by_worker = split_by_node and not resampled, split_by_worker
        self.rank, self.world_size = rank, world_size
        self.skipped = skipped
        self.cursor = ShardCursor()
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._window: Iterator[dict] | None = None
        self._window_end = 0
        self._order_cache: tuple[int, list[str]] | None = None
        self._loader_worker: tuple[int, int] | None = None
        self._fresh_pass: tuple[int, int] | None = (0, 0)  # (raw items, skips) since a pass start
        self._raw_total = 0

    @property
    def dataset(self) -> "ShardStream":
        return self

    def __getstate__(self) -> dict:  # for DataLoader workers: generators do not pickle
        state = self.__dict__.copy()
        state.update(_window=None, _order_cache=None, _loader_worker=None)
        return state

    # ---- shard order and windows

    def _worker(self) -> tuple[int, int]:
        if self._loader_worker is None:
            info = torch.utils.data.get_worker_info()
            self._loader_worker = (info.id, info.num_workers) if info else (0, 1)
        return self._loader_worker

    def _order(self) -> list[str]:
        """This rank's (and loader worker's) shard URLs for the cursor's pass."""
        epoch = self.cursor.epoch
        if self._order_cache is None or self._order_cache[0] != epoch:
            worker, workers = self._worker()
            if self.resampled:  # with replacement; every rank and worker draws its own
                rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
                order = [self.urls[i] for i in rng.integers(len(self.urls), size=len(self.urls))]
            else:
                order = list(self.urls)
                if self.shuffle_buffer > 0:  # the same on every rank, so the split stays disjoint
                    perm = np.random.default_rng([self.seed, epoch]).permutation(len(order))
                    order = [order[i] for i in perm]
                if self.split_by_node:
                    order = order[self.rank::self.world_size]
                if self.split_by_worker:
                    order = order[worker::workers]
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _open_window(self, order: list[str]) -> None:
        """Open the window at the cursor and skip its first ``offset`` samples. Errors in
        data that was read before a restore are not counted twice."""
        start, offset = self.cursor.shard, self.cursor.offset
        if self.shuffle_buffer == 0:
            window = self.read_shard(order[start])
            self._window_end = start + 1
            with self.skipped.muted(offset > 0):
                for _ in range(offset):
                    if next(window, None) is None:
                        break
        else:
            items, end = [], start
            with self.skipped.muted(offset > 0):
                while end < len(order) and len(items) < self.shuffle_buffer:
                    items += self.read_shard(order[end])
                    end += 1
            rng = np.random.default_rng([self.seed, self.cursor.epoch, start, self.rank,
                                         self._worker()[0], 2])
            window = iter([items[i] for i in rng.permutation(len(items))][offset:])
            self._window_end = end
        self._window = window

    def _close_window(self) -> None:
        if self._window is not None and hasattr(self._window, "close"):
            self._window.close()  # closes the shard's file or S3 connection
        self._window = None

    def _next_raw(self) -> dict | None:
        """The next raw sample of the current pass (cursor advanced); None at its end."""
        order = self._order()
        while True:
            if self._window is None:
                if self.cursor.shard >= len(order):
                    return None
                self._open_window(order)
            item = next(self._window, None)
            if item is not None:
                self.cursor.offset += 1
                self._raw_total += 1
                if self._fresh_pass is not None:
                    self._fresh_pass = (self._fresh_pass[0] + 1, self._fresh_pass[1])
                return item
            self._close_window()
            self.cursor.shard, self.cursor.offset = self._window_end, 0

    def _next_pass(self) -> None:
        self._close_window()
        self.cursor = ShardCursor(self.cursor.epoch + 1, 0, 0, self.cursor.batch)
        self._fresh_pass = (0, self.skipped.count)

    # ---- batches

    def _next_batch(self, one_pass: bool) -> Any:
        """The next batch; with ``one_pass`` None at the pass end (after a last partial
        batch unless drop_last), else batches run on across passes."""
        samples: list = []
        while len(samples) < self.batch_size:
            raw = self._next_raw()
            if raw is None:
                fruitless = self._fresh_pass == (0, self.skipped.count)
                shards = len(self._order())
                self._next_pass()
                if one_pass:
                    break
                if fruitless:  # and nothing failed either: looping on would spin forever
                    raise RuntimeError(
                        f"a whole pass over this rank's {shards} of {len(self.urls)} shards gave "
                        f"no samples" + ("" if shards else "; none were assigned to it: use fewer "
                                         "ranks or loader workers, or resampled=True"))
                continue
            try:
                sample = self.decode(raw)
                if samples and self.compatible is not None:
                    self.compatible(samples[0], sample)
                samples.append(sample)
            except Exception as exn:  # noqa: BLE001 - any decode failure is a corrupt sample
                exn.args = exn.args + (f"key={raw.get('__key__')} url={raw.get('__url__')}",)
                self.skipped(exn)
                continue
            self.skipped.reset_consecutive()
        if not samples or (self.drop_last and len(samples) < self.batch_size):
            return None
        return self.collate(samples)

    def __next__(self) -> Any:
        return self._next_batch(one_pass=False)

    def __iter__(self) -> Iterator:
        if self.epoch_batches is not None:  # a fixed number of batches, across passes
            if self.cursor.batch >= self.epoch_batches:
                self.cursor.batch = 0
            while self.cursor.batch < self.epoch_batches:
                batch = self._next_batch(one_pass=False)
                self.cursor.batch += 1
                yield batch
            self.cursor.batch = 0
        elif self.resampled:  # endless
            while True:
                yield next(self)
        else:  # the rest of this pass
            mark, epoch, carried_on = self._raw_total, self.cursor.epoch, False
            while True:
                batch = self._next_batch(one_pass=True)
                if batch is not None:
                    yield batch
                if self.cursor.epoch != epoch:  # the pass has ended
                    if carried_on or self._raw_total != mark:
                        return
                    # it had ended before this iteration began (a stream restored at its
                    # very end): go on with the next pass, as the original stream would
                    carried_on, epoch = True, self.cursor.epoch

    # ---- cursor

    def _layout(self) -> dict:
        """What a cursor's meaning depends on; a cursor from another layout is not exact."""
        names = hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16]
        return {"urls": names, "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "resampled": self.resampled,
                "split_by_node": self.split_by_node, "loader_worker": list(self._worker())}

    def state_dict(self) -> dict:
        return {"kind": "shards", **asdict(self.cursor), "skipped": self.skipped.state_dict(),
                "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "shards":
            raise ValueError(f"not a shard-stream cursor (keys {sorted(state)}); the checkpoint "
                             f"was written by a run with another data source")
        self._close_window()
        self._reset_transient()
        cursor = ShardCursor(*(int(state[k]) for k in ("epoch", "shard", "offset", "batch")))
        if state["layout"] != self._layout():
            log.warning("data cursor from another layout (%s, now %s): exact resume is not "
                        "possible; starting pass %d from its first shard", state["layout"],
                        self._layout(), cursor.epoch + 1)
            cursor = ShardCursor(cursor.epoch + 1, 0, 0, cursor.batch)
        self.cursor = cursor
        self.skipped.load_state_dict(state["skipped"])
        fresh = cursor.shard == 0 and cursor.offset == 0
        self._fresh_pass = (0, self.skipped.count) if fresh else None
