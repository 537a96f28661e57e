"""The trainer end to end through Ray Train (2 CPU workers, gloo): checkpoint, exact resume, export,
with DeepSpeed ZeRO-2 (the default) and ZeRO-3 engines and with the plain-torch path; and the
generator's EMA (two_player_step, and the in-process loop's export) against the decayed average
written out by hand."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperscale.storage.local import REPO
from hyperscale.config import load_config
from hyperscale.models.build import load_denoiser
from hyperscale.train import engines
from hyperscale.train.checkpoint import find_latest, problems

ROOT = REPO  # the repository root
TINY = ROOT / "jobs/configs/teacher-tiny.yaml"


def _run(out: Path, *overrides: str) -> dict:
    from hyperscale.train.launch import run_training

    return run_training(load_config(TINY, [f"run.output_dir={out}", *overrides]))


def _shard_files(latest: Path, stage: int | None) -> set[str]:
    """What every rank must have contributed to a merged checkpoint of the tiny teacher run."""
    files = {"state.pt", "meta.json", "config.yaml", "manifests/rank-00000.json", "manifests/rank-00001.json"}
    if stage is None:  # plain torch: everything is in rank 0's state.pt
        return files
    d = "engines/generator/state/"
    files |= {d + "mp_rank_00_model_states.pt"} if stage < 3 else {
        d + f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
    return files | {d + f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}


ENGINES = [pytest.param(["train.zero_stage=2"], 2, id="zero2"),
           pytest.param(["train.zero_stage=3"], 3, id="zero3"),
           pytest.param(["train.engine=torch"], None, id="torch", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine,stage", ENGINES)
def test_teacher_trains_checkpoints_and_resumes_exactly(ray_cluster, tmp_path, engine, stage):
    straight = _run(tmp_path / "a", "train.max_steps=6", *engine)
    assert straight["step"] == 6
    assert json.loads((tmp_path / "a/metrics.json").read_text())["step"] == 6
    assert (tmp_path / "a/config.yaml").is_file()

    first = _run(tmp_path / "b", "train.max_steps=3", *engine)
    assert first["step"] == 3
    resumed = _run(tmp_path / "b", "train.max_steps=6", "train.resume_from_checkpoint=latest", *engine)
    assert resumed["step"] == 6 and resumed["samples"] == straight["samples"]
    assert resumed["time/restore_s"] > 0 and "time/restore_s" not in straight
    latest = find_latest(tmp_path / "b/checkpoints")
    assert json.loads((latest / "meta.json").read_text())["step"] == 6
    # every rank's shards made it into the merged checkpoint, complete per the ranks' manifests
    present = {str(p.relative_to(latest)) for p in latest.rglob("*") if p.is_file()}
    assert _shard_files(latest, stage) <= present, sorted(present)
    assert problems(latest) == []

    # Same data, same RNG, same optimizer state: the resumed run is the straight run, bit for bit.
    for kind in ("raw", "ema"):
        a = load_file(str(tmp_path / f"a/export/{kind}/model.safetensors"))
        b = load_file(str(tmp_path / f"b/export/{kind}/model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), kind

    model = load_denoiser(tmp_path / "b/export/ema")
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28), torch.tensor([10, 900]), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()

    # Resumed with a new learning rate, the run trains with it (the checkpoint's optimizer state
    # carries the old one, which used to win silently).
    assert resumed["lr/generator"] == pytest.approx(5e-4)  # the default, constant after warm-up
    slower = _run(tmp_path / "b", "train.max_steps=7", "train.resume_from_checkpoint=latest", "train.lr=0.0001",
                  *engine)
    assert slower["step"] == 7 and slower["lr/generator"] == pytest.approx(1e-4)

    _check_averages(tmp_path / "b", stage)


def _check_averages(run: Path, stage: int | None) -> None:
    """jobs/average_checkpoints.py's averages against weights read another way: the raw export of
    the last step, and the EMA in the step-6 checkpoint's state.pt."""
    from hyperscale.train.averaging import average_run
    from hyperscale.train.checkpoint import complete_checkpoints

    if stage == 3:
        with pytest.raises(ValueError, match="ZeRO-3.*zero_stage <= 2"):
            average_run(run, run / "avg")
        return
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [6, 7]
    raw7 = load_file(str(run / "export/raw/model.safetensors"))
    uniform = average_run(run, run / "avg-last", from_step=6)
    assert uniform == {"kind": "uniform", "steps": [7]}
    got = load_file(str(run / "avg-last/model.safetensors"))
    assert got.keys() == raw7.keys() and all(torch.equal(got[k], raw7[k]) for k in got)

    six = dict(complete_checkpoints(run / "checkpoints"))[6]
    ema6 = torch.load(six / "state.pt", map_location="cpu", weights_only=False)["ema"]["model"]
    average_run(run, run / "avg-ema", decay=0.9)
    got = load_file(str(run / "avg-ema/model.safetensors"))
    assert all(torch.allclose(got[k], 0.9 * ema6[k] + 0.1 * raw7[k], atol=1e-6) for k in got)
    assert not all(torch.allclose(got[k], raw7[k]) for k in got)
    meta = json.loads((run / "avg-ema/hyperscale_model.json").read_text())["extra"]
    assert meta["step"] == 7 and meta["average"]["decay"] == 0.9 and "ema_decay" not in meta
    with pytest.raises(ValueError, match="1 complete checkpoint.*2 or more"):
        average_run(run, run / "nope", decay=0.9, from_step=6)


