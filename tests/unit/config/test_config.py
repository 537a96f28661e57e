import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hyperscale.storage.local import REPO
from hyperscale.config import ConfigError, from_dict, load_config, to_yaml

ROOT = REPO  # the repository root
SERVE_CONFIGS = {"serve.yaml"}  # Ray Serve configs (serve run/deploy format), not training presets


def _is_training_preset(path: Path) -> bool:
    """Not a Serve config, a sweep (tests/integration/tune/test_tune.py) or a pipeline of phases (tests/integration/pipeline/test_pipeline.py)."""
    if path.name in SERVE_CONFIGS or path.name.startswith("sweep-"):
        return False
    return "phases" not in (yaml.safe_load(path.read_text()) or {})


PRESETS = sorted(p for p in (ROOT / "jobs" / "configs").glob("*.yaml") if _is_training_preset(p))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates_and_round_trips(preset):
    cfg = load_config(preset)
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_dotted_overrides_are_typed():
    cfg = load_config(ROOT / "jobs/configs/teacher.yaml",
                      ["train.lr=1e-3", "model.block_out_channels=[8,16,16]", "schedule.kind=cosine",
                       "train.resume_from_checkpoint=latest"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.block_out_channels == [8, 16, 16]
    assert cfg.schedule.kind == "cosine"
    assert cfg.train.resume_from_checkpoint == "latest"


@pytest.mark.parametrize("override, needle", [
    ("train.bogus=1", "train.bogus: unknown key; allowed keys here: adam_beta1"),
    ("nosuchsection.x=1", "nosuchsection: unknown key; allowed keys here: data, method, model"),
    ("train.lr=fast", "train.lr"),
    ("schedule.kind=sigmoid", "'linear', 'scaled_linear' or 'cosine'"),
    ("method.name=nope", "unknown method 'nope'; allowed: cd, denoising, dmd, feedback, sim, tscd"),
    ("method.weighting=foo", "'uniform' or 'min_snr'"),
    ("model.attention_levels=[true]", "one entry per block_out_channels"),
    ("train.max_steps", "not of the form dotted.key=value"),
])
def test_bad_input_names_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "jobs/configs/teacher.yaml", [override])
    assert needle in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_dry_run_prints_resolved_config_and_exits_zero():
    out = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain_teacher.py"), "--dry-run", "train.max_steps=7"],
                         capture_output=True, text=True, check=True).stdout
    tree = yaml.safe_load(out)
    assert tree["train"]["max_steps"] == 7 and tree["method"]["name"] == "denoising"


def test_cli_rejects_unknown_key_with_exit_2():
    p = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain_teacher.py"), "--dry-run", "train.nope=1"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "train.nope: unknown key" in p.stderr


def test_method_section_survives_dump_and_reload():
    from hyperscale.config import from_dict

    cfg = load_config(ROOT / "jobs/configs/teacher.yaml", ["method.label_dropout=0.3"])
    assert from_dict(cfg.model_dump(mode="json")).method.label_dropout == 0.3  # what Ray workers receive
    assert "label_dropout: 0.3" in to_yaml(cfg)


def test_method_key_errors_name_the_method_section():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "jobs/configs/teacher.yaml", ["method.label_dropotu=0.3"])
    assert "method.label_dropotu: unknown key; allowed keys here: label_dropout" in str(err.value)


@pytest.mark.parametrize("name", sorted(SERVE_CONFIGS))
def test_serve_configs_validate(name):
    from hyperscale.serve.settings import load_serve_config

    http, app, settings = load_serve_config(ROOT / "jobs" / "configs" / name)
    assert app["import_path"] == "hyperscale.serve.app:build_app" and http["host"] == "127.0.0.1"
    assert settings.max_images_per_request >= 1
    with pytest.raises(ConfigError, match="args.max_batch_size"):
        load_serve_config(ROOT / "jobs" / "configs" / name, ["max_batch_size=lots"])
    with pytest.raises(ConfigError, match="args.batchign"):
        load_serve_config(ROOT / "jobs" / "configs" / name, ["batchign=true"])


def test_per_role_optimiser_settings_inherit_critic_from_generator_from_train():
    import torch

    from hyperscale.config import role_train
    from hyperscale.train import engines

    cfg = load_config(None, ["train.lr=0.001", "train.adam_beta1=0.5", "optim.generator.lr=0.0002",
                             "optim.critic.adam_beta2=0.99", "train.engine=torch"])
    gen, critic = role_train(cfg, "generator"), role_train(cfg, "critic")
    assert (gen.lr, gen.adam_beta1, gen.adam_beta2) == (0.0002, 0.5, 0.999)
    assert (critic.lr, critic.adam_beta1, critic.adam_beta2) == (0.0002, 0.5, 0.99)
    assert role_train(load_config(None, ["optim.critic.lr=0.01"]), "generator") == load_config().train
    disc = role_train(load_config(None, ["optim.critic.lr=0.01", "optim.discriminator.adam_beta1=0.0"]),
                      "discriminator")
    assert (disc.lr, disc.adam_beta1) == (0.01, 0.0)  # the discriminator inherits the critic's lr
    # what the trainer builds from them: each role's optimiser carries its own settings
    for t, lr, betas in ((gen, 0.0002, (0.5, 0.999)), (critic, 0.0002, (0.5, 0.99))):
        role = engines.build_role("r", torch.nn.Linear(2, 2), t, 4, 1, torch.device("cpu"))
        group = role.optimizer.param_groups[0]
        assert group["initial_lr"] == lr and group["betas"] == betas
    with pytest.raises(ConfigError, match="optim.critic.lr"):
        load_config(None, ["optim.critic.lr=-1"])
