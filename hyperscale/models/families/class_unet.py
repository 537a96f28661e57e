"""Family ``class_unet``: diffusers ``UNet2DModel`` with class labels, in pixel space.

The class-conditional teacher of the CPU-scale domain (Fashion-MNIST, 28 x 28 x 1; docs/design.md
§5). The class embedding table has ``num_classes + 1`` rows; the last row is the null label
that classifier-free guidance uses. Exports: ``hyperscale_model.json`` records the UNet config
and the schedule's ``alphas_cumprod`` (``describe``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from hyperscale.data.fashion_mnist import CLASS_NAMES
from hyperscale.diffusion.schedule import DiscreteVP, Prediction, Schedule
from hyperscale.models.cond import Cond, as_cond
from hyperscale.models.denoiser import BaseDenoiser, unwrap
from hyperscale.models.family import Family, feature_hooks



class ClassUNetDenoiser(BaseDenoiser):
    def __init__(self, schedule: Schedule, unet_config: dict[str, Any],
                 prediction_type: Prediction | str = Prediction.eps):
        super().__init__(schedule, prediction_type)
        from diffusers import UNet2DModel  # heavy import kept local

        self.unet_config = dict(unet_config)
        self.unet = UNet2DModel(**self.unet_config)
        self.num_classes = int(self.unet_config["num_class_embeds"]) - 1

    def null_cond(self, cond):
        if isinstance(cond, Cond):
            return Cond(labels=torch.full_like(cond.labels, self.num_classes))
        return torch.full_like(cond, self.num_classes)

    def raw(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        cond = as_cond(cond)
        labels = cond.labels if cond is not None else torch.full((x_t.shape[0],), self.num_classes,
                                                                 device=x_t.device, dtype=torch.long)
        return self.unet(x_t, t, class_labels=labels).sample


def unet_config(sample_size: int, in_channels: int, block_out_channels: list[int],
                layers_per_block: int, num_classes: int, attention_levels: list[bool],
                dropout: float = 0.0) -> dict[str, Any]:
    """A diffusers UNet2DModel config for the class-conditional pixel denoiser."""
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    return dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                down_block_types=tuple(down), up_block_types=tuple(up),
                num_class_embeds=num_classes + 1, norm_num_groups=min(32, min(block_out_channels)),
                attention_head_dim=8, dropout=dropout, add_attention=True)


def _inner(denoiser: nn.Module) -> ClassUNetDenoiser:
    found = unwrap(denoiser, lambda m: isinstance(m, ClassUNetDenoiser))
    if found is None:
        raise TypeError(f"{type(denoiser).__name__} is not a class_unet denoiser")
    return found


class ClassUNet(Family):
    name = "class_unet"
    bounded = True
    lora_prefix = "unet"
    denoiser_class = ClassUNetDenoiser

    def fresh(self, m, schedule: Schedule) -> ClassUNetDenoiser:
        cfg = unet_config(m.sample_size, m.in_channels, m.block_out_channels, m.layers_per_block,
                          m.num_classes, m.attention_levels, m.dropout)
        return ClassUNetDenoiser(schedule, cfg, m.prediction_type)

    def save(self, denoiser: nn.Module, directory, extra: dict) -> None:
        """model.safetensors (hyperscale's loader) and a diffusers folder beside it: ``unet/``
        (UNet2DModel.from_pretrained(path, subfolder="unet")), ``scheduler/`` (DDIM on the same
        betas, trailing, abar 1 at the end) and model_index.json (DDIMPipeline loads it; sampling
        needs the class labels DDIMPipeline does not pass, so sample with hyperscale)."""
        from diffusers import DDIMPipeline, DDIMScheduler

        super().save(denoiser, directory, extra)
        d = _inner(denoiser)
        abar = d.schedule.alphas_cumprod.double()
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        kind = {Prediction.eps: "epsilon", Prediction.v: "v_prediction", Prediction.x0: "sample"}.get(d.prediction_type)
        if kind is None:
            return  # a prediction type diffusers' schedulers do not name: the hyperscale files only
        scheduler = DDIMScheduler(num_train_timesteps=len(abar), trained_betas=betas.tolist(), prediction_type=kind,
                                  timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=True, steps_offset=1)
        DDIMPipeline(unet=d.unet, scheduler=scheduler).save_pretrained(str(directory), safe_serialization=True)

    def describe(self, denoiser: nn.Module) -> dict:
        d = _inner(denoiser)
        return {"adapter": "class_unet2d", "prediction_type": d.prediction_type.value, "unet": d.unet_config,
                "alphas_cumprod": d.schedule.alphas_cumprod.tolist()}

    def from_description(self, meta: dict) -> ClassUNetDenoiser:
        sched = DiscreteVP(torch.tensor(meta["alphas_cumprod"], dtype=torch.float64))
        return ClassUNetDenoiser(sched, meta["unet"], meta["prediction_type"])

    def encode_condition(self, denoiser: nn.Module, items: Tensor | Sequence[int], device=None) -> Cond:
        if isinstance(items, Cond):
            return items.to(device)
        if isinstance(items, (dict, str)) or (isinstance(items, (list, tuple)) and items and isinstance(items[0], str)):
            raise TypeError(f"family {self.name} is conditioned on class labels, not prompts or embeddings")
        labels = torch.as_tensor(items, dtype=torch.long)
        return Cond(labels=labels if device is None else labels.to(device))

    def null_condition(self, denoiser: nn.Module, n: int, device=None) -> Cond:
        return Cond(labels=torch.full((n,), _inner(denoiser).num_classes, dtype=torch.long, device=device))

    def class_names(self, denoiser: nn.Module) -> tuple[str, ...]:
        n = _inner(denoiser).num_classes
        return CLASS_NAMES if n == len(CLASS_NAMES) else tuple(f"class {i}" for i in range(n))

    def sample_shape(self, denoiser: nn.Module) -> tuple[int, ...]:
        cfg = _inner(denoiser).unet_config
        size = cfg["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg["in_channels"]),) + size

    def backbone(self, denoiser: nn.Module) -> nn.Module:
        return _inner(denoiser).unet

    def feature_channels(self, denoiser: nn.Module) -> list[int]:
        ch = list(self.backbone(denoiser).config.block_out_channels)
        return ch + [ch[-1]]

    def features(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond) -> list[Tensor]:
        """Every down block's output, then the mid block's; the decoder is never run."""
        unet = self.backbone(denoiser)
        return feature_hooks(lambda: denoiser(x_t, t, cond), list(unet.down_blocks), unet.mid_block)
