"""User-facing errors: one line that names the config key and what is allowed."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(ValueError):
    """A bad config value; the message names the key and the allowed values."""


def require(ok: bool, key: str, allowed: str, got: Any) -> None:
    """Raise ``ConfigError("<key> must be <allowed> (got <got>)")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {allowed} (got {got!r})")


def require_choice(value: Any, key: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    require(value in choices, key, "one of " + ", ".join(choices), value)


def exit_on_config_error(main: F) -> F:
    """Entry-point decorator: a ConfigError prints one line to stderr and exits 2."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
