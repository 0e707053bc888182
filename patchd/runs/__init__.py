"""Patch runs, seen from serve: the run record, its recipe, and its RQ job chain.

Modules, one concept each:

- :mod:`~patchd.runs.records`: the run record, its states and its SQL (the ``runs`` table).
- :mod:`~patchd.runs.recipe`: everything a worker needs, fixed when the run is created.
- :mod:`~patchd.runs.jobqueue`: queues, deterministic job ids, enqueueing, status, cancel.
- :mod:`~patchd.runs.redis_embedded`: a private ``redis-server`` when none answers.
- :mod:`~patchd.runs.component`: the serve component (create, poll, cancel; metrics).
- :mod:`~patchd.runs.api`: ``/v1/runs``.
- :mod:`~patchd.runs.regions`: a run's Defuse failure regions and their labels file (torch-free).

Other subsystems import only ``component``, ``records``, ``recipe``, ``jobqueue`` (the worker
side reads these two) and ``regions``.
"""
