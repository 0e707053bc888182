"""Configuration: one YAML file, ``PATCHD_*`` environment overrides, CLI flags on top.

The file is read once in ``main()`` (see :func:`load_config`) and the resulting :class:`Config`
object is passed down; nothing reads the environment or the file at import time.

Environment overrides use ``__`` between levels: ``PATCHD_API__PORT=9000`` sets ``api.port``,
``PATCHD_REDIS__URL=redis://...`` sets ``redis.url``. Values are parsed as YAML scalars, so
``PATCHD_GATE__AUTO_PROMOTE=true`` is a boolean.

Paths: every path field is typed :data:`ConfigPath` (``sources.tail.*.glob`` is
:data:`ConfigGlob`); ``~`` is expanded, URLs are refused (``artifacts.root`` and
``registry.root``, :data:`ConfigLocation`, also take an ``s3://`` URL), and when
:func:`load_config` reads a file, a relative path is resolved once, at load time, against that
file's directory, whichever layer it came from (default, file, ``PATCHD_*`` or ``overrides``),
as ``state_dir`` always was. Without a config file relative paths stay relative (to the working
directory). Free-form
plugin parameters are rebased for the well-known keys in :data:`PARAM_PATH_KEYS`.
"""

from __future__ import annotations

import os
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from patchd.exceptions import ConfigError

ENV_PREFIX = "PATCHD_"
# keys of ``patch.params.<plugin>`` that hold a path (defuse's ``labels_file``)
PARAM_PATH_KEYS = frozenset({"labels_file"})


def _expand(value: str) -> Path:
    """``value`` as a path with ``~`` expanded; a URL is an error (no path field takes one)."""
    if "://" in value:
        raise ValueError(f"must be a filesystem path, not a URL ({value!r})")
    try:
        return Path(value).expanduser()
    except RuntimeError as err:  # ~user with no such user
        raise ValueError(f"cannot expand {value!r}: {err}") from None


def _base_dir(info: ValidationInfo) -> Path | None:
    """The config file's directory, passed by :func:`build_config` as validation context."""
    base = (info.context or {}).get("base_dir")
    return Path(base) if base is not None else None


def _config_path(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str | Path):
        return value  # left to the type check
    path, base = _expand(str(value)), _base_dir(info)
    return path if base is None or path.is_absolute() else (base / path).resolve()


def _config_glob(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str):
        return value
    path, base = _expand(value), _base_dir(info)
    return str(path if base is None or path.is_absolute() else base / path)  # globs: no resolve


# A filesystem path in the config (see the module docstring); a glob pattern, rebased the same way.
ConfigPath = Annotated[Path, BeforeValidator(_config_path)]
ConfigGlob = Annotated[str, BeforeValidator(_config_glob)]

OBJECT_STORE_SCHEMES = ("s3",)


def _config_location(value: Any, info: ValidationInfo) -> Any:
    """A path (rebased like :data:`ConfigPath`) or an ``s3://bucket[/prefix]`` URL (a str)."""
    if not isinstance(value, str) or "://" not in value:
        return _config_path(value, info)
    scheme, _, rest = value.partition("://")
    if scheme not in OBJECT_STORE_SCHEMES:
        raise ValueError(
            f"{value!r}: only s3:// URLs (an S3-API bucket) or a filesystem path are supported "
            f"here, not {scheme}://"
        )
    bucket = rest.split("/", 1)[0]
    if not bucket or "@" in bucket or "?" in value or "#" in value:
        raise ValueError(
            f"{value!r} must be s3://<bucket>[/<prefix>] (credentials go in storage_options)"
        )
    return value.rstrip("/")


# ``artifacts.root`` / ``registry.root``: a local directory (Path) or an object-store URL (str)
ConfigLocation = Annotated[Path | str, BeforeValidator(_config_location)]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InputNormalization(Section):
    """Per-channel ``(x - mean) / std`` applied by patchd before the model's forward.

    patchd hands a model RGB float tensors in [0, 1] (``[N, 3, H, W]``); a model trained on
    normalized inputs (e.g. ImageNet statistics) sets this instead of changing its code.
    """

    mean: list[float] = Field(..., min_length=1, max_length=4)
    std: list[float] = Field(..., min_length=1, max_length=4)

    @model_validator(mode="after")
    def _same_channels(self) -> InputNormalization:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"mean has {len(self.mean)} values and std {len(self.std)}; give one per channel"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        return self


