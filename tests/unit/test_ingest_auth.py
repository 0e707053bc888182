"""Tokens: env + file + generated admin token; constant-time comparison; scopes."""

from __future__ import annotations

import hmac
import stat
from pathlib import Path

import pytest

from patchd.api.auth import SCOPES, TokenStore, ensure_admin_token, read_token_file
from patchd.config import build_config
from patchd.exceptions import ConfigError


def test_env_and_file_tokens_with_scopes(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "# comment\nreadtoken-0123456789ab read grafana\ningesttoken-0123456789 ingest\n"
    )
    tokens.chmod(0o600)
    config = build_config({"state_dir": str(tmp_path), "api": {"token_file": str(tokens)}})
    store = TokenStore.from_config(config, {"PATCHD_TOKEN": "envtoken-0123456789abcdef"})
    assert store.authenticate("envtoken-0123456789abcdef").scopes == SCOPES  # type: ignore[union-attr]
    reader = store.authenticate("readtoken-0123456789ab")
    assert reader is not None and (reader.name, reader.scopes) == ("grafana", frozenset({"read"}))
    assert store.authenticate("ingesttoken-0123456789").name == "token3"  # type: ignore[union-attr]
    assert store.authenticate("readtoken-0123456789a") is None
    assert store.authenticate("") is None
    assert not (tmp_path / "admin.token").exists()


def test_comparison_is_constant_time_over_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("patchd.api.auth.hmac.compare_digest", spy)
    from patchd.api.auth import Principal

    store = TokenStore(
        [(f"token-{i}-0123456789abcdef", Principal(str(i), SCOPES)) for i in range(3)]
    )
    assert store.authenticate("token-0-0123456789abcdef") is not None
    assert len(calls) == 3  # no early exit on the first match
    calls.clear()
    assert store.authenticate("nope") is None
    assert len(calls) == 3


def test_generated_admin_token_is_private_and_stable(tmp_path: Path) -> None:
    config = build_config({"state_dir": str(tmp_path / "s")})
    first = TokenStore.from_config(config, {})
    path = tmp_path / "s" / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32 and first.authenticate(token) is not None
    assert ensure_admin_token(tmp_path / "s") == token


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("short read\n", "at least 16"),
        ("token-0123456789abcdef superuser\n", "unknown scope"),
        ("token-0123456789abcdef\n", "line 1: expected"),
    ],
)
def test_bad_token_file_lines_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=message):
        read_token_file(path)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o666])
def test_a_token_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "tokens"
    path.write_text("token-0123456789abcdef read\n")
    path.chmod(mode)
    with pytest.raises(ConfigError, match=rf"mode {mode:04o}: other accounts.*chmod 600"):
        read_token_file(path)
    path.chmod(0o640)  # group-readable by serve's own group (a Kubernetes 0440 Secret + fsGroup)
    assert [p.name for _, p in read_token_file(path)] == ["token1"]


def test_short_env_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PATCHD_TOKEN"):
        TokenStore.from_config(build_config({"state_dir": str(tmp_path)}), {"PATCHD_TOKEN": "abc"})
