"""Ingest: prediction events and labels from every source into the store.

Modules, one concept each:

- :mod:`~patchd.ingest.records`: the event schema (version 1): parsing and validation into
  :class:`~patchd.ingest.records.Prediction` / :class:`~patchd.ingest.records.Label`.
- :mod:`~patchd.ingest.fields`: field-level checks (ids, timestamps, numbers).
- :mod:`~patchd.ingest.input_paths`: ``input`` URIs inside the allow-listed roots.
- :mod:`~patchd.ingest.pipeline`: the bounded queue and the one writer thread (group commit).
- :mod:`~patchd.ingest.tailer`: JSONL tail sources (offsets kept in the store).
- :mod:`~patchd.ingest.metrics`: the Prometheus collector of the pipeline's counters.
- :mod:`~patchd.ingest.api`: ``POST /v1/predictions`` and ``POST /v1/labels``.

Other subsystems import only ``records``, ``pipeline`` and ``tailer``.
"""
