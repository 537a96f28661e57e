"""Average a run's generator over its checkpoints into a new export (hyperscale/train/averaging.py).

    python jobs/average_checkpoints.py --run runs/fmnist-t2i/sim --out runs/fmnist-t2i/sim-avg [--decay 0.998] [--from-step 2400]

Without ``--decay``: the uniform mean of the raw weights of every complete checkpoint after
``--from-step``; with it: an EMA of them, started from the first one's EMA. The export is built on
the run's ``export/ema`` (same sampler and metadata) and written atomically.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.train.averaging import average_run  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the run directory (holds checkpoints/ and export/)")
    ap.add_argument("--out", type=Path, required=True, help="where to write the averaged export")
    ap.add_argument("--decay", type=float, default=None, help="EMA decay per step (default: uniform mean)")
    ap.add_argument("--from-step", type=int, default=-1, help="use checkpoints after this step only")
    args = ap.parse_args()
    how = average_run(args.run, args.out, args.decay, args.from_step)
    print(f"[hyperscale] averaged {len(how['steps'])} checkpoints (steps {how['steps'][0]}..{how['steps'][-1]}, "
          f"{how['kind']}{'' if args.decay is None else f' {args.decay}'}) into {args.out}")
