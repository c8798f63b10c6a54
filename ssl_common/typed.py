"""Typed settings: the pydantic base models of the suite config and of every method's hyperparameters.

Everything a suite file or a method section holds is validated by a pydantic v2 model with
`extra="forbid"` and strict types (a string is never silently read as a number, 1 is not a
bool); `validation_error` turns pydantic's errors into one-line `ConfigError`s that name the
dotted key, the value given and what is allowed, e.g. `train.batch_size: expected int, got 'abc'
(str)` or `optimizer.name: got 'rmsprop'; allowed: sgd, lars, adamw`.

`load_yaml` reads YAML with YAML 1.2's float syntax (`1e-3` is a number; PyYAML follows YAML 1.1,
which reads it as a string).
"""

from __future__ import annotations

import math
import re
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ssl_common.errors import ConfigError, did_you_mean

__all__ = ["AtLeastOne", "MethodHparams", "Momentum", "NestedConfigError", "NonNegativeFloat", "NonNegativeInt",
           "OptimizerConfig", "PositiveNumber", "StrictModel", "UnitInterval", "load_yaml", "validate",
           "validate_nested", "validation_error"]


def _constraint(holds, allowed: str) -> AfterValidator:
    """A check pydantic has no single constraint for, with the suite's wording: `must be <allowed>, got <value>`."""

    def check(value):
        if not holds(value):
            raise ValueError(f"must be {allowed}, got {value}")
        return value

    return AfterValidator(check)


# The constrained numbers every settings model shares. Plain bounds are pydantic's own constraints (their
# errors read `must be >= 1, got 0` through `describe_error`, and editors see them in the JSON schema).
AtLeastOne = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveNumber = Annotated[float, _constraint(lambda v: v > 0 and math.isfinite(v), "a positive number")]
Momentum = Annotated[float, _constraint(lambda v: 0 <= v < 1, "in [0, 1)")]
UnitInterval = Annotated[float, _constraint(lambda v: 0 <= v <= 1, "in [0, 1]")]


class StrictModel(BaseModel):
    """Unknown keys are errors; values must have the declared type (ints are accepted for floats)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=False)


class MethodHparams(StrictModel):
    """Base of a method's hyperparameter model: `class Hparams(MethodHparams): temperature: float = 0.2`."""


# ----------------------------------------------------------------------------- the optimizer

class OptimizerConfig(StrictModel):
    """Optimizer and LR schedule of pretraining (the suite's; a method section may override keys)."""

    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: PositiveNumber = 0.03
    momentum: Momentum = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    warmup_epochs: NonNegativeFloat = 0.0  # linear warm-up, then the schedule
    warmup_start_fraction: UnitInterval = 0.0  # warm-up starts at lr * this (Self-Classifier reimpl.: 0.01 / 0.4)
    # cosine: lr -> lr * final_lr_fraction; linear: straight line to lr * final_lr_fraction (UIC sec. 4.2);
    # step: lr * gamma at each epoch of `milestones` (SSL++ Table II); constant
    schedule: Literal["cosine", "step", "linear", "constant"] = "cosine"
    final_lr_fraction: UnitInterval = 0.001  # cosine decay from lr to lr * this (dissertation: 0.6 -> 0.0006)
    milestones: list[int] = Field(default_factory=list)
    gamma: UnitInterval = 0.1
    lr_scale_batch: NonNegativeInt = 0  # if > 0: lr *= batch_size / lr_scale_batch

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, value: list[int]) -> list[int]:
        if any(m < 1 for m in value) or value != sorted(set(value)):
            raise ValueError(f"must be increasing positive epochs, got {value}")
        return value


# ----------------------------------------------------------------------------- YAML 1.2 floats

class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats (`1e-3`, `5E+2`), which YAML 1.1 leaves as strings.

    Hand-written because PyYAML implements YAML 1.1 only; the resolver below is YAML 1.2's float regex."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


# ----------------------------------------------------------------------------- error messages

