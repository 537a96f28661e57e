"""Per-GPU memory plans of the real-checkpoint presets (docs/benchmarks.md §8):
``python jobs/bench.py --suite memory-plan`` -> docs/bench/memory-plan.json.

A plan is computed, not measured: the roles come from the method's own declaration through the
trainer's builder (``methods.roles.build_roles``: teacher copies, LoRA students, EMA targets),
built on the ``meta`` device from the published configs of each checkpoint's components
(``PUBLISHED``; nothing is downloaded), and every role's bytes per rank follow from its
parameter tensors and how the trainer holds them (docs/benchmarks.md §8):

- trainable roles (generator, critic): one DeepSpeed engine each. DeepSpeed casts the whole
  module to bf16/fp16 under ``train.mixed_precision``; the optimizer steps an fp32 master copy
  (a separate tensor at ZeRO >= 1, and at ZeRO-0 with mixed precision); AdamW holds two fp32
  moments and a 4-byte step per stepped tensor. ZeRO-1/2 flatten the trained tensors into one
  buffer padded to a multiple of 2N elements and give each rank 1/N of the master, moments and
  gradients (a rank also keeps the whole gradient of a tensor that straddles its partition's
  edge); ZeRO-3 partitions every parameter, frozen ones included, ceil(numel / N) per rank.
- frozen roles: the teacher in the low-precision dtype; EMA copies (the generator's EMA, TSCD's
  target) in fp32, as copied before the engines; never partitioned.
- the frontend (text encoders and VAE): once per process, low precision.

``check`` compares a plan with the rows ``hyperscale.bench.memory`` measures on local ranks.
Activations are not part of a plan (their peak depends on kernels, attention backend and
checkpointing): ``activations`` in the record says so.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hyperscale.bench.gpu_shapes import SD_SCHEDULER, SHAPES

LOW_BYTES = {"no": None, "bf16": 2, "fp16": 2}
FIELDS = ("param_bytes", "master_bytes", "grad_bytes", "optim_bytes")
SCALARS = 8  # bytes of 0-d fp32 tensors DeepSpeed keeps among its gradient buffers (measured: 4 at ZeRO-1/2, 8 at 3)

# ---------------------------------------------------------------- published component configs
# The hub checkpoints' config.json values (architecture keys only; weights are never read).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, tie_word_embeddings=False)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FLOW_VAE = SD_VAE | dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)  # SD3's and FLUX.1's
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}  # schedules hold no parameters

PUBLISHED: dict[str, dict] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": dict(
        family="sd15", backbone=("UNet2DConditionModel", SHAPES["sd15"].unet), scheduler=SD_SCHEDULER,
        frontend={"text_encoder": ("CLIPTextModel", CLIP_L), "vae": ("AutoencoderKL", SD_VAE)}),
    "stabilityai/stable-diffusion-xl-base-1.0": dict(
        family="sdxl", backbone=("UNet2DConditionModel", SHAPES["sdxl"].unet), scheduler=SD_SCHEDULER,
        frontend={"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
                  "vae": ("AutoencoderKL", SD_VAE)}),
    "PixArt-alpha/PixArt-XL-2-512x512": dict(
        family="pixart", scheduler=SD_SCHEDULER | {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        backbone=("PixArtTransformer2DModel", dict(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, sample_size=64, patch_size=2, norm_type="ada_norm_single", caption_channels=4096,
            activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000,
            norm_elementwise_affine=False, norm_eps=1e-6)),
        frontend={"text_encoder": ("T5EncoderModel", T5_XXL), "vae": ("AutoencoderKL", SD_VAE)}),
    "stabilityai/stable-diffusion-3-medium-diffusers": dict(
        family="sd3", scheduler=FLOW_SCHEDULER,
        backbone=("SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=192)),
        frontend={"text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
                  "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
                  "text_encoder_3": ("T5EncoderModel", T5_XXL), "vae": ("AutoencoderKL", FLOW_VAE)}),
    "black-forest-labs/FLUX.1-dev": dict(
        family="flux", scheduler=FLOW_SCHEDULER,
        backbone=("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))),
        frontend={"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL),
                  "vae": ("AutoencoderKL", FLOW_VAE)}),
}


def _component(cls_name: str, config: dict) -> nn.Module:
    import diffusers
    import transformers

    if hasattr(diffusers, cls_name) and not hasattr(transformers, cls_name):
        return getattr(diffusers, cls_name)(**config)
    cls = getattr(transformers, cls_name)
    return cls(getattr(transformers, cls.config_class.__name__)(**config))


def published_teacher(source: str) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The teacher denoiser and frontend components of a published checkpoint, on ``meta``."""
    from hyperscale.models.families import family_named
    from hyperscale.models.families.text2image import Frontend, T2IDenoiser, quiet_libraries

    if source not in PUBLISHED:
        raise ValueError(f"no published config for {source!r} (known: {', '.join(PUBLISHED)}); add its components' "
                         f"config.json values to hyperscale/bench/memory_plan.py PUBLISHED")
    quiet_libraries()
    spec = PUBLISHED[source]
    family = family_named(spec["family"])
    with torch.device("meta"):
        net = _component(*spec["backbone"])
        frontend = {name: _component(*c) for name, c in spec["frontend"].items()}
    size = 128  # the latent side: it sizes no parameter (schedules and the frontend are never run here)
    teacher = T2IDenoiser(family, family.schedule_of(spec["scheduler"], net, size), family.prediction_of(spec["scheduler"]),
                          net, Frontend(family, Path(source), size))
    return teacher, frontend


