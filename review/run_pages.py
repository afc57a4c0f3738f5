"""Runs from the browser: ``/runs`` (the list), ``/runs/new`` (upload a brief, see its problems and plan, start it),
``/runs/{id}`` (live progress, cancel, re-run of failures) and ``/runs/{id}/brief`` (the stored brief again).

The pages call :mod:`review.submissions`, the same functions the REST API (``/api/v1``) calls, so a brief checked
here gets the same problems and plan as ``adforge plan`` and a run started here is the API's run id. Every page
works without JavaScript (plain forms that post and redirect); ``static/runs.js`` adds the drop zone and the run
page's live updates, which poll ``GET /api/v1/runs/{id}``.

Between the upload and "Start" the uploaded file waits under ``<briefs dir>/pending/<sha256>`` (content-addressed:
the client's file name is never a path) and the session remembers which file and name this user uploaded, so that
the Start form carries only the hash. The Start form also carries an idempotency key made at upload time: a
double click or a re-sent form starts one run, not two.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, Response
from sqlalchemy import select

from review.ids import Id
from review.middleware import LimitedRoute, human_size
from review.pages import back, flash, render
from review.security import CurrentUser, current_user, require_role
from review.submissions import (SubmissionError, brief_download, cancel_submission, check_brief, get_submission,
                                list_submissions, rerun_failures, submission_assets, submit_brief)
from storage.run_metrics import run_metrics
from storage.schema import Run

__all__ = ["router"]

router = APIRouter(route_class=LimitedRoute)
Viewer = Annotated[CurrentUser, Depends(current_user)]
Reviewer = Annotated[CurrentUser, Depends(require_role("reviewer"))]

LIST_LIMIT = 50  # runs on the list page, newest first
PAGE_THUMBS = 200  # thumbnails the run page renders itself; newer ones arrive through the live updates
PENDING_HOURS = 24  # an upload nobody started is deleted after this long
BRIEF_SUFFIXES = (".csv", ".xlsx")
_SHA = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


# ------------------------------------------------------------------------------------------------ helpers


def when(value: str | dt.datetime | None) -> str:
    """An API timestamp ("2026-01-02T03:04:05Z") or a datetime as "2026-01-02 03:04:05 UTC"; "—" for none."""
    if value is None:
        return "—"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


def backend_text(backend: str | None) -> str:
    """What the page says about where a run goes: the configured Prefect deployment, else this machine's worker."""
    if backend and backend.startswith("prefect:"):
        return f"Prefect deployment {backend.removeprefix('prefect:')}"
    return "local worker on this machine"


