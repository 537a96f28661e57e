"""TSCD segment math (hyperscale.diffusion.segments): edges, in-segment targets, the skip grid,
the DDIM move and re-noise, and the stage schedule. Pure tensor math, no networks."""
import itertools

import pytest
import torch

from hyperscale.diffusion import segments as seg
from hyperscale.diffusion.sampling import lcm_timesteps, timesteps
from hyperscale.diffusion.schedule import DiscreteVP

T = 1000
KS = [1, 2, 3, 4, 7, 8, 50]
RULES = ["trailing", "floor"]


def test_edges_trailing_and_floor():
    assert seg.segment_edges(4, T, "trailing").tolist() == [-1, 249, 499, 749, 999]
    assert seg.segment_edges(4, T, "floor").tolist() == [0, 250, 500, 750, 1000]
    assert seg.segment_edges(1, T, "trailing").tolist() == [-1, 999]  # k = 1: boundary at clean data
    assert seg.segment_edges(1, T, "floor").tolist() == [0, 1000]    # ... or at timestep 0 (LCM)
    assert seg.segment_edges(3, T, "floor").tolist() == [0, 333, 666, 1000]
    with pytest.raises(ValueError):
        seg.segment_edges(0, T)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_trailing_segment_tops_are_the_trailing_ddim_timesteps(k):
    """The k-step trailing DDIM sampler (the N-step LoRA sampler) calls the student exactly at the
    segment tops, and each of its steps (t -> t - T/k) lands on the next lower edge."""
    edges = seg.segment_edges(k, T, "trailing")
    ts = timesteps(k, T, "trailing")
    assert sorted(ts.tolist()) == edges[1:].tolist()
    assert (seg.segment_lower_edge(ts, k, T, "trailing") == ts - T // k).all()


@pytest.mark.parametrize("k,rule", itertools.product(KS, RULES))
def test_segment_index_matches_the_definition_at_every_timestep(k, rule):
    t = torch.arange(T)
    j = seg.segment_index(t, k, T, rule)
    e = seg.segment_edges(k, T, rule)
    lower, top = seg.segment_lower_edge(t, k, T, rule), seg.segment_top(t, k, T, rule)
    if rule == "trailing":  # (e_j, e_{j+1}]
        assert ((e[j] < t) & (t <= e[j + 1])).all()
    else:  # [e_j, e_{j+1})
        assert ((e[j] <= t) & (t < e[j + 1])).all()
    assert (lower == e[j]).all() and (lower <= t).all() and (t <= top).all()
    assert (j[1:] >= j[:-1]).all() and j.min() == 0 and j.max() == k - 1
    assert torch.bincount(j, minlength=k).tolist() == torch.diff(e).tolist()  # sizes floor((j+1)T/k) - floor(jT/k)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_floor_rule_is_the_briefs_formula(k):
    """docs/algorithms.md §2.2: t_b = floor(t / floor(T/k)) floor(T/k) (k divides T here)."""
    t = torch.arange(T)
    width = T // k
    assert (seg.segment_lower_edge(t, k, T, "floor") == (t // width) * width).all()


def test_skip_grid_is_lcms_ddim_solver_grid():
    assert seg.skip_size(50, T) == 20 and seg.skip_size(40, T) == 25
    assert seg.skip_grid(50, T).tolist() == [(n + 1) * 20 - 1 for n in range(50)]
    # the LCM/TCD scheduler's distillation grid {k-1, 2k-1, ..., T-1}
    assert seg.skip_grid(50, T).tolist() == sorted(lcm_timesteps(50, 50, T).tolist())
    with pytest.raises(ValueError):
        seg.skip_grid(0, T)


def test_trainable_timesteps_never_sit_on_their_own_lower_edge():
    # floor + uniform: 0, 250, 500, 750 are lower edges and are left out
    allowed = seg.trainable_timesteps(4, T, "floor", "uniform")
    assert len(allowed) == T - 4 and not set(allowed.tolist()) & {0, 250, 500, 750}
    # trailing: a timestep is never its own segment's lower edge, so the whole grid trains
    assert seg.trainable_timesteps(8, T, "trailing", "grid", 50).tolist() == seg.skip_grid(50, T).tolist()
    assert len(seg.trainable_timesteps(8, T, "trailing", "uniform")) == T


@pytest.mark.parametrize("rule,timestep_rule,n_ddim", [("trailing", "grid", 50), ("trailing", "uniform", 50),
                                                      ("floor", "grid", 40), ("floor", "uniform", 50),
                                                      ("trailing", "grid", 7)])
def test_teacher_steps_and_targets_never_cross_a_segment_edge(rule, timestep_rule, n_ddim):
    """Property test over every trainable timestep, many k, both target rules and many draws:
    lower edge <= t_end <= t_{n-1} < t_n <= segment top, all inside t_n's segment."""
    g = torch.Generator().manual_seed(0)
    skip = seg.skip_size(n_ddim, T)
    for k in KS:
        t_n = seg.trainable_timesteps(k, T, rule, timestep_rule, n_ddim).repeat(8)
        edge = seg.segment_lower_edge(t_n, k, T, rule)
        top = seg.segment_top(t_n, k, T, rule)
        t_prev = seg.teacher_prev(t_n, skip, edge)
        assert (t_prev < t_n).all() and (t_prev >= edge).all() and (t_prev >= t_n - skip).all()
        for target_rule in ("edge", "random"):
            t_end = seg.target_time(t_prev, edge, target_rule, generator=g)
            assert ((edge <= t_end) & (t_end <= t_prev) & (t_prev < t_n) & (t_n <= top)).all(), (k, target_rule)
            if target_rule == "edge":
                assert (t_end == edge).all()
            # strictly inside the segment, or exactly on its lower edge
            inside = t_end > edge
            assert (seg.segment_index(t_end[inside], k, T, rule)
                    == seg.segment_index(t_n[inside], k, T, rule)).all()


def test_random_targets_cover_the_whole_in_segment_range():
    g = torch.Generator().manual_seed(1)
    t_prev = torch.full((20000,), 9)
    edge = torch.full((20000,), -1)
    t_end = seg.target_time(t_prev, edge, "random", generator=g)
    counts = torch.bincount(t_end + 1, minlength=11)
    assert t_end.min() == -1 and t_end.max() == 9 and (counts > 1500).all()  # U{-1..9}, 11 values


def _schedule():
    return DiscreteVP.from_config("linear", T)


def test_move_is_exact_ddim_with_the_true_noise_and_identity_at_t_end_equal_t():
    sched = _schedule()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 500, 19, 300, 7, 250])
    s = torch.tensor([749, -1, -1, 300, 0, 249])
    x_t = sched.add_noise(x0, eps, t)
    out = seg.move(sched, x_t, eps, t, s)
    want = torch.where((s >= 0).reshape(-1, 1, 1, 1), sched.add_noise(x0, eps, s.clamp(min=0)), x0)
    assert torch.allclose(out, want, atol=1e-10)
    assert torch.equal(out[3], x_t[3])  # t_end == t: exactly the input (boundary condition)
    assert torch.allclose(out[1], x0[1], atol=1e-12)  # -1: clean data


def test_renoise_gives_the_forward_marginal():
    """x_s = a_s x0 + s_s e  ->  x_t = sqrt(r) x_s + sqrt(1 - r) z has x0 coefficient a_t and total
    noise variance 1 - abar_t: the q(x_t | x0) marginal, for s = -1 (clean) too."""
    sched = _schedule()
    s = torch.tensor([-1, 100, 249])
    t = torch.tensor([0, 400, 249])
    a_s, sig_s = sched.alpha_sigma(s)
    a_t, sig_t = sched.alpha_sigma(t)
    x0 = torch.ones(3, 1, dtype=torch.float64)
    e = torch.zeros(3, 1, dtype=torch.float64)
    zero = seg.renoise(sched, a_s[:, None] * x0 + sig_s[:, None] * e, s, t, torch.zeros_like(x0))
    assert torch.allclose(zero[:, 0], a_t, atol=1e-12)  # x0 coefficient
    # noise variance: r (1 - abar_s) + (1 - r) = 1 - abar_t
    r = sched.abar(t) / sched.abar(s)
    assert torch.allclose(r * sig_s ** 2 + (1 - r), sig_t ** 2, atol=1e-12)
    same = seg.renoise(sched, x0 * 3.0, t, t, torch.full_like(x0, 7.0))
    assert torch.allclose(same, x0 * 3.0)


def test_renoise_with_real_noise_is_the_closed_form_at_every_timestep_pair():
    """TCD's re-noise (eq. 19) with non-zero noise and s < t: x_t = sqrt(r) x_s + sqrt(1 - r) z,
    r = abar_t / abar_s, written out here per sample in float64 (the noise coefficient is
    sqrt(1 - r), not 1 - r: the pairs below have r from about 0.002 to 0.9999)."""
    sched = _schedule()
    s = torch.tensor([-1, -1, 100, 249, 600, 19])
    t = torch.tensor([0, 700, 400, 499, 999, 39])
    g = torch.Generator().manual_seed(3)
    x_s = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    z = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    out = seg.renoise(sched, x_s, s, t, z)
    for i in range(6):
        abar_s = 1.0 if s[i] < 0 else float(sched.alphas_cumprod[s[i]])
        r = float(sched.alphas_cumprod[t[i]]) / abar_s
        assert 0 < r < 1 and abs((1 - r) ** 0.5 - (1 - r)) > 5e-4  # the two coefficients differ here
        want = r ** 0.5 * x_s[i] + (1 - r) ** 0.5 * z[i]
        assert torch.allclose(out[i], want, rtol=0, atol=1e-12), i
    # the noise part alone: x_s = 0 leaves sqrt(1 - r) z, whose variance is 1 - r
    noise_only = seg.renoise(sched, torch.zeros_like(x_s), s, t, torch.ones_like(x_s))
    r = sched.abar(t) / sched.abar(s)
    assert torch.allclose(noise_only[:, 0, 0], (1 - r).sqrt(), rtol=0, atol=1e-12)


def test_stage_at():
    steps = [3, 2, 4]
    got = [seg.stage_at(s, steps) for s in range(12)]
    assert got == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2]  # the last stage continues past its budget
    assert seg.stage_at(10 ** 9, [1000] * 4) == 3
    with pytest.raises(ValueError):
        seg.stage_at(-1, steps)


