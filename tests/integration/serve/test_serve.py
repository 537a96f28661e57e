"""Ray Serve on 127.0.0.1 with real exported tiny generators: images, determinism, every bad
input a 4xx while the server keeps serving, adapters, auth, batching, and the page in Chromium."""
import base64
import contextlib
import io
import json
import shutil
import socket
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tiny_exports import tiny_exports

from hyperscale.storage.local import REPO

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from hyperscale.serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    one_step, multi_step = tiny_exports(root)
    adapters = root / "adapters"
    adapters.mkdir()
    shutil.copytree(multi_step, adapters / "multistep")
    shutil.copytree(root / "lora", adapters / "hyper-lora")  # a LoRA-only adapter on the multi-step base
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"generator": str(one_step), "adapters_dir": str(adapters), "auth_token": TOKEN,
                         "lora_base": str(multi_step),
                         "replica_cpus": 0.5, "max_images_per_request": 8, "max_body_bytes": 4096,
                         "max_batch_size": 16, "batch_wait_timeout_s": 0.02}),
              name="hyperscale-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def call(url, path, body=None, raw=None, token=TOKEN, headers=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
         **(headers or {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=h), timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def images_of(body: bytes) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in json.loads(body)["images"]]


def test_health_ready_docs(server):
    assert call(server, "/healthz", token=None)[0] == 200
    status, _, body = call(server, "/readyz", token=None)
    assert status == 200 and json.loads(body)["model"]["kind"] == "one-step"
    assert call(server, "/docs", token=None)[0] == 200
    schema = json.loads(call(server, "/openapi.json", token=None)[2])
    assert "/v1/generate" in schema["paths"]


def test_images_decode_have_the_size_and_repeat_for_a_seed(server):
    status, headers, body = call(server, "/v1/generate", {"class": "sneaker", "num_images": 3, "seed": 4})
    assert status == 200, body
    imgs = images_of(body)
    assert len(imgs) == 3 and all(im.format == "PNG" and im.size == (28, 28) for im in imgs)
    assert json.loads(body)["class_name"] == "sneaker" and headers["X-Seed"] == "4"
    assert call(server, "/v1/generate", {"class": "sneaker", "num_images": 3, "seed": 4})[2] == body
    other = call(server, "/v1/generate", {"class": "sneaker", "num_images": 3, "seed": 5})[2]
    assert other != body
    status, headers, raw = call(server, "/v1/generate", {"prompt": "an ankle boot", "seed": 1, "size": 56,
                                                         "format": "jpeg", "response": "image"})
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(raw)).size == (56, 56)


def test_multistep_adapter_and_unknown_adapter(server):
    body = {"class": 3, "num_images": 2, "seed": 7, "steps": 4, "eta": 0.5, "adapter": "multistep"}
    status, headers, out = call(server, "/v1/generate", body)
    assert status == 200, out
    assert headers["X-Model"] == "multistep" and [im.size for im in images_of(out)] == [(28, 28)] * 2
    assert call(server, "/v1/generate", body)[2] == out
    lora = call(server, "/v1/generate", body | {"adapter": "hyper-lora"})
    assert lora[0] == 200 and lora[1]["X-Model"] == "hyper-lora" and lora[2] != out  # the LoRA changes images
    models = json.loads(call(server, "/v1/models")[2])
    assert models["adapters"] == ["hyper-lora", "multistep"] and models["auth"] is True


BAD = [
    ("malformed JSON", dict(raw=b'{"class": 1,'), 422, "malformed JSON"),
    ("wrong type", dict(body={"class": 1, "num_images": "two"}), 422, "num_images"),
    ("unknown field", dict(body={"class": 1, "colour": "red"}), 422, "colour"),
    ("too many images", dict(body={"class": 1, "num_images": 9}), 422, "num_images"),
    ("too many steps", dict(body={"class": 1, "steps": 9, "adapter": "multistep"}), 422, "steps"),
    ("steps on a 1-step model", dict(body={"class": 1, "steps": 2}), 422, "1-step"),
    ("eta out of range", dict(body={"class": 1, "eta": 2}), 422, "eta"),
    ("long prompt", dict(body={"prompt": "sneaker " * 100}), 422, "prompt"),
    ("no class", dict(body={"prompt": "a cat"}), 422, "no known class"),
    ("oversize body", dict(raw=json.dumps({"prompt": "x" * 5000}).encode()), 413, "over the limit"),
    ("unknown adapter", dict(body={"class": 1, "adapter": "nope"}), 404, "known: hyper-lora, multistep"),
    ("parent directory as adapter", dict(body={"class": 1, "adapter": ".."}), 404, "'..' is unknown"),
    ("current directory as adapter", dict(body={"class": 1, "adapter": "."}), 404, "'.' is unknown"),
    ("bad adapter name", dict(body={"class": 1, "adapter": "../x"}), 422, "adapter"),
    ("missing token", dict(body={"class": 1}, token=None), 401, "missing"),
    ("wrong token", dict(body={"class": 1}, token="wrong"), 401, "wrong token"),
]


