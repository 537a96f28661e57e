"""Hyper-SD methods (TSCD / CD, DMD, feedback), the LoRA student and its export, reward models.

The shared contract (finite losses, gradients reach only the intended role, the teacher never
changes) runs for every registered method and the config variants in test_methods_contract.py;
this file checks the math and the file formats. Tiny models, CPU, no Ray, no downloads."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from hyperscale.storage.local import REPO
from hyperscale.config import load_config, to_yaml
from hyperscale.diffusion import segments as seg
from hyperscale.diffusion.sampling import sample_ddim
from hyperscale.diffusion.schedule import DiscreteVP, Prediction
from hyperscale.methods.base import Batch, RoleSpec
from hyperscale.methods.dmd import Dmd, DmdConfig, dmd_direction, dmd_loss, teacher_ode
from hyperscale.methods.scores import generator_noise
from hyperscale.methods.feedback import Feedback, FeedbackConfig, RewardSpec, reward_hinge, truncated_rollout
from hyperscale.methods import build_method, method_names
from hyperscale.methods.toy import gaussian_posterior_mean
from hyperscale.methods.tscd import CdConfig, Tscd, TscdConfig
from hyperscale.models.build import build_denoiser, load_denoiser
from hyperscale.models.lora import (KOHYA_WEIGHTS, LORA_WEIGHTS, LoraDenoiser, apply_lora, load_lora, merge_lora,
                                    read_lora, save_lora, save_student)

TINY = ["model.block_out_channels=[8,16]", "model.attention_levels=[false,true]"]
B = 3


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, TINY)


@pytest.fixture
def teacher(cfg):
    torch.manual_seed(0)
    return build_denoiser(cfg.model, cfg.schedule).eval().requires_grad_(False)


def _perturbed(module: nn.Module, seed: int, scale: float = 0.02) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def _batch(cfg, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randint(0, cfg.model.num_classes, (B,), generator=g)
    x0 = torch.rand(B, 1, cfg.model.sample_size, cfg.model.sample_size, generator=g) * 2 - 1
    return Batch(cond=cond, x0=x0)


def _loss_and_grads(method, batch, seed, **roles):
    gen = roles["generator"]
    gen.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = method.generator_loss(batch, **roles)
    out.loss.mean().backward()
    grads = [p.grad.clone() for p in gen.parameters() if p.grad is not None]
    gen.zero_grad(set_to_none=True)
    return out, grads


class Raising(nn.Module):
    """A role that must never be called."""

    def forward(self, *a, **k):
        raise AssertionError("this network must not be evaluated")


# ---------------------------------------------------------------- methods table, presets

def test_new_methods_are_registered_and_presets_validate(tmp_path):
    assert {"tscd", "cd", "dmd", "feedback"} <= set(method_names())
    for name, want in [("hypersd-tiny", "tscd"), ("cd-tiny", "cd"), ("dmd-tiny", "dmd")]:
        c = load_config(REPO / "jobs" / "configs" / f"{name}.yaml")
        assert c.method.name == want
        path = tmp_path / f"{name}.yaml"  # the resolved dump loads back to the same tree
        path.write_text(to_yaml(c))
        assert load_config(path) == c
    with pytest.raises(Exception, match="one segment"):
        load_config(None, ["method.name=cd", "method.stages=[{segments: 2}]"])


# ---------------------------------------------------------------- TSCD / CD

def test_k1_tscd_equals_the_cd_baseline_exactly(cfg, teacher):
    """Same loss values and generator gradients, same inputs and seed: one code path."""
    gen = _perturbed(copy.deepcopy(teacher).train(), 3)
    target = _perturbed(copy.deepcopy(teacher), 4).requires_grad_(False)
    batch = _batch(cfg)
    tscd = build_method(TscdConfig(stages=[{"segments": 1, "steps": 10}]))
    cd = build_method(CdConfig())
    gen.requires_grad_(True)
    a, ga = _loss_and_grads(tscd, batch, 7, generator=gen, teacher=teacher, target=target)
    b, gb = _loss_and_grads(cd, batch, 7, generator=gen, teacher=teacher, target=target)
    assert torch.equal(a.loss, b.loss) and len(ga) == len(gb) > 0
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def _reference_cd(x0, cond, generator, teacher, target, skip: int):
    """Plain LCM-style consistency distillation written out by hand: t_n on {s-1, 2s-1, ...},
    one teacher DDIM step to t_n - s (clean data below 0), student and target x0 predictions
    (the consistency function's value at the clean boundary), per-sample MSE. Same RNG order
    as the method: t_n, then the noise."""
    abar = teacher.schedule.alphas_cumprod
    grid = torch.arange(1, abar.shape[0] // skip + 1) * skip - 1
    t = grid[torch.randint(len(grid), (x0.shape[0],))]
    eps = torch.randn_like(x0)
    a_t = abar[t].float().view(-1, 1, 1, 1)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    with torch.no_grad():
        e_teacher = teacher(x_t, t, cond, out=Prediction.eps)
        x0_teacher = (x_t - (1 - a_t).sqrt() * e_teacher) / a_t.sqrt()
        s = t - skip
        a_s = torch.where(s >= 0, abar[s.clamp(min=0)], torch.ones_like(abar[0])).float().view(-1, 1, 1, 1)
        x_s = a_s.sqrt() * x0_teacher + (1 - a_s).sqrt() * e_teacher
        tgt = torch.where((s >= 0).view(-1, 1, 1, 1), target(x_s, s.clamp(min=0), cond, out=Prediction.x0), x_s)
    pred = generator(x_t, t, cond, out=Prediction.x0)
    return (pred - tgt).pow(2).flatten(1).mean(1)


def test_cd_equals_an_independent_lcm_style_reference(cfg, teacher):
    gen = _perturbed(copy.deepcopy(teacher).train(), 3).requires_grad_(True)
    target = _perturbed(copy.deepcopy(teacher), 4).requires_grad_(False)
    batch = _batch(cfg)
    out, grads = _loss_and_grads(build_method(CdConfig()), batch, 11, generator=gen, teacher=teacher, target=target)
    torch.manual_seed(11)
    ref = _reference_cd(batch.x0, batch.cond, gen, teacher, target, 20)
    ref.mean().backward()
    ref_grads = [p.grad.clone() for p in gen.parameters() if p.grad is not None]
    assert torch.allclose(out.loss, ref.detach(), rtol=1e-5, atol=1e-7)
    flat, ref_flat = torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in ref_grads])
    # float32 rounding only: the two compute x0 from eps in a different order
    assert torch.allclose(flat, ref_flat, rtol=1e-4, atol=1e-6 * float(ref_flat.abs().max()))


def test_target_is_the_teachers_ddim_step_when_it_reaches_the_edge(cfg, teacher):
    """k = 50 segments of 20 with a skip of 20: every teacher step lands on its segment's lower
    edge, so the target is the teacher's DDIM solution there (the boundary condition
    f(x, e, e) = x) and the target network is never evaluated."""
    gen = _perturbed(copy.deepcopy(teacher), 3)
    method = build_method(TscdConfig(stages=[{"segments": 50}], num_ddim_timesteps=50))
    torch.manual_seed(5)
    x0 = _batch(cfg).x0.repeat(4, 1, 1, 1)
    cond = _batch(cfg).cond.repeat(4)
    p = method.consistency_pair(x0, cond, generator=gen, teacher=teacher, target=Raising())
    assert (p["t_prev"] == p["edge"]).all() and (p["t_end"] == p["edge"]).all()
    sched = teacher.schedule
    with torch.no_grad():
        eps = teacher(p["x_t"], p["t_n"], cond, out=Prediction.eps)
    want = seg.move(sched, p["x_t"], eps, p["t_n"], p["edge"])
    assert torch.allclose(p["target"], want, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4])
def test_edge_target_is_the_target_networks_prediction_moved_to_the_edge(cfg, teacher, k):
    gen = _perturbed(copy.deepcopy(teacher), 3)
    target = _perturbed(copy.deepcopy(teacher), 4)
    method = build_method(TscdConfig(stages=[{"segments": k}]))
    torch.manual_seed(6)
    batch = _batch(cfg)
    with torch.no_grad():
        p = method.consistency_pair(batch.x0, batch.cond, generator=gen, teacher=teacher, target=target)
        sched = teacher.schedule
        assert (p["t_end"] == p["edge"]).all() and (p["t_end"] < p["t_prev"]).all()
        eps_t = target(p["x_prev"], p["t_prev"], batch.cond, out=Prediction.eps)
        a_p = sched.abar(p["t_prev"]).float().view(-1, 1, 1, 1)
        a_e = sched.abar(p["edge"]).float().view(-1, 1, 1, 1)
        x0_t = (p["x_prev"] - (1 - a_p).sqrt() * eps_t) / a_p.sqrt()
        assert torch.allclose(p["target"], a_e.sqrt() * x0_t + (1 - a_e).sqrt() * eps_t, atol=1e-5)
        eps_s = gen(p["x_t"], p["t_n"], batch.cond, out=Prediction.eps)
        a_n = sched.abar(p["t_n"]).float().view(-1, 1, 1, 1)
        x0_s = (p["x_t"] - (1 - a_n).sqrt() * eps_s) / a_n.sqrt()
        assert torch.allclose(p["pred"], a_e.sqrt() * x0_s + (1 - a_e).sqrt() * eps_s, atol=1e-5)
        if k == 1:  # trailing k = 1: the edge is clean data, the target is the target's x0 prediction
            assert (p["edge"] == -1).all()
            assert torch.allclose(p["target"], target(p["x_prev"], p["t_prev"], batch.cond, out=Prediction.x0),
                                  atol=1e-5)


def test_online_target_is_a_stop_gradient_copy(cfg, teacher):
    """target_network = online equals an EMA target that holds the same weights: same loss, same
    gradient (nothing flows through the target branch)."""
    gen = _perturbed(copy.deepcopy(teacher).train(), 3).requires_grad_(True)
    batch = _batch(cfg)
    online = build_method(TscdConfig(target_network="online", target="random"))
    ema = build_method(TscdConfig(target_network="ema", target="random"))
    a, ga = _loss_and_grads(online, batch, 9, generator=gen, teacher=teacher)
    b, gb = _loss_and_grads(ema, batch, 9, generator=gen, teacher=teacher,
                            target=copy.deepcopy(gen).requires_grad_(False))
    assert torch.allclose(a.loss, b.loss) and all(torch.allclose(x, y) for x, y in zip(ga, gb))
    with pytest.raises(ValueError, match="target"):
        ema.generator_loss(batch, generator=gen, teacher=teacher)


def test_stage_schedule_sampling_and_sampler_spec(cfg, teacher):
    method = build_method(TscdConfig())
    assert _spec(method, "target") == RoleSpec("target", "frozen", "ema", source="generator", decay=0.95)
    ks = []
    for step in (0, 999, 1000, 2500, 3999, 10 ** 6):
        assert method.set_global_step(step) == method.stage
        ks.append(method.segments)
    assert ks == [8, 8, 4, 2, 1, 1]
    assert method.sampler(teacher).to_extra()["generator"] == {"timestep": 999, "noise_input": "unit"}
    method.set_global_step(1000)
    calls = []
    counting = _Counting(teacher, calls)
    z = torch.randn(2, 1, 28, 28)
    method.sample(counting, z, torch.tensor([0, 1]))
    assert calls == [999, 749, 499, 249] and method.sampler(teacher).few_step.num_steps == 4
    assert method.sampler(teacher).one_step is None and "generator" not in method.sampler(teacher).to_extra()
    assert [r.name for r in build_method(TscdConfig(target_network="online")).roles()] == ["generator", "teacher"]


def _spec(method, name: str) -> RoleSpec:
    return {r.name: r for r in method.roles()}[name]


class _Counting(nn.Module):
    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls = inner, calls

    @property
    def schedule(self):
        return self.inner.schedule

    def forward(self, x, t, cond=None, out=Prediction.eps):
        self.calls.append(int(t[0]))
        return self.inner(x, t, cond, out=out)


def test_lora_config_needs_a_lora_generator(cfg, teacher):
    method = build_method(TscdConfig(student="lora", lora_rank=4, target_network="online"))
    with pytest.raises(TypeError, match="roles"):
        method.generator_loss(_batch(cfg), generator=copy.deepcopy(teacher), teacher=teacher)
    gen = _spec(method, "generator").build(teacher)
    assert isinstance(gen, LoraDenoiser)

    class Wrapper(nn.Module):  # an engine / DDP-style wrapper exposing ``.module``
        def __init__(self, module):
            super().__init__()
            self.module = module

    from hyperscale.methods.scores import check_student

    check_student(Wrapper(gen), method.config)
    with pytest.raises(TypeError):
        check_student(Wrapper(copy.deepcopy(teacher)), method.config)
    out = method.generator_loss(_batch(cfg), generator=gen, teacher=teacher)
    assert torch.isfinite(out.loss).all()


def test_discriminator_heads_on_teacher_features(cfg, teacher):
    from hyperscale.methods.adversarial import feature_channels, hinge_d, hinge_g, teacher_features

    x = torch.randn(2, 1, 28, 28)
    feats = teacher_features(teacher, x, torch.tensor([10, 500]), torch.tensor([1, 2]))
    assert [f.shape[1] for f in feats] == feature_channels(teacher) == [8, 16, 16]
    unet = teacher.unet
    assert all(not b._forward_hooks for b in list(unet.down_blocks) + [unet.mid_block])  # hooks removed
    method = build_method(TscdConfig(adversarial=True))
    assert method.trainable == ("generator", "discriminator") and method.critic == "discriminator"
    disc = _spec(method, "discriminator").build(teacher)
    assert disc(feats).shape == (2,)
    assert build_method(TscdConfig()).critic is None and build_method(TscdConfig()).critic_steps() == 0
    assert torch.equal(hinge_d(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])), torch.tensor([0.0, 2.0]))
    assert torch.equal(hinge_g(torch.tensor([0.5])), torch.tensor([-0.5]))


# ---------------------------------------------------------------- DMD

def _kl_gauss(m1, S1, m2, S2):
    """KL(N(m1, S1) || N(m2, S2)) in closed form."""
    d = m1.shape[0]
    S2i = torch.linalg.inv(S2)
    diff = m2 - m1
    return 0.5 * (torch.trace(S2i @ S1) + diff @ S2i @ diff - d + torch.logdet(S2) - torch.logdet(S1))


def _gh(n: int, dims: int):
    x, w = np.polynomial.hermite.hermgauss(n)
    x = torch.tensor(x * math.sqrt(2), dtype=torch.float64)
    w = torch.tensor(w / math.sqrt(math.pi), dtype=torch.float64)
    return (torch.cartesian_prod(*[x] * dims).reshape(-1, dims),
            torch.cartesian_prod(*[w] * dims).reshape(-1, dims).prod(1))


def _dmd_gaussian_grads(normalize: bool, t: int = 300):
    """Gradients w.r.t. theta = (m, A) of the DMD surrogate (exact quadrature over z, eps) for a
    linear generator x0 = m + A z, N(mu, Sigma) data, exact real and fake denoisers, and of
    KL(q_t || p_t) in closed form."""
    f64 = torch.float64
    mu, cov = torch.tensor([0.5, -0.3], dtype=f64), torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=f64)
    m = torch.tensor([0.1, 0.2], dtype=f64, requires_grad=True)
    A = torch.tensor([[1.3, 0.3], [-0.2, 0.8]], dtype=f64, requires_grad=True)
    sched = DiscreteVP.from_config("linear", 1000)
    alpha, sigma = (v.to(f64) for v in sched.alpha_sigma(t))
    nodes, w = _gh(6, 4)  # the integrand is a polynomial of degree 2: exact
    z, eps = nodes[:, :2], nodes[:, 2:]
    x0 = m + z @ A.T
    x_t = alpha * x0.detach() + sigma * eps
    sig_ve = sigma / alpha
    d_real = gaussian_posterior_mean(x_t / alpha, sig_ve, mu, cov)
    d_fake = gaussian_posterior_mean(x_t / alpha, sig_ve, m.detach(), (A @ A.T).detach())  # frozen at theta0
    g = dmd_direction(x0, d_real, d_fake, normalize)
    loss = (w * dmd_loss(x0, g)).sum()
    gm, gA = torch.autograd.grad(loss, (m, A))
    eye = torch.eye(2, dtype=f64)
    kl = _kl_gauss(alpha * m, alpha ** 2 * A @ A.T + sigma ** 2 * eye, alpha * mu, alpha ** 2 * cov + sigma ** 2 * eye)
    km, kA = torch.autograd.grad(kl, (m, A))
    scale = 2 * alpha ** 2 / sigma ** 2  # D = 2 entries averaged; s_q - s_p = alpha (D_q - D_p) / sigma^2
    return torch.cat([gm, gA.flatten()]), torch.cat([km, kA.flatten()]), scale


def test_dmd_gradient_is_the_kl_gradient_on_a_gaussian():
    """Unnormalised: D alpha^2 / sigma^2 * grad L_DMD == grad KL(q_t || p_t), every generator
    parameter (mean and full matrix), exact quadrature against the closed-form KL."""
    ours, kl, scale = _dmd_gaussian_grads(normalize=False)
    assert torch.allclose(ours * scale, kl, rtol=1e-8, atol=1e-10), (ours * scale, kl)


def test_dmd_normalised_gradient_is_a_descent_direction_and_has_the_stated_x0_gradient():
    ours, kl, _ = _dmd_gaussian_grads(normalize=True)
    cos = float(ours @ kl / (ours.norm() * kl.norm()))
    assert cos > 0.9, cos
    # the stop-gradient trick: d L / d x0 = g / numel per sample, g = (fake - real) / mean|x0 - real|
    x0 = torch.randn(3, 2, 4, 4, requires_grad=True)
    real, fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    g = dmd_direction(x0, real, fake, True)
    want = (fake - real) / (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(g, want)
    dmd_loss(x0, g).sum().backward()
    assert torch.allclose(x0.grad, g / 32)
    assert torch.equal(dmd_direction(x0, real, torch.full_like(fake, float("nan")), True), torch.zeros_like(g))


def test_dmd_has_no_gradient_when_fake_equals_real(cfg, teacher):
    method = build_method(DmdConfig())
    gen = _perturbed(copy.deepcopy(teacher).train(), 3).requires_grad_(True)
    out, grads = _loss_and_grads(method, Batch(cond=torch.tensor([0, 1, 2])), 3, generator=gen,
                                 fake_score=copy.deepcopy(teacher), teacher=teacher)
    assert torch.equal(out.loss, torch.zeros(3)) and all(g.abs().max() == 0 for g in grads)


def test_dmd_regression_pairs(cfg, teacher):
    gen = _perturbed(copy.deepcopy(teacher).train(), 3)
    z = torch.randn(2, 1, 28, 28)
    cond = torch.tensor([3, 4])
    # one teacher step from T - 1 to clean data is the teacher's x0 prediction at z
    x0_teacher = teacher_ode(teacher, z, cond, 999, 1)
    ref = teacher(z, torch.full((2,), 999), cond, out=Prediction.x0)
    # x0 at t = 999 is eps / 0.006: |x0| ~ 250, so float32 rounding is judged against that scale
    err = float((x0_teacher - ref).abs().max() / ref.abs().max())
    assert err < 1e-6, err
    method = build_method(DmdConfig(regression="online", regression_steps=3, regression_weight=1.0))
    torch.manual_seed(0)
    out = method.generator_loss(Batch(cond=cond), generator=gen, fake_score=teacher, teacher=teacher)
    torch.manual_seed(0)  # replay: the same z, the teacher's 3-step ODE solution from it
    z = generator_noise(gen, cond)
    with torch.no_grad():
        want = (method.generate(gen, z, cond) - teacher_ode(teacher, z, cond, 999, 3)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.metrics["loss/regression"], want.mean())
    with pytest.raises(ValueError, match="regression"):  # pairs from a data stream: not offered
        DmdConfig(regression="batch")


# ---------------------------------------------------------------- feedback

class ConstReward(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, x0, cond):
        return self.values + 0.0 * x0.flatten(1).mean(1)


def test_reward_hinge_margins_and_weights():
    from hyperscale.models.rewards import RewardSet

    x0 = torch.zeros(3, 1, 2, 2, requires_grad=True)
    rewards = RewardSet({"a": ConstReward([0.0, 1.0, 3.0]), "b": ConstReward([5.0, 5.0, 5.0])})
    specs = [RewardSpec(name="a", kind="aesthetic", margin=2.0, weight=0.5),
             RewardSpec(name="b", kind="image_reward", margin=6.0, weight=2.0)]
    loss, metrics = reward_hinge(x0, None, rewards, specs)
    assert torch.allclose(loss, torch.tensor([0.5 * 2 + 2 * 1, 0.5 * 1 + 2 * 1, 0 + 2 * 1]))
    assert set(metrics) == {"reward/a", "reward/b"}
    with pytest.raises(ValueError, match="no model named"):
        reward_hinge(x0, None, rewards, [RewardSpec(name="c", kind="aesthetic")])


@pytest.mark.parametrize("i", [0, 2, 3])
def test_truncated_rollout_follows_the_sampler_then_takes_one_step_with_grad(teacher, i):
    student = _perturbed(copy.deepcopy(teacher), 3).requires_grad_(True)
    z, cond = torch.randn(2, 1, 28, 28), torch.tensor([1, 5])
    seen = []
    sample_ddim(student, z, cond, 4, spacing="trailing", callback=lambda s: seen.append(s))
    x0, x_t, t = truncated_rollout(student, z, cond, 4, i)
    assert x_t.grad_fn is None and x0.grad_fn is not None
    assert torch.equal(t, torch.full((2,), [999, 749, 499, 249][i]))
    want_x = z if i == 0 else seen[i - 1].x
    assert torch.allclose(x_t, want_x, atol=1e-5)
    assert torch.allclose(x0, seen[i].x0, atol=1e-4)


def test_feedback_loss_is_the_hinge_of_the_class_reward(cfg, teacher):
    from hyperscale.models.classifier import ClassifierConfig, FashionClassifier
    from hyperscale.models.rewards import ClassConsistencyReward, RewardSet

    torch.manual_seed(0)
    clf = FashionClassifier(ClassifierConfig(channels=(4, 4, 4), hidden=8))
    reward = RewardSet({"class": ClassConsistencyReward(clf)})
    method = build_method(FeedbackConfig(rewards=[{"name": "class", "kind": "class_consistency", "margin": 0.0}]))
    gen = _perturbed(copy.deepcopy(teacher).train(), 3).requires_grad_(True)
    out = method.generator_loss(Batch(cond=torch.tensor([0, 1, 2])), generator=gen, reward=reward)
    # margin 0 on log p <= 0: the hinge is -log p(c | x0) itself
    assert torch.allclose(out.loss.mean(), -out.metrics["reward/class"], atol=1e-6)
    out.loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_class_consistency_reward(cfg):
    from hyperscale.models.classifier import ClassifierConfig, FashionClassifier
    from hyperscale.models.rewards import ClassConsistencyReward

    torch.manual_seed(0)
    clf = FashionClassifier(ClassifierConfig(channels=(4, 4, 4), hidden=8))
    r = ClassConsistencyReward(clf)
    r.train()
    assert not r.classifier.training  # frozen rewards stay in eval mode
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    y = torch.tensor([3, 7])
    val = r(x, y)
    assert torch.allclose(val, clf(x).log_softmax(1)[torch.arange(2), y])
    val.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="real classes"):
        r(x, torch.tensor([10, 1]))
    assert torch.allclose(ClassConsistencyReward(clf, "prob")(x, y), val.detach().exp())
    assert r(torch.randn(2, 1, 14, 14), y).shape == (2,)  # resized to the classifier's input


def test_build_rewards_from_a_classifier_directory(tmp_path):
    from hyperscale.models.classifier import ClassifierConfig, FashionClassifier, save_classifier
    from hyperscale.models.rewards import build_rewards

    torch.manual_seed(0)
    clf = FashionClassifier(ClassifierConfig(channels=(4, 4, 4), hidden=8)).eval()
    save_classifier(clf, tmp_path / "clf", {"test_accuracy": 0.0})
    rs = build_rewards([RewardSpec(name="cls", kind="class_consistency", source=str(tmp_path / "clf"))])
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([0, 9])
    assert torch.allclose(rs(x, y)["cls"], clf(x).log_softmax(1)[torch.arange(2), y])
    assert not any(p.requires_grad for p in rs.parameters())


def _tiny_vision():
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                patch_size=8)


def test_aesthetic_loader_on_a_tiny_stand_in(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from hyperscale.models.rewards import _Head, build_rewards, clip_preprocess, save_reward_head

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**_tiny_vision(), projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "aes" / "clip")
    head = _Head(16).eval()
    save_reward_head(head, tmp_path / "aes")
    rs = build_rewards([RewardSpec(name="aes", kind="aesthetic", source=str(tmp_path / "aes"))])
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    got = rs(x, None)["aes"]
    with torch.no_grad():
        emb = clip(pixel_values=clip_preprocess(x, 32)).image_embeds
        want = head(emb / emb.norm(dim=-1, keepdim=True))[:, 0]
    assert got.shape == (2,) and torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    assert x.grad.abs().sum() > 0


def test_image_reward_loader_on_a_tiny_stand_in(tmp_path):
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from hyperscale.data.fashion_mnist import CLASS_NAMES
    from hyperscale.models.rewards import _Head, load_image_reward, prompts_for, save_reward_head

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dress", "trouser"]
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=40, bos_token_id=2,
                sep_token_id=3, pad_token_id=0)
    blip = BlipForImageTextRetrieval(BlipConfig(vision_config=_tiny_vision(), text_config=text,
                                                projection_dim=16)).eval()
    root = tmp_path / "ir"
    blip.save_pretrained(root / "blip")
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(root / "tokenizer")
    head = _Head(32).eval()
    save_reward_head(head, root, {"mean": 0.5, "std": 2.0, "max_length": 12})
    model = load_image_reward(root, CLASS_NAMES, "a photo of a {}")
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    y = torch.tensor([3, 1])
    assert prompts_for(y, CLASS_NAMES, "a photo of a {}") == ["a photo of a dress", "a photo of a trouser"]
    got = model(x, y)
    assert got.shape == (2,) and model.max_length == 12
    got.sum().backward()
    assert x.grad.abs().sum() > 0
    # strings pass through unchanged: the T2I path
    assert torch.allclose(model(x.detach(), ["a photo of a dress", "a photo of a trouser"]), got.detach(), atol=1e-6)


# ---------------------------------------------------------------- LoRA

def test_lora_wrapping_keeps_outputs_and_trains_the_adapter_only(teacher):
    x, t, c = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([1, 2])
    student = apply_lora(copy.deepcopy(teacher), rank=4, alpha=8)
    assert torch.equal(student(x, t, c), teacher(x, t, c))  # lora_B = 0 at init
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in student.named_parameters() if "lora_B" in n)
    student.requires_grad_(False)
    assert not any(p.requires_grad for p in student.parameters())
    student.requires_grad_(True)  # a whole-role toggle cannot unfreeze the base weights
    assert all(("lora_" in n) == p.requires_grad for n, p in student.named_parameters())
    student(x, t, c).pow(2).mean().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in student.named_parameters())
    assert torch.equal(student.schedule.alphas_cumprod, teacher.schedule.alphas_cumprod)
    assert student.unet_config == teacher.unet_config and student.prediction_type is teacher.prediction_type
    with pytest.raises(ValueError, match="not in the UNet"):
        apply_lora(copy.deepcopy(teacher), 4, target_modules=["to_q", "nonexistent"])


def _trained_lora(teacher, rank=4, alpha=8.0):
    student = apply_lora(copy.deepcopy(teacher), rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.lora_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return student


def test_lora_export_load_round_trip_and_merge(tmp_path, teacher):
    x, t, c = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([1, 2])
    student = _trained_lora(teacher)
    with torch.no_grad():
        want = student(x, t, c)
    assert not torch.allclose(want, teacher(x, t, c))
    save_lora(student, tmp_path / "lora", kohya=True)
    state, kwargs = read_lora(tmp_path / "lora")
    assert kwargs["r"] == 4 and kwargs["lora_alpha"] == 8.0 and "to_q" in kwargs["target_modules"]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    fresh = load_lora(copy.deepcopy(teacher), tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(fresh(x, t, c), want)
        merged = merge_lora(student)
        assert type(merged) is type(teacher) and set(merged.state_dict()) == set(teacher.state_dict())
        assert (merged(x, t, c) - want).abs().max() < 1e-5
    # diffusers reads the file and its metadata (the layout of save_lora_weights)
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    parsed = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "lora"), return_lora_metadata=True)
    assert set(parsed[0]) == {f"unet.{k}" for k in state} and parsed[-1]["unet.r"] == 4
    # kohya keys, alpha carried as given (not the rank)
    from safetensors.torch import load_file

    kohya = load_file(str(tmp_path / "lora" / KOHYA_WEIGHTS))
    assert all(k.startswith("lora_unet_") for k in kohya)
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    assert len(alphas) == len(state) // 2 and all(float(a) == 8.0 for a in alphas)
    assert (tmp_path / "lora" / LORA_WEIGHTS).is_file()


def test_lora_alpha_and_rank_set_the_scale_of_weights_outputs_and_files(tmp_path, teacher):
    """rank 3, alpha 5: neither peft's default alpha (8) nor alpha = rank, so the scale alpha / r
    = 5/3 shows in the merged weights (W + (alpha / r) B A, written out here per target module),
    in a re-loaded LoRA's outputs, in both files' alpha, and through StudentSection/init_student."""
    from safetensors.torch import load_file

    from hyperscale.methods.scores import StudentSection, build_student
    from hyperscale.models.lora import init_student

    rank, alpha = 3, 5.0
    x, t, c = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([1, 2])
    student = _trained_lora(teacher, rank=rank, alpha=alpha)
    lora = student.lora_state_dict()
    merged = merge_lora(student)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    assert len(modules) > 5
    for path in modules:
        a, b = lora[f"{path}.lora_A.weight"], lora[f"{path}.lora_B.weight"]
        w0 = teacher.unet.get_submodule(path).weight
        delta = (b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)).reshape(w0.shape)
        assert delta.abs().max() > 1e-3, path
        torch.testing.assert_close(merged.unet.get_submodule(path).weight, w0 + alpha / rank * delta,
                                   rtol=1e-5, atol=1e-6, msg=path)
    with torch.no_grad():
        want = student(x, t, c)
        assert (merged(x, t, c) - want).abs().max() < 1e-5
    # files: the diffusers metadata and every kohya .alpha carry 5, and a re-load reproduces the outputs
    save_lora(student, tmp_path / "lora", kohya=True)
    _, kwargs = read_lora(tmp_path / "lora")
    assert kwargs["r"] == rank and kwargs["lora_alpha"] == alpha
    kohya = load_file(str(tmp_path / "lora" / KOHYA_WEIGHTS))
    alphas = [float(v) for k, v in kohya.items() if k.endswith(".alpha")]
    assert len(alphas) == len(modules) and set(alphas) == {alpha}
    assert all(v.shape[0] == rank for k, v in kohya.items() if k.endswith(".lora_down.weight"))
    with torch.no_grad():
        assert torch.equal(load_lora(copy.deepcopy(teacher), tmp_path / "lora")(x, t, c), want)
    # a student built from the config section carries the same scale
    built = build_student(teacher, StudentSection(name="x", student="lora", lora_rank=rank, lora_alpha=alpha))
    assert built.lora_config.r == rank and built.lora_config.lora_alpha == alpha
    scales = [float(m.scaling["default"]) for m in built.modules() if hasattr(m, "scaling") and m.scaling]
    assert len(scales) == len(modules) and all(v == pytest.approx(alpha / rank) for v in scales)
    # continuing that export: same rank and alpha load (same outputs); alpha left at None (= rank) does not
    save_student(student, tmp_path / "export")
    again = init_student(copy.deepcopy(teacher), tmp_path / "export", True, rank, alpha)
    with torch.no_grad():
        assert torch.equal(again(x, t, c), want)
    with pytest.raises(ValueError, match="lora_alpha is 5.0 there, 3.0 here"):
        init_student(copy.deepcopy(teacher), tmp_path / "export", True, rank, None)


def test_save_student_writes_merged_weights_and_the_lora(tmp_path, teacher):
    x, t, c = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([1, 2])
    student = _trained_lora(teacher)
    save_student(student, tmp_path / "export", {"step": 3})
    with torch.no_grad():
        want = student(x, t, c)
        assert (load_denoiser(tmp_path / "export")(x, t, c) - want).abs().max() < 1e-5
        assert torch.equal(load_lora(copy.deepcopy(teacher), tmp_path / "export" / "lora")(x, t, c), want)
    save_student(copy.deepcopy(teacher), tmp_path / "full")
    assert not (tmp_path / "full" / "lora").exists()


def test_lora_file_loads_into_a_diffusers_sd_unet(tmp_path):
    """The same writer on an SD-class UNet2DConditionModel: diffusers' own loader
    (load_lora_adapter with the parsed metadata) reproduces the LoRA model's outputs."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    def unet():
        torch.manual_seed(0)
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=32)

    holder = nn.Module()
    holder.unet = unet()
    lora = apply_lora(holder, 4, 8, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in lora.lora_parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 32)
    with torch.no_grad():
        want = holder.unet(x, t, e).sample
    save_lora(lora, tmp_path)
    parsed = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    fresh = unet()
    fresh.load_lora_adapter(parsed[0], prefix="unet", metadata=parsed[-1], adapter_name="distill")
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, e).sample, want, atol=1e-6)


