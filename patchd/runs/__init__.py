"""Patch runs, seen from serve: the run record, its recipe, and its RQ job chain.

Modules, one concept each:

- :mod:`~patchd.runs.records`: the run record, its states and its SQL (the ``runs`` table).
- :mod:`~patchd.runs.recipe`: everything a worker needs, fixed when the run is created.
- :mod:`~patchd.runs.jobqueue`: queues, deterministic job ids, enqueueing, status, cancel.
- :mod:`~patchd.runs.redis_embedded`: a private ``redis-server`` when none answers.
- :mod:`~patchd.runs.component`: the serve component (create, poll, cancel; metrics).
- :mod:`~patchd.runs.api`: ``/v1/runs``.

Other subsystems import only ``component``, ``records``, ``recipe`` and ``jobqueue`` (the worker
side reads the last two).
"""