class ModelConfig(Section):
    name: str = Field("model", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    factory: str = "patchd.ml.models:small_cnn"  # module:callable returning an nn.Module
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: ConfigPath | None = None  # safetensors file of the initial production model
    class_names: list[str] = Field(default_factory=lambda: ["0", "1"], min_length=2)
    # None: the model takes RGB in [0, 1] as it is (see InputNormalization)
    input_normalization: InputNormalization | None = None

    @field_validator("factory")
    @classmethod
    def _dotted(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError(f"must be 'module:callable', got {v!r}")
        return v


class GroupsConfig(Section):
    attributes: list[str] = Field(default_factory=list)  # event `groups` keys that define subgroups
    max_values: int = Field(16, ge=1, le=1000)  # per attribute; the rest go to `other`
    overflow: str = "other"
    values: dict[str, list[str]] = Field(
        default_factory=dict
    )  # optional fixed value set per attribute


class DatasetSpec(Section):
    kind: Literal[
        "colored-digits",
        "colored-fmnist",
        "image-csv",
        "sticker-fmnist",
        "texture-fmnist",
        "wilds-metadata",
    ] = "colored-digits"
    root: ConfigPath | None = None  # image folder or data directory for image-csv / wilds-metadata
    csv: ConfigPath | None = None
    group_columns: list[str] = Field(default_factory=list)
    # side of the square images; None: the kind's native size (digits 16, fmnist 28, csv 64)
    image_size: int | None = Field(None, ge=8, le=512)
    n_train: int | None = Field(None, ge=10)
    # image-csv / wilds-metadata: label names in class order (labels may be names or indices);
    # None: integer labels 0..K-1, or the sorted distinct label strings
    class_names: list[str] | None = None
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


class DataConfig(Section):
    train: DatasetSpec = Field(default_factory=DatasetSpec)
    # held-out data for evaluate: its `test` split (`train`'s `test` split when unset)
    heldout: DatasetSpec | None = None
    use_production_slice: bool = True


class TailSourceConfig(Section):
    name: str = "jsonl"
    kind: Literal["jsonl", "bentoml", "mapping"] = "jsonl"
    glob: ConfigGlob
    poll_interval_s: float = Field(0.5, gt=0)
    mapping: dict[str, str] = Field(default_factory=dict)  # field -> dotted path, for kind=mapping
    # zone a naive timestamp was written in: an IANA name ("Asia/Tokyo") or "local" (this
    # machine's zone). Default: "local" for kind bentoml (its monitor writes datetime.now()),
    # naive times read as UTC otherwise (schema v1)
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None or value == "local":
            return value
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a time zone: use an IANA name such as 'Asia/Tokyo' or 'UTC', "
                "or 'local'"
            ) from None
        return value

    def zone(self) -> str | None:
        """The zone naive timestamps of this source are read in (None: as UTC)."""
        return self.timezone or ("local" if self.kind == "bentoml" else None)


class CloudEventSourceConfig(Section):
    """A CloudEvents adapter route (KServe / Seldon logger): request/response join and mapping."""

    enabled: bool = True
    ttl_s: float = Field(30.0, gt=0)  # how long a half waits for its other half
    max_pending: int = Field(100_000, ge=1)  # halves buffered at most; the oldest expire first
    # estimated total size of the buffered halves (predictions, inputs, overhead); past it the
    # oldest halves expire early (orphans)
    max_pending_bytes: int = Field(256 << 20, ge=1 << 20)
    max_instances: int = Field(1024, ge=1)  # instances per CloudEvent; more: a counted 400
    max_decompressed_bytes: int = Field(16 << 20, ge=1024)  # a gzip body inflates to at most
    model: str | None = None  # model name override (default: ce-inferenceservicename)
    group_headers: dict[str, str] = Field(default_factory=dict)  # metadata header -> group attr
    input_uri_header: str = "x-patchd-input-uri"  # metadata header with the input URI(s)
    output: str | None = None  # OIP output tensor to read (default: first usable)
    emit_response_orphans: bool = True  # a response whose request never came still counts
    inline_inputs: bool = True  # b64 / BYTES request instances are sent inline to the store
    # the event group attribute that records the stream's ce-endpoint (KServe: default|canary,
    # Seldon: the predictor); list it in groups.attributes to monitor the streams apart. null:
    # not recorded
    endpoint_group: str | None = Field("endpoint", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    endpoints: list[str] | None = None  # ce-endpoint values taken (null: all); others ignored


class KServeSourceConfig(CloudEventSourceConfig):
    """``sources.kserve``: which component's logger stream is the model's predictions."""

    # ce-component taken (predictor|transformer|explainer); events of the others are answered
    # 200 and counted as ignored; an event without ce-component (older agents) is taken
    component: str = "predictor"


class SeldonSourceConfig(CloudEventSourceConfig):
    """``sources.seldon``: which graph node's logger stream is the model's predictions."""

    # Ce-Modelid of the node whose output is the classifier's; null: the node named like the
    # model (sources.seldon.model or model.name) once one has logged, every node until then
    node: str | None = None


class SourcesConfig(Section):
    allowed_roots: list[ConfigPath] = Field(
        default_factory=list
    )  # roots input URIs and tail globs may use
    tail: list[TailSourceConfig] = Field(default_factory=list)
    max_inline_bytes: int = Field(1 << 20, ge=1024)  # one inline input, decoded bytes
    max_inline_bytes_per_request: int = Field(32 << 20, ge=1024)  # all inline inputs of a batch
    max_image_pixels: int = Field(4096 * 4096, ge=64)  # an inline input decodes to at most
    max_inputs_bytes: int = Field(10 << 30, ge=1 << 20)  # <artifacts>/inputs on disk; then refused
    max_events_per_request: int = Field(50_000, ge=1)  # records in one HTTP body; more: a 413
    # '[' + '{' bytes in one HTTP body or CloudEvent, counted before parsing: a parsed container
    # costs ~70 bytes, so this bounds what `[[],[],...]` costs (more: a 413 / counted 400)
    max_json_containers: int = Field(1_000_000, ge=1000)
    kserve: KServeSourceConfig = Field(default_factory=KServeSourceConfig)
    seldon: SeldonSourceConfig = Field(default_factory=SeldonSourceConfig)


def _mined_groups(value: Any, info: ValidationInfo) -> Any:
    """``latest`` | ``off`` | a file path (rebased on the config file's directory)."""
    return value if value in ("latest", "off") else _config_glob(value, info)


class MonitorConfig(Section):
    interval_s: float = Field(10.0, gt=0)
    window: int = Field(5000, ge=10)  # labeled events per model in the sliding window
    # a fresh monitor (a start, a new leader) reads the window it starts from at most this many
    # labeled events per tick, oldest first, so one model's first tick stays short; the events
    # labeled since are read in full once it caught up
    catch_up_events_per_tick: int = Field(20_000, ge=1000)
    window_seconds: float | None = Field(None, gt=0)
    n_min: int = Field(30, ge=1)  # a cell needs this many samples to count toward worst-group
    accuracy_floor: float = Field(0.6, ge=0, le=1)
    margin: float = Field(0.10, ge=0, le=1)  # degraded when accuracy < reference - margin
    confidence: float = Field(0.99, gt=0.5, lt=1)
    recover_margin: float = Field(0.05, ge=0, le=1)  # hysteresis
    cooldown_s: float = Field(600.0, ge=0)
    drift_threshold: float = Field(0.1, ge=0)
    reference_window: int = Field(2000, ge=10)
    # false alarms of all cells together stay within 1 - confidence over this many labeled events
    horizon_events: int = Field(1_000_000, ge=1000)
    drift_interval_s: float = Field(60.0, gt=0)  # the label-free drift pass (evidently)
    drift_window: int = Field(5000, ge=100)  # newest predictions (labeled or not) drift looks at
    drift_min_samples: int = Field(200, ge=5)  # per group, in reference and current, to test drift
    warning_confidence_drop: float = Field(0.05, ge=0, le=1)  # drift + this drop -> warning
    # the labeled test's in-control rate and threshold (patchd.monitor.policy): "guaranteed" (the
    # reference's lower bound, the analytic bound at `confidence` over `horizon_events`) or
    # "simulated" (the reference's point estimate, h from simulated horizons of the reference's
    # own rates drawn from their posterior: the budget of "0 false alarms over the horizon")
    alarm: Literal["guaranteed", "simulated"] = "guaranteed"
    # pseudo-groups from mined failure directions (patchd.monitor.mined): "latest" (the newest
    # succeeded run of the production model that wrote mine/mined_groups.json), "off", or the
    # path of such a file
    mined_groups: Annotated[str, BeforeValidator(_mined_groups)] = Field("latest", min_length=1)


# "estimated": the label-free "estimated degraded" state (patchd.monitor.estimate) opens a run
TriggerKind = Literal["degraded", "warning", "estimated"]


def _degraded_only() -> list[TriggerKind]:
    return ["degraded"]


class TriggerConfig(Section):
    enabled: bool = True
    on: list[TriggerKind] = Field(default_factory=_degraded_only)
    min_interval_s: float = Field(3600.0, ge=0)


class BudgetConfig(Section):
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    max_minutes: float = Field(30.0, gt=0)
    augment_epochs: int = Field(20, ge=1)
    samples_per_cell: int = Field(256, ge=1)


class FidelityConfig(Section):
    """When a run's subgroup translations are used (patchd.ml.fidelity; docs in the README).

    Every synthesize stage that produces paired translations measures them on the validation
    split; a class whose translations miss a threshold gets the identity instead, so the camel
    trainer drops its consistency term there and falls back to class-conditional Group DRO.
    """

    enabled: bool = True
    min_flip_rate: float = Field(0.8, ge=0, le=1)  # an independent group judge sees the target
    min_tttr: float = Field(0.75, ge=0, le=1)  # a judge trained on translations, tested on real
    min_class_kept_ratio: float = Field(0.9, ge=0, le=1)  # class kept / the real cell's figure
    judge_steps: int = Field(300, ge=10, le=100_000)
    keep_unmeasured: bool = True  # no reference groups (mined runs): keep, and say so


class PatchConfig(Section):
    miner: str = "subgroup"  # or "svm" (failure directions, Jain et al.), or "module:Class"
    augmenter: str = "none"  # none | maskpaste | cyclegan | diffusion | vae | module:Class
    trainer: str = "erm"  # erm | gdro | dfr | camel | defuse | module:Class
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-plugin hyperparameters
    seed: int = 0
    clip_checkpoint: ConfigPath | None = None  # local open_clip checkpoint for the miner (optional)
    diffusion_checkpoint: ConfigPath | None = None  # local Stable Diffusion directory (optional)
    queues: dict[str, str] = Field(default_factory=dict)  # stage -> queue name (default: patchd)
    stage_timeout_s: dict[str, int] = Field(default_factory=dict)
    retries: int = Field(2, ge=0, le=10)
    # pipeline (patchd.runs.component / patchd worker): poll tick, worker heartbeats,
    # torch threads per job
    poll_interval_s: float = Field(1.0, gt=0)
    job_monitoring_interval_s: int = Field(30, ge=1)  # worker heartbeat period while a job runs
    heartbeat_grace_s: int = Field(60, ge=2)  # a silent worker's job is abandoned after this
    torch_threads: int = Field(0, ge=0)  # 0 = half the cores (see workers.worker.default_threads)
    slice_limit: int = Field(50_000, ge=1)  # newest labeled events exported to a run

    @field_validator("params")
    @classmethod
    def _param_paths(
        cls, v: dict[str, dict[str, Any]], info: ValidationInfo
    ) -> dict[str, dict[str, Any]]:
        """Rebase the well-known path keys (:data:`PARAM_PATH_KEYS`) of each plugin's params."""
        out: dict[str, dict[str, Any]] = {}
        for plugin, params in v.items():
            out[plugin] = {
                k: str(_config_path(x, info)) if k in PARAM_PATH_KEYS and isinstance(x, str) else x
                for k, x in params.items()
            }
        return out


class GateConfig(Section):
    min_improvement: float = Field(0.02, ge=0, le=1)  # worst-group must rise at least this much
    avg_tolerance: float = Field(0.02, ge=0, le=1)  # average may fall at most this much
    confidence: float = Field(0.95, gt=0.5, lt=1)
    n_min: int = Field(20, ge=1)
    n_bootstrap: int = Field(2000, ge=100)
    auto_promote: bool = False
    approval_ttl_s: float = Field(7 * 86400.0, gt=0)


class HookConfig(Section):
    reload_urls: list[str] = Field(default_factory=list)
    command: list[str] = Field(default_factory=list)
    retries: int = Field(3, ge=0)
    timeout_s: float = Field(5.0, gt=0)


class StorageOptions(Section):
    """How to reach the bucket of an ``s3://`` root (unused for a local path).

    Credentials are never in the config: ``key_env``/``secret_env`` name environment variables,
    ``credentials_file`` a file whose first line is the access key id and second the secret;
    with neither, the standard AWS chain (``AWS_ACCESS_KEY_ID``, ``~/.aws``, an instance role).
    """

    endpoint_url: str | None = Field(None, pattern=r"^https?://")  # MinIO, Ceph, moto, ...
    region: str | None = None
    key_env: str | None = None  # e.g. S3_ACCESS_KEY_ID (not PATCHD_*: those set config fields)
    secret_env: str | None = None  # e.g. S3_SECRET_ACCESS_KEY
    credentials_file: ConfigPath | None = None
    anon: bool = False  # a public bucket, no credentials

    @model_validator(mode="after")
    def _key_and_secret_together(self) -> StorageOptions:
        if (self.key_env is None) != (self.secret_env is None):
            raise ValueError("key_env and secret_env go together: set both or neither")
        for name in (self.key_env, self.secret_env):
            if name is not None and name.upper().startswith(ENV_PREFIX):
                raise ValueError(
                    f"{name}: a {ENV_PREFIX}* variable is read as a config override; "
                    "name one outside that prefix (e.g. S3_ACCESS_KEY_ID)"
                )
        return self

    def s3fs_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``s3fs.S3FileSystem`` (credentials read now, not kept)."""
        kwargs: dict[str, Any] = {"anon": self.anon}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            kwargs["client_kwargs"] = {"region_name": self.region}
        key, secret = self._credentials()
        if key is not None:
            kwargs.update(key=key, secret=secret)
        return kwargs

    def _credentials(self) -> tuple[str | None, str | None]:
        if self.credentials_file is not None:
            try:
                lines = self.credentials_file.read_text().split()
            except OSError as err:
                raise ConfigError(
                    f"storage_options.credentials_file {self.credentials_file}: {err.strerror}"
                ) from None
            if len(lines) != 2:
                raise ConfigError(
                    f"storage_options.credentials_file {self.credentials_file} must hold two "
                    "lines: the access key id, then the secret"
                )
            return lines[0], lines[1]
        if self.key_env is None or self.secret_env is None:
            return None, None
        missing = [n for n in (self.key_env, self.secret_env) if not os.environ.get(n)]
        if missing:
            raise ConfigError(f"storage_options names {missing} but the environment has none")
        return os.environ[self.key_env], os.environ[self.secret_env]


class RegistryConfig(Section):
    # a directory, or s3://bucket/prefix (then files are cached under cache_dir)
    root: ConfigLocation | None = None  # default: <state_dir>/registry
    cache_dir: ConfigPath | None = None  # default: <state_dir>/cache/registry
    storage_options: StorageOptions = Field(default_factory=StorageOptions)
    keep_versions: int = Field(10, ge=1)
    hooks: HookConfig = Field(default_factory=HookConfig)


def _store_url(value: object) -> object:
    """``store.url``: None (SQLite at ``store.path``) or ``postgresql://[user[:pw]@]host[:port]/db``."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("must be a string such as postgresql://patchd@db.internal:5432/patchd")
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f"must start with postgresql:// or postgres:// (got {parts.scheme or 'no'} scheme); "
            "leave it unset for the embedded SQLite store at store.path"
        )
    if not parts.path.strip("/"):
        raise ValueError("names no database: use postgresql://user@host:5432/<database>")
    try:
        parts.port  # noqa: B018  (raises on a non-numeric port)
    except ValueError:
        raise ValueError("has a port that is not a number") from None
    return value


class StoreConfig(Section):
    path: ConfigPath | None = None  # default: <state_dir>/patchd.db
    # None: the embedded SQLite at ``path``; postgresql://user@host:5432/db: Postgres (the
    # password from the URL, PGPASSWORD / ~/.pgpass, or ``password_file``)
    url: Annotated[str | None, BeforeValidator(_store_url)] = None
    password_file: ConfigPath | None = None  # a file whose first line is the Postgres password
    batch_size: int = Field(5000, ge=1)
    flush_interval_s: float = Field(0.05, gt=0)
    retention_days: float = Field(30.0, gt=0)
    max_rows: int = Field(5_000_000, ge=1000)
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"  # FULL: durable across power loss, slower
    retention_interval_s: float = Field(300.0, gt=0)
    max_pending_labels: int = Field(1_000_000, ge=1)  # labels waiting for their prediction
    pending_label_ttl_s: float = Field(7 * 86400.0, gt=0)  # a waiting label expires after


class RedisConfig(Section):
    url: str = "redis://127.0.0.1:6379/0"
    embedded: Literal["auto", "never", "always"] = "auto"
    queue_prefix: str = "patchd"


class LeaderConfig(Section):
    """``leader``: which serve replica does the once-only duties (patchd.leader)."""

    # "auto": a lease when the store is PostgreSQL (``store.url``: where replicas share a store),
    # none with the embedded SQLite file (one serve, which then monitors with Redis down too);
    # true: a lease on any store (replicas sharing one SQLite file on one machine); false: this
    # replica always leads, no lease (run only one then)
    enabled: bool | Literal["auto"] = "auto"
    ttl_s: float = Field(5.0, ge=0.2, le=300)  # a dead leader is replaced within about this
    renew_interval_s: float | None = Field(None, gt=0)  # default ttl_s / 3
    key: str | None = None  # Redis key of the lease; default <redis.queue_prefix>:leader
    advertise_url: str | None = None  # the URL followers name in their 503s; default api

    def uses_lease(self, store_url: str | None) -> bool:
        """Whether this replica must hold the Redis lease to lead (see ``enabled``)."""
        return self.enabled is True or (self.enabled == "auto" and store_url is not None)

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> LeaderConfig:
        if self.renew_interval_s is not None and self.renew_interval_s >= self.ttl_s / 2:
            raise ValueError(
                f"renew_interval_s {self.renew_interval_s} must be below ttl_s / 2 "
                f"({self.ttl_s / 2}); leave it unset for ttl_s / 3"
            )
        return self


class ApiConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8321, ge=0, le=65535)
    allowed_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost", "[::1]"])
    token_file: ConfigPath | None = (
        None  # lines of `token scope[,scope]`; env PATCHD_TOKEN adds one admin
    )
    max_body_bytes: int = Field(16 << 20, ge=1024)
    ingest_queue_max: int = Field(200_000, ge=1)  # events waiting to be written (~300 B each)


