"""Multi-phase pipelines (hyperscale/pipeline/run.py) and students started from an earlier export
(method.init_student): the tiny Hyper-SD pipeline through Ray end to end, skip and resume, and the
checks that keep a chain of phases consistent."""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperscale.storage.local import REPO
from hyperscale.config import load_config
from hyperscale.methods.dmd import DmdConfig
from hyperscale.methods.scores import build_student
from hyperscale.methods.tscd import TscdConfig
from hyperscale.models.build import build_denoiser, load_denoiser, save_denoiser
from hyperscale.models.lora import LoraDenoiser, load_lora, save_student
from hyperscale.train.checkpoint import find_latest
from hyperscale.pipeline.run import (PIPELINE_RECORD, PipelineError, is_pipeline_file, load_pipeline,
                                       phase_configs, run_pipeline)

ROOT = REPO  # the repository root
CONFIGS = ROOT / "jobs" / "configs"
TINY = ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"]
X, T, C = torch.randn(2, 1, 28, 28), torch.tensor([10, 900]), torch.tensor([1, 2])


def tiny_teacher(seed: int = 0, arch: list[str] = TINY):
    torch.manual_seed(seed)
    cfg = load_config(None, arch)
    return build_denoiser(cfg.model, cfg.schedule).eval().requires_grad_(False)


def trained_lora_export(teacher, path: Path, rank: int = 4) -> LoraDenoiser:
    student = build_student(teacher, TscdConfig(student="lora", lora_rank=rank))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.lora_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_student(student, path)
    return student


# ---------------------------------------------------------------- init_student

