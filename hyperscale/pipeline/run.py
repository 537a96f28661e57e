"""Multi-phase distillation: Hyper-SD's TSCD 8 -> 4 -> 2 -> 1 -> human feedback -> score
distillation into one unified LoRA (docs/algorithms.md §2.2-2.5), as a list of ordinary distill runs.

A pipeline file is YAML with ``phases:`` (``jobs/distill.py`` detects it)::

    run: {name: hypersd, output_dir: runs/hypersd, seed: 0}
    chain: ema                  # which export of phase i starts phase i+1 (ema | raw)
    overrides: []               # dotted key=value for every phase
    phases:
      - {name: tscd, preset: hypersd-tscd.yaml, overrides: [train.max_steps=400]}
      - {name: feedback, preset: hypersd-feedback.yaml}

Each phase is a distill config: its ``preset`` (relative to the pipeline file, else the repo)
+ the pipeline's ``overrides`` + its own, then the keys the pipeline owns: ``run.output_dir =
<output_dir>/<phase>``, ``run.name``, ``run.seed``, ``train.resume_from_checkpoint = latest``
and, for every phase after the first, ``method.init_student = <previous phase>/export/<chain>``
(the student continues the same LoRA). Outputs::

    <output_dir>/<phase>/...      that phase's run (config.yaml, checkpoints/, export/{ema,raw})
    <output_dir>/<phase>/phase.json   written when the phase is done: timings, fingerprints
    <output_dir>/unified/         the last phase's export (merged weights + lora/) and
                                  pipeline.json (the phases with their wall / CPU minutes)

Re-running skips every phase already done (``phase.json`` and its export present) and resumes
an unfinished one from its latest checkpoint. A done phase whose config or whose starting
weights changed since is an error naming the directory to delete, never silently reused.

``chain: ema`` by default: the EMA export is what every phase evaluates, samples and serves,
so the next phase starts from the weights whose quality was measured; the averaging also
removes the last iterate's optimizer noise, which matters because each phase starts a fresh
optimizer on a different loss. ``raw`` chains the last iterate instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hyperscale.config import Config, ConfigError, format_errors, load_config, parse_override, read_mapping, to_yaml
from hyperscale.storage.local import REPO, absolute_local, atomic_dir, atomic_file
from hyperscale.models.build import EXPORT_META, EXPORT_WEIGHTS, set_sampler
from hyperscale.models.export import SamplerSpec
from hyperscale.models.lora import LORA_WEIGHTS, export_has_lora

PHASE_RECORD = "phase.json"
ATTEMPTS = "attempts.json"
UNIFIED = "unified"
PIPELINE_RECORD = "pipeline.json"
_OWNED = ("run.output_dir", "run.name", "train.resume_from_checkpoint")  # set by the pipeline only


class PipelineError(ValueError):
    """A pipeline file or run-directory problem, naming the file, phase or key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineRun(_Section):
    name: str = "pipeline"
    output_dir: str = "runs/pipeline"  # local: phase records and unified/ are written beside the runs
    seed: int = 0

    @field_validator("output_dir")
    @classmethod
    def _local(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"a pipeline's run.output_dir must be a local directory (got {v}); single runs "
                             f"(jobs/distill.py with a distill config) may write to s3://")
        return v


class Phase(_Section):
    name: str
    preset: str
    overrides: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _dir_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", v) or v == UNIFIED:
            raise ValueError(f"phase name {v!r} must be a plain directory name (letters, digits, _ -), "
                             f"not '{UNIFIED}'")
        return v


class Pipeline(_Section):
    run: PipelineRun = PipelineRun()
    chain: Literal["ema", "raw"] = "ema"
    overrides: list[str] = Field(default_factory=list)
    phases: list[Phase] = Field(min_length=1)
    source: Optional[str] = None  # the pipeline file (set by load_pipeline; presets resolve against it)

    @model_validator(mode="after")
    def _unique(self) -> "Pipeline":
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return self


# ---------------------------------------------------------------- loading

