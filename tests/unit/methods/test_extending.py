"""docs/extending.md's worked examples, run as written: the code blocks of its method section and
of its family section are executed, registered in the methods and families tables, and checked
with the same contract tests the built-in methods and families pass."""
import re
import sys
import types

import pytest
import torch
import yaml

import test_methods_contract as contract
from hyperscale.storage.local import REPO
from hyperscale.config import load_config
from hyperscale.methods import METHODS
from hyperscale.models.build import build_denoiser, load_denoiser, save_denoiser
from hyperscale.models.families import FAMILIES, family_of
from hyperscale.train.step import Role, StepCounters, two_player_step

DOC = REPO / "docs" / "extending.md"


def _section(number: int) -> str:
    text = DOC.read_text()
    return re.split(r"^## ", text, flags=re.M)[number]


def _run_blocks(number: int, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module  # pydantic resolves annotations through the module
    for block in re.findall(r"```python\n(.*?)```", _section(number), flags=re.S):
        exec(compile(block, f"{DOC}#{name}", "exec"), module.__dict__)
    return module


def _yaml_blocks(number: int) -> list[dict]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", _section(number), flags=re.S)]


@pytest.fixture
def kd(monkeypatch):
    m = _run_blocks(1, "docs_extending_kd")
    monkeypatch.setitem(METHODS, "kd", (m.KdConfig, m.Kd))
    return m


@pytest.fixture
def class_mlp(monkeypatch):
    m = _run_blocks(2, "docs_extending_class_mlp")
    monkeypatch.setitem(FAMILIES, "class_mlp", m.ClassMLP())
    return m


MLP = ["model.family=class_mlp", "model.in_channels=2", "model.num_classes=3"]


def test_the_method_example_passes_the_method_contract(kd, tmp_path):
    (preset,) = _yaml_blocks(1)
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(preset))
    assert load_config(tmp_path / "kd.yaml").method.teacher_steps == 8  # the preset loads as written
    method, roles, frozen, batch = contract._setup("kd", {"teacher_steps": 2})
    assert [r.name for r in method.roles()] == ["generator", "teacher"] and batch.x0 is None
    everything = contract._grads(method, "generator_loss", roles, frozen, batch, None)
    trainer_mode = contract._grads(method, "generator_loss", roles, frozen, batch, roles["generator"])
    assert contract._nonzero(everything["generator"]) and not contract._nonzero(trainer_mode["teacher"])
    assert contract._same(everything["generator"], trainer_mode["generator"])
    assert method.sampler(roles["generator"]).one_step.timestep == 999


def test_the_method_example_learns_its_target(kd):
    """A few steps of the real two-player step lower the loss on a fixed batch."""
    method, modules, frozen, batch = contract._setup("kd", {"teacher_steps": 2})
    opt = torch.optim.Adam(modules["generator"].parameters(), lr=1e-3)
    role = Role("generator", modules["generator"], opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), 1.0)
    losses, counters = [], StepCounters()
    for _ in range(6):
        torch.manual_seed(0)  # the same z every step: the loss on one fixed problem
        losses.append(float(two_player_step(method, lambda: batch, {"generator": role}, frozen, None,
                                            counters)["loss/kd"]))
    assert losses[-1] < losses[0]


def test_the_family_example_round_trips_and_passes_the_method_contract(class_mlp, tmp_path):
    cfg = load_config(None, MLP)
    torch.manual_seed(0)
    den = build_denoiser(cfg.model, cfg.schedule).eval()
    fam = family_of(den)
    assert fam.name == "class_mlp" and fam.sample_shape(den) == (2,) and not fam.bounded
    assert torch.equal(fam.null_condition(den, 2).labels, torch.tensor([3, 3]))
    save_denoiser(den, tmp_path / "mlp")
    back = load_denoiser(tmp_path / "mlp")
    x, t, y = torch.randn(4, 2), torch.tensor([5, 200, 600, 999]), fam.encode_condition(None, [0, 1, 2, 0])
    with torch.no_grad():
        assert torch.equal(back(x, t, y), den(x, t, y))
    method, roles, frozen, batch = contract._setup("sim", model=MLP)  # SIM, data-free, on the new family
    everything = contract._grads(method, "generator_loss", roles, frozen, batch, None)
    assert contract._nonzero(everything["generator"])
    critic = contract._grads(method, "critic_loss", roles, frozen, batch, roles["fake_score"])
    assert contract._nonzero(critic["fake_score"]) and not contract._nonzero(critic["generator"])


def test_an_unknown_family_is_a_config_error():
    from hyperscale.config import ConfigError

    with pytest.raises(ConfigError, match="model.family: unknown family 'class_mlp'; allowed: class_unet"):
        load_config(None, MLP)