def test_resume_from_a_bad_path_is_a_clear_error(ray_cluster, tmp_path):
    with pytest.raises(Exception, match="not a checkpoint directory"):
        _run(tmp_path / "c", f"train.resume_from_checkpoint={tmp_path}/nothing-here")


@pytest.mark.parametrize("resume", [None, "some/other/checkpoint"])
def test_a_run_directory_with_checkpoints_needs_resume_latest(tmp_path, resume):
    """Ray Train would restore the directory's own latest checkpoint whatever the config says;
    the launcher refuses instead of silently resuming (no Ray is started)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/checkpoint_manager_snapshot.json").write_text("{}")
    extra = [f"train.resume_from_checkpoint={resume}"] if resume else []
    with pytest.raises(ValueError, match=r"already holds an earlier run's checkpoints.*resume_from_checkpoint=latest"):
        _run(tmp_path, *extra)


def test_a_restored_role_keeps_the_checkpoint_moments_and_takes_this_runs_optimizer_settings():
    from hyperscale.train.engines import make_optimizer
    from hyperscale.train.step import Role

    def role(**train):
        t = load_config(TINY, [f"train.{k}={v}" for k, v in train.items()]).train
        torch.manual_seed(0)
        module = torch.nn.Linear(3, 2)
        opt = make_optimizer(list(module.parameters()), t)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, engines.lr_lambda(t, 10))
        return Role("generator", module, opt, sched, t.max_grad_norm)

    old = role(lr=0.001, adam_beta2=0.999, lr_warmup_steps=4)
    for _ in range(3):
        old.module(torch.randn(5, 3)).square().mean().backward()
        old.optimizer.step()
        old.zero_grad()
        old.scheduler.step()
    saved = old.state_dict()

    new = role(lr=0.0002, adam_beta2=0.99, lr_warmup_steps=4)
    own = new.settings()
    new.load_state_dict(saved)
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 4 / 4)  # the checkpoint's, so far
    changed = new.use_settings(own)
    assert changed == ["betas (0.9, 0.999) -> (0.9, 0.99)", "lr 0.001 -> 0.0002"]
    group = new.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.0002) and new.scheduler.get_last_lr() == [group["lr"]]
    assert tuple(group["betas"]) == (0.9, 0.99)
    # the moments and the schedule's position are the checkpoint's
    for p_old, p_new in zip(old.module.parameters(), new.module.parameters()):
        assert torch.equal(old.optimizer.state[p_old]["exp_avg_sq"], new.optimizer.state[p_new]["exp_avg_sq"])
    assert new.scheduler.last_epoch == 3
    new.scheduler.step()
    assert group["lr"] == pytest.approx(0.0002) and new.use_settings(new.settings()) == []


def _expected_ema(snapshots: list[dict], decay: float, warmup: bool) -> dict:
    """The EMA of a sequence of weights written out: e_0 = w_0, then after update n (0-based)
    e = d_n e + (1 - d_n) w_{n+1}, d_n = min(decay, (1 + n) / (10 + n)) with warm-up, else decay."""
    ema = {k: v.double().clone() for k, v in snapshots[0].items()}
    for n, w in enumerate(snapshots[1:]):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = {k: d * ema[k] + (1 - d) * w[k].double() for k in ema}
    return ema


@pytest.mark.parametrize("warmup,decay", [(True, 0.8), (False, 0.6)])
def test_two_player_step_updates_the_ema_to_the_decayed_average_of_the_generator(warmup, decay):
    """After k steps the EMA weights are the decayed average of the generator's weights after each
    step (and its start), with and without warm-up; the critic's weights never enter it."""
    from hyperscale.diffusion.schedule import DiscreteVP
    from hyperscale.methods.base import Batch
    from hyperscale.methods.sim import Sim, SimConfig
    from hyperscale.methods.toy import MLPDenoiser, ring_mixture
    from hyperscale.models.ema import EMA
    from hyperscale.train.step import Role, StepCounters, two_player_step

    sched = DiscreteVP.from_config()
    torch.manual_seed(0)
    teacher = ring_mixture(sched, k=4, std=0.1)
    roles = {}
    for name in ("generator", "fake_score"):
        net = MLPDenoiser(sched, dim=2, hidden=16)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        roles[name] = Role(name, net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), max_grad_norm=1e3)
    gen = roles["generator"].module

    def weights():
        return {k: v.detach().clone() for k, v in gen.named_parameters()}

    snapshots = [weights()]
    ema = EMA(gen, decay, warmup=warmup)
    counters, cond = StepCounters(), torch.zeros(16, dtype=torch.long)
    for _ in range(5):
        two_player_step(Sim(SimConfig()), lambda: Batch(cond), roles, {"teacher": teacher}, ema, counters)
        snapshots.append(weights())
    want = _expected_ema(snapshots, decay, warmup)
    got = dict(ema.model.named_parameters())
    assert counters.step == 5 and ema.updates == 5
    for k, w in want.items():
        torch.testing.assert_close(got[k].double(), w, rtol=1e-6, atol=1e-7, msg=k)
    # not trivially equal to either end: the generator moved, and the average lags behind it
    moved = max((snapshots[-1][k] - snapshots[0][k]).abs().max().item() for k in want)
    lag = max((got[k] - snapshots[-1][k]).abs().max().item() for k in want)
    assert moved > 1e-2 and lag > 1e-3


