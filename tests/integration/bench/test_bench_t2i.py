"""The quality suite on a text-to-image teacher: rows are prompted, decoded and cropped back to
28 x 28; the VAE floor and held-out prompt accuracy are rows' fields; students load as exports."""
import json

import pytest
import torch

from hyperscale.bench.quality import QualitySettings, run_quality
from hyperscale.bench.quality_t2i import EVAL_PROMPTS, TextRows
from hyperscale.eval.metrics import evaluate_samples
from hyperscale.eval.quick import QuickEval
from hyperscale.models.autoencoder import VAEConfig, build_vae, to_gray28
from hyperscale.models.families import family_of
from hyperscale.models.build import load_denoiser, save_denoiser
from hyperscale.models.export import OneStepCall, SamplerSpec
from hyperscale.models.families.sd import minilm_unet, save_minilm_sd15


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "teacher"
    vae = build_vae(VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4))
    save_minilm_sd15(vae, minilm_unet(8, (32, 32), norm_num_groups=8), out)
    return out


def test_to_gray28():
    x = torch.zeros(2, 3, 32, 32)
    x[:, 0] = 1.0
    x[..., 2:30, 2:30] += 0.5  # the inner 28 x 28
    y = to_gray28(x)
    assert y.shape == (2, 1, 28, 28)
    assert torch.allclose(y, torch.full_like(y, (1.0 + 0.5 + 0.5) / 3))  # 1.5 clamped to 1, then averaged


def test_quick_eval_prompts_and_decodes_a_text_to_image_generator(teacher):
    """The sweeps' in-loop metric on a latent generator: class prompts in label order, latent
    noise of the family's shape, samples decoded and cropped as the quality suite sees them."""
    torch.set_num_threads(1)
    model = load_denoiser(teacher).eval()
    family = family_of(model)
    seen = []

    def sample(z, cond):
        seen.append((z, cond))
        return z * 0.5  # "latents": a fixed function of the noise

    qe = QuickEval(num_samples=20, batch_size=10, reference_limit=200)
    got = qe(sample, 0, model)
    assert [tuple(z.shape) for z, _ in seen] == [(10, 4, 8, 8)] * 2
    want = family.encode_condition(model, [EVAL_PROMPTS[i % 10] for i in range(10)])
    assert torch.equal(seen[0][1].embeds, want.embeds)
    extractor, ref, classifier, labels = qe._state
    images = to_gray28(family.decode(model, qe.noise((4, 8, 8)) * 0.5))
    m = evaluate_samples(images, labels, ref, extractor, classifier, kid_subset_size=20)
    assert got == {f"eval/{k}": pytest.approx(float(v), rel=1e-5) for k, v in m.items()}


def test_vae_floor_reconstructs_real_images(teacher):
    rows = TextRows(load_denoiser(teacher).eval(), seed=0)
    real = torch.rand(4, 1, 28, 28) * 2 - 1
    rec = rows.reconstruct(real)
    assert rec.shape == real.shape and rec.min() >= -1 and rec.max() <= 1
    assert rows.heldout_noise.shape[1:] == rows.shape == (4, 8, 8)


def test_quality_suite_on_a_text_to_image_teacher(tmp_path, teacher):
    torch.set_num_threads(1)
    extra = SamplerSpec(one_step=OneStepCall(timestep=999)).to_extra()
    student = save_denoiser(load_denoiser(teacher).eval(), tmp_path / "student", extra)
    s = QualitySettings(fid_samples=20, batch_size=10, teacher_steps=[1, 2], reference_limit=200, guidance_scale=1.0)
    path = run_quality(str(teacher), str(tmp_path / "bench"), s, command="test",
                       students={"one-step": str(student), "multi": f"{student}@2:ddim"})
    rec = json.loads(path.read_text())
    assert path.name == "quality-t2i.json" and rec["suite"] == "quality-t2i"  # beside the pixel record, not over it
    names = [(r["generator"], r["steps"]) for r in rec["rows"]]
    assert names == [("real-data", 0), ("vae-recon", 0), ("teacher-ddim", 1), ("teacher-ddim", 2),
                     ("one-step", 1), ("multi", 2)]
    assert rec["settings"]["clip_x0"] is False  # latents are never clipped
    assert rec["settings"]["text_to_image"]["prompts"] == list(EVAL_PROMPTS)
    for r in rec["rows"]:
        assert {"fid", "kid", "precision", "recall", "class_acc"} <= r.keys()
        assert (r.get("heldout_acc") is None) == (r["steps"] == 0)
        assert (tmp_path / "bench" / r["grid"]).is_file()
    # unguided, the teacher's 1-step DDIM from z at t = 999 and the export's 1-step call there agree
    t1, one = rec["rows"][2], rec["rows"][4]
    assert t1["fid"] == pytest.approx(one["fid"], rel=1e-4) and t1["class_acc"] == one["class_acc"]
    # carrying the floors and teacher rows over gives the same rows without sampling them again
    again = json.loads(run_quality(str(teacher), str(tmp_path / "again"), s, command="again",
                                   carry_from=str(path)).read_text())
    assert [(r["generator"], r["fid"]) for r in again["rows"]] == [(r["generator"], r["fid"]) for r in rec["rows"][:4]]


def test_a_bare_lora_adapter_is_scored_on_the_teacher(tmp_path, teacher):
    """A shipped diffusers LoRA (a folder with only pytorch_lora_weights.safetensors) is applied to
    the teacher and merged: a zero adapter scores exactly as the teacher's own DDIM row, a non-zero
    one differently; without step counts it is refused by name."""
    from hyperscale.models.lora import apply_lora, save_lora

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lora = apply_lora(load_denoiser(teacher), rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    save_lora(lora, tmp_path / "zero")  # lora_B starts at zero
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(lora, tmp_path / "adapter")
    s = QualitySettings(fid_samples=20, batch_size=10, teacher_steps=[2], reference_limit=200, guidance_scale=1.0)
    with pytest.raises(ValueError, match="LoRA adapter .*give its step counts"):
        run_quality(str(teacher), str(tmp_path / "bad"), s, students={"zero": str(tmp_path / "zero")})
    rec = json.loads(run_quality(str(teacher), str(tmp_path / "bench"), s, command="test", students={
        "zero": f"{tmp_path / 'zero'}@2:ddim", "adapter": f"{tmp_path / 'adapter'}@2:ddim"}).read_text())
    rows = {r["generator"]: r for r in rec["rows"]}
    assert rows["zero"]["fid"] == pytest.approx(rows["teacher-ddim"]["fid"], rel=1e-5)
    assert rows["zero"]["class_acc"] == rows["teacher-ddim"]["class_acc"]
    assert abs(rows["adapter"]["fid"] - rows["teacher-ddim"]["fid"]) > 1e-3
