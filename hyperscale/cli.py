"""The command line shared by every job: ``--config PRESET [key=value ...] [--dry-run]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hyperscale.config import Config, ConfigError, load_config, to_yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"


def parse(description: str, default_preset: str, argv: list[str] | None = None,
          extra: callable = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description,
                                epilog="Overrides are dotted keys, e.g. train.max_steps=200 train.lr=1e-4")
    p.add_argument("--config", default=str(CONFIG_DIR / default_preset),
                   help=f"YAML preset (default: jobs/configs/{default_preset})")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    if extra:
        extra(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # flags may follow overrides
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg, args


def no_ray_flag(p: argparse.ArgumentParser) -> None:
    """``--no-ray`` of the training jobs (``parse(..., extra=no_ray_flag)``): see launch.run_in_process."""
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process without Ray (one worker: train.num_workers=1; cuda with train.use_gpu)")