class UiConfig(Section):
    enabled: bool = False  # the approval pages under /ui (patchd/ui/)
    anonymous_read: bool = False  # pages readable without logging in (actions still need a login)
    session_ttl_s: float = Field(8 * 3600.0, ge=60)  # a login lasts this long
    secure_cookie: bool = False  # set when serve is reached over HTTPS (a TLS proxy in front)
    public_url: str | None = None  # base URL people open (links in notifications); default api


NotifyOn = Literal["awaiting_approval", "fail", "inconclusive"]


def _awaiting_only() -> list[NotifyOn]:
    return ["awaiting_approval"]


class WebhookConfig(Section):
    url: str = Field(..., pattern=r"^https?://")
    format: Literal["slack", "generic"] = "generic"  # slack: an incoming-webhook message
    on: list[NotifyOn] = Field(default_factory=_awaiting_only)  # which gate outcomes notify
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(2, ge=0, le=10)


class NotifyConfig(Section):
    webhooks: list[WebhookConfig] = Field(default_factory=list)  # candidate notifications


class ArtifactsConfig(Section):
    # a directory, or s3://bucket/prefix (then files are cached under cache_dir)
    root: ConfigLocation | None = None  # default: <state_dir>/artifacts
    cache_dir: ConfigPath | None = None  # default: <state_dir>/cache/artifacts
    storage_options: StorageOptions = Field(default_factory=StorageOptions)
    # a run whose files (all stages) would pass this fails at the stage that passes it
    max_run_disk_mb: float | None = Field(10240.0, gt=0)  # None: unbounded
    # paired translations / synthesized samples on disk: uint8 (a pixel moves <= 1/510),
    # float16, or float32 (exact)
    augmentation_dtype: Literal["uint8", "float16", "float32"] = "uint8"


