"""The quality suite of docs/benchmarks.md §2: the step-vs-quality table on Fashion-MNIST.

Every generator row is produced on the same fixed noise, the same class-balanced
labels and the same sample count, then scored by FID/KID and precision/recall on
EfficientNet-Lite0 features (relative numbers; see ``FID_NOTE``, ``PR_NOTE``) and by the
project's classifier.
Records follow the envelope of docs/benchmarks.md §1.4 (suite, commit, date, machine, command,
settings, rows).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from hyperscale.data.fashion_mnist import load_fashion_mnist
from hyperscale.diffusion.sampling import sample_ddim, sample_tcd
from hyperscale.models.classifier import classifier_card, load_classifier
from hyperscale.eval.features import FeatureExtractor, reference_stats
from hyperscale.eval.images import plot_fid_vs_steps, save_grid
from hyperscale.eval.metrics import FID_NOTE, PR_K, PR_NOTE, PR_SEED, evaluate_samples, pr_sample_count
from hyperscale.models.denoiser import CFGDenoiser, check_sigma_range
from hyperscale.models.families import family_of
from hyperscale.progress import Progress
from hyperscale.storage.records import write_record

SampleFn = Callable[[Tensor, Tensor], Tensor]  # (noise (B,C,H,W), labels (B,)) -> images in [-1, 1]


@dataclass
class QualitySettings:
    fid_samples: int = 2000  # per row; class-balanced; the same for every row
    batch_size: int = 250
    seed: int = 0
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 25, 50])
    guidance_scale: float = 1.3  # teacher CFG (w = 1: none); calibrated, see docs/benchmarks.md §3.3
    guidance_sigma: tuple[float, float] | None = None  # teacher CFG only at VE sigma~ in (lo, hi] (docs/algorithms.md §1.7)
    spacing: str = "trailing"  # DDIM grid; "trailing" starts every row at t = T-1
    clip_x0: bool = True
    use_clipped_model_output: bool = False  # re-derive eps from the clipped x0 (diffusers' flag)
    image_size: int = 64  # feature-network input (EfficientNet-Lite0)
    reference_limit: int | None = None  # None: all 10k test images (tests use fewer)
    student_eta: float = 0.3  # TCD gamma for multi-step student rows without their own (TCD's default)
    pr_k: int = PR_K  # precision/recall neighbourhood size (Kynkäänniemi et al. 2019's default, 3)
    threads: int = field(default_factory=lambda: torch.get_num_threads())

    def __post_init__(self) -> None:
        if self.use_clipped_model_output and not self.clip_x0:
            # else a row equal to the unclipped one would be recorded under settings that refuse to carry it
            raise ValueError("use_clipped_model_output re-derives eps from the clipped x0: it needs clip_x0")
        if self.guidance_sigma is not None:
            self.guidance_sigma = check_sigma_range(self.guidance_sigma)
        if not 1 <= self.pr_k < self.fid_samples:
            raise ValueError(f"pr_k must be in [1, fid_samples): the k-th neighbour of each of the "
                             f"{self.fid_samples} samples among the others; got {self.pr_k}")


def fixed_inputs(s: QualitySettings, shape=(1, 28, 28)) -> tuple[Tensor, Tensor]:
    """The shared evaluation inputs: class-balanced labels and their noise, from ``s.seed``."""
    labels = torch.arange(s.fid_samples) % 10
    noise = torch.randn((s.fid_samples, *shape), generator=torch.Generator().manual_seed(s.seed))
    return noise, labels


def generate(fn: SampleFn, noise: Tensor, labels: Tensor, batch_size: int, desc: str = "sampling") -> tuple[Tensor, float]:
    """All samples in batches, with a progress display (``desc``); returns (images, samples/s
    over the whole set)."""
    out = []
    t0 = time.perf_counter()
    with torch.no_grad(), Progress(len(labels), desc, "samples", prefix="[bench]") as p:
        for i in range(0, len(labels), batch_size):
            out.append(fn(noise[i:i + batch_size], labels[i:i + batch_size]).clamp(-1, 1))
            done = i + len(out[-1])
            p.set(done, {"samples/s": done / max(p.elapsed(), 1e-9)})
    return torch.cat(out), len(labels) / (time.perf_counter() - t0)


def teacher_ddim(teacher, steps: int, s: QualitySettings) -> SampleFn:
    guided = CFGDenoiser(teacher, s.guidance_scale, s.guidance_sigma)
    return lambda z, y: sample_ddim(guided, z, y, steps, spacing=s.spacing, clip_x0=s.clip_x0,
                                    use_clipped_model_output=s.use_clipped_model_output)


class QualityRun:
    """Scores generator rows one by one; ``write`` records the table, grids and plot."""

    def __init__(self, s: QualitySettings, out_dir: Path, log=print, text=None):
        self.s, self.out_dir, self.log = s, Path(out_dir), log
        torch.set_num_threads(s.threads)
        self.extractor = FeatureExtractor(image_size=s.image_size)
        self.ref = reference_stats(self.extractor, limit=s.reference_limit, verbose=True)
        self.classifier = load_classifier()
        self.text = text  # a text-to-image teacher's rows (bench/quality_t2i.py): prompts, decoding, held-out accuracy
        self.noise, self.labels = fixed_inputs(s, text.shape if text is not None else (1, 28, 28))
        self.rows: list[dict] = []
        self.real_images: Tensor | None = None
        self.teacher_sha256: str | None = None
        self.planned, self.added = None, 0  # sampled rows: how many run_quality will add, how many so far

    def _score(self, generator: str, steps: int, images: Tensor, sps: float | None, extra: dict | None = None) -> dict:
        m = evaluate_samples(images, self.labels, self.ref, self.extractor, self.classifier, pr_k=self.s.pr_k)
        row = {"generator": generator, "steps": steps, **m, "samples_per_s": sps, **(extra or {})}
        grid = self.out_dir / ("grids/t2i" if self.text is not None else "grids") / f"{generator}-{steps}.png"
        n = min(100, len(self.labels))
        order = torch.argsort(self.labels[:n] * 1000 + torch.arange(n))  # one class per row
        save_grid(images[:n][order], grid, nrow=10)
        row["grid"] = str(grid.relative_to(self.out_dir))
        self.rows.append(row)
        sps_txt = f"{sps:8.1f}" if sps else "       -"
        self.log(f"[bench] {generator:>18} steps {steps:>3}  FID {m['fid']:8.2f}  KID {m['kid']:.4f}  "
                 f"P {m['precision']:.3f}  R {m['recall']:.3f}  acc {m['class_acc']:.3f}  samples/s {sps_txt}")
        return row

    def add_real_data(self) -> dict:
        """The floor: real training images (same count) against the test reference. The training
        set is disjoint from the test reference, so its precision/recall is what the k-NN estimator
        gives for two real samples: the sanity row for the generators' figures."""
        train = load_fashion_mnist("train")
        g = torch.Generator().manual_seed(self.s.seed + 1)
        idx = torch.cat([torch.nonzero(torch.from_numpy(train.labels) == c).flatten()[
            torch.randperm(int((train.labels == c).sum()), generator=g)[:(self.labels == c).sum()]]
            for c in range(10)])
        images, labels = train.tensors()
        imgs = torch.empty(len(self.labels), 1, 28, 28)
        for c in range(10):  # place each class's real images where the evaluation labels ask for it
            imgs[self.labels == c] = images[idx[labels[idx] == c]]
        self.real_images = imgs
        return self._score("real-data", 0, imgs, None)

    def add_vae_floor(self) -> dict:
        """A latent teacher's floor: the real-data row's images through its VAE and back."""
        if self.real_images is None:
            self.add_real_data()
        return self._score("vae-recon", 0, self.text.reconstruct(self.real_images), None)

    def add(self, generator: str, steps: int, fn: SampleFn, extra: dict | None = None) -> dict:
        """``fn``: (noise, labels) -> images, or for a text-to-image teacher (noise, encoded prompts) ->
        latents, which the row prompts with the class prompts, decodes and also scores on held-out prompts."""
        self.added += 1
        extra = dict(extra or {})
        if self.text is not None:
            extra["heldout_acc"] = self.text.heldout_accuracy(fn, self.classifier, self.s.batch_size)
            fn = self.text.sample_fn(fn)
        images, sps = generate(fn, self.noise, self.labels, self.s.batch_size,
                               desc=f"row {self.added}/{self.planned or '?'} {generator} {steps} steps")
        return self._score(generator, steps, images, sps, extra)

    def write(self, command: str) -> Path:
        settings = asdict(self.s) | {"teacher_sha256": self.teacher_sha256,
                                     "fid_note": FID_NOTE, "reference": "Fashion-MNIST test, 10k",
                                     "feature_net": "EfficientNet-Lite0 (ImageNet)",
                                     "pr_note": PR_NOTE, "pr_seed": PR_SEED,
                                     "pr_reference_size": pr_sample_count(self.s.fid_samples, len(self.ref.features)),
                                     "classifier_test_acc": classifier_card().get("test_accuracy")}
        if self.text is not None:
            settings["text_to_image"] = self.text.describe()
        suite = "quality" if self.text is None else "quality-t2i"  # both can live in docs/bench/
        path = write_record(self.out_dir, suite, settings, self.rows, command)
        plot_fid_vs_steps(self.rows, self.out_dir / f"{suite}_fid_vs_steps.png")
        return path


