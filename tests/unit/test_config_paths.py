"""Relative paths in the config resolve against the config file's directory, not the cwd."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from patchd.config import Config, build_config, load_config
from patchd.exceptions import ConfigError


@pytest.fixture
def cfg_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The config file's directory; the process works elsewhere."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return (tmp_path / "cfg").resolve()


def load(cfg_dir: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = cfg_dir / "patchd.yaml"
    path.write_text(text)
    return load_config(path, environ or {})


# (field, YAML, getter): one case per path field
FIELDS: list[tuple[str, str, Callable[[Config], Any]]] = [
    ("state_dir", "state_dir: x\n", lambda c: c.state_dir),
    ("model.weights", "model: {weights: x}\n", lambda c: c.model.weights),
    ("data.train.root", "data: {train: {root: x}}\n", lambda c: c.data.train.root),
    ("data.train.csv", "data: {train: {csv: x}}\n", lambda c: c.data.train.csv),
    ("data.heldout.root", "data: {heldout: {root: x}}\n", lambda c: c.data.heldout.root),
    ("data.heldout.csv", "data: {heldout: {csv: x}}\n", lambda c: c.data.heldout.csv),
    (
        "sources.allowed_roots",
        "sources: {allowed_roots: [x]}\n",
        lambda c: c.sources.allowed_roots[0],
    ),
    ("patch.clip_checkpoint", "patch: {clip_checkpoint: x}\n", lambda c: c.patch.clip_checkpoint),
    (
        "patch.diffusion_checkpoint",
        "patch: {diffusion_checkpoint: x}\n",
        lambda c: c.patch.diffusion_checkpoint,
    ),
    ("registry.root", "registry: {root: x}\n", lambda c: c.registry.root),
    ("store.path", "store: {path: x}\n", lambda c: c.store.path),
    ("api.token_file", "api: {token_file: x}\n", lambda c: c.api.token_file),
    ("artifacts.root", "artifacts: {root: x}\n", lambda c: c.artifacts.root),
    (
        "patch.params.defuse.labels_file",
        "patch: {params: {defuse: {labels_file: x}}}\n",
        lambda c: Path(c.patch.params["defuse"]["labels_file"]),
    ),
]


@pytest.mark.parametrize(("field", "text", "get"), FIELDS, ids=[f[0] for f in FIELDS])
def test_relative_path_resolves_under_the_config_dir(
    cfg_dir: Path, field: str, text: str, get: Callable[[Config], Any]
) -> None:
    assert get(load(cfg_dir, text)) == cfg_dir / "x"


@pytest.mark.parametrize(("field", "text", "get"), FIELDS, ids=[f[0] for f in FIELDS])
def test_absolute_path_is_untouched(
    cfg_dir: Path, field: str, text: str, get: Callable[[Config], Any]
) -> None:
    absolute = "/srv/patchd/../data/x"  # not resolved either
    assert get(load(cfg_dir, text.replace("x", absolute))) == Path(absolute)


def test_tail_glob_resolves_under_the_config_dir(cfg_dir: Path) -> None:
    config = load(cfg_dir, "sources:\n  tail: [{glob: 'logs/*.jsonl'}, {glob: '/var/log/a*'}]\n")
    assert [t.glob for t in config.sources.tail] == [f"{cfg_dir}/logs/*.jsonl", "/var/log/a*"]


def test_dotted_relative_paths_are_normalised(cfg_dir: Path) -> None:
    config = load(cfg_dir, "store: {path: ./db/../patchd.db}\nstate_dir: ../state\n")
    assert config.store.path == cfg_dir / "patchd.db"
    assert config.state_dir == cfg_dir.parent / "state"


def test_home_is_expanded(cfg_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/op")
    config = load(cfg_dir, "model: {weights: ~/w.safetensors}\nsources: {tail: [{glob: ~/l/*}]}\n")
    assert config.model.weights == Path("/home/op/w.safetensors")
    assert config.sources.tail[0].glob == "/home/op/l/*"


def test_defaults_follow_the_config_dir(cfg_dir: Path) -> None:
    config = load(cfg_dir, "model: {name: m}\n")
    assert config.state_dir == cfg_dir / ".patchd"
    assert config.store_path == cfg_dir / ".patchd" / "patchd.db"
    assert config.registry_root == cfg_dir / ".patchd" / "registry"
    assert config.artifacts_root == cfg_dir / ".patchd" / "artifacts"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("store: {path: 'postgresql://u@db/patchd'}\n", "store.path"),
        ("sources: {tail: [{glob: 's3://bucket/*.jsonl'}]}\n", "sources.tail.0.glob"),
        ("artifacts: {cache_dir: 's3://bucket/cache'}\n", "artifacts.cache_dir"),
    ],
)
def test_a_url_in_a_path_field_is_a_config_error_naming_it(
    cfg_dir: Path, text: str, field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: .*not a URL"):
        load(cfg_dir, text)


@pytest.mark.parametrize(
    ("text", "field", "why"),
    [
        ("artifacts: {root: 'gs://bucket/a'}\n", "artifacts.root", "only s3:// URLs"),
        ("registry: {root: 'https://host/reg'}\n", "registry.root", "not https://"),
        ("registry: {root: 's3:///nobucket'}\n", "registry.root", r"s3://<bucket>"),
        ("artifacts: {root: 's3://k:s@bucket/a'}\n", "artifacts.root", "credentials go in"),
    ],
)
def test_an_unsupported_object_store_url_is_a_config_error_naming_it(
    cfg_dir: Path, text: str, field: str, why: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: .*{why}"):
        load(cfg_dir, text)


def test_an_s3_root_is_kept_as_a_url_and_the_cache_is_local(cfg_dir: Path) -> None:
    text = (
        "artifacts: {root: 's3://bucket/patchd/artifacts/', cache_dir: cache/a}\n"
        "registry: {root: 's3://bucket/registry', storage_options: "
        "{endpoint_url: 'http://127.0.0.1:9000', key_env: K, secret_env: S}}\n"
    )
    config = load(cfg_dir, text)
    assert config.artifacts_url == "s3://bucket/patchd/artifacts"
    assert config.artifacts_root == cfg_dir / "cache" / "a"
    assert config.registry_url == "s3://bucket/registry"
    assert config.registry_root == cfg_dir / ".patchd" / "cache" / "registry"
    assert config.registry.storage_options.endpoint_url == "http://127.0.0.1:9000"


def test_storage_credentials_come_from_the_named_environment_never_the_config(
    cfg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "artifacts: {root: 's3://b/a', storage_options: {key_env: K1, secret_env: S1}}\n"
    options = load(cfg_dir, text).artifacts.storage_options
    with pytest.raises(ConfigError, match=r"\['K1', 'S1'\]"):
        options.s3fs_kwargs()
    monkeypatch.setenv("K1", "id")
    monkeypatch.setenv("S1", "hunter2")
    assert options.s3fs_kwargs() == {"anon": False, "key": "id", "secret": "hunter2"}
    assert "hunter2" not in options.model_dump_json()


def test_url_fields_are_untouched(cfg_dir: Path) -> None:
    text = (
        "redis: {url: 'redis://cache:6379/1'}\n"
        "registry: {hooks: {reload_urls: ['http://serve/reload']}}\n"
        "model: {weights: w.safetensors}\n"
    )
    config = load(cfg_dir, text)
    assert config.redis.url == "redis://cache:6379/1"
    assert config.registry.hooks.reload_urls == ["http://serve/reload"]


def test_environment_paths_resolve_under_the_config_dir_too(cfg_dir: Path) -> None:
    env = {"PATCHD_STORE__PATH": "env.db", "PATCHD_STATE_DIR": "st", "PATCHD_MODEL__WEIGHTS": "/w"}
    config = load(cfg_dir, "store: {path: file.db}\n", env)
    assert config.store.path == cfg_dir / "env.db"  # the env value wins, same rule
    assert config.state_dir == cfg_dir / "st"
    assert config.model.weights == Path("/w")


def test_without_a_config_file_paths_stay_relative_to_the_cwd(cfg_dir: Path) -> None:
    config = load_config(None, {"PATCHD_STORE__PATH": "env.db", "PATCHD_STATE_DIR": "~/st"})
    assert config.store.path == Path("env.db")
    assert config.state_dir == Path("~/st").expanduser()


def test_a_loaded_config_revalidates_unchanged(cfg_dir: Path) -> None:
    """Workers rebuild the config from its dump (no base dir): the paths must not move."""
    config = load(cfg_dir, "store: {path: db}\nsources: {tail: [{glob: 'l/*'}]}\n")
    again = build_config(config.model_dump(mode="json"))
    assert again == config


def test_a_relative_config_path_is_anchored_too(
    cfg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cfg_dir / "patchd.yaml").write_text("store: {path: db}\n")
    monkeypatch.chdir(cfg_dir.parent)
    config = load_config(Path("cfg/patchd.yaml"), {})
    assert config.store.path == cfg_dir / "db"
