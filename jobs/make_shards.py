"""Write a Fashion-MNIST split as WebDataset shards and print their brace pattern.

    python jobs/make_shards.py --split train --out DIR [--maxcount N] [--root IDX_DIR]

The printed pattern (e.g. ``DIR/train-{000000..000059}.tar``) is what the data
config's shard URL takes.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from hyperscale.data.shards import shard_pattern, write_shards  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--out", required=True, help="directory for the shards (created if missing)")
    ap.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    ap.add_argument("--root", default=None, help="directory with the IDX files "
                    "(default: HYPERSCALE_FMNIST_ROOT or /usr/share/datasets/fashion-mnist)")
    args = ap.parse_args()
    images = load_fashion_mnist(args.split, root=args.root)
    paths = write_shards(images, args.out, prefix=args.split, maxcount=args.maxcount)
    print(f"[hyperscale] wrote {len(images)} samples in {len(paths)} shards", file=sys.stderr)
    print(shard_pattern(paths))
