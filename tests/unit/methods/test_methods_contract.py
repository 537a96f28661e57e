"""One contract, every registered method: finite per-sample losses of shape (B,), gradients
that reach the intended role whatever the requires_grad flags, and a teacher that never changes
under the real two-player step. Runs on a tiny class-conditional UNet denoiser."""
import copy

import pytest
import torch

from hyperscale.config import load_config
from hyperscale.methods.base import Batch
from hyperscale.methods import build_method, method_config_class, method_names
from hyperscale.methods.roles import build_roles
from hyperscale.models.build import build_denoiser
from hyperscale.models.families import family_of
from hyperscale.train.step import Role, StepCounters, two_player_step

TINY = ["model.block_out_channels=[8,16]", "model.attention_levels=[false,true]"]
B = 2


def _tiny_rewards(specs) -> torch.nn.Module:
    """A tiny random classifier per configured reward (class-consistency interface)."""
    from hyperscale.models.classifier import ClassifierConfig, FashionClassifier
    from hyperscale.models.rewards import ClassConsistencyReward, RewardSet

    tiny = ClassifierConfig(channels=(4, 4, 4), hidden=8, num_classes=10)
    return RewardSet({s.name: ClassConsistencyReward(FashionClassifier(tiny)) for s in specs})


def _setup(name: str, overrides: dict | None = None, model: list[str] = TINY):
    """A method, its roles built by the trainer's own builder on a tiny random teacher of the
    family ``model`` configures, and one batch of that family's shape and conditions."""
    torch.manual_seed(0)
    cfg = load_config(None, model)
    method = build_method(method_config_class(name)(**(overrides or {})))
    fresh = lambda: build_denoiser(cfg.model, cfg.schedule)  # noqa: E731

    def perturbed(_name, module):
        # Trainable copies must differ from the teacher as after some training: a fresh copy
        # makes teacher-vs-copy differences (and so some gradients) exactly zero.
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return module

    built = build_roles(method, teacher=fresh, fresh=fresh, rewards=_tiny_rewards, prepare=perturbed)
    gen = built.trainable[method.generator]
    family = family_of(gen)
    g = torch.Generator().manual_seed(1)
    cond = family.encode_condition(gen, torch.randint(0, len(family.class_names(gen)), (B,), generator=g))
    x0 = torch.rand((B,) + family.sample_shape(gen), generator=g) * 2 - 1
    batch = Batch(cond=cond, x0=x0 if method.batch == "data" else None)
    return method, built.trainable, built.frozen, batch


def _grads(method, loss_name: str, roles: dict, frozen: dict, batch: Batch, active) -> dict:
    """Parameter gradients of every role after one backward of the mean loss; ``active`` is the
    module whose parameters require grad (None: every role's, teacher included)."""
    modules = list(roles.values()) + list(frozen.values())
    for m in modules:
        m.requires_grad_(active is None or m is active)
    torch.manual_seed(2)
    out = getattr(method, loss_name)(batch, **roles, **frozen)
    assert out.loss.shape == (B,) and torch.isfinite(out.loss).all(), loss_name
    assert all(torch.isfinite(v).all() and not v.requires_grad for v in out.metrics.values())
    out.loss.mean().backward()
    grads = {n: [None if p.grad is None else p.grad.clone() for p in m.parameters()]
             for n, m in (roles | frozen).items()}
    for m in modules:
        m.zero_grad(set_to_none=True)
        m.requires_grad_(False)
    return grads


def _nonzero(gs) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in gs)


def _same(a, b) -> bool:
    """Same gradients up to float32 rounding: |x - y| <= 1e-5 of the largest |y| over all the role's
    parameters. Which gradients autograd is asked for can change the CPU kernels (an AMD EPYC
    differed by 7e-9 where the largest entry is 1.2e-2; near-zero tensors, ~1e-11, by 100% of
    themselves); a loss that read requires_grad would drop whole terms."""
    if any((x is None) != (y is None) for x, y in zip(a, b)):
        return False
    pairs = [(x, y) for x, y in zip(a, b) if x is not None]
    scale = max((float(y.abs().max()) for _, y in pairs), default=0.0)
    return all(x.shape == y.shape and float((x - y).abs().max()) <= 1e-5 * scale for x, y in pairs)


# Config variants of registered methods whose role sets differ from their defaults.
VARIANTS = [
    ("tscd", {"adversarial": True, "stages": [{"segments": 2, "adv_weight": 0.5}]}),
    ("tscd", {"student": "lora", "lora_rank": 4, "target_network": "online", "target": "random"}),
    ("cd", {"edges": "floor", "loss_type": "huber", "timesteps": "uniform"}),
    ("dmd", {"regression": "online", "regression_steps": 2, "student": "lora", "lora_rank": 4,
             "rewards": [{"name": "class", "kind": "class_consistency", "margin": 0.0}]}),
    ("feedback", {"student": "lora", "lora_rank": 4, "teacher_reg_weight": 0.5}),
]


@pytest.fixture(params=[(n, None) for n in method_names()] + VARIANTS,
                ids=lambda p: p[0] if p[1] is None else p[0] + "[" + ",".join(sorted(p[1])) + "]")
def setup(request):
    return _setup(*request.param)


def test_generator_loss_gradients_reach_the_generator_and_ignore_requires_grad(setup):
    method, roles, frozen, batch = setup
    gen = method.generator
    everything = _grads(method, "generator_loss", roles, frozen, batch, None)
    trainer_mode = _grads(method, "generator_loss", roles, frozen, batch, roles[gen])
    assert _nonzero(everything[gen])
    assert _same(everything[gen], trainer_mode[gen])  # the loss does not read requires_grad
    assert all(not _nonzero(g) for n, g in trainer_mode.items() if n != gen)


def test_critic_loss_trains_the_critic_only(setup):
    method, roles, frozen, batch = setup
    if method.critic is None:
        pytest.skip("single-player method")
    everything = _grads(method, "critic_loss", roles, frozen, batch, None)
    trainer_mode = _grads(method, "critic_loss", roles, frozen, batch, roles[method.critic])
    assert _nonzero(everything[method.critic])
    assert _same(everything[method.critic], trainer_mode[method.critic])
    # generator samples are detached: nothing reaches the generator (or the teacher)
    assert all(not _nonzero(g) for n, g in everything.items() if n != method.critic)


def test_teacher_never_changes_and_trainable_roles_do(setup):
    method, modules, frozen, batch = setup
    frozen_before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in frozen.items()}
    before = {n: copy.deepcopy(m.state_dict()) for n, m in modules.items()}
    roles = {}
    for n, m in modules.items():
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        roles[n] = Role(n, m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), 1.0)
    counters = StepCounters()
    torch.manual_seed(3)
    for _ in range(2):
        two_player_step(method, lambda: batch, roles, frozen, None, counters)
    assert counters.skipped == {}
    for n, before_n in frozen_before.items():  # the teacher and every other frozen role
        for k, v in before_n.items():
            assert torch.equal(frozen[n].state_dict()[k], v), (n, k)
    for n, m in modules.items():
        assert any(not torch.equal(v, before[n][k]) for k, v in m.state_dict().items()), n