# ---------------------------------------------------------------- bytes per rank
@dataclass
class Tensors:
    """A role's parameter tensors: numel, trained or not, and their element size as built."""
    numels: list[int]
    trained: list[bool]
    itemsize: int

    @classmethod
    def of(cls, module: nn.Module, trained: list[nn.Parameter] | None = None) -> "Tensors":
        ids = {id(p) for p in trained or []}
        params = list(module.parameters())
        return cls([p.numel() for p in params], [id(p) in ids for p in params],
                   params[0].element_size() if params else 4)

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def trainable(self) -> list[int]:
        return [n for n, t in zip(self.numels, self.trained) if t]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def straddle(numels: list[int], world: int, rank: int) -> int:
    """Elements of the gradients a ZeRO-1/2 rank keeps outside its partition: the rest of every
    tensor that crosses an edge of the rank's 1/N of the flat buffer (2N-element aligned)."""
    part = _ceil(sum(numels), 2 * world) * 2
    lo, hi, start, extra = rank * part, (rank + 1) * part, 0, 0
    for n in numels:
        end = start + n
        if (start < lo < end) or (start < hi < end):
            extra += n - (min(end, hi) - max(start, lo))
        start = end
    return extra


def engine_bytes(t: Tensors, stage: int, world: int, low: int | None, rank: int = 0) -> dict[str, int]:
    """Bytes of one trainable role on ``rank`` (module docstring): parameters as held, the fp32
    master copy the optimizer steps, gradients between backward and step, AdamW state."""
    held = low or t.itemsize
    trained = t.trainable
    frozen = t.total - sum(trained)
    if stage == 0:
        master = 4 * sum(trained) if low else 0
        return {"param_bytes": held * t.total, "master_bytes": master, "grad_bytes": held * sum(trained),
                "optim_bytes": 8 * sum(trained) + 4 * len(trained)}
    if stage in (1, 2):
        flat = _ceil(sum(trained), 2 * world) * 2 * world
        part = flat // world
        return {"param_bytes": held * (frozen + flat), "master_bytes": 4 * part,
                "grad_bytes": held * (part + straddle(trained, world, rank)) + SCALARS // 2,
                "optim_bytes": 8 * part + 4}
    if stage == 3:
        shards = sum(_ceil(n, world) for n in trained)
        return {"param_bytes": held * sum(_ceil(n, world) for n in t.numels), "master_bytes": 4 * shards,
                "grad_bytes": held * shards + SCALARS, "optim_bytes": 8 * shards + 4}
    raise ValueError(f"train.zero_stage={stage}: ZeRO stages are 0-3")


