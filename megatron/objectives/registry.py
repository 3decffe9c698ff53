"""Name -> objective class registry.

`@register_objective("dpo")` registers a class; `get_objective_class("dpo")` finds it (a ConfigError with a
did-you-mean and the registered names otherwise); `build_objective(cfg, ps)` instantiates the configured
one. The registry dict is the package's only module-level mutable state.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict

from megatron.config import ConfigError

_REGISTRY: Dict[str, type] = {}


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator registering an `Objective` subclass under `name` (also sets `cls.name`).

    Registering a different class under a taken name raises ValueError.
    """
    def deco(cls: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and \
                (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"objective '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def registered_objectives() -> list:
    """Sorted list of the registered objective names."""
    return sorted(_REGISTRY)


def get_objective_class(name: str) -> type:
    """The class registered as `name`; ConfigError naming `objective.name` with a did-you-mean otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        names = registered_objectives()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"key 'objective.name': unknown objective {name!r}{hint}; "
                          f"registered objectives: {', '.join(names)}") from None


def build_objective(cfg: Any, ps: Any = None):
    """Instantiate the configured objective.

    Args:
      cfg: a full `Config` (its `objective` section is used) or an `ObjectiveConfig`.
      ps: a ParallelState-like object (`dp_group`, `dp_size`), or None for a single process.
    """
    obj_cfg = getattr(cfg, "objective", cfg)
    return get_objective_class(obj_cfg.name)(obj_cfg, ps)
