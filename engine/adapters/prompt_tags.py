"""A1111 extra-network tags in prompt text: ``<lora:name:te:unet>`` and its ``<lyco:...>`` alias.

What A1111 (``modules/extra_networks.py``, ``extensions-builtin/Lora/extra_networks_lora.py``) does, and so what
prompts copied from it mean here:

* a tag is ``<kind:args>`` with ``kind`` a word and ``args`` anything up to the next ``>``; the tag is cut out
  of the text and nothing else is touched (no whitespace tidying; CLIP's tokenizer collapses it anyway);
* ``args`` split on ``:``; an item ``key=value`` is named, anything else positional;
* positional 1 is the LoRA's name (spaces and dots allowed), positional 2 the text-encoder strength (default 1),
  named ``te=`` overrides it; positional 3 the U-Net strength, defaulting to the text-encoder strength *after*
  the ``te=`` override, and named ``unet=`` overrides that.

Where this module is deliberately stricter than A1111 (which logs and carries on, so the image silently differs
from what was asked):

* a strength that is not a finite number is an error naming the tag (A1111 raises deep inside activation);
* ``dyn`` (positional 4 or ``dyn=``, a rank limit) is refused rather than ignored: rendering the full-rank LoRA
  would give a different image from the one the prompt describes;
* unknown named keys (a typo such as ``unte=0.5``) and more than four positional fields are errors;
* any other ``<word:...>`` tag (``<hypernet:...>``, an extension's network, ``<LORA:...>`` in another case) is an
  error: A1111 would strip it and skip the network, and passing it to the text encoder as words would be wrong too;
* the same LoRA twice with different strengths is an error (identical repeats merge into one use);
* whitespace around the name and the numbers is ignored (``<lora: my style :0.8>``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.adapters.refs import AdapterError

# A1111's own pattern (re_extra_net), so exactly the same spans count as tags.
TAG_RE = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = frozenset({"lora", "lyco"})  # <lyco:...> is the LyCORIS extension's alias; A1111 maps it to lora
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NAMED_KEYS = ("te", "unet", "dyn")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: the name as the prompt spells it and the two strengths."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    source: str = field(default="", compare=False, repr=False)  # the tag as written, for error messages

    @property
    def shown(self) -> str:
        return self.source or f"<lora:{self.name}:{self.te:g}:{self.unet:g}>"


def _number(tag: str, what: str, text: str) -> float:
    value = text.strip()
    if not _NUMBER.fullmatch(value):
        raise AdapterError(None, f"{tag}: the {what} strength {text!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise AdapterError(None, f"{tag}: the {what} strength {text!r} is out of range")
    return number


def _parse_tag(tag: str, args: str) -> LoraTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        parts = item.split("=", 2)  # A1111: exactly one "=" makes a named item
        if len(parts) == 2:
            key = parts[0].strip()
            if key not in _NAMED_KEYS:
                raise AdapterError(None, f"{tag}: unknown setting {key!r} (A1111 knows te=, unet= and dyn=)")
            named[key] = parts[1]
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise AdapterError(None, f"{tag}: the LoRA's name is missing")
    if len(positional) > 4:
        raise AdapterError(None, f"{tag}: too many fields (A1111's form is <lora:name:te:unet>)")
    if len(positional) > 3 or "dyn" in named:
        raise AdapterError(None, f"{tag}: dyn (a rank limit) is not supported; remove it to use the whole LoRA")
    te = _number(tag, "text-encoder", positional[1]) if len(positional) > 1 else 1.0
    if "te" in named:
        te = _number(tag, "text-encoder", named["te"])
    unet = _number(tag, "U-Net", positional[2]) if len(positional) > 2 else te
    if "unet" in named:
        unet = _number(tag, "U-Net", named["unet"])
    return LoraTag(name, te, unet, source=tag)


def combine_lora_tags(*groups: Iterable[LoraTag]) -> list[LoraTag]:
    """The tags of several texts (a prompt and its negative) as one list in order of first appearance.

    A name repeated at the same strengths is one use; at different strengths it is an error, since merging the
    LoRA twice (A1111 adds both) is rarely what a prompt that names it twice means.
    """
    seen: dict[str, LoraTag] = {}
    for group in groups:
        for tag in group:
            first = seen.get(tag.name)
            if first is None:
                seen[tag.name] = tag
            elif (first.te, first.unet) != (tag.te, tag.unet):
                raise AdapterError(
                    None, f"{first.shown} and {tag.shown} ask for the same LoRA at different strengths; use one tag"
                )
    return list(seen.values())


def parse_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """``text`` with its LoRA tags cut out, and the tags in order of first appearance."""
    tags: list[LoraTag] = []

    def cut(match: re.Match[str]) -> str:
        tag, kind = match.group(0), match.group(1)
        if kind not in LORA_KINDS:
            what = "hypernetworks are" if kind == "hypernet" else f"<{kind}:...> extra networks are"
            raise AdapterError(None, f"{tag}: {what} not supported (only <lora:...> and <lyco:...>); remove the tag")
        tags.append(_parse_tag(tag, match.group(2)))
        return ""

    stripped = TAG_RE.sub(cut, text)
    return stripped, combine_lora_tags(tags)


def strip_lora_tags(text: str) -> str:
    """``text`` without its LoRA tags; the tags are still checked, so a malformed one fails here too."""
    return parse_lora_tags(text)[0]
