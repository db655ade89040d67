"""The one exception type the command line shows as a single line instead of a traceback, and the checks that raise it
from anywhere."""

from typing import Any


class ConfigError(ValueError):
    """Bad user input (a config value, a path, a checkpoint); the message names the fix."""


def first_line(error: BaseException) -> str:
    """An exception's first line, for a one-line message quoting it (its type where it has no text)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def require_int(key: str, value: Any, minimum: int = 1) -> None:
    """``key`` must be an integer >= ``minimum`` (a bool is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
