"""Benchmarks (docs/benchmarks.md §2, §6).

    # quality: real-data floor, teacher DDIM rows, one 1-step row per student, one run
    python jobs/bench.py --suite quality --student sim-pseudo-huber=runs/sim/export/ema \\
        --student sim-l2=runs/sim-l2/export/ema
    # multi-step students: PATH@STEPS[:tcd|:tcd=ETA|:ddim] gives one row per step count (TCD by
    # default, gamma --eta; ddim = DDIM trailing), e.g. the Hyper-SD unified LoRA and its baselines
    python jobs/bench.py --suite quality --carry-from docs/bench/quality.json --out runs/bench-hypersd \\
        --student hypersd-unified=runs/hypersd/unified@1,2,4,8 \\
        --student hypersd-tscd=runs/hypersd/tscd/export/ema@1,2,4,8:ddim \\
        --student cd-baseline=runs/cd/export/ema@1,2,4,8:ddim
    # a bare diffusers LoRA folder (pytorch_lora_weights.safetensors) is applied to --teacher and merged
    python jobs/bench.py --suite quality --teacher assets/fmnist-t2i/teacher --guidance-scale 1.5 \
        --student hypersd-unified=assets/fmnist-t2i/hypersd-lora@1,2,4,8
    # speed: 1-step students vs the teacher at 25 and 50 steps, same batch, same process
    python jobs/bench.py --suite speed --student sim-pseudo-huber=runs/sim/export/ema
    # memory (docs/benchmarks.md §8): per-rank bytes under ZeRO 0-3 (2 local ranks), samples/s with 1 and 2 Ray
    # workers, checkpoint save/resume times -> docs/bench/memory.json
    python jobs/bench.py --suite memory
    # memory-plan (docs/benchmarks.md §8): computed bytes per GPU and role of every real-checkpoint preset
    # (published configs, meta device, nothing downloaded) -> docs/bench/memory-plan.json, tables printed
    python jobs/bench.py --suite memory-plan [--presets sd15-sim,flux-hypersd] [--gpus 8,16]
    # reliability (docs/benchmarks.md §9): worker SIGKILL, S3 outage, NaN loss, SIGTERM/SIGINT to the driver,
    # a truncated checkpoint, a Serve replica killed under load, a worker node of a two-node `ray start`
    # cluster lost mid-run (run it as root inside `unshare -n`: scripts/test.sh) -> docs/bench/reliability.json
    # (--scenarios a,b: only those; the other rows stay)
    python jobs/bench.py --suite reliability [--scenarios sigterm_driver,truncated_checkpoint]
    # denoise: eps- and x0-MSE on test images per timestep, the teacher and other denoisers
    python jobs/bench.py --suite denoise --student teacher-ft=runs/teacher-ft/export/ema --out runs/denoise
    # gpu (docs/benchmarks.md §11): SIM, DMD and TSCD training steps on SD1.5 / SDXL-shaped random networks per
    # variant (fp32 ... torch.compile): samples/s, TFLOP/s, MFU, memory per role -> docs/bench/gpu.json
    python jobs/bench.py --suite gpu --shape sd15            # on a CUDA machine (sdxl: an H200-class GPU)
    python jobs/bench.py --suite gpu --shape tiny,tiny-xl    # the tiny shapes, on CPU
"""
import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hyperscale.bench.quality import QualitySettings, StudentSpec, parse_students, run_quality  # noqa: E402
from hyperscale.bench.denoise import DenoiseSettings, run_denoise  # noqa: E402
from hyperscale.bench.speed import SpeedSettings, run_speed  # noqa: E402


def parse_pair(p: argparse.ArgumentParser, flag: str, value: str | None) -> tuple[float, float] | None:
    """'LO,HI' as two floats (None stays None); a malformed value is a usage error naming the flag."""
    if value is None:
        return None
    try:
        lo, hi = (float(x) for x in value.split(","))
    except ValueError:
        p.error(f"{flag} takes two numbers LO,HI (e.g. 0,5), got {value!r}")
    return lo, hi


