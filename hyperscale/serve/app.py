"""Ray Serve application: a FastAPI ingress composed with a generator deployment.

    serve run hyperscale.serve.app:build_app generator=assets/fmnist-t2i/sim-generator
    serve deploy jobs/configs/serve.yaml          # or: python jobs/serve.py

Routes: ``POST /v1/generate`` (JSON in; base64 JSON or raw PNG/JPEG out; a class or prompts, as the
model takes: ``hyperscale.models.generation``), ``POST /v1/images/generations`` (OpenAI's image API,
mapped onto the same request: ``hyperscale.serve.openai_api``), ``GET /v1/models`` (what the model
takes, the adapters, and OpenAI's model list),
``GET /healthz`` (process up), ``GET /readyz`` (model loaded and answering), ``GET /`` (a
page to try it), ``/docs`` (OpenAPI). The generator deployment batches requests dynamically
(``serve.batch``; the batch size counts images) and multiplexes named adapters
(``serve.multiplexed``, LRU-bounded per replica). All validation and sampling is the Ray-free
``hyperscale.models.generation``; this module only routes, batches and maps errors to HTTP.
"""

import asyncio
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from hyperscale.storage.local import absolute_local
from hyperscale.storage.s3 import is_s3_url, list_objects, parse_s3_url
from hyperscale.models.generation import GenerateRequest, ImageGenerator, Job, RequestError, to_base64
from hyperscale.serve import openai_api
from hyperscale.serve.openai_api import IMAGES_PATH, ImagesRequest
from hyperscale.serve.page import PAGE
from hyperscale.serve.settings import SERVE_THROUGHPUT_ENV, ServeSettings, parse_settings

logger = logging.getLogger(__name__)

MEDIA = {"png": "image/png", "jpeg": "image/jpeg"}


def adapter_names(adapters_dir: str) -> list[str]:
    """The adapters a server offers: the sub-directories of ``adapters_dir`` (local), or the
    first path component under an ``s3://`` prefix; entries starting with '.' are not adapters."""
    if is_s3_url(adapters_dir):
        bucket, prefix = parse_s3_url(adapters_dir.rstrip("/") + "/")
        under = f"s3://{bucket}/{prefix}"
        names = {o.url[len(under):].split("/", 1)[0] for o in list_objects(under)}
    else:
        root = Path(adapters_dir)
        names = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    return sorted(n for n in names if n and not n.startswith("."))


class UnknownAdapter(LookupError):
    def __init__(self, known: list[str]):
        super().__init__(", ".join(known))
        self.known = known


class HTTPProblem(Exception):
    """An HTTP error answer; ``param``: the request field it is about, ``code``: OpenAI's error
    code, ``known``: the adapters there are (an unknown adapter)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 known: list[str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.known = status, message, param, code, known


def _error(status: int, message: str, path: str = "", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    """``{"error": message}``, or OpenAI's error object on the OpenAI route (``path``)."""
    if path.endswith(IMAGES_PATH):
        return JSONResponse(openai_api.error_body(status, message, param, code), status_code=status)
    return JSONResponse({"error": message}, status_code=status)


class Overlap:
    """Requests inside the replica now, and whether more than one was at any moment of the last
    ``window_s`` (the current window or the one before): the cue for waiting to batch."""

    def __init__(self, window_s: float = 1.0):
        self.window_s, self.now, self.peak, self.prev_peak = window_s, 0, 0, 0
        self.since = time.monotonic()

    def _roll(self) -> None:
        t = time.monotonic()
        if t - self.since >= self.window_s:
            self.prev_peak, self.peak, self.since = self.peak, self.now, t

    def overlapping(self) -> bool:
        self._roll()
        return self.now > 0 or max(self.peak, self.prev_peak) > 1

    def __enter__(self):
        self._roll()
        self.now += 1
        self.peak = max(self.peak, self.now)

    def __exit__(self, *exc):
        self.now -= 1


