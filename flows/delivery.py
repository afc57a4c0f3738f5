"""Delivering a rendered batch: post-process, encode, store, record; on a background thread while the next one renders.

:mod:`flows.rendering` runs the engine part of a batch (requests, ``generate``, a chain's hires fix) on the calling
thread and hands the result here as a :class:`RenderedBatch`. :func:`deliver_batch` finishes it: the pixel steps (or
the cover-resize), the product finish, the brand overlay, encoding under the channel's cap, the store, and one
database transaction for the batch's assets. A :class:`DeliveryLine` runs each delivery on one background thread
while the caller renders the next batch, so the device does not wait for the CPU (torch releases the GIL in its
kernels, so a thread is enough). At most one delivery is in flight: memory holds two batches at most.

A delivery is the only thing that writes while it runs: the failures the engine part met travel with its batch and
are recorded first, in their order, so the database sees the same writes in the same order as without overlap, and
the run's counts and ``on_event`` (a device worker's pipe, the CLI's progress bar) are used by one thread at a time.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from engine.image_ops import cover_fit
from engine.packshot import Placement, ProductLayer, finish, outline
from engine.pipeline import GenerationResult
from engine.upscale.networks import ModelUpscaler, UpscalerError, load_upscaler
from engine.upscale.runner import UpscalerResolver, apply_pixel_steps
from flows.brand.overlay_step import OverlayStep
from flows.counts import RenderCounts
from flows.product_check import check_product
from flows.recording import AssetRecord, record_assets, record_failure
from flows.trust import TrustSteps, trust_for_run
from flows.worker_metrics import count_failed, observe_batch, with_queue_wait
from storage.assets import AssetStore, clean_storage_key
from storage.database import Database
from storage.image_metadata import CONTENT_TYPES, encode_image, xmp_packet
from storage.retrying import retry_call

if TYPE_CHECKING:
    from flows.rendering import RenderJob

__all__ = ["WAIT", "DeliveryLine", "FileSizeError", "RenderedBatch", "cover_resize", "deliver_batch", "encode_within_cap",
           "fail_variants", "upscaler_resolver"]

log = logging.getLogger(__name__)
EventFn = Callable[[str, int], None]  # ("rendered" | "failed" | "upscaled", count)
# counts.seconds key: the calling (engine) thread's time spent on deliveries instead of rendering; all of their time
# without overlap, only the waits for the one in flight with it.
WAIT = "wait"


def cover_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale (Lanczos) to cover ``width`` x ``height``, then crop the centre: exact size, no distortion, no bars
    (the chain step ``fit(WxH)``)."""
    return cover_fit(image, width, height)


def upscaler_resolver(job: RenderJob, device: torch.device) -> UpscalerResolver:
    """Finds a chain's model file by its pinned sha256 among the job's upscalers (``models`` rows)."""
    by_sha = {u.sha256: u for u in job.upscalers}

    def resolve(file: str, sha256: str | None) -> ModelUpscaler:
        ref = by_sha.get(sha256 or "")
        if ref is None:
            raise UpscalerError(file, f"no model row has the sha256 the chain pins ({sha256}); register the file: "
                                      f"adforge models add {file} --license <id>")
        return load_upscaler(ref.path, sha256=ref.sha256, device=device)

    return resolve


class FileSizeError(ValueError):
    pass


def encode_within_cap(image: Image.Image, fmt: str, infotext_for: Callable[[int | None], str], xmp: str,
                      max_kb: int | None, finish: Callable[[bytes], bytes] | None = None) -> tuple[bytes, str]:
    """Encoded bytes under the channel's size cap, and the infotext they carry. JPEG / WebP step the quality
    down from 92 to 50 (the infotext names the quality used); PNG is lossless and either fits or fails.
    ``finish`` (a signer) turns each encoding into the file delivered before its size is checked."""
    limit = max_kb * 1024 if max_kb else None
    finish = finish or (lambda data: data)
    if fmt == "png":
        infotext = infotext_for(None)
        data = finish(encode_image(image, fmt, infotext, xmp))
        if limit and len(data) > limit:
            raise FileSizeError(f"PNG of {len(data) // 1024} KiB exceeds the channel's cap of {max_kb} KiB")
        return data, infotext
    for quality in (92, 85, 78, 70, 60, 50):
        infotext = infotext_for(quality)
        data = finish(encode_image(image, fmt, infotext, xmp, quality=quality))
        if not limit or len(data) <= limit:
            return data, infotext
    raise FileSizeError(f"{fmt.upper()} still {len(data) // 1024} KiB at quality 50; the channel's cap is {max_kb} KiB")


