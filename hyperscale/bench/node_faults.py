"""Reliability scenario ``worker_node_preempted``: a worker node of a real two-node Ray cluster is
lost mid-run (docs/benchmarks.md §9).

A head (127.0.0.1) and a worker node (127.0.0.2), each a ``ray start`` with one CPU
(hyperscale/bench/ray_cluster.py), so the distill job's two Ray Train workers (one CPU each) must
run one per node; checkpoints, metrics and exports on S3 (a moto server on 127.0.0.1, or the
caller's). Two jobs go through ``ray job submit``: an uninterrupted one, then the same job whose
worker node is SIGKILLed (its ``ray start`` process group: raylet, object store, agents and the
Ray Train worker on it) once a checkpoint is complete on S3 and that node's rank has gone a step
past it. A fresh worker node (127.0.0.3) then joins; the job itself carries on (no resubmission):
Ray Train counts the lost worker as a failure (``train.max_failures=1``), starts a new worker
group on the head and the new node, and the workers restore from the newest complete checkpoint
on S3. Recorded: the nodes each rank ran on (from the workers' own reports,
``HYPERSCALE_TEST_PID_DIR``, hyperscale/train/worker.py), the steps lost, and whether the
exports and final checkpoint are bit-identical to the uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Iterator

from hyperscale.bench.ray_cluster import LocalCluster
from hyperscale.bench.reliability import _cursors_equal, _read_int, same_exports
from hyperscale.train.worker import WATCH_DIR_ENV

HEAD_IP, WORKER_IP, REPLACEMENT_IP = "127.0.0.1", "127.0.0.2", "127.0.0.3"
PRESET = "jobs/configs/sim-tiny.yaml"
BATCH, WORLD = 4, 2  # sim-tiny: data.batch_size 4 per worker, 2 workers


@contextlib.contextmanager
def s3_store(bucket: str | None) -> Iterator[str]:
    """The bucket to use: ``bucket`` on the store this process's environment points at, or (None)
    a moto server of its own on 127.0.0.1 with a new bucket, this process's S3 settings pointed
    at it for the duration."""
    if bucket is not None:
        yield bucket
        return
    from moto.server import ThreadedMotoServer

    from hyperscale.storage import s3
    from hyperscale.train.local import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per S3 request
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(env)
    try:
        s3.client().create_bucket(Bucket="hs-reliability")
        yield "hs-reliability"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload_teacher(local: Path, url: str) -> str:
    """A tiny random teacher (as tests/integration/cluster/test_submit.py builds), saved and
    uploaded to ``url``: every node loads it from S3."""
    import torch

    from hyperscale.config import load_config
    from hyperscale.models.build import build_denoiser, save_denoiser
    from hyperscale.storage import s3

    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    save_denoiser(build_denoiser(cfg.model, cfg.schedule), local)
    s3.upload_dir(local, url)
    return url


def node_records(watch: Path) -> dict[int, list[dict]]:
    """rank -> where each start of that rank ran ({node_id, node_ip, pid}), oldest first."""
    out = {}
    for path in sorted(Path(watch).glob("rank*.nodes")):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        out[int(path.name[len("rank"):-len(".nodes")])] = [json.loads(ln) for ln in lines]
    return out


def final_checkpoint(run: str) -> dict:
    """The newest complete checkpoint under ``<run>/checkpoints`` on S3, read (counters, cursors)."""
    from hyperscale.train.checkpoint import find_latest, local_copy, read_checkpoint

    with local_copy(find_latest(f"{run}/checkpoints")) as local:
        return read_checkpoint(local)


def _complete_checkpoint(run: str) -> bool:
    from hyperscale.train.checkpoint import find_latest

    with contextlib.redirect_stdout(io.StringIO()):  # "incomplete" notes while one is being written
        return find_latest(f"{run}/checkpoints") is not None


def worker_node_preempted(work: Path, steps: int = 24, every: int = 4, bucket: str | None = None,
                          timeout: float = 900) -> dict:
    from hyperscale.storage import s3

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    with s3_store(bucket) as bucket:
        root = f"s3://{bucket}/two-node-{secrets.token_hex(3)}"
        teacher = upload_teacher(work / "teacher", f"{root}/teacher")
        job = ["jobs/distill.py", "--config", PRESET, f"model.pretrained_teacher_model={teacher}",
               f"train.max_steps={steps}", f"train.checkpoint_every={every}", "train.log_every=1",
               "train.num_workers=2", "train.cpus_per_worker=1", "train.max_failures=1"]
        with LocalCluster(work / "cluster", {**os.environ, "HYPERSCALE_CACHE_DIR": str(work / "cache")}) as cluster:
            node_ids = {HEAD_IP: cluster.wait_alive(HEAD_IP)["node_id"]}
            worker = cluster.add_node(WORKER_IP)
            node_ids[WORKER_IP] = cluster.wait_alive(WORKER_IP)["node_id"]

            (work / "watch-straight").mkdir(exist_ok=True)
            t0 = time.monotonic()
            straight = cluster.submit(job + [f"run.output_dir={root}/straight"],
                                      {WATCH_DIR_ENV: str(work / "watch-straight")}, "straight")
            straight_status = cluster.wait_job(straight, timeout)
            straight_s = time.monotonic() - t0

            watch = work / "watch"
            watch.mkdir(exist_ok=True)
            run = f"{root}/preempted"
            t0 = time.monotonic()
            jid = cluster.submit(job + [f"run.output_dir={run}"], {WATCH_DIR_ENV: str(watch)}, "preempted")

            def victim() -> int | None:  # the rank on the worker node
                on = [r for r, starts in node_records(watch).items() if starts[-1]["node_ip"] == WORKER_IP]
                return on[0] if on else None

            deadline, polls = time.monotonic() + timeout, 0
            while not (victim() is not None and _read_int(watch / f"rank{victim()}.step") > every
                       and _complete_checkpoint(run)):
                polls += 1
                if polls % 20 == 0 and cluster.job_status(jid) in ("SUCCEEDED", "FAILED", "STOPPED"):
                    raise RuntimeError(f"job ended before the fault: {cluster.job_logs(jid)[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no fault point after {timeout:.0f} s: {cluster.job_logs(jid)[-3000:]}")
                time.sleep(0.2)
            rank = victim()
            worker.kill()
            killed_at = time.time()
            killed_after = max(_read_int(watch / f"rank{r}.step") for r in range(WORLD))  # last step done
            cluster.add_node(REPLACEMENT_IP)
            node_ids[REPLACEMENT_IP] = cluster.wait_alive(REPLACEMENT_IP)["node_id"]
            status = cluster.wait_job(jid, timeout)
            preempted_s = time.monotonic() - t0
            log = cluster.job_logs(jid)
        records = node_records(watch)
        ok = straight_status == status == "SUCCEEDED"
        metrics = json.loads(s3.read_text(f"{run}/metrics.json")) if ok else {}
        restored_at = int(metrics.get("restored_at_step", -1))
        restarted = [starts[-1] for starts in records.values() if len(starts) > 1]
        # the restarted workers' reports are the last lines of their rank<r>.nodes files
        restart_s = max((watch / f"rank{r}.nodes").stat().st_mtime for r in records) - killed_at if restarted else None
        if ok:
            for name in ("straight", "preempted"):
                s3.download_dir(f"{root}/{name}/export", work / name / "export")
            a, b = final_checkpoint(run), final_checkpoint(f"{root}/straight")
        exact = ok and same_exports(work / "preempted", work / "straight") and a["counters"] == b["counters"] \
            and _cursors_equal(a["data"], b["data"])
    first = {r: starts[0] for r, starts in records.items()}
    placed = sorted(s["node_ip"] for s in first.values()) == [HEAD_IP, WORKER_IP] and \
        len({s["node_id"] for s in first.values()}) == WORLD
    replaced = sorted(s["node_ip"] for s in restarted) == [HEAD_IP, REPLACEMENT_IP] and \
        {s["node_id"] for s in restarted} == {node_ids[HEAD_IP], node_ids[REPLACEMENT_IP]}
    steps_lost = max(0, killed_after - restored_at) if restored_at >= 0 else None
    return {"scenario": "worker_node_preempted",
            "survived": ok and metrics.get("step") == steps and exact and placed and replaced,
            "steps_lost": steps_lost, "samples_repeated": None if steps_lost is None else steps_lost * BATCH * WORLD,
            "samples_skipped": 0 if exact else None,
            "straight_job_s": round(straight_s, 1), "preempted_job_s": round(preempted_s, 1),
            "kill_to_restart_s": None if restart_s is None else round(restart_s, 1),
            "notes": (f"{PRESET}, {steps} steps, checkpoints every {every} on S3 (moto); 2 nodes x 1 CPU, ranks first "
                      f"on {', '.join(sorted(s['node_ip'] for s in first.values()))}"
                      f"{' (distinct node ids)' if placed else ' (NOT one per node)'}; worker node {WORKER_IP} "
                      f"(rank {rank}) SIGKILLed after step {killed_after}, a fresh node joined on {REPLACEMENT_IP}; "
                      f"the same job restarted its workers on "
                      f"{', '.join(sorted(s['node_ip'] for s in restarted)) or 'nothing'} "
                      f"{'?' if restart_s is None else f'{restart_s:.0f}'} s after the kill, restored at step {restored_at} from S3 and finished "
                      f"{metrics.get('step')}/{steps}; exports and final checkpoint "
                      f"{'bit-identical to' if exact else 'DIFFER from'} the uninterrupted job's"),
            "_log": log, "_records": records, "_node_ids": node_ids, "_run": run, "_straight": f"{root}/straight",
            "_killed_after": killed_after, "_victim": rank, "_exact": exact, "_work": work}
