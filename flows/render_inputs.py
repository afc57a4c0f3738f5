"""What a render job reads besides its model: the brief's input images from the asset store (checked against the
sha256 its variant pins, cached per process), turned into the product layer and the ControlNet inputs."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable

from PIL import Image

from engine.adapters.refs import AdapterFile
from engine.packshot import Placement, ProductLayer, packshot_rgba, product_layer
from engine.requests import ControlUse
from flows.input_images import input_key
from storage.variants import ModelRef, VariantSpec, parse_inputs

__all__ = ["InputReader", "control_model", "controls_of", "product_layer_of"]

InputReader = Callable[[str], bytes]  # store key -> bytes
_INPUTS: dict[str, Image.Image] = {}
_INPUTS_LOCK = threading.Lock()


def _open_input(read: InputReader, sha256: str, suffix: str, name: str) -> Image.Image:
    """An input image by its pin, read from the store once per process and checked against its sha256."""
    key = input_key(sha256, suffix)
    with _INPUTS_LOCK:
        cached = _INPUTS.get(key)
    if cached is not None:
        return cached
    try:
        data = read(key)
    except KeyError:
        raise ValueError(f"input image {name!r} ({key}) is not in the asset store; run the brief again to store it") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"input image {name!r}: the stored bytes at {key} do not have the sha256 the variant pins")
    image = Image.open(io.BytesIO(data))
    image.load()
    with _INPUTS_LOCK:
        if len(_INPUTS) >= 64:  # a long-lived worker sees many briefs: keep the cache bounded
            _INPUTS.pop(next(iter(_INPUTS)))
        _INPUTS[key] = image
    return image


def control_model(inputs: str) -> str | None:
    try:
        control = parse_inputs(inputs).control
    except ValueError:
        return None  # rendering then fails that variant with the record's own error
    return None if control is None else control.model


def product_layer_of(spec: VariantSpec, read: InputReader) -> ProductLayer | None:
    """The placed packshot of ``spec`` at its delivered size, or None for a variant without one."""
    product = parse_inputs(spec.inputs).product
    if product is None:
        return None
    image = _open_input(read, product.image, product.suffix, product.file)
    mask = None if product.mask is None else _open_input(read, product.mask, product.mask_suffix or ".png", product.file)
    return product_layer(packshot_rgba(image, mask), (spec.out_width, spec.out_height), Placement.parse(product.placement))


def controls_of(spec: VariantSpec, read: InputReader, controlnet: ModelRef | None) -> tuple[ControlUse, ...]:
    """The ControlNet inputs of ``spec``: its layout image prepared at the generation size, and the file
    (``controlnet``: its ``models`` row)."""
    from engine.control_images import prepare_control_image

    control = parse_inputs(spec.inputs).control
    if control is None:
        return ()
    if controlnet is None:
        raise ValueError(f"ControlNet '{control.model_name}': no model row has sha256 {control.model}; register the "
                         f"file again (adforge models add FILE --license ...)")
    image = _open_input(read, control.image, control.suffix, control.file)
    prepared = prepare_control_image(control.type, image, spec.gen_width, spec.gen_height)
    file = AdapterFile(control.model_name, controlnet.path, controlnet.sha256)
    return (ControlUse(file, prepared, control.type, control.strength, control.start, control.end),)
