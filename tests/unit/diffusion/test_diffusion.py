"""Diffusion math against closed forms and against the diffusers schedulers, step for step."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, TCDScheduler

from hyperscale.diffusion import sampling as S
from hyperscale.diffusion.schedule import DiscreteVP, Prediction, RectifiedFlow, bcast, convert

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = [1, 2, 4, 8]


class Toy(torch.nn.Module):
    """Deterministic t-dependent eps predictor, eps = tanh(x (0.5 + t/1000)) + 0.1 cond; float64."""

    def __init__(self, schedule: DiscreteVP):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t, cond=None, out=Prediction.eps):
        t = torch.as_tensor(t)
        eps = torch.tanh(x * bcast(0.5 + t.double() / 1000, x)) + 0.1 * bcast(cond, x)
        a, s = self.schedule.alpha_sigma(t)
        return convert(eps, x, a, s, Prediction.eps, out)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.linspace(-1, 1, 4, dtype=torch.float64)


def _setup(cls, precision, **cfg):
    """A diffusers scheduler and our schedule on the same abar. "stock": diffusers' own float32
    abar (our schedule takes those values); "float64": diffusers runs on our float64 abar."""
    sched = cls(**cfg)
    if precision == "float64":
        ours = DiscreteVP.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012)
        sched.alphas_cumprod = ours.alphas_cumprod.clone()
        if not cfg.get("set_alpha_to_one", True):
            sched.final_alpha_cumprod = ours.alphas_cumprod[0]
    else:
        ours = DiscreteVP(sched.alphas_cumprod.double())
    return sched, Toy(ours)


def _reference(sched, model, noise, cond, precision, seed, **step_kw):
    """The diffusers pipeline loop; list of (t, prev_sample, second output) per step.
    Stock passes t as the pipelines do (a tensor); float64 passes an int so c_skip/c_out stay float64."""
    g = torch.Generator().manual_seed(seed)
    x, traj = noise, []
    for t in sched.timesteps:
        tt = t if precision == "stock" else int(t)
        prev, other = sched.step(model(x, t, cond), tt, x, generator=g, return_dict=False, **step_kw)
        traj.append((int(t), prev, other))
        x = prev
    return traj


def _assert_same(ours, ref, tol):
    """Each step's x (and x0) within tol relative to that tensor's scale (max(1, max|.|)): the
    trajectories reach |x| ~ 40, where float32 rounding alone is ~4e-6 per operation."""
    assert [s.t for s in ours] == [t for t, _, _ in ref]
    for s, (_, x, x0) in zip(ours, ref):
        assert (s.x - x).abs().max().item() <= tol * max(1.0, x.abs().max().item())
        if x0 is not None:
            assert (s.x0 - x0).abs().max().item() <= tol * max(1.0, x0.abs().max().item())


# stock: diffusers in float32 against our float64 path, ~30 float32 ulps of the scale; the
# worst case seen is 3.8e-7 (TCD, eta 0.3, 8 steps, on an AMD EPYC; earlier machines stayed under 1e-5 absolute)
TOL = {"stock": 2e-6, "float64": 1e-10}


# --- schedules and conversions ---------------------------------------------------------------

@pytest.mark.parametrize("kind,theirs", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                         ("cosine", "squaredcos_cap_v2")])
def test_alphas_cumprod_match_diffusers(kind, theirs):
    ours = DiscreteVP.from_config(kind).alphas_cumprod
    ref = DDPMScheduler(beta_schedule=theirs).alphas_cumprod  # cumprod in float32
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert (ours - ref.double()).abs().max().item() < 1e-6


AFFINE_PATHS = {  # (alpha, sigma) at three times: VP, rectified flow with a shift, and a VE-like path
    "vp": lambda: DiscreteVP.from_config("linear").alpha_sigma(torch.tensor([0, 500, 999])),
    "rf": lambda: RectifiedFlow(3.0).alpha_sigma(torch.tensor([0.02, 0.5, 0.97], dtype=torch.float64)),
    "ve": lambda: (torch.ones(3, dtype=torch.float64), torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)),
}


@pytest.mark.parametrize("path", sorted(AFFINE_PATHS))
def test_prediction_conversions_round_trip(path):
    """Every pair of parameterisations converts both ways on any affine path (a^2 + s^2 != 1 too)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    a, s = AFFINE_PATHS[path]()
    x_t = bcast(a, x0) * x0 + bcast(s, x0) * eps
    truth = {Prediction.eps: eps, Prediction.x0: x0, Prediction.v: bcast(a, x0) * eps - bcast(s, x0) * x0,
             Prediction.flow: eps - x0, Prediction.score: -eps / bcast(s, x0)}
    for src in Prediction:
        for dst in Prediction:
            out = convert(truth[src], x_t, a, s, src, dst)
            scale = truth[dst].abs().max().item()
            assert (out - truth[dst]).abs().max().item() < 1e-10 * max(1.0, scale), (src, dst)
            back = convert(out, x_t, a, s, dst, src)
            assert (back - truth[src]).abs().max().item() < 1e-10 * max(1.0, truth[src].abs().max().item()), (src, dst)


