"""The config schema's field types as values are checked against them: `matches_type(value, tp)`, whether a
value is of a field's type, and `describe_type(tp)`, that type in words for an error line
(`config_schema.check_types` and `merge_saved` ask them)."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union or isinstance(tp, types.UnionType)


def matches_type(value: Any, tp: Any) -> bool:
    """Whether `value` is of the schema type `tp` (an int is a float; a list is a tuple)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if _is_union(tp):
        return any(matches_type(value, t) for t in get_args(tp))
    if get_origin(tp) is Literal:
        return any(type(value) is type(a) and value == a for a in get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if get_origin(tp) is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches_type(v, t) for v, t in zip(value, args))
    return isinstance(value, tp)


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "None"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def describe_type(tp: Any) -> str:
    """`tp` in words, for an error line: 'an integer', 'a tuple of integers', 'one of a, b'."""
    if tp in _NAMES:
        return _NAMES[tp]
    if _is_union(tp):
        return " or ".join(describe_type(t) for t in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _PLURALS.get(args[0]) or f"({describe_type(args[0])})s"
            return f"a tuple of {inner}"
        if len(set(args)) == 1 and args[0] in _PLURALS:
            return f"a tuple of {len(args)} {_PLURALS[args[0]]}"
        return f"a tuple ({', '.join(describe_type(t) for t in args)})"
    return getattr(tp, "__name__", str(tp))
