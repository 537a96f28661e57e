"""LoRA students: peft LoRA layers on the diffusers UNet inside a denoiser adapter, plus export.

``apply_lora(denoiser, rank, alpha, target_modules)`` injects peft LoRA layers
(``peft.inject_adapter_in_model`` with a ``LoraConfig``; lora_B starts at zero, so outputs are
unchanged at init) into ``denoiser.unet`` and returns a ``LoraDenoiser``: the same
``Denoiser`` seen by methods and samplers, whose ``requires_grad_`` only ever touches the LoRA
parameters, so a trainer that toggles whole roles trains the adapter alone.

Files (the layout diffusers writes with ``save_lora_weights`` and reads with
``lora_state_dict`` / ``load_lora_weights``):
- ``pytorch_lora_weights.safetensors``: keys ``unet.<module path>.lora_A.weight`` /
  ``.lora_B.weight`` (peft names, diffusers module paths), safetensors metadata
  ``lora_adapter_metadata`` = JSON of the ``LoraConfig`` fields prefixed ``unet.``
  (r, lora_alpha, target_modules, ...), so the scale alpha / r survives the round trip.
- optional ``pytorch_lora_weights_kohya.safetensors``: kohya / ComfyUI / A1111 keys
  ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` in the family's
  layout (``Family.kohya_state_dict``: FLUX uses BFL module names; SD3 has none, as diffusers
  has no kohya reader for it).

diffusers' ``load_lora_weights`` is a pipeline API for UNet2DConditionModel / SD; a
``UNet2DModel`` has no LoRA loader mixin, so ``load_lora`` here reads the same file and
injects it with peft (``inject_adapter_in_model`` + ``set_peft_model_state_dict``).
``merge_lora`` folds the adapter into plain weights (a copy of the original adapter class,
exportable with ``save_denoiser``). ``init_student`` starts a student from an earlier
``save_student`` export: the same LoRA continued, or the export's (merged) weights.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from hyperscale.models.denoiser import unwrap

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # as diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIX = "unet"

# LCM-LoRA's UNet targets (attention, feed-forward, resnet convs, time projections, resamplers);
# only the names present in a given UNet are used.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                   "time_emb_proj")
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_dora", "use_rslora")


def lora_prefix(denoiser: nn.Module) -> str:
    """The component name LoRA files key the weights under: the family's (``unet`` for UNets)."""
    from hyperscale.models.families import family_of

    try:
        return family_of(denoiser).lora_prefix
    except TypeError:  # a bare UNet held by a test harness
        return PREFIX


def _unet_of(denoiser: nn.Module) -> nn.Module:
    """The network LoRA layers go on: the family's backbone (a toy's ``.unet`` in tests)."""
    from hyperscale.models.families import family_of

    try:
        return family_of(denoiser).backbone(denoiser)
    except TypeError:
        found = unwrap(denoiser, lambda m: hasattr(m, "unet"))
        if found is None:
            raise TypeError(f"{type(denoiser).__name__} has no .unet to put LoRA layers on") from None
        return found.unet