def is_pipeline_file(path: str | Path) -> bool:
    """Whether a YAML file is a pipeline (a top-level ``phases:``) rather than a distill config."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and "phases" in tree


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """The pipeline file plus command-line overrides: ``run.<key>=`` and ``chain=`` set the pipeline
    itself, ``phases.<name>.<key>=`` one phase's config, any other key every phase's config."""
    path = Path(path)
    try:
        tree = read_mapping(path, "pipeline")
    except ConfigError as e:
        raise PipelineError(str(e)) from None
    extra: dict[str, list[str]] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        if key[0] in ("run", "chain"):
            node = tree.setdefault("run", {}) if key[0] == "run" else tree
            if key[0] == "run" and len(key) != 2:
                raise PipelineError(f"override '{item}': the pipeline's run section has keys name, output_dir, seed")
            node[key[-1]] = value
        elif key[0] == "phases":
            if len(key) < 3:
                raise PipelineError(f"override '{item}': expected phases.<phase name>.<config key>=value")
            extra.setdefault(key[1], []).append(item.split(".", 2)[2])
        else:
            tree.setdefault("overrides", []).append(item)
    try:
        pipe = Pipeline.model_validate(tree | {"source": str(path.resolve())})
    except ValidationError as err:
        raise PipelineError(f"{path}: " + format_errors(err, root=Pipeline)) from None
    unknown = sorted(set(extra) - {p.name for p in pipe.phases})
    if unknown:
        raise PipelineError(f"overrides for unknown phases {unknown}; phases: {[p.name for p in pipe.phases]}")
    for p in pipe.phases:
        p.overrides = p.overrides + extra.get(p.name, [])
    return pipe


def _preset_path(pipe: Pipeline, phase: Phase) -> Path:
    base = Path(pipe.source).parent if pipe.source else Path.cwd()
    for root in (base, Path.cwd(), REPO):
        if (root / phase.preset).is_file():
            return (root / phase.preset).resolve()
    raise PipelineError(f"phase '{phase.name}': preset '{phase.preset}' not found next to the pipeline "
                        f"file ({base}), in the working directory or in the repo")


def output_dir(pipe: Pipeline) -> Path:
    return Path(pipe.run.output_dir).expanduser().resolve()


def export_of(pipe: Pipeline, phase: Phase) -> Path:
    """Where a phase's chained export lands (``<output_dir>/<phase>/export/<chain>``)."""
    return output_dir(pipe) / phase.name / "export" / pipe.chain


def phase_configs(pipe: Pipeline) -> list[Config]:
    """Every phase's resolved config (validated before anything runs; see the module docstring)."""
    out = output_dir(pipe)
    cfgs = []
    for i, phase in enumerate(pipe.phases):
        user = pipe.overrides + phase.overrides
        for item in user:
            key = ".".join(parse_override(item)[0])
            if key in _OWNED or (i > 0 and key == "method.init_student"):
                raise PipelineError(f"phase '{phase.name}': '{key}' is set by the pipeline (run.output_dir is "
                                    f"<pipeline output_dir>/<phase>; later phases start from the previous export)")
        owned = [f"run.output_dir={out / phase.name}", f"run.name={pipe.run.name}-{phase.name}",
                 "train.resume_from_checkpoint=latest"]
        if i > 0:
            owned.append(f"method.init_student={export_of(pipe, pipe.phases[i - 1])}")
        try:  # the pipeline's seed unless a phase sets its own
            cfgs.append(load_config(_preset_path(pipe, phase), [f"run.seed={pipe.run.seed}"] + user + owned))
        except ConfigError as e:
            if i > 0 and "method.init_student: unknown key" in str(e):
                raise PipelineError(f"phase '{phase.name}': its method cannot start from the previous phase's "
                                    f"export (no method.init_student)") from None
            raise PipelineError(f"phase '{phase.name}' ({phase.preset}): {e}") from None
    _check_chain(pipe, cfgs)
    return cfgs


def preset_runs(path: str | Path) -> list[tuple[str, Config]]:
    """(phase name, config) of every run a preset starts: one ("", config) for a distill preset, one
    per phase for a pipeline file (its memory plan: hyperscale/bench/memory_plan.py)."""
    if is_pipeline_file(path):
        pipe = load_pipeline(path)
        return [(phase.name, cfg) for phase, cfg in zip(pipe.phases, phase_configs(pipe))]
    return [("", load_config(path))]


