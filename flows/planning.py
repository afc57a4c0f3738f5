"""Planning a run: brief rows x channels x prompt variations x seeds -> variants, each with a stable identity.

For every valid row and each of its channels:

* the channel's prompt template is rendered (:func:`flows.templating.render_prompts`, combinatorial
  ``{a|b}`` variations) into one or more prompt variations, each checked against the prompt blocklist (the
  ``blocklist`` setting's terms and the campaign's ``blocked_terms``, :mod:`flows.content_filter`): a template or a
  style preset may add what no cell held, and such a row is refused naming the channel, template and term;
* ``variants`` images are planned; image ``i`` uses prompt variation ``i mod len(variations)`` and seed
  ``row.seed + i`` (A1111's batch convention, so a seed seen in the gallery reproduces in any SD tool); a row
  whose last seed would pass ``2**63 - 1`` is refused (brief validation refuses it first), never wrapped;
* the generation size is the model's native area at the channel's aspect ratio; post-processing scales the
  image to cover the channel's exact size with Lanczos and centre-crops (``cover-lanczos(WxH)``), unless the
  channel sets an upscale chain (``channels.yaml`` ``upscale:``, see :mod:`engine.upscale.chain`). A chain's
  model files are resolved like row models (path as written, relative to the current folder), must be
  upscalers, and pass the row's licence check like its checkpoint; the variant's ``postprocess`` is then the
  canonical chain with each file pinned by its sha256 (``model(4x.pth, sha256=...)``), so the identity changes
  when the file's bytes do, and rendering finds the file by its hash in ``models``.

A variant's settings are one record, :class:`storage.variants.VariantSpec`; its *identity* is a sha256 over
everything that determines the delivered file (campaign, row, channel, template, prompt, negative prompt, seed, model
sha256, sampler, steps, CFG, clip skip, sizes, format, post-processing, the LoRA / embedding files with their
strengths, pinned by sha256: :mod:`flows.adapters`, and the fast mode: row cell > channel key > run setting,
:mod:`flows.fast_setting`). Re-running a brief plans the same identities, so finished variants are skipped; editing a
row's prompt makes new identities (new assets), and never overwrites an old file.

A row's ``model`` must be a file in one of the model folders (:func:`model_folders`: the ``model_dirs`` setting, and
the folder of the run's default model) unless ``allow_any_model_path`` is set: the refusal is decided from the path
alone, before the file is looked at, so a brief cannot learn whether a file exists elsewhere or how big it is. The
files of a channel's upscale chain come from the operator's ``channels.yaml``, not from the brief, and are not
restricted.

Problems found while planning (template errors, a missing model file, a model outside the model folders, a licence
that forbids the row's use) are reported like brief problems, with file, line and column; ``strict`` turns any of
them into a rejection.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.checkpoint import CheckpointError
from engine.request_limits import size_problem
from engine.upscale.chain import MAX_SIDE, Hires
from flows.brief import SEED_LIMIT, Brief, BriefError, BriefProblem, BriefRow
from flows.adapters import AdapterProblem, PlannedAdapter, PromptAdapters, pins_text
from flows.brief_limits import COLUMN_LENGTHS, MODEL_NAME_LENGTH, TEMPLATE_LENGTH
from flows.channels import ChannelFormat, native_size_for
from flows.content_filter import BlockedPrompt, check_prompts
from flows.fast_setting import fast_for
from flows.licence_policy import check_license
from flows.model_registry import ModelInfo
from flows.safe_text import quoted
from flows.settings import Settings
from flows.styles import StylePreset
from flows.templating import PromptVariant, TemplateError, render_prompts
from flows.input_images import FolderSource, InputImage, InputSource
from flows.brand.rows import OverlayRowProblem, RowOverlays
from flows.row_inputs import InputProblem, RowInputs
from storage.variants import VariantSpec

__all__ = ["Plan", "PlannedVariant", "model_folders", "plan_brief"]

ModelResolver = Callable[[str], ModelInfo]


@dataclass(frozen=True)
class PlannedVariant:
    """One planned image: the row, channel, prompt variation and model it came from, and its settings (``spec``,
    the record that recording, rendering and the gallery share)."""

    row: BriefRow
    channel: ChannelFormat
    prompt: PromptVariant
    model: ModelInfo
    spec: VariantSpec
    # (chain step index, model) of every upscaler file the channel's chain uses, in chain order
    upscalers: tuple[tuple[int, ModelInfo], ...] = ()
    # the LoRA and embedding files its prompts name (pinned in ``spec.adapters``)
    adapters: tuple[PlannedAdapter, ...] = ()
    # the ControlNet its row's layout image steers it with (pinned in ``spec.inputs``)
    controlnet: ModelInfo | None = None

    @property
    def identity(self) -> str:
        return self.spec.identity

    @property
    def storage_key(self) -> str:
        return self.spec.storage_key

    @property
    def batch_group(self) -> tuple:
        """Variants that can share a model load and a U-Net batch."""
        spec = self.spec
        return (spec.model_sha256, spec.gen_width, spec.gen_height, spec.steps, spec.sampler, spec.clip_skip,
                _lora_set(spec.adapters), spec.fast)


@dataclass
class Plan:
    brief: Brief
    variants: list[PlannedVariant]
    problems: list[BriefProblem]  # the brief's own problems, then planning problems
    skipped_rows: list[BriefRow] = field(default_factory=list)  # valid in the brief, unplannable
    # The images the planned variants pin (product packshots, masks, control images), by store key: the run puts
    # them in the asset store before it records the plan.
    input_images: dict[str, InputImage] = field(default_factory=dict)

    def by_row(self) -> dict[tuple[str, str], list[PlannedVariant]]:
        out: dict[tuple[str, str], list[PlannedVariant]] = {}
        for v in self.variants:
            out.setdefault((v.row.campaign, v.row.row_id), []).append(v)
        return out


def cover_description(channel: ChannelFormat) -> str:
    return f"cover-lanczos({channel.width}x{channel.height})"


class ChainProblem(ValueError):
    """A channel's upscale chain that cannot be used for a row; ``column`` is the brief column to blame."""

    def __init__(self, message: str, column: str = "channels"):
        self.column = column
        super().__init__(message)


