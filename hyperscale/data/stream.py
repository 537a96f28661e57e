"""An endless, exactly resumable stream of (image, label) batches from an in-memory set.

Each rank sees a disjoint slice of every epoch's permutation; the permutation
depends only on (seed, epoch), so the cursor (epoch, position) restores exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
