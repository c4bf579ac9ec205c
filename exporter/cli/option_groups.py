"""How the command line declares an option group once: a group's typer flags, and the typed options object
they build.

`@with_options(INPUTS, OUTPUT, …)` adds a group's flags to a typer command and hands the command the
group's typed, validated options object (exporter.inputs.options) instead of the loose values, the way
mergekit's `add_merge_options` does for click. The groups themselves are in exporter/cli/options.py.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from exporter.core import units

Values = dict[str, Any]


@dataclass(frozen=True)
class Flag:
    name: str  # the command function's keyword
    annotation: Any  # Annotated[type, typer.Option(...)]
    default: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class OptionGroup:
    """Flags that together make one options object, handed to the command as `target`."""

    target: str
    flags: tuple[Flag, ...]
    build: Callable[[Values], Any]

    def without(self, *names: str) -> OptionGroup:
        """The group without some flags (their options take their defaults)."""
        return OptionGroup(self.target, tuple(f for f in self.flags if f.name not in names), self.build)


def with_options(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add each group's flags to a typer command; the command receives one options object per group."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        targets = {group.target for group in groups}
        own = [
            p.replace(annotation=_resolved(p.annotation, command), kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command).parameters.values()
            if p.name not in targets
        ]
        added = [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.annotation
            )
            for group in groups
            for f in group.flags
        ]
        flag_names = [f.name for group in groups for f in group.flags]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in flag_names}
            for group in groups:
                kwargs[group.target] = group.build(values)
            return command(**kwargs)

        parameters = sorted(own + added, key=lambda p: p.default is not inspect.Parameter.empty)
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__  # typer must read the signature above, not the command's
        return wrapper

    return decorate


def _resolved(annotation: Any, command: Callable[..., Any]) -> Any:
    """A string annotation (postponed evaluation) as the object it names in the command's module."""
    return eval(annotation, command.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307


def parse_size(text: str) -> int:
    """`2GB`, `500MB`, `1000000` as bytes (exporter.core.units.parse_size, as a command-line error)."""
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def option(kind: Any, *names: str, **settings: Any) -> Any:
    """A flag's annotation: a value of `kind`, given on the command line as one of `names`."""
    return Annotated[kind, typer.Option(*names, **settings)]
