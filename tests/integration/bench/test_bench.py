"""The quality benchmark runs end to end on tiny settings and writes the record format of docs/benchmarks.md §1.4."""
import json
from dataclasses import replace
import subprocess
import sys

import torch
from PIL import Image

from hyperscale.storage.local import REPO
from hyperscale.config import load_config
import pytest

from hyperscale.bench.quality import (QualitySettings, StudentSpec, carried_rows, parse_students, run_quality,
                                  student_sampler)
from hyperscale.bench.denoise import DenoiseSettings, denoising_error, run_denoise
from hyperscale.bench.speed import SpeedSettings, run_speed
from hyperscale.methods.sim import Sim, SimConfig
from hyperscale.models.build import build_denoiser, save_denoiser


def tiny_teacher_and_student(tmp_path):
    """A tiny untrained teacher and a 1-step generator exported the way the trainer exports one."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    teacher = build_denoiser(cfg.model, cfg.schedule)
    save_denoiser(teacher, tmp_path / "teacher")
    save_denoiser(teacher, tmp_path / "student", Sim(SimConfig()).sampler(teacher).to_extra())
    return str(tmp_path / "teacher"), str(tmp_path / "student")


def test_quality_suite_writes_record_grids_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSCALE_CACHE_DIR", str(tmp_path / "cache"))
    teacher, student = tiny_teacher_and_student(tmp_path)
    s = QualitySettings(fid_samples=20, batch_size=10, teacher_steps=[1, 2], reference_limit=200)
    path = run_quality(teacher, str(tmp_path / "bench"), s, command="test", students={"sim-l2": student})
    rec = json.loads(path.read_text())
    assert {"suite", "commit", "date", "machine", "command", "settings", "rows"} <= rec.keys()
    assert rec["suite"] == "quality" and rec["settings"]["fid_samples"] == 20
    assert [(r["generator"], r["steps"]) for r in rec["rows"]] == [("real-data", 0), ("teacher-ddim", 1),
                                                                  ("teacher-ddim", 2), ("sim-l2", 1)]
    for r in rec["rows"]:
        assert {"fid", "kid", "precision", "recall", "class_acc", "samples_per_s"} <= r.keys()
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert Image.open(tmp_path / "bench" / r["grid"]).size[0] > 0
    assert rec["settings"]["pr_k"] == 3 and rec["settings"]["pr_reference_size"] == 20  # 20 vs 20
    real, untrained = rec["rows"][0], rec["rows"][1]
    assert real["fid"] < untrained["fid"]  # an untrained net is far from the data
    assert real["precision"] > untrained["precision"] and real["recall"] > untrained["recall"]
    assert real["class_acc"] > 0.8 and untrained["samples_per_s"] > 0
    assert (tmp_path / "bench" / "quality_fid_vs_steps.png").is_file()


def test_quality_suite_rejects_a_multi_step_export_as_student(tmp_path):
    teacher, _ = tiny_teacher_and_student(tmp_path)
    with pytest.raises(ValueError, match="not a 1-step generator"):
        run_quality(teacher, str(tmp_path / "bench"), QualitySettings(fid_samples=10), students={"x": teacher})


def test_student_specs_are_checked():
    assert parse_students(["a=x/y", "b=z"]) == {"a": "x/y", "b": "z"}
    for bad in (["nopath"], ["=x"], ["a="], ["a=x", "a=y"], ["a=x@0"], ["a=x@2:euler"]):
        with pytest.raises(ValueError, match="student"):
            parse_students(bad)
    assert parse_students(["u=runs/h/unified@1,2,4,8"]) == {"u": "runs/h/unified@1,2,4,8"}


def test_multi_step_student_specs():
    assert StudentSpec.parse("runs/x/export/ema") == StudentSpec("runs/x/export/ema")  # the 1-step form
    assert StudentSpec.parse("runs/x@1,2,4,8") == StudentSpec("runs/x", (1, 2, 4, 8), "tcd", None)
    assert StudentSpec.parse("s3://b/x@4:ddim") == StudentSpec("s3://b/x", (4,), "ddim", None)
    assert StudentSpec.parse("a@b/x@2,8:tcd=0.5") == StudentSpec("a@b/x", (2, 8), "tcd", 0.5)
    assert StudentSpec.parse("user@host/x").steps is None  # an '@' that is part of the path
    assert StudentSpec.parse("x@2:tcd=0.5").describe(0.3) == {"name": "tcd", "eta": 0.5}
    assert StudentSpec.parse("x@2").describe(0.3) == {"name": "tcd", "eta": 0.3}
    assert StudentSpec.parse("x@2:ddim").describe(0.3) == {"name": "ddim", "spacing": "trailing"}
    for bad, match in (("x@0", ">= 1"), ("x@2,2", "distinct"), ("@2", "a path"), ("x@2:tcd=1.5", "eta"),
                       ("x@2:lcm", "samplers: tcd, ddim"), ("x@2;4", "step counts")):
        with pytest.raises(ValueError, match=match):
            StudentSpec.parse(bad)


def test_student_samplers_are_reproducible(tmp_path):
    _, student = tiny_teacher_and_student(tmp_path)
    from hyperscale.models.build import load_denoiser

    d = load_denoiser(student)
    z, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    for sampler in ({"name": "tcd", "eta": 0.7}, {"name": "ddim", "spacing": "trailing"}):
        a = student_sampler(d, 3, sampler, seed=0)(z, y)
        b = student_sampler(d, 3, sampler, seed=0)(z, y)
        assert torch.equal(a, b) and a.shape == z.shape
    assert not torch.equal(student_sampler(d, 3, {"name": "tcd", "eta": 0.7}, seed=1)(z, y),
                           student_sampler(d, 3, {"name": "tcd", "eta": 0.7}, seed=0)(z, y))


def test_quality_suite_rows_for_a_multi_step_student(tmp_path, monkeypatch):
    """PATH@1,2 gives one row per step count (sampler recorded); the 1-step form still works beside it,
    and teacher / real-data rows carry over from an earlier record."""
    monkeypatch.setenv("HYPERSCALE_CACHE_DIR", str(tmp_path / "cache"))
    teacher, student = tiny_teacher_and_student(tmp_path)
    s = QualitySettings(fid_samples=20, batch_size=10, teacher_steps=[1], reference_limit=200)
    first = run_quality(teacher, str(tmp_path / "a"), s, command="a")
    from hyperscale.models.build import load_denoiser  # a unified export: multi-step + its 1-step call
    call = {"timestep": 440, "noise_input": "sigma"}
    save_denoiser(load_denoiser(teacher), tmp_path / "unified", {"generator": call, "multi_step": True})
    save_denoiser(load_denoiser(teacher), tmp_path / "generator", {"generator": call})  # the same call, 1-step only
    path = run_quality(teacher, str(tmp_path / "b"), s, command="b", carry_from=str(first),
                       students={"hypersd-unified": f"{student}@1,2", "hypersd-tscd": f"{teacher}@2:ddim",
                                 "sim-l2": student, "unified": f"{tmp_path / 'unified'}@1,2",
                                 "as-generator": str(tmp_path / "generator")})
    rows = json.loads(path.read_text())["rows"]
    assert [(r["generator"], r["steps"]) for r in rows] == [
        ("real-data", 0), ("teacher-ddim", 1), ("hypersd-unified", 1), ("hypersd-unified", 2),
        ("hypersd-tscd", 2), ("sim-l2", 1), ("unified", 1), ("unified", 2), ("as-generator", 1)]
    assert rows[6]["sampler"] == {"name": "one-step", **call} and rows[7]["sampler"]["name"] == "tcd"
    assert all("carried_from" in r for r in rows[:2]) and not any("carried_from" in r for r in rows[2:])
    assert rows[2]["sampler"] == {"name": "tcd", "eta": 0.3} and rows[4]["sampler"]["name"] == "ddim"
    assert "sampler" not in rows[5] and all(r["fid"] > 0 for r in rows)
    # the unified export's 1-step row is its DMD call: the very samples of that call's 1-step export
    assert rows[6]["fid"] == rows[8]["fid"] and rows[6]["kid"] == rows[8]["kid"]
    assert (tmp_path / "b" / rows[3]["grid"]).is_file()
    with pytest.raises(ValueError, match="unique"):
        run_quality(teacher, str(tmp_path / "c"), s, students={"teacher-ddim": f"{student}@1"})


def test_speed_suite_times_students_against_the_teacher(tmp_path):
    teacher, student = tiny_teacher_and_student(tmp_path)
    s = SpeedSettings(batch_size=4, teacher_steps=[2, 3], repeats=1)
    rec = json.loads(run_speed(teacher, {"sim-pseudo-huber": student}, str(tmp_path), s, command="t",
                               log=lambda *_: None).read_text())
    assert rec["suite"] == "speed"
    assert [(r["generator"], r["steps"], r["batch"]) for r in rec["rows"]] == [
        ("teacher-ddim", 2, 4), ("teacher-ddim", 3, 4), ("sim-pseudo-huber", 1, 4)]
    gen = rec["rows"][-1]
    for t in rec["rows"][:2]:
        assert gen[f"speedup_vs_teacher_{t['steps']}"] == pytest.approx(gen["samples_per_s"] / t["samples_per_s"])
        assert t["network_calls_per_sample"] == 2 * t["steps"]  # CFG doubles the teacher's calls
    with pytest.raises(ValueError, match="--student"):
        run_speed(teacher, {}, str(tmp_path), s)


def zero_eps_denoiser(tmp_path):
    """A tiny denoiser whose eps prediction is exactly 0 (output conv zeroed), exported."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    model = build_denoiser(cfg.model, cfg.schedule)
    with torch.no_grad():
        model.unet.conv_out.weight.zero_()
        model.unet.conv_out.bias.zero_()
    save_denoiser(model, tmp_path / "zero")
    return model, str(tmp_path / "zero")


