"""A brief row's input images at planning time: the product packshot (and mask) and the ControlNet layout, each file
read and checked once per plan, the ControlNet chosen for the row's model, and the pins that go into every variant.

Problems are :class:`InputProblem`s naming the brief column to blame, reported by the planner with file and line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.checkpoint import CheckpointError
from engine.control_library import ControlChoiceError, choose_controlnet
from flows.adapters import family_base
from flows.brief import BriefRow
from flows.channels import ChannelFormat
from flows.input_images import InputError, InputImage, InputSource, read_input
from flows.licence_policy import check_license
from flows.model_registry import ModelInfo
from flows.safe_text import quoted
from flows.settings import Settings
from storage.variants import ControlPin, ProductPin, VariantInputs, inputs_text

__all__ = ["InputProblem", "RowInputs", "controlnet_folders"]


class InputProblem(ValueError):
    """A row's input image or ControlNet that cannot be used; ``column`` is the brief column that names it."""

    def __init__(self, message: str, column: str):
        self.column = column
        super().__init__(message)


def controlnet_folders(settings: Settings) -> list[Path]:
    """Where ControlNets are looked for: the ``controlnet_dir`` setting, then the one shipped beside the bundled model."""
    from engine.bundled import bundled_model_path

    folders = [Path(settings.controlnet_dir), bundled_model_path().parent / "controlnet"]
    return list(dict.fromkeys(f.resolve() for f in folders))


class RowInputs:
    """The rows' input images and ControlNets for one plan."""

    def __init__(self, source: InputSource, settings: Settings, resolve_model: Callable[[str], ModelInfo]):
        self.source = source
        self.folders = controlnet_folders(settings)
        self.resolve_model = resolve_model
        self._files: dict[str, InputImage | InputError] = {}
        self._products: dict[tuple[str, str | None], tuple[int, int] | str] = {}  # trimmed size, or the problem
        self._product_sizes: dict[tuple[str, int], tuple[int, int]] = {}
        self._controlnets: dict[tuple[str, str], ModelInfo | str] = {}
        self._described: dict[Path, ModelInfo | str] = {}
        self._used: dict[tuple[str, int], list[InputImage]] = {}

    # ------------------------------------------------------------------------------------------ images

    def image(self, row: BriefRow, name: str, column: str) -> InputImage:
        if name not in self._files:
            try:
                self._files[name] = read_input(self.source, name)
            except InputError as exc:
                self._files[name] = exc
        found = self._files[name]
        if isinstance(found, InputError):
            raise InputProblem(str(found), column)
        self._used.setdefault((row.row_id, row.line), []).append(found)
        return found

    def product(self, row: BriefRow) -> dict | None:
        """The row's packshot as ProductPin fields (all but the placement), checked: it decodes, and it or its mask
        marks a product that is neither nothing nor everything."""
        from engine.packshot import PlacementError, packshot_rgba

        if not row.product_image:
            return None
        image = self.image(row, row.product_image, "product_image")
        mask = self.image(row, row.product_mask, "product_mask") if row.product_mask else None
        key = (image.sha256, None if mask is None else mask.sha256)
        if key not in self._products:
            try:
                self._products[key] = packshot_rgba(image.open(), None if mask is None else mask.open()).size
            except PlacementError as exc:
                self._products[key] = f"{quoted(row.product_mask or row.product_image)}: {exc}"
        found = self._products[key]
        if isinstance(found, str):
            raise InputProblem(found, "product_mask" if mask is not None else "product_image")
        self._product_sizes[(row.row_id, row.line)] = found
        return {"image": image.sha256, "suffix": image.suffix, "file": image.name,
                "mask": None if mask is None else mask.sha256, "mask_suffix": None if mask is None else mask.suffix}

    def product_box(self, row: BriefRow, channel: ChannelFormat) -> tuple[int, int, int, int] | None:
        """Where the row's product lands on ``channel``'s delivered canvas (after :meth:`product`), or None."""
        from engine.packshot import Placement

        size = self._product_sizes.get((row.row_id, row.line))
        if size is None:
            return None
        placement = Placement.parse(row.placement) if row.placement else channel.product
        return placement.box((channel.width, channel.height), size)

    # ------------------------------------------------------------------------------------------ ControlNet

    def _describe(self, path: Path) -> ModelInfo | str:
        if path not in self._described:
            try:
                self._described[path] = self.resolve_model(str(path))
            except CheckpointError as exc:
                self._described[path] = str(exc)
        return self._described[path]

    def _fits(self, model: ModelInfo) -> Callable[[Path], str | None]:
        def fits(path: Path) -> str | None:
            info = self._describe(path)
            if isinstance(info, str):
                return info
            if info.kind != "controlnet":
                return f"{info.kind_phrase}, not a ControlNet"
            if info.family != family_base(model.family) or model.family == "sdxl-refiner":
                return f"a {info.family} ControlNet, the row's model '{model.name}' is {model.family}"
            return None

        return fits

    def controlnet(self, row: BriefRow, kind: str, model: ModelInfo) -> ModelInfo:
        """The ControlNet for ``kind`` on ``model``: from the ControlNet folders, first folder that has one."""
        key = (kind, model.sha256)
        if key not in self._controlnets:
            fits = self._fits(model)
            problems = []
            for folder in self.folders:
                try:
                    chosen = choose_controlnet(kind, folder, fits)
                    info = self._describe(chosen)
                    assert not isinstance(info, str)
                    self._controlnets[key] = info
                    break
                except ControlChoiceError as exc:
                    problems.append(str(exc))
            else:
                self._controlnets[key] = "; ".join(problems) + " (setting controlnet_dir)"
        found = self._controlnets[key]
        if isinstance(found, str):
            raise InputProblem(found, "control_type")
        if refusal := check_license(found, row.license):
            raise InputProblem(refusal, "license")
        return found

    def control(self, row: BriefRow, model: ModelInfo) -> tuple[dict | None, ModelInfo | None]:
        """The row's layout as ControlPin fields, and its ControlNet; (None, None) for a row without one."""
        cell = row.control
        if cell is None:
            return None, None
        image = self.image(row, cell.image, "control_image")
        controlnet = self.controlnet(row, cell.type, model)
        return {"image": image.sha256, "suffix": image.suffix, "file": image.name, "type": cell.type,
                "model": controlnet.sha256, "model_name": controlnet.name, "strength": cell.strength,
                "start": cell.start, "end": cell.end}, controlnet

    # ------------------------------------------------------------------------------------------ pins

    @staticmethod
    def pins(row: BriefRow, channel: ChannelFormat, product: dict | None, control: dict | None) -> str:
        """The variant's ``inputs`` text for ``channel``: the product placed by the row, else by the channel."""
        return inputs_text(VariantInputs(
            product=None if product is None else ProductPin(**product, placement=row.placement or channel.product.canonical),
            control=None if control is None else ControlPin(**control)))

    def keep(self, row: BriefRow, into: dict[str, InputImage]) -> None:
        """Add the images of a row that was planned to ``into`` (by store key)."""
        for image in self._used.get((row.row_id, row.line), []):
            into[image.key] = image
