"""Rendering a batch of planned variants: engine -> post-process -> encode -> store -> record.

A render task receives variant ids only (never images or tensors) and reads what it needs from the database,
so the same task runs in this process, in a worker process, or on another machine. The model is loaded once
per process (:func:`get_pipeline`) and kept warm across batches.

Order per image, chosen for crash safety: the file is written to the store (atomically, under a key fixed by
the variant's identity) *before* the database records it. A run killed in between leaves a file that the next
run writes again with the same key and then records: no duplicate files, no duplicate rows.

Post-processing follows the variant's ``postprocess``: ``cover-lanczos(WxH)`` (the default) or an upscale chain
(:mod:`engine.upscale.chain`). A chain's hires fix re-renders the batch's images that share the chain (engine
time); its pixel steps (``model``, ``lanczos``, ``fit``) run per image (post-process time), with each model file
found by the sha256 the chain pins, in ``models``. A failed hires fix fails the variants it was re-rendering, a
failed pixel step fails its one variant; the rest of the batch goes on.

A batch's engine part runs on the calling thread; its delivery (post-process, encode, store, record:
:mod:`flows.delivery`) runs on one background thread while the next batch renders (``overlap``), with the same
files, records and counts as one after the other. :func:`render_held` stops before the last batch's delivery, claims
held, so that a device worker delivers it while its next unit renders.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select

from engine.adapters.refs import AdapterError, AdapterFile, LoraUse
from engine.packshot import MASK_BLUR, ProductLayer, engine_inputs
from engine.pipeline import GenerationRequest, GenerationResult, Pipeline
from engine.requests import ControlUse
from engine.upscale.chain import Chain, ChainError, Fit, parse_chain
from engine.upscale.runner import apply_hires
from flows.brand.overlay_step import OverlayStep
from flows.counts import RenderCounts
from flows.delivery import (DeliveryLine, FileSizeError, RenderedBatch, cover_resize, deliver_batch, encode_within_cap,
                            upscaler_resolver)
from flows.render_inputs import InputReader, control_model, controls_of, product_layer_of
from flows.recording import claim_variants, release_claims
from storage.assets import AssetStore
from storage.database import Database
from storage.image_metadata import format_infotext
from storage.schema import ModelRecord
from storage.variants import (AdapterPin, ModelRef, VariantInputs, VariantSpec, load_variants, parse_adapters, parse_inputs,
                              parse_overlay)

__all__ = ["OVERLAP", "FileSizeError", "HeldRender", "RenderJob", "cover_resize", "encode_within_cap", "get_pipeline",
           "load_jobs", "parse_postprocess", "render_held", "render_jobs", "render_variants"]

log = logging.getLogger(__name__)
EventFn = Callable[[str, int], None]  # ("rendered" | "failed" | "upscaled", count)
# Deliver batch k on a background thread while batch k+1 renders; render_jobs(overlap=False) (or this set to False,
# for a whole process) delivers each batch before the next one renders, for comparisons.
OVERLAP = True
_COVER = re.compile(r"cover-lanczos\((\d+)x(\d+)\)")


def parse_postprocess(text: str) -> Chain:
    """A variant's ``postprocess`` as a chain: ``cover-lanczos(WxH)`` (the default's recorded text) is ``fit(WxH)``."""
    m = _COVER.fullmatch(text)
    if m:
        return Chain((Fit(int(m.group(1)), int(m.group(2))),))
    return parse_chain(text)

_PIPELINES: dict[tuple, Pipeline] = {}
_PIPELINE_LOCK = threading.Lock()


def get_pipeline(path: str, sha256: str, *, device: str = "auto", dtype: str = "auto", max_batch_size: int = 8) -> Pipeline:
    """One loaded pipeline per (file, device, dtype) per process."""
    key = (path, sha256, device, dtype)
    with _PIPELINE_LOCK:
        pipe = _PIPELINES.get(key)
        if pipe is None:
            pipe = Pipeline.load(path, device=device, dtype=dtype, max_batch_size=max_batch_size)
            _PIPELINES[key] = pipe
        pipe.max_batch_size = max(1, max_batch_size)
        return pipe


def clear_pipelines() -> None:
    from engine.upscale.networks import clear_upscalers

    with _PIPELINE_LOCK:
        _PIPELINES.clear()
    clear_upscalers()


@dataclass(frozen=True)
class RenderJob:
    """A recorded variant to render: its spec, where its file goes, its model and its chain's upscaler files."""

    variant_id: int
    identity: str
    spec: VariantSpec
    storage_key: str
    status: str
    model: ModelRef
    upscalers: tuple[ModelRef, ...] = ()  # the chain's model files in chain order
    adapters: tuple[ModelRef, ...] = ()  # the LoRA and embedding files its spec pins, found by sha256 in ``models``
    controlnet: ModelRef | None = None  # the ControlNet its layout image pins, found by sha256 in ``models``

    @property
    def chain(self) -> Chain:
        return parse_postprocess(self.spec.postprocess)

    @property
    def upscales(self) -> bool:
        """True when post-processing is more than the default cover-resize."""
        return _COVER.fullmatch(self.spec.postprocess) is None and not self.chain.is_plain_fit

    @property
    def inputs(self) -> VariantInputs:
        return parse_inputs(self.spec.inputs)

    def product_layer(self, read: InputReader) -> ProductLayer | None:
        """The placed packshot at the delivered size, or None for a variant without one."""
        return product_layer_of(self.spec, read)

    def controls(self, read: InputReader) -> tuple[ControlUse, ...]:
        """The engine's ControlNet inputs: the pinned layout image, prepared at the generation size, and the file."""
        return controls_of(self.spec, read, self.controlnet)

    def request(self, layer: ProductLayer | None = None, controls: tuple[ControlUse, ...] = ()) -> GenerationRequest:
        """The engine request, with each pinned adapter file at the path its ``models`` row records (the engine
        checks the file's sha256 before using it); with a product ``layer``, an inpainting request that keeps the
        product and generates the scene around it."""
        by_sha = {a.sha256: a for a in self.adapters}
        loras: list[LoraUse] = []
        embeddings: list[AdapterFile] = []
        switch: float | None = None
        for pin in parse_adapters(self.spec.adapters):
            ref = by_sha.get(pin.sha256)
            if ref is None:
                raise AdapterError(None, f"{pin.kind} '{pin.name}': no model row has sha256 {pin.sha256}; register the "
                                         f"file again (adforge models add FILE --license ...)")
            file = AdapterFile(pin.name, ref.path, ref.sha256)
            if pin.kind == "lora":
                loras.append(LoraUse(file, 1.0 if pin.te is None else pin.te, 1.0 if pin.unet is None else pin.unet))
            elif pin.kind == "refiner":
                switch = pin.switch
            else:
                embeddings.append(file)
        extra: dict = {"controls": controls} if controls else {}
        if layer is not None:
            init, mask = engine_inputs(layer, (self.spec.gen_width, self.spec.gen_height))
            extra.update(init_image=init, mask=mask, strength=1.0, mask_blur=MASK_BLUR)
        return GenerationRequest(**self.spec.engine_arguments(), loras=tuple(loras), embeddings=tuple(embeddings),
                                 refiner_switch=switch, **extra)

    @property
    def refiner(self) -> ModelRef | None:
        """The SDXL refiner the spec pins (its ``models`` row), if any."""
        pins = [p for p in _adapter_pins(self.spec.adapters) if p.kind == "refiner"]
        return next((a for a in self.adapters if pins and a.sha256 == pins[0].sha256), None)

    def infotext(self, parameters: dict[str, str], quality: int | None) -> str:
        """The asset's infotext: the engine's ``parameters`` with the model, chain, licences and inputs added."""
        return _infotext(self, parameters, quality)


