"""Train the class-conditional Fashion-MNIST teacher through the project's trainer.

    python jobs/pretrain_teacher.py [--config jobs/configs/teacher.yaml] [key=value ...]

Resumable: add ``train.resume_from_checkpoint=latest``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.cli import parse  # noqa: E402
from hyperscale.train.launch import run_training  # noqa: E402

if __name__ == "__main__":
    cfg, _ = parse(__doc__, "teacher.yaml")
    metrics = run_training(cfg)
    print(f"[hyperscale] done: step {metrics.get('step')}, export in {cfg.run.output_dir}/export")
