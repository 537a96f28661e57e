"""Diffusion math against closed forms and against the diffusers schedulers, step for step."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, TCDScheduler

from hyperscale.diffusion import sampling as S
from hyperscale.diffusion.schedule import NoiseSchedule, Prediction, bcast, convert

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = [1, 2, 4, 8]


class Toy(torch.nn.Module):
    """Deterministic t-dependent eps predictor, eps = tanh(x (0.5 + t/1000)) + 0.1 cond; float64."""

    def __init__(self, schedule: NoiseSchedule):
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
        ours = NoiseSchedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012)
        sched.alphas_cumprod = ours.alphas_cumprod.clone()
        if not cfg.get("set_alpha_to_one", True):
            sched.final_alpha_cumprod = ours.alphas_cumprod[0]
    else:
        ours = NoiseSchedule(sched.alphas_cumprod.double())
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
    ours = NoiseSchedule.from_config(kind).alphas_cumprod
    ref = DDPMScheduler(beta_schedule=theirs).alphas_cumprod  # cumprod in float32
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert (ours - ref.double()).abs().max().item() < 1e-6


def test_prediction_conversions_round_trip():
    sched = NoiseSchedule.from_config("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    a, s = sched.alpha_sigma(torch.tensor([0, 500, 999]))
    x_t = bcast(a, x0) * x0 + bcast(s, x0) * eps
    truth = {Prediction.eps: eps, Prediction.x0: x0, Prediction.v: bcast(a, x0) * eps - bcast(s, x0) * x0,
             Prediction.score: -eps / bcast(s, x0)}
    for src in Prediction:
        for dst in Prediction:
            out = convert(truth[src], x_t, a, s, src, dst)
            assert (out - truth[dst]).abs().max().item() < 1e-10, (src, dst)
            back = convert(out, x_t, a, s, dst, src)
            assert (back - truth[src]).abs().max().item() < 1e-10, (src, dst)


# --- DDIM closed forms -----------------------------------------------------------------------

def test_ddim_jump_with_true_eps_is_exact():
    sched = NoiseSchedule.from_config("linear")
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, s = torch.tensor([999, 700, 10, 300, 0]), torch.tensor([0, -1, 900, 299, 999])  # down, to clean, up
    x_t = sched.add_noise(x0, eps, t)
    x_s = S.ddim_jump(x_t, eps, sched.abar(t), sched.abar(s))
    a_s, s_s = sched.alpha_sigma(s)
    assert (x_s - (bcast(a_s, x0) * x0 + bcast(s_s, x0) * eps)).abs().max().item() < 1e-12
    # eta = 0 steps are the same move; eta > 0 keeps the marginal's total variance
    assert torch.equal(S.ddim_step(x_t[:2], eps[:2], sched.abar(t[:2]), sched.abar(s[:2])), x_s[:2])
    sig = S.ddim_sigma(sched.abar(999), sched.abar(500), 1.0)
    assert 0 < sig.item() < (1 - sched.abar(500)).sqrt().item()


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_ddim_on_gaussian_data_is_a_linear_map_with_the_right_std(c):
    """Data N(0, c^2 I): E[eps | x_t] = s_t x_t / (a_t^2 c^2 + s_t^2), so every DDIM step (and the whole
    sampler) scales x by a closed-form factor; it tends to c with first-order error in 1/steps."""
    sched = NoiseSchedule.from_config("linear")

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
    model = Toy(NoiseSchedule.from_config("linear"))
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
    sched = NoiseSchedule.from_config("linear")
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