def _check_chain(pipe: Pipeline, cfgs: list[Config]) -> None:
    """Consecutive phases must agree on the student: a LoRA continues only from a LoRA of the same
    shape, and on the same teacher."""
    for (a, ca), (b, cb) in zip(zip(pipe.phases, cfgs), zip(pipe.phases[1:], cfgs[1:])):
        if absolute_local(ca.model.pretrained_teacher_model) != absolute_local(cb.model.pretrained_teacher_model):
            raise PipelineError(f"phases '{a.name}' and '{b.name}' use different teachers "
                                f"({ca.model.pretrained_teacher_model} vs {cb.model.pretrained_teacher_model})")
        sa, sb = (getattr(c.method, "student", None) for c in (ca, cb))
        if sb == "lora" and sa != "lora":
            raise PipelineError(f"phase '{b.name}' trains a LoRA but '{a.name}' exports a full model: "
                                f"set method.student=lora in both, or full in '{b.name}'")
        if sb == "lora":
            keys = ("lora_rank", "lora_alpha", "lora_target_modules")
            diff = [k for k in keys if getattr(ca.method, k) != getattr(cb.method, k)]
            if diff:
                raise PipelineError(f"phases '{a.name}' and '{b.name}' continue one LoRA but differ in "
                                    f"method.{', method.'.join(diff)}")


# ---------------------------------------------------------------- measuring

class CpuMeter:
    """CPU seconds (user + system) of this process and all its descendants (an embedded Ray's
    raylet and workers) over a ``with`` block. Polled every ``interval`` s, so a process that
    exits in between counts up to its last poll; a remote cluster's workers are not seen."""

    def __init__(self, interval: float = 1.0):
        import psutil

        self.interval, self.proc = interval, psutil.Process()
        self.seen: dict[tuple[int, float], float] = {}
        self.cpu_s = 0.0
        self._stop = threading.Event()

    def _poll(self) -> dict[tuple[int, float], float]:
        import psutil

        out = {}
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.seen.update(self._poll())

    def __enter__(self) -> "CpuMeter":
        self.base = self._poll()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seen.update(self._poll())
        self.cpu_s = sum(v - self.base.get(k, 0.0) for k, v in self.seen.items())


@contextmanager
def measured(phase_dir: Path, reserved_cpus: float) -> Iterator[None]:
    """Append this attempt's wall / CPU minutes to ``<phase>/attempts.json``, also when it fails."""
    t0, ok, meter = time.time(), False, CpuMeter()
    try:
        with meter:
            yield
        ok = True
    finally:
        wall = (time.time() - t0) / 60
        attempts = _read_json(phase_dir / ATTEMPTS, [])
        attempts.append({"wall_min": wall, "cpu_min": meter.cpu_s / 60, "reserved_cpu_min": wall * reserved_cpus,
                         "finished": ok, "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _write_json(phase_dir / ATTEMPTS, attempts)


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=float))


def weights_sha256(export: Path) -> str:
    """sha256 of an export's weights (the LoRA file for a LoRA export): what a phase started from."""
    f = export / "lora" / LORA_WEIGHTS if export_has_lora(export) else export / EXPORT_WEIGHTS
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_sha256(cfg: Config) -> str:
    """Fingerprint of what a phase trains: the config without the keys the pipeline derives."""
    tree = cfg.model_dump(mode="json")
    for section, key in (("run", "output_dir"), ("run", "name"), ("train", "resume_from_checkpoint"),
                         ("method", "init_student")):
        tree.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- running

def _finished(pipe: Pipeline, phase: Phase, cfg: Config, init_sha: str | None) -> dict | None:
    """The phase's record when it is done and still valid; None when it must (re)run."""
    d = output_dir(pipe) / phase.name
    record = _read_json(d / PHASE_RECORD, None)
    if record is None or not all((d / "export" / k / EXPORT_META).is_file() for k in ("ema", "raw")):
        return None
    stale = []
    if record.get("config_sha256") != config_sha256(cfg):
        stale.append("its config changed")
    if record.get("init_sha256") != init_sha:
        stale.append("the previous phase's export it started from changed")
    if stale:
        raise PipelineError(f"phase '{phase.name}' in {d} is done but {' and '.join(stale)} since: delete {d} "
                            f"(and the later phases' directories) to retrain it, or use another run.output_dir")
    return record


Runner = Callable[[Config], dict]


