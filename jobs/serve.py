"""Serve an exported generator over HTTP with Ray Serve (POST /v1/generate, a page at /).

    python jobs/serve.py [--config jobs/configs/serve.yaml] [--port 8000] [key=value ...]
    python jobs/serve.py generator=runs/sim/export/ema adapters_dir=runs/exports

Started plainly it runs an embedded local Ray; with RAY_ADDRESS set it deploys to that
cluster. ``key=value`` overrides the application's args (hyperscale/serve/settings.py).
Runs until interrupted, or for --duration seconds.
"""
import argparse
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hyperscale.config import ConfigError  # noqa: E402
from hyperscale.serve.settings import SERVE_THROUGHPUT_ENV, load_serve_config  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "serve.yaml"))
    p.add_argument("--host", default=None, help="default: the config's http_options.host")
    p.add_argument("--port", type=int, default=None, help="default: the config's http_options.port")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args()
    try:
        http, app, settings = load_serve_config(a.config, a.overrides)
    except ConfigError as e:
        p.error(str(e))
    from ray import serve

    from hyperscale.serve.app import build_app
    from hyperscale.train.launch import ensure_ray

    if settings.throughput_env and not os.environ.get("RAY_ADDRESS"):
        for k, v in SERVE_THROUGHPUT_ENV.items():  # read by the proxy when the local Ray starts it
            os.environ.setdefault(k, v)
    ensure_ray()
    host, port = a.host or http.get("host", "127.0.0.1"), a.port or http.get("port", 8000)
    quiet = {"enable_access_log": settings.access_log, "log_level": "INFO" if settings.access_log else "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(build_app(settings.model_dump()), name=app.get("name", "hyperscale"),
              route_prefix=app.get("route_prefix", "/"))
    print(f"[serve] http://{host}:{port}/  (POST /v1/generate, docs at /docs); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(a.duration)
    serve.shutdown()
    print("[serve] stopped", flush=True)
