"""Writing a run into the metadata database: the run, its plan (campaigns, brief, rows, prompts, variants),
each stored asset, failures, and the audit trail. Every function is one transaction and retries on transient
database errors, so a flaky connection costs a retry, not a run.

Idempotence lives here: variants are keyed by identity (unique), assets by variant (unique). Re-recording what
exists is a no-op, so a run that was killed between storing a file and recording it simply records it next time.
"""

from __future__ import annotations

from collections.abc import Iterable
import logging
import os
import socket
from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from flows.brief import Brief as ParsedBrief
from flows.model_registry import enter_model
from flows.planning import Plan
from flows.settings import Settings
from storage.assets import StoredAsset
from storage.database import Database, audit, retry_transient
from storage.review_schema import Submission
from storage.schema import Asset, Brief, BriefRowRecord, Campaign, PromptRecord, Run, Variant, VariantUpscaler, utcnow

log = logging.getLogger(__name__)

__all__ = ["AssetRecord", "Claims", "VariantState", "abandon_run", "claim_variants", "finish_run", "mark_crashed_runs",
           "note_plan", "record_assets", "record_failure", "release_claims", "start_run", "sync_plan"]

RUN_ACTOR = "system:run"


@dataclass(frozen=True)
class VariantState:
    id: int
    status: str  # planned | done | failed


def _row_data(row) -> dict:
    return {
        "campaign": row.campaign, "row_id": row.row_id, "subject": row.subject, "channels": list(row.channels),
        "message": row.message, "audience": row.audience, "style": row.style, "variants": row.variants,
        "negative_prompt": row.negative_prompt, "seed": row.seed, "model": row.model, "license": row.license,
        "extra": dict(row.extra),
    }


@retry_transient()
def start_run(db: Database, brief_path: str, brief: ParsedBrief | None, settings: Settings, flow_run_id: str | None,
              submission_id: int | None = None) -> int:
    """Record a run's start; ``submission_id``: the web / API submission that launched it (its status is read from
    this run). A submission id that names no submission is dropped rather than failing the run."""
    with db.session() as s:
        brief_id = _ensure_brief(s, brief, brief_path).id if brief is not None else None
        if submission_id is not None and s.get(Submission, submission_id) is None:
            log.warning("run of %s: no submission %s; recorded without it", brief_path, submission_id)
            submission_id = None
        run = Run(flow_run_id=flow_run_id, brief_id=brief_id, brief_path=brief_path, status="running",
                  settings=settings.redacted(), host=socket.gethostname(), pid=os.getpid(), submission_id=submission_id)
        s.add(run)
        s.flush()
        if submission_id is not None:
            sub = s.get(Submission, submission_id)
            sub.run_id = run.id  # type: ignore[union-attr]
        audit(s, actor=RUN_ACTOR, action="run.started", entity="run", entity_id=run.id, run_id=run.id,
              after={"brief": brief_path, "flow_run_id": flow_run_id, "settings": run.settings,
                     **({"submission_id": submission_id} if submission_id is not None else {})})
        return run.id


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# Runs of this process that could not be finished because the database failed (full disk, lost server) while they
# ended: this process is alive, so mark_crashed_runs would not see them; it marks them failed once it can write.
_ABANDONED: dict[int, str] = {}


def abandon_run(run_id: int, error: str) -> None:
    """Remember that ``run_id`` ended (with ``error``) but could not be recorded as ended."""
    _ABANDONED[run_id] = error


