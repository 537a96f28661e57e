"""Fault tolerance through the real job (jobs/pretrain_teacher.py, 2 Ray workers, DeepSpeed ZeRO-2):
a SIGKILLed worker is replaced and the run restores from Ray's latest checkpoint, ending exactly
where an uninterrupted run ends; an S3 outage mid-run is ridden out by retries; a NaN loss on one
rank skips that update everywhere. Each run starts its own Ray in a subprocess.

hyperscale.bench.reliability injects the faults and returns a row of verdicts for the benchmark
record (survived, steps_lost, _exact, ...). These tests do not take those verdicts on trust: they
read what the runs left behind (metrics.json, the final checkpoints' counters and data cursors,
the exported weights, the job's log) and compare those facts themselves.
"""
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from hyperscale.bench import reliability
from hyperscale.train.checkpoint import find_latest, read_checkpoint

STEP = re.compile(r"\b(\d+)/(\d+) steps \(")  # the console's progress lines


def _final(run: Path) -> dict:
    return read_checkpoint(find_latest(run / "checkpoints"))


def _plain(cursors: list) -> list:
    return [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in c.items()} for c in cursors]


def _assert_same_exports(a: Path, b: Path) -> None:
    for kind in ("raw", "ema"):
        x, y = (load_file(str(d / "export" / kind / "model.safetensors")) for d in (a, b))
        assert x.keys() == y.keys() and len(x) > 0, kind
        different = [k for k in x if not torch.equal(x[k], y[k])]
        assert not different, f"export/{kind}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_sigkilled_worker_is_restored_from_the_last_checkpoint_and_the_run_finishes(tmp_path):
    steps, every, batch, world = 12, 3, 16, 2  # teacher-tiny: data.batch_size 16 per worker, 2 workers
    row = reliability.worker_sigkill(tmp_path, steps=steps, every=every)
    log = row["_log"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    assert (killed / "metrics.json").is_file(), log[-4000:]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["step"] == steps and metrics["samples"] == steps * batch * world
    # restored in the restarted worker group (no resume_from_checkpoint was given), at a checkpoint
    restored = int(metrics["restored_at_step"])
    assert restored >= every and restored % every == 0, log[-4000:]
    # every step was logged (Ray may forward a line more than once, so lines are not counted)
    seen = {int(s) for s, total in STEP.findall(log) if int(total) == steps}
    assert seen == set(range(1, steps + 1)), sorted(seen)
    # the same end as the uninterrupted run: counters, every rank's data cursor, the exported weights
    # (raw and EMA) bit for bit; so nothing was skipped and only the lost steps' samples were repeated
    a, b = _final(killed), _final(straight)
    assert a["counters"] == b["counters"] and a["counters"]["step"] == steps
    assert _plain(a["data"]) == _plain(b["data"])
    assert [(c["epoch"], c["position"]) for c in _plain(a["data"])] == [(0, steps * batch)] * world
    _assert_same_exports(killed, straight)


def test_s3_endpoint_outage_mid_run_is_ridden_out(tmp_path):
    steps = 12
    row = reliability.s3_outage(tmp_path, outage_s=3.0, steps=steps)
    log = row["_log"]
    run = tmp_path / "run"
    assert (run / "metrics.json").is_file(), log[-4000:]
    assert json.loads((run / "metrics.json").read_text())["step"] == steps
    retries = [m.start() for m in re.finditer(r"retrying in", log)]
    assert retries, "no S3 request fell into the outage: the test proved nothing"
    # the outage was mid-run: the console had shown some steps, not all, when the server went away
    assert 0 < row["_outage_at_step"] < steps, row["_outage_at_step"]
    assert max(int(m.group(1)) for m in STEP.finditer(log)) == steps
    final = _final(run)
    assert final["counters"]["step"] == steps and final["counters"]["skipped"] == {}
    cursors = _plain(final["data"])
    assert len(cursors) == 2 and all(c["kind"] == "shards" and c["skipped"]["count"] == 0 for c in cursors)


def _nan_facts(rank: int, world: int) -> dict:
    """Three SIM steps on 2 ranks with ZeRO-2 engines, the second with a NaN generator loss on rank 1;
    the raw weights, optimizer states and counters around it (no verdicts)."""
    import copy

    from hyperscale.config import load_config
    from hyperscale.data.stream import LabelStream
    from hyperscale.methods.base import Batch
    from hyperscale.methods import build_method
    from hyperscale.models.build import build_denoiser
    from hyperscale.train import engines
    from hyperscale.train.step import StepCounters, two_player_step

    engines.init_distributed("gloo")
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]",
                             "method.name=sim", "train.zero_stage=2", "data.batch_size=4"])
    torch.manual_seed(0)
    teacher = build_denoiser(cfg.model, cfg.schedule).eval().requires_grad_(False)
    method = reliability.PoisonedLoss(build_method(cfg.method), rank=1)
    roles = {n: engines.build_role(n, copy.deepcopy(teacher), cfg.train, 4, world, torch.device("cpu"))
             for n in method.trainable}
    labels, counters = LabelStream(4, 10, rank), StepCounters()

    def step():
        return two_player_step(method, lambda: Batch(next(labels)[1]), roles, {"teacher": teacher}, None, counters)

    def optim(role):
        return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                for s in roles[role].optimizer.state.values()]

    step()
    before = {n: roles[n].full_state_dict() for n in roles}
    opt_before = optim("generator")
    method.armed = True
    poisoned = step()
    method.armed = False
    after = {n: roles[n].full_state_dict() for n in roles}
    opt_after = optim("generator")
    step()
    return {"before": before, "after": after, "end": {n: roles[n].full_state_dict() for n in roles},
            "opt_before": opt_before, "opt_after": opt_after, "poisoned_metrics": poisoned,
            "skipped": dict(counters.skipped), "step": counters.step}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_on_one_rank_is_skipped_everywhere_and_training_goes_on():
    from hyperscale.train.local import run_local

    ranks = run_local(_nan_facts, 2)
    for r, facts in enumerate(ranks):
        assert facts["skipped"] == {"generator": 1} and facts["step"] == 3, (r, facts["skipped"])
        assert facts["poisoned_metrics"]["nonfinite_skipped/generator"] == 1
        # the poisoned generator update left its weights and its AdamW state untouched ...
        assert _same(facts["before"]["generator"], facts["after"]["generator"]), r
        assert len(facts["opt_before"]) > 0 and len(facts["opt_before"]) == len(facts["opt_after"])
        assert all(_same(a, b) for a, b in zip(facts["opt_before"], facts["opt_after"])), r
        # ... while that step's critic update was applied, and the next step trained the generator
        assert not _same(facts["before"]["fake_score"], facts["after"]["fake_score"]), r
        assert not _same(facts["after"]["generator"], facts["end"]["generator"]), r
    # both ranks hold the same weights throughout: the skip happened on both
    for when in ("after", "end"):
        for role in ranks[0][when]:
            assert _same(ranks[0][when][role], ranks[1][when][role]), (when, role)
