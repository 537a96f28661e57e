"""A generator replica killed under load: Serve starts a new one, every request in the gap is
answered (200, or a 503 that says to retry) within the server's request_timeout_s, none hangs, and
requests succeed again afterwards."""
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from test_serve import free_port
from tiny_exports import tiny_exports

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from hyperscale.serve.app import build_app

    one_step, _ = tiny_exports(tmp_path_factory.mktemp("faults"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"generator": str(one_step), "auth_token_env": None, "num_replicas": 1,
                         "replica_cpus": 0.5, "max_batch_size": 8, "request_timeout_s": 20}), name="hyperscale-faults", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"error": raw.decode(errors="replace")}


def generator_replicas() -> list[str]:
    """The live generator replicas' actor names (Serve names them SERVE_REPLICA::app#deployment#id)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and "GeneratorDeployment" in a["name"])


def test_a_killed_replica_is_replaced_and_no_request_hangs(server):
    import ray

    assert post(server, {"class": 1})[0] == 200
    before = generator_replicas()
    assert len(before) == 1
    answers, lock, stop = [], threading.Lock(), threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set() and n < 40:
            n += 1
            t0 = time.monotonic()
            try:
                status, body = post(server, {"class": i % 10, "seed": n}, timeout=90)
            except Exception as e:  # noqa: BLE001  (the bound: a hung request ends here and fails the test)
                status, body = -1, {"error": repr(e)}
            with lock:
                answers.append((status, body, time.monotonic() - t0))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    while len(answers) < 8:
        time.sleep(0.05)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # Serve's controller brings up a new replica
        now = generator_replicas()
        try:
            if now and now != before and post(server, {"class": 2}, timeout=30)[0] == 200:
                break
        except OSError:  # not yet
            pass
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    statuses = [s for s, _, _ in answers]
    assert set(statuses) <= {200, 503}, [(s, b) for s, b, _ in answers if s not in (200, 503)][:3]
    assert max(dt for _, _, dt in answers) < 60  # request_timeout_s 20 bounds every answer
    for s, body, _ in answers:
        if s == 503:
            assert "retry" in body["error"]
    replaced = generator_replicas()
    assert len(replaced) == 1 and replaced != before
    assert post(server, {"class": 3, "seed": 1})[0] == 200
    print(f"answers {len(answers)}: {statuses.count(200)} ok, {statuses.count(503)} x 503")
