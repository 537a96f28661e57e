"""``Cond``: what a denoiser is conditioned on, for every family.

Class-conditional families fill ``labels`` (B,) long; text-to-image families fill ``embeds``
(B, L, D) text hidden states, ``pooled`` (B, D') pooled embeddings (SDXL, SD3, FLUX), ``mask``
(B, L) attention masks (PixArt's T5) and ``extra`` for anything else per sample (SDXL's size and
crop time ids (B, 6)). Every field is batched on dim 0, so one ``Cond`` cats, indexes, moves and
selects per sample as a whole; the null condition for classifier-free guidance comes from the
family (``Family.null_condition``), as the empty prompt's embedding or the null label.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterator, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)  # compare fields with torch.equal, not ==
class Cond:
    labels: Tensor | None = None
    embeds: Tensor | None = None
    pooled: Tensor | None = None
    mask: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def _items(self) -> Iterator[tuple[str, Tensor]]:
        for f in fields(self):
            if f.name != "extra" and getattr(self, f.name) is not None:
                yield f.name, getattr(self, f.name)
        yield from ((f"extra.{k}", v) for k, v in self.extra.items())

    def _map(self, fn) -> "Cond":
        plain = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                 if f.name != "extra" and getattr(self, f.name) is not None}
        return replace(self, **plain, extra={k: fn(v) for k, v in self.extra.items()})

    def __len__(self) -> int:
        sizes = {name: v.shape[0] for name, v in self._items()}
        if not sizes:
            raise ValueError("an empty Cond has no batch size")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Cond fields disagree on the batch size: {sizes}")
        return next(iter(sizes.values()))

    @property
    def device(self) -> torch.device:
        return next(self._items())[1].device

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Cond":
        """Moved to ``device``; floating fields (embeddings) also cast to ``dtype`` when given."""
        return self._map(lambda v: v.to(device, dtype) if dtype is not None and v.is_floating_point()
                         else v.to(device))

    def __getitem__(self, index) -> "Cond":
        return self._map(lambda v: v[index])

    def where(self, take_other: Tensor, other: "Cond") -> "Cond":
        """Per sample: ``other`` where ``take_other`` (B,) bool is set, else this (CFG's condition dropout)."""
        def pick(name: str, v: Tensor) -> Tensor:
            o = other._get(name)
            m = take_other.to(v.device).reshape((-1,) + (1,) * (v.ndim - 1))
            return torch.where(m, o.to(v.device), v)
        plain = {n: pick(n, v) for n, v in self._items() if not n.startswith("extra.")}
        return replace(self, **plain, extra={k: pick(f"extra.{k}", v) for k, v in self.extra.items()})

    def _get(self, name: str) -> Tensor:
        return self.extra[name[6:]] if name.startswith("extra.") else getattr(self, name)

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        first = conds[0]
        names = [n for n, _ in first._items()]
        for c in conds[1:]:
            if [n for n, _ in c._items()] != names:
                raise ValueError("cannot cat Conds with different fields")
        plain = {n: torch.cat([c._get(n) for c in conds]) for n in names if not n.startswith("extra.")}
        return replace(first, **plain, extra={k: torch.cat([c.extra[k] for c in conds]) for k in first.extra})


def as_cond(cond) -> Cond | None:
    """A Cond from a Cond, a (B,) tensor of class labels, or None."""
    if cond is None or isinstance(cond, Cond):
        return cond
    if isinstance(cond, Tensor):
        return Cond(labels=cond)
    raise TypeError(f"a condition must be a Cond or a tensor of class labels, got {type(cond).__name__}")


def cond_len(cond) -> int:
    """The batch size of a Cond or a (B,) tensor of labels."""
    return len(cond) if isinstance(cond, Cond) else int(cond.shape[0])


def cond_cat(conds: Sequence) -> object:
    """Conds, or label tensors, concatenated on the batch dim (their own type kept)."""
    return Cond.cat(conds) if isinstance(conds[0], Cond) else torch.cat(list(conds))


def cond_where(take_other: Tensor, other, cond):
    """Per sample ``other`` where ``take_other`` else ``cond``, for Conds or label tensors."""
    if isinstance(cond, Cond):
        return cond.where(take_other, as_cond(other))
    return torch.where(take_other, other, cond)
