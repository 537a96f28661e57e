"""Maps the method name in the config to its config section and loss class."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hyperscale.config import MethodSection
    from hyperscale.methods.base import Method

_REGISTRY: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type["MethodSection"], method_cls: type["Method"]) -> None:
    if name in _REGISTRY and _REGISTRY[name] != (config_cls, method_cls):
        raise ValueError(f"method '{name}' registered twice")
    _REGISTRY[name] = (config_cls, method_cls)


def _load_builtin() -> None:
    import hyperscale.methods.denoising  # noqa: F401  (registers itself)
    import hyperscale.methods.dmd  # noqa: F401
    import hyperscale.methods.feedback  # noqa: F401
    import hyperscale.methods.sim  # noqa: F401
    import hyperscale.methods.tscd  # noqa: F401  (registers tscd and cd)


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[type, type]:
    _load_builtin()
    if name not in _REGISTRY:
        from hyperscale.config import ConfigError

        raise ConfigError(f"method.name: unknown method '{name}'; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type["MethodSection"]:
    return _lookup(name)[0]


def build_method(config: "MethodSection") -> "Method":
    return _lookup(config.name)[1](config)