def _no_rewards(specs):
    raise ValueError(f"reward roles ({specs}) are not planned: their models come from model hubs; plan the "
                     f"preset without method.rewards")


def plan_roles(cfg, teacher: nn.Module, frontend: dict[str, nn.Module], world: int, stage: int,
               ranks: list[int] | None = None) -> list[dict]:
    """Rows of bytes per role for ``cfg`` (one run or phase) on ``world`` ranks at ZeRO ``stage``:
    trainable roles per rank of ``ranks`` (default: every rank), frozen roles, the generator's EMA
    and each frontend component once. ``teacher`` (on any device, ``meta`` included) is used up."""
    from hyperscale.methods import build_method
    from hyperscale.methods.roles import build_roles
    from hyperscale.train.step import trainable_parameters

    low = LOW_BYTES[cfg.train.mixed_precision]
    section = cfg.method
    if getattr(section, "init_student", None):  # a later phase: the same student, as configured, from the teacher
        section = section.model_copy(update={"init_student": None})
    method = build_method(section)
    device = next(teacher.parameters()).device
    with torch.device(device):  # LoRA layers on the teacher's device (meta: no memory)
        built = build_roles(method, teacher=lambda: teacher, fresh=lambda: copy.deepcopy(teacher), rewards=_no_rewards)
    rows = []
    for name, module in built.trainable.items():
        t = Tensors.of(module, trainable_parameters(module))
        for rank in ranks if ranks is not None else range(world):
            rows.append({"role": name, "kind": built.specs[name].kind, "rank": rank, "numel": t.total,
                         "trainable_numel": sum(t.trainable)} | engine_bytes(t, stage, world, low, rank))
    held = {n: (m, low if built.specs[n].init == "teacher" else None) for n, m in built.frozen.items()}
    held["ema"] = (built.trainable[method.generator], None)  # the loop's EMA: an fp32 copy of the generator
    held |= {f"frontend/{n}": (m, low) for n, m in frontend.items()}
    for name, (module, cast) in held.items():
        t = Tensors.of(module)
        kind = "ema" if name == "ema" else "frontend" if name.startswith("frontend/") else "frozen"
        rows.append({"role": name, "kind": kind, "rank": None, "numel": t.total, "trainable_numel": 0,
                     "param_bytes": (cast or t.itemsize) * t.total, "master_bytes": 0, "grad_bytes": 0,
                     "optim_bytes": 0})
    return rows


def check(plan: list[dict], measured: list[dict], rel: float = 0.0) -> list[str]:
    """Differences between a plan's rows and measured rows (``hyperscale.bench.memory.probe``) of
    the same roles, stage and ranks beyond ``rel`` of the measured bytes (default: byte-exact);
    empty when they agree."""
    by_role = {(r["role"], r["rank"]): r for r in plan}
    problems = []
    for m in measured:
        p = by_role.get((m["role"], m["rank"])) or by_role.get((m["role"], None))  # trained roles per rank
        if p is None:
            problems.append(f"ZeRO-{m['zero_stage']} rank {m['rank']} {m['role']}: measured but not in the plan")
            continue
        for f in FIELDS:
            if abs(p[f] - m[f]) > rel * max(m[f], 1):
                problems.append(f"ZeRO-{m['zero_stage']} rank {m['rank']} {m['role']} {f}: plan {p[f]:,} "
                                f"measured {m[f]:,}")
    missing = {(r["role"]) for r in plan} - {m["role"] for m in measured}
    problems += [f"{role}: in the plan but not measured" for role in sorted(missing)]
    return problems


# ---------------------------------------------------------------- presets
PRESETS = ("sd15-sim", "sd15-hypersd", "sdxl-dmd", "sdxl-hypersd", "pixart-sim", "sd3-hypersd", "flux-hypersd")
GB = 1e9


