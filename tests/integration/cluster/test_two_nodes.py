"""A real two-node Ray cluster: a head (127.0.0.1) and a worker node (127.0.0.2), each a `ray start
--block` with its own temp dir and ports and one CPU, in the test's network namespace (where all
of 127.0.0.0/8 is loopback; scripts/test.sh). The distill job (jobs/configs/sim-tiny.yaml, two Ray
Train workers of one CPU each) goes through `ray job submit`, its checkpoints, metrics and exports
to S3 (moto, tests/s3_server.py). Twice: uninterrupted, then with the worker node SIGKILLed after a
checkpoint and a fresh worker node (127.0.0.3) started; the same job must restart its workers,
restore from the newest checkpoint on S3 and finish with the uninterrupted job's exports.

hyperscale.bench.node_faults runs this (it is also the reliability suite's
``worker_node_preempted`` row); the test does not take its verdicts on trust but reads what the
runs left: the workers' own reports of their Ray node (rank<r>.nodes), metrics.json, the final
checkpoints and the exported weights on S3.
"""
import json

import psutil
import pytest
import torch
from safetensors.torch import load_file

from hyperscale.bench import node_faults
from hyperscale.storage import s3
from s3_server import BUCKET

STEPS, EVERY = 16, 4


@pytest.mark.slow  # two jobs on a three-node lifetime cluster: about 10 min on 2 cores shared with training
@pytest.mark.timeout(2400)
def test_worker_node_lost_mid_run_the_job_resumes_from_s3_and_ends_as_uninterrupted(moto, tmp_path):
    row = node_faults.worker_node_preempted(tmp_path, steps=STEPS, every=EVERY, bucket=BUCKET, timeout=1200)
    log, ids = row["_log"], row["_node_ids"]
    head, worker, fresh = (ids[ip] for ip in (node_faults.HEAD_IP, node_faults.WORKER_IP, node_faults.REPLACEMENT_IP))
    assert len({head, worker, fresh}) == 3  # three distinct Ray nodes (the cluster's own listing)
    assert f"[hyperscale] done: step {STEPS}" in log, log[-4000:]

    # The uninterrupted job: one rank on each node, as each worker saw it from inside.
    straight = node_faults.node_records(tmp_path / "watch-straight")
    assert sorted(straight) == [0, 1] and all(len(s) == 1 for s in straight.values()), straight
    assert sorted(s[0]["node_id"] for s in straight.values()) == sorted([head, worker])
    assert sorted(s[0]["node_ip"] for s in straight.values()) == ["127.0.0.1", "127.0.0.2"]

    # The interrupted job: first on head + worker node, then (one restart) on head + the fresh node.
    runs = node_faults.node_records(tmp_path / "watch")
    assert sorted(runs) == [0, 1] and all(len(s) == 2 for s in runs.values()), runs
    assert sorted(s[0]["node_id"] for s in runs.values()) == sorted([head, worker])
    assert sorted(s[1]["node_id"] for s in runs.values()) == sorted([head, fresh])
    victim = row["_victim"]
    assert runs[victim][0]["node_id"] == worker and not psutil.pid_exists(runs[victim][0]["pid"])

    # Restored from a checkpoint at or before the kill, counted as one worker-group failure.
    metrics = json.loads(s3.read_text(f"{row['_run']}/metrics.json"))
    assert metrics["step"] == STEPS and metrics["samples"] == STEPS * node_faults.BATCH * node_faults.WORLD
    restored, killed_after = int(metrics["restored_at_step"]), row["_killed_after"]
    assert EVERY <= restored <= killed_after and restored % EVERY == 0, (restored, killed_after)
    assert row["steps_lost"] == killed_after - restored

    # The same end as the uninterrupted job: counters, every rank's data cursor, raw and EMA exports.
    a, b = node_faults.final_checkpoint(row["_run"]), node_faults.final_checkpoint(row["_straight"])
    assert a["counters"] == b["counters"] and a["counters"]["step"] == STEPS
    assert len(a["data"]) == len(b["data"]) == 2
    for x, y in zip(a["data"], b["data"]):
        assert x.keys() == y.keys() and all(
            torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)
    for name in ("_run", "_straight"):
        s3.download_dir(f"{row[name]}/export", tmp_path / "check" / name)
    for kind in ("raw", "ema"):
        x, y = (load_file(str(tmp_path / "check" / name / kind / "model.safetensors")) for name in ("_run", "_straight"))
        assert x.keys() == y.keys() and len(x) > 0, kind
        different = [k for k in x if not torch.equal(x[k], y[k])]
        assert not different, f"export/{kind}: {len(different)} tensors differ, e.g. {different[:3]}"
    assert row["survived"] and row["samples_skipped"] == 0