ResolvedChain = tuple[str, tuple[tuple[int, ModelInfo], ...]]  # (postprocess text, upscalers)


def resolve_chain(channel: ChannelFormat, gen: tuple[int, int], resolve: Callable[[str], ModelInfo]) -> ResolvedChain:
    """The variant's ``postprocess`` text and the upscaler models of ``channel``'s chain; ChainProblem if a file
    is missing, is no upscaler, differs from its pin, or the chain would make an absurdly large image."""
    chain = channel.upscale
    if chain is None or chain.is_plain_fit:
        # fit(WxH) alone is what adforge always did: keep its text, and with it every existing identity.
        return cover_description(channel), ()
    where = channel.upscale_key
    pins: dict[int, str] = {}
    scales: dict[int, int] = {}
    upscalers: list[tuple[int, ModelInfo]] = []
    for index, file in chain.model_files():
        try:
            info = resolve(file)
        except CheckpointError as exc:
            raise ChainProblem(f"{where}: upscaler file {file!r} cannot be used: {exc}") from None
        if info.kind != "upscaler":
            raise ChainProblem(f"{where}: {file!r} is a {info.family} model, not an upscaler")
        pinned = getattr(chain.steps[index], "sha256", None)
        if pinned and pinned != info.sha256:
            raise ChainProblem(f"{where}: the chain pins {file!r} to sha256 {pinned}, but the file has {info.sha256}")
        pins[index], scales[index] = info.sha256, info.scale
        # Where the chain found the file (a registered row may remember an older place): rendering loads it there.
        upscalers.append((index, replace(info, path=str(Path(file).resolve()))))
    chain = chain.pinned(pins)
    for step, (w, h) in zip(chain.steps, chain.sizes(*gen, scales)):
        if max(w, h) > MAX_SIDE:
            raise ChainProblem(f"{where}: {step.canonical(pins=False)} would make a {w}x{h} image from {gen[0]}x{gen[1]} "
                               f"(more than {MAX_SIDE} px a side)")
        if isinstance(step, Hires) and (problem := size_problem(w, h, tiled=step.tile != 0)):
            raise ChainProblem(f"{where}: {step.canonical(pins=False)} would render {w}x{h} from {gen[0]}x{gen[1]}: {problem[1]}")
    return chain.canonical(), tuple(upscalers)