def load_jobs(db: Database, variant_ids: Sequence[int]) -> list[RenderJob]:
    """The jobs of ``variant_ids``, in that order."""
    with db.session() as s:
        stored = load_variants(s, list(variant_ids))
        pins = {vid: _pins(v.spec.postprocess) for vid, v in stored.items()}
        adapter_pins = {vid: [p.sha256 for p in _adapter_pins(v.spec.adapters)] for vid, v in stored.items()}
        control_pins = {vid: control_model(v.spec.inputs) for vid, v in stored.items()}
        wanted = {sha for shas in (*pins.values(), *adapter_pins.values()) for sha in shas}
        wanted |= {sha for sha in control_pins.values() if sha}
        refs = {m.sha256: ModelRef.of(m)
                for m in (s.scalars(select(ModelRecord).where(ModelRecord.sha256.in_(wanted))) if wanted else ())}
    return [
        RenderJob(v.id, v.identity, v.spec, v.storage_key, v.status, v.model,
                  tuple(refs[sha] for sha in pins[v.id] if sha in refs),
                  tuple(refs[sha] for sha in adapter_pins[v.id] if sha in refs), refs.get(control_pins[v.id] or ""))
        for v in (stored[i] for i in variant_ids if i in stored)
    ]


def _adapter_pins(text: str) -> tuple[AdapterPin, ...]:
    try:
        return parse_adapters(text)
    except ValueError:
        return ()  # rendering then fails that variant with the record's own error


