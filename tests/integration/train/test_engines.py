"""DeepSpeed engines per role on 2 local gloo ranks (no Ray): every ZeRO stage trains SIM's two
roles like the plain-torch path, the NaN/inf guard skips an update on every rank and leaves the
optimizer state untouched, ZeRO-3's EMA and export gather the partitioned weights, and each
rank holds 1/N of the optimizer state (and of the gradients at stage 2, the parameters at 3)."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from hyperscale.config import load_config
from hyperscale.data.stream import LabelStream
from hyperscale.methods.base import Batch, LossOut
from hyperscale.methods.sim import Sim, SimConfig
from hyperscale.models.build import build_denoiser, save_denoiser
from hyperscale.models.ema import EMA
from hyperscale.train import engines
from hyperscale.train.local import run_local
from hyperscale.bench.memory import memory_footprint
from hyperscale.train.step import StepCounters, two_player_step

TINY = ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]", "method.name=sim",
        "train.lr_warmup_steps=0", "train.lr=0.001", "train.adam_beta1=0.0", "train.max_grad_norm=1.0",
        "data.batch_size=4", "train.adam_epsilon=1e-5"]
STEPS = 3


class Poisoned(Sim):
    """SIM whose generator loss turns NaN on rank 1 while ``poison`` is set."""
    poison = False

    def generator_loss(self, batch, **roles):
        out = super().generator_loss(batch, **roles)
        if self.poison and dist.get_rank() == 1:
            out = LossOut(out.loss * float("nan"), out.metrics)
        return out


def _optimizer_state(role) -> list[dict]:
    return [{k: v.clone() for k, v in st.items()} for st in role.optimizer.state.values()]


def _train(rank: int, world: int, stage: int, precision: str, accumulation: int, export_dir: str | None) -> dict:
    """SIM on a tiny teacher: the same 3 steps with engines at ``stage`` and with plain torch,
    then one step with a NaN generator loss on rank 1."""
    engines.init_distributed("gloo")
    cfg = load_config(None, TINY + [f"train.mixed_precision={precision}",
                                    f"train.gradient_accumulation_steps={accumulation}"])
    torch.manual_seed(0)
    teacher = build_denoiser(cfg.model, cfg.schedule).eval().requires_grad_(False)
    start = copy.deepcopy(teacher)
    with torch.no_grad():  # trainable copies that differ from the teacher, as after some training
        for p in start.parameters():
            p.add_(0.02 * torch.randn_like(p))
    method = Poisoned(SimConfig())
    out = {}
    for kind in ("deepspeed", "torch"):
        t = cfg.train.model_copy(update={"engine": kind, "zero_stage": stage if kind == "deepspeed" else 0})
        modules = {n: copy.deepcopy(start) for n in method.trainable}
        ema = EMA(modules["generator"], 0.9, warmup=False)
        roles = {n: engines.build_role(n, m, t, 4, world, torch.device("cpu")) for n, m in modules.items()}
        low = engines.resolve_precision(precision, torch.device("cpu"))
        frozen = {"teacher": engines.cast_parameters_(teacher, low)}
        labels = LabelStream(4, 10, rank)
        torch.manual_seed(100 + rank)
        counters = StepCounters()
        for _ in range(STEPS):
            metrics = two_player_step(method, lambda: Batch(next(labels)[1]), roles, frozen, ema, counters)
        res = {"start": start.state_dict(), "weights": {n: r.full_state_dict() for n, r in roles.items()},
               "ema": ema.model.state_dict(),
               "loss": metrics["loss/generator"], "memory": {n: memory_footprint(r) for n, r in roles.items()}}
        opt_before, gen_before = _optimizer_state(roles["generator"]), res["weights"]["generator"]
        method.poison = True
        metrics = two_player_step(method, lambda: Batch(next(labels)[1]), roles, frozen, ema, counters)
        method.poison = False
        after = roles["generator"].full_state_dict()
        res["skipped"] = dict(counters.skipped)
        res["skip_metrics"] = {k: metrics[k] for k in ("loss/generator", "nonfinite_skipped/generator")}
        res["weights_kept"] = all(torch.equal(gen_before[k], after[k]) for k in after)
        res["optimizer_kept"] = len(opt_before) > 0 and all(
            torch.equal(a[k], b[k]) for a, b in zip(opt_before, _optimizer_state(roles["generator"])) for k in a)
        res["fake_changed"] = any(not torch.equal(res["weights"]["fake_score"][k], v)
                                  for k, v in roles["fake_score"].full_state_dict().items())
        if kind == "deepspeed" and export_dir and rank == 0:
            model = copy.deepcopy(start)
            model.load_state_dict(res["weights"]["generator"])
            save_denoiser(model, export_dir)
        out[kind] = res
    return out


_cache: dict = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs (and caches) one 2-rank training per (stage, precision); the generator trained with
    engines is exported to ``<exports>/<stage>-<precision>``."""
    exports = tmp_path_factory.mktemp("exports")

    def get(stage: int, precision: str = "no", accumulation: int = 1) -> list[dict]:
        key = (stage, precision, accumulation)
        if key not in _cache:
            _cache[key] = run_local(_train, 2, *key, str(exports / "-".join(map(str, key))))
        return _cache[key]

    get.exports = exports
    return get


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _rel_diff(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start|| over all weights: how far two trainings of the same steps differ,
    relative to how far they moved. Adam's epsilon is raised in these tests: biases that feed a
    one-channel-per-group GroupNorm get pure round-off gradients (~1e-9), which Adam with
    eps = 1e-8 turns into lr-sized steps of either sign, whatever the reduction order."""
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    den = sum(float((b[k].float() - start[k].float()).pow(2).sum()) for k in a)
    return (num / den) ** 0.5


@pytest.mark.parametrize("stage,accumulation", [(0, 1), (1, 1), (2, 1), (3, 1), (2, 2)])
def test_every_zero_stage_trains_both_roles_like_plain_torch(stage, accumulation, results):
    """accumulation 2: each update over two micro-batches (DeepSpeed's gradient accumulation)."""
    ranks = results(stage, accumulation=accumulation)
    for r in ranks:
        ds, ref = r["deepspeed"], r["torch"]
        for role in ("generator", "fake_score"):
            # same data, same noise draws, same AdamW/clip/schedule: equal up to reduction order
            assert _rel_diff(ds["weights"][role], ref["weights"][role], ds["start"]) < 1e-3, role
        assert _rel_diff(ds["ema"], ref["ema"], ds["start"]) < 1e-3  # ZeRO-3: EMA of gathered, full weights
        assert abs(ds["loss"] - ref["loss"]) < 1e-3 * abs(ref["loss"])
    # every rank holds the same consolidated weights
    assert _max_diff(ranks[0]["deepspeed"]["weights"]["generator"], ranks[1]["deepspeed"]["weights"]["generator"]) == 0


@pytest.mark.parametrize("stage,precision", [(0, "no"), (1, "no"), (2, "no"), (3, "no"), (2, "bf16"), (3, "bf16")])
def test_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(stage, precision, results):
    for r in results(stage, precision):
        for kind in ("deepspeed", "torch"):
            res = r[kind]
            assert res["skipped"] == {"generator": 1}, kind  # counted on rank 0 too, where the loss was finite
            assert res["skip_metrics"]["nonfinite_skipped/generator"] == 1
            assert res["weights_kept"] and res["optimizer_kept"], kind  # nothing stepped, state untouched
            assert res["fake_changed"], kind  # the critic's update of the same step went ahead


def test_zero3_export_consolidates_shards_into_one_file_loadable_without_deepspeed(results, tmp_path):
    ranks = results(3)
    export = results.exports / "3-no-1"
    code = ("import sys, torch; from hyperscale.models.build import load_denoiser\n"
            f"m = load_denoiser({str(export)!r})\n"
            "assert not [k for k in sys.modules if k.split('.')[0] in ('deepspeed', 'ray')]\n"
            "torch.save(m.state_dict(), sys.argv[1])\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sd.pt")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    loaded = torch.load(tmp_path / "sd.pt")
    gathered = ranks[0]["deepspeed"]["weights"]["generator"]
    assert loaded.keys() == gathered.keys() and _max_diff(loaded, gathered) == 0


def test_each_rank_holds_its_share_of_optimizer_state_and_parameters(results):
    mem = {s: results(s)[0]["deepspeed"]["memory"]["generator"] for s in (0, 1, 2, 3)}
    base = mem[0]
    for s in (1, 2, 3):
        assert abs(mem[s]["optim_bytes"] / (base["optim_bytes"] / 2) - 1) < 0.1, s
    assert mem[3]["param_bytes"] <= base["param_bytes"] / 2 * 1.1
    # ZeRO-1/2 keep whole parameters (padded to the partition alignment) and a 1/N fp32 master copy
    assert abs(mem[2]["param_bytes"] / base["param_bytes"] - 1) < 0.01
    assert abs(mem[2]["master_bytes"] / (base["param_bytes"] / 2) - 1) < 0.1


def test_config_and_precision_errors_name_the_problem(monkeypatch):
    with pytest.raises(Exception, match="train.zero_stage=3 needs train.engine=deepspeed"):
        load_config(None, ["train.engine=torch", "train.zero_stage=3"])
    assert load_config(None, ["train.engine=torch"]).train.zero_stage == 0
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML reads `no` as false
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    with pytest.raises(ValueError, match="train.mixed_precision=fp16: this cpu device cannot train in fp16"):
        engines.resolve_precision("fp16", torch.device("cpu"))
    assert engines.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
