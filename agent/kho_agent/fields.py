"""Typed records at the JSON edge: one error naming the record and the field.

The agent's records (journal, verify result, handover report) are dataclasses deriving
from `JsonRecord`: `to_json()` writes their fields, `from_json()` checks each field
against its type hint and raises one `RecordError` (an InputError: exit 2) saying where
the record came from, which field, what was expected and what was found
("verify.json: results[0].size: expected an integer, got string"). A missing field takes
its default (a record written by an older agent, or a short one); a present one with the
wrong type never passes. `Fields` does the same for code that reads a few fields of
another module's record by hand. The controller passes its own InputError class
(`JsonRecord.ERROR`, `Fields(error=...)`). Stdlib only, Python 3.9.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, ClassVar, Optional, TypeVar, Union

from .errors import InputError

__all__ = ["RecordError", "Fields", "JsonRecord", "check_json", "json_key", "is_int",
           "is_number", "kind"]

T = TypeVar("T")


class RecordError(InputError):
    """A JSON record with a field of the wrong type; the message names record and field."""


def kind(v: Any) -> str:
    """The JSON name of `v`'s type, for messages ("string", "null", "object", ...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    return {str: "string", int: "integer", float: "number", list: "list",
            dict: "object"}.get(type(v), type(v).__name__)


def is_int(v: Any) -> bool:
    """An integer, not a bool (JSON true is not 1 here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """An integer or a float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Fields:
    """The fields of one JSON object at `where` (e.g. "report.json: workloads[0]")."""

    def __init__(self, raw: Any, where: str, error: Callable[[str], Exception] = RecordError
                 ) -> None:
        if not isinstance(raw, dict):
            raise error(f"{where}: expected an object, got {kind(raw)}")
        self.raw: dict[str, Any] = raw
        self.where = where
        self.error = error

    def at(self, name: str) -> str:
        """`where` and the field, as messages name it: "report.json: kernel.to.release"
        (the source, a colon, then the field's path)."""
        if not self.where:
            return name
        return f"{self.where}{'.' if ': ' in self.where else ': '}{name}"

    def _get(self, name: str, ok: Callable[[Any], bool], want: str, default: Any,
             nullable: bool) -> Any:
        if name not in self.raw:
            return default
        v = self.raw[name]
        if v is None and nullable:
            return None
        if not ok(v):
            raise self.error(f"{self.at(name)}: expected {want}{' or null' if nullable else ''}, "
                             f"got {kind(v)}")
        return v

    def opt_text(self, name: str) -> Optional[str]:
        v = self._get(name, lambda v: isinstance(v, str), "a string", None, True)
        return None if v is None else str(v)

    def opt_integer(self, name: str) -> Optional[int]:
        v = self._get(name, is_int, "an integer", None, True)
        return None if v is None else int(v)

    def opt_flag(self, name: str) -> Optional[bool]:
        v = self._get(name, lambda v: isinstance(v, bool), "true or false", None, True)
        return None if v is None else bool(v)

    def opt_number(self, name: str) -> Optional[float]:
        """A number or null, kept as JSON had it (an int stays an int)."""
        v = self._get(name, is_number, "a number", None, True)
        return None if v is None else v

    def opt_dict(self, name: str) -> Optional[dict[str, Any]]:
        """An object or null, not looked into (another module's record)."""
        v = self._get(name, lambda v: isinstance(v, dict), "an object", None, True)
        return None if v is None else dict(v)

    def dict_of(self, name: str, ok: Callable[[Any], bool], want: str) -> dict[str, Any]:
        """An object whose every value passes `ok` (missing: empty)."""
        v = self._get(name, lambda v: isinstance(v, dict), "an object", {}, False)
        for k, x in v.items():
            if not ok(x):
                raise self.error(f"{self.at(name)}.{k}: expected {want}, got {kind(x)}")
        return dict(v)

    def list_of(self, name: str, ok: Callable[[Any], bool], want: str) -> list[Any]:
        """A list whose every item passes `ok` (missing: empty)."""
        v = self._get(name, lambda v: isinstance(v, list), "a list", [], False)
        for i, x in enumerate(v):
            if not ok(x):
                raise self.error(f"{self.at(name)}[{i}]: expected {want}, got {kind(x)}")
        return list(v)

    def records(self, name: str, load: Callable[[Any, str], T]) -> list[T]:
        """A list of records, each read by `load(raw, where)` (missing or null: empty)."""
        v = self._get(name, lambda v: isinstance(v, list), "a list", [], True)
        return [load(x, f"{self.at(name)}[{i}]") for i, x in enumerate(v or [])]