M = typing.TypeVar("M", bound=BaseModel)

_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
               "list_type": "list", "dict_type": "mapping", "tuple_type": "list", "int_from_float": "int",
               "model_type": "mapping", "model_attributes_type": "mapping", "int_parsing": "int",
               "float_parsing": "float", "bool_parsing": "bool"}
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def _dotted(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out or "config"


def _annotation_at(model: type[BaseModel], loc: tuple) -> Any:
    """The type annotation reached by following `loc` from `model` (None where it cannot be followed)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (list, tuple, dict):
            args = typing.get_args(current)
            current = args[-1] if args else None
        else:
            return None
    return _unwrap(current)


def _unwrap(annotation: Any) -> Any:
    """X | None -> X; Annotated[X, ...] -> X."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def allowed_keys(model: Any) -> list[str]:
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


class NestedConfigError(ValueError):
    """Raised inside a validator by `validate_nested`: the key below the field (`key`) and the problem, so that
    the final message names the whole dotted key (`methods.sslpp.clustering_optimizer.name: ...`)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key, self.problem = key, problem


def validate_nested(model: type[M], data: Any) -> M:
    """`model.model_validate(data)` inside another model's validator (errors keep their dotted key)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise NestedConfigError(_dotted("", tuple(error["loc"])) if error["loc"] else "",
                                describe_error(error, model, "", bare=True)) from None


def describe_error(error: dict, model: type[BaseModel], prefix: str = "", unknown_word: str = "key",
                   bare: bool = False) -> str:
    """One pydantic error -> `<dotted key>: <what is wrong>; <what is allowed>` (`bare`: without the key)."""
    loc = tuple(error["loc"])
    where = _dotted(prefix, loc)
    kind, value = error["type"], error.get("input")
    nested = error.get("ctx", {}).get("error")
    if isinstance(nested, NestedConfigError):
        inner = _dotted(where, ()) + (("" if nested.key.startswith("[") else ".") + nested.key if nested.key else "")
        return nested.problem if bare else f"{inner}: {nested.problem}"
    if bare:
        return describe_error(error, model, "", unknown_word).partition(": ")[2]
    if kind == "extra_forbidden":
        keys = allowed_keys(_annotation_at(model, loc[:-1]))
        allowed = ", ".join(keys) or "(none)"
        return f"{where}: unknown {unknown_word}; allowed: {allowed}{did_you_mean(loc[-1], keys) if loc else ''}"
    if kind == "missing":
        return f"{where}: missing"
    if kind == "literal_error":
        annotation = _annotation_at(model, loc)
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
        allowed = ", ".join(str(c) for c in choices) if choices else error.get("ctx", {}).get("expected", "")
        return f"{where}: got {value!r}; allowed: {allowed}{did_you_mean(value, choices)}"
    if kind in _TYPE_NAMES:
        return f"{where}: expected {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__})"
    if kind in _BOUNDS:
        symbol, key = _BOUNDS[kind]
        bound = error.get("ctx", {}).get(key)
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{where}: must be {symbol} {bound}, got {value!r}"
    if kind in ("too_short", "too_long"):
        return f"{where}: {error['msg'].lower()}, got {value!r}"
    if kind in ("value_error", "assertion_error"):
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        return f"{where}: {message}"
    return f"{where}: {error['msg']} (got {value!r})"


def validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "",
                     unknown_word: str = "key") -> ConfigError:
    """The first error of `exc` as a ConfigError (one problem at a time, like a compiler's first error)."""
    return ConfigError(describe_error(exc.errors(include_url=False)[0], model, prefix, unknown_word))


def validate(model: type[M], data: Any, prefix: str = "", unknown_word: str = "key") -> M:
    """`model.model_validate(data)` with errors as ConfigError naming the dotted key."""
    if isinstance(data, model):
        return data
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r} ({type(data).__name__})")
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise validation_error(exc, model, prefix, unknown_word) from None
