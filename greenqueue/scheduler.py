"""Periodic jobs: ``@periodic(crontab(...) | every(...) | validate_fn)``, run as tasks.

Concurrency model: the logic is a pure function of time, :meth:`Scheduler.tick`
(``now`` in, runs out), which the tests call with fixed datetimes. The loop
greenlet (``start()``) only sleeps until the earliest due time (no polling;
adding a job or stopping wakes it) and calls ``tick(clock.now())``. Runs are
spawned on the task runner, so they get retries, timeouts, events and the
Flask app context like any task; ``max_instances`` looks at those results.
Lateness (hub blocked, machine suspended, server down) is judged against the
due times, and ``catch_up`` decides what to run. Wall-clock times are aware
datetimes in UTC; each job computes its own due times in its own time zone.
"""

import datetime
import logging
import random
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence, TypeVar, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from . import eventlog, events
from ._default import Default
from .errors import ConfigError, StartupError
from .journal import Store, new_row
from .tasks import Runner, Task, TaskResult, get_runner, task
from .tasks._limits import limits_of, with_buckets
from .tasks._options import new_id

if TYPE_CHECKING:
    from gevent import Greenlet
    from gevent.event import Event

log = logging.getLogger(__name__)

__all__ = ["crontab", "every", "periodic", "Scheduler", "Job", "Clock", "SystemClock", "get_scheduler",
           "start", "stop", "reset"]

UTC = datetime.timezone.utc
CATCH_UP = ("once", "skip", "all")
_FIELDS = ("second", "minute", "hour", "day", "month", "day_of_week")
_RANGES = {"second": "0-59", "minute": "0-59", "hour": "0-23", "day": "1-31 or L",
           "month": "1-12 or jan-dec", "day_of_week": "0-7 or sun-sat, n#k, nL"}
#: Lateness tolerated before a run counts as missed (JobMissed).
MISS_TOLERANCE = 1.0

#: What ``@periodic`` takes as a schedule: a crontab, an every, seconds or a timedelta (an
#: interval, as in Celery beat), or a MiniHuey-style ``validate(datetime) -> bool``.
ScheduleSpec = Union["crontab", "every", float, datetime.timedelta, Callable[[datetime.datetime], Any]]
F = TypeVar("F", bound=Callable[..., Any])


def _aware(dt: datetime.datetime) -> datetime.datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


