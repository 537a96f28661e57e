"""Sweep presets: a distill preset to start from, fixed overrides, and a search space of
config overrides, validated before any trial starts.

    name: sweep-sim
    base: sim.yaml                      # a distill preset (relative to this file)
    overrides: [train.max_steps=240]    # for every trial
    search:                             # dotted config keys -> one distribution each
      method.distance: {choice: [l2, pseudo_huber, normalized]}
      method.huber_c: {loguniform: [0.003, 0.3]}
      train.lr: {grid: [0.00003, 0.0001]}
    points_to_evaluate: [{method.distance: pseudo_huber, method.huber_c: 0.01}]
    num_samples: 8                      # draws (x the grid's size)
    metric: eval/fid
    mode: min
    scheduler: {name: asha, grace_period: 40, reduction_factor: 2}
    eval: {every: 40, num_samples: 500}
    trial: {cpus: 1, gpus: 0}
    max_concurrent_trials: 2

Distributions: ``choice`` (a list), ``grid`` (a list; every value, crossed with the other
grids), ``uniform`` / ``loguniform`` ([low, high]), ``randint`` ([low, high), integers).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from hyperscale.config import (Config, ConfigError, Section, apply_overrides, format_errors, from_dict,
                               read_mapping, set_path)

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SchedulerSection(Section):
    name: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs to the end (random/grid search)
    grace_period: int = Field(40, ge=1)  # training steps before a trial can be stopped
    reduction_factor: float = Field(2.0, gt=1)


class EvalSection(Section):
    every: int = Field(40, ge=1)  # steps between quality evaluations (the reports ASHA sees)
    num_samples: int = Field(500, ge=10)
    seed: int = 0
    reference_limit: Optional[int] = None  # None: the full 10k test set


class TrialSection(Section):
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)


class SweepConfig(Section):
    name: str = "sweep"
    base: str  # a distill preset, relative to the sweep file
    overrides: list[str] = []
    search: dict[str, dict[str, Any]]
    points_to_evaluate: list[dict[str, Any]] = []
    num_samples: int = Field(1, ge=1)
    metric: str = "eval/fid"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSection = SchedulerSection()
    eval: EvalSection = EvalSection()
    trial: TrialSection = TrialSection()
    max_concurrent_trials: int = Field(2, ge=1)
    output_dir: str = "runs/sweep"
    seed: int = 0

    @field_validator("search")
    @classmethod
    def _distributions(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("search: give at least one dotted config key to search over")
        for key, dist in v.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
                raise ValueError(f"search.{key}: expected one of {{{', '.join(KINDS)}}} with its values, "
                                 f"e.g. {{choice: [a, b]}}; got {dist!r}")
            kind, values = next(iter(dist.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"search.{key}.{kind}: expected a non-empty list, got {values!r}")
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not values[0] < values[1]:
                    raise ValueError(f"search.{key}.{kind}: expected [low, high] with low < high, got {values!r}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"search.{key}.loguniform: bounds must be > 0, got {values!r}")
        return v

    @model_validator(mode="after")
    def _points(self) -> "SweepConfig":
        for i, point in enumerate(self.points_to_evaluate):
            unknown = set(point) - set(self.search)
            if unknown:
                raise ValueError(f"points_to_evaluate[{i}]: keys {sorted(unknown)} are not in search")
        return self


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, Path]:
    """The sweep preset (with dotted overrides of its own keys, e.g. ``num_samples=4``) and the
    absolute path of its base distill preset."""
    from pydantic import ValidationError

    path = Path(path)
    tree = read_mapping(path, "sweep")
    try:
        sweep = SweepConfig.model_validate(apply_overrides(tree, overrides or []))
    except ValidationError as err:
        raise ConfigError(f"{path}: " + format_errors(err, root=SweepConfig)) from None
    base = (path.parent / sweep.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base preset not found: {base}")
    return sweep, base


def set_key(tree: dict, dotted: str, value: Any) -> dict:
    """``tree`` with the dotted key set to ``value`` (typed, unlike a ``key=value`` string)."""
    return set_path(tree, dotted.split("."), value, f"search key '{dotted}'")


def trial_config(base_tree: dict, params: dict[str, Any]) -> Config:
    """The distill config of one trial: the base tree (base preset + fixed overrides) with the
    trial's sampled values set."""
    import copy

    tree = copy.deepcopy(base_tree)
    for key, value in params.items():
        set_key(tree, key, value)
    return from_dict(tree)


def base_tree(sweep: SweepConfig, base: Path) -> dict:
    tree = read_mapping(base)
    return apply_overrides(tree, sweep.overrides)


def check_space(sweep: SweepConfig, tree: dict) -> None:
    """Fail before any trial starts when a search value cannot make a valid config: every listed
    value and both bounds of every range, one key at a time, and every point to evaluate."""
    for key, dist in sweep.search.items():
        kind, values = next(iter(dist.items()))
        probes = values if kind in ("choice", "grid") else [values[0], values[1] - (kind == "randint")]
        for value in probes:
            try:
                trial_config(tree, {key: value})
            except ConfigError as err:
                raise ConfigError(f"search.{key} = {value!r} makes an invalid config:\n{err}") from None
    for point in sweep.points_to_evaluate:
        trial_config(tree, point)


def grid_size(sweep: SweepConfig) -> int:
    """Configurations per draw: the product of the grids' sizes (1 without grids)."""
    return math.prod(len(v) for d in sweep.search.values() for k, v in d.items() if k == "grid")


def param_space(sweep: SweepConfig) -> dict:
    """The Tune search space: ``{"params": {dotted key: tune domain}}``."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {"params": {key: make[kind](values) for key, d in sweep.search.items() for kind, values in d.items()}}
