"""``python -m greenqueue.journal PATH_OR_URL [list|retry|purge]``: inspect and repair a journal.

Concurrency model: a plain command-line process without a gevent hub. An
SQLite file is read through the SQLite engine and a ``postgresql://`` URL
through the PostgreSQL engine; both block this one thread, and both may
be used while servers run on the same journal (SQLite in WAL mode takes its
own short transactions; PostgreSQL is shared by design). A PostgreSQL URL's
password is never printed: the engine's ``display`` masks it.
"""

import argparse
import dataclasses
import datetime
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ConfigError, JournalError
from . import URL_SCHEMES, engine_for
from ._engine import FINAL, UNFINISHED, Engine

_UTC = datetime.timezone.utc
_STATES = UNFINISHED + FINAL
_RETRYABLE = ("FAILURE", "CANCELLED")


def _fmt_ts(ts: Optional[float]) -> str:
    return "-" if ts is None else datetime.datetime.fromtimestamp(ts, _UTC).strftime("%Y-%m-%d %H:%M:%S")


class _Journal:
    """The command's view of a journal: an SQLite file on this host, or a PostgreSQL cluster's database."""

    after_retry = "queued again; a node with a free slot runs them"

    def __init__(self, path: str) -> None:
        try:
            self.engine: Engine = engine_for(path)
        except ConfigError as exc:  # the postgres extra is missing
            raise JournalError(str(exc)) from None
        self.file = None if path.startswith(URL_SCHEMES) else path
        self.schema = self.engine.schema_version
        self.display = self.engine.display

    def open(self) -> None:
        if self.file is not None and not os.path.exists(self.file):
            # Opening would create it: a mistyped path must not leave a new journal behind.
            raise JournalError("%s does not exist; give the path the server's --journal uses" % self.file)
        self.engine.open()

    def close(self) -> None:
        self.engine.close()

    def counts(self) -> Dict[str, int]:
        return self.engine.counts()

    @staticmethod
    def _dict(row: Any) -> Dict[str, Any]:
        d = dataclasses.asdict(row)
        d["updated_at"] = row.finished_at or row.started_at or row.created_at
        return d

    def rows(self, state: Optional[str], limit: int) -> List[Dict[str, Any]]:
        return [self._dict(r) for r in self.engine.rows(state, limit)]

    def unfinished(self) -> List[Dict[str, Any]]:
        counts = self.engine.counts()
        rows = [r for state in UNFINISHED if counts.get(state)
                for r in self.engine.rows(state, counts[state])]
        return [self._dict(r) for r in sorted(rows, key=lambda r: r.created_at or 0.0)]

    def get(self, task_id: str) -> Optional[Dict[str, Any]]:
        row = self.engine.get(task_id)
        return None if row is None else self._dict(row)

    def requeue(self, task_id: Optional[str]) -> int:
        return self.engine.requeue(task_id)

    def purge(self, state: str) -> int:
        return self.engine.purge(state)

    def nodes(self) -> Optional[list]:
        return self.engine.nodes()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m greenqueue.journal",
                                     description="Show, list, retry or purge tasks in a greenqueue journal.")
    parser.add_argument("path", metavar="PATH_OR_URL",
                        help="the server's --journal: an SQLite file or a postgresql:// URL")
    sub = parser.add_subparsers(dest="command")
    p_list = sub.add_parser("list", help="list tasks, newest first")
    p_list.add_argument("--state", type=str.upper, choices=_STATES, metavar="STATE",
                        help="only this state, one of %s" % ", ".join(_STATES))
    p_list.add_argument("--limit", type=int, default=50, help="at most this many (default: %(default)s)")
    p_retry = sub.add_parser("retry", help="make failed or cancelled tasks pending again, with a fresh "
                                           "attempt budget")
    p_retry.add_argument("task_id", nargs="?", help="one task id (default: every failed or cancelled task)")
    p_purge = sub.add_parser("purge", help="delete finished tasks of one state")
    p_purge.add_argument("--state", type=str.upper, choices=FINAL, default="FAILURE", metavar="STATE",
                         help="one of %s (default: %%(default)s)" % ", ".join(FINAL))
    return parser


def _open(path: str) -> Any:
    journal = _Journal(path)
    journal.open()
    return journal


def _list(journal: Any, state: Optional[str], limit: int) -> None:
    for row in journal.rows(state, limit):
        line = "%s  %-9s %-40s attempts=%d updated=%s" % (
            row["id"], row["state"], row["name"], row["attempts"], _fmt_ts(row["updated_at"]))
        if row["error"]:
            line += "  error=%s: %s" % (row["error_type"], row["error"])
        if row["note"]:
            line += "  note=%s" % row["note"]
        print(line)


def _retry(journal: Any, task_id: Optional[str]) -> int:
    if task_id:
        row = journal.get(task_id)
        if row is None:
            print("greenqueue.journal: error: task %s not found in %s; `list` shows the task ids"
                  % (task_id, journal.display), file=sys.stderr)
            return 1
        if row["state"] not in _RETRYABLE:
            print("greenqueue.journal: error: task %s is %s; only %s tasks can be retried"
                  % (task_id, row["state"], " or ".join(_RETRYABLE)), file=sys.stderr)
            return 1
    print("%d task(s) %s" % (journal.requeue(task_id), journal.after_retry))
    return 0


def _nodes_table(nodes: Sequence[Any]) -> List[str]:
    header = ("id", "host", "pid", "started", "heartbeat", "running")
    cells = [header] + [(n.id, n.host or "-", str(n.pid), _fmt_ts(n.started_at), _fmt_ts(n.heartbeat_at),
                         str(n.running)) for n in nodes]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]


def _summary(journal: Any) -> None:
    counts = journal.counts()
    print("journal %s (schema %d)" % (journal.display, journal.schema))
    for state in _STATES:
        print("  %-9s %d" % (state, counts.get(state, 0)))
    waiting = journal.unfinished()
    if waiting:
        oldest = waiting[0]
        print("oldest unfinished: %s %s since %s" % (oldest["id"], oldest["name"], _fmt_ts(oldest["created_at"])))
    noted = [r for r in waiting if r["note"] or "is not registered" in (r["error"] or "")]
    if noted:
        print("%d task(s) need attention (function not registered):" % len(noted))
        for r in noted:
            print("  %s %s" % (r["id"], r["name"]))
    nodes = journal.nodes()
    if nodes is not None:
        print("%d node(s) with a recent heartbeat%s" % (len(nodes), ":" if nodes else ""))
        if nodes:
            print("\n".join(_nodes_table(nodes)))


def _fail(exc: JournalError) -> int:
    # One line: a driver's message may span several (psycopg quotes libpq's multi-line errors).
    print("greenqueue.journal: error: %s" % " ".join(str(exc).split()), file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line (``python -m greenqueue.journal -h``); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        journal = _open(args.path)
    except JournalError as exc:
        return _fail(exc)
    try:
        if args.command == "list":
            _list(journal, args.state, args.limit)
        elif args.command == "retry":
            return _retry(journal, args.task_id)
        elif args.command == "purge":
            print("%d %s task(s) deleted" % (journal.purge(args.state), args.state))
        else:
            _summary(journal)
    except JournalError as exc:
        return _fail(exc)
    finally:
        journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
