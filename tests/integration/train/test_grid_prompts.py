"""The sample grid's rows for a text-to-image run: spread over the prompt file, not its first lines."""
from hyperscale.config import load_config
from hyperscale.train.text2image_data import DEFAULT_PROMPTS, grid_prompts


def test_grid_rows_spread_over_the_prompt_file(tmp_path):
    prompts = [f"a photo of a {c}, take {k}" for c in "abcdefghij" for k in range(7)]  # grouped by subject
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    cfg = load_config("jobs/configs/sd15-sim-tiny.yaml", [f"data.prompts={tmp_path / 'p.txt'}"])
    rows = grid_prompts(cfg)
    assert [r.split(",")[0][-1] for r in rows] == list("abcdefghij")  # one row per subject
    (tmp_path / "few.txt").write_text("one\ntwo\nthree")
    cfg = load_config("jobs/configs/sd15-sim-tiny.yaml", [f"data.prompts={tmp_path / 'few.txt'}"])
    assert grid_prompts(cfg, rows=5) == ["one", "two", "three", "one", "two"]
    assert grid_prompts(load_config("jobs/configs/sd15-sim-tiny.yaml")) == list(DEFAULT_PROMPTS)
