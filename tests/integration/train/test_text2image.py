"""Text-to-image families end to end through Ray Train with 2 workers (DeepSpeed ZeRO-2 on CPU):
SIM, DMD and TSCD (a LoRA student) on tiny pipelines built from config, and the unified Hyper-SD
pipeline (TSCD -> DMD into one LoRA); every export reloads with diffusers' own API and gives the
project's images (tests/t2i_checks.py)."""
import copy
import json

import pytest
import torch

from t2i_checks import check_export, check_lora_export
from hyperscale.config import load_config
from hyperscale.storage.local import REPO

CONFIGS = REPO / "jobs" / "configs"
METHODS = {"sim": "sd15-sim-tiny.yaml", "dmd": "sd15-dmd-tiny.yaml", "tscd": "sd15-tscd-tiny.yaml"}


def _train(preset: str, out, family: str, *overrides: str) -> dict:
    from hyperscale.train.launch import run_training

    cfg = load_config(CONFIGS / preset, [f"run.output_dir={out}", f"model.family={family}",
                                         f"model.pretrained_teacher_model=tiny:{family}", *overrides])
    return run_training(cfg)


# what diffusers' pipeline call needs beyond the defaults, per family
PIPE_KWARGS = {"pixart": {"use_resolution_binning": False, "clean_caption": False, "max_sequence_length": 16},
               "flux": {"height": 32, "width": 32, "guidance_scale": 3.5,  # FLUX's embedded guidance
                        "pack": lambda z: __import__("diffusers").FluxPipeline._pack_latents(z, *z.shape)}}
# rectified flow: the exported 1-step call is at t = 1 (the pipeline's scheduler starts at sigma 1)
FLOW = {"sim": ["method.init_sigma=.inf"], "dmd": ["method.generator_timestep=null"]}
OVERRIDES = {"sd3": FLOW, "flux": FLOW}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart", "sd3", "flux"])
def test_every_method_trains_on_2_workers_and_exports_for_diffusers(ray_cluster, tmp_path, family):
    kwargs = PIPE_KWARGS.get(family, {})
    for method, preset in METHODS.items():
        out = tmp_path / method
        metrics = _train(preset, out, family, "train.max_steps=2", "train.checkpoint_every=2",
                         *OVERRIDES.get(family, {}).get(method, []))
        assert metrics["step"] == 2 and torch.isfinite(torch.tensor(metrics["loss/generator"])), method
        export = out / "export" / "ema"
        assert json.loads((export / "hyperscale_model.json").read_text())["family"] == family
        check_export(export, **kwargs)
        if method == "tscd" and family != "pixart":  # the LoRA student: diffusers' loaders and the kohya file
            # diffusers' FLUX kohya reader splits the single blocks' fused layers at FLUX.1's real sizes
            # only: the tiny model's file is checked by the maths in tests/families/test_flux.py
            check_lora_export(export, f"tiny:{family}", kohya=family != "flux", **kwargs)
        elif method == "tscd":  # no LoRA loader for PixArt in diffusers: hyperscale's peft loader
            _check_peft_lora(export, family)


