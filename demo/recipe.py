"""The recipe of the bundled demo model as data: ``demo/recipe.yaml`` read into :class:`DemoRecipe`.

``DemoRecipe()`` is that file's recipe; ``adforge train demo --out models/adforge-demo.safetensors`` runs
:func:`demo.train.train_demo` on it and reproduces the shipped file (same seeds, same data; float arithmetic on
another CPU may differ in the last bits). Why each setting and stage is what it is, with the measurements that led
there, is the recipe's changelog, ``demo/NOTES.md``.

The file states every setting of :class:`DemoRecipe`; its ``diffusion_stages`` list holds the first stage as what it
changes in :class:`DemoStage`'s defaults, and each later stage as what it changes in the stage before it.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from functools import lru_cache
from pathlib import Path

import yaml

from engine.text_encoder import TextEncoderConfig
from engine.training.diffusion_trainer import DiffusionTrainingConfig
from engine.unet import UNetConfig
from engine.vae import VAEConfig

RECIPE_FILE = Path(__file__).with_name("recipe.yaml")
DEMO_MODEL_NAME = "adforge-demo"
DEMO_LICENSE = "Apache-2.0"  # our own weights, trained from scratch on our own procedural data


@dataclass(frozen=True)
class DemoStage(DiffusionTrainingConfig):
    """One diffusion stage: the generic trainer's settings, plus how the demo's batch sampler draws its batches
    (:func:`demo.dataset.diffusion_sampler`). The trainer reads only its own fields.

    Every field's default draws exactly what a stage drew before the field existed, so a file made then still
    matches its recipe (``--start-from``)."""

    # Share of captions the sampler replaces by a part of themselves ("red", "blue background"), so that a lone
    # word, as in a negative prompt, means something.
    partial_captions: float = 0.0
    # Which wording and attribute heads the sampler uses (demo.scenes.CAPTION_EDITIONS).
    caption_edition: int = 1
    # Share of each batch drawn from the scenes holding a small object of one of ``focus_shapes`` (the rest
    # uniformly from all scenes), for objects too rare in the data to be learned at their natural share.
    focus_share: float = 0.0
    focus_shapes: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def shipped_recipe() -> DemoRecipe:
    """The recipe in ``demo/recipe.yaml``: the one that made the bundled model."""
    return load_recipe(RECIPE_FILE)


def _from_file(name: str):
    """A field whose default is the shipped recipe file's value, so ``DemoRecipe()`` is that recipe."""
    return field(default_factory=lambda: getattr(shipped_recipe(), name))


@dataclass(frozen=True)
class DemoRecipe:
    """Every setting of the demo model's training (demo/recipe.yaml says what each is for)."""

    size: int = _from_file("size")
    unet: UNetConfig = _from_file("unet")
    text: TextEncoderConfig = _from_file("text")
    # The VAE: its start ("block-average", demo/vae_init.py, or "random"), then vae_steps of training on
    # vae_crop-pixel windows of renders.
    vae: VAEConfig = _from_file("vae")
    vae_init: str = _from_file("vae_init")
    vae_steps: int = _from_file("vae_steps")
    vae_batch: int = _from_file("vae_batch")
    vae_crop: int = _from_file("vae_crop")
    vae_lr: float = _from_file("vae_lr")
    # The decoder-only tune (demo/decoder_tune.py) on the training scenes' latents; 0 steps: none.
    decoder_steps: int = _from_file("decoder_steps")
    decoder_batch: int = _from_file("decoder_batch")
    decoder_lr: float = _from_file("decoder_lr")
    # A second decoder tune from the first one's weights, ``decoder_focus_share`` of its samples drawn from the
    # scenes holding a small object of ``decoder_focus_shapes``; 0 steps: none.
    decoder_focus_steps: int = _from_file("decoder_focus_steps")
    decoder_focus_share: float = _from_file("decoder_focus_share")
    decoder_focus_shapes: tuple[str, ...] = _from_file("decoder_focus_shapes")
    dataset_size: int = _from_file("dataset_size")
    # The first diffusion stage, trained from scratch.
    diffusion: DemoStage = _from_file("diffusion")
    # Further diffusion stages, each starting from the previous stage's EMA weights rounded to float16 (exactly
    # what a saved file holds, so a stage can also be started from a shipped file) with a fresh optimizer and its
    # own data order (its own seed). Training on a 2-core CPU is bounded by a session's time; stages let the
    # model grow over several runs while one command still reproduces the whole chain.
    continuations: tuple[DemoStage, ...] = _from_file("continuations")
    seed: int = _from_file("seed")

    def scaled(self, factor: float) -> DemoRecipe:
        """The same recipe with fewer steps and data, for smoke runs and tests."""
        return replace(
            self,
            vae_steps=max(2, int(self.vae_steps * factor)) if self.vae_steps else 0,
            decoder_steps=max(2, int(self.decoder_steps * factor)) if self.decoder_steps else 0,
            decoder_focus_steps=max(2, int(self.decoder_focus_steps * factor)) if self.decoder_focus_steps else 0,
            dataset_size=max(16, int(self.dataset_size * factor)),
            diffusion=_scaled_stage(self.diffusion, factor),
            continuations=tuple(_scaled_stage(c, factor) for c in self.continuations),
        )

    @property
    def stages(self) -> tuple[DemoStage, ...]:
        """Every diffusion stage, the first one included."""
        return (self.diffusion, *self.continuations)


