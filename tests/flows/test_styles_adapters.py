"""Brand style presets that carry adapters: how ``loras``, ``trigger`` and ``negative_embeddings`` are read, how
they are added to a rendered prompt, and the file/key errors for what cannot be read."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.styles import PresetLora, load_styles
from flows.template_config import TemplatingConfigError


def _styles(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "styles.yaml"
    path.write_text("styles:\n" + body, encoding="utf-8")
    return path


def test_lora_entries_in_every_spelling(tmp_path: Path) -> None:
    styles = load_styles(_styles(tmp_path, """  acme:
    trigger: acme bottle
    loras: ["acme-style:0.8", plain, {name: split, te: 0.5, unet: 1.2}, {name: both, weight: 0.3}]
    negative_embeddings: [easynegative]
"""))
    acme = styles["acme"]
    assert acme.loras == (PresetLora("acme-style", 0.8, 0.8), PresetLora("plain", 1.0, 1.0), PresetLora("split", 0.5, 1.2),
                          PresetLora("both", 0.3, 0.3))
    prompt, negative = acme.apply("a bottle on a beach", "blurry")
    assert prompt == ("acme bottle, a bottle on a beach <lora:acme-style:0.8> <lora:plain:1> <lora:split:0.5:1.2> "
                      "<lora:both:0.3>")
    assert negative == "blurry, easynegative"
    # Applying twice adds nothing more (a template that already wrote the trigger or the tags keeps one of each).
    assert acme.apply(prompt, negative) == (prompt, negative)
    # An embedding name inside another word is not the embedding: it is still added.
    assert acme.apply("x", "noteasynegativeish")[1] == "noteasynegativeish, easynegative"


@pytest.mark.parametrize("entry, key", [
    ('loras: ["acme:strong"]', "styles.bad.loras[0]"),
    ("loras: [{name: acme, weight: 99}]", "styles.bad.loras[0].weight"),
    ("loras: [{name: 'a<b'}]", "styles.bad.loras[0].name"),
    ("loras: [{weight: 1}]", "styles.bad.loras[0].name"),
    ("loras: acme", "styles.bad.loras"),
    ("negative_embeddings: easynegative", "styles.bad.negative_embeddings"),
    ("negative_embeddings: ['x:y']", "styles.bad.negative_embeddings[0]"),
    ("trigger: [a, b]", "styles.bad.trigger"),
])
def test_bad_adapter_entries_name_the_file_and_key(tmp_path: Path, entry: str, key: str) -> None:
    path = _styles(tmp_path, f"  bad:\n    positive: x\n    {entry}\n")
    with pytest.raises(TemplatingConfigError) as info:
        load_styles(path)
    message = str(info.value)
    assert str(path) in message and f"'{key}" in message and "\n" not in message
