"""Benchmarks (BENCHMARK.md). The quality suite: the teacher's DDIM rows and the real-data floor.

    python jobs/bench.py --suite quality [--teacher assets/teacher] [--fid-samples 2000]
"""
import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hyperscale.eval.bench import QualitySettings, run_quality  # noqa: E402

if __name__ == "__main__":
    d = QualitySettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["quality"], default="quality")
    p.add_argument("--teacher", default=str(ROOT / "assets" / "teacher"), help="teacher export (dir, hub id, s3://)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    p.add_argument("--fid-samples", type=int, default=d.fid_samples)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--steps", default=",".join(map(str, d.teacher_steps)), help="teacher DDIM step counts")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default=d.spacing)
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args()
    s = QualitySettings(fid_samples=a.fid_samples, batch_size=a.batch_size, seed=a.seed,
                        teacher_steps=[int(x) for x in a.steps.split(",")],
                        guidance_scale=a.guidance_scale, spacing=a.spacing)
    path = run_quality(a.teacher, a.out, s, command="python jobs/bench.py " + shlex.join(sys.argv[1:]))
    print(f"[bench] wrote {path}")