def resolve_targets(unet: nn.Module, target_modules: Sequence[str] | None = None) -> list[str]:
    """Target names that match at least one module of ``unet`` (peft suffix matching)."""
    wanted = list(target_modules) if target_modules else list(DEFAULT_TARGETS)
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    found = [t for t in wanted if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise ValueError(f"none of the LoRA target modules {wanted} exist in the UNet")
    if target_modules:
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise ValueError(f"LoRA target modules not in the UNet: {missing}")
    return found


def is_lora_param(name: str) -> bool:
    return "lora_" in name


class LoraDenoiser(nn.Module):
    """A denoiser whose UNet carries peft LoRA layers; forwards every ``Denoiser`` call to it."""

    def __init__(self, inner: nn.Module, lora_config):
        super().__init__()
        self.inner = inner
        self.lora_config = lora_config

    # -- Denoiser protocol
    @property
    def schedule(self):
        return self.inner.schedule

    @property
    def prediction_type(self):
        return self.inner.prediction_type

    def null_cond(self, cond: Tensor) -> Tensor:
        return self.inner.null_cond(cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, out="epsilon") -> Tensor:
        return self.inner(x_t, t, cond, out=out)

    @property
    def unet(self) -> nn.Module:
        return _unet_of(self.inner)

    @property
    def unet_config(self):
        return getattr(self.inner, "unet_config", None)

    # -- trainable parameters: the adapter only
    def requires_grad_(self, requires_grad: bool = True) -> "LoraDenoiser":
        for n, p in self.named_parameters():
            p.requires_grad_(bool(requires_grad) and is_lora_param(n))
        return self

    def lora_parameters(self) -> Iterable[nn.Parameter]:
        return (p for n, p in self.named_parameters() if is_lora_param(n))

    def lora_state_dict(self) -> dict[str, Tensor]:
        """peft-format LoRA weights keyed by the backbone's module path (``...to_q.lora_A.weight``)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(_unet_of(self.inner)).items()}


def make_lora_config(rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None,
                     dropout: float = 0.0, unet: nn.Module | None = None):
    from peft import LoraConfig

    targets = resolve_targets(unet, target_modules) if unet is not None else list(target_modules or DEFAULT_TARGETS)
    return LoraConfig(r=int(rank), lora_alpha=float(rank if alpha is None else alpha), target_modules=targets,
                      lora_dropout=float(dropout), init_lora_weights=True, bias="none")


def apply_lora(denoiser: nn.Module, rank: int, alpha: float | None = None,
               target_modules: Sequence[str] | None = None, dropout: float = 0.0) -> LoraDenoiser:
    """Inject LoRA layers into ``denoiser.unet`` in place and wrap it; only the LoRA parameters
    require grad. lora_B = 0 at init (peft default), so outputs equal the denoiser's."""
    from peft import inject_adapter_in_model

    unet = _unet_of(denoiser)
    config = make_lora_config(rank, alpha, target_modules, dropout, unet)
    inject_adapter_in_model(config, unet)
    return LoraDenoiser(denoiser, config).requires_grad_(True)


# ---------------------------------------------------------------- files

def _config_metadata(config) -> dict:
    d = config.to_dict()
    out = {}
    for k in _CONFIG_FIELDS:
        v = d.get(k)
        out[k] = sorted(v) if isinstance(v, (set, frozenset)) else v
    return out


def kohya_state_dict(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """peft LoRA keys (relative to the UNet) -> kohya keys (``lora_unet_...lora_down.weight``, ``.alpha``)."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        for peft_name, kohya_name in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if k.endswith(peft_name):
                base = "lora_unet_" + k[: -len(peft_name)].replace(".", "_")
                out[base + kohya_name] = v
                out[base + ".alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"unexpected LoRA key {k!r}")
    return out


def save_lora(model: LoraDenoiser, directory: str | os.PathLike, kohya: bool = False) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers layout) [+ the kohya file] atomically."""
    from safetensors.torch import save_file

    from hyperscale.storage.local import atomic_file

    if not isinstance(model, LoraDenoiser):
        raise TypeError(f"{type(model).__name__} carries no LoRA")
    directory = Path(directory)
    state = {k: v.cpu().contiguous() for k, v in model.lora_state_dict().items()}
    prefix = lora_prefix(model)
    meta = {f"{prefix}.{k}": v for k, v in _config_metadata(model.lora_config).items()}
    with atomic_file(directory / LORA_WEIGHTS) as tmp:
        save_file({f"{prefix}.{k}": v for k, v in state.items()}, str(tmp),
                  metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})
    keys = _kohya_keys(model, state) if kohya else None
    if keys is not None:
        with atomic_file(directory / KOHYA_WEIGHTS) as tmp:
            save_file(keys, str(tmp), metadata={"format": "pt"})
    return directory


def _kohya_keys(model: LoraDenoiser, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The family's kohya layout of ``state`` (``Family.kohya_state_dict``; None: the family has none)."""
    from hyperscale.models.families import family_of

    alpha = model.lora_config.lora_alpha
    try:
        family = family_of(model)
    except TypeError:  # a bare UNet held by a test harness
        return kohya_state_dict(state, alpha)
    return family.kohya_state_dict(model, state, alpha)


def read_lora(source: str | os.PathLike, prefix: str = PREFIX) -> tuple[dict[str, Tensor], dict]:
    """(peft-format state dict relative to the UNet, LoraConfig kwargs) from a LoRA file or a
    directory holding ``pytorch_lora_weights.safetensors``. Old diffusers keys (``lora.down``)
    are converted to peft names."""
    from safetensors import safe_open

    path = Path(source)
    if path.is_dir():
        path = path / LORA_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        raw_meta = (f.metadata() or {}).get(METADATA_KEY)
        state = {k: f.get_tensor(k) for k in f.keys()}
    if raw_meta is None:
        raise ValueError(f"{path}: no {METADATA_KEY} metadata (rank / alpha / targets unknown)")
    meta = json.loads(raw_meta)
    kwargs = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
    state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if any(".lora.down." in k or ".lora.up." in k for k in state):
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = convert_unet_state_dict_to_peft(state)
    return state, kwargs


def load_lora(denoiser: nn.Module, source: str | os.PathLike, dropout: float | None = None) -> LoraDenoiser:
    """Inject the saved LoRA into ``denoiser`` (in place) and return the wrapped denoiser
    (``dropout``: the adapter's dropout from now on; None keeps the saved value)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state, kwargs = read_lora(source, lora_prefix(denoiser))
    if dropout is not None:
        kwargs["lora_dropout"] = float(dropout)
    config = LoraConfig(**kwargs, init_lora_weights=True)
    unet = _unet_of(denoiser)
    inject_adapter_in_model(config, unet)
    result = set_peft_model_state_dict(unet, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if is_lora_param(k)]
    if unexpected or missing:
        raise ValueError(f"LoRA does not fit this UNet: unexpected {unexpected[:5]}, missing {missing[:5]}")
    return LoraDenoiser(denoiser, config).requires_grad_(True)


def merge_lora(model: LoraDenoiser) -> nn.Module:
    """A copy of the wrapped denoiser with the LoRA folded into its weights and the peft layers
    removed: the original adapter class with the original state-dict keys."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = copy.deepcopy(model.inner if isinstance(model, LoraDenoiser) else model)
    unet = _unet_of(inner)
    with torch.no_grad():
        for name, module in list(unet.named_modules()):
            if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = unet.get_submodule(parent_name) if parent_name else unet
                setattr(parent, child, module.get_base_layer())
    return inner.requires_grad_(False)


def save_student(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None,
                 kohya: bool = True) -> Path:
    """Export a student: a LoRA student gets ``lora/`` (diffusers [+ kohya] files) and its merged
    weights as a plain hyperscale export; a full student is saved as is."""
    from hyperscale.models.build import save_denoiser

    directory = Path(directory)
    if not isinstance(model, LoraDenoiser):
        return save_denoiser(model, directory, extra)
    save_denoiser(merge_lora(model), directory, (extra or {}) | {"lora": "lora/" + LORA_WEIGHTS})
    save_lora(model, directory / "lora", kohya=kohya)  # after: save_denoiser replaces the directory
    return directory


# ---------------------------------------------------------------- students from earlier exports

def export_has_lora(directory: str | os.PathLike) -> bool:
    """Whether an export directory is a LoRA student's (``save_student`` wrote ``lora/``)."""
    return (Path(directory) / "lora" / LORA_WEIGHTS).is_file()


def is_bare_adapter(directory: str | os.PathLike) -> bool:
    """Whether a directory holds only a diffusers-format LoRA (``pytorch_lora_weights.safetensors``,
    no export metadata), e.g. a shipped Hyper-SD adapter: it needs a base model to sample."""
    from hyperscale.models.build import EXPORT_META

    return (Path(directory) / LORA_WEIGHTS).is_file() and not (Path(directory) / EXPORT_META).is_file()


def merged_adapter(base: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """``base`` (consumed) with the adapter in ``directory`` applied and merged: samples as fast as
    plain weights."""
    return merge_lora(load_lora(base, directory)).eval()


def _check_same_base(denoiser: nn.Module, directory: Path) -> None:
    """The export must come from the same architecture and noise schedule as ``denoiser``."""
    from hyperscale.models.build import EXPORT_META

    meta = json.loads((directory / EXPORT_META).read_text())
    ours = getattr(denoiser, "unet_config", None)
    ours = json.loads(json.dumps(dict(ours))) if ours is not None else None  # tuples -> lists, as stored
    theirs = meta.get("unet")
    if ours is not None and theirs is not None and ours != theirs:
        keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ValueError(f"{directory} was exported from another architecture than the teacher "
                         f"(UNet config differs in {keys})")
    abar = meta.get("alphas_cumprod")
    if abar is not None and not torch.allclose(torch.tensor(abar, dtype=torch.float64),
                                               denoiser.schedule.alphas_cumprod.double(), atol=1e-9):
        raise ValueError(f"{directory} was exported with another noise schedule than the teacher's")


def init_student(denoiser: nn.Module, source: str | os.PathLike, lora: bool, rank: int | None = None,
                 alpha: float | None = None, target_modules: Sequence[str] | None = None,
                 dropout: float = 0.0) -> nn.Module:
    """Start a student from an earlier export (``save_student``'s layout) instead of ``denoiser``,
    a fresh copy of the teacher, which is modified in place.

    lora=True: the export must carry ``lora/``. That LoRA becomes the trainable adapter, so
    training continues the same LoRA; its rank / alpha / targets must be the ones asked for
    (``rank``, ``alpha`` None = rank, ``target_modules`` None = the default list), and its merged
    weights must equal this teacher + that LoRA (it was trained on this teacher).
    lora=False: the export's weights (merged ones for a LoRA export) are loaded, strictly.
    """
    from safetensors.torch import load_file

    from hyperscale.models.build import EXPORT_META, EXPORT_WEIGHTS, resolve_source

    directory = resolve_source(str(source))
    if not (directory / EXPORT_META).is_file():
        hint = (f"; did you mean {directory / 'export' / 'ema'}?" if (directory / "export" / "ema").is_dir()
                else "")
        raise FileNotFoundError(f"{directory} is not a student export (no {EXPORT_META}){hint}")
    _check_same_base(denoiser, directory)
    if (directory / EXPORT_WEIGHTS).is_file():
        weights = load_file(str(directory / EXPORT_WEIGHTS))
    else:  # a pipeline-folder export (text-to-image families): its network's weights, under the denoiser's keys
        from hyperscale.models.build import load_denoiser

        weights = load_denoiser(directory).state_dict()
    if not lora:
        result = denoiser.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{directory}: weights do not fit the teacher's architecture: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        return denoiser
    if not export_has_lora(directory):
        raise ValueError(f"{directory} is a full export (no lora/{LORA_WEIGHTS}) but the student is a LoRA: "
                         f"use a LoRA export, or a full student (which loads these weights)")
    _, saved = read_lora(directory / "lora", lora_prefix(denoiser))
    want = {"r": int(rank if rank is not None else saved["r"]),
            "lora_alpha": float(alpha if alpha is not None else (rank if rank is not None else saved["lora_alpha"])),
            "target_modules": sorted(resolve_targets(_unet_of(denoiser), target_modules))}
    have = {"r": int(saved["r"]), "lora_alpha": float(saved["lora_alpha"]),
            "target_modules": sorted(saved["target_modules"])}
    diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if diff:
        raise ValueError(f"the LoRA in {directory / 'lora'} does not match the configured one: " + "; ".join(
            f"{k} is {h} there, {w} here" for k, (h, w) in diff.items()))
    student = load_lora(denoiser, directory / "lora", dropout)
    merged = merge_lora(student).state_dict()
    worst = max(((merged[k] - weights[k].to(merged[k].dtype)).abs().max().item() if k in weights else float("inf"))
                for k in merged)
    if worst > 1e-4:
        raise ValueError(f"{directory}: its LoRA was trained on another base model than this teacher (teacher + "
                         f"LoRA differs from the export's merged weights by up to {worst:.3g})")
    return student