def _pins(postprocess: str) -> list[str]:
    """The sha256 pins of a chain's model files, in chain order (none for the default, or an unreadable chain:
    rendering then fails that variant with the chain's own error)."""
    try:
        chain = parse_postprocess(postprocess)
    except ChainError:
        return []
    return [sha for i, _ in chain.model_files() if (sha := getattr(chain.steps[i], "sha256", None))]


def _infotext(job: RenderJob, parameters: dict[str, str], quality: int | None) -> str:
    spec = job.spec
    params = dict(parameters)
    params["Model hash"] = job.model.short_hash
    params["Model"] = job.model.name
    # The chain as people write it; the pinned sha256 of each file is in the database (and the XMP packet).
    params["Postprocess"] = job.chain.canonical(pins=False) if job.upscales else spec.postprocess
    if job.upscalers:
        params["Upscaler"] = ", ".join(f"{u.name} ({u.short_hash})" for u in job.upscalers)
        params["Upscaler license"] = ", ".join(u.license or "unknown" for u in job.upscalers)
    params["Output size"] = f"{spec.out_width}x{spec.out_height}"
    if quality is not None:
        params["Output quality"] = str(quality)
    if job.model.license:
        params["Model license"] = job.model.license
    licences = [f"{a.name}: {a.license or 'unknown'}" for a in job.adapters]
    if licences:
        params["Adapter licenses"] = ", ".join(licences)
    control = job.inputs.control
    if control is not None:  # the engine's "ControlNet 0" entry names the model; this names the brief's image
        params["Control image"] = f"{control.file} [{control.image[:12]}]"
    product = job.inputs.product
    if product is not None:
        params["Product"] = f"{product.file} [{product.image[:12]}]" + (f", mask [{product.mask[:12]}]" if product.mask else "")
        params["Placement"] = product.placement
    if spec.overlay:
        pin = parse_overlay(spec.overlay)
        if pin is not None:
            params["Brand"] = f"{pin.brand} [{pin.kit[:12]}]"
    params["Variant"] = job.identity[:16]
    return format_infotext(spec.prompt, spec.negative_prompt, params)


def render_variants(variant_ids: Sequence[int], *, db: Database, store: AssetStore, run_id: int, device: str = "auto",
                    dtype: str = "auto", batch_size: int = 8, on_event: EventFn | None = None,
                    templates_dir: str | None = None) -> RenderCounts:
    """The one way variants are rendered (a campaign task, a device worker, the re-render queue, the benches):
    claim them for ``run_id``, load the jobs this run got, get the process's pipeline for their model, and render,
    post-process, store and record them one engine batch at a time (:func:`render_held`, then its delivery). The
    variants must share a model (a planned batch does). Out-of-memory halving happens inside the engine.

    Variants done already, or held by another running run (two runs of one brief at once), count as skipped:
    each variant is rendered by one run only. Claims are given back when the batch ends, rendered or failed."""
    with DeliveryLine(background=OVERLAP) as line:
        held = render_held(variant_ids, db=db, store=store, run_id=run_id, line=line, device=device, dtype=dtype,
                           batch_size=batch_size, on_event=on_event, templates_dir=templates_dir)
        line.submit(held.deliver)
    return held.counts


@dataclass
class HeldRender:
    """Variants claimed for a run whose engine part has run (:func:`render_held`): the last batch waits for
    :meth:`deliver`, which records it and gives the claims back. A device worker delivers it on its delivery line's
    thread while its next unit renders."""

    db: Database
    store: AssetStore
    run_id: int
    claimed: list[int]
    counts: RenderCounts
    on_event: EventFn | None = None
    templates_dir: str | None = None
    batch: RenderedBatch | None = None  # the last batch, rendered and not yet delivered
    oom_halvings: int = 0

    def deliver(self) -> RenderCounts:
        """Deliver the last batch (once the line's delivery before it has ended), release the claims; the counts."""
        try:
            if self.batch is not None:
                deliver_batch(self.batch, store=self.store, db=self.db, run_id=self.run_id, counts=self.counts,
                              on_event=self.on_event, overlays=OverlayStep(self.templates_dir))
            self.counts.oom_halvings += self.oom_halvings
            return self.counts
        finally:
            self.release()

    def release(self) -> None:
        if not self.claimed:
            return
        try:
            release_claims(self.db, self.run_id, self.claimed)
        except Exception:  # the database failed; the run's claims are void once it is no longer running anyway
            log.warning("run %s: could not release its claims on %d variant(s)", self.run_id, len(self.claimed),
                        exc_info=True)


