"""Serving settings: the ``args`` of the Serve application (``jobs/configs/serve.yaml``).

Validated like the training config: unknown keys and wrong types are errors naming the key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hyperscale.config import ConfigError, apply_overrides, format_errors
from hyperscale.models.generation import Limits


# Ray Serve's request-path settings for throughput (its "throughput optimized" set, without direct
# ingress): gRPC between proxy, ingress and generator instead of object refs, user code and router
# on the replica's own event loop, buffered request-path logs (effect: docs/benchmarks.md §7.2).
# Read when Ray's processes start: jobs/serve.py sets them before its local Ray starts; on a
# cluster put them in the nodes' environment (cluster/README.md) so the proxies get them, the
# replicas get them from build_app's runtime_env either way.
SERVE_THROUGHPUT_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_PROXY_USE_GRPC": "1",
                        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generator: str = Field("assets/fmnist-t2i/sim-generator",
                           description="the default model: export dir, s3:// or hub id (default: the 1-step SIM text-to-image generator)")
    adapters_dir: Optional[str] = Field(None, description="named exports, one sub-directory each (request 'adapter')")
    max_adapters_per_replica: int = Field(4, ge=1, description="LRU bound of multiplexed adapters per replica")
    lora_base: Optional[str] = Field(None, description="the export LoRA-only adapters apply to (e.g. the teacher)")
    # dynamic batching (serve.batch); batching: false sends each request through alone
    batching: bool = True
    max_batch_size: int = Field(32, ge=1, description="images are what is batched; requests join whole")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="longest wait for a batch to fill, under load")
    batch_wait_idle_s: float = Field(0.002, ge=0, description="the wait after a batch of one image (no load)")
    # request bounds
    max_images_per_request: int = Field(16, ge=1)
    max_steps: int = Field(8, ge=1)
    max_prompt_chars: int = Field(256, ge=1)
    max_size: int = Field(512, ge=1)
    max_body_bytes: int = Field(16384, ge=256)
    request_timeout_s: float = Field(120.0, gt=0, description="the longest a request waits for the generator "
                                     "(a replica being replaced, a long queue); then 503, retry")
    # auth: a bearer token for /v1/*; taken from the environment variable named here when set
    auth_token_env: Optional[str] = "HYPERSCALE_SERVE_TOKEN"
    auth_token: Optional[str] = Field(None, description="a literal token; prefer auth_token_env (configs get shared)")
    # replicas
    num_replicas: Optional[int] = Field(None, ge=1, description="fixed count; None: use autoscaling")
    autoscaling: Autoscaling = Autoscaling()
    replica_cpus: float = Field(1.0, gt=0)
    replica_gpus: float = Field(0.0, ge=0)
    torch_threads: Optional[int] = Field(None, ge=1, description="per generator replica; None: torch default")
    max_ongoing_requests: int = Field(128, ge=1, description="admitted per replica (ingress and generator)")
    access_log: bool = Field(False, description="a log line per request in every replica (costs CPU at load)")
    throughput_env: bool = Field(True, description="Ray Serve's throughput settings (SERVE_THROUGHPUT_ENV) "
                                                  "on the replicas; the proxy gets them where Ray starts")

    def limits(self) -> Limits:
        return Limits(self.max_images_per_request, self.max_steps, self.max_prompt_chars, self.max_size)

    def resolved_token(self) -> str | None:
        if self.auth_token:
            return self.auth_token
        return (os.environ.get(self.auth_token_env) or None) if self.auth_token_env else None


def parse_settings(args: dict[str, Any] | None) -> ServeSettings:
    try:
        return ServeSettings(**(args or {}))
    except ValidationError as e:
        raise ConfigError(format_errors(e, ServeSettings, "args.")) from None


def load_serve_config(path: str | os.PathLike, overrides: list[str] | None = None,
                      app_name: str | None = None) -> tuple[dict, dict, ServeSettings]:
    """A ``serve run``/``serve deploy`` YAML -> (http_options, application entry, settings).

    ``overrides`` are dotted ``key=value`` items on the application's args
    (``generator=runs/sim/export/ema``, ``autoscaling.max_replicas=2``)."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the Serve config: {e}") from None
    apps = doc.get("applications") or []
    if not apps:
        raise ConfigError(f"{path}: no 'applications' list")
    if app_name is not None:
        apps = [a for a in apps if a.get("name") == app_name]
        if not apps:
            raise ConfigError(f"{path}: no application named '{app_name}'")
    app = dict(apps[0])
    app["args"] = apply_overrides(app.get("args") or {}, overrides or [])
    return dict(doc.get("http_options") or {}), app, parse_settings(app["args"])