def parse_students(specs: list[str]) -> dict[str, str]:
    """``["name=source", ...]`` -> {name: source}; a source is an export path, optionally with
    step counts and a sampler (``StudentSpec.parse``)."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"student '{spec}': expected name=path, e.g. sim-l2=runs/sim-l2/export/ema "
                             f"or hypersd-unified=runs/hypersd/unified@1,2,4,8")
        if name in out:
            raise ValueError(f"student '{name}' given twice")
        StudentSpec.parse(path)  # check the form now
        out[name] = path
    return out


SAMPLERS = ("tcd", "ddim")
_STEPS = re.compile(r"(\d+(?:,\d+)*)(?::(tcd|ddim)(?:=([0-9.]+))?)?")


@dataclass(frozen=True)
class StudentSpec:
    """A student row source: ``PATH`` (an exported 1-step generator, one row) or
    ``PATH@N[,N...][:SAMPLER]``, a multi-step student (any export: merged weights are loaded) sampled
    at each N: ``tcd`` (TCD with gamma = eta, default ``--eta``; ``tcd=0.5`` sets it; Hyper-SD's
    unified-LoRA sampler, §2.5) or ``ddim`` (DDIM, trailing spacing: the N-step LoRA sampler)."""
    path: str
    steps: tuple[int, ...] | None = None
    sampler: str = "tcd"
    eta: float | None = None

    @classmethod
    def parse(cls, source: str) -> "StudentSpec":
        path, sep, tail = source.rpartition("@")
        m = _STEPS.fullmatch(tail) if sep else None
        if m is None:
            if sep and re.match(r"\d", tail):
                raise ValueError(f"student '{source}': after '@' expected step counts and an optional sampler, "
                                 f"e.g. @1,2,4,8 or @1,2,4,8:ddim or @4:tcd=0.5 (samplers: {', '.join(SAMPLERS)})")
            return cls(source)
        steps = tuple(int(n) for n in m.group(1).split(","))
        if not path or min(steps) < 1 or len(set(steps)) != len(steps):
            raise ValueError(f"student '{source}': a path, then distinct step counts >= 1")
        eta = float(m.group(3)) if m.group(3) is not None else None
        if eta is not None and not 0 <= eta <= 1:
            raise ValueError(f"student '{source}': TCD eta must be in [0, 1], got {eta}")
        return cls(path, steps, m.group(2) or "tcd", eta)

    def describe(self, default_eta: float) -> dict:
        """The row's ``sampler`` field."""
        if self.sampler == "ddim":
            return {"name": "ddim", "spacing": "trailing"}
        return {"name": "tcd", "eta": default_eta if self.eta is None else self.eta}


