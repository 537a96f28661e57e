"""Local paths as the Ray workers see them."""


def test_absolute_local_resolves_paths_and_shard_patterns(tmp_path, monkeypatch):
    from hyperscale.storage.local import absolute_local

    (tmp_path / "shards").mkdir()
    (tmp_path / "prompts.txt").write_text("a\n")
    monkeypatch.chdir(tmp_path)
    assert absolute_local("prompts.txt") == str(tmp_path / "prompts.txt")
    # a brace pattern: found by its directory (the Ray workers' cwd differs from the driver's)
    assert absolute_local("shards/train-{000000..000009}.tar") == str(tmp_path / "shards" / "train-{000000..000009}.tar")
    for passthrough in ("s3://bucket/x-{0..1}.tar", "org/model-id", "latest", None, "missing/x-{0..1}.tar"):
        assert absolute_local(passthrough) == passthrough


def test_repo_relative_names_no_machine_paths():
    from hyperscale.storage.local import REPO, repo_relative

    assert repo_relative(str(REPO / "assets" / "teacher")) == "assets/teacher"
    assert repo_relative(REPO / "runs" / "x" / ".." / "y") == "runs/y"
    for kept in ("assets/teacher", "s3://bucket/run", "stable-diffusion-v1-5/stable-diffusion-v1-5", "/elsewhere/model"):
        assert repo_relative(kept) == kept
    assert repo_relative(None) is None  # a teacher trained from scratch has no source
