"""OpenAI-compatible image generation: ``POST /v1/images/generations`` and the OpenAI fields of
``GET /v1/models``, so OpenAI's clients (``openai.OpenAI(base_url=".../v1", api_key=token)``) and
the tools built on them talk to the server.

One code path: the body becomes a ``GenerateRequest`` (``to_generate``) and goes to the generator
exactly as a ``POST /v1/generate`` body does (same validation, limits, batching, adapters, auth);
this module only renames fields one way and errors the other.

Request fields:

- ``prompt`` (required): text-to-image models: the prompt. Class-conditional models: text naming a
  class ("a photo of a sneaker", "sneaker"), as ``/v1/generate``'s ``prompt``; one naming no class
  is a 400 that lists the classes.
- ``n`` -> ``num_images`` (1 to the server's ``max_images_per_request``).
- ``size`` ``"WIDTHxHEIGHT"`` -> ``width`` / ``height``: one the model generates (``GET /v1/models``
  lists them; a class-conditional model has its native size only); another is a 400 naming the
  sizes. Omitted: the model's default.
- ``model``: omitted or ``"default"`` -> the server's generator; another name -> the adapter of
  that name under ``adapters_dir`` (an adapter named ``default`` is shadowed); unknown -> 404 listing
  the known names (directory entries only, never a server path).
- ``response_format``: ``"b64_json"`` only, and the default here (OpenAI's default is ``url``):
  this server does not host image files, so ``"url"`` is a 400.
- ``output_format`` ``png`` (default) or ``jpeg`` -> ``format``; ``user`` is accepted and ignored.
- Extensions peers use (the client's ``extra_body``): ``seed``, ``num_inference_steps`` (->
  ``steps``), ``guidance_scale``, ``negative_prompt``.
- Any other field (OpenAI's ``quality``, ``style``, ``background``...) is a 400 naming it, as an
  unknown field of ``/v1/generate`` is a 422 there.

Response: ``{"created": <unix s>, "data": [{"b64_json": <PNG/JPEG base64>}, ...], "output_format",
"model", "seed", "size" (text-to-image models)}``, headers ``X-Seed`` and ``X-Model`` as
``/v1/generate``. Images are those ``/v1/generate`` gives for the same seed.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` wherever ``/v1/generate`` answers 422 (bad JSON, wrong types, unknown
fields, limits, sizes, what the model cannot do; OpenAI answers 400 there, and its client raises
``BadRequestError``), 401 (code ``invalid_api_key``) without the bearer token when auth is on, 404
(code ``model_not_found``) for an unknown model, 411 / 413 on the body bound. Messages name the
OpenAI field (``n``, ``num_inference_steps``, ``size``, ``model``).
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from hyperscale.models.generation import RequestError, to_base64

IMAGES_PATH = "/v1/images/generations"
DEFAULT_MODEL = "default"  # the id of the server's generator (ImageGenerator's name for it)
OWNER = "hyperscale"

# GenerateRequest field -> the OpenAI field a client sent it as
PARAM_OF = {"num_images": "n", "steps": "num_inference_steps", "format": "output_format", "adapter": "model",
            "height": "size", "width": "size"}
_FIELD_OF = {"n": "num_images", "num_inference_steps": "steps", "output_format": "format",
             "seed": "seed", "guidance_scale": "guidance_scale", "negative_prompt": "negative_prompt",
             "prompt": "prompt"}


class ImagesRequest(BaseModel):
    """The body of ``POST /v1/images/generations`` (module docstring). Values are checked where
    ``/v1/generate``'s are; only the shape is checked here."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: Optional[str] = Field(None, description=f"'{DEFAULT_MODEL}' (or omitted): the server's generator; "
                                                   "else an adapter name (GET /v1/models)")
    n: Optional[int] = Field(None, description="images (num_images)")
    size: Optional[str] = Field(None, description="'WIDTHxHEIGHT', one of the model's sizes")
    response_format: Optional[Literal["b64_json", "url"]] = Field(
        None, description="b64_json only (the default here): this server does not host image files")
    output_format: Optional[str] = Field(None, description="png (default) or jpeg")
    user: Optional[str] = Field(None, description="accepted and ignored")
    seed: Optional[int] = None
    num_inference_steps: Optional[int] = Field(None, description="steps; 1-step generators take 1")
    guidance_scale: Optional[float] = None
    negative_prompt: Optional[str] = None


def to_generate(body: ImagesRequest) -> dict:
    """The ``GenerateRequest`` fields of an OpenAI body; raises ``RequestError`` (a 400) for what
    only this API has: ``response_format: url`` and a ``size`` that is not ``WxH``."""
    if body.response_format == "url":
        raise RequestError("response_format: only 'b64_json' is supported; this server does not host "
                           "image files")
    out = {_FIELD_OF[k]: v for k, v in body.model_dump(exclude_none=True).items() if k in _FIELD_OF}
    if body.model is not None and body.model != DEFAULT_MODEL:
        out["adapter"] = body.model
    if body.size is not None:
        wh = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", body.size)
        if wh is None:
            raise RequestError(f"size: '{body.size}' is not 'WIDTHxHEIGHT' (e.g. '512x512')")
        out["width"], out["height"] = int(wh.group(1)), int(wh.group(2))
    return out


def rename(message: str, param: str | None) -> tuple[str, str | None]:
    """A message about GenerateRequest field ``param`` -> (the message naming the OpenAI field, that field)."""
    if param is None or param not in PARAM_OF:
        return message, param
    head = re.match(rf"{param}(\[\d+\])?:", message)
    return (f"{PARAM_OF[param]}:{message[head.end():]}" if head else message), PARAM_OF[param]


def failure(out: dict, body: ImagesRequest) -> tuple[int, str, str | None, str | None]:
    """The generator's error answer (``GeneratorDeployment.generate``) -> (status, message, param,
    code) of the OpenAI error: 422 becomes 400; an unknown adapter is an unknown model."""
    status, param = out["status"], out.get("param")
    if param == "adapter":  # only the generator knows which adapters load
        known = out.get("known")
        if known is None:
            return status, f"model: '{body.model}' is not a loadable model", "model", "model_not_found"
        return (status, f"model: '{body.model}' is unknown; known: {', '.join([DEFAULT_MODEL, *known])}", "model",
                "model_not_found")
    if param in ("height", "width") and out.get("sizes") is not None:
        return (400, f"size: '{body.size}' is not a size '{body.model or DEFAULT_MODEL}' generates; sizes: "
                     f"{out['sizes'].wxh()}", "size", None)
    message, param = rename(out["error"], param)
    return (400 if status == 422 else status), message, param, None


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    if status == 401 and code is None:
        code = "invalid_api_key"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def images_response(out: dict, created: int) -> dict:
    """The generator's answer -> OpenAI's ImagesResponse (plus ``model`` and ``seed``)."""
    resp = {"created": created, "data": [{"b64_json": to_base64(b)} for b in out["images"]],
            "output_format": out["format"], "model": out["model"], "seed": out["seed"]}
    if "width" in out:
        resp["size"] = f"{out['width']}x{out['height']}"
    return resp


def model_list(adapters: list[str], created: int) -> list[dict]:
    """OpenAI's model objects (``GET /v1/models`` ``data``): the generator, then the adapters."""
    return [{"id": name, "object": "model", "created": created, "owned_by": OWNER}
            for name in [DEFAULT_MODEL, *adapters]]
