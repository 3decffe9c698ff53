"""Reward functions by name: built-ins registered here, or `path/to/file.py:name` loaded from a file.

`@register_reward("name")` registers a factory `(reward_cfg) -> fn`; `load_reward_function(spec, reward_cfg)`
returns `(name, fn)` for a `reward.function` entry, with a ConfigError naming the key for an unknown name, a missing
file or attribute, or a file that fails to import. The registry dict is the package's only module-level state.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import sys
from typing import Any, Callable, Dict, List, Tuple

from megatron.config import ConfigError

from .sources import one_line

_BUILTINS: Dict[str, Callable[[Any], Callable[..., Any]]] = {}


def register_reward(name: str) -> Callable:
    """Decorator registering a built-in reward factory `(reward_cfg) -> fn` under `name`; a taken name raises."""
    def deco(factory: Callable[[Any], Callable[..., Any]]):
        if name in _BUILTINS and _BUILTINS[name].__qualname__ != factory.__qualname__:
            raise ValueError(f"reward '{name}' is already registered")
        _BUILTINS[name] = factory
        return factory
    return deco


def registered_rewards() -> List[str]:
    """Sorted names of the built-in reward functions."""
    return sorted(_BUILTINS)


def _load_file(path: str, attr: str, spec: str) -> Callable[..., Any]:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ConfigError(f"key 'reward.function': {spec!r}: file {path!r} not found (relative paths start at the "
                          f"working directory {os.getcwd()})")
    module_name = "megatron_reward_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, full)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # before exec: dataclasses and pickling look the module up
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001
            del sys.modules[module_name]
            raise ConfigError(f"key 'reward.function': importing {path!r} failed: {type(exc).__name__}: "
                              f"{one_line(exc)}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        names = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                 and getattr(v, "__module__", None) == module_name]
        close = difflib.get_close_matches(attr, names, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"key 'reward.function': {path!r} has no function {attr!r}{hint}; it defines: "
                          f"{', '.join(sorted(names)) or 'no functions'}")
    if not callable(fn):
        raise ConfigError(f"key 'reward.function': {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def load_reward_function(spec: str, reward_cfg: Any) -> Tuple[str, Callable[..., Any]]:
    """Resolve one `reward.function` entry -> (name, fn).

    spec: a built-in name (`registered_rewards()`) or 'path/to/file.py:function'. reward_cfg: the `reward:` section
    (built-ins read `answer_field`).
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"key 'reward.function': entries must be names or 'path/to/file.py:name', got {spec!r}")
    path, sep, attr = spec.rpartition(":")
    if sep and path.endswith(".py"):
        if not attr:
            raise ConfigError(f"key 'reward.function': {spec!r} names no function; write {path}:function_name")
        return spec, _load_file(path, attr, spec)
    if spec.endswith(".py"):
        raise ConfigError(f"key 'reward.function': {spec!r} names a file but no function; write {spec}:function_name")
    if spec not in _BUILTINS:
        close = difflib.get_close_matches(spec, list(_BUILTINS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"key 'reward.function': unknown reward {spec!r}{hint}; built-ins: "
                          f"{', '.join(registered_rewards())}, or a function in a file: path/to/file.py:name")
    return spec, _BUILTINS[spec](reward_cfg)
