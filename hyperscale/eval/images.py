"""Image grids (PNG) and the FID-vs-steps plot, both written atomically."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from torch import Tensor

from hyperscale.eval.metrics import FID_NOTE
from hyperscale.storage.local import atomic_file


def make_grid(images: Tensor, nrow: int = 10, padding: int = 2) -> np.ndarray:
    """(N, C in {1, 3}, H, W) in [-1, 1] -> uint8 grid (rows*(H+p)+p, nrow*(W+p)+p[, 3]),
    ``nrow`` images per row, background black."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1|3, H, W) images, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = max(1, min(int(nrow), n))
    rows = math.ceil(n / nrow)
    u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    grid = np.zeros((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = u8[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 10, padding: int = 2) -> Path:
    """Write ``images`` (N, 1|3, H, W) in [-1, 1] as one PNG grid, ``nrow`` per row."""
    from PIL import Image

    with atomic_file(path) as tmp:
        Image.fromarray(make_grid(images, nrow, padding)).save(tmp, format="PNG")
    return Path(path)


def plot_fid_vs_steps(rows: Iterable[Mapping], path: str | os.PathLike,
                      title: str = FID_NOTE) -> Path:
    """One line per ``row["generator"]``: FID (y) against ``row["steps"]`` (x, log scale).

    Rows without a FID are skipped; rows without steps (e.g. the ``real-data`` floor)
    are drawn as horizontal dashed lines.
    """
    # Agg canvas on a bare Figure: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    floors: dict[str, float] = {}
    for row in rows:
        fid = row.get("fid")
        if fid is None or not math.isfinite(float(fid)):
            continue
        steps = row.get("steps")
        if steps is None or int(steps) <= 0:
            floors[str(row["generator"])] = float(fid)
        else:
            lines[str(row["generator"])].append((int(steps), float(fid)))
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, pts in lines.items():
        pts.sort()
        ax.plot([s for s, _ in pts], [f for _, f in pts], marker="o", label=name)
    for name, fid in floors.items():
        ax.axhline(fid, linestyle="--", color="grey", linewidth=1, label=name)
    ax.set_xscale("log")
    all_steps = sorted({s for pts in lines.values() for s, _ in pts})
    if all_steps:
        ax.set_xticks(all_steps)
        ax.set_xticklabels([str(s) for s in all_steps])
        ax.minorticks_off()
    ax.set_xlabel("sampling steps (network calls per sample: steps, ×2 with CFG)")
    ax.set_ylabel("FID ↓")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if lines or floors:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
