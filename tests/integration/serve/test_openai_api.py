"""The OpenAI-compatible image API (``POST /v1/images/generations``, OpenAI's fields of ``GET
/v1/models``) on 127.0.0.1, driven by the official ``openai`` client and by curl: a text-to-image
app (tiny random sd15 exports, adapters, a bearer token) and a class-conditional one beside it.
The images are /v1/generate's for the same request; errors are OpenAI's shape and status."""
import base64
import io
import json
import shutil
import subprocess

import pytest
from PIL import Image

from test_serve import call, free_port
from tiny_exports import tiny_exports, tiny_text_exports

from hyperscale.storage.local import REPO

pytestmark = pytest.mark.timeout(600)  # the first test also starts the server

TOKEN = "openai-test-token"
CLASS_PREFIX = "/class"  # the class-conditional app's route prefix


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from hyperscale.serve.app import build_app

    root = tmp_path_factory.mktemp("openai")
    text = tiny_text_exports(root / "t2i")
    adapters = root / "adapters"
    adapters.mkdir()
    shutil.copytree(text["lora-student"] / "lora", adapters / "lora")  # LoRA-only: applies to lora_base
    shutil.copytree(text["multi-step"], adapters / "base")
    one_step_class, _ = tiny_exports(root / "class")
    common = {"auth_token": TOKEN, "replica_cpus": 0.4, "max_images_per_request": 4, "max_body_bytes": 4096,
              "max_batch_size": 8, "num_replicas": 1}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"generator": str(text["one-step"]), "adapters_dir": str(adapters),
                         "lora_base": str(text["multi-step"]), **common}), name="openai-t2i", route_prefix="/")
    serve.run(build_app({"generator": str(one_step_class), **common}), name="openai-class",
              route_prefix=CLASS_PREFIX)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def client(url, api_key=TOKEN):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def generate_body(url, body, prefix=""):
    """/v1/generate's answer to ``body``: its base64 images."""
    status, _, out = call(url, prefix + "/v1/generate", body, token=TOKEN)
    assert status == 200, out
    return json.loads(out)["images"]


def test_openai_client_images_are_pngs_of_the_size_and_v1_generate_s_for_the_seed(server):
    c = client(server)
    kw = dict(model="default", prompt="a photo of a sneaker", n=2, size="32x32", response_format="b64_json",
              extra_body={"seed": 1, "num_inference_steps": 1})
    resp = c.images.generate(**kw)
    assert resp.created > 0 and len(resp.data) == 2
    imgs = [decode(d.b64_json) for d in resp.data]
    assert all(im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB" for im in imgs)
    assert resp.size == "32x32" and resp.output_format == "png"
    assert (resp.model_extra or {}).get("seed") == 1
    assert imgs[0].tobytes() != imgs[1].tobytes()  # image i draws seed 1 + i
    again = c.images.generate(**kw)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in resp.data]
    other = c.images.generate(**(kw | {"extra_body": {"seed": 2}}))
    assert other.data[0].b64_json != resp.data[0].b64_json
    # one code path: the bytes /v1/generate gives for the same request
    same = generate_body(server, {"prompt": "a photo of a sneaker", "num_images": 2, "seed": 1, "steps": 1,
                                  "height": 32, "width": 32})
    assert same == [d.b64_json for d in resp.data]
    # size is WIDTHxHEIGHT; model omitted is the default; jpeg through output_format
    wide = c.images.generate(prompt="a coat", size="64x32", output_format="jpeg", extra_body={"seed": 3})
    (im,) = [decode(d.b64_json) for d in wide.data]
    assert im.format == "JPEG" and im.size == (64, 32) and wide.size == "64x32"