def render_held(variant_ids: Sequence[int], *, db: Database, store: AssetStore, run_id: int, line: DeliveryLine,
                device: str = "auto", dtype: str = "auto", batch_size: int = 8, on_event: EventFn | None = None,
                templates_dir: str | None = None) -> HeldRender:
    """The engine half of :func:`render_variants`: claim, load, and render every engine batch, handing each one but
    the last to ``line`` for delivery; the last is held, claims and all, for :meth:`HeldRender.deliver`. The line's
    waits are charged to the returned counts. Raises what the claims, the loading or the pipeline raise, once the
    deliveries in flight have ended and the claims are given back."""
    claims = claim_variants(db, run_id, list(variant_ids))
    if claims.elsewhere:
        by_run: dict[int, int] = {}
        for other in claims.elsewhere.values():
            by_run[other] = by_run.get(other, 0) + 1
        log.warning("run %s: skipping %s, being rendered by another run now", run_id,
                    ", ".join(f"{n} variant(s) of run {other}" for other, n in sorted(by_run.items())))
    held = HeldRender(db, store, run_id, claims.mine, RenderCounts(skipped=len(claims.done) + len(claims.elsewhere)),
                      on_event, templates_dir)
    line.charge(held.counts)
    if not claims.mine:
        return held
    try:
        jobs = load_jobs(db, claims.mine)
        if jobs:
            pipeline = get_pipeline(jobs[0].model.path, jobs[0].model.sha256, device=device, dtype=dtype,
                                    max_batch_size=batch_size)
            halvings = pipeline.oom_halvings
            todo = [j for j in jobs if j.status != "done"]
            held.counts.skipped += len(jobs) - len(todo)
            held.batch = _engine_part(todo, pipeline, store, db, run_id, held.counts, on_event, templates_dir, line)
            held.oom_halvings = pipeline.oom_halvings - halvings
    except BaseException:
        try:  # its batches in flight are recorded before the claims go back
            line.settle()
        except Exception:
            log.exception("a delivery failed while the rendering beside it failed too")
        held.release()
        raise
    return held


def render_jobs(jobs: Sequence[RenderJob], *, pipeline: Pipeline, store: AssetStore, db: Database, run_id: int,
                on_event: EventFn | None = None, templates_dir: str | None = None, overlap: bool | None = None) -> RenderCounts:
    """Render, post-process, store and record ``jobs`` (all of one model and batch group), one engine batch
    (``pipeline.max_batch_size`` images) at a time, so progress and records follow each batch.

    Returns the counts (rendered / failed / skipped) and the seconds spent per stage, which the run adds up, with
    ``wait``: this thread's time spent on deliveries instead of rendering. ``templates_dir``: where brand kits are
    found for variants with an overlay (None: the project's templates/). ``overlap`` (default :data:`OVERLAP`):
    deliver each batch on a background thread while the next one renders.

    A failure of the engine fails that batch's variants; a failure while encoding or storing one image fails that
    variant only. Such failures are recorded and counted, not raised: one bad asset does not stop a run. A database
    that fails for good raises, once the delivery in flight has ended.
    """
    todo = [j for j in jobs if j.status != "done"]
    counts = RenderCounts(skipped=len(jobs) - len(todo))
    size = max(1, pipeline.max_batch_size)
    background = (OVERLAP if overlap is None else overlap) and len(todo) > size  # one batch has nothing to overlap
    with DeliveryLine(counts, background=background) as line:
        last = _engine_part(todo, pipeline, store, db, run_id, counts, on_event, templates_dir, line)
        if last is not None:
            line.submit(deliver_batch, last, store=store, db=db, run_id=run_id, counts=counts, on_event=on_event,
                        overlays=OverlayStep(templates_dir))
    return counts


def _engine_part(todo: Sequence[RenderJob], pipeline: Pipeline, store: AssetStore, db: Database, run_id: int,
                 counts: RenderCounts, on_event: EventFn | None, templates_dir: str | None,
                 line: DeliveryLine) -> RenderedBatch | None:
    """Render ``todo`` one engine batch at a time, each batch's delivery handed to ``line`` before the next one
    renders; returns the last batch, rendered and not delivered (None when there is nothing to render)."""
    size = max(1, pipeline.max_batch_size)
    for i in range(0, len(todo), size):
        batch = _render_batch(todo[i : i + size], pipeline, store)
        if i + size >= len(todo):
            return batch
        line.submit(deliver_batch, batch, store=store, db=db, run_id=run_id, counts=counts, on_event=on_event,
                    overlays=OverlayStep(templates_dir))
    return None


