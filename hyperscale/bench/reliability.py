"""Reliability scenarios (docs/benchmarks.md §9) as figures: ``python jobs/bench.py --suite reliability``.

Each scenario runs the real job (``jobs/pretrain_teacher.py``, the tiny teacher preset, 2 Ray
workers) in a subprocess with its own embedded Ray, injects the fault, and returns a row
``scenario, survived, steps_lost, samples_repeated, samples_skipped, notes``:

- ``worker_sigkill``: SIGKILL one Ray Train worker (found by the PID it writes under
  ``HYPERSCALE_TEST_PID_DIR``, hyperscale/train/worker.py) once it is past the first checkpoint; ``train.max_failures=1``. The
  run must restore from Ray's latest checkpoint, finish, and end bit-identical to an
  uninterrupted run (same exported weights, same data cursors): then the only samples trained
  twice are those of the steps lost since the checkpoint, and none is skipped.
- ``s3_outage``: the shards stream from a local S3 server (moto) that is stopped for a few
  seconds mid-run and restarted on the same port; the data layer's retries must carry the run.
- ``nan_loss``: a NaN generator loss on one rank (2 local ranks, ZeRO-2 engines): the update is
  skipped on every rank, counted, and the optimizer state is untouched.
- ``sigterm_driver`` / ``sigint_driver``: the signal to the job's driver mid-run, no checkpoint
  due: the workers checkpoint at the next step, the job exits 143 / 130, and a resume with
  ``latest`` ends bit-identical to an uninterrupted run (hyperscale/train/preemption.py).
- ``truncated_checkpoint``: the newest checkpoint's state.pt cut in half; ``latest`` resumes
  from the previous complete one with a warning naming both, and ends where an uninterrupted
  run ends.
- ``worker_node_preempted`` (hyperscale/bench/node_faults.py): a real two-node Ray cluster
  (``ray start``), the distill job sent with ``ray job submit``, checkpoints on S3 (moto); the
  worker node is SIGKILLed mid-run and a fresh one joins; the job must finish bit-identical to
  an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from hyperscale.bench.serve_faults import serve_replica_killed
from hyperscale.storage.local import REPO
from hyperscale.methods.base import LossOut

PRESET = REPO / "jobs" / "configs" / "teacher-tiny.yaml"
STEP_LINE = re.compile(r"\b(\d+)/\d+ steps \(")  # a progress line: "<run>  3/12 steps (25%) ..."
RESUMED = re.compile(r"resumed at step (\d+) from (.+)")


class Job:
    """``jobs/pretrain_teacher.py`` in a subprocess, its output collected line by line."""

    def __init__(self, out: Path, overrides: list[str], env: dict | None = None):
        self.out, self.lines = Path(out), []
        cmd = [sys.executable, str(REPO / "jobs" / "pretrain_teacher.py"), "--config", str(PRESET),
               f"run.output_dir={out}", *overrides]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, predicate, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise RuntimeError(f"job ended (rc {self.proc.returncode}) before the fault: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no fault point after {timeout:.0f} s: {self.tail()}")
            time.sleep(0.1)

    def finish(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # only the job this object started
            rc = self.proc.wait()
        self._reader.join(timeout=10)
        return rc

    def output(self) -> str:
        """The job's console, then what its processes logged in ``<run>/logs`` (the driver's log
        and every Ray worker's, where the workers' warnings go; linked while the job runs)."""
        parts = ["".join(self.lines)]
        logs = self.out / "logs"
        for root, _dirs, files in os.walk(logs, followlinks=True):
            for name in sorted(files):
                if name.endswith((".log", ".out", ".err")):
                    parts.append((Path(root) / name).read_text(errors="replace"))
        return "\n".join(parts)

    def tail(self, n: int = 3000) -> str:
        return self.output()[-n:]

    def first_checkpoint(self) -> Path | None:
        from hyperscale.train.checkpoint import find_latest

        root = self.out / "checkpoints"
        return find_latest(root) if root.is_dir() else None


def final_state(out: Path) -> dict:
    from hyperscale.train.checkpoint import find_latest, read_checkpoint

    return read_checkpoint(find_latest(Path(out) / "checkpoints"))


def same_exports(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    for kind in ("raw", "ema"):
        x, y = (load_file(str(Path(d) / "export" / kind / "model.safetensors")) for d in (a, b))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def _cursors_equal(a: list, b: list) -> bool:
    def norm(v):
        return v.tolist() if isinstance(v, torch.Tensor) else v
    return [{k: norm(v) for k, v in c.items()} for c in a] == [{k: norm(v) for k, v in c.items()} for c in b]


def _read_int(path: Path) -> int:
    """A small counter file written by another process (empty or missing while it is rewritten: 0)."""
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def worker_sigkill(work: Path, steps: int = 12, every: int = 3) -> dict:
    """SIGKILL rank 1's Ray Train worker between checkpoints (after the first, at least one step
    past it); compare the finished run with an uninterrupted one."""
    work = Path(work)
    base = [f"train.max_steps={steps}", f"train.checkpoint_every={every}", "train.log_every=1"]
    straight = Job(work / "straight", base)
    rc_straight = straight.finish()
    pids = work / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    job = Job(work / "killed", base + ["train.max_failures=1"], {"HYPERSCALE_TEST_PID_DIR": str(pids)})

    def mid_interval() -> bool:  # a checkpoint exists and rank 1 has gone at least one step past it
        return (job.first_checkpoint() is not None and (pids / "rank1.pid").is_file()
                and _read_int(pids / "rank1.step") > every)

    job.wait_for(mid_interval)
    victim = int((pids / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    killed_after = max(_read_int(pids / f"rank{r}.step") for r in (0, 1))  # last step finished before the kill
    rc = job.finish()
    log = job.output()
    metrics = json.loads((job.out / "metrics.json").read_text()) if rc == 0 else {}
    restored_at = int(metrics.get("restored_at_step", -1))
    resumed = RESUMED.search(log)
    ok = rc == 0 and rc_straight == 0
    final = final_state(job.out) if ok else {"counters": {"step": None}, "data": None}
    exact = ok and same_exports(job.out, straight.out) and _cursors_equal(
        final["data"], final_state(straight.out)["data"])
    steps_lost = max(0, killed_after - restored_at) if restored_at >= 0 else None
    batch, world = 16, 2  # teacher-tiny: data.batch_size 16 per worker, 2 workers
    return {"scenario": "worker_sigkill", "survived": ok and final["counters"]["step"] == steps,
            "steps_lost": steps_lost, "samples_repeated": None if steps_lost is None else steps_lost * batch * world,
            "samples_skipped": 0 if exact else None,
            "notes": (f"rank 1 (pid {victim}) SIGKILLed after step {killed_after}, checkpoints every {every}; "
                      f"restored at step {restored_at} from "
                      f"{resumed.group(2).strip() if resumed else 'a checkpoint (log line not forwarded)'}; "
                      f"finished step {final['counters']['step']}/{steps}; exports and data cursors "
                      f"{'bit-identical to' if exact else 'DIFFER from'} an uninterrupted run; samples_repeated "
                      f"= the lost steps' samples, trained again"),
            "_log": log, "_exact": exact, "_restored_at": restored_at}


def s3_outage(work: Path, outage_s: float = 3.0, steps: int = 12) -> dict:
    """Shards on a local moto S3 server that goes away for ``outage_s`` seconds mid-run."""
    import boto3
    from moto.server import ThreadedMotoServer

    from hyperscale.data.fashion_mnist import ImageSet, load_fashion_mnist
    from hyperscale.data.shards import write_shards
    from hyperscale.train.local import free_port

    work = Path(work)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "HYPERSCALE_S3_ATTEMPTS": "12", "HYPERSCALE_S3_BACKOFF_S": "0.1"}  # > 6 s of retries
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        data = load_fashion_mnist("train")
        small = ImageSet(data.images[:64], data.labels[:64])  # 4 shards of 16: a re-read every 2 steps
        paths = write_shards(small, work / "shards", maxcount=16)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        s3.create_bucket(Bucket="hs-reliability")
        for p in paths:
            s3.upload_file(str(p), "hs-reliability", f"data/{p.name}")
        url = f"s3://hs-reliability/data/train-{{000000..{len(paths) - 1:06d}}}.tar"
        job = Job(work / "run", [f"data.train_shards_path_or_url={url}", f"train.max_steps={steps}",
                                 "train.checkpoint_every=3", "train.log_every=1"], env)
        job.wait_for(lambda: job.first_checkpoint() is not None)
        at = max([int(m) for m in STEP_LINE.findall(job.output())], default=0)
        server.stop()
        time.sleep(outage_s)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # moto keeps its buckets in this process: the same objects come back
        rc = job.finish()
    finally:
        server.stop()
    log = job.output()
    retries = len(re.findall(r"retrying in", log))
    final = final_state(job.out) if rc == 0 else None
    skipped = sum(c.get("skipped", {}).get("count", 0) for c in final["data"]) if final else None
    return {"scenario": "s3_outage", "survived": rc == 0 and final["counters"]["step"] == steps,
            "steps_lost": 0 if rc == 0 else None, "samples_repeated": 0 if rc == 0 else None,
            "samples_skipped": skipped,
            "notes": (f"S3 endpoint down {outage_s:.0f} s from about step {at}; {retries} S3 requests failed and were "
                      f"retried with backoff; no restart; corrupt/skipped samples counted in the final cursors"),
            "_log": log, "_retries": retries, "_outage_at_step": at}


def sigterm_driver(work: Path, signame: str = "SIGTERM", steps: int = 40, at_step: int = 3,
                   every_minutes: float = 5.0) -> dict:
    """SIGTERM (or SIGINT) to the job's driver process mid-run, between checkpoints: the workers
    must checkpoint at their next step and the job exit with 128 + the signal's number; then
    ``train.resume_from_checkpoint=latest`` finishes the run, compared with an uninterrupted
    one. Step checkpoints are far apart (every 1000 steps) and the clock's every
    ``every_minutes``, so the checkpoint the signal leaves is the only one."""
    from hyperscale.config.schema import TrainSection

    grace = TrainSection().preemption_grace_seconds  # the default, which these runs use
    work = Path(work)
    base = [f"train.max_steps={steps}", "train.checkpoint_every=1000", "train.log_every=1",
            f"train.checkpoint_every_minutes={every_minutes:g}"]
    straight = Job(work / "straight", base)
    rc_straight = straight.finish()
    pids = work / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    job = Job(work / "signalled", base, {"HYPERSCALE_TEST_PID_DIR": str(pids)})

    def seen_step() -> int:
        return max([int(m) for m in STEP_LINE.findall("".join(job.lines))], default=0)

    job.wait_for(lambda: seen_step() >= at_step)
    at = max(_read_int(pids / f"rank{r}.step") for r in (0, 1))  # steps done when the signal is sent
    t0 = time.monotonic()
    job.proc.send_signal(getattr(signal, signame))
    rc = job.finish()
    seconds = time.monotonic() - t0
    log = job.output()
    from hyperscale.train.checkpoint import find_latest, meta_step

    latest = find_latest(job.out / "checkpoints") if (job.out / "checkpoints").is_dir() else None
    ckpt_step = meta_step(latest) if latest is not None else None
    done = max(_read_int(pids / f"rank{r}.step") for r in (0, 1))  # steps trained before the exit
    steps_lost = None if ckpt_step is None else max(0, done - ckpt_step)
    resumed = Job(work / "signalled", base + ["train.resume_from_checkpoint=latest"])
    rc_resumed = resumed.finish()
    ok = rc_straight == 0 and rc_resumed == 0
    final = final_state(job.out) if ok else {"counters": {"step": None}, "data": None}
    exact = ok and same_exports(job.out, straight.out) and _cursors_equal(
        final["data"], final_state(straight.out)["data"])
    return {"scenario": f"{signame.lower()}_driver",
            "survived": ok and rc == 128 + int(getattr(signal, signame)) and ckpt_step is not None and exact,
            "steps_lost": steps_lost, "samples_repeated": 0 if steps_lost == 0 else None,
            "samples_skipped": 0 if exact else None,
            "steps_at_signal": at, "checkpoint_step": ckpt_step, "signal_to_exit_s": round(seconds, 1),
            "exit_code": rc,
            "notes": (f"{signame} to the driver after step {at} (checkpoints every 1000 steps and every "
                      f"{every_minutes:g} min, so none was due); the workers checkpointed at step {ckpt_step} and "
                      f"the job exited {rc} {seconds:.1f} s after the signal (grace {grace:g} s); "
                      f"train.resume_from_checkpoint=latest finished {final['counters']['step']}/{steps}; exports "
                      f"and data cursors {'bit-identical to' if exact else 'DIFFER from'} an uninterrupted run"),
            "_log": log, "_console": "".join(job.lines), "_resume_log": resumed.output(), "_exact": exact, "_rc": rc,
            "_latest": latest, "_done": done, "_at": at}


def truncated_checkpoint(work: Path, steps: int = 6, every: int = 2) -> dict:
    """Cut the newest checkpoint's state.pt in half (a write lost mid-way), then resume with
    ``train.resume_from_checkpoint=latest``: the previous complete checkpoint must be used with a
    warning naming both, and the run must end where the uninterrupted one ended (its export,
    read before the resume overwrites it). One worker in the job's process (``--no-ray``)."""
    from safetensors.torch import load_file

    from hyperscale.train.checkpoint import STATE, meta_step

    work = Path(work)
    base = ["--no-ray", "train.num_workers=1", "train.engine=torch", f"train.max_steps={steps}", f"train.checkpoint_every={every}",
            "train.keep_checkpoints=10", "train.log_every=1"]
    first = Job(work / "run", base)
    rc_first = first.finish()
    exports = {kind: load_file(str(first.out / "export" / kind / "model.safetensors")) for kind in ("raw", "ema")} \
        if rc_first == 0 else {}
    root = first.out / "checkpoints"
    newest = max((p for p in root.iterdir() if p.name.startswith("step_")), key=meta_step) if rc_first == 0 else None
    if newest is not None:
        state = newest / STATE
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    resumed = Job(work / "run", base + ["train.resume_from_checkpoint=latest"])
    rc = resumed.finish()
    log = resumed.output()
    m = RESUMED.search(log)
    at = int(m.group(1)) if m else None
    warned = newest is not None and re.search(rf"checkpoint {re.escape(str(newest))} \(step {steps}\) is incomplete "
                                              rf".*; using \S+ \(step {at}\)", log) is not None
    exact = rc == 0 and all(
        (lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))(
            exports[kind], load_file(str(first.out / "export" / kind / "model.safetensors"))) for kind in exports)
    steps_lost = None if at is None else steps - at
    return {"scenario": "truncated_checkpoint", "survived": rc == 0 and warned and exact and bool(exports),
            "steps_lost": steps_lost, "samples_repeated": None if at is None else steps_lost * 16,
            "samples_skipped": 0 if exact else None,
            "notes": (f"newest checkpoint (step {steps}) cut to half its state.pt; resume=latest "
                      f"{'warned naming both and ' if warned else 'did NOT warn; '}resumed at step {at}, "
                      f"{steps_lost} steps trained again; final exports "
                      f"{'bit-identical to' if exact else 'DIFFER from'} the uninterrupted run's (1 worker, --no-ray)"),
            "_log": log, "_warned": warned, "_exact": exact, "_newest": newest}


