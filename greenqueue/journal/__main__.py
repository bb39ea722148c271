"""``python -m greenqueue.journal PATH [list|retry|purge]``: inspect and repair a journal file."""

import datetime
import os
import sys

from ..errors import JournalError
from ._store import SCHEMA_VERSION, SQLiteStore

_UTC = datetime.timezone.utc


def _fmt_ts(ts):
    return "-" if ts is None else datetime.datetime.fromtimestamp(ts, _UTC).strftime("%Y-%m-%d %H:%M:%S")


def main(argv=None):
    """``python -m greenqueue.journal PATH [list|retry|purge]``: inspect and repair a journal."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m greenqueue.journal",
                                     description="Show, list, retry or purge tasks in a greenqueue journal.")
    parser.add_argument("path", help="the journal file (the server's --journal)")
    sub = parser.add_subparsers(dest="command")
    p_list = sub.add_parser("list", help="list tasks, newest first")
    p_list.add_argument("--state", help="only this state (e.g. FAILURE, PENDING)")
    p_list.add_argument("--limit", type=int, default=50)
    p_retry = sub.add_parser("retry", help="make failed tasks pending again (run at the next start)")
    p_retry.add_argument("task_id", nargs="?", help="one task id (default: every failed task)")
    p_purge = sub.add_parser("purge", help="delete finished tasks of one state")
    p_purge.add_argument("--state", default="FAILURE")
    args = parser.parse_args(argv)
    if not os.path.exists(args.path):
        print("greenqueue.journal: error: %s does not exist" % args.path, file=sys.stderr)
        return 2
    store = SQLiteStore(args.path)
    try:
        store.open()
    except JournalError as exc:
        print("greenqueue.journal: error: %s" % exc, file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            for row in store.list(args.state, args.limit):
                line = "%s  %-9s %-40s attempts=%d updated=%s" % (
                    row["id"], row["state"], row["name"], row["attempts"], _fmt_ts(row["updated_at"]))
                if row["error"]:
                    line += "  error=%s: %s" % (row["error_type"], row["error"])
                if row["note"]:
                    line += "  note=%s" % row["note"]
                print(line)
        elif args.command == "retry":
            print("%d task(s) will run at the next start" % store.requeue_failed(args.task_id))
        elif args.command == "purge":
            print("%d %s task(s) deleted" % (store.purge(args.state), args.state.upper()))
        else:
            counts = store.counts()
            print("journal %s (schema %d)" % (args.path, SCHEMA_VERSION))
            for state in ("PENDING", "SCHEDULED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "CANCELLED"):
                print("  %-9s %d" % (state, counts.get(state, 0)))
            waiting = store.unfinished()
            if waiting:
                oldest = waiting[0]
                print("oldest unfinished: %s %s since %s" % (oldest["id"], oldest["name"],
                                                             _fmt_ts(oldest["created_at"])))
            noted = [r for r in waiting if r["note"]]
            if noted:
                print("%d task(s) need attention (function not registered):" % len(noted))
                for r in noted:
                    print("  %s %s" % (r["id"], r["name"]))
    except JournalError as exc:
        print("greenqueue.journal: error: %s" % exc, file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
