"""Distill the teacher into a generator (default: SIM, 1 step, data-free, on the shipped
Fashion-MNIST teacher) through Ray Train.

    python jobs/distill.py [--config jobs/configs/sim.yaml] [key=value ...]
    ray job submit -- python jobs/distill.py --config jobs/configs/sim.yaml
    # a multi-phase pipeline (a file with phases:, e.g. Hyper-SD: TSCD -> feedback -> DMD)
    python jobs/distill.py --config jobs/configs/hypersd.yaml [phases.tscd.train.max_steps=100 ...]
    # one worker in this process, no Ray (a single GPU, a debugger)
    python jobs/distill.py --no-ray --config jobs/configs/sim-gpu.yaml

Started plainly it runs an embedded local Ray; under ``ray job submit`` it joins the
cluster. Outputs in ``run.output_dir``: export/ (1-step generator, safetensors + JSON),
samples.png, metrics.json, config.yaml, checkpoints/; a pipeline writes one such directory
per phase and unified/ (see hyperscale/pipeline/run.py).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.cli import no_ray_flag, parse  # noqa: E402
from hyperscale.train.console import interruptible, training_resume_hint  # noqa: E402
from hyperscale.train.launch import run_in_process, run_training  # noqa: E402
from hyperscale.pipeline.run import config_argument, is_pipeline_file, main as run_pipeline_cli  # noqa: E402

if __name__ == "__main__":
    path = config_argument(sys.argv[1:])
    if path is not None and is_pipeline_file(path):
        if "--no-ray" in sys.argv[1:]:
            raise SystemExit(f"error: --no-ray runs one config, not a pipeline ({path})")
        with interruptible("run the same command again to continue: finished phases are skipped, "
                           "the unfinished one resumes from its latest checkpoint"):
            summary = run_pipeline_cli(__doc__, sys.argv[1:])
        if summary is not None:
            print(f"[hyperscale] done: {len(summary['phases'])} phases, unified export in "
                  f"{summary['output_dir']}/unified")
        raise SystemExit(0)
    cfg, args = parse(__doc__, "sim.yaml", extra=no_ray_flag)
    with interruptible(training_resume_hint(cfg)):
        metrics = (run_in_process if args.no_ray else run_training)(cfg)
    print(f"[hyperscale] done: step {metrics.get('step')}, outputs in {cfg.run.output_dir}")
