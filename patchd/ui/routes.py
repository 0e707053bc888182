"""The ``/ui`` routes: login, models, runs, candidates (approve / reject), production (rollback),
and a run's Defuse failure regions (their sample grids, and a label or ``invalid`` per region).

Pages are server-rendered (Jinja2, autoescaped); forms POST ``application/x-www-form-urlencoded``
bodies with the session's CSRF token (:mod:`patchd.ui.session`) and answer with a 303 redirect.
Responses carry a CSP that allows scripts and styles from serve only (the report's inline styles
excepted), no framing, forms posting only here, and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from patchd.api.auth import TokenStore
from patchd.exceptions import ConflictError, NotFoundError, PatchdError, ValidationError
from patchd.promotion.audit import PERSON_PATTERN
from patchd.runs import regions as region_store
from patchd.ui import views
from patchd.ui.session import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    LOGIN_TTL_S,
    SESSION_COOKIE,
    Session,
    SessionStore,
    new_login_token,
    same_origin,
    tokens_match,
)

if TYPE_CHECKING:
    from jinja2 import Environment

    from patchd.config import MonitorConfig, UiConfig
    from patchd.monitor.component import MonitorComponent
    from patchd.promotion.component import CandidatesComponent
    from patchd.runs.artifacts import RunArtifacts
    from patchd.runs.component import RunsComponent
    from patchd.runs.records import RunRecord

log = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
MAX_FORM_BYTES = 16 << 10
NAV = {"candidate": "candidates"}  # template -> the menu entry it belongs to
# flash messages by code: a redirect carries the code, never user data
FLASH = {
    "approved": "Approved: production switched to this candidate.",
    "rejected": "Rejected: the candidate will not be promoted.",
    "rolled_back": "Rolled back: production is the previous version again.",
    "logged_out": "Logged out.",
    "labelled": "Label saved: the defuse trainer reads it when this run's train stage starts.",
    "resumed": "Labelling done: the run goes on to train with these labels.",
}


class UiBackend(Protocol):
    """What the routes need: settings, sessions, templates and the other components."""

    settings: UiConfig
    sessions: SessionStore
    allowed_origins: frozenset[str]
    model_names: tuple[str, ...]  # every model serve watches; lists cover them all
    artifacts_root: Path
    artifacts: RunArtifacts

    def templates(self) -> Environment: ...

    def monitor_config_of(self, model: str) -> MonitorConfig: ...

    def class_names_of(self, model: str) -> tuple[str, ...]: ...

    def candidates(self, model: str | None = None) -> CandidatesComponent: ...  # None: the first

    def runs(self, model: str | None = None) -> RunsComponent | None: ...

    def monitor(self, model: str | None = None) -> MonitorComponent | None: ...


class FormError(PatchdError):
    """A refused form: ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded body as single values (the first of a repeated field)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise FormError(413, f"form body over {MAX_FORM_BYTES} bytes")
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