def _scaled_stage(stage: DemoStage, factor: float) -> DemoStage:
    return replace(stage, steps=max(2, int(stage.steps * factor)), warmup=max(1, int(stage.warmup * factor)))


def recipe_json(recipe: DemoRecipe) -> dict:
    """The recipe as JSON values (tuples as lists): what a trained file records in its ``adforge.recipe``."""
    return _jsonable(asdict(recipe))


def recorded_recipe(theirs: dict) -> dict:
    """A file's recorded recipe with the architecture settings added to the engine since it was written filled in
    at their defaults (every such default builds the network the file was made with), so it compares with
    :func:`recipe_json` of today's recipe."""
    out = dict(theirs)
    for key, config in (("unet", UNetConfig), ("text", TextEncoderConfig), ("vae", VAEConfig)):
        if isinstance(out.get(key), dict):
            out[key] = {**_jsonable(asdict(config())), **out[key]}
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# ---- reading the recipe file ------------------------------------------------------------------------------------

_STAGES_KEY = "diffusion_stages"


def load_recipe(path: str | Path = RECIPE_FILE) -> DemoRecipe:
    """Read a recipe file (the layout of demo/recipe.yaml); errors name the file, the stage and the setting."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a recipe (a mapping of settings)")
    data = dict(data)
    stage_list = data.pop(_STAGES_KEY, None)
    if not isinstance(stage_list, list) or not stage_list:
        raise ValueError(f"{path}: {_STAGES_KEY}: a list of one or more diffusion stages is needed")
    stages: list[DemoStage] = []
    previous = DemoStage()
    for n, changes in enumerate(stage_list, start=1):
        previous = _build(DemoStage, changes or {}, f"{path}: diffusion stage {n}", base=previous)
        stages.append(previous)
    settings = [f.name for f in fields(DemoRecipe) if f.name not in ("diffusion", "continuations")]
    unknown = sorted(set(data) - set(settings))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(settings + [_STAGES_KEY])})")
    missing = [name for name in settings if name not in data]
    if missing:
        raise ValueError(f"{path}: setting(s) {', '.join(missing)} missing (a recipe file states every setting)")
    hints = typing.get_type_hints(DemoRecipe)
    values = {name: _coerce(data[name], hints[name], f"{path}: {name}") for name in settings}
    return DemoRecipe(**values, diffusion=stages[0], continuations=tuple(stages[1:]))


def _build(cls: type, values: object, where: str, *, base: object | None = None):
    """``cls`` from a mapping of (some of) its fields; the rest from ``base`` or the field defaults."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {values!r}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(map(str, unknown))} (known: {', '.join(names)})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}: {k}") for k, v in values.items()}
    return replace(base, **kwargs) if base is not None else cls(**kwargs)


def _coerce(value: object, tp: object, where: str):
    """``value`` as type ``tp``: an int is taken for a float (and stored as one, so the recipe's JSON keeps
    ``1.0``), a list for a tuple, a mapping for a dataclass."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no decimal point) as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ValueError(f"{where}: expected {'text' if tp is str else 'true or false'}, got {value!r}")
        return value
    raise TypeError(f"{where}: a setting of type {tp} cannot be read from a recipe file")