def test_an_adapter_by_model_with_guidance_and_negative_prompt(server):
    c = client(server)
    extra = {"seed": 4, "num_inference_steps": 2, "guidance_scale": 2.0, "negative_prompt": "blue"}
    raw = c.images.with_raw_response.generate(model="lora", prompt="a photo of a sneaker", extra_body=extra)
    assert raw.headers["X-Model"] == "lora" and raw.headers["X-Seed"] == "4"
    lora = raw.parse()
    assert (lora.model_extra or {}).get("model") == "lora"
    want = generate_body(server, {"prompt": "a photo of a sneaker", "seed": 4, "steps": 2, "guidance_scale": 2.0,
                                  "negative_prompt": "blue", "adapter": "lora"})
    assert [d.b64_json for d in lora.data] == want
    base = c.images.generate(model="base", prompt="a photo of a sneaker", extra_body=extra)
    assert base.data[0].b64_json != lora.data[0].b64_json  # the LoRA changes the image


def test_models_list_has_openai_s_shape_and_keeps_the_old_keys(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["default", "base", "lora"]
    assert all(m.object == "model" and m.owned_by == "hyperscale" and m.created > 0 for m in models.data)
    status, _, body = call(server, "/v1/models", token=TOKEN)
    old = json.loads(body)
    assert status == 200 and old["object"] == "list" and old["adapters"] == ["base", "lora"]
    assert old["default"]["takes"] == "prompts" and old["auth"] is True


def _raises(exc_name, fn, **kw):
    import openai

    with pytest.raises(getattr(openai, exc_name)) as info:
        fn(**kw)
    err = info.value
    assert isinstance(err.body, dict) and err.body["type"] == "invalid_request_error", err.body
    text = json.dumps(err.body)
    assert "/tmp" not in text and str(REPO) not in text  # no server path in an answer
    return err


def test_errors_are_openai_s_exceptions_naming_the_field(server):
    gen = client(server).images.generate
    err = _raises("NotFoundError", gen, model="nope", prompt="a coat")
    assert err.code == "model_not_found" and err.param == "model"
    assert "model: 'nope' is unknown; known: default, base, lora" in err.body["message"]
    assert "'..' is unknown" in _raises("NotFoundError", gen, model="..", prompt="a coat").body["message"]
    err = _raises("BadRequestError", gen, prompt="a coat", size="48x32")
    assert err.param == "size" and "'48x32'" in err.body["message"]
    assert "W one of 32, 64 and H one of 32, 64 (default '32x32')" in err.body["message"]
    assert _raises("BadRequestError", gen, prompt="a coat", size="big").param == "size"
    err = _raises("BadRequestError", gen, prompt="a coat", response_format="url")
    assert err.param == "response_format" and "only 'b64_json'" in err.body["message"]
    err = _raises("BadRequestError", gen, prompt="a coat", n=5)
    assert err.param == "n" and err.body["message"].startswith("n: 5 is over this server's limit of 4")
    assert _raises("BadRequestError", gen, prompt="a coat", n=0).param == "n"
    err = _raises("BadRequestError", gen, prompt="a coat", extra_body={"num_inference_steps": 2})
    assert err.param == "num_inference_steps" and "1-step generator" in err.body["message"]
    err = _raises("BadRequestError", gen, prompt="a coat", quality="hd")  # an OpenAI field we do not take
    assert err.param == "quality" and "quality" in err.body["message"]
    assert _raises("BadRequestError", gen, prompt="a coat", output_format="webp").param == "output_format"
    assert _raises("BadRequestError", gen, prompt="x" * 257).param == "prompt"  # max_prompt_chars 256
    err = _raises("AuthenticationError", client(server, api_key="wrong").images.generate, prompt="a coat")
    assert err.code == "invalid_api_key" and "wrong token" in err.body["message"]
    import openai

    with pytest.raises(openai.AuthenticationError) as info:
        client(server, api_key="wrong").models.list()
    assert "wrong token" in info.value.body  # /v1/models keeps its errors' shape: {"error": "..."}
    err = _raises("APIStatusError", gen, prompt="x" * 5000)  # over max_body_bytes
    assert err.status_code == 413 and "over the limit" in err.body["message"]
    assert client(server).images.generate(prompt="a coat", extra_body={"seed": 1}).data  # still serving


def curl(url, body, token=TOKEN):
    assert shutil.which("curl"), "install curl (scripts/setup.sh does)"
    out = subprocess.run(["curl", "-s", "--noproxy", "*", "--max-time", "120", "-w", "\n%{http_code}", "-X", "POST",
                          url + "/v1/images/generations", "-H", f"Authorization: Bearer {token}",
                          "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    text, status = out.stdout.rsplit("\n", 1)
    return int(status), json.loads(text)


def test_curl_gets_the_same_json(server):
    body = {"prompt": "a photo of a sneaker", "n": 2, "size": "32x32", "seed": 1, "num_inference_steps": 1}
    status, out = curl(server, body)
    assert status == 200, out
    assert isinstance(out["created"], int) and out["size"] == "32x32"
    imgs = [decode(d["b64_json"]) for d in out["data"]]
    assert [im.size for im in imgs] == [(32, 32)] * 2
    same = client(server).images.generate(prompt=body["prompt"], n=2, size="32x32",
                                          extra_body={"seed": 1, "num_inference_steps": 1})
    assert [d["b64_json"] for d in out["data"]] == [d.b64_json for d in same.data]
    status, out = curl(server, body | {"model": "nope"})
    assert status == 404 and set(out["error"]) == {"message", "type", "param", "code"}
    status, out = curl(server, {"prompt": "a coat", "colour": "red"})
    assert status == 400 and out["error"]["param"] == "colour"
    status, out = curl(server, {"prompt": "a coat"}, token="wrong")
    assert status == 401 and out["error"]["code"] == "invalid_api_key"


def test_a_class_conditional_model_takes_a_prompt_naming_a_class(server):
    url = server + CLASS_PREFIX
    c = client(url)
    resp = c.images.generate(prompt="a photo of a sneaker", n=2, size="28x28", extra_body={"seed": 3})
    imgs = [decode(d.b64_json) for d in resp.data]
    assert [im.size for im in imgs] == [(28, 28)] * 2
    want = generate_body(server, {"prompt": "a photo of a sneaker", "num_images": 2, "seed": 3}, CLASS_PREFIX)
    assert [d.b64_json for d in resp.data] == want
    err = _raises("BadRequestError", c.images.generate, prompt="a cat")
    assert err.param == "prompt" and "names no known class; known:" in err.body["message"]
    assert "sneaker" in err.body["message"]
    err = _raises("BadRequestError", c.images.generate, prompt="a sneaker", size="32x32")
    assert "sizes: '28x28' only" in err.body["message"]
    assert [m.id for m in c.models.list().data] == ["default"]


def test_the_mapping_without_a_server():
    from hyperscale.models.generation import GenerateRequest, RequestError
    from hyperscale.serve.openai_api import ImagesRequest, rename, to_generate

    body = ImagesRequest(prompt="a coat", model="lora", n=3, size="64x32", output_format="jpeg", user="u",
                         seed=5, num_inference_steps=2, guidance_scale=3.0, negative_prompt="blue")
    fields = to_generate(body)
    assert fields == {"prompt": "a coat", "num_images": 3, "seed": 5, "steps": 2, "guidance_scale": 3.0,
                      "negative_prompt": "blue", "format": "jpeg", "adapter": "lora", "width": 64, "height": 32}
    GenerateRequest.model_validate(fields)
    assert to_generate(ImagesRequest(prompt="a", model="default")) == {"prompt": "a"}
    for bad in ("64", "64x", "x32", "64*32", "-1x2"):
        with pytest.raises(RequestError, match="WIDTHxHEIGHT") as info:
            to_generate(ImagesRequest(prompt="a", size=bad))
        assert info.value.param == "size"
    assert rename("num_images: 9 is over", "num_images") == ("n: 9 is over", "n")
    assert rename("steps: 9 is over", "steps") == ("num_inference_steps: 9 is over", "num_inference_steps")
    assert rename("prompt: required", "prompt") == ("prompt: required", "prompt")
    assert RequestError("prompt[1]: 300 characters").param == "prompt"
    assert RequestError("give 'class' or a prompt").param is None
