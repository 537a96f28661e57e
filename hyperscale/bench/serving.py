"""The serving suite of docs/benchmarks.md §7: a bounded HTTP load generator and the in-process reference.

Each level runs ``clients`` closed-loop clients (each sends its next request when the last
one answered) until ``max_requests`` have been sent or ``max_seconds`` have passed,
whichever is first; a request that fails or answers non-200 counts as an error. Rows follow
docs/benchmarks.md §1.4: clients, batching, requests_per_s, images_per_s, p50/p95/p99 latency, errors,
and one ``clients: 0`` row for the generator called in-process at the same batch size.
"""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from hyperscale.models.generation import GenerateRequest, ImageGenerator, Limits
from hyperscale.progress import Progress


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Client:
    """One load-generating client: a persistent HTTP/1.1 connection (keep-alive), reopened after
    an error, so the figures measure the server rather than TCP set-up."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0):
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self.headers = {"Content-Type": "application/json",
                        **({"Authorization": f"Bearer {token}"} if token else {})}
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.request("POST", path, body=data, headers=self.headers)
            r = self.conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_level(base_url: str, clients: int, body: dict, max_requests: int, max_seconds: float,
              token: str | None = None, desc: str | None = None) -> dict:
    """One load level against ``POST {base_url}/v1/generate``; bounded in count and time.
    ``desc``: show its progress (requests answered, rate, errors, ETA) under that name."""
    lock = threading.Lock()
    sent, latencies, errors = [0], [], [0]
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        conn = Client(base_url, token)
        try:
            loop(conn)
        finally:
            conn.close()

    def loop(conn: Client) -> None:
        while True:
            with lock:
                if sent[0] >= max_requests or time.perf_counter() >= deadline:
                    return
                sent[0] += 1
                seed = sent[0]
            t0 = time.perf_counter()
            try:
                status, _ = conn.post("/v1/generate", {**body, "seed": seed})
            except (OSError, http.client.HTTPException):
                status = -1
            dt = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(dt)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    shown = Progress(max_requests, desc, "requests", prefix="[loadtest]") if desc else None
    while shown and any(t.is_alive() for t in threads) and time.perf_counter() < deadline + 120:
        time.sleep(0.5)
        with lock:
            done, failed = len(latencies) + errors[0], errors[0]
        now = time.perf_counter()
        by_rate = (max_requests - done) * (now - t0) / done if done else None
        eta = max(0.0, deadline - now) if by_rate is None else min(by_rate, max(0.0, deadline - now))
        shown.set(done, {"req/s": done / (now - t0), "errors": failed}, eta=eta)
    for t in threads:
        t.join(max_seconds + 120)
    if shown:  # the level is over (its request or its time bound)
        shown.set(len(latencies) + errors[0], {"req/s": (len(latencies) + errors[0]) / (time.perf_counter() - t0),
                                               "errors": errors[0]}, eta=0.0, force=True)
        shown.close()
    wall = time.perf_counter() - t0
    ok = len(latencies)
    return {"clients": clients, "requests": sent[0], "requests_per_s": ok / wall,
            "images_per_s": ok * body.get("num_images", 1) / wall,
            "p50_ms": 1000 * _percentile(latencies, 0.50), "p95_ms": 1000 * _percentile(latencies, 0.95),
            "p99_ms": 1000 * _percentile(latencies, 0.99), "errors": errors[0], "wall_s": wall}


def in_process(source: str, batch: int, body: dict, min_calls: int = 5, min_seconds: float = 3.0,
               threads: int | None = None) -> dict:
    """The same generator, same request, called in this process at ``batch`` images per call
    (sampling and PNG encoding both counted, as the server does both): after one warm-up call,
    calls until both ``min_calls`` and ``min_seconds`` are reached; images over the time they took
    (a few calls of one image last milliseconds, too short to be a stable reference)."""
    if threads:
        torch.set_num_threads(threads)
    gen = ImageGenerator.load(source)
    jobs = [gen.prepare(GenerateRequest.model_validate({**body, "seed": i}), Limits(max_images_per_request=batch))
            for i in range(batch)]

    def call() -> None:
        for job, x in zip(jobs, gen.generate(jobs)):
            gen.render(job, x)

    call()  # warm-up
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        call()
        calls += 1
    wall = time.perf_counter() - t0
    return {"clients": 0, "batching": None, "batch": batch, "images_per_s": calls * batch * body.get("num_images", 1) / wall,
            "requests_per_s": None, "p50_ms": None, "p95_ms": None, "p99_ms": None, "errors": 0,
            "calls": calls, "wall_s": wall}


class ServerProcess:
    """``jobs/serve.py`` in a child process (same machine, 127.0.0.1), stopped by its own PID."""

    def __init__(self, port: int, overrides: list[str], log_path: Path, ready_timeout: float = 300.0):
        root = Path(__file__).resolve().parents[2]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(root / "jobs" / "serve.py"), "--host", "127.0.0.1",
                                      "--port", str(port), *overrides], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jobs/serve.py exited with {self.proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"jobs/serve.py not ready after {ready_timeout:.0f} s; see {log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def merge_generators(out_dir: str | Path, generator: str, settings: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    """One serve record holds every generator's levels: this run's rows (each tagged with
    ``generator``) replace the earlier rows of the same generator; the other generators' rows
    stay, with the settings, commit, date and machine they were measured with under
    ``settings["other_generators"][name]``. Returns (settings, rows) to write."""
    rows = [r | {"generator": generator} for r in rows]
    path = Path(out_dir) / "serve.json"
    if not path.is_file():
        return settings, rows
    old = json.loads(path.read_text())
    old_settings = dict(old.get("settings", {}))
    others = old_settings.pop("other_generators", {})
    old_gen = old_settings.get("generator")
    others[old_gen] = old_settings | {k: old.get(k) for k in ("commit", "date", "machine", "command")}
    others.pop(generator, None)
    kept = [r | {"generator": r.get("generator", old_gen)} for r in old.get("rows", [])]
    kept = [r for r in kept if r["generator"] in others]
    return settings | ({"other_generators": others} if others else {}), kept + rows