def plan_brief(
    brief: Brief,
    settings: Settings,
    *,
    channels: Mapping[str, ChannelFormat],
    styles: Mapping[str, StylePreset],
    resolve_model: ModelResolver,
    default_model: str | os.PathLike[str],
    strict: bool = False,
    inputs: InputSource | None = None,
) -> Plan:
    """``inputs``: where the rows' image paths are read from (default: the brief's folder)."""
    problems = list(brief.problems)
    variants: list[PlannedVariant] = []
    skipped: list[BriefRow] = []
    models: dict[str, ModelInfo | str] = {}
    chains: dict[tuple[str, tuple[int, int]], ResolvedChain | ChainProblem] = {}
    upscaler_files: dict[str, ModelInfo | CheckpointError] = {}
    file = os.fspath(brief.path)
    # settings.templates_dir is the templates root (channels.yaml, styles.yaml, prompts/); None = the project's.
    prompts_dir = Path(settings.templates_dir) / "prompts" if settings.templates_dir else None

    folders = None if settings.allow_any_model_path else model_folders(settings, default_model)
    plan_images: dict[str, InputImage] = {}
    adapters = PromptAdapters(settings, resolve_model)
    images = RowInputs(inputs or FolderSource(brief.path.parent), settings, resolve_model)
    overlays = RowOverlays(settings.templates_dir)

    for row in brief.rows:
        refusal = _row_refusal(row, folders)
        if refusal:
            problems.append(BriefProblem(file, row.line, *refusal))
            skipped.append(row)
            continue
        model_path = row.model or os.fspath(default_model)
        if model_path not in models:
            try:
                models[model_path] = resolve_model(model_path)
            except CheckpointError as exc:
                models[model_path] = f"model {model_path!r} cannot be used: {exc}"
        model = models[model_path]
        if not isinstance(model, str) and len(model.name) > MODEL_NAME_LENGTH:
            model = (f"model {model_path!r} is named {quoted(model.name, 40)}, longer than the {MODEL_NAME_LENGTH} "
                     "characters the database keeps (models.name)")
        elif not isinstance(model, str) and model.kind != "checkpoint":
            what = {"upscaler": "an upscaler", "lora": "a LoRA", "vae": "a VAE"}.get(model.kind, f"a {model.kind} file")
            model = f"model {model_path!r} is {what}, not a checkpoint" + (
                " (upscalers go in a channel's upscale chain)" if model.kind == "upscaler" else "")
        if isinstance(model, str):
            problems.append(BriefProblem(file, row.line, "model", model))
            skipped.append(row)
            continue
        refusal = check_license(model, row.license)
        if refusal:
            problems.append(BriefProblem(file, row.line, "license", refusal))
            skipped.append(row)
            continue
        row_variants: list[PlannedVariant] = []
        try:
            product = images.product(row)
            control, controlnet = images.control(row, model)
            for channel_name in row.channels:
                channel = channels[channel_name]
                prompts = render_prompts(row, channel, styles=styles, channels=channels, templates_dir=prompts_dir)
                if not prompts:
                    raise TemplateError(f"template '{channel.template}' rendered no prompt for channel '{channel_name}'")
                _check_stored_names(channel, prompts)
                check_prompts(settings.blocklist, row.blocked_terms, channel_name, prompts)  # what templates add
                gen_w, gen_h = native_size_for(channel, model.native_size)
                # The engine's own limits, so a channel or a model's native size it cannot render is a planning problem.
                if problem := size_problem(gen_w, gen_h, tiled=False):
                    raise ChainProblem(f"channel '{channel_name}' at native size {model.native_size}: {problem[1]}")
                if max(channel.width, channel.height) > MAX_SIDE:
                    raise ChainProblem(f"channel '{channel_name}' delivers {channel.width}x{channel.height}, more than {MAX_SIDE} px a side")
                post, upscalers = _row_chain(chains, upscaler_files, channel, (gen_w, gen_h), resolve_model, row.license)
                refiner = adapters.refiner(row, model)
                variant_inputs = images.pins(row, channel, product, control)
                overlay = overlays.pin(row, channel, images.product_box(row, channel))
                prompt_adapters = [adapters.resolve(row, p.prompt, p.negative_prompt, model) + ((refiner,) if refiner else ())
                                   for p in prompts]
                for i in range(row.variants):
                    prompt = prompts[i % len(prompts)]
                    used = prompt_adapters[i % len(prompts)]
                    spec = VariantSpec(
                        campaign=row.campaign, row_key=row.row_id, channel=channel.name, template=prompt.template_name,
                        variant_index=i, prompt=prompt.prompt, negative_prompt=prompt.negative_prompt,
                        seed=row.seed + i, model_sha256=model.sha256, sampler=settings.sampler,
                        steps=settings.steps, cfg_scale=settings.cfg_scale, clip_skip=settings.clip_skip,
                        gen_width=gen_w, gen_height=gen_h, out_width=channel.width, out_height=channel.height,
                        out_format=channel.format, out_max_kb=channel.max_kb, postprocess=post,
                        adapters=pins_text(used), inputs=variant_inputs, overlay=overlay,
                        fast=fast_for(row.fast, channel.fast, settings.fast),
                    )
                    row_variants.append(PlannedVariant(row=row, channel=channel, prompt=prompt, model=model, spec=spec,
                                                       upscalers=upscalers, adapters=used, controlnet=controlnet))
        except TemplateError as exc:
            problems.append(BriefProblem(file, row.line, "channels", str(exc)))
            skipped.append(row)
            continue
        except (ChainProblem, AdapterProblem, InputProblem, OverlayRowProblem, BlockedPrompt) as exc:
            problems.append(BriefProblem(file, row.line, exc.column, str(exc)))
            skipped.append(row)
            continue
        variants.extend(row_variants)
        images.keep(row, plan_images)

    if strict and problems:
        raise BriefError(problems)
    if not variants and problems:
        raise BriefError(problems + [BriefProblem(file, None, None, "no row of the brief can be rendered")])
    return Plan(brief=brief, variants=variants, problems=problems, skipped_rows=skipped, input_images=plan_images)