class PoisonedLoss:
    """Wraps a method: while ``armed``, the generator loss on ``rank`` is NaN."""

    def __init__(self, method, rank: int):
        self.method, self.rank, self.armed = method, rank, False

    def __getattr__(self, name):
        return getattr(self.method, name)

    def generator_loss(self, batch, **roles) -> LossOut:
        out = self.method.generator_loss(batch, **roles)
        if self.armed and torch.distributed.get_rank() == self.rank:
            out = LossOut(out.loss * float("nan"), out.metrics)
        return out


def _nan_probe(rank: int, world: int, stage: int) -> dict:
    import copy

    from hyperscale.config import load_config
    from hyperscale.data.stream import LabelStream
    from hyperscale.methods.base import Batch
    from hyperscale.methods import build_method
    from hyperscale.models.build import build_denoiser
    from hyperscale.train import engines
    from hyperscale.train.step import StepCounters, two_player_step

    engines.init_distributed("gloo")
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]",
                             "method.name=sim", f"train.zero_stage={stage}", "data.batch_size=4"])
    torch.manual_seed(0)
    teacher = build_denoiser(cfg.model, cfg.schedule).eval().requires_grad_(False)
    method = PoisonedLoss(build_method(cfg.method), rank=1)
    roles = {n: engines.build_role(n, copy.deepcopy(teacher), cfg.train, 4, world, torch.device("cpu"))
             for n in method.trainable}
    labels, counters = LabelStream(4, 10, rank), StepCounters()
    batches = lambda: Batch(next(labels)[1])  # noqa: E731
    two_player_step(method, batches, roles, {"teacher": teacher}, None, counters)
    gen = roles["generator"]
    state = [{k: v.clone() for k, v in s.items()} for s in gen.optimizer.state.values()]
    weights = gen.full_state_dict()
    method.armed = True
    two_player_step(method, batches, roles, {"teacher": teacher}, None, counters)
    method.armed = False
    after = gen.full_state_dict()
    kept = all(torch.equal(weights[k], after[k]) for k in after) and all(
        torch.equal(a[k], b[k]) for a, b in zip(state, gen.optimizer.state.values()) for k in a)
    two_player_step(method, batches, roles, {"teacher": teacher}, None, counters)  # and training goes on
    return {"skipped": dict(counters.skipped), "state_kept_on_skip": kept, "step": counters.step}


