"""What the commands (`run`, `evaluate`, `config`, `list`) share, in one module that imports neither of them.

`benchmarks.cli` and `benchmarks.evaluate_cli` both import this module and never each other's
internals, so the command modules form no import cycle.
"""

from __future__ import annotations

import logging
import os
import warnings

from benchmarks.errors import ConfigError
from ssl_common.typed import load_yaml


def parse_set(items: list[str] | None) -> dict:
    """--set a.b=c pairs -> nested dict (values parsed as YAML 1.2: numbers incl. 1e-3, lists, booleans)."""
    overrides: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.batch_size=128")
        key, raw = item.split("=", 1)
        node = overrides
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key part in {key!r}; use dotted keys, e.g. optimizer.lr=0.1")
        indexed = next((i for i, part in enumerate(parts) if "[" in part or "]" in part), None)
        if indexed is not None:
            whole = ".".join(parts[:indexed] + [parts[indexed].split("[")[0]])
            example = "[{size: 16, count: 2}]" if whole.endswith("views") else "[...]"
            raise ConfigError(f"--set {item!r}: list items cannot be addressed by index; give the whole list, e.g. "
                              f"--set '{whole}={example}' (`python -m benchmarks config --suite SUITE` prints the "
                              "current list)")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set to a value earlier, it cannot also hold keys")
        try:
            node[parts[-1]] = load_yaml(raw)
        except Exception as exc:  # yaml.YAMLError
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote strings and write "
                              "lists as [a, b]") from None
    return overrides


def deep_update(base: dict, extra: dict) -> dict:
    """Merge `extra` into `base` in place (mappings key by key) and return it."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def default_data_root(given: str | None) -> str:
    return given or os.environ.get("SSL_BENCH_DATA") or "data"


def import_modules(imports: list[str]) -> None:
    """The user's method modules (--import, $SSL_BENCH_PLUGINS), imported before the suite is validated."""
    from methods import import_plugins_from_env, import_user_module

    import_plugins_from_env()
    for spec in imports or []:
        import_user_module(spec)


def quiet_libraries(verbose: bool) -> None:
    if verbose:
        return
    import pytorch_lightning  # noqa: F401  (sets its loggers' levels on import; override after)

    os.environ.setdefault("LITLOGGER_DISABLE_TIP", "1")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="pytorch_lightning")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning_fabric")