def student_sampler(denoiser, steps: int, sampler: dict, seed: int) -> SampleFn:
    """Multi-step sampling of a student denoiser (no CFG: distilled students sample unguided)."""
    if sampler["name"] == "ddim":
        return lambda z, y: sample_ddim(denoiser, z, y, steps, spacing="trailing")
    g = torch.Generator().manual_seed(seed + 1000 * steps)  # TCD's re-noising: fixed per row
    return lambda z, y: sample_tcd(denoiser, z, y, steps, eta=sampler["eta"], generator=g)


# Settings that change a row's numbers; rows carry over between runs only when all are equal.
ROW_SETTINGS = ("fid_samples", "seed", "guidance_scale", "guidance_sigma", "spacing", "clip_x0", "use_clipped_model_output",
                "image_size", "reference_limit")
# what a record written before a setting existed was computed with
PREDATING = {"use_clipped_model_output": False, "guidance_sigma": None}


def weights_digest(export_dir: str | os.PathLike) -> str:
    """sha256 of an export's weights file (a pipeline folder: of all its weights files): which
    teacher a row was computed from."""
    import hashlib

    from hyperscale.models.build import EXPORT_WEIGHTS, resolve_source

    root = resolve_source(str(export_dir))
    if (root / EXPORT_WEIGHTS).is_file():
        return hashlib.sha256((root / EXPORT_WEIGHTS).read_bytes()).hexdigest()
    h = hashlib.sha256()  # a pipeline folder: every weights file, in path order
    for path in sorted(root.rglob("*.safetensors")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


PR_FIELDS = ("precision", "recall")
FLOORS = ("real-data", "vae-recon")  # rows of real images (a latent teacher's: also through its VAE)


def _json(v):
    """A setting as a record holds it (tuples are lists there)."""
    return list(v) if isinstance(v, tuple) else v


def carried_rows(record_path: str | os.PathLike, s: QualitySettings, teacher_sha256: str) -> list[dict]:
    """The real-data and teacher rows of an earlier record, reusable only when every setting that
    changes their numbers is equal (fixed seeds, deterministic DDIM: recomputing gives the same
    FID/KID/accuracy); each carried row says where it came from.

    Records from before precision/recall (no ``pr_k`` in their settings) lack those fields: their
    real-data row is not carried (it is cheap: ``run_quality`` scores it again), and their teacher
    rows are carried with ``precision`` and ``recall`` null and ``carried_from["lacks"]`` naming
    them; nothing is filled in. A record with another ``pr_k`` is refused like any other setting."""
    rec = json.loads(Path(record_path).read_text())
    old = rec.get("settings", {})
    diff = [k for k in ROW_SETTINGS if _json(old.get(k, PREDATING.get(k))) != _json(getattr(s, k))]
    if old.get("pr_k") not in (None, s.pr_k):
        diff.append("pr_k")
    if old.get("teacher_sha256") not in (None, teacher_sha256):
        diff.append("teacher_sha256")
    if diff:
        raise ValueError(f"{record_path}: cannot carry rows over, settings differ: {', '.join(diff)}")
    rows = [r for r in rec["rows"] if r["generator"] in FLOORS or
            (r["generator"] == "teacher-ddim" and r["steps"] in s.teacher_steps)]
    out = []
    for r in rows:
        lacks = [f for f in PR_FIELDS if r.get(f) is None]
        if lacks and r["generator"] in FLOORS:
            continue  # recomputed, with every field
        origin = {"commit": rec.get("commit"), "date": rec.get("date")} | ({"lacks": lacks} if lacks else {})
        out.append(r | {f: r.get(f) for f in PR_FIELDS} | {"carried_from": origin})
    return out


def _student_rows(students: dict[str, str], s: QualitySettings,
                  teacher_dir: str) -> list[tuple[str, int, SampleFn, dict]]:
    """(generator, steps, sample fn, extra row fields) per student row; every export is loaded here,
    before the slow part, so a bad path fails at once. A bare diffusers LoRA (a shipped Hyper-SD
    adapter) is applied to the teacher and merged."""
    from hyperscale.models.build import load_denoiser, resolve_source
    from hyperscale.models.export import SamplerSpec
    from hyperscale.models.generator import OneStepGenerator, export_sampler, load_generator
    from hyperscale.models.lora import is_bare_adapter, merged_adapter

    rows = []
    for name, source in students.items():
        spec = StudentSpec.parse(source)
        adapter = is_bare_adapter(resolve_source(spec.path))
        if spec.steps is None and adapter:
            raise ValueError(f"student '{name}': {spec.path} is a LoRA adapter (applied to the teacher); "
                             f"give its step counts, e.g. {name}={spec.path}@1,2,4,8")
        if spec.steps is None:  # an exported 1-step generator, as before
            rows.append((name, 1, load_generator(spec.path), {}))
            continue
        if adapter:
            denoiser, exported = merged_adapter(load_denoiser(teacher_dir), resolve_source(spec.path)), SamplerSpec()
        else:
            denoiser, exported = load_denoiser(spec.path).eval(), export_sampler(spec.path)
        sampler = spec.describe(s.student_eta)
        for n in spec.steps:
            call = exported.one_step_at(n, spec.sampler)
            if call is not None:  # the unified export's own 1-step call (DMD's)
                rows.append((name, 1, OneStepGenerator(denoiser, call.timestep, call.noise_input).eval(),
                             {"sampler": {"name": "one-step", **call.to_json()}}))
            else:
                rows.append((name, n, student_sampler(denoiser, n, sampler, s.seed), {"sampler": sampler}))
    keys = [(r[0], r[1]) for r in rows]
    dup = sorted({k for k in keys if keys.count(k) > 1} | {k for k in keys if k[0] in ("teacher-ddim",) + FLOORS})
    if dup:
        raise ValueError(f"student rows must have unique (generator, steps) names apart from the teacher's: {dup}")
    return rows


def run_quality(teacher_dir: str, out_dir: str, s: QualitySettings, command: str | None = None,
                students: dict[str, str] | None = None, carry_from: str | None = None) -> Path:
    """The real-data floor, the teacher's DDIM rows, then the students' rows: one 1-step row per
    generator export, one row per step count for ``PATH@N,...`` sources (``StudentSpec``).
    ``carry_from``: an earlier quality.json whose floor and teacher rows are reused (see carried_rows;
    a floor row without precision/recall is scored again)."""
    from hyperscale.models.build import load_denoiser

    teacher = load_denoiser(teacher_dir)
    text = None
    if family_of(teacher).condition == "text":  # latents: never clipped; rows decoded and prompted
        from hyperscale.bench.quality_t2i import TextRows

        s = replace(s, clip_x0=False, use_clipped_model_output=False)
        text = TextRows(teacher.eval(), s.seed)
    digest = weights_digest(teacher_dir)
    carried = carried_rows(carry_from, s, digest) if carry_from else []
    student_rows = _student_rows(students or {}, s, teacher_dir)
    run = QualityRun(s, Path(out_dir), text=text)
    run.teacher_sha256 = digest
    have = {(r["generator"], r["steps"]) for r in carried}
    run.planned = sum(("teacher-ddim", n) not in have for n in s.teacher_steps) + len(student_rows)
    if ("real-data", 0) not in have:
        run.add_real_data()  # the first row, carried or not
    run.rows.extend(carried)
    if text is not None and ("vae-recon", 0) not in have:
        run.add_vae_floor()
    for steps in s.teacher_steps:
        if ("teacher-ddim", steps) not in have:
            run.add("teacher-ddim", steps, teacher_ddim(teacher, steps, s))
    for name, steps, fn, extra in student_rows:
        run.add(name, steps, fn, extra)
    return run.write(command)
