"""Train the class-conditional Fashion-MNIST teacher through the project's trainer.

    python jobs/pretrain_teacher.py [--config jobs/configs/teacher.yaml] [key=value ...]

Resumable: add ``train.resume_from_checkpoint=latest``. ``--no-ray``: one worker in this process
(a single GPU with ``train.use_gpu=true train.num_workers=1 train.engine=torch``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.cli import no_ray_flag, parse  # noqa: E402
from hyperscale.train.console import interruptible, training_resume_hint  # noqa: E402
from hyperscale.train.launch import run_in_process, run_training  # noqa: E402

if __name__ == "__main__":
    cfg, args = parse(__doc__, "teacher.yaml", extra=no_ray_flag)
    with interruptible(training_resume_hint(cfg)):
        metrics = (run_in_process if args.no_ray else run_training)(cfg)
    print(f"[hyperscale] done: step {metrics.get('step')}, export in {cfg.run.output_dir}/export")
