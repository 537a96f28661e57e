"""Reliability scenario ``serve_replica_killed``: the generator replica's process is SIGKILLed
(an OOM kill, a lost node) while clients keep sending; Serve's controller replaces it. Recorded:
every answer's status (200, or a 503 that says to retry: hyperscale/serve/app.py), the slowest
answer (bounded by ``request_timeout_s``: none hangs), and the seconds from the kill until a request
sent after it is answered 200 (the replacement replica serving)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from hyperscale.bench.serving import Client, ServerProcess
from hyperscale.train.local import free_port


def generator_replica_pids(root_pid: int) -> list[int]:
    """PIDs of the generator replicas under ``root_pid`` (Ray titles them ray::ServeReplica:app:GeneratorDeployment)."""
    import psutil

    out = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ServeReplica" in title and "GeneratorDeployment" in title:
            out.append(proc.pid)
    return sorted(out)


def serve_replica_killed(work: Path, generator: str = "assets/sim-generator", clients: int = 4,
                         timeout_s: float = 20.0, recover_within_s: float = 300.0) -> dict:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(free_port(), [f"generator={generator}", "num_replicas=1", "auth_token_env=null",
                                          f"request_timeout_s={timeout_s:g}", "replica_cpus=0.5"],
                           work / "serve.log")
    answers: list[tuple[float, int, float, bytes]] = []  # (sent at, status, seconds, body)
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        conn, n = Client(server.url, timeout=timeout_s * 3), 0
        while not stop.is_set():
            n += 1
            t0 = time.monotonic()
            try:
                status, body = conn.post("/v1/generate", {"class": i % 10, "seed": n})
            except OSError as e:  # a client-side timeout (3x the server's bound): a hung request
                status, body = -1, repr(e).encode()
            with lock:
                answers.append((t0, status, time.monotonic() - t0, body))
        conn.close()

    try:
        pids = generator_replica_pids(server.proc.pid)
        if len(pids) != 1:
            raise RuntimeError(f"expected one generator replica process, found {pids}")
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        while len(answers) < 4 * clients:
            time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        recovered_at = None
        deadline = killed_at + recover_within_s
        while time.monotonic() < deadline and recovered_at is None:
            time.sleep(0.2)
            with lock:  # when the first request sent after the kill was answered 200: service is back
                ok = [t0 + dt for t0, s, dt, _ in answers if s == 200 and t0 > killed_at]
            new = generator_replica_pids(server.proc.pid)
            if ok and new and new != pids:
                recovered_at = min(ok)
        time.sleep(2.0)  # a few requests on the new replica
        stop.set()
        for t in threads:
            t.join(timeout=timeout_s * 4)
        hung = sum(t.is_alive() for t in threads)
    finally:
        server.stop()
    after = [(s, dt, b) for t0, s, dt, b in answers if t0 >= killed_at]
    statuses = [s for s, _, _ in after]
    unclear = [b[:200].decode(errors="replace") for s, _, b in after if s == 503 and b"retry" not in b]
    return {"scenario": "serve_replica_killed", "clients": clients, "request_timeout_s": timeout_s,
            "requests_before_kill": len(answers) - len(after), "requests_after_kill": len(after),
            "ok_after_kill": statuses.count(200), "503_after_kill": statuses.count(503),
            "other_errors": sorted({s for s in statuses if s not in (200, 503)}), "hung_clients": hung,
            "slowest_answer_s": round(max((dt for _, dt, _ in after), default=0.0), 2),
            "service_back_after_s": None if recovered_at is None else round(recovered_at - killed_at, 1),
            "unclear_503": unclear[:3],
            "result": ("recovered: every request answered (200, or 503 'retry' while the replica was "
                       "replaced), none hung" if recovered_at is not None and not hung and
                       set(statuses) <= {200, 503} and not unclear else "FAILED: see the fields"),
            "lost": f"{statuses.count(503)} requests answered 503 (clients retry); no hung request",
            "_answers": json.dumps([(round(t0 - killed_at, 2), s) for t0, s, _, _ in answers])}
