"""Model cards: what made the export and how to sample it, with no machine paths."""
import json

from hyperscale.models.card import model_card
from hyperscale.storage.local import REPO


def _pipeline_dir(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return tmp_path


def test_a_teacher_trained_from_new_weights_shows_its_full_sampler(tmp_path):
    meta = {"family": "sd15", "extra": {"run": "t2i-teacher", "method": "denoising", "guidance_scale": 1.5,
                                        "teacher": str(REPO / "runs" / "x" / "base"), "step": 10}}
    card = model_card(meta, _pipeline_dir(tmp_path))
    assert "trained with hyperscale from new weights" in card and "student" not in card
    assert "num_inference_steps=25, guidance_scale=1.5)" in card
    assert "25 steps of DDIM" in card
    assert "from runs/x/base" in card and str(REPO) not in card


def test_a_students_card_names_its_teacher_without_machine_paths(tmp_path):
    meta = {"family": "sd15", "extra": {"run": "s", "method": "sim", "teacher": "/data/models/my-teacher",
                                        "generator": {"timestep": 999, "noise_input": "unit"}}}
    card = model_card(meta, _pipeline_dir(tmp_path))
    assert "student distilled with hyperscale (sim, teacher my-teacher)" in card
    assert "/data/models" not in card and "num_inference_steps=1, guidance_scale=1)" in card
    hub = {"family": "sd15", "extra": {"method": "sim", "teacher": "stable-diffusion-v1-5/stable-diffusion-v1-5"}}
    assert "teacher stable-diffusion-v1-5/stable-diffusion-v1-5)" in model_card(hub, _pipeline_dir(tmp_path))