def test_denoising_error_of_a_zero_predictor_is_analytic(tmp_path):
    """eps_hat = 0: eps-MSE is E[eps^2] = 1 up to sampling noise, and x0_hat - x0 = (sigma/alpha) eps
    exactly, so x0-MSE = sigma~_t^2 * eps-MSE; the same seed gives the same figures."""
    model, _ = zero_eps_denoiser(tmp_path)
    x0, y = torch.rand(40, 1, 28, 28) * 2 - 1, torch.arange(40) % 10
    for t in (0, 300, 999):
        eps_mse, x0_mse = denoising_error(model, x0, y, t, seed=3, batch_size=16)
        assert eps_mse == pytest.approx(1.0, abs=0.03)
        assert x0_mse == pytest.approx(eps_mse * float(model.schedule.sigma_ve(t)) ** 2, rel=1e-5)
        assert denoising_error(model, x0, y, t, seed=3, batch_size=40) == pytest.approx((eps_mse, x0_mse), rel=1e-6)


def test_denoise_suite_compares_denoisers_per_timestep(tmp_path):
    teacher, _ = tiny_teacher_and_student(tmp_path)
    _, zero = zero_eps_denoiser(tmp_path)
    s = DenoiseSettings(num_images=20, timesteps=[0, 500], batch_size=8)
    rec = json.loads(run_denoise(teacher, {"zero": zero}, str(tmp_path / "d"), s, command="t",
                                 log=lambda *_: None).read_text())
    assert rec["suite"] == "denoise" and rec["settings"]["timesteps"] == [0, 500]
    assert [(r["denoiser"], r["t"]) for r in rec["rows"]] == [("teacher", 0), ("teacher", 500), ("zero", 0),
                                                             ("zero", 500)]
    assert all(r["eps_mse"] > 0 and r["x0_mse"] > 0 for r in rec["rows"])
    assert rec["rows"][0]["weights_sha256"] != rec["rows"][2]["weights_sha256"]  # which weights, no path
    assert str(tmp_path) not in json.dumps(rec["rows"])
    # the zero predictor: x0-MSE = sigma~^2 * eps-MSE, through the whole suite
    assert rec["rows"][2]["x0_mse"] == pytest.approx(rec["rows"][2]["eps_mse"] * rec["rows"][2]["sigma_ve"] ** 2)
    with pytest.raises(ValueError, match="'teacher' names"):
        run_denoise(teacher, {"teacher": zero}, str(tmp_path / "d"), s)
    with pytest.raises(ValueError, match="past teacher's grid"):
        run_denoise(teacher, {}, str(tmp_path / "d"), DenoiseSettings(num_images=2, timesteps=[1000]))


