"""A module declaring jobs, for ``python -m greenqueue.scheduler``."""

from greenqueue import crontab, every, periodic


@periodic(crontab("3 17 * * sun"), timezone="Europe/Berlin")
def weekly_report():
    return "report"


@periodic(every(seconds=5))
def poll():
    return "polled"