@dataclass
class RenderedBatch:
    """What the engine part of one batch hands to its delivery."""

    device: torch.device  # where a chain's upscaler models run
    failed: list[tuple[list[RenderJob], str]] = field(default_factory=list)  # (jobs, error) the engine part met, in order
    jobs: list[RenderJob] = field(default_factory=list)  # sent to the engine; none when nothing is left to deliver
    layers: list[ProductLayer | None] = field(default_factory=list)  # each job's placed packshot, by position
    results: dict[int, GenerationResult] = field(default_factory=dict)  # by position in ``jobs``; absent: failed
    engine_seconds: float = 0.0  # requests, generate and hires fix of ``jobs``
    # Wall time (it is compared with the run's start, across processes) at which the engine part began: made
    # where flows.rendering starts it.
    started: float = field(default_factory=time.time)


def fail_variants(db: Database, jobs: Sequence[RenderJob], run_id: int, error: str, counts: RenderCounts,
                  on_event: EventFn | None) -> None:
    record_failure(db, [j.variant_id for j in jobs], run_id, error)
    counts.failed += len(jobs)
    count_failed(len(jobs))
    if on_event:
        on_event("failed", len(jobs))


def deliver_batch(batch: RenderedBatch, *, store: AssetStore, db: Database, run_id: int, counts: RenderCounts,
                  on_event: EventFn | None, overlays: OverlayStep) -> None:
    """Record the engine part's failures, then post-process, encode and store each image and record the batch's
    assets in one transaction. A failure of one image fails that variant only; a database that stays unreachable
    past :func:`~flows.recording.record_assets`' retries raises (the render task is then retried by Prefect, and
    storing again is a no-op for identical bytes)."""
    for jobs, error in batch.failed:
        fail_variants(db, jobs, run_id, error, counts, on_event)
    if not batch.jobs:
        return
    timings = counts.seconds
    timings["engine"] += batch.engine_seconds
    per_image = batch.engine_seconds / len(batch.jobs)
    trust = trust_for_run(db, run_id)
    # Store each file first, then record the whole batch in one transaction (one commit instead of one per
    # image). A crash in between leaves stored, unrecorded files: the next run rewrites them under the same key.
    records: list[AssetRecord] = []
    for k, job in enumerate(batch.jobs):
        result = batch.results.get(k)
        if result is None:
            continue
        try:
            records.append(_deliver_image(job, result, batch.layers[k], per_image, batch.device, store, timings,
                                          on_event, overlays, trust))
        except Exception as exc:
            log.exception("variant %s failed after rendering", job.variant_id)
            fail_variants(db, [job], run_id, f"{type(exc).__name__}: {exc}", counts, on_event)
    t3 = time.perf_counter()
    records = with_queue_wait(db, run_id, batch, records)
    record_assets(db, run_id, records)
    timings["record"] += time.perf_counter() - t3
    counts.rendered += len(records)
    observe_batch(run_id, batch, records, counts)  # the device's use, this process's Prometheus metrics
    counts.flagged += sum(1 for r in records if r.flagged)
    if on_event:
        on_event("rendered", len(records))


