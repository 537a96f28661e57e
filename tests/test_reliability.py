"""Fault tolerance through the real job (jobs/pretrain_teacher.py, 2 Ray workers, DeepSpeed ZeRO-2):
a SIGKILLed worker is replaced and the run restores from Ray's latest checkpoint, ending exactly
where an uninterrupted run ends; an S3 outage mid-run is ridden out by retries; a NaN loss on one
rank skips that update everywhere. Each run starts its own Ray in a subprocess."""
import json

from hyperscale.train import reliability


def test_sigkilled_worker_is_restored_from_the_last_checkpoint_and_the_run_finishes(tmp_path):
    row = reliability.worker_sigkill(tmp_path, steps=12, every=3)
    log = row["_log"]
    assert row["survived"], log[-4000:]
    # restored in the restarted worker group (no resume_from_checkpoint was given), from a checkpoint
    assert row["_restored_at"] >= 3 and row["_restored_at"] % 3 == 0, row["notes"]
    assert 0 <= row["steps_lost"] <= 3, row["notes"]  # at most one checkpoint interval
    # same exported weights and data cursors as the uninterrupted run: no sample skipped or repeated
    # beyond the lost steps' (the data cursor and RNG streams were restored exactly)
    assert row["_exact"], row["notes"]
    metrics = json.loads((tmp_path / "killed/metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["samples"] == 12 * 16 * 2


def test_s3_endpoint_outage_mid_run_is_ridden_out(tmp_path):
    row = reliability.s3_outage(tmp_path, outage_s=3.0, steps=12)
    assert row["survived"], row["_log"][-4000:]
    assert row["_retries"] > 0, "no S3 request fell into the outage: the test proved nothing"
    assert row["samples_skipped"] == 0
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["step"] == 12


def test_nan_loss_on_one_rank_is_skipped_everywhere_and_training_goes_on():
    row = reliability.nan_loss(stage=2)
    assert row["survived"], row["notes"]
