"""The method registry.

    @register_method("my_method")
    class MyMethod(SSLMethod): ...

`get_method(name)` returns the class, `available_methods()` the registered names.
Importing `methods` registers every built-in method. A user's own module registers
its methods the same way; make the CLI import it with `--import my_package.my_module`
(or a path to a .py file), or list it in the env var SSL_BENCH_PLUGINS
(comma-separated), then use `--methods my_method`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ssl_common.errors import ConfigError, UnknownMethodError, did_you_mean

_REGISTRY: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: make the method available under `name`."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"method names are letters, digits and '_', got {name!r}")

    def decorator(cls):
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_method(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method '{name}'; available: {', '.join(available_methods())}"
            f"{did_you_mean(name, available_methods())}. "
            "A method in your own module must be imported first (--import MODULE_OR_FILE)."
        ) from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def import_user_module(spec: str) -> None:
    """Import a user's module (dotted name or path to a .py file) so its methods register."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise ConfigError(f"--import: no such file {path.resolve()}")
        module_name = f"ssl_bench_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--import: cannot import module '{spec}' ({exc}); is it on PYTHONPATH?") from exc


def import_plugins_from_env() -> None:
    for spec in filter(None, (s.strip() for s in os.environ.get("SSL_BENCH_PLUGINS", "").split(","))):
        import_user_module(spec)


# Built-in methods register themselves on import.
from methods import byol, references, simclr, swav  # noqa: E402,F401

for _optional in ("self_classifier", "carl", "carp", "uic", "iic", "sslpp", "rotation"):
    if importlib.util.find_spec(f"methods.{_optional}") is not None:
        importlib.import_module(f"methods.{_optional}")
