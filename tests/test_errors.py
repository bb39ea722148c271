"""The exception hierarchy, in process: one base, the stdlib bases users expect, the pipe table."""

import inspect

import pytest

from greenqueue import errors
from greenqueue.errors import (EXIT_STARTUP, EXIT_USAGE, ConfigError, GreenqueueError, RemoteError, StartupError,
                               TaskTimeout, UnknownPool, WaitTimeout, from_dict, to_dict)

CLASSES = [obj for name in errors.__all__ if inspect.isclass(obj := getattr(errors, name))]

# Errors a worker may raise that the server rebuilds as themselves (the rest become RemoteError).
WIRE = ["GreenqueueError", "ConfigError", "Overloaded", "TaskTimeout", "WaitTimeout", "CancelledError",
        "WorkerError", "WorkerCrashed", "WorkerTimeout", "JournalError"]


def test_every_exported_class_is_a_greenqueue_error_with_a_docstring():
    assert len(CLASSES) >= 13
    for cls in CLASSES:
        assert issubclass(cls, GreenqueueError), cls
        assert cls.__doc__ and cls.__doc__.strip(), "%s has no docstring" % cls.__name__


@pytest.mark.parametrize("name", WIRE)
def test_greenqueue_errors_cross_the_pipe_as_themselves(name):
    cls = getattr(errors, name)
    data = to_dict(cls("worker 2 is gone"), "Traceback ...")
    assert data == {"type": name, "message": "worker 2 is gone", "traceback": "Traceback ..."}
    rebuilt = from_dict(data)
    assert type(rebuilt) is cls and str(rebuilt) == "worker 2 is gone"


def test_a_builtin_exception_comes_back_as_a_remote_error():
    try:
        raise ValueError("bad input")
    except ValueError as exc:
        data = to_dict(exc, "Traceback (most recent call last):\n  ...\nValueError: bad input\n")
    err = from_dict(data)
    assert type(err) is RemoteError and isinstance(err, errors.WorkerError)
    assert err.remote_type == "ValueError" and str(err) == "ValueError: bad input"
    assert err.remote_traceback.endswith("ValueError: bad input\n")


def test_an_app_defined_exception_keeps_its_qualified_name():
    class QuotaExceeded(Exception):
        pass

    data = to_dict(QuotaExceeded("over by 3"))
    assert data["type"] == "%s.%s" % (__name__, QuotaExceeded.__qualname__)
    err = from_dict(data)
    assert type(err) is RemoteError and err.remote_type == data["type"] and "over by 3" in str(err)


def test_a_remote_error_crosses_the_pipe_with_its_remote_details():
    original = RemoteError("no such model", "KeyError", "Traceback ...")
    rebuilt = from_dict(to_dict(original, original.remote_traceback))
    assert type(rebuilt) is RemoteError and rebuilt.remote_traceback == "Traceback ..."
    assert "no such model" in str(rebuilt)


def test_from_dict_of_an_empty_dict_is_still_an_error():
    err = from_dict({})
    assert isinstance(err, GreenqueueError) and err.remote_type == "Exception"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="max_concurrency"):
        raise ConfigError("max_concurrency must be >= 1")


def test_unknown_pool_is_a_key_error_whose_message_is_not_quoted():
    assert issubclass(UnknownPool, KeyError)
    err = UnknownPool("no process pool 'Chat' is running")
    assert str(err) == "no process pool 'Chat' is running"  # KeyError would show repr() quotes
    assert str(UnknownPool()) == ""


def test_wait_timeout_is_a_task_timeout_but_not_the_other_way_round():
    assert issubclass(WaitTimeout, TaskTimeout)
    assert not issubclass(TaskTimeout, WaitTimeout)
    with pytest.raises(TaskTimeout):
        raise WaitTimeout("waited 5 s")


def test_startup_error_carries_its_exit_status():
    assert StartupError("bad --bind").status == EXIT_USAGE == 2
    err = StartupError("startup hook failed", status=EXIT_STARTUP)
    assert err.status == EXIT_STARTUP == 1 and str(err) == "startup hook failed"
