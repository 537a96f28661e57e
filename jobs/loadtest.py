"""Serving benchmark (BENCHMARK.md §4): HTTP load at 1, 8, 32 clients with batching on and off,
and the same generator in-process at the same batch size; writes docs/bench/serve.json.

    python jobs/loadtest.py [--generator assets/sim-generator] [--clients 1,8,32]
    python jobs/loadtest.py --url http://127.0.0.1:8000     # an already running jobs/serve.py

Without --url it starts jobs/serve.py itself on 127.0.0.1 (once per batching mode) and stops
it by PID. Every level is bounded: --max-requests and --max-seconds, whichever comes first.
"""
import argparse
import shlex
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hyperscale.eval.bench import write_record  # noqa: E402
from hyperscale.eval.serving import ServerProcess, in_process, run_level  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default=str(ROOT / "assets" / "sim-generator"))
    p.add_argument("--url", default=None, help="load an existing server instead of starting one")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--max-requests", type=int, default=400, help="per level")
    p.add_argument("--max-seconds", type=float, default=60.0, help="per level")
    p.add_argument("--max-batch-size", type=int, default=32, help="server batch (images) when batching is on")
    p.add_argument("--token", default=None)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    a = p.parse_args()
    levels = [int(c) for c in a.clients.split(",")]
    body = {"class": "sneaker", "num_images": 1}
    rows = []

    def measure(url: str, batching):
        for c in levels:
            row = {"batching": batching, **run_level(url, c, body, a.max_requests, a.max_seconds, a.token)}
            rows.append(row)
            print(f"[loadtest] batching={batching!s:5} clients={c:3}  {row['requests_per_s']:7.1f} req/s  "
                  f"{row['images_per_s']:7.1f} img/s  p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  "
                  f"p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}", flush=True)

    if a.url:
        measure(a.url.rstrip("/"), None)
    else:
        logs = Path(tempfile.mkdtemp(prefix="hs-loadtest-"))
        for batching in (True, False):
            server = ServerProcess(free_port(), [f"generator={a.generator}", f"batching={str(batching).lower()}",
                                                 f"max_batch_size={a.max_batch_size}", "max_ongoing_requests=128"],
                                   logs / f"serve-batching-{batching}.log")
            try:
                measure(server.url, batching)
            finally:
                server.stop()
    ref = in_process(a.generator, max(levels), body)
    rows.append(ref)
    print(f"[loadtest] in-process batch {ref['batch']}: {ref['images_per_s']:.1f} img/s", flush=True)
    best = max((r for r in rows if r["clients"] == max(levels) and r["batching"] is not False),
               key=lambda r: r["images_per_s"], default=None)
    settings = {"generator": a.generator, "request": body, "clients": levels, "max_requests": a.max_requests,
                "max_seconds": a.max_seconds, "server_max_batch_size": a.max_batch_size,
                "http_over_in_process": best["images_per_s"] / ref["images_per_s"] if best else None}
    path = write_record(a.out, "serve", settings, rows, "python jobs/loadtest.py " + shlex.join(sys.argv[1:]))
    print(f"[loadtest] HTTP/in-process at {max(levels)} clients: {settings['http_over_in_process']}; wrote {path}")
