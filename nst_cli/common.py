"""What every ``nst`` command shares: exit codes, :class:`UsageError`, the style flags and :func:`build_params`.

Exit codes: 0 done; 1 some work failed (or an unexpected error); 2 unusable
input or invocation (one clear line on stderr, no traceback, no output file).

Commands import this module, never ``nst_cli.main`` (which imports the commands).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input or invocation: exit code 2."""


def format_validation_error(exc: ValidationError, flag_style: bool = True) -> str:
    """pydantic's errors as one line: ``--style-weight: Input should be ... (got 'x')``."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "parameters"
        name = "--" + field.replace("_", "-") if flag_style and field != "parameters" else field
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{name}: {message}")
    return "invalid parameters: " + "; ".join(parts)


def field_choices(annotation: Any) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal[...]`` field (``pooling``: ``('avg', 'max')``), else None."""
    if get_origin(annotation) is Literal:
        return tuple(str(v) for v in get_args(annotation))
    return None


def add_style_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per StyleParams field; unset flags stay None (the model's default applies).

    Boolean fields are switches (``--normalize-network`` / ``--no-normalize-network``); fields
    with a fixed set of values list them in ``--help`` (``--pooling {avg,max}``).
    """
    from nst_core.params import StyleParams

    group = parser.add_argument_group("style parameters")
    for name, info in StyleParams.model_fields.items():
        if name in skip:
            continue
        default = info.default
        shown = "|".join(map(str, default)) if isinstance(default, tuple) else default
        flag, text = "--" + name.replace("_", "-"), f"{info.description} (default: {shown})"
        if info.annotation is bool:
            group.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=text)
        elif choices := field_choices(info.annotation):
            # Shown as argparse shows choices, but checked by StyleParams: one "invalid parameters" line, exit 2.
            group.add_argument(flag, dest=name, default=None, metavar="{" + ",".join(choices) + "}", help=text)
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.split("_")[-1].upper(), help=text)


def style_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from nst_core.params import StyleParams

    return {name: getattr(args, name) for name in StyleParams.model_fields if getattr(args, name, None) is not None}


def build_params(values: dict[str, Any]):  # -> StyleParams
    from nst_core.params import StyleParams

    try:
        return StyleParams.model_validate(values)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from None
