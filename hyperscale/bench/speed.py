"""The sampling-speed suite of docs/benchmarks.md §6: 1-step generators against the teacher.

Every row is timed in this one process, at one batch size, on the same inputs:
the teacher's guided DDIM at 25 and 50 steps and each 1-step generator. A row's
figure is the median samples/s over ``repeats`` timed batches after a warm-up
batch. The ideal speed-up of a 1-step generator over an N-step guided teacher is
2N (CFG doubles the teacher's batch); ``of_limit`` says how much of it is reached.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hyperscale.bench.quality import SampleFn, teacher_ddim, QualitySettings
from hyperscale.storage.records import write_record


@dataclass
class SpeedSettings:
    batch_size: int = 64
    teacher_steps: list[int] = field(default_factory=lambda: [25, 50])
    repeats: int = 3  # timed batches per teacher row (a 1-step row gets 10x more; it is cheap)
    guidance_scale: float = 1.3
    spacing: str = "trailing"
    seed: int = 0
    threads: int = field(default_factory=lambda: torch.get_num_threads())


def time_batches(fn: SampleFn, z: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Median samples/s over ``repeats`` calls after one untimed warm-up call."""
    rates = []
    with torch.no_grad():
        fn(z, y)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(z, y)
            rates.append(len(y) / (time.perf_counter() - t0))
    return statistics.median(rates)


def run_speed(teacher_dir: str, students: dict[str, str], out_dir: str, s: SpeedSettings,
              command: str | None = None, log=print) -> Path:
    from hyperscale.models.build import load_denoiser
    from hyperscale.models.generator import load_generator, sample_shape

    if not students:
        raise ValueError("the speed suite compares 1-step generators with the teacher: pass at least one "
                         "--student name=path")
    torch.set_num_threads(s.threads)
    teacher = load_denoiser(teacher_dir).eval()
    gens = {name: load_generator(path) for name, path in students.items()}
    g = torch.Generator().manual_seed(s.seed)
    y = torch.arange(s.batch_size) % 10
    z = torch.randn((s.batch_size, *sample_shape(teacher)), generator=g)
    q = QualitySettings(guidance_scale=s.guidance_scale, spacing=s.spacing)
    rows = []
    for steps in s.teacher_steps:
        sps = time_batches(teacher_ddim(teacher, steps, q), z, y, s.repeats)
        rows.append({"generator": "teacher-ddim", "steps": steps, "batch": s.batch_size, "samples_per_s": sps,
                     "network_calls_per_sample": steps * (2 if s.guidance_scale != 1.0 else 1)})
        log(f"[speed] {'teacher-ddim':>18} steps {steps:>3}  batch {s.batch_size}  samples/s {sps:9.2f}")
    for name, gen in gens.items():
        sps = time_batches(gen, z, y, 10 * s.repeats)
        row = {"generator": name, "steps": 1, "batch": s.batch_size, "samples_per_s": sps,
               "network_calls_per_sample": 1}
        for t in rows[:len(s.teacher_steps)]:
            speedup = sps / t["samples_per_s"]
            row[f"speedup_vs_teacher_{t['steps']}"] = speedup
            row[f"of_limit_vs_teacher_{t['steps']}"] = speedup / t["network_calls_per_sample"]
        rows.append(row)
        log(f"[speed] {name:>18} steps   1  batch {s.batch_size}  samples/s {sps:9.2f}  " + "  ".join(
            f"x{row[f'speedup_vs_teacher_{n}']:.1f} vs {n} steps ({row[f'of_limit_vs_teacher_{n}']:.2f} of limit)"
            for n in s.teacher_steps))
    return write_record(Path(out_dir), "speed", asdict(s), rows, command)
