"""The subgroup monitor: per (class x subgroup) accuracy, drift, alert policy and patch trigger.

Modules, one concept each:

- :mod:`~patchd.monitor.groups`: the bounded set of subgroup labels (overflow to ``other``).
- :mod:`~patchd.monitor.window`: the sliding window of labeled events (numpy columns).
- :mod:`~patchd.monitor.cells`: per-cell statistics (:class:`CellStats`, :class:`MonitorSnapshot`).
- :mod:`~patchd.monitor.reference`: the frozen reference, persisted in the store's kv table.
- :mod:`~patchd.monitor.sequential`: the Bernoulli CUSUM (valid under a look every tick), its
  analytic threshold and its simulated one (``monitor.alarm: simulated``).
- :mod:`~patchd.monitor.policy`: cell states (ok / warning / degraded), hysteresis, cooldown.
- :mod:`~patchd.monitor.drift`: label-free drift distances (numpy/scipy; evidently's definitions).
- :mod:`~patchd.monitor.estimate`: label-free accuracy estimates per (predicted class x
  subgroup) cell, calibrated on the labeled reference, with an interval and a reliability check.
- :mod:`~patchd.monitor.trigger`: the one function that turns degradation into a patch run.
- :mod:`~patchd.monitor.engine`: one model's monitor state, its tick and its drift pass.
- :mod:`~patchd.monitor.metrics`: the Prometheus collector (read at scrape time).
- :mod:`~patchd.monitor.api`: ``GET /v1/groups``.
- :mod:`~patchd.monitor.component`: the serve component (scheduler jobs, event subscriptions).

Nothing here imports torch.
"""
