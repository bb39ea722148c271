"""How task arguments and results become bytes in a store, and back.

Concurrency model: pure functions; safe from any thread.
"""

import json
import pickle
from typing import Any, Callable, Optional

__all__ = ["dumps", "dumps_call", "loads", "SERIALIZERS"]

SERIALIZERS = ("json", "pickle")

# JSONEncoder.encode() builds a new C encoder on every call (a third of a spawn's JSON
# cost); make the C encoder once and call it directly, as json does inside iterencode().
_encoder = json.JSONEncoder(separators=(",", ":"))
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_json_encode: Callable[[Any], str]
if _c_make_encoder is not None:
    _c_encode = _c_make_encoder(None, _encoder.default, json.encoder.encode_basestring_ascii, None,
                                ":", ",", False, False, True)

    def _json_encode(value: Any) -> str:  # noqa: F811 (one definition or the other, by Python build)
        if isinstance(value, str):
            return json.encoder.encode_basestring_ascii(value)
        try:
            return "".join(_c_encode(value, 0))
        except RecursionError:
            # Without a markers dict (which would outlive a failed call) a cycle shows as this.
            raise ValueError("Circular reference detected (or nesting too deep)") from None
else:  # a Python without the C accelerator
    _json_encode = _encoder.encode


def dumps(serializer: str, value: Any) -> bytes:
    """``value`` as bytes: compact JSON, or pickle for ``@task(serializer="pickle")``."""
    if serializer == "pickle":
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _json_encode(value).encode()


def dumps_call(serializer: str, args: Any, kwargs: Any) -> bytes:
    """A call's arguments as bytes, as ``dumps(serializer, {"args": list(args), "kwargs": kwargs})`` makes them."""
    if kwargs or serializer == "pickle":
        return dumps(serializer, {"args": list(args), "kwargs": kwargs})
    # Most spawns pass no keywords: one encoder call on the arguments alone costs half as much.
    return b'{"args":' + _json_encode(list(args)).encode() + b',"kwargs":{}}'


def loads(serializer: str, blob: Optional[bytes]) -> Any:
    """The value ``dumps`` turned into ``blob`` (None stays None)."""
    if blob is None:
        return None
    if serializer == "pickle":
        return pickle.loads(blob)
    return json.loads(blob)
