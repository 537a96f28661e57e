"""One typed, validated config tree: YAML presets + dotted ``key=value`` overrides.

Each component owns its section and receives only that section. Unknown keys and
wrong types are errors that name the key and what is allowed. The resolved tree
is written next to every run's outputs and into every checkpoint.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from hyperscale.diffusion.schedule import Prediction


class ConfigError(ValueError):
    """A config problem, with the dotted key and the allowed values in the message."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class RunSection(Section):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0


class ScheduleSection(Section):
    # the VP kinds; rectified flow comes with the families that carry it (diffusion/schedule.py)
    kind: Literal["linear", "scaled_linear", "cosine"] = "linear"
    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(2e-2, gt=0, lt=1)


class ModelSection(Section):
    """The denoiser backbone. ``pretrained_teacher_model`` loads an exported model
    (local directory, hub id or ``s3://``); otherwise the architecture below is built."""
    kind: Literal["unet2d"] = "unet2d"
    pretrained_teacher_model: Optional[str] = None
    prediction_type: Prediction = Prediction.eps
    sample_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    block_out_channels: list[int] = [32, 64, 64]
    attention_levels: list[bool] = [False, False, True]
    layers_per_block: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _levels(self) -> "ModelSection":
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        return self


class DataSection(Section):
    dataset: Literal["fashion_mnist"] = "fashion_mnist"
    root: Optional[str] = None  # IDX directory; None = Debian's location
    train_shards_path_or_url: Optional[str] = None  # WebDataset shards (brace expansion)
    split: Literal["train", "test"] = "train"
    batch_size: int = Field(64, ge=1)  # per worker


class TrainSection(Section):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    max_steps: int = Field(1000, ge=1)
    # Wall-clock budget of one invocation in minutes (0: none): the loop stops at the first
    # logged step past it and exports as at max_steps; a resume continues towards max_steps.
    max_minutes: float = Field(0.0, ge=0)
    lr: float = Field(5e-4, gt=0)
    lr_warmup_steps: int = Field(100, ge=0)
    lr_min_ratio: float = Field(1.0, gt=0, le=1)  # cosine decay to lr*ratio (1.0 = constant)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = True  # decay ramps as min(decay, (1+n)/(10+n))
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    # In-loop quality evaluation every N steps (0: off) when the runner passes an evaluator
    # (the Tune trials do: FID/KID and class accuracy on a small fixed sample set).
    eval_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    resume_from_checkpoint: Optional[str] = None  # a checkpoint path or "latest"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_failures: int = Field(0, ge=-1)
    # Distributed training (hyperscale/train/engines.py): one DeepSpeed engine per trainable
    # role, or plain torch data parallel (no ZeRO). zero_stage defaults to 2 with DeepSpeed, 0
    # with torch. An update runs over gradient_accumulation_steps micro-batches of data.batch_size.
    engine: Literal["deepspeed", "torch"] = "deepspeed"
    zero_stage: Literal[0, 1, 2, 3] = 2
    gradient_accumulation_steps: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if data.get("zero_stage") is None:
                data["zero_stage"] = 0 if data.get("engine") == "torch" else 2
            if data.get("mixed_precision") is False:  # YAML reads a bare `no` as false
                data["mixed_precision"] = "no"
        return data

    @model_validator(mode="after")
    def _engine(self) -> "TrainSection":
        if self.engine == "torch" and self.zero_stage != 0:
            raise ValueError(f"train.zero_stage={self.zero_stage} needs train.engine=deepspeed "
                             f"(plain torch is data parallel without ZeRO: train.zero_stage=0)")
        return self


class RoleOptim(Section):
    """Optimiser settings of one kind of trained role; unset fields inherit (critic from
    generator, generator from ``train``)."""
    lr: Optional[float] = Field(None, gt=0)
    adam_beta1: Optional[float] = Field(None, ge=0, lt=1)
    adam_beta2: Optional[float] = Field(None, ge=0, lt=1)
    adam_epsilon: Optional[float] = Field(None, gt=0)
    weight_decay: Optional[float] = Field(None, ge=0)
    max_grad_norm: Optional[float] = Field(None, gt=0)


class OptimSection(Section):
    """Per-role optimiser settings: ``generator`` (the exported model) and ``critic`` (the fake
    score or the discriminator head). DMD2 and SiD train the two at different learning rates."""
    generator: RoleOptim = RoleOptim()
    critic: RoleOptim = RoleOptim()


class MethodSection(Section):
    """Base of every method's section; ``name`` selects the method in the registry."""
    name: str


class Config(Section):
    run: RunSection = RunSection()
    schedule: ScheduleSection = ScheduleSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    # SerializeAsAny: dumps keep the concrete method's fields, not just the base's ``name``.
    method: SerializeAsAny[MethodSection] = Field(default_factory=lambda: _method_section({"name": "denoising"}))

    @model_validator(mode="before")
    @classmethod
    def _resolve_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict):
            data = dict(data)
            data["method"] = _method_section(data["method"])
        return data


def role_train(cfg: Config, kind: Literal["generator", "critic"]) -> TrainSection:
    """``cfg.train`` with the optimiser settings of a role kind applied (critic <- generator <- train)."""
    chain = [cfg.optim.generator] + ([cfg.optim.critic] if kind == "critic" else [])
    update = {k: v for o in chain for k, v in o.model_dump(exclude_none=True).items()}
    return cfg.train.model_copy(update=update)


def _method_section(raw: dict) -> MethodSection:
    from hyperscale.methods.registry import method_config_class  # methods register their sections

    return method_config_class(raw.get("name", "denoising")).model_validate(raw)


# ---------------------------------------------------------------- loading

def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, _, raw = item.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = copy.deepcopy(tree)
    for item in overrides:
        path, value = parse_override(item)
        set_path(tree, path, value, f"override '{item}'")
    return tree


def set_path(tree: dict, path: list[str], value: Any, what: str) -> dict:
    """``tree`` with the key at ``path`` set to ``value``; sections on the way are created."""
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: '{part}' is not a section")
    node[path[-1]] = value
    return tree


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def format_errors(err: ValidationError, root: type[BaseModel] = Config, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = prefix + (".".join(str(p) for p in e["loc"]) or "<root>")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys here: {', '.join(_allowed_keys(root, e['loc']))}"
        lines.append(f"  {key}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden"
                     else f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def _validate(tree: dict) -> Config:
    """Validate the method section on its own first, so its errors name ``method.<key>``."""
    tree = dict(tree)
    raw = tree.get("method") or {"name": "denoising"}
    if isinstance(raw, dict):
        from hyperscale.methods.registry import method_config_class

        cls = method_config_class(raw.get("name", "denoising"))
        try:
            tree["method"] = cls.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(format_errors(err, root=cls, prefix="method.")) from None
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None


def read_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file whose top level is a mapping (empty file: {}), or a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree = read_mapping(path) if path is not None else {}
    return _validate(apply_overrides(tree, overrides or []))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def from_dict(tree: dict) -> Config:
    return _validate(tree)
