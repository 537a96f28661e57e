"""Ray Serve hosting a text-to-image export (tiny random sd15 pipelines) on 127.0.0.1: a prompt
gives the image our sampler gives for its seed, at the asked size; sizes, class names and bad
prompts are 4xx naming the problem; a LoRA-only adapter applies over its base pipeline."""
import base64
import io
import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from test_serve import chromium_page, free_port
from tiny_exports import reference_one_step, tiny_text_exports, to_pixels

pytestmark = pytest.mark.timeout(600)  # the first test also starts the server


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return tiny_text_exports(tmp_path_factory.mktemp("t2i-serve"))


@pytest.fixture(scope="module")
def server(ray_cluster, exports):
    from ray import serve

    from hyperscale.serve.app import build_app

    adapters = exports["one-step"].parent / "adapters"
    adapters.mkdir()
    shutil.copytree(exports["lora-student"] / "lora", adapters / "lora")  # LoRA-only: applies to lora_base
    shutil.copytree(exports["multi-step"], adapters / "base")  # the same base, as a full export
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"generator": str(exports["one-step"]), "adapters_dir": str(adapters),
                         "lora_base": str(exports["multi-step"]), "auth_token_env": None, "replica_cpus": 0.5,
                         "max_images_per_request": 4, "max_batch_size": 8}),
              name="hyperscale-text-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def call(url, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def pixels_of(body: bytes) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")).astype(np.int16)
            for b in json.loads(body)["images"]]


def test_models_says_family_prompts_sizes_and_steps(server):
    status, _, body = call(server, "/v1/models")
    assert status == 200, body
    models = json.loads(body)
    d = models["default"]
    assert d["family"] == "sd15" and d["takes"] == "prompts" and d["kind"] == "one-step"
    assert d["sizes"] == {"default": [32, 32], "heights": [32, 64], "widths": [32, 64]} and d["default_steps"] == 1
    assert models["adapters"] == ["base", "lora"]


def test_a_prompt_gives_our_samplers_image_for_its_seed(server, exports):
    status, headers, body = call(server, "/v1/generate", {"prompt": "a photo of a sneaker", "seed": 7})
    assert status == 200, body
    out = json.loads(body)
    assert out["prompts"] == ["a photo of a sneaker"] and (out["height"], out["width"]) == (32, 32)
    assert headers["X-Seed"] == "7" and "X-Class" not in headers and "class" not in out
    (got,) = pixels_of(body)
    want = to_pixels(reference_one_step(exports["one-step"], "a photo of a sneaker", 7)[0])
    assert got.shape == (32, 32, 3) and np.abs(got - want).max() <= 1  # within 1/255
    assert call(server, "/v1/generate", {"prompt": "a photo of a sneaker", "seed": 7})[2] == body


def test_prompt_lists_and_sizes(server, exports):
    status, _, body = call(server, "/v1/generate", {"prompt": ["a red bag", "a coat"], "num_images": 2, "seed": 3})
    assert status == 200, body
    assert json.loads(body)["prompts"] == ["a red bag", "a red bag", "a coat", "a coat"]
    got = pixels_of(body)
    want = to_pixels(reference_one_step(exports["one-step"], "a coat", 3 + 2)[0])  # image 2: "a coat", seed 3 + 2
    assert len(got) == 4 and np.abs(got[2] - want).max() <= 1
    status, headers, raw = call(server, "/v1/generate", {"prompt": "a coat", "seed": 1, "height": 64, "width": 32,
                                                        "response": "image"})
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(raw)).size == (32, 64)  # (width, height)


BAD = [
    ("unsupported height", {"prompt": "a coat", "height": 48}, "height: 48 is not a size 'default' generates; "
                                                              "height must be one of 32, 64 and width one of 32, 64"),
    ("class name", {"class": "sneaker"}, "it takes prompts, not class names"),
    ("no prompt", {"seed": 1}, "prompt: required"),
    ("too many images", {"prompt": ["a", "b", "c"], "num_images": 2}, "3 prompts x 2 = 6 images"),
    ("guidance on 1 step", {"prompt": "a coat", "guidance_scale": 2.0}, "1-step generator"),
    ("negative prompt without guidance", {"prompt": "a coat", "steps": 2, "adapter": "base",
                                          "negative_prompt": "blue"}, "guidance_scale above 1"),
]


@pytest.mark.parametrize("name,body,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_naming_the_problem(server, name, body, words):
    status, _, out = call(server, "/v1/generate", body)
    assert status == 422, out  # every request the model cannot honour, as for class models
    assert words in json.loads(out)["error"]
    assert call(server, "/v1/generate", {"prompt": "a coat", "seed": 1})[0] == 200


def test_a_lora_adapter_applies_over_its_base(server, exports):
    from hyperscale.diffusion.sampling import sample_tcd
    from hyperscale.models.build import load_denoiser
    from hyperscale.models.denoiser import CFGDenoiser
    from hyperscale.models.families import family_of

    body = {"prompt": "a photo of a sneaker", "seed": 4, "steps": 2, "eta": 0.0, "guidance_scale": 2.0}
    status, headers, out = call(server, "/v1/generate", body | {"adapter": "lora"})
    assert status == 200, out
    assert headers["X-Model"] == "lora"
    student = load_denoiser(exports["lora-student"])  # its merged weights: the reference
    fam = family_of(student)
    z = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(4))[None]
    with torch.no_grad():
        x = sample_tcd(CFGDenoiser(student, 2.0), z, fam.encode_condition(student, [body["prompt"]]), 2, eta=0.0)
        want = to_pixels(fam.decode(student, x).clamp(-1, 1)[0])
    (got,) = pixels_of(out)
    assert np.abs(got - want).max() <= 1
    base = pixels_of(call(server, "/v1/generate", body | {"adapter": "base"})[2])[0]
    assert np.abs(base - got).max() > 2  # the LoRA changes the image


def test_the_page_takes_a_prompt_in_headless_chromium(server):
    from selenium.webdriver.common.by import By

    with chromium_page(server + "/") as (driver, wait):
        # a text-to-image model: the page says so and hides the class list
        wait.until(lambda d: "text-to-image" in d.find_element(By.ID, "intro").text)
        assert not driver.find_element(By.ID, "class-label").is_displayed()
        driver.find_element(By.ID, "prompt").send_keys("a grey coat on a black background")
        num = driver.find_element(By.ID, "num")
        num.clear()
        num.send_keys("2")
        driver.find_element(By.ID, "go").click()
        status = lambda: driver.find_element(By.ID, "status").text  # noqa: E731
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.generated")) == 2 or "rror" in status())
        assert "rror" not in status(), status()
        imgs = driver.find_elements(By.CSS_SELECTOR, "img.generated")
        wait.until(lambda d: all(d.execute_script("return arguments[0].naturalWidth", im) == 32 for im in imgs))
        assert "a grey coat on a black background" in driver.find_element(By.ID, "status").text