def test_declared_roles_of_the_hypersd_methods():
    """What the trainer and the contract test build (``methods.roles.build_roles``) for each method."""
    def kinds(m):
        return [(r.name, r.kind, r.init) for r in m.roles()]

    gen = ("generator", "generator", "custom")
    assert kinds(build_method(TscdConfig())) == [gen, ("teacher", "frozen", "teacher"),
                                               ("target", "frozen", "ema")]
    assert kinds(build_method(CdConfig(adversarial=True, target_network="online"))) == [
        gen, ("teacher", "frozen", "teacher"), ("discriminator", "critic", "custom")]
    assert kinds(build_method(DmdConfig())) == [gen, ("fake_score", "critic", "copy_of_teacher"),
                                              ("teacher", "frozen", "teacher")]
    assert kinds(build_method(FeedbackConfig()))[-1] == ("reward", "frozen", "reward")
    assert build_method(TscdConfig()).batch == "data" and build_method(DmdConfig()).batch == "conditions"
    assert isinstance(build_method(DmdConfig()), Dmd) and isinstance(build_method(FeedbackConfig()), Feedback)
    assert isinstance(build_method(CdConfig()), Tscd)
    with pytest.raises(ValueError, match="ema"):
        RoleSpec("target", "frozen", "ema")
    with pytest.raises(ValueError, match="cannot be initialised"):
        RoleSpec("generator", "generator", "teacher")


def test_a_method_declaring_bad_roles_is_refused():
    from hyperscale.methods.base import Method

    class Two(Method):
        def __init__(self, specs):
            super().__init__(None)
            self.specs = specs

        def roles(self):
            return self.specs

    gen = RoleSpec("generator", "generator", "fresh")
    for specs, needle in (([], "0 generator roles"), ([gen, gen], "names repeat"),
                          ([gen, RoleSpec("a", "critic", "fresh"), RoleSpec("b", "critic", "fresh")], "2 critic")):
        with pytest.raises(TypeError, match=needle):
            Two(specs).trainable
    assert Two([gen, RoleSpec("a", "critic", "fresh")]).trainable == ("generator", "a")