def money(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _briefs_dir(request: Request) -> Path:
    runs = getattr(request.app.state, "runs", None)  # review.run_launcher.RunContext: where submissions keep briefs
    if runs is not None:
        return Path(runs.briefs_dir)
    return Path(getattr(request.app.state.config, "briefs_dir", None) or "./adforge-data/briefs")


def _pending_dir(request: Request) -> Path:
    return _briefs_dir(request) / "pending"


def _stash(request: Request, data: bytes, sha256: str) -> None:
    """Keep an uploaded brief until its Start (atomically: a half-written file is never read as a brief)."""
    folder = _pending_dir(request)
    folder.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - PENDING_HOURS * 3600
    for old in folder.iterdir():  # uploads nobody started
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass
    target = folder / sha256
    tmp = folder / f".{sha256}.{secrets.token_hex(4)}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _options(strict: str | None, steps: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if strict in ("1", "on", "true"):
        options["strict"] = True
    if steps and steps.strip():
        options["steps"] = steps.strip()  # review.submissions coerces and range-checks it (one clear error)
    return options


def _new_page(request: Request, *, check: dict | None = None, error: SubmissionError | str | None = None,
              options: dict[str, Any] | None = None, status: int = 200) -> Response:
    pending = request.session.get("pending_brief") if check and check.get("ok") else None
    problems = _shown_problems((check or {}).get("problems") or [])
    if isinstance(error, SubmissionError):
        problems = problems or _shown_problems(error.problems or [])
        message = error.message
    else:
        message = error
    return render(request, "run_new.html", {
        "check": check, "problems": problems, "warnings": _shown_problems((check or {}).get("warnings") or []),
        "error": message, "pending": pending, "options": options or {},
        "backend": backend_text((check or {}).get("backend") or _configured_backend(request)),
        "max_upload": human_size(request.app.state.config.max_upload_bytes),
    }, status=status)


def _configured_backend(request: Request) -> str:
    runs = getattr(request.app.state, "runs", None)
    return runs.backend if runs is not None else "local"


# ------------------------------------------------------------------------------------------------ new run


@router.get("/runs/new")
def new_run_page(request: Request, user: Reviewer) -> Response:
    return _new_page(request)


@router.post("/runs/new")
async def new_run_check(request: Request, user: Reviewer, file: Annotated[UploadFile, File()],
                        strict: Annotated[str | None, Form()] = None,
                        steps: Annotated[str | None, Form()] = None) -> Response:
    """The upload: validate and plan (nothing starts), keep the file for Start, show problems and plan."""
    options = _options(strict, steps)
    name = file.filename or ""  # review.brief_check makes it safe (and refuses other types); never used as a path
    data = await file.read()  # within the upload cap (BodyLimit), spooled by Starlette
    try:
        check = await _threaded(check_brief, request.app.state, data, name, options)
    except SubmissionError as exc:
        return _new_page(request, error=exc, options=options, status=exc.status)
    if check.get("ok"):
        sha256 = str(check.get("sha256") or "")
        if _SHA.fullmatch(sha256):
            await _threaded(_stash, request, data, sha256)
            request.session["pending_brief"] = {"sha256": sha256, "name": str(check.get("file") or "brief.csv"),
                                                "key": secrets.token_urlsafe(16), "options": options}
    return _new_page(request, check=check, options=options, status=200 if check.get("ok") else 422)


@router.post("/runs/start")
def start_run(request: Request, user: Reviewer, sha256: Annotated[str, Form()]) -> Response:
    pending = request.session.get("pending_brief")
    if not isinstance(pending, dict) or pending.get("sha256") != sha256 or not _SHA.fullmatch(sha256):
        return _new_page(request, error="brief: this upload is no longer waiting to start; upload it again", status=409)
    path = _pending_dir(request) / sha256
    try:
        data = path.read_bytes()
    except OSError:
        request.session.pop("pending_brief", None)
        return _new_page(request, error="brief: the uploaded file has expired; upload it again", status=409)
    try:
        submission, _created = submit_brief(request.app.state, data, str(pending.get("name") or "brief.csv"),
                                            dict(pending.get("options") or {}), user=user,
                                            idempotency_key=str(pending.get("key") or "") or None)
    except SubmissionError as exc:
        return _new_page(request, error=exc, options=dict(pending.get("options") or {}), status=exc.status)
    request.session.pop("pending_brief", None)
    try:
        path.unlink()  # submit_brief stored its own copy under the briefs folder
    except OSError:
        pass
    flash(request, f"Run {submission['id']} started ({backend_text(submission.get('backend'))}).")
    return back(f"/runs/{submission['id']}")


async def _threaded(fn: Any, *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


# ------------------------------------------------------------------------------------------------ one run


def _submission(request: Request, submission_id: int) -> dict:
    try:
        found = get_submission(request.app.state, submission_id)
    except SubmissionError as exc:
        raise HTTPException(exc.status, exc.message) from None
    if found is None:
        raise HTTPException(404, f"no run {submission_id}")
    return found


@router.get("/runs/{submission_id}")
def run_page(request: Request, submission_id: Id, user: Viewer) -> Response:
    sub = _submission(request, submission_id)
    try:
        assets = submission_assets(request.app.state, submission_id, page=1, per_page=PAGE_THUMBS)
    except SubmissionError:
        assets = {"assets": [], "total": 0, "withheld": 0}
    campaigns = _campaign_links(request, sub.get("run_id"))
    return render(request, "run.html", {
        "sub": sub, "assets": list(reversed(assets.get("assets") or [])), "asset_total": assets.get("total", 0),
        "withheld": assets.get("withheld", 0),
        "campaigns": campaigns, "backend": backend_text(sub.get("backend")), "when": when, "duration": duration,
        "money": money, "skipped_rows": _skipped_rows(request, sub),
    })


def _campaign_links(request: Request, run_id: int | None) -> list[tuple[int, str]]:
    """The campaigns a run rendered for (the gallery links): from its recorded variants."""
    if not run_id:
        return []
    from storage.schema import BriefRowRecord, Campaign, Variant

    with request.app.state.db.session() as s:
        query = (select(Campaign.id, Campaign.name).join(BriefRowRecord, BriefRowRecord.campaign_id == Campaign.id)
                 .join(Variant, Variant.row_id == BriefRowRecord.id)
                 .where(Variant.first_run_id == run_id).distinct().order_by(Campaign.name))
        found = [(cid, name) for cid, name in s.execute(query)]
        if not found:  # a re-run that rendered nothing new still belongs to the brief's campaigns
            run = s.get(Run, run_id)
            if run is not None and run.brief_id is not None:
                query = (select(Campaign.id, Campaign.name).join(BriefRowRecord, BriefRowRecord.campaign_id == Campaign.id)
                         .where(BriefRowRecord.brief_id == run.brief_id).distinct().order_by(Campaign.name))
                found = [(cid, name) for cid, name in s.execute(query)]
    return found


def _skipped_rows(request: Request, sub: dict) -> list[dict]:
    """The brief's problems the run skipped rows for, as the upload showed them: from the stored plan when it kept
    them, else the stored brief checked again (the same check as the upload; remembered per run in this process)."""
    plan = sub.get("plan") or {}
    if isinstance(plan, dict) and isinstance(plan.get("problems"), list):
        return _shown_problems(plan["problems"])
    state = request.app.state
    cache: dict[int, list[dict]] | None = getattr(state, "run_page_problems", None)
    if cache is None:
        cache = state.run_page_problems = {}
    if sub["id"] not in cache:
        try:
            path, name = brief_download(state, sub["id"])
            check = check_brief(state, path.read_bytes(), name, dict(sub.get("options") or {}))
        except (SubmissionError, OSError):
            return []  # the brief is gone or the settings changed: the page shows the counts without the rows
        if len(cache) > 256:
            cache.clear()
        cache[sub["id"]] = _shown_problems(check.get("problems") or [])
    return cache[sub["id"]]


def _shown_problems(problems: list) -> list[dict]:
    """Problems as the page shows them: the file by its name only (never a folder of the server's)."""
    out = []
    for p in problems:
        if isinstance(p, dict):
            file = p.get("file")
            out.append({**p, "file": re.split(r"[\\/]", file)[-1] if isinstance(file, str) else file})
    return out


@router.get("/runs/{submission_id}/brief")
def run_brief(request: Request, submission_id: Id, user: Viewer) -> Response:
    try:
        path, name = brief_download(request.app.state, submission_id)
    except SubmissionError as exc:
        raise HTTPException(exc.status, exc.message) from None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "brief"
    if not safe.lower().endswith(BRIEF_SUFFIXES):
        safe += Path(path).suffix if Path(path).suffix.lower() in BRIEF_SUFFIXES else ".csv"
    media = ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" if safe.lower().endswith(".xlsx")
             else "text/csv; charset=utf-8")
    return FileResponse(path, media_type=media, content_disposition_type="attachment", filename=safe,
                        headers={"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"})


@router.post("/runs/{submission_id}/cancel")
def run_cancel(request: Request, submission_id: Id, user: Reviewer) -> Response:
    try:
        cancel_submission(request.app.state, submission_id, user=user)
    except SubmissionError as exc:
        if exc.status == 404:
            raise HTTPException(404, exc.message) from None
        flash(request, exc.message, "error")
        return back(f"/runs/{submission_id}")
    flash(request, f"Run {submission_id} cancelled.")
    return back(f"/runs/{submission_id}")


@router.post("/runs/{submission_id}/rerun")
def run_rerun(request: Request, submission_id: Id, user: Reviewer) -> Response:
    try:
        new, created = rerun_failures(request.app.state, submission_id, user=user)
    except SubmissionError as exc:
        if exc.status == 404:
            raise HTTPException(404, exc.message) from None
        flash(request, exc.message, "error")
        return back(f"/runs/{submission_id}")
    flash(request, f"Run {new['id']} started: the brief of run {submission_id} again (what exists is skipped)."
          if created else f"Run {new['id']} already runs the brief of run {submission_id} again.")
    return back(f"/runs/{new['id']}")


# ------------------------------------------------------------------------------------------------ the list


@router.get("/runs")
def runs_page(request: Request, user: Viewer) -> Response:
    state = request.app.state
    try:
        submissions = list_submissions(state, limit=LIST_LIMIT)
    except SubmissionError as exc:
        raise HTTPException(exc.status, exc.message) from None
    return render(request, "runs.html", {"submissions": submissions, "cli_runs": _cli_runs(request, submissions),
                                         "when": when, "duration": duration, "money": money,
                                         "backend_text": backend_text})


def _cli_runs(request: Request, submissions: list[dict]) -> list[dict]:
    """Runs started from the ``adforge`` command (or a deployment directly): runs rows no submission started."""
    linked = getattr(Run, "submission_id", None)
    known = {s.get("run_id") for s in submissions if s.get("run_id")}
    state = request.app.state
    with state.db.session() as s:
        query = select(Run).order_by(Run.id.desc()).limit(LIST_LIMIT)
        if linked is not None:
            query = query.where(linked.is_(None))
        runs = [r for r in s.scalars(query) if r.id not in known]
        metrics = run_metrics(s, run_ids=[r.id for r in runs], price=state.price_per_device_hour) if runs else []
        figures = {m.run_id: m for m in metrics}
        out = []
        for r in runs:
            m = figures.get(r.id)
            counts = r.counts or {}
            out.append({"id": r.id, "status": r.status, "brief": Path(r.brief_path or "").name or "—",
                        "started_at": r.started_at, "campaigns": m.campaigns if m else (),
                        "done": m.figures.delivered if m else counts.get("rendered", 0),
                        "skipped": counts.get("skipped", 0),
                        "failed": m.figures.failed if m else counts.get("failed", 0),
                        "flagged": m.figures.flagged if m else 0,
                        "duration": m.figures.wall_seconds if m else None, "cost": m.figures.cost if m else None})
    return out
