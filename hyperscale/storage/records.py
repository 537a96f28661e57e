"""Benchmark records in the envelope of docs/benchmarks.md §1.4 (suite, commit, date, machine, command, settings,
rows), written atomically; used by every suite (eval, train's memory/reliability, serving)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hyperscale.storage.local import atomic_file


def machine() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_record(out_dir: str | os.PathLike, suite: str, settings: dict, rows: list[dict],
                 command: str | None = None) -> Path:
    """``<out_dir>/<suite>.json`` in the envelope of docs/benchmarks.md §1.4, written atomically."""
    record = {"suite": suite, "commit": commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "command": command or " ".join([Path(sys.executable).name] + sys.argv),
              "settings": settings, "rows": rows}
    path = Path(out_dir) / f"{suite}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return path