@retry_transient()
def mark_crashed_runs(db: Database) -> list[int]:
    """Runs of this host still 'running' whose process is gone (killed, machine rebooted) become 'crashed'; runs of
    this process whose end could not be recorded (:func:`abandon_run`) become 'failed'. Runs of other hosts are
    left alone: only their own host can tell."""
    host = socket.gethostname()
    crashed = []
    with db.session() as s:
        for run in s.scalars(select(Run).where(Run.status == "running", Run.host == host)):
            if run.pid == os.getpid() and run.id in _ABANDONED:
                error = _ABANDONED[run.id]
                run.status, run.finished_at, run.error = "failed", utcnow(), error
                audit(s, actor=RUN_ACTOR, action="run.failed", entity="run", entity_id=run.id, run_id=run.id,
                      before={"status": "running"}, after={"status": "failed", "error": error, "recorded_late": True})
                crashed.append(run.id)
            elif run.pid is not None and run.pid != os.getpid() and not _process_alive(run.pid):
                run.status, run.finished_at = "crashed", utcnow()
                audit(s, actor=RUN_ACTOR, action="run.crashed", entity="run", entity_id=run.id, run_id=run.id,
                      before={"status": "running"}, after={"status": "crashed", "pid": run.pid, "host": host})
                crashed.append(run.id)
    for run_id in crashed:
        _ABANDONED.pop(run_id, None)
    return crashed


# ------------------------------------------------------------------------------------------------ claims

CLAIM_CHUNK = 500  # ids per statement: under SQLite's bound-parameter limit


@dataclass(frozen=True)
class Claims:
    """What a claim got: the variants this run renders, and those it leaves to others or that are done."""

    mine: list[int]
    elsewhere: dict[int, int]  # variant id -> the live run rendering it now
    done: list[int]