def nan_loss(stage: int = 2) -> dict:
    from hyperscale.train.local import run_local

    ranks = run_local(_nan_probe, 2, stage)
    ok = all(r["skipped"] == {"generator": 1} and r["step"] == 3 and r["state_kept_on_skip"] for r in ranks)
    return {"scenario": "nan_loss", "survived": ok, "steps_lost": 0, "samples_repeated": 0,
            "samples_skipped": 4 * 2 if ok else None,
            "notes": (f"ZeRO-{stage}, 2 ranks: NaN generator loss on rank 1 at step 2 -> generator update skipped "
                      f"on both ranks (skip counts {[r['skipped'] for r in ranks]}), its weights and AdamW state "
                      f"untouched, the step's critic update applied, training went on to step 3; "
                      f"samples_skipped = that update's batch on both ranks")}


SCENARIOS = ("worker_sigkill", "s3_outage", "nan_loss", "sigterm_driver", "sigint_driver", "truncated_checkpoint",
             "serve_replica_killed", "worker_node_preempted")


def run_reliability_suite(out_dir: str | Path, work: Path, command: str | None = None,
                          scenarios: list[str] | None = None) -> Path:
    """docs/bench/reliability.json: one row per scenario (private ``_`` fields dropped).
    ``scenarios``: only these (default: all); the record's other rows are kept as they were, each
    row naming the commit, date, machine and command that measured it."""
    from hyperscale.bench.node_faults import worker_node_preempted  # it imports this module
    from hyperscale.storage.records import commit, machine, write_record

    work = Path(work)
    runs = {"worker_sigkill": lambda: worker_sigkill(work / "kill"), "s3_outage": lambda: s3_outage(work / "s3"),
            "nan_loss": nan_loss, "sigterm_driver": lambda: sigterm_driver(work / "sigterm"),
            "sigint_driver": lambda: sigterm_driver(work / "sigint", "SIGINT"),
            "truncated_checkpoint": lambda: truncated_checkpoint(work / "truncated"),
            "serve_replica_killed": lambda: serve_replica_killed(work / "serve"),
            "worker_node_preempted": lambda: worker_node_preempted(work / "node")}
    chosen = list(scenarios or SCENARIOS)
    unknown = [s for s in chosen if s not in runs]
    if unknown:
        raise ValueError(f"unknown reliability scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    path = Path(out_dir) / "reliability.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = {r["scenario"]: r | {k: old.get(k) for k in ("commit", "date", "machine", "command") if k not in r}
            for r in old.get("rows", [])}
    for name in chosen:
        t0 = time.perf_counter()
        row = runs[name]()
        wall = round(time.perf_counter() - t0, 1)
        rows[row["scenario"]] = ({k: v for k, v in row.items() if not k.startswith("_")} | {"wall_s": wall} |
                                 {"commit": commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                                  "command": command})
        print(f"[bench] reliability {name}: {rows[row['scenario']]}", flush=True)
    order = [s for s in SCENARIOS if s in rows] + [s for s in rows if s not in SCENARIOS]
    settings = {"preset": "jobs/configs/teacher-tiny.yaml", "workers": 2, "engine": "deepspeed ZeRO-2",
                "truncated_checkpoint": "1 worker, --no-ray, plain torch",
                "serve_replica_killed": "jobs/serve.py on assets/sim-generator, 1 replica, 4 clients",
                "worker_node_preempted": "jobs/configs/sim-tiny.yaml via ray job submit, 2 ray start nodes x 1 CPU, "
                                         "checkpoints on S3 (moto)"}
    return write_record(out_dir, "reliability", settings, [rows[s] for s in order], command)