def _hires_pass(todo: Sequence[RenderJob], results: list[GenerationResult], pipeline: Pipeline,
                failed: list[tuple[list[RenderJob], str]]) -> dict[int, GenerationResult]:
    """Results ready for the pixel steps, by position in ``todo``: the first pass's, or the hires fix's for jobs
    whose chain starts with one (one engine call per distinct chain). Jobs that failed here are left out (and
    added to ``failed``)."""
    ready: dict[int, GenerationResult] = {}
    groups: dict[str, list[int]] = {}
    for k, job in enumerate(todo):
        try:
            chain = job.chain
        except ChainError as exc:
            failed.append(([job], f"postprocess: {exc}"))
            continue
        if chain.hires is None:
            ready[k] = results[k]
        else:
            groups.setdefault(job.spec.postprocess, []).append(k)
    for members in groups.values():
        jobs = [todo[k] for k in members]
        try:
            out = apply_hires(pipeline, [results[k] for k in members], jobs[0].chain.hires, upscaler_resolver(jobs[0], pipeline.device))  # type: ignore[arg-type]
        except Exception as exc:  # recorded against the variants being re-rendered; the others go on
            log.exception("hires fix of %d variants failed", len(members))
            failed.append((jobs, f"hires fix failed: {type(exc).__name__}: {exc}"))
            continue
        ready.update(zip(members, out))
    return ready


def _attach_refiner(pipeline: Pipeline, jobs: Sequence[RenderJob]) -> None:
    """Give ``pipeline`` the refiner its jobs pin (one per batch: the plan's batch groups keep them apart), loaded
    once per process like any checkpoint, on the base's device and in its dtype, and checked against the pinned
    sha256 (a file replaced since planning would finish the images with other weights than recorded)."""
    refs = {job.refiner.sha256: job.refiner for job in jobs if job.refiner is not None}
    if not refs:
        return
    if len(refs) > 1:
        raise ValueError("one batch pins several refiners")
    (ref,) = refs.values()
    refiner = get_pipeline(ref.path, ref.sha256, device=str(pipeline.device), dtype=str(pipeline.dtype).removeprefix("torch."),
                           max_batch_size=pipeline.max_batch_size)
    if refiner.models.checkpoint.sha256 != ref.sha256:
        raise ValueError(f"refiner {ref.path}: the file's sha256 is {refiner.models.checkpoint.sha256[:12]}, not the "
                         f"{ref.sha256[:12]} the variants were planned with (register the file again)")
    if refiner.models.family.latent_scale != pipeline.models.family.latent_scale:
        raise ValueError(f"refiner {ref.path}: a {refiner.models.family.label} model cannot finish a "
                         f"{pipeline.models.family.label} render")
    pipeline.refiner = refiner


def _render_batch(todo: Sequence[RenderJob], pipeline: Pipeline, store: AssetStore) -> RenderedBatch:
    """The engine part of a batch: its requests, the engine call and a chain's hires fix. Failures are not recorded
    here but handed on with the batch, for its delivery to record in order."""
    t0 = time.perf_counter()
    batch = RenderedBatch(pipeline.device)
    requests: list[GenerationRequest] = []
    for job in todo:
        try:
            layer = job.product_layer(store.get)
            requests.append(job.request(layer, job.controls(store.get)))
            batch.jobs.append(job)
            batch.layers.append(layer)
        except (AdapterError, ValueError) as exc:  # an unreadable record or a file gone from ``models``: this one only
            batch.failed.append(([job], f"render failed: {exc}"))
    if not batch.jobs:
        return batch
    try:
        _attach_refiner(pipeline, batch.jobs)
        results = pipeline.generate(requests)
    except Exception as exc:  # engine errors: record them against the batch and carry on with the run
        log.exception("render of %d variants failed", len(batch.jobs))
        batch.failed.append((batch.jobs, f"render failed: {type(exc).__name__}: {exc}"))
        batch.jobs, batch.layers = [], []
        return batch
    batch.results = _hires_pass(batch.jobs, results, pipeline, batch.failed)
    batch.engine_seconds = time.perf_counter() - t0
    return batch