@retry_transient()
def claim_variants(db: Database, run_id: int, variant_ids: list[int]) -> Claims:
    """Claim ``variant_ids`` for ``run_id`` in one atomic update per chunk: a variant is claimed unless it is done
    or another *running* run holds it (a claim of a run that ended, failed or crashed is void). Two runs of one
    brief at once thus never render the same variant; the loser skips it. Re-claiming our own claim is allowed
    (a retried task, a re-queued worker unit)."""
    live = select(Run.id).where(Run.status == "running", Run.id != run_id)
    rows: dict[int, tuple[int | None, str]] = {}
    with db.session() as s:
        for i in range(0, len(variant_ids), CLAIM_CHUNK):
            chunk = variant_ids[i : i + CLAIM_CHUNK]
            s.execute(
                update(Variant)
                .where(Variant.id.in_(chunk), Variant.status != "done",
                       or_(Variant.claim_run_id.is_(None), Variant.claim_run_id.not_in(live)))
                .values(claim_run_id=run_id, claimed_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            rows.update((vid, (claim, status)) for vid, claim, status in s.execute(
                select(Variant.id, Variant.claim_run_id, Variant.status).where(Variant.id.in_(chunk))))
    mine, elsewhere, done = [], {}, []
    for vid in variant_ids:
        if vid not in rows:
            continue
        claim, status = rows[vid]
        if status == "done":
            done.append(vid)
        elif claim == run_id:
            mine.append(vid)
        else:
            elsewhere[vid] = claim
    return Claims(mine, elsewhere, done)


@retry_transient()
def release_claims(db: Database, run_id: int, variant_ids: list[int]) -> None:
    """Give back this run's claims on ``variant_ids`` (rendered or failed: either way no longer in hand)."""
    with db.session() as s:
        for i in range(0, len(variant_ids), CLAIM_CHUNK):
            s.execute(
                update(Variant)
                .where(Variant.id.in_(variant_ids[i : i + CLAIM_CHUNK]), Variant.claim_run_id == run_id)
                .values(claim_run_id=None, claimed_at=None)
                .execution_options(synchronize_session=False)
            )


def _ensure_brief(s, brief: ParsedBrief, name: str | None = None) -> Brief:
    record = s.scalar(select(Brief).where(Brief.sha256 == brief.sha256))
    if record is None:
        record = Brief(sha256=brief.sha256, file_name=name or str(brief.path), encoding=brief.encoding,
                       columns={"columns": list(brief.columns)})
        s.add(record)
        s.flush()
    return record


@retry_transient()
def sync_plan(db: Database, plan: Plan, run_id: int) -> dict[str, VariantState]:
    """Make sure every planned variant has its rows; returns identity -> state for the whole plan."""
    try:
        return _sync_plan(db, plan, run_id)
    except IntegrityError:
        # A parallel run of the same brief inserted the same rows first: everything it wrote is ours too.
        return _sync_plan(db, plan, run_id)


def _sync_plan(db: Database, plan: Plan, run_id: int) -> dict[str, VariantState]:
    with db.session() as s:
        brief = _ensure_brief(s, plan.brief)
        identities = [v.identity for v in plan.variants]
        existing: dict[str, Variant] = {}
        for i in range(0, len(identities), 500):  # stay under SQLite's bound-parameter limit
            chunk = identities[i : i + 500]
            existing.update((v.identity, v) for v in s.scalars(select(Variant).where(Variant.identity.in_(chunk))))
        missing = [v for v in plan.variants if v.identity not in existing]
        # Every upscaler the plan uses has its row, at the path this plan found it (rendering loads it from there);
        # an unregistered one is entered like a checkpoint on first use (licence from its file, else unknown).
        upscaler_ids: dict[str, int] = {}
        for v in plan.variants:
            for _, info in v.upscalers:
                if info.sha256 not in upscaler_ids:
                    upscaler_ids[info.sha256] = enter_model(s, info, actor=RUN_ACTOR).id
        # Likewise every LoRA and embedding: the variant pins them by sha256, rendering finds them here.
        # And every ControlNet a row's layout uses.
        used = {a.model.sha256: a.model for v in plan.variants for a in v.adapters}
        used.update({v.controlnet.sha256: v.controlnet for v in plan.variants if v.controlnet is not None})
        for sha, info in used.items():
            if sha not in upscaler_ids:
                upscaler_ids[sha] = enter_model(s, info, actor=RUN_ACTOR).id
        if missing:
            campaigns = {c.name: c for c in s.scalars(select(Campaign).where(Campaign.name.in_({v.row.campaign for v in missing})))}
            for name in sorted({v.row.campaign for v in missing} - set(campaigns)):
                campaigns[name] = Campaign(name=name)
                s.add(campaigns[name])
            s.flush()
            rows: dict[tuple[str, str], BriefRowRecord] = {
                (r.campaign_id, r.row_key): r for r in s.scalars(select(BriefRowRecord).where(BriefRowRecord.brief_id == brief.id))
            }
            prompts: dict[tuple, PromptRecord] = {}
            new_variants: list[Variant] = []
            links: list[tuple[Variant, int, int]] = []  # (variant, chain step, upscaler model id)
            for v in missing:
                campaign = campaigns[v.row.campaign]
                row = rows.get((campaign.id, v.row.row_id))
                if row is None:
                    row = BriefRowRecord(brief_id=brief.id, campaign_id=campaign.id, row_key=v.row.row_id, line=v.row.line,
                                         data=_row_data(v.row))
                    s.add(row)
                    s.flush()
                    rows[(campaign.id, v.row.row_id)] = row
                pkey = (row.id, v.spec.channel, v.spec.template, v.prompt.variation_index)
                prompt = prompts.get(pkey)
                if prompt is None:
                    prompt = s.scalar(select(PromptRecord).where(
                        PromptRecord.row_id == row.id, PromptRecord.channel == v.spec.channel,
                        PromptRecord.template == v.spec.template, PromptRecord.variation_index == v.prompt.variation_index))
                    if prompt is None:
                        prompt = PromptRecord(row_id=row.id, channel=v.spec.channel, template=v.spec.template,
                                              variation_index=v.prompt.variation_index, prompt=v.spec.prompt,
                                              negative_prompt=v.spec.negative_prompt)
                        s.add(prompt)
                        s.flush()
                    prompts[pkey] = prompt
                variant = Variant(identity=v.identity, row_id=row.id, prompt_id=prompt.id, model_id=v.model.id,
                                  first_run_id=run_id, storage_key=v.storage_key, status="planned", **v.spec.variant_columns())
                s.add(variant)
                new_variants.append(variant)
                existing[v.identity] = variant
                for position, info in v.upscalers:
                    links.append((variant, position, upscaler_ids[info.sha256]))
            s.flush()
            for variant, position, model_id in links:
                s.add(VariantUpscaler(variant_id=variant.id, position=position, model_id=model_id))
            if links:
                s.flush()
            audit(s, actor=RUN_ACTOR, action="variants.planned", entity="run", entity_id=run_id, run_id=run_id,
                  after={"count": len(new_variants), "variant_ids": [x.id for x in new_variants]})
        return {ident: VariantState(existing[ident].id, existing[ident].status) for ident in identities}


@dataclass(frozen=True)
class AssetRecord:
    variant_id: int
    stored: StoredAsset
    fmt: str
    width: int
    height: int
    infotext: str
    render_seconds: float | None
    product_error: float | None = None  # see storage.schema.Asset.product_error / product_changed
    product_changed: bool | None = None
    product_outline: str | None = None
    clean_key: str | None = None  # see storage.schema.Asset.clean_key / overlay
    overlay: str | None = None
    flagged: bool | None = None  # see storage.schema.Asset.flagged / flags / watermark / credentials / queue_seconds
    flags: str | None = None
    watermark: str | None = None
    credentials: str | None = None
    queue_seconds: float | None = None


@retry_transient()
def record_assets(db: Database, run_id: int, records: list[AssetRecord]) -> int:
    """Record stored files for their variants in one transaction; returns how many were new. A variant that
    already has its asset (a re-run after a crash between store and record) is left as it is."""
    if not records:
        return 0
    with db.session() as s:
        ids = [r.variant_id for r in records]
        have = set(s.scalars(select(Asset.variant_id).where(Asset.variant_id.in_(ids))))
        variants = {v.id: v for v in s.scalars(select(Variant).where(Variant.id.in_(ids)))}
        new = 0
        for r in records:
            if r.variant_id in have:
                continue
            variant = variants[r.variant_id]
            before = {"status": variant.status}
            asset = Asset(variant_id=r.variant_id, run_id=run_id, store_url=r.stored.url, storage_key=r.stored.key,
                          sha256=r.stored.sha256, size_bytes=r.stored.size, format=r.fmt, width=r.width, height=r.height,
                          infotext=r.infotext, render_seconds=r.render_seconds,
                          product_error=r.product_error, product_changed=r.product_changed,
                          product_outline=r.product_outline, clean_key=r.clean_key, overlay=r.overlay,
                          flagged=r.flagged, flags=r.flags, watermark=r.watermark, credentials=r.credentials,
                          queue_seconds=r.queue_seconds)
            s.add(asset)
            variant.status, variant.error = "done", None
            s.flush()
            audit(s, actor=RUN_ACTOR, action="asset.stored", entity="variant", entity_id=r.variant_id, run_id=run_id,
                  before=before, after={"status": "done", "asset_id": asset.id, "key": r.stored.key,
                                        "sha256": r.stored.sha256, "url": r.stored.url, "flagged": r.flagged})
            have.add(r.variant_id)
            new += 1
        return new


@retry_transient()
def record_failure(db: Database, variant_ids: Iterable[int], run_id: int, error: str) -> None:
    with db.session() as s:
        for vid in variant_ids:
            variant = s.get(Variant, vid)
            if variant is None or variant.status == "done":
                continue
            before = {"status": variant.status}
            variant.status, variant.error = "failed", error[:4000]
            audit(s, actor=RUN_ACTOR, action="variant.failed", entity="variant", entity_id=vid, run_id=run_id, before=before,
                  after={"status": "failed", "error": error[:4000]})


def note_plan(db: Database, run_id: int, planned: int, skipped: int) -> None:
    """The run's plan size and what existed already, recorded as soon as it is known, so that a run's progress
    (the gallery's run page, ``GET /api/v1/runs/{id}``) can be read while it renders; :func:`finish_run` replaces
    these counts with the final ones."""
    with db.session() as s:
        run = s.get(Run, run_id)
        if run is not None:
            run.counts = {"planned": planned, "skipped": skipped}


@retry_transient()
def finish_run(db: Database, run_id: int, status: str, counts: dict, timings: dict, error: str | None = None) -> None:
    with db.session() as s:
        run = s.get(Run, run_id)
        assert run is not None, run_id
        before = {"status": run.status}
        run.status, run.counts, run.timings, run.error = status, counts, timings, error
        run.finished_at = utcnow()
        audit(s, actor=RUN_ACTOR, action=f"run.{status}", entity="run", entity_id=run_id, run_id=run_id, before=before,
              after={"status": status, "counts": counts, "error": error})
