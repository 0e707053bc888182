"""The CLI's client for a running ``patchd serve`` (httpx, bearer token).

    client = ApiClient.from_config(config)
    status = client.get("/v1/status")
    client.post("/v1/runs", json={"reason": "manual"})

The token is ``PATCHD_TOKEN``, else the first token of ``api.token_file`` with the most scopes,
else ``<state_dir>/admin.token``. Failures raise :class:`ApiError` (a ``PatchdError``, so the CLI
prints one line and exits 1) with the HTTP status and serve's error message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import httpx

from patchd.api.auth import ADMIN_TOKEN_FILE, read_token_file
from patchd.config import Config
from patchd.exceptions import PatchdError


class ApiError(PatchdError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def scoped_path(model: str, path: str) -> str:
    """``/v1/<rest>`` of a model-scoped route as ``/v1/models/<model>/<rest>`` (serve answers
    both forms with one model, only this one with several)."""
    if not path.startswith("/v1/"):
        raise ValueError(f"a model-scoped route must start with /v1/, got {path!r}")
    return f"/v1/models/{model}/{path[len('/v1/') :]}"


def base_url(config: Config) -> str:
    host = config.api.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.api.port}"


def find_token(config: Config, environ: Mapping[str, str]) -> str | None:
    token = environ.get("PATCHD_TOKEN")
    if token:
        return token
    if config.api.token_file is not None and config.api.token_file.exists():
        entries = read_token_file(config.api.token_file)
        if entries:
            return max(entries, key=lambda e: len(e[1].scopes))[0]
    path = config.state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    return None


class ApiClient:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    @classmethod
    def from_config(
        cls, config: Config, environ: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> ApiClient:
        env = os.environ if environ is None else environ
        return cls(base_url(config), find_token(config, env), timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise ApiError(
                0,
                f"patchd serve is not reachable at {self.url} ({err}); start `patchd serve`",
            ) from None
        if response.status_code >= 400:
            raise _error(response, path)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()


def _error(response: httpx.Response, path: str) -> PatchdError:
    try:
        detail = response.json()
    except ValueError:
        detail = None
    message = response.text[:300]
    if isinstance(detail, dict):
        message = str(detail.get("error") or detail.get("detail") or message)
    hint = ""
    if response.status_code in (401, 403):
        hint = " (set PATCHD_TOKEN or api.token_file to a token with the right scope)"
    return ApiError(response.status_code, f"{path}: HTTP {response.status_code}: {message}{hint}")
