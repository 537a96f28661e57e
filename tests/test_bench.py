"""The quality benchmark runs end to end on tiny settings and writes BENCHMARK.md's record format."""
import json

import torch
from PIL import Image

from hyperscale.config import load_config
from hyperscale.eval.bench import QualitySettings, run_quality
from hyperscale.models.build import build_denoiser, save_denoiser


def test_quality_suite_writes_record_grids_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSCALE_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = load_config(None, ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]"])
    save_denoiser(build_denoiser(cfg.model, cfg.schedule), tmp_path / "teacher")
    s = QualitySettings(fid_samples=20, batch_size=10, teacher_steps=[1, 2], reference_limit=200)
    path = run_quality(str(tmp_path / "teacher"), str(tmp_path / "bench"), s, command="test")
    rec = json.loads(path.read_text())
    assert {"suite", "commit", "date", "machine", "command", "settings", "rows"} <= rec.keys()
    assert rec["suite"] == "quality" and rec["settings"]["fid_samples"] == 20
    assert [(r["generator"], r["steps"]) for r in rec["rows"]] == [("real-data", 0), ("teacher-ddim", 1),
                                                                  ("teacher-ddim", 2)]
    for r in rec["rows"]:
        assert {"fid", "kid", "class_acc", "samples_per_s"} <= r.keys()
        assert Image.open(tmp_path / "bench" / r["grid"]).size[0] > 0
    real, untrained = rec["rows"][0], rec["rows"][1]
    assert real["fid"] < untrained["fid"]  # an untrained net is far from the data
    assert real["class_acc"] > 0.8 and untrained["samples_per_s"] > 0
    assert (tmp_path / "bench" / "quality_fid_vs_steps.png").is_file()
