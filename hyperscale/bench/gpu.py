"""The GPU training benchmark of docs/benchmarks.md §11: the real training steps of SIM, DMD and
TSCD on SD 1.5- and SDXL-shaped networks with random weights, per performance variant.

A row is one (shape, method, variant): the method's roles are built by the trainer's own
``build_roles`` from a random-weight teacher of the shape (``bench.gpu_shapes``), the trainable
roles by the trainer's ``engines.build_role`` (plain torch engine, AdamW, one process), and a step
is the training loop's body: ``two_player_step`` (k critic updates, one generator update, the
generator's EMA) followed by the EMA-target updates. Per row:

- ``step_ms``: median wall time of ``timed_steps`` steps after ``warmup_steps`` (CUDA synchronised);
  ``samples_per_s``: generator samples per second (batch / step time, the trainer's figure);
- ``flops_per_step``: ``torch.utils.flop_counter`` over one whole step (every forward and backward
  the method runs), counted once per (shape, method, batch) on an eager step without activation
  recomputation and reused by every variant: model FLOPs, so a checkpointed row's recomputation
  is not credited; ``tflops_per_s`` and ``mfu`` against the datasheet peak the row names
  (``device_peak``; null on CPU);
- ``roles``: per role its parameters and the bytes of its parameters, gradients and optimizer state
  read from the tensors, and on CUDA ``peak_bytes``: ``torch.cuda.max_memory_allocated`` over that
  role's updates (everything resident while its losses, forwards of the frozen roles included, and
  its backward and optimizer step run).

Variants that cannot run on the device are recorded with ``status: skipped`` and the reason;
an out-of-memory row is recorded as ``oom``, any other error as ``failed`` with its message.
"""
from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hyperscale.bench.gpu_shapes import SHAPES, Shape, build_denoiser, random_cond, shape_named
from hyperscale.storage.records import write_record

METHODS = ("sim", "dmd", "tscd")


@dataclass(frozen=True)
class Variant:
    """One performance setting of a row. attention: ``classic`` (diffusers' ``AttnProcessor``: the
    attention matrix materialised), ``sdpa`` (``AttnProcessor2_0``: ``scaled_dot_product_attention``,
    PyTorch picks the kernel) or ``flash`` (SDPA restricted to the FlashAttention backend)."""
    name: str
    about: str
    autocast: bool = False  # bf16 autocast over each role update (the trainer's Role.precision)
    frozen_bf16: bool = False  # the frozen teacher's parameters stored in bf16 (the trainer's mixed_precision=bf16)
    attention: str = "classic"
    channels_last: bool = False
    compile: str | None = None  # torch.compile mode of every role's network
    checkpointing: bool = False  # activation checkpointing on the trained networks, as model.gradient_checkpointing
    cuda_only: str | None = None  # why the variant cannot run on a CPU
    small_only: bool = False  # only for the small shapes (not sdxl)

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast else "fp32"


_FAST = dict(autocast=True, frozen_bf16=True, attention="sdpa")
VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("fp32", "fp32 eager, classic attention"),
    Variant("bf16-autocast", "bf16 autocast on every role update; teacher weights fp32", autocast=True),
    Variant("bf16-frozen", "bf16 autocast and the frozen teacher's weights in bf16 (train.mixed_precision=bf16); "
            "frozen roles never get parameter gradients", autocast=True, frozen_bf16=True),
    Variant("sdpa", "bf16-frozen with scaled_dot_product_attention (PyTorch's kernel choice)", **_FAST),
    Variant("flash", "bf16-frozen with SDPA restricted to the FlashAttention backend",
            **_FAST | dict(attention="flash"),
            cuda_only="FlashAttention is a CUDA kernel; on CPU SDPA already runs its one fused CPU kernel "
                      "in the sdpa row"),
    Variant("channels-last", "sdpa with the networks and latents in channels_last memory format",
            **_FAST, channels_last=True),
    Variant("grad-ckpt", "sdpa with activation checkpointing on the trained networks", **_FAST, checkpointing=True),
    Variant("compile", "sdpa with torch.compile (default mode) on every role's network", **_FAST, compile="default",
            cuda_only="torch.compile on CPU builds every role's forward and backward graphs as C++ with the host "
                      "compiler: longer than the rows it would time (the tiny shape's first SIM row did not finish "
                      "in 15 min on a loaded 2-core machine); the variant is measured on CUDA"),
    Variant("reduce-overhead", "sdpa with torch.compile(mode='reduce-overhead'): CUDA graphs against launch overhead",
            **_FAST, compile="reduce-overhead", small_only=True,
            cuda_only="CUDA graphs need a CUDA device"),
]}