# --- DDIM closed forms -----------------------------------------------------------------------

def test_ddim_jump_with_true_eps_is_exact():
    sched = DiscreteVP.from_config("linear")
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, s = torch.tensor([999, 700, 10, 300, 0]), torch.tensor([0, -1, 900, 299, 999])  # down, to clean, up
    x_t = sched.add_noise(x0, eps, t)
    x_s = S.ddim_jump(x_t, eps, sched.alpha_sigma(t), sched.alpha_sigma(s))
    a_s, s_s = sched.alpha_sigma(s)
    assert (x_s - (bcast(a_s, x0) * x0 + bcast(s_s, x0) * eps)).abs().max().item() < 1e-12
    # eta = 0 steps are the same move; eta > 0 keeps the marginal's total variance
    assert torch.equal(S.ddim_step(x_t[:2], eps[:2], sched.alpha_sigma(t[:2]), sched.alpha_sigma(s[:2])), x_s[:2])
    sig = S.ddim_sigma(*sched.alpha_sigma(999), *sched.alpha_sigma(500), 1.0)
    assert 0 < sig.item() < (1 - sched.abar(500)).sqrt().item()
    # DDIM's eq. 16 in abar form
    ab_t, ab_s = sched.abar(999), sched.abar(500)
    torch.testing.assert_close(sig, ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_ddim_on_gaussian_data_is_a_linear_map_with_the_right_std(c):
    """Data N(0, c^2 I): E[eps | x_t] = s_t x_t / (a_t^2 c^2 + s_t^2), so every DDIM step (and the whole
    sampler) scales x by a closed-form factor; it tends to c with first-order error in 1/steps."""
    sched = DiscreteVP.from_config("linear")

    def exact(x, t, cond=None, out=Prediction.eps):
        a, s = (bcast(v, x) for v in sched.alpha_sigma(t))
        return s * x / (a ** 2 * c ** 2 + s ** 2)

    exact.schedule = sched
    noise = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ratio = {}
    for n in (50, 100):
        out = S.sample_ddim(exact, noise, None, n)
        k = 1.0
        for t in S.timesteps(n).tolist():
            (a_t, s_t), (a_s, s_s) = sched.alpha_sigma(t), sched.alpha_sigma(t - 1000 // n)
            k *= ((a_s * a_t * c ** 2 + s_s * s_t) / (a_t ** 2 * c ** 2 + s_t ** 2)).item()
        assert (out - k * noise).abs().max().item() < 1e-10 * max(1.0, k)
        ratio[n] = out.std().item() / noise.std().item() / c
    assert abs(out.std().item() - c) / c < 0.04  # 100 steps, sample std of 16k draws
    assert abs(ratio[50] - 1) < 0.06
    assert 0.4 < abs(ratio[100] - 1) / abs(ratio[50] - 1) < 0.6  # first-order convergence


# --- grids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_match_diffusers(spacing):
    for offset in (0, 1) if spacing == "leading" else (0,):
        sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        for n in [*range(1, 51), 99, 250, 333, 999, 1000]:
            sched.set_timesteps(n)
            assert torch.equal(S.timesteps(n, 1000, spacing, offset), sched.timesteps), (n, offset)


def test_lcm_tcd_timesteps_match_diffusers():
    lcm, tcd = LCMScheduler(**SD), TCDScheduler(**SD)
    for n in range(1, 51):
        lcm.set_timesteps(n), tcd.set_timesteps(n)
        assert torch.equal(S.lcm_timesteps(n), lcm.timesteps)
        assert torch.equal(S.lcm_timesteps(n), tcd.timesteps)
        tcd.set_timesteps(n, original_inference_steps=50)  # explicit: the full 0..T-1 grid
        assert torch.equal(S.lcm_timesteps(n, None), tcd.timesteps)


# --- step for step against diffusers --------------------------------------------------------

@pytest.mark.parametrize("precision", ["stock", "float64"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta,alpha_one,clip,rederive", [(0.0, True, False, False), (0.7, True, False, False),
                                                         (0.0, False, False, False), (1.0, False, False, False),
                                                         (0.5, True, True, False), (0.0, True, True, True),
                                                         (0.5, False, True, True)])
def test_ddim_matches_diffusers(precision, spacing, eta, alpha_one, clip, rederive):
    noise, cond = _inputs()
    for n in STEPS:
        sched, model = _setup(DDIMScheduler, precision, timestep_spacing=spacing, set_alpha_to_one=alpha_one,
                              clip_sample=clip, **SD)
        sched.set_timesteps(n)
        ref = _reference(sched, model, noise, cond, precision, seed=n, eta=eta, use_clipped_model_output=rederive)
        ours = []
        final = None if alpha_one else float(sched.final_alpha_cumprod)
        out = S.sample_ddim(model, noise, cond, n, spacing, eta=eta, clip_x0=clip, generator=torch.Generator().manual_seed(n),
                            final_alpha_cumprod=final, callback=ours.append, use_clipped_model_output=rederive)
        _assert_same(ours, ref, TOL[precision])
        assert out is ours[-1].x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_grid_rule_equals_stride_rule_when_n_divides_T(spacing):
    noise, cond = _inputs()
    model = Toy(DiscreteVP.from_config("linear"))
    for n in STEPS:
        a = S.sample_ddim(model, noise, cond, n, spacing, prev="stride")
        assert torch.equal(a, S.sample_ddim(model, noise, cond, n, spacing, prev="grid"))


@pytest.mark.parametrize("precision", ["stock", "float64"])
def test_lcm_matches_diffusers(precision):
    noise, cond = _inputs()
    for n in STEPS:
        sched, model = _setup(LCMScheduler, precision, **SD)
        sched.set_timesteps(n)
        ref = _reference(sched, model, noise, cond, precision, seed=n)
        ours = []
        S.sample_lcm(model, noise, cond, n, generator=torch.Generator().manual_seed(n), callback=ours.append)
        # LCMScheduler computes c_skip/c_out in float32 when handed a tensor timestep
        _assert_same(ours, ref, TOL[precision])


@pytest.mark.parametrize("precision", ["stock", "float64"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_matches_diffusers(precision, eta):
    noise, cond = _inputs()
    for n in STEPS:
        sched, model = _setup(TCDScheduler, precision, **SD)
        sched.set_timesteps(n)
        ref = _reference(sched, model, noise, cond, precision, seed=n, eta=eta)
        ours = []
        S.sample_tcd(model, noise, cond, n, eta=eta, generator=torch.Generator().manual_seed(n), callback=ours.append)
        ref = [(t, x, None) for t, x, _ in ref]  # TCD's second output is x_s, not x0
        _assert_same(ours, ref, TOL[precision])


def _floor_differs_from_round(timesteps: list[int], eta: float) -> int:
    """How many steps of a TCD grid have floor((1 - eta) t_prev) != round(...) (float32, as diffusers)."""
    v = (1 - eta) * torch.tensor(timesteps[1:], dtype=torch.float32)
    return int((torch.floor(v) != torch.round(v)).sum())


@pytest.mark.parametrize("precision", ["stock", "float64"])
@pytest.mark.parametrize("eta,full_grid", [(0.15, True), (0.6, False), (0.7, True)])
def test_tcd_matches_diffusers_where_floor_and_round_of_s_differ(precision, eta, full_grid):
    """TCD's s = floor((1 - gamma) t_prev). On the default grid t_prev = 20n - 1, so gamma in
    {0, 0.3, 1} (and 0.15) put floor and round on the same timestep; these cases do not: gamma 0.15
    on the full 0..T-1 grid (set_timesteps(n, original_inference_steps=50)), gamma 0.6 and 0.7."""
    noise, cond = _inputs()
    differing = 0
    for n in STEPS:
        sched, model = _setup(TCDScheduler, precision, **SD)
        if full_grid:
            sched.set_timesteps(n, original_inference_steps=50)
        else:
            sched.set_timesteps(n)
        differing += _floor_differs_from_round(sched.timesteps.tolist(), eta)
        ref = _reference(sched, model, noise, cond, precision, seed=n, eta=eta)
        ours = []
        S.sample_tcd(model, noise, cond, n, eta=eta, original_inference_steps=None if full_grid else 50,
                     generator=torch.Generator().manual_seed(n), callback=ours.append)
        _assert_same(ours, [(t, x, None) for t, x, _ in ref], TOL[precision])
    assert differing >= 3  # the case can tell floor from round


def test_custom_timesteps_lcm_and_tcd():
    noise, cond = _inputs()
    custom = [999, 759, 499, 259]
    for cls, run in [(LCMScheduler, S.sample_lcm), (TCDScheduler, S.sample_tcd)]:
        sched, model = _setup(cls, "float64", **SD)
        sched.set_timesteps(timesteps=custom)
        ref = [(t, x, None) for t, x, _ in _reference(sched, model, noise, cond, "float64", seed=3)]
        ours = []
        run(model, noise, cond, None, generator=torch.Generator().manual_seed(3), timesteps=custom,
            callback=ours.append)
        _assert_same(ours, ref, 1e-10)


# --- one step -------------------------------------------------------------------------------

def test_one_step_predicts_x0_from_noise_with_gradients():
    sched = DiscreteVP.from_config("linear")
    model = Toy(sched)
    noise, cond = _inputs()
    noise.requires_grad_(True)
    x0 = S.one_step(model, noise, cond, 399)
    assert torch.equal(x0, model(noise, torch.full((4,), 399), cond, out=Prediction.x0))
    x0.sum().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0
    s = sched.alpha_sigma(440)[1]
    x0_sim = S.one_step(model, noise.detach(), cond, 440, noise_input="sigma")
    assert torch.equal(x0_sim, model(s * noise.detach(), torch.full((4,), 440), cond, out=Prediction.x0))


# --- rectified flow (SD3 / FLUX) and continuous time ----------------------------------------

class FlowToy(torch.nn.Module):
    """Deterministic velocity predictor v = tanh(x (0.5 + tau / 1000)) + 0.1 cond, tau the
    network timestep (1000 sigma, as diffusers feeds SD3/FLUX transformers); flow-native."""
    prediction_type = Prediction.flow

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def velocity(self, x, tau, cond):
        return torch.tanh(x * bcast(0.5 + torch.as_tensor(tau, dtype=x.dtype) / 1000, x)) + 0.1 * bcast(cond, x)

    def forward(self, x, t, cond=None, out=Prediction.eps):
        v = self.velocity(x, self.schedule.model_time(t).to(x.dtype), cond)
        a, s = self.schedule.alpha_sigma(t, dtype=x.dtype)
        return convert(v, x, a, s, Prediction.flow, out)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_grid_matches_flow_match_euler(shift):
    """Training grid index i: sigma = shift u / (1 + (shift - 1) u) with u = (i + 1) / T, and the
    network timestep 1000 sigma, as FlowMatchEulerDiscreteScheduler's own tables."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = RectifiedFlow(shift)
    idx = torch.arange(999, -1, -1)
    a, s = ours.alpha_sigma(idx)
    torch.testing.assert_close(s.float(), ref.sigmas[:1000], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a, 1 - s)
    torch.testing.assert_close(ours.model_time(idx), ref.timesteps, rtol=1e-6, atol=1e-4)
    # continuous time is the same path: t = (i + 1) / T
    torch.testing.assert_close(ours.alpha_sigma(ours.time(idx))[1], s)
    torch.testing.assert_close(ours.unshifted(s), ours.time(idx))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", STEPS)
def test_euler_matches_flow_match_euler_step_for_step(shift, n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    x, cond = (v.float() for v in _inputs(3))
    model = FlowToy(RectifiedFlow(shift))
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    theirs, xr = [], x.clone()
    for tau in ref.timesteps:
        xr = ref.step(model.velocity(xr, tau, cond), tau, xr).prev_sample
        theirs.append(xr)
    ours = []
    out = S.sample_euler(model, x, cond, n, callback=lambda st: ours.append(st.x))
    assert len(ours) == len(theirs) == n
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, xr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", STEPS)
def test_tcd_on_flow_is_euler_at_eta_0_and_stochastic_flow_match_at_eta_1(shift, n):
    """TCD over the Euler times: eta 0 is the Euler sampler; eta 1 is FlowMatchEulerDiscreteScheduler
    with stochastic_sampling (x0, then fresh noise at the next sigma), step for step, same generator."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x, cond = (v.float() for v in _inputs(3))
    model = FlowToy(RectifiedFlow(shift))
    torch.testing.assert_close(S.sample_tcd(model, x, cond, n, eta=0.0), S.sample_euler(model, x, cond, n),
                               rtol=1e-6, atol=1e-6)
    ref = FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
    ref.set_timesteps(n)
    g, xr = torch.Generator().manual_seed(5), x.clone()
    for tau in ref.timesteps:
        xr = ref.step(model.velocity(xr, tau, cond), tau, xr, generator=g).prev_sample
    ours = S.sample_tcd(model, x, cond, n, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, xr, rtol=1e-5, atol=1e-5)
    mid = S.sample_tcd(model, x, cond, n, eta=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(mid).all() and (n == 1 or not torch.allclose(mid, ours))


def test_euler_is_exact_on_a_straight_path():
    """With the true velocity eps - x0 of one (x0, eps) pair, one Euler step from pure noise lands
    on x0 exactly, and any intermediate step on (1 - sigma) x0 + sigma eps."""
    g = torch.Generator().manual_seed(4)
    x0, eps = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    sched = RectifiedFlow(3.0)

    class Oracle(torch.nn.Module):
        prediction_type, schedule = Prediction.flow, sched

        def forward(self, x, t, cond=None, out=Prediction.eps):
            a, s = sched.alpha_sigma(t)
            return convert(eps - x0, x, a, s, Prediction.flow, out)

    torch.testing.assert_close(S.sample_euler(Oracle(), eps, None, 1), x0, rtol=0, atol=1e-12)
    mid = S.sample_euler(Oracle(), eps, None, 1, times=[1.0, 0.4])
    torch.testing.assert_close(mid, x0, rtol=0, atol=1e-12)
    a, s = sched.alpha_sigma(0.4)
    half = S.affine_jump(x0, eps, a, s)
    torch.testing.assert_close(half, (1 - s) * x0 + s * eps)


def test_discrete_vp_takes_continuous_time_on_its_grid():
    """t = (i + 1) / T is grid index i; t = 0 is clean data; other t snap to the nearest index."""
    sched = DiscreteVP.from_config("linear")
    idx = torch.tensor([-1, 0, 440, 999])
    t = sched.time(idx)
    torch.testing.assert_close(t, torch.tensor([0.0, 0.001, 0.441, 1.0], dtype=torch.float64))
    assert torch.equal(sched.index(t), idx)
    assert torch.equal(sched.index(t.float()), idx)  # float32 times too
    for a, b in zip(sched.alpha_sigma(t), sched.alpha_sigma(idx)):
        assert torch.equal(a, b)
    assert torch.equal(sched.index(torch.tensor([0.4412, 0.4408])), torch.tensor([440, 440]))
    assert sched.alpha_sigma(0.0)[0].item() == 1.0 and sched.alpha_sigma(0.0)[1].item() == 0.0


def test_logit_normal_time_draw_follows_sd3():
    """SD3's training draw t = sigmoid(N(0, 1)), continuous; [lo, hi] are quantiles."""
    from hyperscale.diffusion.timedist import time_dist

    torch.manual_seed(0)
    t = time_dist("logit_normal").draw(RectifiedFlow(), 40_000, "cpu")
    assert t.dtype == torch.float64 and 0 < t.min() and t.max() < 1
    for q in (0.1, 0.5, 0.9):
        level = torch.sigmoid(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))
        assert abs((t <= level).double().mean().item() - q) < 0.01
    with pytest.raises(ValueError, match="unknown time sampling"):
        time_dist("uniform")
    with pytest.raises(ValueError, match="lo <= hi"):
        time_dist("grid", 0.9, 0.1)


def test_time_for_a_ve_noise_level_on_both_schedules():
    """SIM's generator level sigma~ = 2.5: grid index 440 on the linear VP grid, the continuous
    time with exactly that level on rectified flow (sigma / (1 - sigma) = 2.5 after the shift)."""
    assert DiscreteVP.from_config("linear").timestep_for_sigma_ve(2.5) == 440
    rf = RectifiedFlow(3.0)
    t = rf.timestep_for_sigma_ve(2.5)
    assert isinstance(t, float) and abs(rf.sigma_ve(t).item() - 2.5) < 1e-12
    assert rf.timesteps_for_sigma_ve(torch.tensor([float("inf")], dtype=torch.float64)).item() == 1.0
