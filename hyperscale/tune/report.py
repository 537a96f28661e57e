"""The sweep's outputs from plain trial rows: the table sorted by the metric (JSON record in
the envelope of docs/benchmarks.md §1.4, CSV, markdown), the metric against training steps for every trial
(PNG), and the compute early stopping saved.

A trial row: ``trial`` (name), ``overrides`` ({dotted key: value}), ``history`` ([(step,
metric), ...] in report order), ``steps`` (the last step it ran), ``stopped_early`` (stopped
by the scheduler before ``max_steps``), ``error`` (None or the failure's text).
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from hyperscale.storage.records import write_record
from hyperscale.storage.local import atomic_file


def finish_rows(rows: list[dict], mode: str) -> list[dict]:
    """Add ``metric`` (the last reported value: what the scheduler compared) and
    ``best_metric``; sort best first (failed trials last)."""
    sign = 1 if mode == "min" else -1
    for r in rows:
        values = [m for _, m in r["history"] if m is not None and math.isfinite(m)]
        r["metric"] = values[-1] if values else None
        r["best_metric"] = (min(values) if mode == "min" else max(values)) if values else None
    return sorted(rows, key=lambda r: (r["metric"] is None, sign * (r["metric"] if r["metric"] is not None else 0)))


def compute(rows: list[dict], max_steps: int) -> dict:
    """Training steps the sweep ran against running every trial to ``max_steps``."""
    ran = sum(r["steps"] for r in rows)
    full = max_steps * len(rows)
    return {"trials": len(rows), "stopped_early": sum(bool(r["stopped_early"]) for r in rows),
            "steps_run": ran, "steps_if_all_finished": full,
            "saved_fraction": 1 - ran / full if full else 0.0}


def _fmt(v) -> str:
    if isinstance(v, list) and v and all(isinstance(x, dict) and {"segments", "steps"} <= x.keys() for x in v):
        return " > ".join(f"{x['segments']}seg x {x['steps']}" for x in v)  # a TSCD stage list
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["overrides"]})
    head = ["rank", "trial", *keys, metric, f"best {metric}", "steps", "stopped early"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r["trial"], *[_fmt(r["overrides"].get(k, "")) for k in keys],
                 _fmt(r["metric"]) if r["metric"] is not None else (r.get("error") or "—").splitlines()[0][:40],
                 _fmt(r["best_metric"]) if r["best_metric"] is not None else "—",
                 str(r["steps"]), "yes" if r["stopped_early"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["overrides"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", *keys, metric, "best_" + metric, "steps", "stopped_early", "error"])
    for r in rows:
        w.writerow([r["trial"], *[r["overrides"].get(k, "") for k in keys], r["metric"], r["best_metric"],
                    r["steps"], r["stopped_early"], (r.get("error") or "").splitlines()[0] if r.get("error") else ""])
    return buf.getvalue()


def plot_histories(rows: list[dict], metric: str, path: str | os.PathLike, title: str = "") -> Path:
    """One line per trial: ``metric`` against training steps; early-stopped trials dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        pts = [(s, m) for s, m in r["history"] if m is not None and math.isfinite(m)]
        if pts:
            label = r["trial"] + ": " + ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r["overrides"].items())
            ax.plot([s for s, _ in pts], [m for _, m in pts], marker="o", markersize=3,
                    linestyle="--" if r["stopped_early"] else "-", label=label)
    ax.set_xlabel("training steps")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per trial (dashed: stopped early)", fontsize=9)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)  # below: never over the lines
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def write_sweep_report(rows: list[dict], out_dir: str | os.PathLike, metric: str, mode: str, max_steps: int,
                       settings: dict, command: str | None = None) -> dict[str, Path]:
    """sweep.json (record), sweep.csv, sweep.md, sweep_metric_vs_steps.png in ``out_dir``."""
    out = Path(out_dir)
    rows = finish_rows(rows, mode)
    saved = compute(rows, max_steps)
    record_rows = [{"trial": r["trial"], "overrides": r["overrides"], "metric": r["metric"],
                    "best_metric": r["best_metric"], "steps": r["steps"], "stopped_early": r["stopped_early"],
                    "history": r["history"], "error": r.get("error")} for r in rows]
    paths = {"json": write_record(out, "sweep", settings | {"metric": metric, "mode": mode, "max_steps": max_steps,
                                                             "compute": saved}, record_rows, command)}
    for name, text in (("csv", csv_text(rows, metric)), ("md", markdown(rows, metric))):
        paths[name] = out / f"sweep.{name}"
        with atomic_file(paths[name]) as tmp:
            tmp.write_text(text)
    paths["png"] = plot_histories(rows, metric, out / "sweep_metric_vs_steps.png")
    return paths
