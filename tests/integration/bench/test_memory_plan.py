"""Memory plans (hyperscale/bench/memory_plan.py) against the bytes the memory suite measures
(hyperscale/bench/memory.py) on 2 local gloo ranks: the same plan code that prints the
real-checkpoint tables (docs/benchmarks.md §8) must reproduce, role by role and rank by rank,
what DeepSpeed really holds under ZeRO 0-3: parameters, fp32 master, gradients, AdamW state,
and the frozen teacher, EMA and frontend."""
import json

import pytest

from hyperscale.bench.memory import MemorySettings, frontend_modules, measure, probe_config
from hyperscale.bench.memory_plan import (Tensors, check, engine_bytes, markdown, plan_preset, plan_roles,
                                          straddle, totals)
from hyperscale.models.build import load_denoiser
from hyperscale.storage.local import REPO

# LoRA generator (bf16 weights, a frozen base, fp32 master of the LoRA only), full fake score,
# frozen bf16 teacher, fp32 EMA, bf16 text encoder and VAE
TINY = MemorySettings(config=str(REPO / "jobs/configs/sd15-dmd-tiny.yaml"), batch_size=2, mixed_precision="bf16",
                      overrides=["method.student=lora", "method.lora_rank=4"], stages=[0, 1, 2, 3])


def _plan(s: MemorySettings, stage: int, mixed_precision: str | None = None) -> list[dict]:
    cfg = probe_config(stage, s.workers, s)
    if mixed_precision:
        cfg.train.mixed_precision = mixed_precision
    teacher = load_denoiser(cfg.model.pretrained_teacher_model)
    fe = getattr(teacher, "frontend", None)
    if fe is not None:
        fe.to(None, None).pipe  # noqa: B018 (loads the text encoders and VAE the trainer loads)
    return plan_roles(cfg, teacher, frontend_modules(teacher), s.workers, stage)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_plan_matches_measured_bytes_at_every_zero_stage():
    measured = measure(TINY)
    for stage in TINY.stages:
        rows = [r for r in measured if r["zero_stage"] == stage]
        assert {r["kind"] for r in rows} == {"generator", "critic", "frozen", "ema", "frontend"}
        # byte-exact: padding, partitions and the straddling gradients are in the plan
        assert check(_plan(TINY, stage), rows) == [], stage
    # a wrong plan fails: another stage's partitioning, or fp32 weights where bf16 is held
    assert check(_plan(TINY, 2), [r for r in measured if r["zero_stage"] == 3])
    assert check(_plan(TINY, 3, "no"), [r for r in measured if r["zero_stage"] == 3])


def test_plan_reproduces_the_memory_record():
    """docs/bench/memory.json (fp32 SIM on the shipped teacher's architecture), with its settings."""
    record = json.loads((REPO / "docs/bench/memory.json").read_text())
    st = record["settings"]
    s = MemorySettings(teacher=str(REPO / st["teacher"]), batch_size=st["batch_size"], workers=st["workers"],
                       mixed_precision=st["mixed_precision"])
    for stage in st["stages"]:
        rows = [r for r in record["rows"] if r["zero_stage"] == stage]
        plan = [p for p in _plan(s, stage) if {r["role"] for r in rows} >= {p["role"]}]
        assert check(plan, rows) == [], stage
        assert check([p | {"grad_bytes": p["grad_bytes"] + 8} for p in plan], rows)  # 8 bytes off fails


def test_straddling_gradients_and_padding():
    # 3 tensors of 5, 6, 5 elements on 2 ranks: partitions [0, 8) and [8, 16); the 6 crosses 8
    assert straddle([5, 6, 5], 2, 0) == 3 and straddle([5, 6, 5], 2, 1) == 3
    assert straddle([4, 4, 4, 4], 2, 0) == 0
    t = Tensors([5, 6, 5, 7], [True, True, True, False], 4)
    b = engine_bytes(t, 2, 2, 2, 0)  # bf16: 16 trained elements padded to 16, 7 frozen
    assert b["param_bytes"] == 2 * (7 + 16) and b["master_bytes"] == 4 * 8 and b["optim_bytes"] == 8 * 8 + 4
    b3 = engine_bytes(t, 3, 2, 2, 0)  # ZeRO-3: ceil(n / 2) of every tensor, the frozen one too
    assert b3["param_bytes"] == 2 * (3 + 3 + 3 + 4) and b3["master_bytes"] == 4 * 9
    with pytest.raises(ValueError, match="ZeRO stages are 0-3"):
        engine_bytes(t, 4, 2, None)


def test_real_preset_plan_from_published_configs():
    from hyperscale.pipeline.run import preset_runs

    rows = plan_preset("sd15-hypersd", preset_runs(REPO / "jobs/configs/sd15-hypersd.yaml"), [8], [2, 3])
    by = {(r["phase"], r["zero_stage"], r["role"]): r for r in rows}
    unet = by[("tscd", 2, "teacher")]["numel"]
    from hyperscale.bench.gpu_shapes import SHAPES, build_denoiser

    assert unet == sum(p.numel() for p in build_denoiser(SHAPES["sd15"], "meta").net.parameters())
    assert by[("tscd", 2, "teacher")]["param_bytes"] == 2 * unet  # frozen in bf16
    assert by[("tscd", 2, "target")]["param_bytes"] == 4 * by[("tscd", 2, "target")]["numel"]  # fp32 EMA
    gen = by[("tscd", 2, "generator")]
    assert 0 < gen["trainable_numel"] < 0.1 * gen["numel"]  # a LoRA
    assert ("tscd", 2, "fake_score") not in by and by[("dmd", 2, "fake_score")]["trainable_numel"] == unet
    sums = totals(rows)
    assert sums[("sd15-hypersd", "dmd", 8, 3)] < sums[("sd15-hypersd", "dmd", 8, 2)]
    assert "| **total** |" in markdown(rows, "sd15-hypersd", 8)