def _lora_set(adapters: str) -> str:
    """The LoRA and refiner part of a variant's adapters: variants that differ in it cannot share a U-Net batch
    (embeddings only change the text encoding, so they can)."""
    from storage.variants import adapters_text, parse_adapters

    return adapters_text([p for p in parse_adapters(adapters) if p.kind != "embedding"])


def model_folders(settings: Settings, default_model: str | os.PathLike[str]) -> list[Path]:
    """The folders a brief row's ``model`` may name a file in, resolved (symlinks followed)."""
    if settings.model_dirs:
        folders = [Path(d) for d in settings.model_dirs.split(os.pathsep) if d]
    else:
        from engine.bundled import bundled_model_path

        folders = [Path("models"), bundled_model_path().parent]
    folders.append(Path(default_model).parent)
    return list(dict.fromkeys(f.resolve() for f in folders))


def _row_refusal(row: BriefRow, folders: list[Path] | None) -> tuple[str, str] | None:
    """(column, message) if the row cannot be planned whatever its model holds: a model path outside the model
    folders, or seeds past 2**63 - 1 (a row built without :func:`flows.brief.read_brief` may have either)."""
    if row.seed + row.variants - 1 >= SEED_LIMIT:
        return "seed", (f"{row.seed} + {row.variants} variants passes 2**63 - 1, the largest seed "
                        f"(use a seed of at most {SEED_LIMIT - row.variants})")
    if row.model is None or folders is None:
        return None
    try:
        # resolve(): '..' and symlinks cannot lead out of a folder. Only the path is looked at, so the answer is
        # the same whether or not the file exists.
        where = Path(row.model).resolve()
        inside = any(where.is_relative_to(folder) for folder in folders)
    except (OSError, ValueError, RuntimeError):
        inside = False
    if inside:
        return None
    return "model", (f"model {quoted(row.model, 200)} is not in a model folder (setting model_dirs; "
                     "allow_any_model_path lifts this): put the file there, or ask whoever runs adforge to add its folder")


def _check_stored_names(channel: ChannelFormat, prompts: list[PromptVariant]) -> None:
    """The channel and template names go to bounded columns: a channels.yaml name too long for them is a problem
    here, not a database error half-way through the run."""
    channel_column, most = COLUMN_LENGTHS["channels"]
    if len(channel.name) > most:
        raise TemplateError(f"channel name {quoted(channel.name, 40)} is longer than the {most} characters the database "
                            f"keeps ({channel_column})")
    for prompt in prompts:
        if len(prompt.template_name) > TEMPLATE_LENGTH:
            raise TemplateError(f"template name {quoted(prompt.template_name, 40)} is longer than the {TEMPLATE_LENGTH} "
                                "characters the database keeps (prompts.template)")


def _row_chain(cache: dict, files: dict[str, ModelInfo | CheckpointError], channel: ChannelFormat, gen: tuple[int, int],
               resolve_model: ModelResolver, license_constraint: str) -> ResolvedChain:
    """``channel``'s resolved chain (once per plan for each channel and generation size; each file looked up
    once), licence-checked for a row with ``license_constraint``: an upscaler is refused like a checkpoint, under
    the 'license' column."""

    def resolve(path: str) -> ModelInfo:
        if path not in files:
            try:
                files[path] = resolve_model(path)
            except CheckpointError as exc:
                files[path] = exc
        found = files[path]
        if isinstance(found, CheckpointError):
            raise found
        return found

    key = (channel.name, gen)
    if key not in cache:
        try:
            cache[key] = resolve_chain(channel, gen, resolve)
        except ChainProblem as exc:
            cache[key] = exc
    resolved = cache[key]
    if isinstance(resolved, ChainProblem):
        raise resolved
    for _, info in resolved[1]:
        refusal = check_license(info, license_constraint)
        if refusal:
            raise ChainProblem(f"channel '{channel.name}' upscale chain ({channel.upscale_key}): {refusal}", column="license")
    return resolved


def default_model_path(settings: Settings) -> Path:
    """The configured model, else the bundled one."""
    if settings.model:
        return Path(settings.model)
    from engine.bundled import bundled_model_path

    return bundled_model_path()
