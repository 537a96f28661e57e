"""The GPU training benchmark (hyperscale/bench/gpu.py) at its tiny shapes on CPU: the real steps of
SIM, DMD and TSCD in fp32 and bf16 autocast, the FLOP counter against hand counts, the record."""
import json

import pytest
import torch
from torch import nn

from hyperscale.bench.gpu import (VARIANTS, GpuSettings, build_bench, count_flops, device_peak, run_gpu_suite)
from hyperscale.bench.gpu_shapes import SHAPES, build_denoiser, random_cond


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_flop_counter_matches_hand_counts():
    torch.manual_seed(0)
    B, M, K, N = 3, 5, 7, 11
    lin, x = nn.Linear(K, N), torch.randn(B, M, K)
    assert count_flops(lambda: lin(x)) == 2 * (B * M) * N * K  # one matmul: 2 M N K
    xg = x.clone().requires_grad_(True)
    # forward, then backward: the input gradient and the weight gradient are one matmul each
    assert count_flops(lambda: lin(xg).sum().backward()) == 3 * 2 * (B * M) * N * K
    conv, img = nn.Conv2d(4, 8, 3, padding=1), torch.randn(2, 4, 8, 8)
    # 2 Cin Cout k^2 Hout Wout per sample (a multiply-add per weight per output pixel)
    assert count_flops(lambda: conv(img)) == 2 * (2 * 4 * 8 * 3 * 3 * 8 * 8)


@pytest.mark.parametrize("shape", ["tiny", "tiny-xl"])
def test_tiny_shapes_keep_the_families_structure_and_conditioning(shape):
    s = SHAPES[shape]
    big = SHAPES["sd15" if s.family == "sd15" else "sdxl"]
    for key in ("down_block_types", "up_block_types", "layers_per_block"):
        assert s.unet[key] == big.unet[key]
    den = build_denoiser(s)
    cond = random_cond(s, 2, "cpu", torch.Generator().manual_seed(0))
    assert cond.embeds.shape == (2, 77, s.unet["cross_attention_dim"])
    with torch.no_grad():
        out = den(torch.randn(2, *s.latent), torch.tensor([10, 500]), cond)
        null = den(torch.randn(2, *s.latent), torch.tensor([10, 500]), den.null_cond(cond))
    assert out.shape == (2, *s.latent) and torch.isfinite(out).all() and torch.isfinite(null).all()


def test_a_bench_step_is_the_trainers_step_and_trains_only_the_trained_roles():
    b = build_bench(SHAPES["tiny"], "sim", VARIANTS["fp32"], 2, 0, torch.device("cpu"))
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in
              {"generator": b.roles["generator"].module, "fake_score": b.roles["fake_score"].module,
               "teacher": b.frozen["teacher"]}.items()}
    b.measuring = True
    b.step()
    assert b.counters.step == 1 and b.counters.samples == 2
    moved = {n: any(not torch.equal(p, q) for p, q in zip(ps, m.parameters())) for n, ps, m in
             [(n, ps, b.roles[n].module if n in b.roles else b.frozen[n]) for n, ps in before.items()]}
    assert moved == {"generator": True, "fake_score": True, "teacher": False}
    table = b.role_table()
    assert table["generator"]["grad_bytes"] == table["generator"]["param_bytes"]
    # AdamW: exp_avg and exp_avg_sq per parameter, and its step count (a float32 scalar)
    assert table["generator"]["optim_bytes"] == 2 * table["generator"]["param_bytes"] + 4 * len(b.roles["generator"].params)


def test_tiny_suite_runs_every_method_in_fp32_and_bf16_and_writes_the_record(tmp_path):
    s = GpuSettings(shapes=["tiny"], variants=["fp32", "bf16-autocast", "flash", "compile"],
                    warmup_steps=1, timed_steps=1, device="cpu", threads=1)
    rec = json.loads(run_gpu_suite(tmp_path, s, command="test").read_text())
    assert {"suite", "commit", "date", "machine", "command", "settings", "rows"} <= rec.keys()
    assert rec["suite"] == "gpu" and rec["settings"]["device_name"] == "cpu"
    assert rec["settings"]["shape_specs"]["tiny"]["unet_params"] > 0
    rows = {(r["method"], r["variant"]): r for r in rec["rows"]}
    assert len(rows) == 12
    for method in ("sim", "dmd", "tscd"):
        fp32, bf16 = rows[method, "fp32"], rows[method, "bf16-autocast"]
        for r in (fp32, bf16):
            assert r["status"] == "ok", r
            assert r["step_ms"] > 0 and r["samples_per_s"] > 0 and r["tflops_per_s"] > 0
            assert r["mfu"] is None and r["peak"] is None  # no datasheet peak on CPU
            assert r["roles"]["teacher"]["kind"] == "frozen" and r["roles"]["generator"]["optim_bytes"] > 0
        assert fp32["flops_per_step"] == bf16["flops_per_step"] > 0  # model FLOPs, counted once per method
        assert bf16["roles"]["teacher"]["param_bytes"] == fp32["roles"]["teacher"]["param_bytes"]  # fp32 teacher
        for v in ("flash", "compile"):
            assert rows[method, v]["status"] == "skipped" and rows[method, v]["reason"]
    assert rows["dmd", "fp32"]["updates_per_step"] == {"fake_score": 5, "generator": 1}
    assert set(rows["tscd", "fp32"]["roles"]) == {"generator", "teacher", "target", "generator_ema"}
    # SIM's step: the critic's DSM (1 forward + backward) and the generator's three forwards and backwards
    assert rows["sim", "fp32"]["flops_per_step"] > rows["tscd", "fp32"]["flops_per_step"]


def test_tiny_xl_steps_in_bf16_with_the_teacher_in_bf16(tmp_path):
    s = GpuSettings(shapes=["tiny-xl"], methods=["sim"], variants=["bf16-frozen"], warmup_steps=1, timed_steps=1,
                    device="cpu", threads=1)
    row = json.loads(run_gpu_suite(tmp_path, s).read_text())["rows"][0]
    assert row["status"] == "ok", row
    assert row["flops_counted_in"] == "bf16-frozen"
    teacher = row["roles"]["teacher"]
    assert teacher["param_bytes"] == 2 * teacher["params"]  # bf16 weights
    assert row["roles"]["generator"]["param_bytes"] == 4 * row["roles"]["generator"]["params"]


def test_settings_are_checked_and_peaks_name_the_datasheet():
    with pytest.raises(ValueError, match="unknown"):
        GpuSettings(shapes=["tiny"], variants=["warp-speed"])
    with pytest.raises(ValueError, match="unknown benchmark shape"):
        GpuSettings(shapes=["sd3"])
    assert device_peak(torch.device("cpu"), "bf16") is None