# Datasheet peaks, dense (half the with-sparsity figure), TFLOP/s. fp32 rows are measured against the
# TF32 tensor-core peak: PyTorch's default runs cuDNN convolutions (most of a UNet's FLOPs) in TF32
# (torch.backends.cudnn.allow_tf32 = True), matmuls in full fp32 (both flags are in the record).
PEAKS: list[tuple[str, str, dict[str, float]]] = [  # (name fragment, datasheet, {precision: TFLOP/s})
    ("H200", "NVIDIA H200 SXM (same tensor cores as H100 SXM)", {"bf16": 989.0, "fp32": 494.0}),
    ("H100 PCIe", "NVIDIA H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100 NVL", "NVIDIA H100 NVL", {"bf16": 835.0, "fp32": 417.0}),
    ("H100", "NVIDIA H100 SXM5", {"bf16": 989.0, "fp32": 494.0}),
    ("A100", "NVIDIA A100 (SXM4 / PCIe)", {"bf16": 312.0, "fp32": 156.0}),
]
_PEAK_UNIT = {"bf16": "bf16 dense tensor core", "fp32": "TF32 dense tensor core"}


def device_peak(device: torch.device, precision: str) -> tuple[str, float] | None:
    """(name, TFLOP/s) of the device's datasheet peak for ``precision`` ("bf16"/"fp32"); None on CPU or
    for an unlisted GPU (its row's mfu stays null)."""
    if device.type != "cuda":
        return None
    gpu = torch.cuda.get_device_name(device)
    for fragment, sheet, peaks in PEAKS:
        if fragment in gpu:
            return f"{sheet}, {_PEAK_UNIT[precision]}", peaks[precision]
    return None


