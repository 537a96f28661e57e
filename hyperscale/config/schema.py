"""The config tree's sections: every component owns its section and receives only that.

Method sections live with their methods (``hyperscale.methods``); this module knows none of
them (``MethodSection`` is their base). Loading, overrides and the assembled tree:
``hyperscale.config.load``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from hyperscale.diffusion.schedule import Prediction


class ConfigError(ValueError):
    """A config problem, with the dotted key and the allowed values in the message."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class RunSection(Section):
    """What a run is called, where its outputs go and its seed."""
    name: str = "run"
    output_dir: str = "runs/run"  # a local directory or s3://bucket/prefix
    seed: int = 0


class ScheduleSection(Section):
    """The teacher's VP noise schedule (diffusion/schedule.py)."""
    kind: Literal["linear", "scaled_linear", "cosine"] = "linear"  # VP kinds; rectified flow comes with its families
    num_train_timesteps: int = Field(1000, ge=2)  # T, the training grid
    beta_start: float = Field(1e-4, gt=0, lt=1)  # DDPM's beta_1
    beta_end: float = Field(2e-2, gt=0, lt=1)  # DDPM's beta_T


class ModelSection(Section):
    """The denoiser: an exported teacher to load, or the architecture its family builds fresh."""
    family: str = "class_unet"  # the model family (hyperscale/models/families), checked when the config loads
    pretrained_teacher_model: Optional[str] = None  # an export (local directory, hub id or s3://); None: build fresh
    prediction_type: Prediction = Prediction.eps  # what the network predicts
    sample_size: int = 28  # image side in pixels
    in_channels: int = 1
    num_classes: int = 10  # class labels; the embedding gets one more row, the null label for CFG
    block_out_channels: list[int] = [32, 64, 64]  # UNet channels per resolution level
    attention_levels: list[bool] = [False, False, True]  # self-attention per level (one entry per level)
    layers_per_block: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    gradient_checkpointing: bool = False  # trained networks recompute activations in backward: less memory, more compute

    @model_validator(mode="before")
    @classmethod
    def _kind(cls, data: Any) -> Any:
        """``kind: unet2d`` (configs written before families had names) is ``family: class_unet``."""
        if isinstance(data, dict) and "kind" in data:
            data = dict(data)
            kind = data.pop("kind")
            if kind != "unet2d":
                raise ValueError(f"model.kind={kind!r} is not known; use model.family")
            data.setdefault("family", "class_unet")
        return data

    @model_validator(mode="after")
    def _levels(self) -> "ModelSection":
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        return self


class DataSection(Section):
    """Training data (data-free methods read only the conditions: class labels or prompts)."""
    dataset: Literal["fashion_mnist"] = "fashion_mnist"  # the in-memory set when no shards are given
    root: Optional[str] = None  # IDX directory; None = Debian's location
    train_shards_path_or_url: Optional[str] = None  # WebDataset shards (brace expansion): class-label or caption shards
    prompts: Optional[str] = None  # prompt file (.txt/.jsonl/.parquet, local or s3://) for data-free text-to-image runs; None: the Fashion-MNIST class prompts
    resolution: Optional[int] = Field(None, ge=8)  # image side for text-to-image data; None: the teacher's native size
    split: Literal["train", "test"] = "train"
    batch_size: int = Field(64, ge=1)  # per worker


class TrainSection(Section):
    """The trainer: workers, optimiser and schedule, EMA, checkpoints, engine (hyperscale/train)."""
    num_workers: int = Field(2, ge=1)  # Ray Train workers (data-parallel ranks)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    max_steps: int = Field(1000, ge=1)  # generator updates
    max_minutes: float = Field(0.0, ge=0)  # wall-clock budget per invocation (0: none); stops and exports, resumable
    lr: float = Field(5e-4, gt=0)
    lr_warmup_steps: int = Field(100, ge=0)  # linear warm-up updates
    lr_min_ratio: float = Field(1.0, gt=0, le=1)  # cosine decay to lr*ratio (1.0 = constant)
    adam_beta1: float = Field(0.9, ge=0, lt=1)  # AdamW's
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)  # gradient clipping
    ema_decay: float = Field(0.999, ge=0, lt=1)  # the generator's EMA (the "ema" export)
    ema_warmup: bool = True  # decay ramps as min(decay, (1+n)/(10+n))
    checkpoint_every: int = Field(500, ge=1)
    checkpoint_every_minutes: float = Field(0.0, ge=0)  # also checkpoint by the clock, at logged steps (0: off)
    # SIGTERM/SIGINT: checkpoint at the next step and stop; exit anyway after this long (spot notices: 30-120 s)
    preemption_grace_seconds: float = Field(25.0, gt=0)
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(0, ge=0)  # in-loop quality evaluation every N steps (0: off) when given an evaluator (Tune)
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept
    resume_from_checkpoint: Optional[str] = None  # a checkpoint path or "latest"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_failures: int = Field(0, ge=-1)  # Ray Train worker-failure restarts (-1: unlimited)
    engine: Literal["deepspeed", "torch"] = "deepspeed"  # one DeepSpeed engine per trainable role, or plain torch DDP
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed ZeRO stage; unset: 2 with deepspeed, 0 with torch (no ZeRO)
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches of data.batch_size per update

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
    """Per-role optimiser settings: ``generator`` (the exported model), ``critic`` (the fake score
    or the discriminator head) and ``discriminator`` (a critic role named so: TSCD's adversarial
    head). DMD2 and SiD train generator and critic at different learning rates."""
    generator: RoleOptim = RoleOptim()
    critic: RoleOptim = RoleOptim()
    discriminator: RoleOptim = RoleOptim()


class MethodSection(Section):
    """Base of every method's section; ``name`` selects the method in the methods table."""
    name: str


class Config(Section):
    run: RunSection = RunSection()
    schedule: ScheduleSection = ScheduleSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    # The loader (config/load.py) resolves the method's own section from the methods table;
    # SerializeAsAny: dumps keep the concrete method's fields, not just the base's ``name``.
    method: SerializeAsAny[MethodSection]


def role_train(cfg: Config, kind: Literal["generator", "critic", "discriminator"]) -> TrainSection:
    """``cfg.train`` with the optimiser settings of a role kind applied
    (discriminator <- critic <- generator <- train)."""
    chain = [cfg.optim.generator, cfg.optim.critic, cfg.optim.discriminator][:("generator", "critic",
                                                                            "discriminator").index(kind) + 1]
    update = {k: v for o in chain for k, v in o.model_dump(exclude_none=True).items()}
    return cfg.train.model_copy(update=update)
