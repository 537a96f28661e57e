"""The methods table: a method's name in the config -> its config section and its loss class.

Adding a method is one module (a ``MethodSection`` subclass and a ``Method`` subclass) and one
line here (docs/extending.md)."""
from __future__ import annotations

from hyperscale.config.schema import ConfigError, MethodSection
from hyperscale.methods.base import Method
from hyperscale.methods.denoising import Denoising, DenoisingConfig
from hyperscale.methods.dmd import Dmd, DmdConfig
from hyperscale.methods.feedback import Feedback, FeedbackConfig
from hyperscale.methods.sim import Sim, SimConfig
from hyperscale.methods.tscd import CdConfig, Tscd, TscdConfig

METHODS: dict[str, tuple[type[MethodSection], type[Method]]] = {
    "denoising": (DenoisingConfig, Denoising),
    "sim": (SimConfig, Sim),
    "dmd": (DmdConfig, Dmd),
    "tscd": (TscdConfig, Tscd),
    "cd": (CdConfig, Tscd),
    "feedback": (FeedbackConfig, Feedback),
}


def method_names() -> list[str]:
    return sorted(METHODS)


def method_config_class(name: str) -> type[MethodSection]:
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method '{name}'; allowed: {', '.join(method_names())}")
    return METHODS[name][0]


def build_method(config: MethodSection) -> Method:
    method_config_class(config.name)  # an unknown name is a ConfigError naming the allowed ones
    return METHODS[config.name][1](config)
