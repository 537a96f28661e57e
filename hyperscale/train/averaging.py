"""Post-hoc weight averages of a run's generator from its checkpoints (docs/benchmarks.md §12.3).

A one-step generator's raw weights move a lot from step to step (SIM on the text-to-image
teacher: FID 287 to 323 within 300 steps), so the average over a longer window than the
training EMA's can be the better model. ``average_run`` reads the generator's raw weights from
every complete checkpoint of a run and writes, as an export beside the run's own, either

- their uniform mean (stochastic weight averaging), or
- an EMA with a given decay: started from the EMA held in the earliest checkpoint used, then
  ``e <- d^k e + (1 - d^k) w`` per later checkpoint, ``k`` the steps since the one before (each
  snapshot stands for the steps that led to it).

Checkpoints closer together make the EMA closer to one updated every step; write them with
``train.checkpoint_every=25 train.keep_checkpoints=<enough>``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from hyperscale.train.checkpoint import ENGINES, complete_checkpoints, read_checkpoint
from hyperscale.train.engines import TAG

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module file (ZeRO <= 2: the whole module)


def role_weights(state: dict, checkpoint: Path, role: str) -> dict[str, Tensor]:
    """The raw weights of ``role`` in one complete checkpoint (``state``: its rank-0 state)."""
    if role not in state["roles"]:
        raise ValueError(f"{checkpoint}: no role '{role}' (roles: {', '.join(state['roles'])})")
    held = state["roles"][role]
    if "module" in held:  # train.engine=torch: everything is in state.pt
        return held["module"]
    if held.get("zero_stage") == 3:
        raise ValueError(f"{checkpoint}: role '{role}' was trained with ZeRO-3, whose checkpoints hold the "
                         f"weights in per-rank shards; average runs trained with train.zero_stage <= 2")
    return torch.load(Path(checkpoint) / ENGINES / role / TAG / MODEL_STATES, map_location="cpu",
                      weights_only=False)["module"]


def average(snapshots: list[tuple[int, dict[str, Tensor]]], decay: float | None = None,
            start: dict[str, Tensor] | None = None, start_step: int | None = None) -> dict[str, Tensor]:
    """Uniform mean of the snapshots' weights (``decay`` None), or their EMA from ``start`` at
    ``start_step`` (module docstring); float64 sums, returned in each weight's own dtype."""
    if not snapshots:
        raise ValueError("no checkpoints to average")
    dtypes = {k: v.dtype for k, v in snapshots[0][1].items()}
    if decay is None:
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in snapshots[0][1].items()}
        for _, w in snapshots:
            for k in total:
                total[k] += w[k].double()
        out = {k: v / len(snapshots) for k, v in total.items()}
    else:
        if not 0 < decay < 1 or start is None or start_step is None:
            raise ValueError("an EMA needs 0 < decay < 1 and a start (weights and step)")
        out, prev = {k: v.double() for k, v in start.items()}, start_step
        for step, w in snapshots:
            f = decay ** (step - prev)
            out = {k: f * out[k] + (1 - f) * w[k].double() for k in out}
            prev = step
    return {k: v.to(dtypes[k]) for k, v in out.items()}


def average_run(run_dir: Path, out: Path, decay: float | None = None, from_step: int = -1,
                role: str = "generator") -> dict:
    """Average the run's generator (module docstring) into an export at ``out``, built on the run's
    ``export/ema``; returns what was averaged (also in the export's metadata)."""
    import json

    from hyperscale.models.build import EXPORT_META, load_denoiser
    from hyperscale.models.lora import save_student

    run_dir = Path(run_dir)
    chosen = [(s, d) for s, d in complete_checkpoints(run_dir / "checkpoints") if s > from_step]
    if len(chosen) < (1 if decay is None else 2):
        raise ValueError(f"{run_dir}/checkpoints: {len(chosen)} complete checkpoint(s) after step {from_step}; "
                         f"an average needs {1 if decay is None else 2} or more")
    snapshots, first_ema = [], None
    for s, d in chosen:  # one checkpoint's state in memory at a time; only its weights are kept
        state = read_checkpoint(d)
        snapshots.append((s, role_weights(state, d, role)))
        first_ema = state["ema"]["model"] if first_ema is None else first_ema
    if decay is None:
        weights, how = average(snapshots), {"kind": "uniform"}
    else:
        weights = average(snapshots[1:], decay, start=first_ema, start_step=snapshots[0][0])
        how = {"kind": "ema", "decay": decay, "start": "the EMA of the first checkpoint"}
    base = run_dir / "export" / "ema"
    model = load_denoiser(base)
    missing = set(model.state_dict()) ^ set(weights)
    if missing:
        raise ValueError(f"{base}: its weights do not match the checkpoints' '{role}' ({len(missing)} keys differ, "
                         f"e.g. {sorted(missing)[0]}); a LoRA student is averaged from its own training, not here")
    model.load_state_dict(weights)
    extra = json.loads((base / EXPORT_META).read_text()).get("extra", {})
    how |= {"steps": [s for s, _ in snapshots]}
    extra = {k: v for k, v in extra.items() if k != "ema_decay"} | {"step": snapshots[-1][0], "average": how}
    save_student(model, out, extra)
    return how
