"""A module's default instance: made on first use, handed over (and forgotten) by ``pop()``.

Concurrency model: module-level state touched at import time, in tests'
resets and from the task hub; nothing here blocks. Across ``fork()`` the
owner decides (the task runner pops its default in the child).
"""

from typing import Callable, Generic, Optional, TypeVar

__all__ = ["Default"]

T = TypeVar("T")


class Default(Generic[T]):
    """The default ``T`` of a module (the runner ``@task`` uses, the scheduler ``@periodic`` registers on)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._value: Optional[T] = None

    def get(self) -> T:
        """The default instance, made now if there is none."""
        if self._value is None:
            self._value = self._make()
        return self._value

    def peek(self) -> Optional[T]:
        """The default instance if one was made, without making one."""
        return self._value

    def pop(self) -> Optional[T]:
        """Forget the default instance and return it (None if none was made); the next get() makes a new one."""
        value, self._value = self._value, None
        return value
