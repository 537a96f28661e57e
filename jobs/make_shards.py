"""Write Fashion-MNIST as training data: class-label shards, caption shards or a prompt file.

    python jobs/make_shards.py --split train --out DIR [--maxcount N] [--root IDX_DIR]
    python jobs/make_shards.py --kind captions --out DIR [--channels 1|3] [--split ...] [--precompute PIPELINE]
                               [--captions class|varied] [--repeat N] [--seed S]
    python jobs/make_shards.py --kind prompts --out DIR [--format txt|jsonl|parquet]
                               [--all-templates | --template "a sketch of a {c}" ... | --captions varied]

labels (the default): WebDataset shards with each image's class label (``shard_dataset``).
captions: LAION-style caption shards (``caption_shard_dataset``): the images padded with
black to 32x32, grayscale or RGB, captioned "a photo of a {class name}" or, with ``--captions
varied``, in varied words (hyperscale/data/fmnist_captions.py; ``--repeat`` passes, new captions each).
Both print the shards' brace pattern (e.g. ``DIR/train-{000000..000059}.tar``), which is
what the data config's shard URL takes. ``--precompute PIPELINE`` (a pipeline folder, hub id,
``s3://`` or ``tiny:<family>``) also stores each sample's VAE latents and text embeddings, which
the trainer then uses instead of running the VAE and text encoders.
prompts: the class prompts for data-free text-to-image methods (``prompt_stream``) in
``DIR/prompts.{format}``, one per class and template; prints the file's path. It needs no
dataset.
"""
import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.data.captions import write_caption_shards  # noqa: E402
from hyperscale.data.fashion_mnist import (PROMPT_TEMPLATES, ImageSet, caption_samples,  # noqa: E402
                                           class_prompts, load_fashion_mnist)
from hyperscale.data.fmnist_captions import all_prompts, captioner  # noqa: E402
from hyperscale.data.prompts import write_prompts  # noqa: E402
from hyperscale.data.shards import shard_pattern, write_shards  # noqa: E402


def make_captions(args: argparse.Namespace, encode: Callable | None = None) -> list[Path]:
    """Caption shards of the split, with precomputed latents / text embeddings when ``encode``
    (``encode(images, captions) -> (latents, text_dict)`` per batch, see
    ``hyperscale.data.captions.precompute``) or ``--precompute PIPELINE`` is given."""
    if encode is None and getattr(args, "precompute", None):
        from hyperscale.models.build import load_denoiser
        from hyperscale.models.families.text2image import shard_encoder

        encode = shard_encoder(load_denoiser(args.precompute), text=not getattr(args, "latents_only", False))
    images = load_fashion_mnist(args.split, root=args.root)
    if getattr(args, "limit", 0):
        images = ImageSet(images.images[:args.limit], images.labels[:args.limit])
    caption_fn = captioner(seed=getattr(args, "seed", 0)) if getattr(args, "captions", "class") == "varied" else None
    samples = caption_samples(images, channels=args.channels, caption_fn=caption_fn, repeat=getattr(args, "repeat", 1))
    return write_caption_shards(samples, args.out,
                                prefix=args.split, maxcount=args.maxcount, encode=encode)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("labels", "captions", "prompts"), default="labels",
                    help="class-label shards (default), caption shards, or a prompt file")
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--out", required=True, help="directory for the shards or the prompt file "
                    "(created if missing)")
    ap.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    ap.add_argument("--root", default=None, help="directory with the IDX files "
                    "(default: HYPERSCALE_FMNIST_ROOT or /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--channels", type=int, choices=(1, 3), default=3,
                    help="captions: grayscale (1) or RGB (3) images")
    ap.add_argument("--captions", choices=("class", "varied"), default="class",
                    help="captions: the class prompt 'a photo of a {class}' (default) or varied captions "
                    "(synonyms, the item's shade, the training templates of hyperscale/data/fmnist_captions.py); "
                    "prompts: varied writes every caption those templates make")
    ap.add_argument("--repeat", type=int, default=1, help="captions: passes over the split (new captions each pass)")
    ap.add_argument("--seed", type=int, default=0, help="captions: the varied captions' seed")
    ap.add_argument("--limit", type=int, default=0, help="captions: only the split's first N images (0: all)")
    ap.add_argument("--precompute", default=None, metavar="PIPELINE",
                    help="captions: also store VAE latents and text embeddings from this text-to-image "
                    "pipeline (folder, hub id, s3:// or tiny:<family>)")
    ap.add_argument("--latents-only", action="store_true",
                    help="captions with --precompute: store the VAE latents only, not the text embeddings "
                    "(few distinct captions are cheap to encode, and cached, while training)")
    ap.add_argument("--format", choices=("txt", "jsonl", "parquet"), default="txt",
                    help="prompts: the file format")
    templates = ap.add_mutually_exclusive_group()
    templates.add_argument("--template", action="append", default=None,
                           help="prompts: a template with {c} for the class name (repeatable; "
                           f"default {PROMPT_TEMPLATES[0]!r})")
    templates.add_argument("--all-templates", action="store_true",
                           help=f"prompts: the built-in templates {list(PROMPT_TEMPLATES)}")
    args = ap.parse_args(argv)

    if args.kind == "prompts":
        chosen = PROMPT_TEMPLATES if args.all_templates else args.template or PROMPT_TEMPLATES[:1]
        prompts = all_prompts() if args.captions == "varied" else class_prompts(chosen)
        path = write_prompts(prompts, Path(args.out) / f"prompts.{args.format}")
        print(f"[hyperscale] wrote {len(prompts)} prompts", file=sys.stderr)
        print(path)
        return
    if args.kind == "captions":
        paths = make_captions(args)
    else:
        images = load_fashion_mnist(args.split, root=args.root)
        paths = write_shards(images, args.out, prefix=args.split, maxcount=args.maxcount)
    kind = "class-label" if args.kind == "labels" else "caption"
    print(f"[hyperscale] wrote {len(paths)} {kind} shards of the {args.split} split", file=sys.stderr)
    print(shard_pattern(paths))


if __name__ == "__main__":
    main()
