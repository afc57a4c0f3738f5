"""Runs started from the web and the REST API: check and plan an upload, submit it, read its status, cancel it,
re-run its failures. The web pages and ``/api/v1`` both call these (see /tmp/issue25_interface.md for the shapes).

A submission keeps its brief under ``<briefs_dir>/<sha256>/<safe name>`` (content-addressed: the same file uploaded
twice is stored once), the whitelisted options and the plan shown before start. It is launched at once (local
worker or Prefect deployment, :mod:`review.run_launcher`); its status follows the run the flow records
(``runs.submission_id``) and the worker's exit. Submitting and cancelling are audited with the user as actor.
Idempotency: a second submit by the same user with the same ``Idempotency-Key`` returns the first submission when
the brief, options and webhook are the same, and is refused (409) when they differ.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from review.auth import has_role
from review.brief_check import CheckError, check_upload, clean_options, safe_brief_name
from review.run_launcher import LaunchError, RunContext
from review.security import CurrentUser
from review.submission_views import TERMINAL, assets_page, run_of, submission_json
from review.webhooks import WebhookError, check_url, send_in_background
from storage.database import audit
from storage.review_schema import Submission
from storage.schema import utcnow

__all__ = ["SubmissionError", "brief_download", "cancel_submission", "check_brief", "get_submission",
           "list_submissions", "rerun_failures", "run_context", "submission_assets", "submit_brief"]

SYSTEM_ACTOR = "system:gallery"
_KEY_CHARS = 255


class SubmissionError(Exception):
    def __init__(self, status: int, code: str, message: str, problems: list[dict] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.problems = status, code, message, problems or []


def _ctx(state: Any) -> RunContext:
    return state.runs


def _settings(state: Any, options: dict[str, Any]):
    from flows.settings import SettingsError

    try:
        return _ctx(state).settings(options)
    except SettingsError as exc:
        raise SubmissionError(422, "invalid_option", str(exc)) from None


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return clean_options(options)
    except CheckError as exc:
        raise SubmissionError(exc.status, exc.code, exc.message) from None


def check_brief(state: Any, data: bytes, filename: str, options: dict | None = None) -> dict:
    opts = _options(options)
    settings = _settings(state, opts)
    try:
        return check_upload(data, filename, settings, state.db, strict=bool(opts.get("strict")),
                            price=settings.price_per_device_hour or _ctx(state).price_per_device_hour,
                            backend=_ctx(state).backend)
    except CheckError as exc:
        raise SubmissionError(exc.status, exc.code, exc.message, exc.problems) from None


def _need_reviewer(user: CurrentUser, what: str) -> None:
    if not has_role(user.role, "reviewer"):
        raise SubmissionError(403, "forbidden_role", f"{what} needs the reviewer role; {user.name} is a {user.role}")


def _store_brief(state: Any, data: bytes, name: str, sha: str) -> Path:
    folder = _ctx(state).briefs_dir / sha
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def _replay(s: Any, user: str, key: str) -> Submission | None:
    return s.scalar(select(Submission).where(Submission.submitted_by == user, Submission.idempotency_key == key))


def _same_request(sub: Submission, sha: str, opts: dict, webhook_url: str | None) -> bool:
    return sub.brief_sha256 == sha and (sub.options or {}) == opts and sub.webhook_url == webhook_url


def submit_brief(state: Any, data: bytes, filename: str, options: dict | None, *, user: CurrentUser,
                 idempotency_key: str | None = None, webhook_url: str | None = None,
                 token_id: int | None = None) -> tuple[dict, bool]:
    _need_reviewer(user, "starting a run")
    opts = _options(options)
    if idempotency_key is not None and not (0 < len(idempotency_key) <= _KEY_CHARS and idempotency_key.isprintable()):
        raise SubmissionError(422, "invalid_idempotency_key", f"Idempotency-Key: 1-{_KEY_CHARS} printable characters")
    if webhook_url:
        if not _ctx(state).webhook_secret:
            raise SubmissionError(422, "webhooks_disabled",
                                  "webhook_url given but this gallery has no webhook_secret configured")
        try:
            webhook_url = check_url(webhook_url)
        except WebhookError as exc:
            raise SubmissionError(422, "invalid_webhook_url", str(exc)) from None
    else:
        webhook_url = None
    sha = hashlib.sha256(data).hexdigest()
    if idempotency_key is not None:
        with state.db.session() as s:
            found = _replay(s, user.name, idempotency_key)
            if found is not None:
                if not _same_request(found, sha, opts, webhook_url):
                    raise SubmissionError(409, "idempotency_conflict", "this Idempotency-Key was used for a different "
                                          f"request (submission {found.id}); use a new key for a new run")
                return submission_json(state, s, found), False
    check = check_brief(state, data, filename, opts)
    if not check["ok"]:
        raise SubmissionError(422, "invalid_brief", f"the brief has {len(check['problems'])} problem(s); nothing was "
                              "started", check["problems"])
    with state.db.session() as s:
        active = s.scalar(select(func.count(Submission.id)).where(Submission.submitted_by == user.name,
                                                                  Submission.status.in_(("queued", "running")))) or 0
    if active >= state.config.max_submissions_running:
        raise SubmissionError(429, "too_many_running", f"{user.name} has {active} run(s) queued or running (limit "
                              f"{state.config.max_submissions_running}); wait for one to finish")
    path = _store_brief(state, data, check["file"], sha)
    try:
        with state.db.session() as s:
            sub = Submission(brief_name=check["file"], brief_sha256=sha, brief_path=os.fspath(path), options=opts,
                             plan=check["plan"] or {}, submitted_by=user.name, token_id=token_id,
                             idempotency_key=idempotency_key, status="queued", backend=_ctx(state).backend,
                             webhook_url=webhook_url)
            s.add(sub)
            s.flush()
            sub_id = sub.id
            audit(s, actor=user.name, action="submission.created", entity="submission", entity_id=sub_id,
                  after={"brief": check["file"], "sha256": sha, "options": opts, "backend": sub.backend,
                         "images": (check["plan"] or {}).get("images"), "via": "token" if token_id else "web",
                         "webhook": bool(webhook_url)})
    except IntegrityError:  # a parallel request with the same key won the race: answer with its submission
        with state.db.session() as s:
            found = _replay(s, user.name, idempotency_key or "")
            if found is None:
                raise
            if not _same_request(found, sha, opts, webhook_url):
                raise SubmissionError(409, "idempotency_conflict", "this Idempotency-Key was used for a different "
                                      f"request (submission {found.id})") from None
            return submission_json(state, s, found), False
    _launch(state, sub_id, path, opts)
    return get_submission(state, sub_id) or {}, True


def _launch(state: Any, sub_id: int, path: Path, opts: dict) -> None:
    ctx = _ctx(state)
    try:
        launched = ctx.launch(sub_id, path, opts, lambda i, code: finalize(state, i, code))
    except LaunchError as exc:
        with state.db.session() as s:
            s.execute(update(Submission).where(Submission.id == sub_id).values(
                status="failed", error=str(exc), finished_at=utcnow()))
        return
    with state.db.session() as s:
        sub = s.get(Submission, sub_id)
        sub.pid, sub.host, sub.flow_run_id = launched.pid, launched.host, launched.flow_run_id  # type: ignore[union-attr]
        sub.started_at = utcnow()  # type: ignore[union-attr]
        if sub.status == "queued":  # type: ignore[union-attr]  (a fast worker may have finished already)
            sub.status = "running" if launched.pid else "queued"  # type: ignore[union-attr]


def _log_tail(state: Any, sub: Submission, lines: int = 6) -> str:
    path = _ctx(state).log_file(Path(sub.brief_path), sub.id)
    try:
        text = path.read_bytes()[-8000:].decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("━─-=│ ")]
    return "\n".join(kept[-lines:])[:2000]


def finalize(state: Any, sub_id: int, exit_code: int | None) -> bool:
    """Record a submission's end (the worker exited, the flow run finished, or its process is found gone); True if
    this call recorded it (then the webhook goes out), False if it had been recorded already."""
    with state.db.session() as s:
        sub = s.get(Submission, sub_id)
        if sub is None or sub.finished_at is not None:
            return False
        run = run_of(s, sub)
        error = None
        finished = run is not None and run.status in ("completed", "completed_with_failures")
        if sub.cancel_requested_at is not None and not finished:  # a run that ended before the cancel keeps its end
            status = "cancelled"
        elif run is not None and run.status in ("completed", "completed_with_failures", "failed"):
            status, error = run.status, run.error
        elif exit_code == 0:
            status = "completed"
        else:
            status = "failed"
            error = _log_tail(state, sub) or (f"the worker exited with code {exit_code}" if exit_code is not None
                                              else "the worker's process is gone")
        # Killed before it could record its end; or it recorded the signal that stopped it as a failure.
        if run is not None and (run.status == "running" or (status == "cancelled" and run.status in ("failed", "crashed"))):
            before = run.status
            run.status = "cancelled" if status == "cancelled" else "crashed"
            run.finished_at = run.finished_at or utcnow()
            audit(s, actor=SYSTEM_ACTOR, action=f"run.{run.status}", entity="run", entity_id=run.id, run_id=run.id,
                  before={"status": before}, after={"status": run.status, "submission_id": sub.id})
        done = s.execute(update(Submission).where(Submission.id == sub_id, Submission.finished_at.is_(None)).values(
            status=status, error=error, finished_at=utcnow(), run_id=run.id if run is not None else sub.run_id))
        if not done.rowcount:
            return False
        # "finished" whatever the status: a cancel is audited once, by the user who asked (cancel_submission).
        audit(s, actor=SYSTEM_ACTOR, action="submission.finished", entity="submission", entity_id=sub_id,
              run_id=run.id if run is not None else None, before={"status": sub.status}, after={"status": status})
        webhook = sub.webhook_url
    if webhook and _ctx(state).webhook_secret:
        _send_webhook(state, sub_id, webhook)
    return True


def _send_webhook(state: Any, sub_id: int, url: str) -> None:
    with state.db.session() as s:
        sub = s.get(Submission, sub_id)
        body = submission_json(state, s, sub, full=False)  # type: ignore[arg-type]
    payload = {"event": "run.finished", "submission_id": sub_id, "run_id": body["run_id"], "status": body["status"],
               "counts": body["counts"], "finished_at": body["finished_at"], "links": body["links"]}

    def record(webhook_state: dict) -> None:
        with state.db.session() as s:
            s.execute(update(Submission).where(Submission.id == sub_id).values(webhook_state=webhook_state))

    record({"state": "pending", "attempts": 0, "last_status": None, "error": None})
    send_in_background(url, _ctx(state).webhook_secret or "", payload, record)


def _refresh(state: Any, sub: Submission) -> None:
    """A submission that says queued / running but whose local worker is gone (the gallery restarted meanwhile)."""
    if sub.status in TERMINAL or sub.finished_at is not None or sub.flow_run_id:
        return
    if sub.pid is not None and _ctx(state).alive(sub.pid, sub.host) is False:
        finalize(state, sub.id, None)


def get_submission(state: Any, submission_id: int) -> dict | None:
    with state.db.session() as s:
        sub = s.get(Submission, submission_id)
        if sub is None:
            return None
    _refresh(state, sub)
    with state.db.session() as s:
        sub = s.get(Submission, submission_id)
        return submission_json(state, s, sub)  # type: ignore[arg-type]


def list_submissions(state: Any, *, limit: int = 50, offset: int = 0, user: str | None = None) -> list[dict]:
    with state.db.session() as s:
        query = select(Submission).order_by(Submission.id.desc()).offset(offset).limit(limit)
        if user is not None:
            query = query.where(Submission.submitted_by == user)
        subs = list(s.scalars(query))
    for sub in subs:
        _refresh(state, sub)
    with state.db.session() as s:
        return [submission_json(state, s, s.get(Submission, sub.id), full=False) for sub in subs]  # type: ignore[arg-type]


def _get(s: Any, submission_id: int) -> Submission:
    sub = s.get(Submission, submission_id)
    if sub is None:
        raise SubmissionError(404, "not_found", f"no run {submission_id}")
    return sub


def cancel_submission(state: Any, submission_id: int, *, user: CurrentUser) -> dict:
    _need_reviewer(user, "cancelling a run")
    get_submission(state, submission_id)  # settles one whose worker is gone
    with state.db.session() as s:
        sub = _get(s, submission_id)
        if sub.status in TERMINAL:
            raise SubmissionError(409, "already_finished", f"run {submission_id} has finished ({sub.status})")
        before = {"status": sub.status}
        sub.cancel_requested_by, sub.cancel_requested_at = user.name, utcnow()
        pid, host, flow_run_id = sub.pid, sub.host, sub.flow_run_id
    try:
        how = _ctx(state).cancel(submission_id, pid, host, flow_run_id)
    except LaunchError as exc:
        raise SubmissionError(502, "cancel_failed", str(exc)) from None
    with state.db.session() as s:
        audit(s, actor=user.name, action="submission.cancelled", entity="submission", entity_id=submission_id,
              before=before, after={"status": "cancelled", "how": how})
    if not flow_run_id:
        finalize(state, submission_id, None)  # the watcher thread may be first; either records it once
    return get_submission(state, submission_id) or {}


def rerun_failures(state: Any, submission_id: int, *, user: CurrentUser) -> tuple[dict, bool]:
    """A new submission of the same stored brief and options: the run skips what exists and retries the rest."""
    _need_reviewer(user, "re-running a brief")
    with state.db.session() as s:
        sub = _get(s, submission_id)
        if sub.status not in TERMINAL:
            raise SubmissionError(409, "still_running", f"run {submission_id} is still {sub.status}")
        path, name, opts = Path(sub.brief_path), sub.brief_name, dict(sub.options or {})
    try:
        data = path.read_bytes()
    except OSError:
        raise SubmissionError(410, "brief_gone", f"the stored brief of run {submission_id} is gone") from None
    return submit_brief(state, data, name, opts, user=user)


def brief_download(state: Any, submission_id: int) -> tuple[Path, str]:
    with state.db.session() as s:
        sub = _get(s, submission_id)
        path, name = Path(sub.brief_path), safe_brief_name(sub.brief_name)
    if not path.is_file():
        raise SubmissionError(410, "brief_gone", f"the stored brief of run {submission_id} is gone")
    return path, name


def submission_assets(state: Any, submission_id: int, *, page: int = 1, per_page: int = 50) -> dict:
    if page < 1 or not 1 <= per_page <= 200:
        raise SubmissionError(422, "invalid_page", "page >= 1 and per_page in 1 .. 200")
    with state.db.session() as s:
        return assets_page(state, s, _get(s, submission_id), page, per_page)


def run_context(db_url: str, store_url: str, config: Any, run_config: str | None, price: float) -> RunContext:
    """The app's RunContext from the gallery's settings (create_app calls this)."""
    briefs = Path(config.briefs_dir) if config.briefs_dir else Path("adforge-data") / "briefs"
    return RunContext(db_url=db_url, store_url=store_url, run_config=run_config, briefs_dir=briefs.resolve(),
                      deployment=config.deployment, webhook_secret=config.webhook_secret, price_per_device_hour=price)

