"""How task arguments and results become bytes in a store, and back.

Concurrency model: pure functions; safe from any thread.
"""

import json
import pickle
from typing import Any, Optional

__all__ = ["dumps", "loads", "SERIALIZERS"]

SERIALIZERS = ("json", "pickle")

# json.dumps() with arguments builds a new encoder per call; reuse one.
_json_encode = json.JSONEncoder(separators=(",", ":")).encode


def dumps(serializer: str, value: Any) -> bytes:
    """``value`` as bytes: compact JSON, or pickle for ``@task(serializer="pickle")``."""
    if serializer == "pickle":
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _json_encode(value).encode()


def loads(serializer: str, blob: Optional[bytes]) -> Any:
    """The value ``dumps`` turned into ``blob`` (None stays None)."""
    if blob is None:
        return None
    if serializer == "pickle":
        return pickle.loads(blob)
    return json.loads(blob)
