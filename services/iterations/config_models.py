"""Pydantic request models generated from the step config dataclasses.

A config dataclass is the one description of a step's settings: its fields' types, defaults and
`metadata["help"]` become the request model's (so OpenAPI documents every hyperparameter), and
its `__post_init__` checks run when the request is validated (so a value out of range is a 422
naming the field, like a value of the wrong type). Types are strict: no "1" for 1, no 1.5 or
1e308 for an int, no true for 1, no NaN or Infinity.
"""

from __future__ import annotations

import functools
import operator
import types
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    Self,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from pydantic import BaseModel, ConfigDict, Strict, create_model, model_validator
from pydantic import Field as ModelField

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Config = TypeVar("Config", bound="DataclassInstance")

_SCALARS = (bool, int, float, str)


def strict(annotation: Any) -> Any:
    """The request type of a config field's type: scalars strict, containers from JSON arrays."""
    origin = get_origin(annotation)
    if annotation in _SCALARS:
        return Annotated[annotation, Strict()]
    if annotation is type(None) or origin is Literal:
        return annotation
    if origin in (Union, types.UnionType):
        return functools.reduce(operator.or_, [strict(arg) for arg in get_args(annotation)])
    if origin is tuple:
        args = get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple[strict(args[0]), ...]  # type: ignore[misc]
        return tuple[tuple(strict(arg) for arg in args)]  # type: ignore[misc]
    raise TypeError(f"no strict request type for {annotation!r}; extend strict()")


def build_config(config: type[Config], values: Mapping[str, Any], **filled: Any) -> Config:
    """`config` from the request's values of its fields. A field the request left out, or set to
    None where the dataclass does not default to None, takes `filled`, else the default."""
    chosen: dict[str, Any] = {}
    for f in fields(config):
        value = values.get(f.name)
        if f.name not in values or (value is None and f.default is not None):
            if f.name in filled:
                chosen[f.name] = filled[f.name]
            continue
        chosen[f.name] = value
    return config(**chosen)


class ConfigRequest(BaseModel):
    """Base of the generated models: strict, closed, and checked by the dataclasses they mirror."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, validate_by_name=True, validate_by_alias=True
    )
    config_classes: ClassVar[tuple[type[Any], ...]] = ()

    @model_validator(mode="after")
    def _check_with_configs(self) -> Self:
        # The dataclass's ValueError names the field; pydantic reports it at this model's path.
        values = self.model_dump(exclude_unset=True)
        for config in self.config_classes:
            build_config(config, values)
        return self


@dataclass(frozen=True)
class ConfigSource:
    """A config dataclass whose fields a request model exposes.

    api_names: field -> the name the API uses for it (the field's own name is accepted too).
    filled: field -> what fills it when the request leaves it out (it is then optional).
    """

    config: type[Any]
    api_names: Mapping[str, str] = field(default_factory=dict)
    filled: Mapping[str, str] = field(default_factory=dict)
    exclude: frozenset[str] = frozenset()


def help_of(config: type[Any], name: str) -> str:
    help_text: str = {f.name: f for f in fields(config)}[name].metadata.get("help", "")
    return help_text


def request_model(
    name: str,
    doc: str,
    *sources: ConfigSource,
    extra: Mapping[str, tuple[Any, Any]] | None = None,
) -> type[ConfigRequest]:
    """A request model with the fields of `sources` (and `extra` ones, which no config checks)."""
    definitions: dict[str, Any] = {}
    for source in sources:
        hints = get_type_hints(source.config)
        for f in fields(source.config):
            if f.name in source.exclude:
                continue
            if f.name in definitions:
                raise TypeError(f"{name}: field {f.name} comes from two configs")
            help_text = f.metadata.get("help", "")
            annotation = strict(hints[f.name])
            alias = source.api_names.get(f.name)
            if f.name in source.filled:
                annotation = annotation | None
                info = ModelField(
                    default=None,
                    alias=alias,
                    description=f"{help_text} Unset: {source.filled[f.name]}.",
                )
            elif f.default is not MISSING:
                info = ModelField(default=f.default, alias=alias, description=help_text)
            elif f.default_factory is not MISSING:
                info = ModelField(
                    default_factory=f.default_factory, alias=alias, description=help_text
                )
            else:
                info = ModelField(alias=alias, description=help_text)
            definitions[f.name] = (annotation, info)
    for key in extra or {}:
        if key in definitions:
            raise TypeError(f"{name}: field {key} is both a config field and an extra one")
    definitions.update(extra or {})
    model = create_model(name, __base__=ConfigRequest, __doc__=doc, **definitions)
    model.config_classes = tuple(source.config for source in sources)
    return model