def test_the_training_loop_exports_the_ema_of_the_generator_after_every_step(tmp_path, monkeypatch):
    """The loop itself (one worker in process, plain torch, no Ray): export/ema holds the decayed
    average (with warm-up) of the generator's weights after each of its steps, export/raw the last
    of them. The weights are read after every step by wrapping the loop's two_player_step."""
    from hyperscale.train import loop
    from hyperscale.train.launch import run_in_process

    snapshots, original = [], loop.two_player_step

    def recording(method, batches, roles, frozen, ema, counters):
        gen = roles[method.trainable[0]].module
        if not snapshots:
            snapshots.append({k: v.detach().clone() for k, v in gen.named_parameters()})
        out = original(method, batches, roles, frozen, ema, counters)
        snapshots.append({k: v.detach().clone() for k, v in gen.named_parameters()})
        return out

    monkeypatch.setattr(loop, "two_player_step", recording)
    threads = torch.get_num_threads()
    try:
        cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "train.num_workers=1", "train.engine=torch",
                                 "train.max_steps=4", "train.checkpoint_every=4", "train.log_every=1",
                                 "train.ema_decay=0.5", "train.ema_warmup=true", "data.batch_size=4",
                                 "train.lr=0.003"])
        assert run_in_process(cfg)["step"] == 4
    finally:
        torch.set_num_threads(threads)
    assert len(snapshots) == 5
    ema = load_file(str(tmp_path / "export/ema/model.safetensors"))
    raw = load_file(str(tmp_path / "export/raw/model.safetensors"))
    want = _expected_ema(snapshots, 0.5, True)  # d = 0.1, 0.18, 0.25, 0.31: the warm-up's values
    assert set(want) <= set(ema)
    for k, w in want.items():
        torch.testing.assert_close(ema[k].double(), w, rtol=1e-5, atol=1e-7, msg=k)
        assert torch.equal(raw[k], snapshots[-1][k])
    assert max((ema[k] - raw[k]).abs().max().item() for k in want) > 1e-4  # the average is not the last iterate


@pytest.mark.parametrize("minutes,want", [(0.0, [4]), (1e-9, [1, 2, 3, 4])])
def test_checkpoints_also_come_by_the_clock(tmp_path, minutes, want):
    """train.checkpoint_every_minutes checkpoints whenever that much time passed since the last
    one, between the step-based ones (here: every step, as 1e-9 minutes always passed); 0 is off.
    The resume from a clock checkpoint is the ordinary exact resume."""
    from hyperscale.train.checkpoint import meta_step
    from hyperscale.train.launch import run_in_process

    threads = torch.get_num_threads()
    try:
        cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "train.num_workers=1", "train.engine=torch",
                                 "train.max_steps=4", "train.checkpoint_every=1000", "train.keep_checkpoints=10",
                                 f"train.checkpoint_every_minutes={minutes}", "train.log_every=1",
                                 "data.batch_size=4"])
        assert run_in_process(cfg)["step"] == 4
    finally:
        torch.set_num_threads(threads)
    steps = sorted(meta_step(p) for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == want


def test_a_truncated_latest_checkpoint_is_skipped_with_a_warning_naming_both(tmp_path, capsys):
    """A half-written newest checkpoint (a file cut short, as by a node lost mid-write) is
    detected; ``latest`` resumes from the previous complete one and says which and why."""
    from hyperscale.train.checkpoint import STATE, meta_step
    from hyperscale.train.launch import run_in_process

    threads = torch.get_num_threads()
    try:
        cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "train.num_workers=1", "train.engine=torch",
                                 "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=10",
                                 "data.batch_size=4"])
        run_in_process(cfg)
    finally:
        torch.set_num_threads(threads)
    root = tmp_path / "checkpoints"
    newest = max((p for p in root.iterdir() if p.name.startswith("step_")), key=meta_step)
    state = newest / STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    chosen = find_latest(root)
    assert meta_step(chosen) == 2 and problems(newest)
    said = capsys.readouterr().out
    assert f"checkpoint {newest} (step 3) is incomplete" in said and f"using {chosen} (step 2)" in said, said
