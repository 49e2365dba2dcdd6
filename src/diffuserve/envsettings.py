"""The one settings mechanism: pydantic-settings models whose fields name their env vars and make their CLI flags."""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar

from pydantic import AliasChoices, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from typing_extensions import Self

# The environment a model reads; None means os.environ. Set only for the length of `EnvSettings.from_env`.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("diffuserve_environ", default=None)


def setting(
    default: Any = None,
    *env: str,
    help: str,
    flag: str | None = None,
    flags: tuple[str, ...] = (),
    shown_default: str | None = None,
    separator: str = ",",
    secret: bool = False,
    **constraints: Any,
) -> Any:
    """One setting: its default, every env var that sets it (first found wins; none given: the model's
    env_prefix + the field name), its help text, its flag (default `--field-name`) and extra spellings, and
    pydantic constraints such as ge=1. A `secret` setting's value is never shown in an error."""
    extra: dict[str, Any] = {"env": list(env), "flags": list(flags)}
    if flag is not None:
        extra["flag"] = flag
    if shown_default is not None:
        extra["shown_default"] = shown_default
    if separator != ",":
        extra["separator"] = separator  # how a list's items are joined in its env var
    if secret:
        extra["secret"] = True  # its value is never echoed in an error
    factory = default if callable(default) else None
    return Field(
        **({"default_factory": factory} if factory else {"default": default}),
        validation_alias=AliasChoices(*env) if env else None,
        description=help,
        json_schema_extra=extra,
        **constraints,
    )


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' env source over `from_env`'s mapping when one is given (tests, Modal's container env)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        if environ is None:
            return super()._load_env_vars()
        # Non-empty values only, as env_ignore_empty does for os.environ; case-insensitive like the default.
        return {k.lower(): v for k, v in environ.items() if v != ""}


class EnvSettings(BaseSettings):
    """Base of every settings model: env vars by alias, flags by field name, errors that name both.

    Values come from (highest first) init arguments (CLI flags), then env vars, then defaults. Booleans take
    true/false, 1/0, yes/no, on/off; anything else is an error naming the variable, never a silent False.
    """

    model_config = SettingsConfigDict(
        env_ignore_empty=True, populate_by_name=True, extra="forbid", use_enum_values=False
    )
    # Subclasses raise their own ValueError subclass (PlanError, OptionError …).
    error_class: ClassVar[type[ValueError]] = ValueError

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise self.error_class(describe_errors(type(self), exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets files: one place (the environment) besides flags, as documented.
        return (init_settings, _EnvSource(settings_cls))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, then env vars (of `environ`, else the process's), then the overrides that are not None."""
        with use_environ(environ):
            return cls(**{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def env_names(cls) -> dict[str, tuple[str, ...]]:
        """Field name → the env vars that set it, in order of precedence."""
        return {name: cls.env_of(name) for name in cls.model_fields}

    @classmethod
    def env_of(cls, name: str) -> tuple[str, ...]:
        env = _extra(cls.model_fields[name]).get("env")
        if env:
            return tuple(env)
        # No alias: pydantic-settings reads env_prefix + the field name (case-insensitively).
        return ((cls.model_config.get("env_prefix") or "") + name.upper(),)

    @classmethod
    def flag_names(cls, name: str) -> list[str]:
        extra = _extra(cls.model_fields[name])
        return [extra.get("flag") or "--" + name.replace("_", "-"), *extra.get("flags", [])]

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser | Any, groups: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """One flag per field, each defaulting to None so the env var shows through; help names env and default.
        `groups`: section title → field names, the sections `--help` shows them in (the rest after them)."""
        section: dict[str, Any] = {}
        for title, names in (groups or {}).items():
            group = parser.add_argument_group(title)
            section.update(dict.fromkeys(names, group))
        for name, info in cls.model_fields.items():
            target = section.get(name, parser)
            kind = _plain_type(info.annotation)
            env = ", ".join(cls.env_of(name))
            help_text = f"{info.description or ''} [env {env}; default {_shown_default(info)}]"
            common: dict[str, Any] = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
            flags = cls.flag_names(name)
            if kind is bool:
                target.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
            elif typing.get_origin(kind) is list:
                target.add_argument(*flags, action="append", metavar="VALUE", **common)
            elif isinstance(kind, type) and issubclass(kind, enum.Enum):
                metavar = "{" + ",".join(str(member.value) for member in kind) + "}"
                target.add_argument(*flags, metavar=metavar, **common)
            else:
                target.add_argument(*flags, **common)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None, **extra: Any
    ) -> Self:
        """Flags given on the command line win over env vars; flags left out leave the env (or default)."""
        flags = {name: getattr(args, name, None) for name in cls.model_fields}
        return cls.from_env(environ, **{**flags, **extra})

    def to_env(self) -> dict[str, str]:
        """The env vars (each field's first name) that make `from_env` rebuild this object; unset ones are absent."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None or value == "":
                continue
            separator = _extra(type(self).model_fields[name]).get("separator", ",")
            out[type(self).env_of(name)[0]] = _env_text(value, separator)
        return out


@contextmanager
def use_environ(environ: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


def describe_errors(cls: type[EnvSettings], exc: ValidationError) -> str:
    """`MODEL_BATCH (--model-batch): Input should be greater than or equal to 1, got 0`, one per problem."""
    aliases: dict[str, str] = {}
    for name in cls.model_fields:
        for key in (name, *cls.env_of(name), *(e.lower() for e in cls.env_of(name))):
            aliases[key] = name
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        field = aliases.get(loc[0]) if loc else None
        message = error["msg"].removeprefix("Value error, ")
        if field is None:
            parts.append(message)
            continue
        flag = cls.flag_names(field)[0]
        if message.startswith(flag):  # a validator's own message already names the flag
            parts.append(message)
            continue
        env = cls.env_of(field)
        label = f"{'/'.join(env)} ({flag})"
        got = error.get("input")
        # A secret's value is never echoed into a terminal or a log, even a malformed one.
        secret = _extra(cls.model_fields[field]).get("secret", False)
        shown = "" if got is None or isinstance(got, dict) or secret else f", got {got!r}"
        parts.append(f"{label}: {message}{shown}")
    return "; ".join(parts)


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _plain_type(annotation: Any) -> Any:
    """`int | None` → int; `Annotated[list[str], …]` → list[str]."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _plain_type(args[0])
    return annotation


def _shown_default(info: FieldInfo) -> str:
    shown = _extra(info).get("shown_default")
    if shown is not None:
        return str(shown)
    value = info.get_default(call_default_factory=True)
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return _env_text(value)


def _env_text(value: Any, separator: str = ",") -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return separator.join(str(v) for v in value)
    return str(value)
