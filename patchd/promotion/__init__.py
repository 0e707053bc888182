"""Promotion: gate a finished run, keep its evidence, let a person approve, switch production.

Modules, one concept each:

- :mod:`~patchd.promotion.gate`: the statistical test (worst group up, average within tolerance).
- :mod:`~patchd.promotion.record`: a candidate as stored, and its lifecycle states.
- :mod:`~patchd.promotion.store`: the ``candidates`` table (compare-and-set state changes).
- :mod:`~patchd.promotion.inputs`: what the gate reads of a finished run (verified artifacts).
- :mod:`~patchd.promotion.registry`: content-addressed versions and the atomic pointer.
- :mod:`~patchd.promotion.audit`: the append-only audit log.
- :mod:`~patchd.promotion.hooks`: reload URLs and commands run on promotion and rollback.
- :mod:`~patchd.promotion.report`: the candidate report (JSON and standalone HTML).
- :mod:`~patchd.promotion.metrics`: ``patchd_candidates{state}`` and the approval wait.
- :mod:`~patchd.promotion.component`: the serve component that orchestrates all of the above.
- :mod:`~patchd.promotion.api`: ``/v1/candidates``, approvals, ``/v1/rollback``.

Other subsystems import only ``registry``, ``audit`` and ``component``.
"""