@serve.deployment
class GeneratorDeployment:
    """Holds the default model and an LRU of adapters; turns request bodies into encoded images."""

    def __init__(self, settings: dict):
        self.s = ServeSettings(**settings)
        if self.s.torch_threads:
            torch.set_num_threads(self.s.torch_threads)
        self.limits = self.s.limits()
        self.default = ImageGenerator.load(self.s.generator)
        self._generate_batched.set_max_batch_size(self.s.max_batch_size)
        self.load = Overlap()
        adapters_dir, lora_base = self.s.adapters_dir, self.s.lora_base

        async def load_adapter(name: str) -> ImageGenerator:
            # serve.multiplexed keeps the most recently used max_adapters_per_replica of these, so
            # the directory is listed on a miss only: names are its entries and nothing else
            known = await asyncio.to_thread(adapter_names, adapters_dir)
            if name not in known:
                raise UnknownAdapter(known)
            return await asyncio.to_thread(ImageGenerator.load, f"{adapters_dir.rstrip('/')}/{name}", name,
                                           lora_base)

        self._adapter = serve.multiplexed(max_num_models_per_replica=self.s.max_adapters_per_replica)(load_adapter)

    def describe(self) -> dict:
        return self.default.describe()

    async def _model(self, adapter: str | None) -> ImageGenerator:
        if adapter is None:
            return self.default
        if not self.s.adapters_dir:
            raise HTTPProblem(404, f"adapter: '{adapter}' is unknown; this server has no adapters directory",
                              "adapter", known=[])
        try:
            return await self._adapter(adapter)
        except UnknownAdapter as e:  # '.' and '..' are no entry either
            raise HTTPProblem(404, f"adapter: '{adapter}' is unknown; known: {', '.join(e.known) or 'none'}",
                              "adapter", known=e.known) from None
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            # the message of a load failure names server paths: the client gets the name only
            logger.warning("adapter %r failed to load: %s", adapter, e)
            raise HTTPProblem(404, f"adapter: '{adapter}' is not a loadable export", "adapter") from None

    async def generate(self, body: dict) -> dict:
        """A validated request body -> {"status": 200, "images": [bytes], "format", "seed", "model", and
        the class ("class", "class_name") or the prompts ("prompts", "height", "width")} or an error:
        {"status", "error", "param" (the field), "sizes" (a size it does not generate: its SizeRule),
        "known" (an unknown adapter: the adapters there are)}."""
        try:
            req = GenerateRequest.model_validate(body)
            model = await self._model(req.adapter)
            job = model.prepare(req, self.limits)
        except RequestError as e:
            return {"status": 422, "error": str(e), "param": e.param, "sizes": e.sizes}
        except HTTPProblem as e:
            return {"status": e.status, "error": e.message, "param": e.param, "known": e.known}
        if self.s.batching:
            # Adaptive wait: a lone client (never more than one request here lately) waits only
            # batch_wait_idle_s; once requests overlap, a batch waits up to batch_wait_timeout_s to
            # fill, and the bigger batches free the CPU the proxy and ingress need to bring the next
            # requests in (docs/benchmarks.md §7.2).
            self._generate_batched.set_batch_wait_timeout_s(
                self.s.batch_wait_timeout_s if self.load.overlapping() else self.s.batch_wait_idle_s)
            with self.load:
                images = await self._generate_batched((model, job))
        else:
            images = await asyncio.to_thread(self._run, [(model, job)])
            images = images[0]
        return {"status": 200, "images": images, "format": req.format, "seed": job.seed, "model": model.name,
                **model.result_fields(job)}

    @staticmethod
    def _run(items: list[tuple[ImageGenerator, Job]]) -> list[list[bytes]]:
        out: list = [None] * len(items)
        by_model: dict[int, list[int]] = {}
        for i, (model, _) in enumerate(items):
            by_model.setdefault(id(model), []).append(i)
        for idx in by_model.values():
            model = items[idx[0]][0]
            images = model.generate([items[i][1] for i in idx])
            for i, x in zip(idx, images):
                out[i] = model.render(items[i][1], x)
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005,
                 batch_size_fn=lambda items: sum(job.count for _, job in items))
    async def _generate_batched(self, items: list[tuple[ImageGenerator, Job]]) -> list[list[bytes]]:
        # the network runs off the event loop, so the next batch forms while this one computes
        return await asyncio.to_thread(self._run, items)


