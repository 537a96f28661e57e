"""The family contract: everything the trainer, the methods, the exports, Serve and the
benchmarks need to know about one kind of model, in one place (docs/extending.md).

A family builds a denoiser fresh from the model config or from an export's description, says
what conditions it takes (class labels or prompts -> ``Cond``) and its null condition for CFG,
the per-sample shape it generates, whether its outputs are bounded images (clamping applies only
then), where LoRA layers go (``backbone`` and ``lora_prefix``), and which feature maps the
adversarial head reads. Latent families also map images to latents and back (``encode_images``
/ ``decode``; the identity for pixel families). Families are registered in one table
(``hyperscale.models.families.FAMILIES``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

from torch import Tensor, nn

from hyperscale.models.cond import Cond


class Family:
    name: ClassVar[str]
    condition: ClassVar[str] = "labels"  # what it is conditioned on: "labels" (class ids) or "text" (prompts)
    bounded: ClassVar[bool] = True  # outputs are images in [-1, 1]: samplers and generators may clamp
    lora_prefix: ClassVar[str] = "unet"  # the module name LoRA files use (diffusers' pipeline component)
    denoiser_class: ClassVar[type]

    def owns(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, self.denoiser_class)

    # ---------------------------------------------------------------- building and exports
    def fresh(self, model_section: Any, schedule) -> nn.Module:
        """A new denoiser of the configured architecture (random weights) on ``schedule``."""
        raise NotImplementedError

    def describe(self, denoiser: nn.Module) -> dict:
        """What an export's metadata records to rebuild the denoiser (architecture, schedule)."""
        raise NotImplementedError

    def from_description(self, meta: dict) -> nn.Module:
        """An empty denoiser from ``describe``'s record; the weights are loaded by ``load``."""
        raise NotImplementedError

    def save(self, denoiser: nn.Module, directory, extra: dict) -> None:
        """Write the weights into the (temporary) export ``directory``; ``extra``: the sampler
        and method notes (models/export.py). By default ``model.safetensors``."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))

    def load(self, path, meta: dict | None) -> nn.Module:
        """The exported denoiser in directory ``path`` (``meta``: its hyperscale_model.json, None for
        a plain diffusers pipeline folder); by default ``from_description`` + model.safetensors."""
        from safetensors.torch import load_file

        model = self.from_description(meta)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model

    # ---------------------------------------------------------------- conditions and shapes
    def encode_condition(self, denoiser: nn.Module, items: Tensor | Sequence[str] | dict, device=None) -> Cond:
        """Class labels, prompts or precomputed embeddings (a dict of tensors) -> ``Cond``."""
        raise NotImplementedError

    def null_condition(self, denoiser: nn.Module, n: int, device=None) -> Cond:
        raise NotImplementedError

    def class_names(self, denoiser: nn.Module) -> tuple[str, ...]:
        """The conditions by name, for class-conditional families (Serve resolves requests with them)."""
        raise NotImplementedError

    def sample_shape(self, denoiser: nn.Module) -> tuple[int, ...]:
        raise NotImplementedError

    def image_side(self, denoiser: nn.Module) -> int:
        """The side in pixels of the images the denoiser's samples decode to."""
        return int(self.sample_shape(denoiser)[-1])

    def encode_images(self, denoiser: nn.Module, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> what the denoiser generates (latents; identity for pixel families)."""
        return images

    def decode(self, denoiser: nn.Module, x: Tensor) -> Tensor:
        """What the denoiser generates -> images in [-1, 1] (identity for pixel families)."""
        return x

    # ---------------------------------------------------------------- LoRA and features
    def backbone(self, denoiser: nn.Module) -> nn.Module:
        """The network LoRA layers go on."""
        raise NotImplementedError

    def kohya_state_dict(self, denoiser: nn.Module, state: dict[str, Tensor], alpha: float) -> dict[str, Tensor] | None:
        """The LoRA ``state`` (peft keys relative to the backbone) under kohya / ComfyUI keys, with
        the true alpha: ``lora_unet_<diffusers path>`` by default; None where no kohya reader
        exists for the family (``save_lora`` then writes the diffusers file only)."""
        from hyperscale.models.lora import kohya_state_dict

        return kohya_state_dict(state, alpha)

    def feature_channels(self, denoiser: nn.Module) -> list[int]:
        raise NotImplementedError

    def features(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond) -> list[Tensor]:
        """Feature maps (B, C_l, H_l, W_l) of the denoiser at (x_t, t, cond) for the adversarial head."""
        raise NotImplementedError


def feature_hooks(run, taps: Sequence[nn.Module], stop: nn.Module) -> list[Tensor]:
    """The outputs of ``taps`` then ``stop`` while ``run()`` calls the network, which stops at
    ``stop`` (the rest of the forward pass is never run)."""
    feats: list[Tensor] = []

    class _Stop(Exception):
        pass

    def grab(_m, _inp, out):
        feats.append(out[0] if isinstance(out, tuple) else out)

    def halt(m, inp, out):
        grab(m, inp, out)
        raise _Stop

    handles = [m.register_forward_hook(grab) for m in taps] + [stop.register_forward_hook(halt)]
    try:
        run()
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(feats) != len(taps) + 1:
        raise RuntimeError("the network did not reach its feature taps")
    return feats
