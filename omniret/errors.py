"""The project's error for expected failures: a bad file, config, argument or environment that the user can fix.

`omniret` commands print such an error as one line on stderr and exit with status 2 (OMNIRET_DEBUG=1 keeps the
traceback). Code raises it where it knows what went wrong, so the message names the file or field; anything else
that escapes is a bug and keeps its traceback."""
from __future__ import annotations

__all__ = ["InputError", "RunLockedError", "check_field_types"]


class InputError(ValueError):
    """A file, config or argument the command cannot use; the message names it and says what to do."""


class RunLockedError(InputError):
    """Another process holds the lock of a run directory."""


def check_field_types(obj, where: str) -> None:
    """Raise InputError naming `where.field` for a dataclass field whose value does not fit its annotation (a
    config file's `"steps": "10"` is caught when it is read, not as a TypeError deep inside a run). Annotations
    it cannot check (Any, callables, nested classes it does not know) pass."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints.get(f.name)
        value = getattr(obj, f.name)
        if tp is not None and not _fits(value, tp):
            raise InputError(f"{where}.{f.name} must be {_type_name(tp)}, got {value!r}")


def _fits(value, tp) -> bool:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin is typing.Union:
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list or tp is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is tuple or tp is tuple:
        return isinstance(value, (tuple, list))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp) -> str:
    import typing

    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return "a list"
    return getattr(tp, "__name__", str(tp))