api = FastAPI(title="hyperscale", version="0.1.0",
              description="1-step and few-step image generation with distilled diffusion models "
                          "(SIM, Hyper-SD), class-conditional or text-to-image. POST /v1/generate (or OpenAI's "
                          "POST /v1/images/generations); GET /v1/models says what the model takes (classes "
                          "or prompts) and its sizes.")


def _describe(errors: list[dict], names: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Pydantic errors -> ("field: problem; ...", the first field), fields renamed by ``names``."""
    parts, first = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if loc and names:
            loc[0] = names.get(loc[0], loc[0])
        where, msg = ".".join(loc) or "body", err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            where, msg, loc = "body", f"malformed JSON ({err.get('ctx', {}).get('error', 'cannot parse')})", []
        first = first or (loc[0] if loc else None)
        parts.append(f"{where}: {msg}")
    return "; ".join(parts), first


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _describe(exc.errors())
    path = request.url.path
    return _error(400 if path.endswith(IMAGES_PATH) else 422, message, path, param)


@api.exception_handler(HTTPProblem)
async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
    return _error(exc.status, exc.message, request.url.path, exc.param, exc.code)


BODY_LIMIT_ENV = "HYPERSCALE_SERVE_MAX_BODY_BYTES"  # set on the ingress replicas by build_app


class BoundBody:
    """Pure ASGI middleware (no per-request task, unlike ``@app.middleware``): bodies are bounded
    before they are read — no Content-Length -> 411, over the limit -> 413."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            limit = int(os.environ.get(BODY_LIMIT_ENV) or ServeSettings.model_fields["max_body_bytes"].default)
            length = dict(scope["headers"]).get(b"content-length")
            if length is None:
                return await _error(411, "body: send a Content-Length header", scope["path"])(scope, receive, send)
            if not length.isdigit() or int(length) > limit:
                return await _error(413, f"body: {length.decode(errors='replace')} bytes is over the limit "
                                         f"of {limit}", scope["path"])(scope, receive, send)
        await self.app(scope, receive, send)


api.add_middleware(BoundBody)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, settings: dict):
        self.gen = generator
        self.s = ServeSettings(**settings)
        self.token = self.s.resolved_token()
        self.started = int(time.time())  # OpenAI's model "created"

    def _auth(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise HTTPProblem(401, "authorization: missing; send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            raise HTTPProblem(401, "authorization: wrong token or scheme (expected 'Bearer <token>')")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> Response:
        try:
            model = await asyncio.wait_for(self.gen.describe.remote(), timeout=5.0)
        except Exception as e:  # noqa: BLE001 (any failure means not ready)
            return _error(503, f"generator not ready: {type(e).__name__}: {e}")
        return JSONResponse({"status": "ready", "model": model})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """``default`` (what the model takes, its sizes...), ``adapters``, ``auth``; and OpenAI's list
        (``object: list``, ``data``: the model ids for ``model``, ``default`` first)."""
        self._auth(request)
        adapters = await asyncio.to_thread(adapter_names, self.s.adapters_dir) if self.s.adapters_dir else []
        return {"default": await self.gen.describe.remote(), "adapters": adapters,
                "auth": self.token is not None, "object": "list",
                "data": openai_api.model_list(adapters, self.started)}

    async def _generate(self, req: GenerateRequest) -> tuple[dict, dict]:
        """The generator's answer to a request, and the headers of a success."""
        handle = self.gen.options(multiplexed_model_id=req.adapter) if req.adapter else self.gen
        try:
            out = await asyncio.wait_for(handle.generate.remote(req.model_dump(by_alias=True, exclude_unset=True)),
                                         timeout=self.s.request_timeout_s)
        except asyncio.TimeoutError:  # no replica answered in time (e.g. all are being replaced): no hang
            raise HTTPProblem(503, f"no generator replica answered within {self.s.request_timeout_s:g} s "
                              f"(request_timeout_s): retry the request", code="timeout") from None
        except (RayActorError, ActorUnavailableError) as e:  # the replica died under the request
            logger.warning("generator replica lost during a request: %s", type(e).__name__)
            raise HTTPProblem(503, "generator replica unavailable (Serve is replacing it): retry the request",
                              code="replica_unavailable") from None
        if out["status"] != 200:
            return out, {}
        headers = {"X-Seed": str(out["seed"]), "X-Model": out["model"]}
        if "class_name" in out:  # prompts may not fit a header (latin-1): the JSON body has them
            headers["X-Class"] = out["class_name"]
        return out, headers

    @api.post("/v1/generate", responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})
    async def generate(self, body: GenerateRequest, request: Request) -> Any:
        self._auth(request)
        out, headers = await self._generate(body)
        if out["status"] != 200:
            return _error(out["status"], out["error"])
        if body.response == "image":
            return Response(out["images"][0], media_type=MEDIA[out["format"]], headers=headers)
        fields = {k: v for k, v in out.items() if k not in ("status", "images")}
        return JSONResponse({"images": [to_base64(b) for b in out["images"]], **fields}, headers=headers)

    @api.post(IMAGES_PATH)
    async def images_generations(self, body: ImagesRequest, request: Request) -> JSONResponse:
        """OpenAI's image generation (``hyperscale.serve.openai_api``): the body becomes a
        ``/v1/generate`` request; b64_json images in OpenAI's ImagesResponse."""
        self._auth(request)
        try:
            req = GenerateRequest.model_validate(openai_api.to_generate(body))
        except RequestError as e:
            raise HTTPProblem(400, str(e), e.param) from None
        except ValidationError as e:
            message, param = _describe(e.errors(), openai_api.PARAM_OF)
            raise HTTPProblem(400, message, param) from None
        out, headers = await self._generate(req)
        if out["status"] != 200:
            raise HTTPProblem(*openai_api.failure(out, body))
        return JSONResponse(openai_api.images_response(out, int(time.time())), headers=headers)


def build_app(args: dict | None = None):
    """Serve application builder (``import_path: hyperscale.serve.app:build_app``); ``args`` are
    the settings of ``hyperscale.serve.settings.ServeSettings``."""
    s = parse_settings(args)
    s.generator = absolute_local(s.generator)
    s.adapters_dir = absolute_local(s.adapters_dir)
    s.lora_base = absolute_local(s.lora_base)
    # Per-request access lines in every replica cost CPU at load; errors and warnings still log.
    logging_config = {"enable_access_log": s.access_log, "log_level": "INFO" if s.access_log else "WARNING"}
    env = dict(SERVE_THROUGHPUT_ENV) if s.throughput_env else {}
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus,
                                                  "runtime_env": {"env_vars": env}},
                            "max_ongoing_requests": s.max_ongoing_requests, "logging_config": logging_config}
    if s.num_replicas:
        opts["num_replicas"] = s.num_replicas
    else:
        opts["autoscaling_config"] = s.autoscaling.model_dump()
    generator = GeneratorDeployment.options(**opts).bind(s.model_dump())
    # the body bound is read by the ASGI middleware, before any route code runs: give it by env
    ingress_env = {"env_vars": {**env, BODY_LIMIT_ENV: str(s.max_body_bytes)}}
    # The ingress only validates and forwards: it must admit as many requests as the generator can
    # batch, or the proxy queues (and backs off) in front of it (Serve's default admits 5).
    return Ingress.options(ray_actor_options={"num_cpus": 0.1, "runtime_env": ingress_env},
                           max_ongoing_requests=s.max_ongoing_requests, logging_config=logging_config).bind(
        generator, s.model_dump())