if __name__ == "__main__":
    d, sd, dd = QualitySettings(), SpeedSettings(), DenoiseSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["quality", "speed", "memory", "memory-plan", "reliability", "denoise", "gpu"], default="quality")
    p.add_argument("--teacher", default=str(ROOT / "assets" / "teacher"), help="teacher export (dir, hub id)")
    p.add_argument("--student", action="append", default=[], metavar="NAME=PATH[@STEPS[:SAMPLER]]",
                   help="an exported 1-step generator to add as a row, or any student export with step counts "
                        "and a sampler (tcd, tcd=ETA, ddim) for one row per count; a bare LoRA folder with step "
                        "counts is applied to --teacher (repeatable)")
    p.add_argument("--eta", type=float, default=d.student_eta,
                   help="quality: TCD gamma for multi-step students without their own")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    p.add_argument("--carry-from", default=None, metavar="QUALITY_JSON",
                   help="quality: reuse the real-data and teacher rows of an earlier record with equal settings")
    p.add_argument("--fid-samples", type=int, default=d.fid_samples, help="quality: samples per row")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"sampling batch (quality default {d.batch_size}, speed default {sd.batch_size})")
    p.add_argument("--steps", default=None, help="teacher DDIM step counts, comma separated "
                   f"(quality default {d.teacher_steps}, speed default {sd.teacher_steps})")
    p.add_argument("--repeats", type=int, default=sd.repeats, help="speed: timed batches per teacher row")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    p.add_argument("--guidance-sigma", default=None, metavar="LO,HI",
                   help="quality: the teacher's CFG only at VE noise levels sigma~ in (LO, HI] (a guidance "
                        "interval, as SIM's method.teacher_guidance_sigma); default every level")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default=d.spacing)
    p.add_argument("--no-clip-x0", action="store_true",
                   help="quality: teacher DDIM keeps its x0 unclipped (the teacher's own ODE, the distribution "
                        "SIM and DMD match)")
    p.add_argument("--use-clipped-model-output", action="store_true",
                   help="quality: teacher DDIM re-derives eps from the clipped x0 (diffusers' flag)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timesteps", default=None, help="denoise: timesteps, comma separated "
                   f"(default {dd.timesteps})")
    p.add_argument("--num-images", type=int, default=dd.num_images, help="denoise: test images")
    p.add_argument("--work", default=None, help="memory/reliability: scratch directory for the runs")
    p.add_argument("--scenarios", default=None,
                   help="reliability: comma-separated scenarios to run (default all: worker_sigkill, s3_outage, "
                        "nan_loss, sigterm_driver, sigint_driver, truncated_checkpoint, serve_replica_killed, "
                        "worker_node_preempted); "
                        "the record's other rows stay")
    m = p.add_argument_group("memory-plan suite (docs/benchmarks.md §8)")
    m.add_argument("--presets", default=None, help="real-checkpoint presets, comma separated (default: all)")
    m.add_argument("--gpus", default="8", help="GPU counts N, comma separated (default 8)")
    m.add_argument("--zero-stages", default="2,3", help="ZeRO stages, comma separated (default 2,3)")
    g = p.add_argument_group("gpu suite (docs/benchmarks.md §11)")
    g.add_argument("--shape", default=None, help="shapes, comma separated: sd15, sdxl, tiny, tiny-xl "
                   "(default: sd15 on CUDA, tiny,tiny-xl on CPU)")
    g.add_argument("--methods", default=None, help="comma separated (default: sim,dmd,tscd)")
    g.add_argument("--variants", default=None, help="comma separated (default: all, cheapest first)")
    g.add_argument("--warmup-steps", type=int, default=2)
    g.add_argument("--timed-steps", type=int, default=5)
    g.add_argument("--budget-minutes", type=float, default=0.0,
                   help="rows not started within this many minutes are recorded as skipped (0: no limit)")
    g.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default 1)")
    a = p.parse_args()
    command = "python jobs/bench.py " + shlex.join(sys.argv[1:])
    try:
        students = parse_students(a.student)
    except ValueError as e:
        p.error(str(e))
    steps = [int(x) for x in a.steps.split(",")] if a.steps else None
    if a.suite == "gpu":
        from hyperscale.bench.gpu import GpuSettings, run_gpu_suite

        lists = {name: [x for x in arg.split(",") if x] for name, arg in
                 (("shapes", a.shape), ("methods", a.methods), ("variants", a.variants)) if arg}
        try:
            s = GpuSettings(**lists, batch_size=a.batch_size, warmup_steps=a.warmup_steps, timed_steps=a.timed_steps,
                            seed=a.seed, budget_minutes=a.budget_minutes, **({"threads": a.threads} if a.threads else {}))
        except ValueError as e:
            p.error(str(e))
        print(f"[bench] wrote {run_gpu_suite(a.out, s, command=command)}")
        raise SystemExit(0)
    if a.suite == "memory-plan":
        from hyperscale.bench.memory_plan import PRESETS, run_memory_plan
        from hyperscale.pipeline.run import preset_runs

        names = a.presets.split(",") if a.presets else PRESETS
        unknown = [n for n in names if not (ROOT / "jobs" / "configs" / f"{n}.yaml").is_file()]
        if unknown:
            p.error(f"--presets {','.join(unknown)}: not in jobs/configs/ (real-checkpoint presets: {','.join(PRESETS)})")
        runs = {n: preset_runs(ROOT / "jobs" / "configs" / f"{n}.yaml") for n in names}
        ints = lambda arg: [int(x) for x in arg.split(",") if x]  # noqa: E731
        print(f"[bench] wrote {run_memory_plan(a.out, runs, ints(a.gpus), ints(a.zero_stages), command=command)}")
        raise SystemExit(0)
    if a.suite in ("memory", "reliability"):
        import tempfile

        from hyperscale.bench.memory import MemorySettings, run_memory_suite
        from hyperscale.bench.reliability import run_reliability_suite

        work = Path(a.work or tempfile.mkdtemp(prefix=f"hs-{a.suite}-"))
        path = (run_memory_suite(a.out, MemorySettings(teacher=a.teacher), command=command, work=work)
                if a.suite == "memory" else run_reliability_suite(
                    a.out, work, command=command, scenarios=a.scenarios.split(",") if a.scenarios else None))
        print(f"[bench] wrote {path}")
        raise SystemExit(0)
    if a.suite == "denoise":
        if any(StudentSpec.parse(v).steps is not None for v in students.values()):
            p.error("--suite denoise compares denoisers: give --student NAME=PATH without @STEPS")
        s = DenoiseSettings(num_images=a.num_images, seed=a.seed, batch_size=a.batch_size or 250,
                            timesteps=[int(x) for x in a.timesteps.split(",")] if a.timesteps
                            else dd.timesteps)
        path = run_denoise(a.teacher, students, a.out, s, command=command)
    elif a.suite == "quality":
        try:
            s = QualitySettings(fid_samples=a.fid_samples, batch_size=a.batch_size or d.batch_size, seed=a.seed,
                                teacher_steps=steps or d.teacher_steps, guidance_scale=a.guidance_scale,
                                guidance_sigma=parse_pair(p, "--guidance-sigma", a.guidance_sigma),
                                spacing=a.spacing, student_eta=a.eta,
                                clip_x0=not a.no_clip_x0, use_clipped_model_output=a.use_clipped_model_output)
        except ValueError as e:
            p.error(str(e))
        path = run_quality(a.teacher, a.out, s, command=command, students=students, carry_from=a.carry_from)
    else:
        if not students:
            p.error("--suite speed needs at least one --student NAME=PATH")
        if any(StudentSpec.parse(v).steps is not None for v in students.values()):
            p.error("--suite speed times 1-step generators: give --student NAME=PATH without @STEPS")
        s = SpeedSettings(batch_size=a.batch_size or sd.batch_size, teacher_steps=steps or sd.teacher_steps,
                          repeats=a.repeats, guidance_scale=a.guidance_scale, spacing=a.spacing, seed=a.seed)
        path = run_speed(a.teacher, students, a.out, s, command=command)
    print(f"[bench] wrote {path}")
