"""Adapters in a plan: the LoRA and embedding files a variant's prompts name, and the run's SDXL refiner, checked
and pinned.

A prompt names a LoRA with A1111's tag (``<lora:acme-style:0.8>``) and an embedding by writing its name
(``easynegative``); both are looked up by file stem in the run's folders (settings ``lora_dir`` /
``embeddings_dir``), never as paths, so a brief reaches no other file. Each file is a model like a checkpoint: it
gets its row in ``models`` (kind ``lora`` / ``embedding``, family, sha256, licence), must be for the checkpoint's
family, and passes the row's licence check (many community LoRAs are non-commercial). The variant then records
every file by sha256 with its strengths (:func:`storage.variants.adapters_text`), so its identity changes when a
file's bytes or a strength do, and rendering loads exactly those files.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from engine.adapters.refs import AdapterError
from engine.checkpoint import CheckpointError
from engine.tokenizer import load_clip_tokenizer
from flows.brief import BriefRow
from flows.licence_policy import check_license
from flows.model_registry import ModelInfo
from flows.settings import Settings
from storage.variants import AdapterPin, adapters_text

__all__ = ["AdapterProblem", "PlannedAdapter", "PromptAdapters", "family_base"]

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


class AdapterProblem(ValueError):
    """An adapter a row's prompts name that cannot be used; ``column`` is the brief column to blame."""

    def __init__(self, message: str, column: str = "style"):
        self.column = column
        super().__init__(message)


@dataclass(frozen=True)
class PlannedAdapter:
    kind: str  # lora | embedding | refiner
    model: ModelInfo
    te: float | None = None
    unet: float | None = None
    switch: float | None = None  # refiner: the share of the schedule the base runs first

    @property
    def pin(self) -> AdapterPin:
        return AdapterPin(self.kind, self.model.name, self.model.sha256, self.te, self.unet, self.switch)


def family_base(family: str) -> str:
    """``sd1-inpaint`` -> ``sd1``: what adapters are made for."""
    return family.split("-")[0]


class PromptAdapters:
    """Resolves the adapters of a plan's prompts, each file inspected once per plan."""

    def __init__(self, settings: Settings, resolve_model: Callable[[str], ModelInfo]):
        from engine.adapters.library import AdapterLibrary

        self.library = AdapterLibrary([Path(settings.lora_dir)], [Path(settings.embeddings_dir)])
        self._resolve_model = resolve_model
        self._models: dict[str, ModelInfo | AdapterProblem] = {}
        self._refiner_path = settings.refiner
        self._refiner_switch = settings.refiner_switch
        self._refiner: ModelInfo | AdapterProblem | None = None

    def refiner(self, row: BriefRow, model: ModelInfo) -> PlannedAdapter | None:
        """The settings' SDXL refiner for ``row`` on ``model`` (None without one). Only an SDXL base render can
        be finished by it: a refiner set for a run whose row renders on another family is that row's problem, not
        a silent skip (the run would deliver images the settings say were refined)."""
        if not self._refiner_path:
            return None
        if self._refiner is None:
            try:
                info = self._resolve_model(self._refiner_path)
                if info.kind != "checkpoint" or info.family != "sdxl-refiner":
                    what = info.kind_phrase if info.kind != "checkpoint" else f"a {info.family} checkpoint"
                    raise AdapterProblem(f"refiner {self._refiner_path!r} is {what}, not an SDXL refiner", "model")
                self._refiner = info
            except (CheckpointError, AdapterError, OSError) as exc:
                self._refiner = AdapterProblem(f"refiner {self._refiner_path!r} cannot be used: {exc}", "model")
            except AdapterProblem as exc:
                self._refiner = exc
        if isinstance(self._refiner, AdapterProblem):
            raise self._refiner
        if model.family != "sdxl":
            raise AdapterProblem(f"the run's refiner '{self._refiner.name}' finishes SDXL base renders, but the row's "
                                 f"model '{model.name}' is {FAMILY_LABELS.get(family_base(model.family), model.family)}", "model")
        refusal = check_license(self._refiner, row.license)
        if refusal:
            raise AdapterProblem(refusal, "license")
        return PlannedAdapter("refiner", self._refiner, switch=self._refiner_switch)

    def _model(self, path: str, name: str, kind: str) -> ModelInfo:
        if path not in self._models:
            try:
                info = self._resolve_model(path)
                if info.kind != kind:
                    what = {"lora": "a LoRA", "embedding": "an embedding"}[kind]
                    raise AdapterProblem(f"{kind} '{name}' ({path}) is {info.kind_phrase}, not {what}")
                # The name prompts call it, whatever the models table calls the file.
                self._models[path] = replace(info, name=name)
            except (CheckpointError, AdapterError) as exc:
                self._models[path] = AdapterProblem(f"{kind} '{name}' cannot be used: {exc}")
            except AdapterProblem as exc:
                self._models[path] = exc
        found = self._models[path]
        if isinstance(found, AdapterProblem):
            raise found
        return found

    def resolve(self, row: BriefRow, prompt: str, negative: str, model: ModelInfo) -> tuple[PlannedAdapter, ...]:
        """The adapters ``prompt`` / ``negative`` name, for ``row`` on checkpoint ``model``; AdapterProblem names
        the brief column that carries the name (else ``style``: a preset or template put it there)."""
        try:
            found = self.library.resolve(prompt, negative, load_clip_tokenizer())
        except AdapterError as exc:
            raise AdapterProblem(str(exc), _blame(row, str(exc))) from None
        planned: list[PlannedAdapter] = []
        for use in found.loras:
            info = self._checked(row, use.file.name, str(use.file.path), "lora", model)
            planned.append(PlannedAdapter("lora", info, use.te, use.unet))
        for file in found.embeddings:
            planned.append(PlannedAdapter("embedding", self._checked(row, file.name, str(file.path), "embedding", model)))
        return tuple(planned)

    def _checked(self, row: BriefRow, name: str, path: str, kind: str, model: ModelInfo) -> ModelInfo:
        try:
            info = self._model(path, name, kind)
        except AdapterProblem as exc:
            raise AdapterProblem(str(exc), _blame(row, name)) from None
        if info.family == "sdxl-refiner":
            raise AdapterProblem(f"{kind} '{name}' is for the SDXL refiner; a prompt's LoRAs go into the row's model "
                                 f"'{model.name}'", _blame(row, name))
        want, have = family_base(model.family), family_base(info.family)
        if have in FAMILY_LABELS and want in FAMILY_LABELS and have != want:
            raise AdapterProblem(f"{kind} '{name}' is for {FAMILY_LABELS[have]}, but the row's model '{model.name}' is "
                                 f"{FAMILY_LABELS[want]}", _blame(row, name))
        refusal = check_license(info, row.license)
        if refusal:
            raise AdapterProblem(refusal, "license")
        return info


def pins_text(adapters: tuple[PlannedAdapter, ...]) -> str:
    return adapters_text([a.pin for a in adapters])


def _blame(row: BriefRow, text: str) -> str:
    """The brief column whose cell names the adapter mentioned in ``text`` (quoted there), else ``style``."""
    names = re.findall(r"'([^']+)'", text)
    cells = {"subject": row.subject, "message": row.message, "audience": row.audience,
             "negative_prompt": row.negative_prompt, **{k: str(v) for k, v in row.extra.items()}, "style": row.style}
    for name in names:
        for column, value in cells.items():
            if value and name.lower() in str(value).lower():
                return column
    return "style"