# Sections an entry of ``models:`` may override (deep-merged over the top-level section of the
# same name, which is the shared default); every other section belongs to the whole process.
MODEL_SECTIONS = ("groups", "data", "monitor", "trigger", "patch", "gate")


def _model_view(base: Mapping[str, Any], entry: object, index: int) -> dict[str, Any]:
    """The raw one-model config of ``models[index]``: ``base`` with the entry merged over it.

    An entry holds the ``model`` fields (name, factory, weights, class_names...) at its top level
    and optional overrides of :data:`MODEL_SECTIONS`.
    """
    where = f"models[{index}]"
    if isinstance(entry, BaseModel):
        return entry.model_dump()
    if (
        isinstance(entry, Mapping)
        and isinstance(entry.get("model"), Mapping)
        and "name" not in entry
    ):
        return dict(entry)  # already a one-model config (what ``model_dump`` writes)
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"{where} must be a mapping (name, factory, ...), got {type(entry).__name__}"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} needs a name (the `model` field events carry)")
    where = f"{where} ({name})"
    model_fields = set(ModelConfig.model_fields)
    unknown = sorted(str(k) for k in entry if k not in model_fields and k not in MODEL_SECTIONS)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; an entry takes the model "
            f"fields ({', '.join(sorted(model_fields))}) and overrides of the sections "
            f"{', '.join(MODEL_SECTIONS)}; other sections are shared by every model"
        )
    view = {k: v for k, v in base.items() if k != "models"}
    fields = {k: v for k, v in entry.items() if k in model_fields}
    view["model"] = _merge(dict(base.get("model") or {}), fields)
    for section in MODEL_SECTIONS:
        override = entry.get(section)
        if override is None:
            continue
        if not isinstance(override, Mapping):
            raise ValueError(
                f"{where}.{section} must be a mapping that overrides the top-level {section}, "
                f"got {type(override).__name__}"
            )
        view[section] = _merge(dict(base.get(section) or {}), override)
    return view