def _deliver_image(job: RenderJob, result: GenerationResult, layer: ProductLayer | None, per_image: float,
                   device: torch.device, store: AssetStore, timings: dict[str, float], on_event: EventFn | None,
                   overlays: OverlayStep, trust: TrustSteps) -> AssetRecord:
    """One image post-processed, encoded and stored (its clean copy first, when it has an overlay)."""
    spec = job.spec
    t1 = time.perf_counter()
    if job.upscales:
        image = apply_pixel_steps(result.image, job.chain.pixel_steps, upscaler_resolver(job, device))
        if on_event:
            on_event("upscaled", 1)
    else:
        image = cover_resize(result.image, spec.out_width, spec.out_height)
    if image.size != (spec.out_width, spec.out_height):
        raise ValueError(f"post-processing made {image.width}x{image.height}, the channel needs {spec.out_width}x{spec.out_height}")
    if layer is not None:
        image = finish(image, layer, Placement.parse(job.inputs.product.placement).shadow)  # type: ignore[union-attr]
    mark = None
    if trust.watermark:
        # Before the overlay: the brand's logo and text keep the kit's exact colours (and measured contrast), as
        # the product keeps its pixels; the clean copy, also served, carries the same mark.
        image, mark = trust.watermark.mark(image, job, None if layer is None else layer.box)
    clean, overlay = image, None
    if spec.overlay:
        image, overlay = overlays.apply(image, spec, None if layer is None else layer.box)
    finding = trust.image_filter.check([image])[0] if trust.image_filter else None
    signed: list[str] = []

    def sign(data: bytes) -> bytes:
        signed_data, label = trust.signer.sign(data, spec.out_format, job)  # type: ignore[union-attr]
        signed.append(label)
        return signed_data
    meta = {"Model": job.model.name, "ModelSHA256": job.model.sha256, "VariantIdentity": job.identity}
    if spec.inputs:
        meta["Inputs"] = spec.inputs  # every input image with its sha256, placement, control settings
    if job.upscales:
        meta["Postprocess"] = spec.postprocess
    if spec.adapters:
        meta["Adapters"] = spec.adapters  # every LoRA / embedding with its sha256 and strengths
    qualities: list[int | None] = []

    def infotext_for(q: int | None) -> str:
        qualities.append(q)
        return job.infotext(result.parameters, q)

    clean_meta = xmp_packet(meta)
    if overlay is not None:
        meta["Overlay"] = spec.overlay  # the brand kit's sha256 and the copy drawn
    xmp = xmp_packet(meta)
    data, infotext = encode_within_cap(image, spec.out_format, infotext_for, xmp, spec.out_max_kb,
                                       sign if trust.signer else None)
    clean_key = None
    if overlay is not None:
        # The picture without the overlay, stored before the delivered file: in the delivered file's format and
        # quality (so the two compare pixel for pixel), a PNG at a fast zlib level (it is not delivered).
        clean_data = encode_image(clean, spec.out_format, infotext, clean_meta, quality=qualities[-1] or 92, png_level=1)
        clean_key = clean_storage_key(job.storage_key)
        retry_call(store.put, clean_key, clean_data, CONTENT_TYPES[spec.out_format])
    error = changed = None
    if layer is not None:
        error, changed = check_product(data, spec.out_format, qualities[-1], layer)
        if changed:
            log.warning("variant %s: the delivered file's product region differs from the packshot (mean %.2f)",
                        job.variant_id, error)
    t2 = time.perf_counter()
    stored = retry_call(store.put, job.storage_key, data, CONTENT_TYPES[spec.out_format])
    timings["postprocess"] += t2 - t1
    timings["store"] += time.perf_counter() - t2
    return AssetRecord(job.variant_id, stored, spec.out_format, spec.out_width, spec.out_height, infotext, per_image,
                       product_error=error, product_changed=changed,
                       product_outline=None if layer is None else outline(layer), clean_key=clean_key, overlay=overlay,
                       flagged=None if finding is None else finding.flagged,
                       flags=None if finding is None else finding.details, watermark=mark,
                       credentials=signed[-1] if signed else None)


class DeliveryLine:
    """Runs deliveries in order, one at a time: each on one background thread while the caller goes on
    (``background``), or in the caller (without overlap). :meth:`submit` first waits for the delivery in flight and
    raises what it raised; leaving the ``with`` block waits for the last one, so no thread outlives the line.
    The caller's time spent on deliveries (all of it inline, only the waits in the background) adds up in
    ``counts.seconds["wait"]``; the caller touches ``counts`` only while no delivery is in flight. A line kept across
    render units (a device worker's) charges each unit's waits to that unit's counts (:meth:`charge`)."""

    def __init__(self, counts: RenderCounts | None = None, *, background: bool = True):
        self.charge(RenderCounts() if counts is None else counts)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adforge-delivery") if background else None
        self._pending: Future | None = None

    def charge(self, counts: RenderCounts) -> None:
        """Add the caller's waits to ``counts`` from now on (a unit's own, which no delivery in flight touches)."""
        counts.seconds.setdefault(WAIT, 0.0)
        self.counts = counts

    def submit(self, deliver: Callable[..., None], /, *args, **kwargs) -> None:
        self.settle()
        if self._pool is None:
            t0 = time.perf_counter()
            try:
                deliver(*args, **kwargs)
            finally:
                self.counts.seconds[WAIT] += time.perf_counter() - t0
            return
        # In the caller's context (a Prefect task run's logger, for one), as if it ran inline.
        self._pending = self._pool.submit(contextvars.copy_context().run, deliver, *args, **kwargs)

    def settle(self) -> None:
        """Wait for the delivery in flight, if any, and raise what it raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        t0 = time.perf_counter()
        try:
            pending.result()
        finally:
            self.counts.seconds[WAIT] += time.perf_counter() - t0

    def __enter__(self) -> "DeliveryLine":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.settle()
            elif self._pending is not None:
                # The caller failed: the delivery in flight still finishes (its files and records are good); the
                # caller's error is the one raised, the delivery's own is logged.
                try:
                    self.settle()
                except Exception:
                    log.exception("a delivery failed while the rendering beside it failed too")
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
