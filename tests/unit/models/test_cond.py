"""``Cond``: batching, indexing, device moves and per-sample selection over every field."""
import pytest
import torch

from hyperscale.models.cond import Cond, as_cond, cond_cat, cond_len, cond_where


def _text(b, fill=0.0):
    return Cond(embeds=torch.full((b, 3, 4), fill), pooled=torch.full((b, 5), fill), mask=torch.ones(b, 3),
                extra={"time_ids": torch.full((b, 6), fill)})


def test_cat_index_and_len_act_on_every_field():
    a, b = _text(2, 1.0), _text(3, 2.0)
    c = Cond.cat([a, b])
    assert len(c) == 5 and c.embeds.shape == (5, 3, 4) and c.extra["time_ids"].shape == (5, 6)
    assert torch.equal(c[2:].pooled, b.pooled) and torch.equal(c[torch.tensor([0])].extra["time_ids"],
                                                                a.extra["time_ids"][:1])
    with pytest.raises(ValueError, match="different fields"):
        Cond.cat([a, Cond(labels=torch.tensor([1, 2]))])
    with pytest.raises(ValueError, match="disagree"):
        len(Cond(labels=torch.tensor([1]), pooled=torch.zeros(2, 3)))


def test_where_selects_per_sample_and_to_casts_floats_only():
    cond, null = _text(3, 1.0), _text(3, 0.0)
    out = cond.where(torch.tensor([True, False, True]), null)
    assert out.embeds[:, 0, 0].tolist() == [0.0, 1.0, 0.0] and out.extra["time_ids"][:, 0].tolist() == [0.0, 1.0, 0.0]
    labels = Cond(labels=torch.tensor([1, 2]), embeds=torch.zeros(2, 1))
    half = labels.to("cpu", torch.float16)
    assert half.labels.dtype == torch.long and half.embeds.dtype == torch.float16


def test_label_tensors_are_a_shorthand():
    y = torch.tensor([1, 2, 3])
    assert torch.equal(as_cond(y).labels, y) and as_cond(None) is None and cond_len(y) == 3
    assert torch.equal(cond_cat([y, y]), torch.cat([y, y]))
    assert torch.equal(cond_where(torch.tensor([True, False, False]), torch.zeros_like(y), y), torch.tensor([0, 2, 3]))
    assert torch.equal(cond_where(torch.tensor([True, False, False]), torch.zeros_like(y), as_cond(y)).labels,
                       torch.tensor([0, 2, 3]))
    with pytest.raises(TypeError, match="Cond or a tensor"):
        as_cond(["a prompt"])
