"""One typed, validated config tree: the sections (``schema``) and their loading (``load``).

``from hyperscale.config import Section, MethodSection, ...`` gives the schema; the loading
functions (``load_config``, ``from_dict``, ``apply_overrides``, ...) are imported on first use,
because loading needs the methods table and the methods need the schema.
"""
from hyperscale.config.schema import (Config, ConfigError, DataSection, MethodSection, ModelSection, OptimSection,
                                      RoleOptim, RunSection, ScheduleSection, Section, TrainSection, role_train)

_LOAD = ("apply_overrides", "format_errors", "from_dict", "load_config", "parse_override", "read_mapping",
         "set_path", "to_yaml")

__all__ = ["Config", "ConfigError", "DataSection", "MethodSection", "ModelSection", "OptimSection", "RoleOptim",
           "RunSection", "ScheduleSection", "Section", "TrainSection", "role_train", *_LOAD]


def __getattr__(name: str):
    if name in _LOAD:
        from hyperscale.config import load

        return getattr(load, name)
    raise AttributeError(f"module 'hyperscale.config' has no attribute {name!r}")