def test_quality_rows_carry_over_only_with_equal_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSCALE_CACHE_DIR", str(tmp_path / "cache"))
    teacher, student = tiny_teacher_and_student(tmp_path)
    s = QualitySettings(fid_samples=20, batch_size=10, teacher_steps=[1], reference_limit=200)
    first = json.loads(run_quality(teacher, str(tmp_path / "a"), s, command="a").read_text())
    path = run_quality(teacher, str(tmp_path / "b"), s, command="b", students={"sim-l2": student},
                       carry_from=str(tmp_path / "a" / "quality.json"))
    rec = json.loads(path.read_text())
    assert [(r["generator"], r["steps"]) for r in rec["rows"]] == [("real-data", 0), ("teacher-ddim", 1),
                                                                  ("sim-l2", 1)]
    for old, new in zip(first["rows"], rec["rows"][:2]):
        assert new["fid"] == old["fid"] and new["carried_from"]["commit"] == first["commit"]
    assert "carried_from" not in rec["rows"][2] and rec["settings"]["teacher_sha256"]
    other = QualitySettings(fid_samples=20, batch_size=10, teacher_steps=[1], reference_limit=200, seed=1)
    with pytest.raises(ValueError, match="settings differ: seed"):
        run_quality(teacher, str(tmp_path / "c"), other, carry_from=str(tmp_path / "a" / "quality.json"))
    with pytest.raises(ValueError, match="settings differ: pr_k"):
        carried_rows(tmp_path / "a" / "quality.json",
                     QualitySettings(fid_samples=20, teacher_steps=[1], reference_limit=200, pr_k=5),
                     rec["settings"]["teacher_sha256"])
    # a record from before use_clipped_model_output existed was computed without it
    old_rec = tmp_path / "a" / "quality.json"
    legacy = json.loads(old_rec.read_text())
    del legacy["settings"]["use_clipped_model_output"]
    old_rec.write_text(json.dumps(legacy))
    assert len(carried_rows(old_rec, s, rec["settings"]["teacher_sha256"])) == 2
    # a record from before precision/recall: its real-data row is scored again, its teacher rows are
    # carried with precision and recall null and marked, never filled in
    del legacy["settings"]["pr_k"]
    for r in legacy["rows"]:
        del r["precision"], r["recall"]
    old_rec.write_text(json.dumps(legacy))
    rows = carried_rows(old_rec, s, rec["settings"]["teacher_sha256"])
    assert [(r["generator"], r["precision"], r["recall"]) for r in rows] == [("teacher-ddim", None, None)]
    assert rows[0]["carried_from"]["lacks"] == ["precision", "recall"] and rows[0]["fid"] == first["rows"][1]["fid"]
    mixed = json.loads(run_quality(teacher, str(tmp_path / "d"), s, command="d", carry_from=str(old_rec)).read_text())
    real, carried = mixed["rows"]
    assert real["generator"] == "real-data" and "carried_from" not in real
    assert real["fid"] == pytest.approx(first["rows"][0]["fid"], rel=1e-9)
    assert real["precision"] == first["rows"][0]["precision"] and real["recall"] == first["rows"][0]["recall"]
    assert carried["precision"] is None and carried["carried_from"]["lacks"] == ["precision", "recall"]
    # carried on from the mixed record: still marked, still null
    again = carried_rows(tmp_path / "d" / "quality.json", s, rec["settings"]["teacher_sha256"])
    assert [r["generator"] for r in again] == ["real-data", "teacher-ddim"]
    assert "lacks" not in again[0]["carried_from"] and again[1]["carried_from"]["lacks"] == ["precision", "recall"]
    with pytest.raises(ValueError, match="settings differ: use_clipped_model_output"):
        carried_rows(old_rec, QualitySettings(fid_samples=20, teacher_steps=[1], reference_limit=200,
                                              use_clipped_model_output=True), rec["settings"]["teacher_sha256"])
    # a record from before guidance intervals guided every level; an interval is a setting of its own
    with pytest.raises(ValueError, match="settings differ: guidance_sigma"):
        carried_rows(old_rec, replace(s, guidance_sigma=(0, 5)), rec["settings"]["teacher_sha256"])