class Config(Section):
    state_dir: ConfigPath = Field(Path(".patchd"), validate_default=True)
    # set by load_config: the file this configuration was read from (SIGHUP and
    # `patchd config reload` make serve re-read it); None without a file
    config_file: ConfigPath | None = None
    log_level: str = "INFO"
    model: ModelConfig = Field(default_factory=ModelConfig)
    groups: GroupsConfig = Field(default_factory=GroupsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)
    patch: PatchConfig = Field(default_factory=PatchConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    leader: LeaderConfig = Field(default_factory=LeaderConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    ui: UiConfig = Field(default_factory=UiConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    # several models in one serve: each a one-model view (see :meth:`per_model`); empty: the one
    # model of the ``model`` section
    models: list[Config] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _expand_models(cls, data: Any) -> Any:
        """``models:`` entries become full one-model configs over the top-level sections."""
        if not isinstance(data, Mapping) or data.get("models") in (None, []):
            return data  # [] is what a one-model config dumps
        entries = data["models"]
        if not isinstance(entries, list):
            raise ValueError(
                "models must be a list of model sections "
                "(- name: ..., factory: ..., class_names: [...]); leave it out for one `model`"
            )
        base = {k: v for k, v in data.items() if k != "models"}
        return {**base, "models": [_model_view(base, e, i) for i, e in enumerate(entries)]}

    @model_validator(mode="after")
    def _unique_models(self) -> Config:
        names = [m.model.name for m in self.models]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(
                f"models: the name(s) {', '.join(map(repr, dups))} appear more than once"
            )
        return self

    @model_validator(mode="after")
    def _groups_bounded(self) -> Config:
        for attr, vals in self.groups.values.items():
            if attr not in self.groups.attributes:
                raise ValueError(f"groups.values has {attr!r}, which is not in groups.attributes")
            if len(vals) > self.groups.max_values:
                raise ValueError(f"groups.values.{attr} has {len(vals)} values > max_values")
        return self

    # The models this serve watches.
    def per_model(self) -> tuple[Config, ...]:
        """One plain one-model :class:`Config` per model (just this one without ``models:``)."""
        return tuple(self.models) if self.models else (self,)

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(c.model.name for c in self.per_model())

    @property
    def several_models(self) -> bool:
        return len(self.models) > 1

    def for_model(self, name: str | None) -> Config:
        """The one-model view of ``name``; None: the only model (several: an error naming them)."""
        views = self.per_model()
        if name is None:
            if len(views) == 1:
                return views[0]
            raise ConfigError(
                f"several models are configured ({', '.join(self.model_names)}); name one "
                "(--model, or /v1/models/<model>/...)"
            )
        for view in views:
            if view.model.name == name:
                return view
        raise ConfigError(
            f"unknown model {name!r}: this configuration has {', '.join(self.model_names)}"
        )

    # Resolved paths: every component asks here rather than joining state_dir itself.
    @property
    def store_path(self) -> Path:
        return self.store.path or self.state_dir / "patchd.db"

    # With an s3:// root, the *_root paths are the local caches (every file read or written
    # goes through them) and the *_url properties name the bucket that is the source of truth.
    @property
    def registry_root(self) -> Path:
        return _local(self.registry.root, self.registry.cache_dir, self.state_dir, "registry")

    @property
    def registry_url(self) -> str | None:
        return self.registry.root if isinstance(self.registry.root, str) else None

    @property
    def artifacts_root(self) -> Path:
        return _local(self.artifacts.root, self.artifacts.cache_dir, self.state_dir, "artifacts")

    @property
    def artifacts_url(self) -> str | None:
        return self.artifacts.root if isinstance(self.artifacts.root, str) else None


def _local(root: Path | str | None, cache: Path | None, state_dir: Path, name: str) -> Path:
    if isinstance(root, Path):
        return root
    if root is None:
        return state_dir / name
    return cache or state_dir / "cache" / name


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# PATCHD_* variables that are not config fields (secrets and the config path itself).
NON_CONFIG_ENV = frozenset({"PATCHD_TOKEN", "PATCHD_CONFIG"})


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``PATCHD_A__B=v`` → ``{"a": {"b": v}}`` with v parsed as a YAML scalar."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in NON_CONFIG_ENV:
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw else raw
    return out


def _where(loc: tuple[int | str, ...]) -> str:
    """``models.0.monitor.window`` as ``models[0].monitor.window``."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int) and i > 0 and loc[i - 1] == "models":
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def format_errors(err: PydanticValidationError) -> str:
    """One line per error: ``field.path: message (got value)``.

    A shared section's error is reported once, not again for each ``models`` entry's view."""
    lines = []
    errors = err.errors()
    top = {(tuple(e["loc"]), e["msg"]) for e in errors}
    for e in errors:
        loc = tuple(e["loc"])
        if len(loc) > 2 and loc[0] == "models" and (loc[2:], e["msg"]) in top:
            continue
        where = _where(loc)
        got = e.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
        lines.append(f"{where}: {e['msg']}{shown}")
    return "\n".join(lines)


def build_config(
    file_data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base_dir: Path | None = None,
) -> Config:
    """Layer defaults < file < environment < CLI overrides and validate once.

    With ``base_dir``, every relative path (whichever layer it came from) resolves against it.
    """
    data = _merge({}, file_data or {})
    data = _merge(data, env_overrides(environ or {}))
    data = _merge(data, overrides or {})
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except PydanticValidationError as err:
        raise ConfigError("invalid configuration:\n" + format_errors(err)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the YAML file (if any), apply ``PATCHD_*`` env and CLI overrides, validate.

    Relative paths resolve against the file's directory, also those set by ``PATCHD_*`` variables
    or ``overrides`` (one rule for a whole process: serve and workers agree wherever they start).
    """
    file_data = read_yaml(path) if path is not None else {}
    env = os.environ if environ is None else environ
    base_dir = path.parent.resolve() if path is not None else None
    if path is not None:
        overrides = {**(overrides or {}), "config_file": str(path.resolve())}
    return build_config(file_data, env, overrides, base_dir=base_dir)
