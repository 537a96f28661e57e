"""What serving a text-to-image export adds to ``generation.ImageGenerator``: prompts, sizes,
guidance against the null prompt (or a negative prompt), one frontend per pipeline folder.

Kept apart from ``generation`` so the class-conditional path stays as it was and each module
stays readable; ``ImageGenerator`` holds a ``TextConditions`` when its family's ``condition`` is
``"text"`` and asks it at the three points that differ: validating a request (``prepare``),
turning a batch's prompts into ``Cond`` rows (``encode``, ``uncond``) and naming what was drawn.

- **Sizes** (``SizeRule``): a UNet family generates any latent side that is a multiple of
  ``max(8, 2 ** num_upsamplers)`` (diffusers' UNet2DConditionModel upsamples cleanly only then),
  so pixel sides are multiples of that times the VAE's scale factor (64 for SD1.5 / SDXL), from
  half the native side to twice it: 256..1024 for SD1.5, 512..2048 for SDXL. A network without
  ``num_upsamplers`` (a transformer) and every pixel family generate their native size only.
- **Guidance**: ``UncondCFG`` is ``CFGDenoiser`` whose unconditional rows are fixed before
  sampling (the family's null condition, or the encoded negative prompt per image), so nothing
  touches the shared text encoders while a network batch runs.
- **Sharing**: the text encoders and VAE (``Frontend``) of one pipeline folder are loaded once per
  process (``share_frontend``): the LoRA adapters multiplexed over one ``lora_base`` use its
  frontend, and its prompt-embedding cache. Encoding goes through one lock (the cache is an
  ``OrderedDict``; Serve runs requests in threads).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from hyperscale.models.cond import Cond
from hyperscale.models.denoiser import CFGDenoiser
from hyperscale.models.families.text2image import inner

if TYPE_CHECKING:  # generation imports this module
    from hyperscale.models.generation import GenerateRequest

_ENCODE_LOCK = threading.RLock()  # the frontends' prompt caches and lazy loads
_FRONTENDS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def share_frontend(denoiser: nn.Module, folder: str | Path) -> None:
    """Give ``denoiser`` the process's frontend of pipeline ``folder`` (its own becomes that one
    when it is the first): one set of text encoders, VAE and prompt cache per folder."""
    d = inner(denoiser)
    with _ENCODE_LOCK:
        key = str(Path(folder).resolve())
        shared = _FRONTENDS.get(key)
        if shared is None:
            _FRONTENDS[key] = d.frontend
        else:
            d.frontend = shared


@dataclass(frozen=True)
class SizeRule:
    """The image sizes a model generates: pixel heights and widths, and pixels per sample unit."""

    default: tuple[int, int]  # (height, width) in pixels
    heights: tuple[int, ...]
    widths: tuple[int, ...]
    factor: int = 1  # pixels per latent (the VAE's scale factor; 1 for pixel families)
    channels: int = 1  # of the sample (latent channels for latent families)

    @classmethod
    def native(cls, shape: tuple[int, ...]) -> "SizeRule":
        """A pixel family: its sample shape (C, H, W) is the image, at one size."""
        return cls((shape[-2], shape[-1]), (shape[-2],), (shape[-1],), 1, shape[0])

    @classmethod
    def of_text_model(cls, denoiser: nn.Module, shape: tuple[int, ...]) -> "SizeRule":
        """A latent text-to-image model (module docstring)."""
        d = inner(denoiser)
        with _ENCODE_LOCK:  # loads the frontend on first use
            factor = int(d.frontend.pipe.vae_scale_factor)
        return cls.latent(shape, factor, getattr(d.net, "num_upsamplers", None))

    @classmethod
    def latent(cls, shape: tuple[int, ...], factor: int, num_upsamplers: int | None) -> "SizeRule":
        """Latent sample ``shape`` (C, h, w) at ``factor`` pixels per latent; a UNet with
        ``num_upsamplers`` takes latent sides that are multiples of max(8, 2 ** num_upsamplers),
        half to twice the native side; None (not a UNet): the native size only."""
        h, w = shape[-2] * factor, shape[-1] * factor
        if num_upsamplers is None:
            return cls((h, w), (h,), (w,), factor, shape[0])
        step = max(8, 2 ** int(num_upsamplers)) * factor

        def sides(native: int) -> tuple[int, ...]:
            lo, hi = max(step, -(-(native // 2) // step) * step), 2 * native // step * step
            return tuple(range(lo, hi + 1, step)) or (native,)

        return cls((h, w), sides(h), sides(w), factor, shape[0])

    def describe(self) -> dict:
        return {"default": list(self.default), "heights": list(self.heights), "widths": list(self.widths)}

    def sample_shape(self, req: "GenerateRequest", name: str) -> tuple[int, ...]:
        """The sample shape for the request's height / width (each omitted: the default)."""
        h = self.default[0] if req.height is None else req.height
        w = self.default[1] if req.width is None else req.width
        for field, value, allowed in (("height", h, self.heights), ("width", w, self.widths)):
            if value not in allowed:
                raise _error(f"{field}: {value} is not a size '{name}' generates; height must be one of "
                             f"{_listing(self.heights)} and width one of {_listing(self.widths)} pixels "
                             f"('size' upscales the output instead)", param=field, sizes=self)
        return (self.channels, h // self.factor, w // self.factor)

    def wxh(self) -> str:
        """The sizes as 'WIDTHxHEIGHT' (OpenAI's ``size``), in words."""
        h, w = self.default
        if len(self.heights) == len(self.widths) == 1:
            return f"'{w}x{h}' only"
        return (f"'WxH' with W one of {_listing(self.widths)} and H one of {_listing(self.heights)} "
                f"(default '{w}x{h}')")


def _listing(values: tuple[int, ...]) -> str:
    if len(values) > 4 and len({b - a for a, b in zip(values, values[1:])}) == 1:
        return f"{values[0]}..{values[-1]} in steps of {values[1] - values[0]}"
    return ", ".join(map(str, values))


def _error(message: str, **details) -> Exception:
    from hyperscale.models.generation import RequestError

    return RequestError(message, **details)


def prompts_of(req: "GenerateRequest") -> list[str]:
    """The request's prompts as a list (a string is a list of one); [] when none was given."""
    if req.prompt is None:
        return []
    return [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)


class UncondCFG(CFGDenoiser):
    """``CFGDenoiser`` with its unconditional rows given (one per sample): the null prompt's or a
    negative prompt's, encoded before sampling."""

    def __init__(self, inner_model: nn.Module, guidance_scale: float, uncond: Cond):
        super().__init__(inner_model, guidance_scale)
        self.uncond = uncond

    def null_cond(self, cond) -> Cond:
        if len(cond) != len(self.uncond):
            raise ValueError(f"{len(self.uncond)} unconditional rows for a batch of {len(cond)}")
        return self.uncond.to(cond.device)


class TextConditions:
    """Prompts of a text-to-image model: request checks, ``Cond`` rows, sizes (module docstring)."""

    def __init__(self, denoiser: nn.Module, family, shape: tuple[int, ...]):
        self.denoiser, self.family = denoiser, family
        self.sizes = SizeRule.of_text_model(denoiser, shape)
        with _ENCODE_LOCK:
            self.image_channels = int(inner(denoiser).frontend.vae.config.out_channels)

    def prepare(self, req: "GenerateRequest", name: str, guided: bool) -> tuple[list[str], tuple[int, ...]]:
        """(one prompt per image, sample shape) of a request; ``guided``: CFG will run (a negative
        prompt needs it)."""
        if req.class_ is not None:
            raise _error(f"class: '{name}' is a text-to-image model; it takes prompts, not class names "
                         f"(send 'prompt': a string or a list of strings)")
        prompts = prompts_of(req)
        if req.prompt == []:
            raise _error("prompt: an empty list; give at least one prompt")
        if not prompts:
            raise _error(f"prompt: required; '{name}' is a text-to-image model (send a string or a list of strings)")
        if req.negative_prompt is not None and not guided:
            raise _error("negative_prompt: applies with classifier-free guidance; set guidance_scale above 1 "
                         "(multi-step models only)")
        return [p for p in prompts for _ in range(req.num_images)], self.sizes.sample_shape(req, name)

    def encode(self, prompts: list[str]) -> Cond:
        with _ENCODE_LOCK:
            return self.family.encode_condition(self.denoiser, prompts)

    def uncond(self, negatives: list[str | None]) -> Cond:
        """One unconditional row per image: the null prompt's where None or empty (what the
        pipelines use for an empty negative prompt), else that negative prompt's embedding."""
        with _ENCODE_LOCK:
            rows = [self.family.null_condition(self.denoiser, 1) if not neg
                    else self.family.encode_condition(self.denoiser, [neg]) for neg in negatives]
        return Cond.cat(rows)
