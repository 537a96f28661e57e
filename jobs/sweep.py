"""Ray Tune sweep over distillation settings, early-stopped (ASHA) on a quick quality metric.

    python jobs/sweep.py [--config jobs/configs/sweep-sim.yaml] [key=value ...] [--resume]
                         [--report-dir DIR]

key=value overrides the sweep file's own keys (e.g. num_samples=4, scheduler.name=fifo).
Every trial is a real distillation through the project's training loop (one worker per
trial). Writes into --report-dir (default: the sweep's experiment dir): sweep.json (record),
sweep.csv, sweep.md (trials sorted by the metric), sweep_metric_vs_steps.png and best.yaml
(the best trial as a preset: ``python jobs/distill.py --config <dir>/best.yaml``).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyperscale.config import ConfigError  # noqa: E402
from hyperscale.storage.local import repo_relative  # noqa: E402
from hyperscale.eval.quick import QuickEval  # noqa: E402
from hyperscale.tune.report import write_sweep_report  # noqa: E402
from hyperscale.tune.space import load_sweep, trial_config  # noqa: E402
from hyperscale.tune.sweep import collect_rows, interrupted, run_sweep, write_best_preset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).parent / "configs" / "sweep-sim.yaml"))
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--report-dir", default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        sweep, base = load_sweep(args.config, args.overrides)
    except ConfigError as err:
        p.error(str(err))
    e = sweep.eval
    evaluator = QuickEval(num_samples=e.num_samples, seed=e.seed, reference_limit=e.reference_limit).prepare()
    results, exp_dir, tree, ended = run_sweep(sweep, base, evaluator, resume=args.resume)
    if interrupted(results, ended):
        print(f"[sweep] interrupted; continue it with: python jobs/sweep.py --config {args.config} --resume",
              file=sys.stderr)
        return 130
    max_steps = trial_config(tree, {}).train.max_steps
    rows = collect_rows(results, sweep.metric, max_steps)
    report_dir = Path(args.report_dir) if args.report_dir else exp_dir
    settings = sweep.model_dump(mode="json") | {"base": repo_relative(base),
                                                "eval_settings": evaluator.settings()}
    paths = write_sweep_report(rows, report_dir, sweep.metric, sweep.mode, max_steps, settings)
    ok = [r for r in rows if r["error"] is None and r["history"]]
    if not ok:
        print("[sweep] every trial failed; see the table", file=sys.stderr)
        return 1
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="last")
    preset = write_best_preset(tree, best.config["params"], report_dir / "best.yaml", sweep.name)
    print(paths["md"].read_text())
    print(f"[sweep] best {sweep.metric} = {best.metrics[sweep.metric]:.4g} with {best.config['params']}")
    print(f"[sweep] table {paths['md']}, record {paths['json']}, plot {paths['png']}, best preset {preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
