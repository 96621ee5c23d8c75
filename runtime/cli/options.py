"""Command-line options generated from a frozen dataclass (RunConfig, PreprocessSpec), so that a
setting is declared once, with its type, default and help, and every command that offers it shows
the same name, the same choices and the same default.

    @app.command("crops")
    @with_options(dataclass_options(PreprocessSpec, optional=True))
    def crops_command(volume: Path = typer.Argument(...), *, options: dict) -> None: ...

The command receives the generated options in one dict, `options`, holding only those whose value
is not None (an optional option left out means "the dataclass default", or "the --spec file").
Field metadata: "help" (one line) and "cli" (False keeps a field off the command line). A field
whose type is itself a dataclass (RunConfig.preprocess) is expanded into that dataclass's fields.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import typer

from ..errors import InputError


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One generated option: `--name-with-dashes` of `type` (a Literal for choices)."""

    name: str
    type: Any
    default: Any  # dataclasses.MISSING: required
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def replace(self, **changes: Any) -> "OptionSpec":
        return dataclasses.replace(self, **changes)

    def optional(self) -> "OptionSpec":
        """Default None ("not given"), with the real default stated in the help."""
        if self.default is None or self.required:
            return self
        shown = self.default if not isinstance(self.default, bool) else ("on" if self.default else "off")
        return self.replace(default=None, help=f"{self.help} (default {shown})")


def _strip_none(tp: Any) -> Any:
    """X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def dataclass_options(cls: type, *, optional: bool = False, exclude: tuple[str, ...] = ()) -> list[OptionSpec]:
    """The options of a dataclass's fields, in declaration order (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    out: list[OptionSpec] = []
    for f in dataclasses.fields(cls):
        tp = _strip_none(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out += dataclass_options(tp, optional=True, exclude=exclude)
            continue
        if f.name in exclude or not f.metadata.get("cli", True) or "help" not in f.metadata:
            continue
        option = OptionSpec(f.name, tp, f.default, f.metadata["help"])
        out.append(option.optional() if optional else option)
    return out


def _typer_parameter(option: OptionSpec) -> inspect.Parameter:
    tp = option.type
    decl = option.flag
    if tp is bool:
        decl = f"{option.flag}/--no-{option.flag[2:]}" if option.default is not False else option.flag
    default = ... if option.required else option.default
    annotation = tp if option.default is not None else typing.Optional[tp]
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, decl, help=option.help))


def with_options(options: list[OptionSpec]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add `options` to a typer command; the command gets them as `options=dict`."""
    names = [o.name for o in options]

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "options"]
        clash = sorted(set(names) & {p.name for p in own})
        assert not clash, f"{command.__name__} declares generated option(s) {clash} itself"
        params = own + [_typer_parameter(o) for o in options]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, options={k: v for k, v in given.items() if v is not None})

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


def parse_value(option: OptionSpec, text: str, *, what: str) -> Any:
    """A KEY=VALUE string converted to the option's type (InputError naming `what` otherwise)."""
    tp, raw = option.type, text.strip()
    if raw.lower() in {"none", ""} and option.default is None:
        return None
    if tp is bool:
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise InputError(f"{what}: {text!r} is not true/false")
    if typing.get_origin(tp) is Literal:
        return raw  # the dataclass refuses a value that is not one of its choices, naming them
    if tp is Path:
        return Path(raw)
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise InputError(f"{what}: {text!r} is not {'an integer' if tp is int else 'a number'}") from None
    return raw
