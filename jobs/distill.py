"""Distill the teacher into a generator (default: SIM, 1 step, data-free, on the shipped
Fashion-MNIST teacher) through Ray Train.

    python jobs/distill.py [--config jobs/configs/sim.yaml] [key=value ...]
    ray job submit -- python jobs/distill.py --config jobs/configs/sim.yaml

Started plainly it runs an embedded local Ray; under ``ray job submit`` it joins the
cluster. Outputs in ``run.output_dir``: export/ (1-step generator, safetensors + JSON),
samples.png, metrics.json, config.yaml, checkpoints/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.cli import parse  # noqa: E402
from hyperscale.train.launch import run_training  # noqa: E402

if __name__ == "__main__":
    cfg, _ = parse(__doc__, "sim.yaml")
    metrics = run_training(cfg)
    print(f"[hyperscale] done: step {metrics.get('step')}, outputs in {cfg.run.output_dir}")