def test_a_lora_student_continues_the_exported_lora(tmp_path):
    teacher = tiny_teacher()
    before = trained_lora_export(teacher, tmp_path / "export")
    student = build_student(teacher, DmdConfig(student="lora", lora_rank=4, init_student=str(tmp_path / "export")))
    assert isinstance(student, LoraDenoiser) and student.training
    with torch.no_grad():
        assert torch.equal(student(X, T, C), before(X, T, C))
    ours, theirs = student.lora_state_dict(), before.lora_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(("lora_" in n) == p.requires_grad for n, p in student.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher itself is untouched


def test_a_full_student_loads_the_exported_weights(tmp_path):
    teacher = tiny_teacher()
    lora = trained_lora_export(teacher, tmp_path / "lora-export")
    full = build_student(teacher, DmdConfig(init_student=str(tmp_path / "lora-export")))  # merged weights
    assert not isinstance(full, LoraDenoiser)
    with torch.no_grad():
        assert (full(X, T, C) - lora(X, T, C)).abs().max() < 1e-5
        for p in full.parameters():
            p.add_(0.01)
    save_student(full, tmp_path / "full-export")
    again = build_student(teacher, DmdConfig(init_student=str(tmp_path / "full-export")))
    with torch.no_grad():
        assert torch.equal(again(X, T, C), full(X, T, C))


@pytest.mark.parametrize("case,error,match", [
    ("missing", FileNotFoundError, r"method.init_student='.*nowhere'"),
    ("run-dir", FileNotFoundError, "did you mean .*export/ema"),
    ("full-as-lora", ValueError, "is a full export .* but the student is a LoRA"),
    ("rank", ValueError, r"r is 4 there, 8 here"),
    ("other-teacher", ValueError, "trained on another base model"),
    ("other-architecture", ValueError, "another architecture"),
])
def test_init_student_errors_name_the_problem(tmp_path, case, error, match):
    teacher = tiny_teacher()
    trained_lora_export(teacher, tmp_path / "run" / "export" / "ema")
    save_student(copy.deepcopy(teacher), tmp_path / "full")
    source = {"missing": tmp_path / "nowhere", "run-dir": tmp_path / "run", "full-as-lora": tmp_path / "full"}.get(
        case, tmp_path / "run" / "export" / "ema")
    base = {"other-teacher": tiny_teacher(seed=1),
            "other-architecture": tiny_teacher(arch=["model.block_out_channels=[8,8]",
                                                     "model.attention_levels=[false,false]"])}.get(case, teacher)
    cfg = TscdConfig(student="lora", lora_rank=8 if case == "rank" else 4, init_student=str(source))
    with pytest.raises(error, match=match):
        build_student(base, cfg)


# ---------------------------------------------------------------- pipeline files

def _tiny_pipeline(tmp_path, *overrides):
    return load_pipeline(CONFIGS / "hypersd-pipeline-tiny.yaml",
                         [f"run.output_dir={tmp_path / 'run'}", f"model.pretrained_teacher_model={tmp_path / 'teacher'}",
                          *overrides])


def test_pipeline_overrides_and_the_keys_it_owns(tmp_path):
    assert is_pipeline_file(CONFIGS / "hypersd.yaml") and not is_pipeline_file(CONFIGS / "hypersd-tiny.yaml")
    pipe = _tiny_pipeline(tmp_path, "run.seed=3", "train.lr=0.001", "phases.dmd.train.max_steps=2")
    cfgs = phase_configs(pipe)
    out = tmp_path / "run"
    assert [c.run.output_dir for c in cfgs] == [str(out / p) for p in ("tscd", "feedback", "dmd")]
    assert [c.method.name for c in cfgs] == ["tscd", "feedback", "dmd"]
    assert [c.method.init_student for c in cfgs] == [None, str(out / "tscd/export/ema"),
                                                     str(out / "feedback/export/ema")]
    assert all(c.run.seed == 3 and c.train.lr == 0.001 and c.train.resume_from_checkpoint == "latest" for c in cfgs)
    assert [c.train.max_steps for c in cfgs] == [8, 4, 2]
    raw = phase_configs(_tiny_pipeline(tmp_path, "chain=raw"))
    assert raw[1].method.init_student == str(out / "tscd/export/raw")
    for bad, match in ((["phases.nope.train.lr=1"], "unknown phases"),
                       (["run.output_dir.x=1"], "run section"),
                       (["phases.dmd.run.output_dir=/x"], "set by the pipeline"),
                       (["phases.dmd.method.init_student=/x"], "set by the pipeline"),
                       (["phases.feedback.method.student=full"], "trains a LoRA but 'feedback' exports a full"),
                       (["phases.dmd.method.lora_rank=4"], "differ in method.lora_rank"),
                       (["phases.dmd.model.pretrained_teacher_model=/other"], "different teachers"),
                       (["phases.dmd.method.nonsense=1"], "(?s)phase 'dmd'.*method.nonsense: unknown key"),
                       (["phases.dmd.method.name=sim"], "'dmd': its method cannot start from the previous")):
        with pytest.raises(PipelineError, match=match):
            phase_configs(_tiny_pipeline(tmp_path, *bad))
    with pytest.raises(PipelineError, match="must be a local directory"):
        _tiny_pipeline(tmp_path, "run.output_dir=s3://bucket/run")
    (tmp_path / "bad.yaml").write_text("phases: [{name: unified, preset: hypersd-tiny.yaml}]\n")
    with pytest.raises(PipelineError, match="plain directory name"):
        load_pipeline(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("phases: [{name: a, preset: nowhere.yaml}]\n")
    with pytest.raises(PipelineError, match="preset 'nowhere.yaml' not found"):
        phase_configs(load_pipeline(tmp_path / "bad.yaml"))


def test_benchmark_pipeline_and_cd_baseline_share_the_tscd_budget():
    """cd.yaml is the fair baseline of hypersd.yaml's TSCD phase: same teacher, data, steps, LoRA, lr."""
    pipe = load_pipeline(CONFIGS / "hypersd.yaml")
    cfgs = phase_configs(pipe)
    assert [c.method.name for c in cfgs] == ["tscd", "feedback", "dmd"]
    assert [s.segments for s in cfgs[0].method.stages] == [8, 4, 2, 1]
    assert cfgs[1].method.rewards[0].kind == "class_consistency"
    tscd, cd = cfgs[0], load_config(CONFIGS / "cd.yaml")
    assert cd.method.name == "cd"
    for key in ("model.pretrained_teacher_model", "data.batch_size", "train.num_workers", "train.max_steps",
                "train.lr", "train.lr_warmup_steps", "train.ema_decay", "method.student", "method.lora_rank",
                "method.lora_alpha", "method.num_ddim_timesteps", "method.teacher_guidance_scale",
                "method.target_network", "method.target_ema_decay"):
        a, b = tscd, cd
        for part in key.split("."):
            a, b = getattr(a, part), getattr(b, part)
        assert a == b, key
    assert sum(s.steps for s in tscd.method.stages) == tscd.train.max_steps == sum(s.steps for s in cd.method.stages)


def test_distill_job_detects_a_pipeline_file(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "jobs/distill.py"), "--config", str(CONFIGS / "hypersd.yaml"),
                        "--dry-run", f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("# ---- phase") == 3 and f"init_student: {tmp_path}/tscd/export/ema" in p.stdout


# ---------------------------------------------------------------- the pipeline through Ray

def test_tiny_hypersd_pipeline_runs_skips_and_resumes(ray_cluster, tmp_path):
    from hyperscale.train.launch import run_training

    save_denoiser(tiny_teacher(), tmp_path / "teacher")
    calls = []

    def runner(cfg):
        calls.append(cfg.run.name)
        return run_training(cfg)

    summary = run_pipeline(_tiny_pipeline(tmp_path), runner)
    out = tmp_path / "run"
    assert [p["name"] for p in summary["phases"]] == ["tscd", "feedback", "dmd"] and len(calls) == 3
    assert all(p["wall_min"] > 0 and p["cpu_min"] > 0 and p["reserved_cpu_min"] > 0 for p in summary["phases"])
    assert [p["steps"] for p in summary["phases"]] == [8, 4, 4]
    record = json.loads((out / "unified" / PIPELINE_RECORD).read_text())
    assert record["source"] == "dmd/export/ema" and record["total"]["wall_min"] > 0
    for name, prev in (("feedback", "tscd"), ("dmd", "feedback")):
        assert load_config(out / name / "config.yaml").method.init_student == str(out / prev / "export/ema")

    # the unified export: merged weights and LoRA give the same generator; training moved the LoRA
    teacher = load_denoiser(tmp_path / "teacher")
    merged = load_denoiser(out / "unified")
    lora = load_lora(copy.deepcopy(teacher), out / "unified" / "lora")
    with torch.no_grad():
        assert (merged(X, T, C) - lora(X, T, C)).abs().max() < 1e-5
        assert not torch.allclose(lora(X, T, C), teacher(X, T, C))
        tscd = load_lora(copy.deepcopy(teacher), out / "tscd/export/ema/lora")
        assert not torch.allclose(lora(X, T, C), tscd(X, T, C))
    meta = json.loads((out / "unified/hyperscale_model.json").read_text())["extra"]
    assert meta["pipeline"]["phases"] == ["tscd", "feedback", "dmd"] and meta["generator"]["timestep"] == 999

    # a re-run skips finished phases; an unfinished one (as if killed after its step-4 checkpoint,
    # now asked for 6 steps) resumes from its latest checkpoint
    shutil.rmtree(out / "dmd/export")
    (out / "dmd/phase.json").unlink()
    assert find_latest(out / "dmd/checkpoints") is not None
    calls.clear()
    again = run_pipeline(_tiny_pipeline(tmp_path, "phases.dmd.train.max_steps=6"), runner)
    assert calls == ["hypersd-pipeline-tiny-dmd"]
    assert [p["name"] for p in again["phases"]] == ["tscd", "feedback", "dmd"]
    assert again["phases"][0]["wall_min"] == summary["phases"][0]["wall_min"]  # the first run's timing
    metrics = json.loads((out / "dmd/metrics.json").read_text())
    assert metrics["restored_at_step"] == 4 and metrics["step"] == 6 and again["phases"][2]["steps"] == 6
    assert len(json.loads((out / "dmd/attempts.json").read_text())) == 2
    # a finished phase whose config changed is an error, not silently reused
    with pytest.raises(PipelineError, match="'feedback' .* its config changed"):
        run_pipeline(_tiny_pipeline(tmp_path, "phases.feedback.train.lr=0.5"), runner)


def test_resolve_paths_makes_init_student_absolute(tmp_path, monkeypatch):
    """The workers read method.init_student; their cwd may differ from the driver's."""
    from hyperscale.train.launch import resolve_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/p/tscd/export/ema").mkdir(parents=True)
    cfg = load_config(None, ["method.name=dmd", "method.init_student=runs/p/tscd/export/ema",
                             "run.output_dir=runs/p/dmd"])
    out = resolve_paths(cfg)
    assert out.method.init_student == str(tmp_path / "runs/p/tscd/export/ema")
    assert cfg.method.init_student == "runs/p/tscd/export/ema"  # a copy; the input is unchanged
    assert resolve_paths(load_config(None, ["method.name=dmd"])).method.init_student is None