# --- rectified flow: segments over continuous time ------------------------------------------

@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_flow_segment_tops_are_the_euler_samplers_times(k, spacing):
    """Every step of the student's k-step Euler sampler starts on a segment top and lands on the
    next lower edge; FLUX's trailing grid gives the edges j / k."""
    from hyperscale.diffusion.sampling import flow_times
    from hyperscale.diffusion.schedule import RectifiedFlow

    sched = RectifiedFlow(3.0, spacing=spacing)
    edges = seg.flow_segment_edges(k, sched)
    times = flow_times(k, sched)
    assert edges.dtype == torch.float64 and edges[0] == 0 and edges[-1] == 1 and len(edges) == k + 1
    assert torch.equal(edges[1:].flip(0), torch.tensor(times, dtype=torch.float64))
    if spacing == "trailing":
        torch.testing.assert_close(edges, torch.arange(k + 1, dtype=torch.float64) / k)
    segs = seg.segments_of(sched, k, "trailing", "grid", 50)
    t = torch.tensor(times, dtype=torch.float64)
    assert torch.equal(segs.top(t), t)  # a sampler time is its segment's top ...
    assert torch.equal(segs.lower_edge(t), torch.tensor(times[1:] + [0.0], dtype=torch.float64))  # the next: its edge


def test_flow_segments_keep_teacher_steps_and_targets_inside():
    from hyperscale.diffusion.schedule import RectifiedFlow

    sched = RectifiedFlow(3.0, spacing="trailing")
    segs = seg.segments_of(sched, 4, "trailing", "grid", 10)
    # the skipping-step grid as times (i + 1) / T, i = 99, 199, ..., 999 (none sits on its own lower edge)
    torch.testing.assert_close(segs.allowed, torch.arange(1, 11, dtype=torch.float64) / 10)
    assert segs.skip == 0.1
    t_n = segs.allowed.repeat(50)
    edge = segs.lower_edge(t_n)
    t_prev = seg.teacher_prev(t_n, segs.skip, edge)
    t_end = seg.target_time(t_prev, edge, "random", generator=torch.Generator().manual_seed(0))
    assert t_end.dtype == torch.float64 and (edge <= t_end).all() and (t_end <= t_prev).all() and (t_prev < t_n).all()
    assert (segs.top(t_n) >= t_n).all() and (t_end > edge).any()
    with pytest.raises(ValueError, match="trailing"):
        seg.segments_of(sched, 4, "floor")


def test_move_pair_is_the_euler_step_and_exact_on_a_straight_path():
    """With the true pair, a flow move lands on (1 - sigma) x0 + sigma eps at any t_end, from t = 1
    (alpha = 0) too; t_end == t returns the input."""
    from hyperscale.diffusion.schedule import RectifiedFlow

    sched = RectifiedFlow(3.0)
    g = torch.Generator().manual_seed(4)
    x0, eps = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([1.0, 0.5, 0.3], dtype=torch.float64)
    t_end = torch.tensor([0.25, 0.0, 0.3], dtype=torch.float64)
    out = seg.move_pair(sched, sched.add_noise(x0, eps, t), x0, eps, t, t_end)
    torch.testing.assert_close(out[:2], sched.add_noise(x0, eps, t_end)[:2], rtol=0, atol=1e-12)
    assert torch.equal(out[2], sched.add_noise(x0, eps, t)[2])
