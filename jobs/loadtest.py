"""Serving benchmark (docs/benchmarks.md §7): HTTP load at 1, 8, 32 clients with batching on and off,
and the same generator in-process at the same batch size; writes docs/bench/serve.json.

    python jobs/loadtest.py [--generator assets/sim-generator] [--clients 1,8,32]
    python jobs/loadtest.py --generator assets/fmnist-t2i/sim-generator   # adds its rows to serve.json
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

from hyperscale.storage.records import write_record  # noqa: E402
from hyperscale.bench.serving import ServerProcess, in_process, merge_generators, run_level  # noqa: E402


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
    p.add_argument("--num-images", type=int, default=1, help="images per request")
    p.add_argument("--response", choices=["image", "json"], default="image",
                   help="raw PNG bytes (num_images 1) or base64 JSON")
    p.add_argument("--ref-seconds", type=float, default=3.0, help="least time per in-process reference")
    p.add_argument("--prompt", default=None, help="the request's prompt (default for a text-to-image pipeline "
                   "folder: 'a photo of a sneaker'; a class-conditional generator gets class 'sneaker')")
    p.add_argument("--token", default=None)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    a = p.parse_args()
    levels = [int(c) for c in a.clients.split(",")]
    if a.response == "image" and a.num_images != 1:
        p.error("--response image returns one image; use --num-images 1 or --response json")
    text = a.prompt or ((Path(a.generator) / "model_index.json").is_file() and "a photo of a sneaker")
    body = ({"prompt": text} if text else {"class": "sneaker"}) | {"num_images": a.num_images, "response": a.response}
    rows = []

    def measure(url: str, batching):
        for c in levels:
            row = {"batching": batching, **run_level(url, c, body, a.max_requests, a.max_seconds, a.token,
                                                     desc=f"batching={batching} clients={c}")}
            rows.append(row)
            print(f"[loadtest] batching={batching!s:5} clients={c:3}  {row['requests_per_s']:7.1f} req/s  "
                  f"{row['images_per_s']:7.1f} img/s  p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  "
                  f"p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}", flush=True)

    # In-process references: one call per request's worth of images (the same batch as a request),
    # and one call at the server's largest batch (what dynamic batching can at best reach); taken
    # before and after the HTTP levels, and the ratio is against the faster of the two (the
    # machine's speed drifts over minutes on shared cores: the ratio must not profit from it).
    ref_body = {k: v for k, v in body.items() if k != "num_images"} | {"num_images": 1}
    batches = sorted({a.num_images, a.max_batch_size})

    def references(when: str) -> None:
        for batch in batches:
            ref = in_process(a.generator, batch, ref_body, min_seconds=a.ref_seconds) | {"when": when}
            rows.append(ref)
            print(f"[loadtest] in-process batch {batch} ({when}): {ref['images_per_s']:.1f} img/s", flush=True)

    references("before")
    if a.url:
        measure(a.url.rstrip("/"), None)
    else:
        logs = Path(tempfile.mkdtemp(prefix="hs-loadtest-"))
        print(f"[loadtest] logs: {logs} (each jobs/serve.py server's console: Ray Serve's log lines)", flush=True)
        for batching in (True, False):
            print(f"[loadtest] starting jobs/serve.py (batching={batching}); it answers when its model is loaded",
                  flush=True)
            server = ServerProcess(free_port(), [f"generator={a.generator}", f"batching={str(batching).lower()}",
                                                 f"max_batch_size={a.max_batch_size}", "max_ongoing_requests=128"],
                                   logs / f"serve-batching-{batching}.log")
            try:
                measure(server.url, batching)
            finally:
                server.stop()
    references("after")
    refs = [max((r for r in rows if r.get("batch") == b), key=lambda r: r["images_per_s"]) for b in batches]
    top = max(levels)
    best = max((r for r in rows if r["clients"] == top and r["batching"] is not False),
               key=lambda r: r["images_per_s"], default=None)
    off = next((r for r in rows if r["clients"] == top and r["batching"] is False), None)
    gen_path = Path(a.generator).resolve()
    shown = str(gen_path.relative_to(ROOT)) if gen_path.is_relative_to(ROOT) else a.generator  # no machine paths
    settings = {"generator": shown, "request": body, "clients": levels, "max_requests": a.max_requests,
                "max_seconds": a.max_seconds, "server_max_batch_size": a.max_batch_size,
                "http_over_in_process_same_batch": best and best["images_per_s"] / refs[0]["images_per_s"],
                "http_over_in_process_max_batch": best and best["images_per_s"] / refs[-1]["images_per_s"],
                "batching_gain": best and off and best["images_per_s"] / off["images_per_s"]}
    settings, rows = merge_generators(a.out, shown, settings, rows)  # other generators' rows stay
    path = write_record(a.out, "serve", settings, rows, "python jobs/loadtest.py " + shlex.join(sys.argv[1:]))
    print(f"[loadtest] HTTP images/s at {top} clients over in-process: same batch "
          f"{settings['http_over_in_process_same_batch']}, largest batch {settings['http_over_in_process_max_batch']}; "
          f"batching on/off {settings['batching_gain']}; "
          f"wrote {path}")
