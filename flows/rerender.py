"""Draining the gallery's re-render queue: each request becomes one variant, rendered, stored and recorded.

The gallery (``review/``) cannot import the engine, so "re-render with these settings" only queues a request with
a full copy of the source variant's settings (``rerender_queue``). :func:`rerender_queue` claims queued requests
one at a time (an atomic ``queued -> running`` update, so two drainers never take the same request), makes the
variant those settings describe (same row, prompt, channel and variant index; the seed, steps, CFG or sampler
the reviewer changed) and renders it through the same code as a campaign run. Its identity follows the planning
rule, so settings that describe an existing asset reuse it instead of rendering a duplicate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prefect import flow
from sqlalchemy import select, update

from flows.campaign import open_resources
from flows.recording import RUN_ACTOR, finish_run, start_run
from flows.rendering import render_variants
from flows.settings import load_settings
from storage.database import Database, audit, retry_transient
from storage.review_schema import RerenderRequest
from storage.schema import Variant, VariantUpscaler, utcnow
from storage.variants import VariantSpec

__all__ = ["rerender_queue"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    request_id: int
    variant_id: int  # the variant to render (new, or the existing one with the same identity)
    is_new: bool


@retry_transient()
def _claim(db: Database) -> tuple[int, dict] | None:
    """Take the oldest queued request: only the drainer whose update changes the row owns it."""
    with db.session() as s:
        for request in s.scalars(select(RerenderRequest).where(RerenderRequest.status == "queued").order_by(RerenderRequest.id).limit(20)):
            took = s.execute(
                update(RerenderRequest).where(RerenderRequest.id == request.id, RerenderRequest.status == "queued")
                .values(status="running", started_at=utcnow())
            ).rowcount
            if took == 1:
                return request.id, dict(request.settings)
    return None


@retry_transient()
def _variant_for(db: Database, request_id: int, settings: dict, run_id: int) -> Claimed:
    source = settings
    with db.session() as s:
        origin = s.get(Variant, source["source_variant_id"])
        if origin is None:
            raise LookupError(f"source variant {source['source_variant_id']} no longer exists")
        spec = VariantSpec.from_dict(source, variant_index=origin.variant_index)
        ident = spec.identity
        existing = s.scalar(select(Variant).where(Variant.identity == ident))
        if existing is not None:
            return Claimed(request_id, existing.id, False)
        variant = Variant(identity=ident, row_id=origin.row_id, prompt_id=origin.prompt_id, model_id=origin.model_id,
                          first_run_id=run_id, storage_key=spec.storage_key, status="planned", **spec.variant_columns())
        s.add(variant)
        s.flush()
        if variant.postprocess == origin.postprocess:  # the same chain: the same upscaler files
            for link in s.scalars(select(VariantUpscaler).where(VariantUpscaler.variant_id == origin.id)):
                s.add(VariantUpscaler(variant_id=variant.id, position=link.position, model_id=link.model_id))
        audit(s, actor=RUN_ACTOR, action="variant.planned", entity="variant", entity_id=variant.id, run_id=run_id,
              after={"rerender_request": request_id, "source_variant_id": origin.id, "identity": ident,
                     "changed": source.get("changed", [])})
        return Claimed(request_id, variant.id, True)


@retry_transient()
def _finish_request(db: Database, request_id: int, status: str, result_variant_id: int | None, error: str | None) -> None:
    with db.session() as s:
        request = s.get(RerenderRequest, request_id)
        assert request is not None
        before = {"status": request.status}
        request.status, request.finished_at = status, utcnow()
        request.result_variant_id, request.error = result_variant_id, error
        audit(s, actor=RUN_ACTOR, action=f"rerender.{status}", entity="variant", entity_id=request.variant_id, before=before,
              after={"request_id": request_id, "status": status, "result_variant_id": result_variant_id, "error": error})


@flow(name="rerender-queue", log_prints=False)
def rerender_queue(overrides: dict | None = None, config: str | None = None, limit: int | None = None) -> dict:
    """Render queued re-render requests (all, or at most ``limit``); returns counts and the request outcomes."""
    from prefect.runtime import flow_run

    settings = load_settings(overrides or {}, config=config)
    db, store = open_resources(settings)
    run_id = start_run(db, "rerender-queue", None, settings, str(flow_run.id) if flow_run.id else None)
    counts = {"rendered": 0, "reused": 0, "failed": 0}
    outcomes: list[dict] = []
    while limit is None or len(outcomes) < limit:
        claimed = _claim(db)
        if claimed is None:
            break
        request_id, request_settings = claimed
        try:
            target = _variant_for(db, request_id, request_settings, run_id)
            result = render_variants([target.variant_id], db=db, store=store, run_id=run_id, device=settings.device,
                                     dtype=settings.dtype, batch_size=1, templates_dir=settings.templates_dir)
            if result.skipped:
                counts["reused"] += 1
                _finish_request(db, request_id, "done", target.variant_id, None)
                outcomes.append({"request": request_id, "variant": target.variant_id, "status": "reused"})
                continue
            if result.rendered != 1:
                raise RuntimeError(f"variant {target.variant_id} failed; see its error in the database")
            counts["rendered"] += 1
            _finish_request(db, request_id, "done", target.variant_id, None)
            outcomes.append({"request": request_id, "variant": target.variant_id, "status": "rendered"})
        except Exception as exc:  # one bad request must not block the queue behind it
            log.exception("re-render request %s failed", request_id)
            counts["failed"] += 1
            _finish_request(db, request_id, "failed", None, f"{type(exc).__name__}: {exc}")
            outcomes.append({"request": request_id, "variant": None, "status": "failed", "error": str(exc)})
    finish_run(db, run_id, "completed" if not counts["failed"] else "completed_with_failures", counts, {}, None)
    return {"run_id": run_id, "counts": counts, "requests": outcomes}