class crontab:
    """A cron schedule: ``crontab("3 17 * * sun")``, 6 fields with seconds first, or huey keywords."""

    def __init__(self, expr: Optional[str] = None, *, second: Union[int, str, None] = None,
                 minute: Union[int, str] = "*", hour: Union[int, str] = "*", day: Union[int, str] = "*",
                 month: Union[int, str] = "*", day_of_week: Union[int, str] = "*") -> None:
        if expr is None:
            parts = [str(minute), str(hour), str(day), str(month), str(day_of_week)]
            if second is not None:
                parts.insert(0, str(second))
            expr = " ".join(parts)
        if not isinstance(expr, str):
            raise ConfigError("crontab expects a string like '3 17 * * sun', got %r" % (expr,))
        self.expr = " ".join(expr.split())
        parts = self.expr.split()
        if len(parts) not in (5, 6):
            raise ConfigError("crontab %r: expected 5 fields (minute hour day month day_of_week) or 6 "
                             "(second first), got %d" % (expr, len(parts)))
        names = _FIELDS if len(parts) == 6 else _FIELDS[1:]
        try:
            CronSim(self.expr, datetime.datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError as exc:
            bad = str(exc).replace("Bad ", "").replace("day-of-month", "day").replace("day-of-week", "day_of_week")
            field = next((n for n in names if n.replace("_", " ") == bad.replace("_", " ")), bad)
            value = parts[names.index(field)] if field in names else "?"
            raise ConfigError("crontab %r: %s field: %r is not valid (allowed: %s, with ranges a-b, "
                             "steps */n and lists a,b)" % (expr, field, value, _RANGES.get(field, "?"))) from None

    def next_after(self, after: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
        """The first due time strictly after ``after`` (aware), computed in ``tz``; aware UTC."""
        local = after.astimezone(tz)
        return next(CronSim(self.expr, local)).astimezone(UTC)

    def __str__(self) -> str:
        return self.expr

    def __repr__(self) -> str:
        return "crontab(%r)" % self.expr


class every:
    """A fixed interval: ``every(seconds=5)`` or ``every(timedelta(...))``; ``align=True`` fires on clock multiples."""

    def __init__(self, seconds: Union[float, datetime.timedelta] = 0, minutes: float = 0, hours: float = 0,
                 align: bool = False) -> None:
        if isinstance(seconds, datetime.timedelta):
            seconds = seconds.total_seconds()
        for label, value in (("seconds", seconds), ("minutes", minutes), ("hours", hours)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError("every(%s=%r): expected a number (or a timedelta as the first argument)"
                                  % (label, value))
        self.interval = float(seconds) + 60.0 * float(minutes) + 3600.0 * float(hours)
        if self.interval <= 0:
            raise ConfigError("every(): the interval must be more than 0 seconds")
        self.align = align

    def first_after(self, now: datetime.datetime) -> datetime.datetime:
        """The first due time after the scheduler starts watching at ``now``."""
        if self.align:
            return self.next_after(now, UTC)
        return now + datetime.timedelta(seconds=self.interval)

    def on_grid(self, anchor: datetime.datetime, now: datetime.datetime) -> datetime.datetime:
        """The first instant ``anchor + k * interval`` at or after ``now``."""
        k = max(0, -(-(now - anchor).total_seconds() // self.interval))
        return anchor + datetime.timedelta(seconds=k * self.interval)

    def next_after(self, after: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
        """The next due time strictly after ``after``."""
        if self.align:
            ts = after.timestamp()
            n = (ts // self.interval + 1) * self.interval
            return datetime.datetime.fromtimestamp(n, UTC)
        return after + datetime.timedelta(seconds=self.interval)

    def __str__(self) -> str:
        return "every %gs%s" % (self.interval, " aligned" if self.align else "")

    __repr__ = __str__


class _Validate:
    """A MiniHuey-style ``validate(datetime) -> bool``, checked at the start of each minute."""

    def __init__(self, fn: Callable[[datetime.datetime], Any]) -> None:
        self.fn = fn

    def next_after(self, after: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
        return (after.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)).astimezone(UTC)

    def wants(self, due: datetime.datetime, tz: datetime.tzinfo) -> bool:
        return bool(self.fn(due.astimezone(tz)))

    def __str__(self) -> str:
        return "validate %s" % getattr(self.fn, "__qualname__", repr(self.fn))


class Clock(Protocol):
    """What a Scheduler reads the time from (tests pass a fake one)."""

    def now(self) -> datetime.datetime:
        """Now, as an aware datetime."""


class SystemClock:
    """The real clock: aware UTC datetimes."""

    def now(self) -> datetime.datetime:
        """Now, as an aware UTC datetime."""
        return datetime.datetime.now(UTC)


class Job:
    """One periodic job: its schedule, policy and run history."""

    def __init__(self, fn: Callable[..., Any], schedule: ScheduleSpec, *, timezone: Optional[str] = None,
                 max_instances: int = 1, catch_up: str = "once", jitter: float = 0.0, name: Optional[str] = None,
                 task_options: Optional[Dict[str, Any]] = None) -> None:
        if isinstance(fn, Task):
            fn = fn.fn
        if not callable(fn):
            raise ConfigError("@periodic decorates a function, got a %s: %r" % (type(fn).__name__, fn))
        if isinstance(schedule, (int, float, datetime.timedelta)) and not isinstance(schedule, bool):
            schedule = every(schedule)  # Celery beat takes a number of seconds or a timedelta
        if catch_up not in CATCH_UP:
            raise ConfigError("catch_up must be one of %s, got %r" % (", ".join(CATCH_UP), catch_up))
        if not isinstance(max_instances, int) or max_instances < 1:
            raise ConfigError("max_instances must be an integer >= 1, got %r" % (max_instances,))
        if not isinstance(jitter, (int, float)) or jitter < 0:
            raise ConfigError("jitter must be >= 0 seconds, got %r" % (jitter,))
        sched: Union[crontab, every, _Validate]
        if isinstance(schedule, (crontab, every)):
            sched = schedule
        else:
            if not callable(schedule):
                raise ConfigError("periodic() needs crontab(...), every(...) or a validate(datetime) callable")
            sched = _Validate(schedule)
        self.tz: datetime.tzinfo
        try:
            self.tz = ZoneInfo(timezone) if timezone else UTC
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError("unknown timezone %r (use an IANA name like 'Europe/Berlin')" % (timezone,)) from None
        self.fn = fn
        self.schedule = sched
        self.name = name or "%s.%s" % (fn.__module__, fn.__qualname__)
        self.max_instances = max_instances
        self.catch_up = catch_up
        self.jitter = float(jitter)
        self.task: Task[..., Any] = task(name=self.name, **(task_options or {}))(fn)
        self.next_run: Optional[datetime.datetime] = None
        self.last_run: Optional[datetime.datetime] = None
        self.last_state: Optional[str] = None
        self.running: List[TaskResult[Any]] = []

    def first_run(self, now: datetime.datetime) -> datetime.datetime:
        """The first due time once the scheduler sees this job at ``now``."""
        if isinstance(self.schedule, every):
            return self.schedule.first_after(now)
        return self.schedule.next_after(now, self.tz)

    def info(self) -> Dict[str, Any]:
        """A dict for listings and the dashboard."""
        return {"name": self.name, "schedule": str(self.schedule),
                "timezone": getattr(self.tz, "key", "UTC"), "next_run": self.next_run,
                "last_run": self.last_run, "last_state": self.last_state,
                "running": sum(1 for r in self.running if not r.ready())}


class Scheduler:
    """Holds jobs, decides what is due at ``now`` and runs a loop greenlet that sleeps in between."""

    def __init__(self, clock: Optional[Clock] = None, rng: Optional[random.Random] = None,
                 runner: Optional[Runner] = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        #: The runner whose store records fired runs and whose tasks run them (None: the default runner).
        self.runner = runner
        self._jobs: Dict[str, Job] = {}
        self._loop: Optional["Greenlet[..., Any]"] = None
        self._wake: Optional["Event"] = None
        #: In a cluster: whether this node held the leader lease at its last tick.
        self.leading = False

    def add(self, job: Job) -> Job:
        """Add a job (a second job with the same name raises ConfigError)."""
        if job.name in self._jobs:
            raise ConfigError("a periodic job named %r already exists" % job.name)
        self._jobs[job.name] = job
        if self._wake is not None:
            self._wake.set()
        return job

    def jobs(self) -> List[Dict[str, Any]]:
        """Every job's name, schedule text, timezone, next_run, last_run and last_state."""
        return [job.info() for job in self._jobs.values()]

    def get(self, name: str) -> Job:
        """The Job called ``name``."""
        return self._jobs[name]

    def __len__(self) -> int:
        return len(self._jobs)

    def all(self) -> List[Job]:
        """Every Job, in the order they were added."""
        return list(self._jobs.values())

    @property
    def running(self) -> bool:
        """True while the loop greenlet runs."""
        return self._loop is not None and not self._loop.dead

    # -- the pure core ---------------------------------------------------------------

    def _tasks_runner(self) -> Runner:
        return self.runner if self.runner is not None else get_runner()

    @property
    def store(self) -> Store:
        """Where fired runs are recorded: the runner's store (the journal keeps them across restarts)."""
        return self._tasks_runner().store

    def tick(self, now: Optional[datetime.datetime] = None) -> List[TaskResult[Any]]:
        """Run what is due at ``now`` (default: the clock); returns the TaskResults spawned."""
        now = _aware(now or self.clock.now())
        spawned: List[TaskResult[Any]] = []
        if not self._lead():
            return spawned
        for job in list(self._jobs.values()):
            if job.next_run is None:
                job.next_run = self._resume_point(job, now)
            if job.next_run > now:
                continue
            due = [job.next_run]
            nxt = job.schedule.next_after(job.next_run, job.tz)
            while nxt <= now:
                if len(due) < 10000:  # a long outage with catch_up="all" is capped, not unbounded
                    due.append(nxt)
                nxt = job.schedule.next_after(nxt, job.tz)
            job.next_run = nxt
            if isinstance(job.schedule, _Validate):
                due = [d for d in due if job.schedule.wants(d, job.tz)]
                if not due:
                    continue
            spawned.extend(self._due(job, due, now))
        return spawned

    def _lead(self) -> bool:
        """Take or keep the leadership (a process alone always leads). A node that does not lead fires
        nothing and forgets its due times, so it picks them up from the store when it leads (catch-up holds)."""
        try:
            leading = self.store.lead()
        except Exception as exc:  # the store is unreachable: nobody can fire now, least of all us
            log.warning("scheduler: cannot reach the store to lead (%s); not firing", exc)
            leading = False
        if leading != self.leading:
            log.info("scheduler: this node %s the leader (%s)", "is now" if leading else "is no longer",
                     self.store.display)
            self.leading = leading
        if not leading:
            for job in self._jobs.values():
                job.next_run = None
        return leading

    def _resume_point(self, job: Job, now: datetime.datetime) -> datetime.datetime:
        """First due time: after the store's last recorded run if there is one (catch-up after downtime)."""
        store = self.store
        last = store.last_fired(job.name)
        if last is not None:
            job.last_run = last
            return job.schedule.next_after(last, job.tz)
        if isinstance(job.schedule, every) and not job.schedule.align:
            # Every node must compute the same instants: the grid is anchored in the store
            # by whichever node saw the job first.
            anchor = store.anchor(job.name, job.first_run(now))
            return job.schedule.on_grid(anchor, now)
        return job.first_run(now)

    def _due(self, job: Job, due: List[datetime.datetime], now: datetime.datetime) -> List[TaskResult[Any]]:
        late = (now - due[0]).total_seconds()
        if len(due) > 1 or late > MISS_TOLERANCE:
            events.notify(events.JobMissed(job, scheduled_for=due[0], late_by=late, missed_runs=len(due)))
            log.warning("job %s is %.1fs late (%d run(s) due); catch_up=%s", job.name, late, len(due),
                        job.catch_up)
            if job.catch_up == "skip":
                events.notify(events.JobSkipped(job, reason="missed (catch_up='skip')", scheduled_for=due[-1]))
                return []
            if job.catch_up == "once":
                due = due[-1:]
        return [r for r in (self._submit(job, when) for when in due) if r is not None]

    def _submit(self, job: Job, scheduled_for: datetime.datetime) -> Optional[TaskResult[Any]]:
        """Fire one run as a task, once per instant (cluster-wide with a journal), unless
        max_instances runs are still going (counted by the store for what it records)."""
        runner = self._tasks_runner()
        busy = runner.unfinished_count(job.task.name)
        if busy >= job.max_instances:
            events.notify(events.JobSkipped(job, reason="max_instances=%d runs still going" % job.max_instances,
                                            scheduled_for=scheduled_for))
            log.info("job %s skipped: %d run(s) still going", job.name, busy)
            return None
        delay = self.rng.uniform(0, job.jitter) if job.jitter else 0
        # The run's eta is the instant it serves (a task can read it), or with jitter that much
        # later than now; never later than the wall clock, which a test's clock may be ahead of.
        wall = datetime.datetime.now(UTC)
        eta = wall + datetime.timedelta(seconds=delay) if delay else min(scheduled_for, wall)
        opts = job.task.opts
        rate, limit = limits_of(with_buckets(job.task.name, opts, (), {})) if opts.limited else (None, None)
        row = new_row(new_id(), job.task.name, (), {}, job.task.serializer, job.task.queue, eta,
                      max_attempts=opts.retries + 1, priority=opts.priority, rate=rate, limit=limit)
        stored = runner.store.fire(job.name, scheduled_for, row)
        if stored is None:
            log.info("job %s: the run for %s was already fired, or this node stopped leading", job.name,
                     scheduled_for)
            return None
        r = runner.adopt(stored, job.task, announce=True)
        job.running = [run for run in job.running if not run.ready()] + [r]
        job.last_run = scheduled_for
        job.last_state = r.state

        def finished(result: TaskResult[Any], job: Job = job) -> None:
            job.last_state = result.state
        r.add_done_callback(finished)
        events.notify(events.JobFired(job, result=r, scheduled_for=scheduled_for))
        return r

    # -- the loop --------------------------------------------------------------------------

    def seconds_until_next(self, now: Optional[datetime.datetime] = None) -> Optional[float]:
        """Seconds until the earliest due time (None when there are no jobs)."""
        now = _aware(now or self.clock.now())
        times = [j.next_run or j.first_run(now) for j in self._jobs.values()]
        if not times:
            return None
        return max(0.0, (min(times) - now).total_seconds())

    def start(self) -> "Scheduler":
        """Start the loop greenlet (idempotent)."""
        import gevent
        from gevent.event import Event

        if self._loop is None or self._loop.dead:
            wake = self._wake = Event()
            self._loop = gevent.spawn(self._run, wake)
        return self

    def stop(self) -> None:
        """Stop the loop greenlet; running job tasks are the task runner's to drain."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.kill(block=True)

    def _run(self, wake: "Event") -> None:
        import gevent

        while True:
            try:
                self.tick()
            except (Exception, gevent.Timeout):  # a Timeout from a validate() callable must not end the loop
                log.exception("scheduler tick failed; continuing")
            wait = self.seconds_until_next()
            # Renew (or try to take) the leadership well inside its lease (a process alone's never ends).
            renew = self.store.lease_timeout / 3
            if renew != float("inf"):
                wait = renew if wait is None else min(wait, renew)
            wake.clear()
            # Sleep until the earliest due time; add() and stop() wake us early.
            wake.wait(timeout=wait)


_default: Default[Scheduler] = Default(Scheduler)


def get_scheduler() -> Scheduler:
    """The default scheduler that ``@periodic`` registers on (the server starts it)."""
    return _default.get()


def start() -> Scheduler:
    """Start the default scheduler's loop."""
    return get_scheduler().start()


def stop() -> None:
    """Stop the default scheduler's loop."""
    scheduler = _default.peek()
    if scheduler is not None:
        scheduler.stop()


def reset() -> None:
    """Stop the default scheduler and forget its jobs (tests)."""
    old = _default.pop()
    if old is not None:
        old.stop()


def periodic(schedule: ScheduleSpec, timezone: Optional[str] = None, max_instances: int = 1,
             catch_up: str = "once", jitter: float = 0, name: Optional[str] = None,
             log_level: Union[str, int, None] = None, **task_options: Any) -> Callable[[F], F]:
    """Register the decorated function as a periodic job on the default scheduler; it stays callable.

    ``log_level`` ("debug", or a logging level) quiets a frequent job's routine lines (fired,
    succeeded); its failures are still logged as errors.
    """
    level = _log_level(log_level)
    if callable(schedule) and getattr(schedule, "__name__", None) and not isinstance(
            schedule, (crontab, every)) and _takes_no_arguments(schedule):
        raise ConfigError("@periodic needs a schedule first: @periodic(crontab('...')), @periodic(every(seconds=5)) "
                          "or @periodic(5.0); got the function %s" % getattr(schedule, "__qualname__", schedule))

    def decorate(fn: F) -> F:
        job = Job(fn, schedule, timezone=timezone, max_instances=max_instances, catch_up=catch_up,
                  jitter=jitter, name=name, task_options=task_options)
        get_scheduler().add(job)
        if level is not None:
            eventlog.set_task_log_level(job.task.name, level)
        fn.job = job  # type: ignore[attr-defined]
        return fn
    return decorate


def _log_level(value: Union[str, int, None]) -> Optional[int]:
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    level = logging.getLevelName(str(value).upper())
    if not isinstance(level, int):
        raise ConfigError("log_level must be debug, info, warning, error or a logging level, got %r" % (value,))
    return level


def _takes_no_arguments(fn: Callable[..., Any]) -> bool:
    # A validate(datetime) callable takes one argument; a job function used as the schedule
    # (`@periodic` without parentheses) usually takes none.
    import inspect
    try:
        return not inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m greenqueue.scheduler MODULE``: list a module's jobs and their next 5 run times."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m greenqueue.scheduler",
                                     description="List the periodic jobs a module declares and when they run next.")
    parser.add_argument("module", help="the module that declares @periodic jobs, e.g. myproject.jobs")
    parser.add_argument("-n", type=int, default=5, help="how many run times to show per job")
    args = parser.parse_args(argv)
    from ._startup import import_spec  # the one way user code is loaded, with its messages
    try:
        import_spec(args.module.partition(":")[0], "module")
    except StartupError as exc:
        print("greenqueue.scheduler: error: %s" % exc, file=sys.stderr)
        return 2
    scheduler = get_scheduler()
    if not len(scheduler):
        print("%s declares no @periodic jobs" % args.module)
        return 0
    now = datetime.datetime.now(UTC)
    for job in scheduler.all():
        print("%s  [%s, %s, max_instances=%d, catch_up=%s]" % (job.name, job.schedule,
                                                              getattr(job.tz, "key", "UTC"), job.max_instances,
                                                              job.catch_up))
        when = job.first_run(now)
        shown = 0
        for _ in range(100000):
            if shown >= args.n:
                break
            if not isinstance(job.schedule, _Validate) or job.schedule.wants(when, job.tz):
                print("    %s" % when.astimezone(job.tz).strftime("%a %Y-%m-%d %H:%M:%S %Z"))
                shown += 1
            when = job.schedule.next_after(when, job.tz)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so jobs register on the same default scheduler it lists.
    from greenqueue.scheduler import main as _main
    sys.exit(_main())
