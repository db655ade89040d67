"""A config value of the wrong type for the parameter it is passed to (``optim.lr=abc``) is a ConfigError naming the
key, judged by the parameter's own annotation (or its default's type), before the constructor fails somewhere inside
with a traceback. Works for any ``_target_``: this project's classes, torch's optimizers, Lightning's Trainer."""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any

from hydra.utils import get_object

from vit.errors import ConfigError

UNION_TYPES = (typing.Union, types.UnionType)
SEQUENCES = (list, tuple, typing.Sequence, typing.Iterable, typing.Collection)


def check_values(options: dict[str, Any], key: str) -> None:
    """``options`` (a resolved config node with ``_target_``) against the target's parameters; ``key`` names the node."""
    target = options.get("_target_")
    if not isinstance(target, str):
        return
    expected = parameter_types(get_object(target))
    for name, value in options.items():
        if name in expected and not accepts(expected[name], value):
            raise ConfigError(f"{key}.{name} must be {describe(expected[name])}, got {value!r}")


def parameter_types(target: Callable) -> dict[str, Any]:
    """Parameter name -> annotation (or the type of an int/float/bool default); through ``**kwargs`` into base classes."""
    found: dict[str, Any] = {}
    functions = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] if isinstance(target, type) else [target]
    for function in functions:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # a builtin without a signature
            break
        try:
            hints = typing.get_type_hints(function)
        except (NameError, TypeError):  # an annotation that cannot be evaluated here: judge by the defaults alone
            hints = {}
        for name, parameter in signature.parameters.items():
            if name in found or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if name in hints:
                found[name] = hints[name]
            elif type(parameter.default) in (int, float, bool):
                found[name] = float if type(parameter.default) is int else type(parameter.default)
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return found


def accepts(expected: Any, value: Any) -> bool:
    """Whether ``value`` (from YAML: None, bool, int, float, str, list, dict) fits the annotation; unknown kinds pass."""
    origin = typing.get_origin(expected)
    if origin in UNION_TYPES:
        return any(accepts(member, value) for member in typing.get_args(expected))
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    container = origin or expected
    if container in SEQUENCES:
        return isinstance(value, (list, tuple))
    if container in (dict, typing.Mapping):
        return isinstance(value, dict)
    if isinstance(expected, type) and origin is None:
        if isinstance(value, str) and issubclass(expected, (os.PathLike, Enum)):
            return True  # a path or an enum member given by name
        return isinstance(value, expected)
    return True  # Any, a TypeVar, a Callable, a generic class: not judged here


def describe(expected: Any) -> str:
    """The annotation in a config writer's words: ``a number``, ``an integer or null``, ``one of step, epoch``."""
    members = typing.get_args(expected) if typing.get_origin(expected) in UNION_TYPES else (expected,)
    words, literals = [], []
    for member in members:
        if typing.get_origin(member) is typing.Literal:
            literals += typing.get_args(member)
        elif member in (bool, int, float, str, type(None)):
            words.append({bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}[member])
    if "a number" in words and "an integer" in words:
        words.remove("an integer")
    if literals:
        words.insert(0, "one of " + ", ".join(str(v) for v in literals))
    if not words:
        words = [getattr(expected, "__name__", str(expected))]
    return " or ".join(words)