@dataclass
class GpuSettings:
    shapes: list[str] = field(default_factory=lambda: ["sd15"] if torch.cuda.is_available() else ["tiny", "tiny-xl"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    batch_size: int | None = None  # None: the shape's default
    warmup_steps: int = 2  # untimed steps first (FLOP counting, compilation, allocator warm-up)
    timed_steps: int = 5
    seed: int = 0
    budget_minutes: float = 0.0  # rows not started within this many minutes are recorded as skipped (0: none)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 1  # torch threads on CPU (the CPU rows check the suite; they are no CPU benchmark)

    def __post_init__(self):
        for name in self.shapes:
            shape_named(name)
        bad = [m for m in self.methods if m not in METHODS] + [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown methods or variants {bad}; methods: {', '.join(METHODS)}; "
                             f"variants: {', '.join(VARIANTS)}")
        if self.warmup_steps < 1 or self.timed_steps < 1:
            raise ValueError("warmup_steps and timed_steps must be at least 1")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` runs (forwards and backwards), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


@dataclass
class Bench:
    """One row's live objects: the method, its trainable ``Role``s, frozen roles, EMA and trackers."""
    method: object
    roles: dict
    frozen: dict[str, nn.Module]
    ema: object
    trackers: dict
    counters: object
    batches: Callable
    specs: dict
    device: torch.device
    variant: Variant
    memory: dict[str, dict] = field(default_factory=dict)
    measuring: bool = False

    def step(self) -> None:
        """The training loop's body (train/loop.py ``run``): one two-player step, then the EMA targets."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from hyperscale.train.step import two_player_step

        flash = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if self.variant.attention == "flash" else nullcontext()
        with flash:
            self.method.set_global_step(self.counters.step)
            two_player_step(self.method, self.batches, self.roles, self.frozen, self.ema, self.counters)
            for tracker, source in self.trackers.values():
                with self.roles[source].full_params() as full:
                    tracker.update(full)

    def meter(self) -> None:
        """Wrap each role's ``apply`` (the end of its update) to read its gradient and optimizer bytes,
        and on CUDA the peak allocation since the previous role's update ended."""
        for name, role in self.roles.items():
            def apply(ok, role=role, inner=role.apply, rec=self.memory.setdefault(name, {})):
                grads = tensor_bytes(p.grad for p in role.params)
                out = inner(ok)
                if self.measuring:
                    rec["grad_bytes"] = max(rec.get("grad_bytes", 0), grads)
                    rec["optim_bytes"] = optimizer_bytes(role.optimizer)
                    if self.device.type == "cuda":
                        rec["peak_bytes"] = max(rec.get("peak_bytes", 0), torch.cuda.max_memory_allocated(self.device))
                        torch.cuda.reset_peak_memory_stats(self.device)
                return out
            role.apply = apply

    def role_table(self) -> dict[str, dict]:
        out = {}
        for name, role in self.roles.items():
            out[name] = {"kind": self.specs[name].kind, "params": sum(p.numel() for p in role.params),
                         "param_bytes": tensor_bytes(role.module.parameters()), "grad_bytes": 0, "optim_bytes": 0,
                         "peak_bytes": None} | self.memory.get(name, {})
        for name, module in self.frozen.items():
            out[name] = {"kind": "frozen", "init": self.specs[name].init,
                         "params": sum(p.numel() for p in module.parameters()),
                         "param_bytes": tensor_bytes(module.parameters())}
        out["generator_ema"] = {"kind": "ema", "params": sum(p.numel() for p in self.ema.model.parameters()),
                                "param_bytes": tensor_bytes(self.ema.model.parameters())}
        return out


def _set_attention(denoiser: nn.Module, attention: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    denoiser.net.set_attn_processor(AttnProcessor() if attention == "classic" else AttnProcessor2_0())


def build_bench(shape: Shape, method_name: str, variant: Variant, batch: int, seed: int, device: torch.device) -> Bench:
    """A method's roles as the trainer builds them (``build_roles``, ``engines.build_role``), from a
    random-weight teacher of ``shape``, set up per ``variant``."""
    from hyperscale.config.schema import TrainSection
    from hyperscale.methods import build_method, method_config_class
    from hyperscale.methods.base import Batch
    from hyperscale.methods.roles import build_roles
    from hyperscale.models.ema import EMA
    from hyperscale.models.families import family_of
    from hyperscale.train import engines
    from hyperscale.train.step import StepCounters

    torch.manual_seed(seed)
    method = build_method(method_config_class(method_name)())
    teacher = build_denoiser(shape, device)
    _set_attention(teacher, variant.attention)
    if variant.channels_last:
        teacher.net.to(memory_format=torch.channels_last)

    def prepare(_name: str, module: nn.Module) -> nn.Module:  # as the trainer's build_modules
        if variant.checkpointing:
            family_of(module).backbone(module).enable_gradient_checkpointing()
        return module

    def no_fresh():
        raise ValueError(f"{method_name}: the benchmark builds every role from the teacher")

    built = build_roles(method, teacher=lambda: teacher, fresh=no_fresh, rewards=lambda _specs: None, prepare=prepare)
    for name, spec in built.specs.items():
        if spec.init == "teacher" and variant.frozen_bf16:
            engines.cast_parameters_(built.frozen[name], torch.bfloat16)
    ema = EMA(built.trainable[method.generator], 0.999, True)
    t = TrainSection(engine="torch", zero_stage=0, mixed_precision="bf16" if variant.autocast else "no",
                     lr=1e-6, lr_warmup_steps=0, num_workers=1)
    roles = {n: engines.build_role(n, m, t, batch, 1, device) for n, m in built.trainable.items()}
    if variant.compile:
        for module in list(built.trainable.values()) + list(built.frozen.values()):
            family_of(module).backbone(module).compile(mode=variant.compile)
    g = torch.Generator().manual_seed(seed + 1)
    cond = random_cond(shape, batch, device, g)
    x0 = torch.randn((batch, *shape.latent), generator=g).to(device) if method.batch == "data" else None
    if x0 is not None and variant.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    bench = Bench(method, roles, built.frozen, ema, built.trackers, StepCounters(), lambda: Batch(cond=cond, x0=x0),
                  built.specs, device, variant)
    bench.meter()
    return bench


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def countable(variant: Variant, device: torch.device) -> bool:
    """Whether a step of ``variant`` counts model FLOPs exactly: eager, no recomputation, and attention
    whose kernels the counter knows (CPU's fused SDPA kernel is not registered in flop_counter)."""
    return not variant.compile and not variant.checkpointing and (variant.attention == "classic" or device.type == "cuda")


def measure(shape: Shape, method_name: str, variant: Variant, s: GpuSettings, device: torch.device,
            flops: dict) -> dict:
    """One row's figures (module docstring); ``flops``: counts by (shape, method, batch), filled here."""
    batch = s.batch_size or shape.batch_size
    key = (shape.name, method_name, batch)
    if key not in flops and not countable(variant, device):  # count on the nearest countable variant first
        other = VARIANTS["sdpa" if device.type == "cuda" else "fp32"]
        try:
            b = build_bench(shape, method_name, other, batch, s.seed, device)
            flops[key] = (count_flops(b.step), other.name)
        except torch.OutOfMemoryError:  # the row itself may still fit (activation checkpointing)
            flops[key] = (None, f"not counted: the {other.name} step it is counted on ran out of memory")
        b = None
        _free(device, False)
    t0 = time.perf_counter()
    bench = build_bench(shape, method_name, variant, batch, s.seed, device)
    setup_s = time.perf_counter() - t0
    times = []
    try:
        for i in range(s.warmup_steps + s.timed_steps):
            timed = i >= s.warmup_steps
            bench.measuring = timed
            _sync(device)
            if device.type == "cuda" and timed:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            if i == 0 and key not in flops:
                flops[key] = (count_flops(bench.step), variant.name)
            else:
                bench.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        roles = bench.role_table()
        updates = {bench.method.critic: bench.method.critic_steps()} if bench.method.critic else {}
        updates[bench.method.generator] = 1
    finally:
        del bench
        _free(device, variant.compile is not None)
    step_s = statistics.median(times[s.warmup_steps:])
    n_flops, counted_in = flops[key]
    peak = device_peak(device, variant.precision)
    tflops = n_flops / step_s / 1e12 if n_flops is not None else None
    return {"status": "ok", "batch": batch, "warmup_steps": s.warmup_steps, "timed_steps": s.timed_steps,
            "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min(times[s.warmup_steps:]),
            "step_ms_max": 1e3 * max(times[s.warmup_steps:]), "first_step_s": times[0], "setup_s": setup_s,
            "samples_per_s": batch / step_s, "flops_per_step": n_flops, "flops_counted_in": counted_in,
            "tflops_per_s": tflops, "peak": peak[0] if peak else None, "peak_tflops": peak[1] if peak else None,
            "mfu": tflops / peak[1] if peak and tflops is not None else None, "updates_per_step": updates,
            "memory_kind": ("cuda max_memory_allocated per role update window; tensor bytes of params, grads, "
                            "optimizer state" if device.type == "cuda" else
                            "tensor bytes of params, grads (at the end of backward), optimizer state; no peak on CPU"),
            "roles": roles}


def not_applicable(variant: Variant, shape: Shape, device: torch.device) -> str | None:
    if variant.cuda_only and device.type != "cuda":
        return variant.cuda_only
    if variant.small_only and shape.family == "sdxl" and shape.name == "sdxl":
        return ("CUDA graphs target kernel-launch overhead, which the small models suffer; SDXL's kernels are "
                "long and its graph memory pools would cost memory the row lacks")
    return None


def run_row(shape: Shape, method_name: str, variant: Variant, s: GpuSettings, device: torch.device,
            flops: dict) -> dict:
    row = {"shape": shape.name, "method": method_name, "variant": variant.name, "precision": variant.precision}
    reason = not_applicable(variant, shape, device)
    if reason:
        return row | {"status": "skipped", "reason": reason}
    error = None
    try:
        return row | measure(shape, method_name, variant, s, device, flops)
    except torch.OutOfMemoryError as e:
        error = ("oom", str(e).splitlines()[0][:300])
    except Exception as e:  # a variant that fails (a compile error, an unsupported kernel) is a finding, not a stop
        error = ("failed", f"{type(e).__name__}: {str(e)[:500]}")
    _free(device, variant.compile is not None)
    return row | {"status": error[0], "reason": error[1], "batch": s.batch_size or shape.batch_size}


def suite_settings(s: GpuSettings, device: torch.device) -> dict:
    import diffusers

    from hyperscale.methods import method_config_class

    shapes = {}
    for name in s.shapes:
        shape = shape_named(name)
        with torch.device("meta"):
            from diffusers import UNet2DConditionModel
            params = sum(p.numel() for p in UNet2DConditionModel(**shape.unet).parameters())
        shapes[name] = shape.describe() | {"unet_params": params}
    out = asdict(s) | {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "shape_specs": shapes, "variant_specs": {n: asdict(v) for n, v in VARIANTS.items() if n in s.variants},
        "method_configs": {m: method_config_class(m)().model_dump(mode="json") for m in s.methods},
        "peaks_tflops": {frag: {"datasheet": sheet, **peaks} for frag, sheet, peaks in PEAKS},
        "optimizer": "AdamW lr 1e-6 (train.engine=torch, one process), generator EMA 0.999",
        "conditions": "random text states (and SDXL pooled + time ids), random latents for data methods",
    }
    return out


def run_gpu_suite(out_dir: str | Path, s: GpuSettings, command: str | None = None, log=print) -> Path:
    """Every requested (shape, method, variant) row; the record ``<out_dir>/gpu.json`` is rewritten after
    each row, so a run cut short keeps the rows it finished."""
    device = torch.device(s.device)
    if device.type == "cpu":
        torch.set_num_threads(s.threads)
    settings = suite_settings(s, device)
    rows: list[dict] = []
    flops: dict = {}
    t_start = time.perf_counter()
    path = None
    for shape_name in s.shapes:
        for method_name in s.methods:
            for vname in s.variants:
                shape, variant = SHAPES[shape_name], VARIANTS[vname]
                spent = (time.perf_counter() - t_start) / 60
                if s.budget_minutes and spent > s.budget_minutes:
                    row = {"shape": shape.name, "method": method_name, "variant": vname, "precision": variant.precision,
                           "status": "skipped", "reason": f"the run's budget of {s.budget_minutes:g} min was spent"}
                else:
                    row = run_row(shape, method_name, variant, s, device, flops)
                rows.append(row)
                log(_line(row))
                path = write_record(out_dir, "gpu", settings, rows, command)
    return path


def _line(r: dict) -> str:
    head = f"[gpu] {r['shape']:>7} {r['method']:>4} {r['variant']:>15}"
    if r["status"] != "ok":
        return f"{head}  {r['status']}: {r.get('reason', '')}"
    mfu = "" if r["mfu"] is None else f"  MFU {100 * r['mfu']:.1f}%"
    mib = {n: v.get("peak_bytes") for n, v in r["roles"].items() if v.get("peak_bytes")}
    mem = ("  peak MiB " + " ".join(f"{n}={b / 2 ** 20:.0f}" for n, b in mib.items())) if mib else ""
    rate = ("  FLOPs not counted" if r["flops_per_step"] is None else
            f"  {r['flops_per_step'] / 1e9:10.3f} GFLOP/step  {r['tflops_per_s'] * 1e3:9.3f} GFLOP/s")
    return (f"{head}  batch {r['batch']}  {r['step_ms']:9.1f} ms/step  {r['samples_per_s']:8.2f} samples/s"
            f"{rate}{mfu}{mem}")