def test_teacher_guidance_interval_applies_only_inside_it(tmp_path, monkeypatch):
    """One trailing DDIM step evaluates the teacher at t = T - 1 only (sigma~ far above 5): guided only in
    (0, 5], that row is the unguided teacher's (to rounding: it still runs both branches, at scale 1); guided
    in (0, inf) it is the fully guided one."""
    monkeypatch.setenv("HYPERSCALE_CACHE_DIR", str(tmp_path / "cache"))
    teacher, _ = tiny_teacher_and_student(tmp_path)
    s = QualitySettings(fid_samples=20, batch_size=10, teacher_steps=[1], reference_limit=200, guidance_scale=2.0)

    def teacher_row(name, **kw):
        rec = json.loads(run_quality(teacher, str(tmp_path / name), replace(s, **kw), command=name).read_text())
        return rec, rec["rows"][1]

    _, guided = teacher_row("guided")
    _, unguided = teacher_row("unguided", guidance_scale=1.0)
    rec, low = teacher_row("low", guidance_sigma=(0, 5))
    _, every = teacher_row("every", guidance_sigma=(0, float("inf")))
    assert guided["fid"] != unguided["fid"]
    assert low["fid"] == pytest.approx(unguided["fid"], rel=1e-6)
    assert abs(low["fid"] - unguided["fid"]) < 1e-3 * abs(guided["fid"] - unguided["fid"])
    assert every["fid"] == pytest.approx(guided["fid"], rel=1e-6)
    assert rec["settings"]["guidance_sigma"] == [0.0, 5.0]
    assert len(carried_rows(tmp_path / "low" / "quality.json", replace(s, guidance_sigma=(0, 5)),
                            rec["settings"]["teacher_sha256"])) == 2
    with pytest.raises(ValueError, match="guidance sigma range"):
        QualitySettings(guidance_sigma=(5, 1))