@pytest.mark.parametrize("name,kw,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, name, kw, code, words):
    status, _, body = call(server, "/v1/generate", **kw)
    assert status == code, body
    assert words in json.loads(body)["error"]
    assert "/tmp" not in body.decode() and str(REPO) not in body.decode()  # no server path in an answer
    assert call(server, "/v1/generate", {"class": 0, "seed": 1})[0] == 200


def _exactly(n: int, text: str = "a photo of a sneaker") -> str:
    """A prompt naming a class, padded to exactly ``n`` characters."""
    return (text + " " + "x" * n)[:n] if n > len(text) else text[:n]


AT_MAX = [  # the server above: max_images_per_request 8, max_steps 8 (default), max_prompt_chars 256
    # (default), max_size 512 (default)
    ("num_images at the limit", {"class": 1, "num_images": 8}),
    ("steps at the limit", {"class": 1, "steps": 8, "adapter": "multistep"}),
    ("prompt at the limit", {"prompt": _exactly(256)}),
    ("size at the limit", {"class": 1, "size": 512}),
]


@pytest.mark.parametrize("name,body", AT_MAX, ids=[a[0] for a in AT_MAX])
def test_every_request_limit_admits_exactly_its_maximum(server, name, body):
    status, _, out = call(server, "/v1/generate", body | {"seed": 2})
    assert status == 200, out
    imgs = images_of(out)
    assert len(imgs) == body.get("num_images", 1)
    assert imgs[0].size == ((body["size"],) * 2 if "size" in body else (28, 28))


def test_a_body_of_exactly_max_body_bytes_is_admitted(server):
    """max_body_bytes 4096 here: a body of 4096 bytes passes the middleware, 4097 gets 413."""
    body = json.dumps({"class": 1, "seed": 3}).encode()
    exact = body[:-1] + b" " * (4096 - len(body)) + b"}"  # JSON whitespace pads it
    assert len(exact) == 4096
    status, _, out = call(server, "/v1/generate", raw=exact)
    assert status == 200, out
    over = body[:-1] + b" " * (4097 - len(body)) + b"}"
    assert call(server, "/v1/generate", raw=over)[0] == 413


def test_check_limits_admits_exactly_each_maximum_and_settings_map_to_limits():
    """Without a server: each bound of check_limits is inclusive, the next value up is refused,
    and ServeSettings hands every max_* to the same field of Limits."""
    from hyperscale.models.generation import GenerateRequest, Limits, RequestError, check_limits
    from hyperscale.serve.settings import ServeSettings

    lim = ServeSettings(max_images_per_request=3, max_steps=5, max_prompt_chars=30, max_size=40).limits()
    assert lim == Limits(max_images_per_request=3, max_steps=5, max_prompt_chars=30, max_size=40)
    at_max = {"num_images": 3, "steps": 5, "prompt": _exactly(30), "size": 40}
    check_limits(GenerateRequest.model_validate(at_max), lim)  # all four at once, exactly at the maximum
    for field, over in [("num_images", 4), ("steps", 6), ("prompt", _exactly(31)), ("size", 41)]:
        with pytest.raises(RequestError, match=field):
            check_limits(GenerateRequest.model_validate(at_max | {field: over}), lim)


def test_body_bound_admits_exactly_the_limit(monkeypatch):
    """The ASGI middleware alone: Content-Length == limit reaches the app, limit + 1 is a 413."""
    import asyncio

    from hyperscale.serve.app import BODY_LIMIT_ENV, BoundBody

    monkeypatch.setenv(BODY_LIMIT_ENV, "1000")
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["headers"])

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    def post(length: int) -> None:
        scope = {"type": "http", "method": "POST", "path": "/v1/generate", "query_string": b"",
                 "headers": [(b"content-length", str(length).encode())], "scheme": "http",
                 "server": ("127.0.0.1", 80), "root_path": "", "http_version": "1.1"}
        asyncio.run(BoundBody(app)(scope, receive, send))

    post(1000)
    assert len(reached) == 1 and not sent
    post(1001)
    assert len(reached) == 1 and sent[0]["status"] == 413


