"""SQLite schema of the store, as an ordered list of migrations.

The store (``patchd.store.db``) applies every migration whose index is above the database's
``PRAGMA user_version`` in one transaction each. Never edit a released migration: append a new one.
Each table belongs to one module, named in its comment; only that module writes it.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: events, sources, runs, candidates, component state
    """
    -- patchd.store.predictions: one row per prediction; the label joins in place.
    CREATE TABLE predictions (
        model         TEXT    NOT NULL,
        id            TEXT    NOT NULL,
        ts            REAL    NOT NULL,            -- prediction time, unix seconds
        model_version TEXT,
        pred          INTEGER NOT NULL,
        confidence    REAL,                        -- max(probs), NULL when no probs
        probs         BLOB,                        -- float32 array, NULL when absent
        group_key     TEXT    NOT NULL,            -- canonical "a=x,b=y" after the cardinality cap
        groups        TEXT    NOT NULL,            -- JSON object of the capped attributes
        input_uri     TEXT,
        embedding     BLOB,                        -- float32 array, NULL when absent
        source        TEXT    NOT NULL,
        ingested_at   REAL    NOT NULL,
        label         INTEGER,
        labeled_at    REAL,
        PRIMARY KEY (model, id)
    ) WITHOUT ROWID;
    CREATE INDEX predictions_labeled ON predictions (model, labeled_at) WHERE label IS NOT NULL;
    CREATE INDEX predictions_ts ON predictions (model, ts);

    -- patchd.store.predictions: labels that arrived before their prediction.
    CREATE TABLE pending_labels (
        model       TEXT    NOT NULL,
        id          TEXT    NOT NULL,
        label       INTEGER NOT NULL,
        received_at REAL    NOT NULL,
        PRIMARY KEY (model, id)
    ) WITHOUT ROWID;

    -- patchd.ingest.tailer: durable read offsets per tailed file.
    CREATE TABLE source_offsets (
        source     TEXT    NOT NULL,
        path       TEXT    NOT NULL,
        device     INTEGER NOT NULL,
        inode      INTEGER NOT NULL,
        offset     INTEGER NOT NULL,
        updated_at REAL    NOT NULL,
        PRIMARY KEY (source, path)
    );

    -- patchd.runs.component: patch runs and their RQ job ids.
    CREATE TABLE runs (
        id          TEXT PRIMARY KEY,
        model       TEXT NOT NULL,
        state       TEXT NOT NULL,     -- requested|queued|running|succeeded|failed|cancelled
        stage       TEXT,
        reason      TEXT NOT NULL,
        recipe      TEXT NOT NULL,     -- JSON: miner, augmenter, trainer, budget
        job_ids     TEXT NOT NULL,     -- JSON: stage -> job id
        stage_times TEXT NOT NULL DEFAULT '{}',  -- JSON: stage -> seconds
        error       TEXT,
        result      TEXT,              -- JSON result of the last stage
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX runs_model_state ON runs (model, state);

    -- patchd.promotion.component: patched models and their gate / approval lifecycle.
    CREATE TABLE candidates (
        id          TEXT PRIMARY KEY,
        model       TEXT NOT NULL,
        run_id      TEXT NOT NULL,
        digest      TEXT NOT NULL,     -- sha256 of model.safetensors
        state       TEXT NOT NULL,
        verdict     TEXT,              -- pass|fail|inconclusive
        evaluation  TEXT,              -- JSON (the evaluate stage's report)
        decided_by  TEXT,
        decided_at  REAL,
        expires_at  REAL,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX candidates_model_state ON candidates (model, state);

    -- any component: small versioned JSON state (monitor reference, alert states, ...).
    CREATE TABLE kv (
        key        TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 2: patchd.promotion: the gate decision (JSON), the incumbent digest the candidate was
    # evaluated against, and the note of the last decision (reject reason, error).
    """
    ALTER TABLE candidates ADD COLUMN gate TEXT;
    ALTER TABLE candidates ADD COLUMN parent TEXT;
    ALTER TABLE candidates ADD COLUMN note TEXT;
    """,
]


# The same migrations in PostgreSQL's dialect (applied by ``patchd.store.postgres``, tracked in the
# ``patchd_schema`` table): entry N creates exactly the tables and columns of ``MIGRATIONS[N]``
# (tests/unit/test_store_schema.py checks it). BLOB -> BYTEA, REAL -> DOUBLE PRECISION,
# INTEGER -> BIGINT (inodes exceed 32 bits), WITHOUT ROWID dropped, ``offset`` quoted (reserved).
PG_MIGRATIONS: list[str] = [
    """
    CREATE TABLE predictions (
        model         TEXT             NOT NULL,
        id            TEXT             NOT NULL,
        ts            DOUBLE PRECISION NOT NULL,
        model_version TEXT,
        pred          BIGINT           NOT NULL,
        confidence    DOUBLE PRECISION,
        probs         BYTEA,
        group_key     TEXT             NOT NULL,
        groups        TEXT             NOT NULL,
        input_uri     TEXT,
        embedding     BYTEA,
        source        TEXT             NOT NULL,
        ingested_at   DOUBLE PRECISION NOT NULL,
        label         BIGINT,
        labeled_at    DOUBLE PRECISION,
        PRIMARY KEY (model, id)
    );
    CREATE INDEX predictions_labeled ON predictions (model, labeled_at) WHERE label IS NOT NULL;
    CREATE INDEX predictions_ts ON predictions (model, ts);

    CREATE TABLE pending_labels (
        model       TEXT             NOT NULL,
        id          TEXT             NOT NULL,
        label       BIGINT           NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (model, id)
    );

    CREATE TABLE source_offsets (
        source     TEXT             NOT NULL,
        path       TEXT             NOT NULL,
        device     BIGINT           NOT NULL,
        inode      BIGINT           NOT NULL,
        "offset"   BIGINT           NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (source, path)
    );

    CREATE TABLE runs (
        id          TEXT PRIMARY KEY,
        model       TEXT NOT NULL,
        state       TEXT NOT NULL,
        stage       TEXT,
        reason      TEXT NOT NULL,
        recipe      TEXT NOT NULL,
        job_ids     TEXT NOT NULL,
        stage_times TEXT NOT NULL DEFAULT '{}',
        error       TEXT,
        result      TEXT,
        created_at  DOUBLE PRECISION NOT NULL,
        updated_at  DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX runs_model_state ON runs (model, state);

    CREATE TABLE candidates (
        id          TEXT PRIMARY KEY,
        model       TEXT NOT NULL,
        run_id      TEXT NOT NULL,
        digest      TEXT NOT NULL,
        state       TEXT NOT NULL,
        verdict     TEXT,
        evaluation  TEXT,
        decided_by  TEXT,
        decided_at  DOUBLE PRECISION,
        expires_at  DOUBLE PRECISION,
        created_at  DOUBLE PRECISION NOT NULL,
        updated_at  DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX candidates_model_state ON candidates (model, state);

    CREATE TABLE kv (
        key        TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    """
    ALTER TABLE candidates ADD COLUMN gate TEXT;
    ALTER TABLE candidates ADD COLUMN parent TEXT;
    ALTER TABLE candidates ADD COLUMN note TEXT;
    """,
]