def plan_preset(name: str, runs: list[tuple[str, object]], worlds: list[int], stages: list[int]) -> list[dict]:
    """Plan rows of every run of a real-checkpoint preset (``runs``: (phase, config) pairs,
    ``hyperscale.pipeline.run.preset_runs``) for each world size and ZeRO stage (trainable roles:
    the rank with the most bytes; see ``plan_roles``)."""
    rows = []
    for phase, cfg in runs:
        for world in worlds:
            for stage in stages:
                teacher, frontend = published_teacher(cfg.model.pretrained_teacher_model)
                roles = plan_roles(cfg.model_copy(deep=True), teacher, frontend, world, stage)
                worst = {}
                for r in roles:  # per role: the rank holding the most
                    key = r["role"]
                    total = sum(r[f] for f in FIELDS)
                    if key not in worst or total > sum(worst[key][f] for f in FIELDS):
                        worst[key] = r
                for r in worst.values():
                    rows.append({"preset": name, "phase": phase, "workers": world, "zero_stage": stage,
                                 "mixed_precision": cfg.train.mixed_precision,
                                 "student": getattr(cfg.method, "student", "full"), "method": cfg.method.name}
                                | r | {"total_bytes": sum(r[f] for f in FIELDS)})
    return rows


def totals(rows: list[dict]) -> dict[tuple, int]:
    """Bytes per GPU of each (preset, phase, workers, stage): every role's total, summed."""
    out: dict[tuple, int] = {}
    for r in rows:
        key = (r["preset"], r["phase"], r["workers"], r["zero_stage"])
        out[key] = out.get(key, 0) + r["total_bytes"]
    return out


def markdown(rows: list[dict], preset: str, world: int) -> str:
    """The docs/families table of one preset at ``world`` GPUs: GB per GPU by role, ZeRO-2 and 3."""
    runs = sorted({(r["phase"], r["zero_stage"]) for r in rows if r["preset"] == preset and r["workers"] == world},
                  key=lambda k: (k[0] != "tscd", k))
    head = [f"{phase + ', ' if phase else ''}ZeRO-{stage}" for phase, stage in runs]
    roles = list(dict.fromkeys(r["role"] for r in rows if r["preset"] == preset))
    lines = ["| role (GB per GPU: weights + fp32 master + grads + AdamW) | " + " | ".join(head) + " |",
             "|---" * (len(head) + 1) + "|"]

    def cell(role: str, phase: str, stage: int) -> str:
        r = next((r for r in rows if (r["preset"], r["phase"], r["workers"], r["zero_stage"], r["role"])
                  == (preset, phase, world, stage, role)), None)
        if r is None:
            return "—"
        parts = [f"{r[f] / GB:.2f}" for f in FIELDS]
        return f"{r['total_bytes'] / GB:.2f}" if r["kind"] not in ("generator", "critic") else \
            f"**{r['total_bytes'] / GB:.2f}** ({' + '.join(parts)})"
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(cell(role, p, s) for p, s in runs) + " |")
    sums = totals(rows)
    lines.append("| **total** | " + " | ".join(f"**{sums[(preset, p, world, s)] / GB:.1f}**" for p, s in runs) + " |")
    return "\n".join(lines)


def run_memory_plan(out_dir: str | Path, runs: dict[str, list[tuple[str, object]]], worlds: list[int] | None = None,
                    stages: list[int] | None = None, command: str | None = None) -> Path:
    """docs/bench/memory-plan.json: plan rows of presets (``runs``: preset name -> its (phase, config)
    pairs, ``hyperscale.pipeline.run.preset_runs``), with the tables printed."""
    from hyperscale.storage.records import write_record

    worlds, stages = list(worlds or [8]), list(stages or [2, 3])
    rows = []
    for name, preset in runs.items():
        rows += plan_preset(name, preset, worlds, stages)
        for world in worlds:
            print(f"\n{name}, {world} GPUs\n{markdown(rows, name, world)}", flush=True)
    settings = {"presets": list(runs), "workers": worlds, "stages": stages, "sources": sorted(PUBLISHED),
                "computed": "bytes per GPU from parameter counts of meta-built networks (hyperscale/bench/memory_plan.py)",
                "activations": "not planned: measured per role on a GPU by the gpu suite (peak_bytes, §11)",
                "gb": "1e9 bytes"}
    return write_record(out_dir, "memory-plan", settings, rows, command)
