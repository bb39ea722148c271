"""Workflows as Celery's canvas: ``Signature``, ``chain``, ``group``, ``chord``, ``GroupResult``.

The implementation lives with the tasks (``greenqueue.tasks._canvas``): a
workflow's steps are tasks, and the runner and the store hold them.
"""

from .errors import ChordError
from .tasks._canvas import GroupResult, Signature, chain, chord, group, launch, signature

__all__ = ["Signature", "signature", "chain", "group", "chord", "GroupResult", "ChordError", "launch"]
