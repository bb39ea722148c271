"""Request bodies checked the way FastAPI and pydantic check them: every problem in one 422.

gunicorn's example declares pydantic models, so its clients get
``422 {"detail": [{"type", "loc", "msg", "input"}, ...]}`` for a missing or
mistyped field. This module gives the Flask views the same answer without
pydantic. Types are checked strictly: a number sent as a string is a 422
(pydantic would coerce it), and a bool is not an int.

Concurrency model: pure functions, called in the request's greenlet; no state.
"""

import json

__all__ = ["Invalid", "REQUIRED", "STR", "OPT_STR", "INT", "BOOL", "DICT", "ListOf", "parse", "value_error"]

REQUIRED = object()
_ECHO_LIMIT = 120  # characters of a bad value echoed back (image data can be megabytes)


class Invalid(Exception):
    """The request body does not fit its model; ``errors`` is FastAPI's ``detail`` list."""

    def __init__(self, errors):
        super().__init__("; ".join("%s: %s" % (".".join(str(p) for p in e["loc"][1:]) or "body", e["msg"])
                                   for e in errors))
        self.errors = errors


def _echo(value):
    if isinstance(value, str) and len(value) > _ECHO_LIMIT:
        return value[:_ECHO_LIMIT] + "..."
    if isinstance(value, (list, dict)) and len(json.dumps(value, default=str)) > _ECHO_LIMIT:
        return "(%s of %d items)" % (type(value).__name__, len(value))
    return value


def _error(loc, kind, msg, value):
    return {"type": kind, "loc": list(loc), "msg": msg, "input": _echo(value)}


def value_error(loc, msg, value=None):
    """One pydantic-style ``value_error`` entry for a field whose type is right but whose value is not."""
    return _error(loc, "value_error", "Value error, " + msg, value)


class _Kind:
    def __init__(self, name, kind, msg, check):
        self.name, self.kind, self.msg, self.check = name, kind, msg, check

    def errors(self, value, loc):
        """The problems with ``value`` at ``loc`` (empty when it fits)."""
        return [] if self.check(value) else [_error(loc, self.kind, self.msg, value)]


STR = _Kind("str", "string_type", "Input should be a valid string", lambda v: isinstance(v, str))
INT = _Kind("int", "int_type", "Input should be a valid integer",
            lambda v: isinstance(v, int) and not isinstance(v, bool))
BOOL = _Kind("bool", "bool_type", "Input should be a valid boolean", lambda v: isinstance(v, bool))
OPT_STR = _Kind("str", "string_type", "Input should be a valid string", lambda v: v is None or isinstance(v, str))
DICT = _Kind("dict", "dict_type", "Input should be a valid dictionary", lambda v: isinstance(v, dict))


class ListOf:
    """A list whose items are all of one kind (pydantic's ``list[str]``, ``list[dict]``)."""

    def __init__(self, item):
        self.item = item

    def errors(self, value, loc):
        """The problems with ``value`` at ``loc`` (empty when it fits)."""
        if not isinstance(value, list):
            return [_error(loc, "list_type", "Input should be a valid list", value)]
        out = []
        for i, item in enumerate(value):
            out += self.item.errors(item, list(loc) + [i])
        return out


def parse(raw, fields):
    """Check a raw request body against ``fields`` ({name: (kind, default or REQUIRED)}); return the values.

    Unknown fields are ignored, as pydantic does by default. An empty body is
    fine when every field has a default (gunicorn's cleanup and sync bodies).
    """
    required = any(default is REQUIRED for _, default in fields.values())
    if not raw.strip():
        if required:
            raise Invalid([_error(["body"], "missing", "Field required", None)])
        return {name: default for name, (_, default) in fields.items()}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise Invalid([dict(_error(["body", getattr(exc, "pos", 0)], "json_invalid", "JSON decode error", {}),
                            ctx={"error": getattr(exc, "msg", str(exc))})]) from None
    if body is None and not required:
        body = {}
    if not isinstance(body, dict):
        raise Invalid([_error(["body"], "model_attributes_type",
                              "Input should be a valid dictionary or object to extract fields from", body)])
    values, errors = {}, []
    for name, (kind, default) in fields.items():
        if name not in body:
            if default is REQUIRED:
                errors.append(_error(["body", name], "missing", "Field required", body))
            else:
                values[name] = default
            continue
        problems = kind.errors(body[name], ["body", name])
        errors += problems
        if not problems:
            values[name] = body[name]
    if errors:
        raise Invalid(errors)
    return values