def test_rederived_eps_without_clipping_is_refused_in_settings_and_cli():
    with pytest.raises(ValueError, match="needs clip_x0"):
        QualitySettings(clip_x0=False, use_clipped_model_output=True)
    for bad in (0, 20):
        with pytest.raises(ValueError, match=r"pr_k must be in \[1, fid_samples\)"):
            QualitySettings(fid_samples=20, pr_k=bad)
    root = REPO
    r = subprocess.run([sys.executable, str(root / "jobs" / "bench.py"), "--suite", "quality", "--no-clip-x0",
                        "--use-clipped-model-output"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "use_clipped_model_output re-derives eps from the clipped x0: it needs clip_x0" in r.stderr
    r = subprocess.run([sys.executable, str(root / "jobs" / "bench.py"), "--suite", "quality", "--guidance-sigma",
                        "5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--guidance-sigma takes two numbers LO,HI" in r.stderr


def test_serve_record_keeps_other_generators_rows(tmp_path):
    """jobs/loadtest.py on a second generator adds its rows to serve.json; a rerun replaces its own."""
    from hyperscale.bench.serving import merge_generators
    from hyperscale.storage.records import write_record

    pixel = [{"clients": 1, "images_per_s": 30.0}, {"clients": 32, "images_per_s": 80.0}]
    write_record(tmp_path, "serve", {"generator": "assets/sim-generator", "batching_gain": 1.5}, pixel)  # no tags
    settings, rows = merge_generators(tmp_path, "t2i", {"generator": "t2i"}, [{"clients": 1, "images_per_s": 9.0}])
    assert [(r["generator"], r["clients"]) for r in rows] == [("assets/sim-generator", 1),
                                                              ("assets/sim-generator", 32), ("t2i", 1)]
    old = settings["other_generators"]["assets/sim-generator"]
    assert old["batching_gain"] == 1.5 and old["commit"] and old["date"]
    write_record(tmp_path, "serve", settings, rows)
    settings, rows = merge_generators(tmp_path, "t2i", {"generator": "t2i"}, [{"clients": 8, "images_per_s": 7.0}])
    assert [(r["generator"], r["clients"]) for r in rows] == [("assets/sim-generator", 1),
                                                              ("assets/sim-generator", 32), ("t2i", 8)]
    assert list(settings["other_generators"]) == ["assets/sim-generator"]