def _check_peft_lora(export, family: str) -> None:
    from hyperscale.models.build import load_denoiser
    from hyperscale.models.lora import load_lora

    merged = load_denoiser(export)
    lora = load_lora(load_denoiser(f"tiny:{family}"), export / "lora")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond = merged.frontend.encode(["a photo of a bag", "a photo of a coat"])
    with torch.no_grad():
        assert (merged(x, t, cond) - lora(x, t, cond)).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unified_hypersd_pipeline(ray_cluster, tmp_path, family):
    from hyperscale.pipeline.run import load_pipeline, run_pipeline
    from hyperscale.train.launch import run_training

    pipe = load_pipeline(CONFIGS / f"{family}-hypersd-tiny.yaml", [f"run.output_dir={tmp_path / 'run'}"])
    summary = run_pipeline(pipe, run_training)
    assert [p["name"] for p in summary["phases"]] == ["tscd", "dmd"]
    unified = tmp_path / "run" / "unified"
    meta = json.loads((unified / "hyperscale_model.json").read_text())["extra"]
    assert meta["multi_step"] and meta["pipeline"]["phases"] == ["tscd", "dmd"]
    sched = json.loads((unified / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "TCDScheduler"  # one LoRA for 1 to 8 steps, sampled with TCD
    check_export(unified)
    check_lora_export(unified, f"tiny:{family}")


def test_a_teacher_of_another_family_is_a_clear_error(ray_cluster, tmp_path):
    with pytest.raises(Exception, match="is a sdxl model but the config says model.family=sd15"):
        _train("sd15-sim-tiny.yaml", tmp_path / "run", "sd15", "model.pretrained_teacher_model=tiny:sdxl",
               "train.max_steps=1")


@pytest.mark.parametrize("precompute", [False, True])
def test_tscd_trains_on_caption_shards(tmp_path, precompute):
    """Caption shards written by jobs/make_shards.py (with the tiny SD1.5's latents and text
    embeddings stored when ``precompute``) feed TSCD; one worker in process."""
    import subprocess
    import sys

    from hyperscale.data.captions import caption_shard_dataset

    cmd = [sys.executable, str(REPO / "jobs/make_shards.py"), "--kind", "captions", "--out", str(tmp_path / "shards"),
           "--maxcount", "12", "--limit", "24"] + (["--precompute", "tiny:sd15"] if precompute else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    pattern = p.stdout.strip().splitlines()[-1]
    batch = next(iter(caption_shard_dataset(pattern, 4, resolution=32, shuffle_buffer=0)))
    assert (batch.latents is not None) == precompute and (batch.text is not None) == precompute
    if precompute:
        assert batch.latents.shape == (4, 4, 8, 8) and batch.text["embeds"].shape[0] == 4
    cfg = load_config(CONFIGS / "sd15-tscd-tiny.yaml",
                      [f"run.output_dir={tmp_path / 'run'}", f"data.train_shards_path_or_url={pattern}",
                       "train.num_workers=1", "train.engine=torch", "train.max_steps=2", "train.checkpoint_every=2"])
    from hyperscale.train.launch import run_in_process

    metrics = run_in_process(cfg)
    assert metrics["step"] == 2 and torch.isfinite(torch.tensor(metrics["loss/generator"]))


TWINS = {"sd15-sim", "sd15-hypersd", "sdxl-dmd", "sdxl-hypersd", "pixart-sim", "sd3-hypersd", "flux-hypersd"}


def test_every_text_to_image_preset_has_a_tiny_twin():
    real = {p.stem for p in CONFIGS.glob("*.yaml")
            if p.stem.split("-")[0] in ("sd15", "sdxl", "pixart", "sd3", "flux") and not p.stem.endswith("-tiny")}
    assert real == TWINS and all((CONFIGS / f"{name}-tiny.yaml").is_file() for name in real)


@pytest.mark.parametrize("twin", ["sdxl-dmd-tiny", "pixart-sim-tiny", "sd3-hypersd-tiny", "flux-hypersd-tiny"])
def test_tiny_twins_run(tmp_path, twin):
    """The twins the Ray tests above do not run (sd15-sim-tiny: the ray job submit test; sd15- and
    sdxl-hypersd-tiny: the unified pipeline test), one worker in process, to their exports."""
    from hyperscale.pipeline.run import is_pipeline_file, load_pipeline, run_pipeline
    from hyperscale.train.launch import run_in_process

    local = [f"run.output_dir={tmp_path / 'run'}", "train.num_workers=1", "train.engine=torch"]
    if is_pipeline_file(CONFIGS / f"{twin}.yaml"):
        run_pipeline(load_pipeline(CONFIGS / f"{twin}.yaml", local), run_in_process)
        export = tmp_path / "run" / "unified"
    else:
        run_in_process(load_config(CONFIGS / f"{twin}.yaml", local + ["train.max_steps=2"]))
        export = tmp_path / "run" / "export" / "ema"
    family = json.loads((export / "hyperscale_model.json").read_text())["family"]
    check_export(export, **PIPE_KWARGS.get(family, {}))


def test_feedback_phase_on_sd15_scores_decoded_images_with_their_prompts(tmp_path, monkeypatch):
    """The feedback (ReFL) phase on a text-to-image family: rollout in latents, the VAE decodes x0
    (with gradients) for the rewards, which also get the prompts. A tiny aesthetic stand-in (random
    CLIP vision tower + head, the loader's own layout) trains through the trainer in process; a
    recording reward shows what rewards receive."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from hyperscale.methods.base import Batch
    from hyperscale.methods.feedback import Feedback, FeedbackConfig, RewardSpec
    from hyperscale.models.build import load_denoiser
    from hyperscale.models.rewards import _Head, RewardSet, save_reward_head
    from hyperscale.train.launch import run_in_process

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                          num_attention_heads=4, image_size=32, patch_size=8,
                                                          projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "aes" / "clip")
    save_reward_head(_Head(16).eval(), tmp_path / "aes")
    cfg = load_config(None, [
        "model.family=sd15", "model.pretrained_teacher_model=tiny:sd15", "data.batch_size=2",
        f"run.output_dir={tmp_path / 'run'}", "train.num_workers=1", "train.engine=torch", "train.max_steps=2",
        "train.checkpoint_every=2", "train.log_every=1", "train.lr_warmup_steps=0",
        "method.name=feedback", "method.student=lora", "method.lora_rank=4",
        f"method.rewards=[{{name: aes, kind: aesthetic, source: '{tmp_path / 'aes'}', margin: 10.0}}]"])
    metrics = run_in_process(cfg)
    assert metrics["step"] == 2 and torch.isfinite(torch.tensor(metrics["loss/feedback"]))
    assert "reward/aes" in metrics
    check_export(tmp_path / "run" / "export" / "ema")

    seen = {}

    class Recording(torch.nn.Module):
        def forward(self, images, cond):
            seen["images"], seen["cond"] = images, cond
            return images.float().mean(dim=(1, 2, 3))

    teacher = load_denoiser("tiny:sd15")
    method = Feedback(FeedbackConfig(rewards=[RewardSpec(name="rec", kind="aesthetic", margin=1.0)]))
    prompts = ["a photo of a bag", "a photo of a coat"]
    batch = Batch(teacher.family.encode_condition(teacher, prompts), items=prompts)
    out = method.generator_loss(batch, generator=copy.deepcopy(teacher).requires_grad_(True),
                                reward=RewardSet({"rec": Recording()}), teacher=teacher)
    assert seen["cond"] == prompts and seen["images"].shape == (2, 3, 32, 32)  # decoded images, not latents
    assert torch.isfinite(out.loss).all()


def test_bf16_training_exports_the_frozen_parts_as_stored(tmp_path):
    """train.mixed_precision=bf16 casts the teacher and the frontend for training; the export's text
    encoder and VAE are still the teacher's own fp32 weights, and its network the fp32 EMA."""
    from safetensors.torch import load_file

    from hyperscale.models.build import resolve_source
    from hyperscale.train.launch import run_in_process

    run_in_process(load_config(CONFIGS / "sd15-sim-tiny.yaml", [
        f"run.output_dir={tmp_path / 'run'}", "train.num_workers=1", "train.max_steps=2",
        "train.mixed_precision=bf16"]))
    export, teacher = tmp_path / "run" / "export" / "ema", resolve_source("tiny:sd15")
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        ours, theirs = load_file(export / part), load_file(teacher / part)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    assert all(v.dtype == torch.float32 for v in load_file(export / "unet/diffusion_pytorch_model.safetensors").values())
    check_export(export)


def test_gradient_checkpointing_changes_memory_not_the_math(tmp_path):
    """model.gradient_checkpointing=true: the trained networks recompute activations in backward
    (diffusers' enable_gradient_checkpointing), the losses of a run stay the same."""
    from hyperscale.methods import build_method
    from hyperscale.models.families import family_of
    from hyperscale.train.launch import run_in_process
    from hyperscale.train.loop import build_modules

    runs = {}
    for gc in (False, True):
        cfg = load_config(CONFIGS / "sd15-sim-tiny.yaml", [
            f"run.output_dir={tmp_path / str(gc)}", "train.num_workers=1", "train.engine=torch", "train.max_steps=2",
            f"model.gradient_checkpointing={str(gc).lower()}"])
        runs[gc] = run_in_process(cfg)
    for k in ("loss/generator", "loss/fake_score"):
        assert abs(runs[True][k] - runs[False][k]) <= 1e-5 * max(1.0, abs(runs[False][k])), k
    roles = build_modules(cfg, build_method(cfg.method), torch.device("cpu"))
    for name, module in roles.trainable.items():
        assert family_of(module).backbone(module).is_gradient_checkpointing, name
    assert not family_of(roles.frozen["teacher"]).backbone(roles.frozen["teacher"]).is_gradient_checkpointing