def run_pipeline(pipe: Pipeline, runner: Runner | None = None, log=print) -> dict:
    """Run (or resume) every phase in order, then write ``unified/``; returns pipeline.json's record.
    ``runner``: trains one config (default ``hyperscale.train.launch.run_training``)."""
    if runner is None:
        from hyperscale.train.launch import run_training as runner
    cfgs = phase_configs(pipe)
    out = output_dir(pipe)
    records = []
    for i, (phase, cfg) in enumerate(zip(pipe.phases, cfgs)):
        init_sha = weights_sha256(export_of(pipe, pipe.phases[i - 1])) if i > 0 else None
        record = _finished(pipe, phase, cfg, init_sha)
        if record is not None:
            log(f"[pipeline] phase {i + 1}/{len(cfgs)} '{phase.name}': done, skipped ({out / phase.name})")
            records.append(record | {"skipped": True})
            continue
        log(f"[pipeline] phase {i + 1}/{len(cfgs)} '{phase.name}' ({cfg.method.name}, {phase.preset}) "
            f"-> {out / phase.name}")
        d = out / phase.name
        with measured(d, cfg.train.num_workers * cfg.train.cpus_per_worker):
            metrics = runner(cfg)
        attempts = _read_json(d / ATTEMPTS, [])
        record = {"name": phase.name, "preset": phase.preset, "method": cfg.method.name,
                  "student": getattr(cfg.method, "student", "full"), "steps": metrics.get("step", cfg.train.max_steps),
                  "samples": metrics.get("samples"), "attempts": len(attempts),
                  **{k: sum(a[k] for a in attempts) for k in ("wall_min", "cpu_min", "reserved_cpu_min")},
                  "init_student": getattr(cfg.method, "init_student", None), "init_sha256": init_sha,
                  "config_sha256": config_sha256(cfg), "export": str(export_of(pipe, phase).relative_to(out)),
                  "final_metrics": {k: v for k, v in metrics.items() if k.startswith(("loss/", "reward/"))}}
        _write_json(d / PHASE_RECORD, record)
        records.append(record)
    summary = write_unified(pipe, records)
    log(f"[pipeline] unified export in {out / UNIFIED}: " + ", ".join(
        f"{r['name']} {r['wall_min']:.1f} wall-min / {r['cpu_min']:.1f} CPU-min" for r in records))
    return summary


def write_unified(pipe: Pipeline, records: list[dict]) -> dict:
    """``<output_dir>/unified``: a copy of the last phase's chained export (merged weights + lora/),
    its metadata marked with the pipeline, and pipeline.json listing the phases."""
    import shutil

    out = output_dir(pipe)
    source = export_of(pipe, pipe.phases[-1])
    keys = ("name", "method", "student", "steps", "samples", "wall_min", "cpu_min", "reserved_cpu_min", "export")
    summary = {"pipeline": pipe.run.name, "file": pipe.source, "output_dir": str(out), "chain": pipe.chain,
               "source": str(source.relative_to(out)), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "phases": [{k: r.get(k) for k in keys} for r in records],
               "total": {k: sum(r.get(k) or 0.0 for r in records) for k in ("wall_min", "cpu_min", "reserved_cpu_min")}}
    with atomic_dir(out / UNIFIED) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        meta = json.loads((tmp / EXPORT_META).read_text())
        # one LoRA for 1 to 8 steps: TCD/DDIM at 2+ steps; at 1 step the last phase's generator call
        # (DMD's), which ImageGenerator and the bench use when it is there
        extra = SamplerSpec.from_extra(meta.get("extra", {})).unified().to_extra()
        extra["pipeline"] = {"name": pipe.run.name, "phases": [p.name for p in pipe.phases], "chain": pipe.chain}
        set_sampler(tmp, extra)  # a pipeline folder's scheduler follows (TCD)
        (tmp / PIPELINE_RECORD).write_text(json.dumps(summary, indent=1, default=float))
    return summary


# ---------------------------------------------------------------- command line

def config_argument(argv: list[str]) -> str | None:
    """The ``--config`` value of a command line, if any (to tell pipelines from single runs)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    return p.parse_known_args(argv)[0].config


def main(description: str, argv: list[str] | None = None) -> dict | None:
    """``--config PIPELINE.yaml [--dry-run] [key=value ...]`` (see ``load_pipeline`` for overrides)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="pipeline YAML (a file with phases:)")
    p.add_argument("--dry-run", action="store_true", help="print every phase's resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        pipe = load_pipeline(args.config, args.overrides)
        cfgs = phase_configs(pipe)
        if args.dry_run:
            for phase, cfg in zip(pipe.phases, cfgs):
                print(f"# ---- phase {phase.name} ({phase.preset})\n{to_yaml(cfg)}", end="")
            return None
        return run_pipeline(pipe)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
