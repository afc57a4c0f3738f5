"""The opt-in ways to render with less work per image, and their text form (``--fast cache:3,tome:0.5``).

* ``cache:N`` (DeepCache-style feature reuse): every N-th U-Net call runs the whole network and keeps the features
  that enter its shallowest output blocks; the calls between run only the shallow branch (the first
  ``branch + 1`` input blocks and the last ``branch + 1`` output blocks) on top of the kept features. The deep
  blocks change slowly from one step to the next, which is what makes this work. ``cache:N:B`` picks the branch
  (0 = only the first input and last output block; deeper branches recompute more and lose less).
* ``tome:R`` (ToMe-style token merging): in the self-attention of the full-resolution transformer blocks, a share
  ``R`` of the tokens is merged into their most similar neighbour before attention and copied back after it.

Both change the pixels, so the text form is part of a variant's identity and of the infotext ("Fast: ..."), and
the canonical text of a mode is what records carry: parsing it gives back the same mode.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAST_OFF", "FastMode", "FastModeError"]

MAX_CACHE_INTERVAL = 10
MAX_TOME_RATIO = 0.75  # at most every token but one per 2x2 cell can be merged (3 of 4)
DEFAULT_CACHE_BRANCH = 1


class FastModeError(ValueError):
    """A fast-mode text that does not parse; the message names the part and says what is allowed."""


@dataclass(frozen=True)
class FastMode:
    cache_interval: int = 1  # 1: every call runs the whole U-Net (off)
    cache_branch: int = DEFAULT_CACHE_BRANCH
    tome_ratio: float = 0.0  # 0: no token merging

    def __post_init__(self) -> None:
        if not 1 <= self.cache_interval <= MAX_CACHE_INTERVAL:
            raise FastModeError(f"cache interval must be 1..{MAX_CACHE_INTERVAL}, got {self.cache_interval}")
        if self.cache_branch < 0:
            raise FastModeError(f"cache branch must be >= 0, got {self.cache_branch}")
        if not 0.0 <= self.tome_ratio <= MAX_TOME_RATIO:
            raise FastModeError(f"tome ratio must be in [0, {MAX_TOME_RATIO}], got {self.tome_ratio:g}")
        if self.cache_interval == 1:  # no caching: the branch means nothing, and equal modes must compare equal
            object.__setattr__(self, "cache_branch", DEFAULT_CACHE_BRANCH)

    @property
    def caches(self) -> bool:
        return self.cache_interval > 1

    @property
    def merges(self) -> bool:
        return self.tome_ratio > 0.0

    @property
    def enabled(self) -> bool:
        return self.caches or self.merges

    def __str__(self) -> str:
        parts = []
        if self.caches:
            branch = "" if self.cache_branch == DEFAULT_CACHE_BRANCH else f":{self.cache_branch}"
            parts.append(f"cache:{self.cache_interval}{branch}")
        if self.merges:
            parts.append(f"tome:{self.tome_ratio:g}")
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str | None) -> "FastMode":
        """``""``, ``off`` or ``none``: no fast mode; otherwise comma-separated ``cache:N[:B]`` and ``tome:R``."""
        text = (text or "").strip().lower()
        if text in ("", "off", "none", "exact"):
            return FAST_OFF
        fields: dict[str, object] = {}
        seen: set[str] = set()
        for part in (p.strip() for p in text.split(",")):
            name, _, arg = part.partition(":")
            if name in seen:
                raise FastModeError(f"fast mode {text!r}: {name!r} given twice")
            seen.add(name)
            if name == "cache":
                interval, _, branch = arg.partition(":")
                try:
                    fields["cache_interval"] = int(interval)
                    if branch:
                        fields["cache_branch"] = int(branch)
                except ValueError:
                    raise FastModeError(f"fast mode {text!r}: cache takes cache:N or cache:N:B with whole numbers "
                                        f"(e.g. cache:3)") from None
            elif name == "tome":
                try:
                    fields["tome_ratio"] = float(arg)
                except ValueError:
                    raise FastModeError(f"fast mode {text!r}: tome takes a ratio, e.g. tome:0.5") from None
            else:
                raise FastModeError(f"fast mode {text!r}: unknown part {part!r}; use cache:N, tome:R, both "
                                    f"comma-separated, or off")
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except FastModeError as exc:
            raise FastModeError(f"fast mode {text!r}: {exc}") from None


FAST_OFF = FastMode()