def build_router(ui: UiBackend) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)
    static_dir = Path(__file__).with_name("static")
    static = {p.name: p.read_bytes() for p in static_dir.iterdir() if p.suffix in STATIC_TYPES}

    def session_of(request: Request) -> Session | None:
        return ui.sessions.get(request.cookies.get(SESSION_COOKIE))

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        session = ctx.pop("session", session_of(request))
        html = (
            ui.templates()
            .get_template(name)
            .render(
                session=session,
                flash=FLASH.get(request.query_params.get("msg", "")),
                model_names=ui.model_names,
                nav=NAV.get(Path(name).stem, Path(name).stem),
                **ctx,
            )
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def redirect(url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303, headers=HEADERS)

    def viewer(request: Request) -> Session | None | RedirectResponse:
        """The session; a redirect to the login page when reading needs one."""
        session = session_of(request)
        if session is None and not ui.settings.anonymous_read:
            return redirect("/ui/login")
        return session

    async def action(request: Request) -> tuple[Session, dict[str, str]]:
        """Checks of every state-changing form: same origin, a session that may approve, CSRF."""
        if not same_origin(request.headers, request.url.scheme, ui.allowed_origins):
            raise FormError(403, "refused: the form was posted from another origin")
        form = await read_form(request)
        session = session_of(request)
        if session is None:
            raise FormError(401, "your session expired or you are not logged in; log in again")
        if not tokens_match(form.get("csrf"), session.csrf):
            raise FormError(403, "refused: the form's CSRF token is missing or wrong")
        if not session.can_approve:
            raise FormError(403, f"{session.principal.name!r} may read but not approve")
        return session, form

    async def submit(
        request: Request,
        what: str,
        run: Callable[[Session, dict[str, str]], Any],
        failed: Callable[[Session, PatchdError, int], Response],
        done: str,
    ) -> Response:
        """A state-changing form: :func:`action`'s checks, then ``run``; a refusal of ``run``
        (conflict 409, not found 404, bad input 400) is answered by ``failed``, success by a 303
        to ``done``."""
        try:
            session, form = await action(request)
        except FormError as err:
            return refused(request, err)
        try:
            await run_in_threadpool(run, session, form)
        except (ConflictError, NotFoundError, ValidationError) as err:
            log.info("ui: %s by %s refused: %s", what, session.principal.name, err)
            status = (
                404
                if isinstance(err, NotFoundError)
                else 400
                if isinstance(err, ValidationError)
                else 409
            )
            return failed(session, err, status)
        return redirect(done)

    def refused(request: Request, err: FormError) -> HTMLResponse:
        log.warning("ui: %s %s refused (%d): %s", request.method, request.url.path, err.status, err)
        return page(request, "error.html", err.status, message=str(err), session=None)

    @router.get("")
    def root() -> RedirectResponse:
        return redirect("/ui/candidates")

    @router.get("/static/{name}")
    def static_file(name: str) -> Response:
        data = static.get(name)
        if data is None:
            return Response("not found", status_code=404)
        media = STATIC_TYPES[Path(name).suffix]
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=300"})

    # -- login ---------------------------------------------------------------------------------
    @router.get("/login")
    def login_form(request: Request) -> HTMLResponse:
        token = new_login_token()
        response = page(request, "login.html", login_csrf=token, error=None)
        _cookie(response, LOGIN_COOKIE, token, LOGIN_TTL_S, ui.settings.secure_cookie)
        return response

    @router.post("/login", response_model=None)
    async def login(request: Request) -> Response:
        try:
            if not same_origin(request.headers, request.url.scheme, ui.allowed_origins):
                raise FormError(403, "refused: the login form was posted from another origin")
            form = await read_form(request)
            if not tokens_match(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
                raise FormError(403, "the login form expired; reload the page and log in again")
        except FormError as err:
            return refused(request, err)
        tokens: TokenStore = request.app.state.tokens
        principal = tokens.authenticate(form.get("token", "").strip())
        person = form.get("name", "").strip()
        error = None
        if principal is None or not principal.scopes & {"read", "approve"}:
            why = "unknown token" if principal is None else "a token without read/approve scope"
            log.warning("ui: login refused from %s: %s", _client(request), why)
            error = "That token is not valid for these pages."
        elif person and not re.fullmatch(PERSON_PATTERN, person):
            error = "Your name must be 1-64 printable characters."
        if error is not None or principal is None:
            token = new_login_token()
            again = page(request, "login.html", 401, login_csrf=token, error=error, session=None)
            _cookie(again, LOGIN_COOKIE, token, LOGIN_TTL_S, ui.settings.secure_cookie)
            return again
        session_id, session = ui.sessions.create(principal, person=person)
        log.info("ui: %s logged in (scopes %s)", principal.name, ",".join(sorted(principal.scopes)))
        response = redirect("/ui/candidates")
        _cookie(
            response,
            SESSION_COOKIE,
            session_id,
            ui.settings.session_ttl_s,
            ui.settings.secure_cookie,
        )
        response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
        return response

    @router.post("/logout", response_model=None)
    async def logout(request: Request) -> Response:
        try:
            if not same_origin(request.headers, request.url.scheme, ui.allowed_origins):
                raise FormError(403, "refused: the form was posted from another origin")
            form = await read_form(request)
            session = session_of(request)
            if session is not None and not tokens_match(form.get("csrf"), session.csrf):
                raise FormError(403, "refused: the form's CSRF token is missing or wrong")
        except FormError as err:
            return refused(request, err)
        ui.sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = redirect("/ui/login?msg=logged_out")
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        return response

    # -- pages ---------------------------------------------------------------------------------
    @router.get("/models", response_model=None)
    def models(request: Request) -> Response:
        who = viewer(request)
        if isinstance(who, RedirectResponse):
            return who
        registry = ui.candidates().registry
        shown = [
            views.model_view(
                name, _snapshot(name), registry.pointer(name), ui.monitor_config_of(_known(name))
            )
            for name in _all_models(registry)
        ]
        return page(request, "models.html", session=who, models=shown, v=views)

    @router.get("/runs", response_model=None)
    def runs(request: Request) -> Response:
        who = viewer(request)
        if isinstance(who, RedirectResponse):
            return who
        records = [r for name in ui.model_names for r in _runs_of(name)]
        records.sort(key=lambda r: r.created_at, reverse=True)
        shown = [views.run_view(r) for r in records[:50]]
        with_regions = {r.record.id for r in shown if _has_regions(r.record.id)}
        return page(
            request, "runs.html", session=who, runs=shown, with_regions=with_regions, v=views
        )

    @router.get("/candidates", response_model=None)
    def candidates(request: Request) -> Response:
        who = viewer(request)
        if isinstance(who, RedirectResponse):
            return who
        listed = [c for name in ui.model_names for c in ui.candidates(name).list(limit=100)]
        listed.sort(key=lambda c: c.created_at, reverse=True)
        return page(request, "candidates.html", session=who, candidates=listed, v=views)

    @router.get("/candidates/{candidate_id}", response_model=None)
    def candidate(request: Request, candidate_id: str) -> Response:
        who = viewer(request)
        if isinstance(who, RedirectResponse):
            return who
        return _candidate_page(request, candidate_id, who)

    def _candidate_page(
        request: Request,
        candidate_id: str,
        who: Session | None,
        error: str | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        try:
            component = _candidates_holding(candidate_id)
            cand = component.get(candidate_id)
        except NotFoundError as err:
            return page(request, "error.html", 404, session=who, message=str(err))
        report = None
        if cand.gate is not None:
            try:
                report = component.report_fragment(candidate_id)
            except PatchdError as err:
                error = error or f"the report could not be built: {err}"
        return page(
            request,
            "candidate.html",
            status,
            session=who,
            c=cand,
            report=report,
            error=error,
            regions=_has_regions(cand.run_id),
            v=views,
        )

    def _has_regions(run_id: str) -> bool:
        try:
            return region_store.has_regions(region_store.run_dir(ui.artifacts_root, run_id))
        except (NotFoundError, ValidationError):
            return False

    @router.get("/runs/{run_id}/regions", response_model=None)
    def regions(request: Request, run_id: str) -> Response:
        who = viewer(request)
        if isinstance(who, RedirectResponse):
            return who
        return _regions_page(request, run_id, who)

    def _regions_page(
        request: Request,
        run_id: str,
        who: Session | None,
        error: str | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        try:
            ui.artifacts.fetch_regions(run_id)
            run = region_store.run_dir(ui.artifacts_root, run_id)
            record = _run_record(run_id)
            shown = views.regions_page(run, _class_names(record))
        except (NotFoundError, ValidationError) as err:
            code = 404 if isinstance(err, NotFoundError) else 400
            return page(request, "error.html", code, session=who, message=str(err))
        return page(
            request,
            "regions.html",
            status,
            session=who,
            p=shown,
            run=record,
            error=error,
            v=views,
        )

    def _run_record(run_id: str) -> RunRecord | None:
        component = ui.runs()  # runs of every model share one table: any model's reads it
        try:
            return component.get(run_id) if component is not None else None
        except NotFoundError:
            return None

    def _class_names(record: RunRecord | None) -> tuple[str, ...]:
        """The class names of the run's model (the first model's without a record)."""
        model = record.model if record is not None else ui.model_names[0]
        return ui.class_names_of(_known(model))

    def _known(model: str) -> str:
        """``model`` when serve watches it, else the first model (a registry-only model)."""
        return model if model in ui.model_names else ui.model_names[0]

    def _snapshot(model: str) -> Any:
        monitor = ui.monitor(model) if model in ui.model_names else None
        return monitor.snapshot if monitor is not None and monitor.model == model else None

    def _runs_of(model: str) -> list[RunRecord]:
        component = ui.runs(model)
        return component.list(model=model, limit=50) if component is not None else []

    def _all_models(registry: Any) -> list[str]:
        """The watched models in config order, then models only the registry knows."""
        extra = sorted(set(registry.models()) - set(ui.model_names))
        return [*ui.model_names, *extra]

    def _candidates_holding(candidate_id: str) -> CandidatesComponent:
        """The candidates component of the model a candidate belongs to."""
        cand = ui.candidates().get(candidate_id)  # one table: any model's component finds it
        return ui.candidates(_known(cand.model))

    @router.get("/runs/{run_id}/regions/{region}/grid.png", response_model=None)
    def region_grid(request: Request, run_id: str, region: int) -> Response:
        """The region's sample grid: only the PNG its run's ``regions.json`` names, inside the
        run's ``synthesize/`` folder; no path is taken from the request."""
        who = viewer(request)
        if isinstance(who, RedirectResponse):
            return who
        try:
            data = region_store.read_grid(region_store.run_dir(ui.artifacts_root, run_id), region)
        except (NotFoundError, ValidationError) as err:
            return Response(str(err), status_code=404, media_type="text/plain", headers=HEADERS)
        return Response(data, media_type="image/png", headers=HEADERS)

    @router.get("/production", response_model=None)
    def production(request: Request) -> Response:
        who = viewer(request)
        if isinstance(who, RedirectResponse):
            return who
        component = ui.candidates()
        entries = component.audit.read()
        shown = [
            (name, component.registry.pointer(name), views.history(entries, name))
            for name in _all_models(component.registry)
        ]
        return page(request, "production.html", session=who, models=shown, v=views)

    # -- actions -------------------------------------------------------------------------------
    async def decide(
        request: Request,
        candidate_id: str,
        verb: str,
        run: Callable[[Session, dict[str, str]], Any],
    ) -> Response:
        def failed(session: Session, err: PatchdError, status: int) -> Response:
            return _candidate_page(request, candidate_id, session, str(err), status)

        done = f"/ui/candidates/{candidate_id}?msg={verb}"
        return await submit(request, f"{verb} of {candidate_id}", run, failed, done)

    @router.post("/candidates/{candidate_id}/approve", response_model=None)
    async def approve(request: Request, candidate_id: str) -> Response:
        def run(session: Session, form: dict[str, str]) -> None:
            _candidates_holding(candidate_id).approve(
                candidate_id, form.get("digest", ""), session.actor
            )

        return await decide(request, candidate_id, "approved", run)

    @router.post("/candidates/{candidate_id}/reject", response_model=None)
    async def reject(request: Request, candidate_id: str) -> Response:
        def run(session: Session, form: dict[str, str]) -> None:
            reason = form.get("reason", "")[:1000]
            _candidates_holding(candidate_id).reject(candidate_id, session.actor, reason)

        return await decide(request, candidate_id, "rejected", run)

    @router.post("/runs/{run_id}/regions/{region}/label", response_model=None)
    async def label_region(request: Request, run_id: str, region: str) -> Response:
        """One region's label (a class or ``invalid``), recorded as the session's actor, as
        ``patchd regions RUN --label REGION=CLASS --by NAME`` does."""

        def run(session: Session, form: dict[str, str]) -> None:
            ui.artifacts.fetch_regions(run_id)  # labels given elsewhere (a bucket)
            path = region_store.run_dir(ui.artifacts_root, run_id)
            label = form.get("label", "")
            region_store.set_labels(
                path, {region: label}, session.actor, _class_names(_run_record(run_id))
            )
            ui.artifacts.publish_labels(run_id)
            log.info("ui: %s labelled run %r region %s %r", session.actor, run_id, region, label)

        def failed(session: Session, err: PatchdError, status: int) -> Response:
            return _regions_page(request, run_id, session, str(err), status)

        done = f"/ui/runs/{quote(run_id, safe='')}/regions?msg=labelled#region-{quote(region)}"
        what = f"label of run {run_id!r} region {region!r}"
        return await submit(request, what, run, failed, done)

    @router.post("/runs/{run_id}/regions/done", response_model=None)
    async def labels_done(request: Request, run_id: str) -> Response:
        """ "Labels done, train": resume a run awaiting labels, recorded as the session's actor,
        as ``patchd regions RUN --done`` does."""

        def run(session: Session, form: dict[str, str]) -> None:
            record = _run_record(run_id)
            component = ui.runs(_known(record.model) if record is not None else None)
            if component is None:
                raise ConflictError("this serve does not run patch runs; nothing to resume")
            component.resume(run_id, session.actor)
            log.info("ui: %s resumed run %r after labelling", session.actor, run_id)

        def failed(session: Session, err: PatchdError, status: int) -> Response:
            return _regions_page(request, run_id, session, str(err), status)

        done = f"/ui/runs/{quote(run_id, safe='')}/regions?msg=resumed"
        return await submit(request, f"resume of run {run_id!r}", run, failed, done)

    @router.post("/production/{model}/rollback", response_model=None)
    async def rollback(request: Request, model: str) -> Response:
        try:
            session, form = await action(request)
        except FormError as err:
            return refused(request, err)
        digest = form.get("digest") or None
        try:
            await run_in_threadpool(
                ui.candidates(_known(model)).rollback, model, session.actor, digest
            )
        except (ConflictError, NotFoundError) as err:
            return page(request, "error.html", 409, session=session, message=str(err))
        return redirect("/ui/production?msg=rolled_back")

    return router


def _cookie(response: Response, name: str, value: str, ttl: float, secure: bool) -> None:
    response.set_cookie(
        name,
        value,
        max_age=int(ttl),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=secure,
    )


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


__all__ = ["CSP", "UiBackend", "build_router"]