def test_concurrent_requests_batch_and_match_sequential_results(server):
    bodies = [{"class": i % 10, "num_images": 1 + i % 3, "seed": 100 + i} for i in range(12)]
    alone = [images_of(call(server, "/v1/generate", b)[2]) for b in bodies]
    results = [None] * len(bodies)

    def worker(i):
        results[i] = call(server, "/v1/generate", bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (status, _, body) in enumerate(results):
        assert status == 200
        for a, b in zip(images_of(body), alone[i]):
            diff = max(abs(x - y) for x, y in zip(a.getdata(), b.getdata()))
            assert diff <= 1  # batched with others: float rounding may move a pixel by one level


@contextlib.contextmanager
def chromium_page(url: str):
    """Headless Chromium (Debian's chromium + chromium-driver) on ``url``; yields (driver, wait)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_bin, "install Debian's chromium and chromium-driver (scripts/setup.sh does)"
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        yield driver, WebDriverWait(driver, 60)
    finally:
        driver.quit()


def test_the_page_generates_images_in_headless_chromium(server):
    from selenium.webdriver.common.by import By

    with chromium_page(server + "/") as (driver, wait):
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "prompt").send_keys("a photo of a sneaker")
        num = driver.find_element(By.ID, "num")
        num.clear()
        num.send_keys("2")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.generated")) == 2)
        imgs = driver.find_elements(By.CSS_SELECTOR, "img.generated")
        wait.until(lambda d: all(d.execute_script("return arguments[0].naturalWidth", im) == 28 for im in imgs))
        assert "sneaker" in driver.find_element(By.ID, "status").text
        # a bad request shows the server's message, not a blank page
        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "prompt").send_keys("a cat")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "no known class" in d.find_element(By.ID, "status").text)


def test_load_generator_is_bounded_and_records_the_serve_suite(server, tmp_path):
    import subprocess
    import sys

    from hyperscale.bench.serving import run_level

    row = run_level(server, clients=4, body={"class": 1, "num_images": 2}, max_requests=10, max_seconds=60,
                    token=TOKEN)
    assert row["requests"] == 10 and row["errors"] == 0
    assert row["images_per_s"] == pytest.approx(2 * row["requests_per_s"])
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    bad = run_level(server, clients=2, body={"class": 1}, max_requests=4, max_seconds=60, token="wrong")
    assert bad["errors"] == 4 and bad["requests_per_s"] == 0  # errors are counted, not timed
    root = REPO
    gen = json.loads(call(server, "/readyz", token=None)[2])  # the server's generator is the tiny export
    assert gen["status"] == "ready"
    out = subprocess.run([sys.executable, str(root / "jobs" / "loadtest.py"), "--url", server, "--token", TOKEN,
                          "--clients", "1,2", "--max-requests", "4", "--max-seconds", "30", "--out", str(tmp_path),
                          "--max-batch-size", "4", "--ref-seconds", "0.2",
                          "--generator", str(root / "assets" / "teacher")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads((tmp_path / "serve.json").read_text())
    assert rec["suite"] == "serve"
    assert [(r["clients"], r.get("batch"), r.get("when")) for r in rec["rows"]] == [
        (0, 1, "before"), (0, 4, "before"), (1, None, None), (2, None, None), (0, 1, "after"), (0, 4, "after")]
    for r in rec["rows"]:
        assert {"clients", "batching", "requests_per_s", "images_per_s", "p50_ms", "p95_ms", "p99_ms",
                "errors"} <= r.keys()
    assert rec["rows"][-1]["images_per_s"] > 0 and rec["rows"][2]["errors"] == 0
    fastest = max(r["images_per_s"] for r in rec["rows"] if r.get("batch") == 1)  # the ratio's reference
    http = max(r["images_per_s"] for r in rec["rows"] if r["clients"] == 2)
    assert rec["settings"]["http_over_in_process_same_batch"] == pytest.approx(http / fastest)
    assert rec["settings"]["http_over_in_process_same_batch"] > 0 and rec["settings"]["http_over_in_process_max_batch"] > 0


def test_batch_wait_follows_overlapping_requests(monkeypatch):
    """A lone client never waits to batch; overlapping requests do, until a whole window passes
    without overlap."""
    from hyperscale.serve import app

    now = [100.0]
    monkeypatch.setattr(app.time, "monotonic", lambda: now[0])
    load = app.Overlap(window_s=1.0)
    for _ in range(3):  # one request at a time
        assert not load.overlapping()
        with load:
            now[0] += 0.1
    with load:
        assert load.overlapping()  # a second request arrives while one is inside
        with load:
            pass
    now[0] += 1.05  # next window: the previous one's overlap still counts
    assert load.overlapping()
    now[0] += 1.05  # a whole window without overlap
    assert not load.overlapping()


def test_adapter_names_are_the_directory_entries_local_and_on_s3(tmp_path, moto):
    """What a server offers as adapters: sub-directories (local) or first-level prefixes (s3://);
    hidden entries and plain files are not adapters."""
    from s3_server import BUCKET

    from hyperscale.serve.app import adapter_names
    from hyperscale.storage import s3

    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "note.txt").write_text("not an adapter")
    assert adapter_names(str(tmp_path)) == ["a", "b"]
    assert adapter_names(str(tmp_path / "missing")) == []
    for key in ("adapters/x/hyperscale_model.json", "adapters/y/lora/w.safetensors", "adapters/.tmp/z",
                "adapterszzz/no"):
        s3.put_text(f"s3://{BUCKET}/{key}", "{}")
    assert adapter_names(f"s3://{BUCKET}/adapters") == ["x", "y"]
    assert adapter_names(f"s3://{BUCKET}/adapters/") == ["x", "y"]