# --- records whose JSON form follows from their fields ------------------------------------

R = TypeVar("R", bound="JsonRecord")


def json_key(f: dataclasses.Field[Any]) -> str:
    """A field's JSON name: metadata "json" if given (e.g. "from" for `from_`), else its name."""
    return str(f.metadata.get("json", f.name))


def _want(tp: Any) -> str:
    """How a message names what `tp` accepts."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_want(a) for a in inner) + " or null"
    if origin is list:
        return "a list"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, JsonRecord)):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp))


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    str: lambda v: isinstance(v, str), int: is_int, float: is_number,
    bool: lambda v: isinstance(v, bool), Any: lambda v: True}


def check_json(v: Any, tp: Any, at: str, error: Callable[[str], Exception]) -> Any:
    """`v` (decoded JSON) checked against the type hint `tp`, records read into their class;
    `error` naming `at` (and the item or key below it) if something has another type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            if v is None:
                raise error(f"{at}: expected {_want(tp)}, got null")
            try:
                return check_json(v, inner[0], at, error)
            except Exception as e:
                if str(e).startswith(f"{at}: expected "):   # this level: say null is fine too
                    raise error(f"{at}: expected {_want(tp)}, got {kind(v)}") from None
                raise
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        return tp.from_json(v, at)
    if origin is list:
        if not isinstance(v, list):
            raise error(f"{at}: expected a list, got {kind(v)}")
        return [check_json(x, args[0], f"{at}[{i}]", error) for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise error(f"{at}: expected an object, got {kind(v)}")
        return {k: check_json(x, args[1], f"{at}.{k}", error) for k, x in v.items()}
    ok = _SCALARS.get(tp)
    if ok is None:
        raise TypeError(f"check_json: unsupported type {tp!r}")
    if not ok(v):
        raise error(f"{at}: expected {_want(tp)}, got {kind(v)}")
    return v


def _zero(tp: Any) -> Any:
    """What a missing field without a default becomes (an older or a short record)."""
    return {str: "", int: 0, float: 0.0, bool: False}.get(tp)


def _dump(v: Any) -> Any:
    if isinstance(v, JsonRecord):
        return v.to_json()
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


class JsonRecord:
    """A dataclass whose JSON form follows from its fields: `to_json()` writes each field
    under its JSON name (`json_key`), records nested as objects; `from_json()` checks every
    field against its type hint and raises one `ERROR` naming the source and the field.
    A missing field takes its default. `OMIT_NONE` fields are left out of the JSON when
    None (as the format always had them); `check()` adds checks beyond the types."""

    ERROR: ClassVar[Callable[[str], Exception]] = RecordError
    WHERE: ClassVar[str] = "record"
    OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None and f.name in self.OMIT_NONE:
                continue
            out[json_key(f)] = _dump(v)
        return out

    @classmethod
    def from_json(cls: type[R], raw: Any, where: Optional[str] = None) -> R:
        r = Fields(raw, cls.WHERE if where is None else where, cls.ERROR)
        hints = typing.get_type_hints(cls)
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            key = json_key(f)
            if key not in r.raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    kw[f.name] = _zero(hints[f.name])
                continue
            kw[f.name] = check_json(r.raw[key], hints[f.name], r.at(key), r.error)
        rec = cls(**kw)
        rec.check(r)
        return rec

    def check(self, r: Fields) -> None:
        """Checks beyond the fields' types (e.g. a value from a fixed set); `r.error`."""
